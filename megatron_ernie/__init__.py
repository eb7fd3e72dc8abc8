"""megatron_ernie: ERNIE-style elastic MoE training on megatron-core."""

__version__ = "0.1.0"
