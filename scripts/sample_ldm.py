#!/usr/bin/env python
"""Sample a trained LatentDiffusionPipeline into PNG files and a grid: `lat sample-ldm` from a checkout.

  python scripts/sample_ldm.py --help          (the same as: lat sample-ldm --help)
"""

import sys
from pathlib import Path

# This checkout's packages first, so the script runs without (or before) pip install -e .
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lat.commands.sample_ldm import main  # noqa: E402

if __name__ == "__main__":
    main()
