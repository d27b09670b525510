#!/usr/bin/env python
"""Train a latent diffusion U-Net on a latent cache (stage 2): `lat train-ldm` from a checkout.

  python scripts/train_ldm.py --help          (the same as: lat train-ldm --help)
"""

import sys
from pathlib import Path

# This checkout's packages first, so the script runs without (or before) pip install -e .
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lat.commands.train_ldm import main  # noqa: E402

if __name__ == "__main__":
    main()
