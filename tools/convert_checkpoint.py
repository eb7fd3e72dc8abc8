#!/usr/bin/env python
"""Checkpoint conversion (same as ``ernie convert``): to/from Hugging Face, offline reshard.

    python tools/convert_checkpoint.py to-hf runs/tiny-moe /tmp/tiny-hf
    python tools/convert_checkpoint.py --help
"""

import sys

from megatron_ernie.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
