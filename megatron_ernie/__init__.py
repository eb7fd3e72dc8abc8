"""megatron_ernie: ERNIE-style elastic MoE training on megatron-core."""

__version__ = "0.1.0"

import warnings as _warnings

# megatron-core announces at import that it falls back to torch implementations
# when Transformer Engine/apex are absent; on CPU that is the expected setup.
_warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
_warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
# megatron-core 0.16 calls torch APIs that torch 2.13 marks deprecated (dist_checkpointing's
# load_state_dict and ShardedTensor, the distributed optimizer's all_gather_into_tensor); the
# calls are inside megatron-core, which this project pins and never patches, so the notices
# only clutter every log. Our own deprecated calls still warn (the filters match these texts).
_warnings.filterwarnings("ignore", message="`load_state_dict` is deprecated", category=FutureWarning)
_warnings.filterwarnings("ignore", message="Please use DTensor instead and we are deprecating ShardedTensor")
_warnings.filterwarnings("ignore", message="`torch.distributed.all_gather_into_tensor` is deprecated")

# megatron-core's import wraps its fused functions in torch.compile, which imports torch's
# compiler stack at once; defer that to a first call (runtime/mcore_import.py)
from megatron_ernie.runtime import mcore_import as _mcore_import  # noqa: E402

_mcore_import.install()
