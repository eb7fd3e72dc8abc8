#!/usr/bin/env python
"""Print what a checkpoint holds (same as ``ernie inspect``).

    python tools/inspect_checkpoint.py runs/tiny-moe --tensors
    python tools/inspect_checkpoint.py runs/tiny-moe --json
"""

import sys

from megatron_ernie.convert.summary import main

if __name__ == "__main__":
    sys.exit(main())
