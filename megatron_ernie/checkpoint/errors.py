"""The checkpoint error type, importable without torch or megatron-core (the CLI's error
handler and read-only commands such as ``ernie summary`` use it)."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, damaged or does not fit the model."""
