"""megatron_ernie: ERNIE-style elastic MoE training on megatron-core."""

__version__ = "0.1.0"

import warnings as _warnings

# megatron-core announces at import that it falls back to torch implementations
# when Transformer Engine/apex are absent; on CPU that is the expected setup.
_warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
_warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
