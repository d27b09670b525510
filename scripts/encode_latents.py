#!/usr/bin/env python
"""Encode an image folder into a latent cache for stage 2: `lat encode-latents` from a checkout.

  python scripts/encode_latents.py --help          (the same as: lat encode-latents --help)
"""

import sys
from pathlib import Path

# This checkout's packages first, so the script runs without (or before) pip install -e .
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lat.commands.encode_latents import main  # noqa: E402

if __name__ == "__main__":
    main()
