"""The error a conversion raises for bad *files* (bad arguments raise ConfigError).

Every message names the file or tensor, what was found and what to do, so a
user never has to read a torch or safetensors traceback to learn that a shard
is missing.
"""


class ConvertError(RuntimeError):
    """A checkpoint or model directory is missing, damaged or does not fit its config."""
