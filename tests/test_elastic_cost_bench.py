"""benchmarks/elastic_cost.py's pure helpers (no runs)."""

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "elastic_cost.py"
_SPEC = importlib.util.spec_from_file_location("elastic_cost_bench", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_the_kd_arm_reads_the_targets_supernet():
    """kd only changes the continuation: its FLOP check and family table come from the shared supernet
    (run alone, `--arms kd` once failed looking for a kd_supernet directory that never exists)."""
    seed_dir = Path("/runs/seed1")
    assert bench.supernet_dir(seed_dir, "kd") == seed_dir / "targets_supernet"
    for arm in ("supernet", "targets", "gate", "ofa"):
        assert bench.supernet_dir(seed_dir, arm) == seed_dir / f"{arm}_supernet"
    assert set(bench.ARMS) == {"supernet", "targets", "gate", "ofa", "kd"}
