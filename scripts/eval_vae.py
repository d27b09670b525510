#!/usr/bin/env python
"""Measure VAEs on held-out images (PSNR, SSIM, LPIPS, rFID, latent statistics): `lat eval-vae` from a checkout.

  python scripts/eval_vae.py --help          (the same as: lat eval-vae --help)
"""

import sys
from pathlib import Path

# This checkout's packages first, so the script runs without (or before) pip install -e .
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lat.commands.eval_vae import main  # noqa: E402

if __name__ == "__main__":
    main()
