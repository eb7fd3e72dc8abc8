"""Write an output directory so that it is either complete or absent.

Everything is written into a hidden sibling ``.<name>.partial-<pid>`` and
renamed to ``<name>`` only after the last file is closed (a directory rename
is atomic on POSIX file systems).  A failure removes the partial directory; a
killed process leaves only the hidden ``.partial`` one, which no reader takes
for a checkpoint or a model.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.config.outputs import check_writable_dir


def check_new_output(out, field: str) -> Path:
    """``out`` must not exist yet and its parent must be a directory."""
    out = Path(out)
    if out.exists():
        raise ConfigError(field, str(out), "already exists; remove it or choose a new directory")
    if not out.parent.is_dir():
        check_writable_dir(field, out.parent)  # a file in the way, or not writable: say which
        raise ConfigError(field, str(out), f"the parent directory {out.parent} does not exist; create it first")
    check_writable_dir(field, out.parent)
    return out


@contextmanager
def staged_dir(out, field: str = "out"):
    """Yield a temporary directory that becomes ``out`` when the block succeeds."""
    out = check_new_output(out, field)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.replace(partial, out)


def write_text_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
