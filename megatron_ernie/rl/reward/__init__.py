"""Reward role: verifiers and the code sandbox. Importable without megatron-core or torch."""
