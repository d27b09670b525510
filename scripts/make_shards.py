#!/usr/bin/env python
"""Turn an image folder into WebDataset tar shards with an index: `lat make-shards` from a checkout.

  python scripts/make_shards.py --help          (the same as: lat make-shards --help)
"""

import sys
from pathlib import Path

# This checkout's packages first, so the script runs without (or before) pip install -e .
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lat.commands.make_shards import main  # noqa: E402

if __name__ == "__main__":
    main()
