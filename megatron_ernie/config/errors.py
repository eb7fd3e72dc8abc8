"""The one error type for bad configuration.

Every message names the field (as a dotted path), the value that was given and
what would fix it, so a user reading a Slurm log knows which line of which TOML
to change without reading our source.
"""


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or inconsistent."""

    def __init__(self, field: str, value, fix: str):
        self.field, self.value, self.fix = field, value, fix
        super().__init__(f"{field} = {value!r}: {fix}")


def require(cond: bool, field: str, value, fix: str) -> None:
    """Raise ConfigError(field, value, fix) unless ``cond`` holds."""
    if not cond:
        raise ConfigError(field, value, fix)
