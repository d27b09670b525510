#!/usr/bin/env python
"""Measure throughput: a thin entry point to ``lat.benchmark`` (``--help`` says everything).

  python scripts/benchmark.py --what train_vae --baseline --out bench.json
  python -m lat.benchmark --what train_vae --baseline --out bench.json   (the same)
"""

import sys
from pathlib import Path

# This checkout's packages first, so the script runs without (or before) pip install -e .
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lat.benchmark.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
