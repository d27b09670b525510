#!/usr/bin/env python
"""Measure what a trained LatentDiffusionPipeline generates: `lat eval-ldm` from a checkout.

  python scripts/eval_ldm.py --help          (the same as: lat eval-ldm --help)
"""

import sys
from pathlib import Path

# This checkout's packages first, so the script runs without (or before) pip install -e .
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lat.commands.eval_ldm import main  # noqa: E402

if __name__ == "__main__":
    main()
