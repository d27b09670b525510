#!/usr/bin/env python
"""Train a Stable-Diffusion-style AutoencoderKL (stage 1): `lat train-vae` from a checkout.

  python scripts/train_vae.py --help          (the same as: lat train-vae --help)
"""

import sys
from pathlib import Path

# This checkout's packages first, so the script runs without (or before) pip install -e .
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lat.commands.train_vae import main  # noqa: E402

if __name__ == "__main__":
    main()
