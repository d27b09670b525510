#!/usr/bin/env python
"""Turn an image folder into WebDataset tar shards with an index (lat/commands/make_shards.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lat.commands.make_shards import main  # noqa: E402

if __name__ == "__main__":
    main()
