#!/usr/bin/env python3
"""Extract a sub-network of an elastic supernet into a standalone checkpoint.

    python tools/extract_subnet.py --run-dir runs/tiny-moe --subnet "depth=3,ffn=0.5,experts=2,topk=1" --out runs/sub

A thin wrapper: the logic is megatron_ernie.elastic.extract.main (also `ernie extract`).
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_ernie.elastic.extract import main

    sys.exit(main())
