"""The common main of the multi-process workers (tests/dist/*_worker.py).

    torchrun --nproc_per_node=N tests/dist/<worker>.py SCENARIO OUT.json [CASE_JSON]

Initialises torch.distributed through the package (so the CPU compat layer
applies), runs one scenario (which usually loops over many cases inside this
one launch, since start-up dominates on CPU) and has rank 0 write its JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist


def run(scenarios: dict) -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    case = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    from megatron_ernie.runtime.distributed import init_distributed

    init_distributed()
    results = scenarios[scenario](case, out.parent)
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results, default=float))
    dist.barrier()
    dist.destroy_process_group()
