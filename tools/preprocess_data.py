#!/usr/bin/env python3
"""Tokenize a corpus into megatron-core indexed dataset files (<prefix>.bin/.idx).

    python tools/preprocess_data.py --input kjv --output-prefix data/kjv --vocab-size 4096
    python tools/preprocess_data.py --input my.jsonl --output-prefix data/my --tokenizer data/kjv.tokenizer.json

A thin wrapper: the logic is megatron_ernie.data.preprocess.main (also `ernie preprocess`).
"""

import os
import sys

if __name__ == "__main__":
    # Run from a source checkout without installing: put the repository root on the path.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_ernie.data.preprocess import main

    sys.exit(main())
