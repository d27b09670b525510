#!/usr/bin/env python
"""Measure a LatentDiffusionPipeline's samples: a thin entry point to ``lat.commands.eval_ldm`` (see --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lat/ first

from lat.commands.eval_ldm import main  # noqa: E402

if __name__ == "__main__":
    main()
