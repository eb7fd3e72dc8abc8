"""Output locations are checked before any work starts.

A command that trains for an hour and then cannot write its checkpoint, or that
tokenizes a corpus and then fails on ``mkdir``, wastes the work and shows an
OSError traceback.  ``check_writable_dir`` looks at the nearest existing
ancestor of the path (the part a command would create is not there yet), then
proves it writable by creating and removing a probe file there: permission
bits alone do not say it (root ignores them; read-only mounts and /proc do not).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from megatron_ernie.config.errors import ConfigError


def nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(field: str, path, what: str = "directory") -> None:
    """``path`` (a directory, existing or to be created) can be created and written into."""
    base = nearest_existing(Path(path))
    if not base.is_dir():
        raise ConfigError(field, str(path), f"{base} is a file, not a directory, so the {what} cannot be "
                                            f"created under it; choose a path under a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ernie-write-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(field, str(path), f"cannot write into {base} ({err.strerror}); choose a writable "
                                            f"location") from None


def check_writable_prefix(field: str, prefix) -> None:
    """Files ``<prefix>.*`` can be written: the prefix's directory is writable."""
    check_writable_dir(field, Path(os.path.abspath(prefix)).parent, "output directory")
