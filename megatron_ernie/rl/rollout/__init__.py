"""Rollout role: generation engines (megatron-core with a KV cache; vLLM/SGLang later) and the worker loop."""
