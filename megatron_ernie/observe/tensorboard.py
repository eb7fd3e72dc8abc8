"""TensorBoard scalars, written by exactly one rank.

Uses ``torch.utils.tensorboard.SummaryWriter`` (event files that TensorBoard's
own reader loads).  Every other rank gets a writer that does nothing, so call
sites never branch on rank.
"""

from __future__ import annotations

from pathlib import Path


class NullWriter:
    def scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def scalars(self, values: dict, step: int, prefix: str = "") -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class ScalarWriter(NullWriter):
    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = str(log_dir)
        self._writer = SummaryWriter(log_dir=self.log_dir, purge_step=purge_step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if value is not None:
            self._writer.add_scalar(tag, float(value), step)

    def scalars(self, values: dict, step: int, prefix: str = "") -> None:
        for tag, value in values.items():
            self.scalar(prefix + tag, value, step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def make_writer(enabled: bool, is_logging_rank: bool, log_dir: str | Path, purge_step: int | None = None) -> NullWriter:
    """``purge_step``: the first step of a resumed run; readers drop events at or after it that
    earlier event files hold (what a killed run logged after its last checkpoint)."""
    return ScalarWriter(log_dir, purge_step) if enabled and is_logging_rank else NullWriter()
