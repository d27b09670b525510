#!/usr/bin/env python
"""Pictures of a VAE's latent space and its training curves: `lat inspect-vae` from a checkout.

  python scripts/inspect_vae.py --help          (the same as: lat inspect-vae --help)
"""

import sys
from pathlib import Path

# This checkout's packages first, so the script runs without (or before) pip install -e .
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lat.commands.inspect_vae import main  # noqa: E402

if __name__ == "__main__":
    main()
