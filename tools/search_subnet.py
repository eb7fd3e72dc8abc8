#!/usr/bin/env python3
"""Search a trained elastic supernet's sub-networks; pick the best under a budget.

    python tools/search_subnet.py --run-dir runs/tiny-moe --budget-active 350000

A thin wrapper: the logic is megatron_ernie.elastic.search.main (also `ernie search`).
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_ernie.elastic.search import main

    sys.exit(main())
