"""--what startup: what building the stage-1 training data costs before the first step, per rank.

Four cases over the same N files, alternating repeat by repeat (``measure``):

* ``list_images``: walking the folder (``autoencoderkl.data.list_images``);
* ``header_check_every_file``: ``_check_header`` on every file, which is what
  ``ImageFolder(train=True)`` did at construction before the header check became lazy
  (and what ``train=False`` still does);
* ``ImageFolder(train=True)``: the construction now (one header read, shared flags);
* ``serialize_list``: pickling the list as ``broadcast_paths`` sends it
  (``accelerate.utils.broadcast_object_list``) and unpickling it into paths: what a rank
  that receives the list pays, less the transfer.

The files: ``--data FOLDER`` (all its images, or the first ``--num-images``), or N
synthetic ones (default 100,000): hard links to 16 tiny PNGs (8 x 8 px, about 250 bytes)
in folders of 1,000, so creating them takes seconds and no disk space. Either way the
figures are for a warm page cache on this machine's file system; on network storage
every open and stat costs a round trip more, which the per-file figures scale with.
"""

from __future__ import annotations

import argparse
import os
import pickle
import time
from pathlib import Path
from typing import Any

from .harness import environment, load_average, measure

SYNTHETIC_FILES = 100_000


def synthetic_folder(folder: Path, n: int) -> Path:
    """``n`` PNG files under ``folder`` (sub-folders of 1,000): hard links to 16 tiny images."""
    import numpy as np
    from PIL import Image

    sources = []
    for i in range(16):
        path = folder / f"source-{i:02d}.png"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
        sources.append(path)
    images = folder / "images"
    for k in range(n):
        sub = images / f"{k // 1000:04d}"
        if k % 1000 == 0:
            sub.mkdir(parents=True)
        os.link(sources[k % 16], sub / f"{k:07d}.png")
    return images


def bench_startup(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Seconds and microseconds per file of listing, the old eager check and the lazy construction."""
    import torch

    from autoencoderkl.data import ImageFolder, _check_header, list_images

    if args.data != "demo":
        folder = Path(args.data).resolve()
        source = f"--data {folder}"
    else:
        n = args.num_images or SYNTHETIC_FILES
        t0 = time.perf_counter()
        folder = synthetic_folder(scratch / "startup", n)
        source = f"{n} synthetic files: hard links to 16 8x8 PNGs, 1,000 per folder (made in {time.perf_counter() - t0:.1f} s)"
    paths = list_images(folder)[: args.num_images]
    n = len(paths)
    print(f"startup over {n} files ({source}) ...", flush=True)

    def listing() -> int:
        return len(list_images(folder))

    def header_check_every_file() -> int:
        for p in paths:
            _check_header(p)
        return n

    def construction() -> int:
        ImageFolder(paths, resolution=8, train=True)
        return n

    def serialize_list() -> int:
        return len(pickle.loads(pickle.dumps(paths)))

    cases = {"list_images": listing, "header_check_every_file": header_check_every_file,
             "ImageFolder(train=True)": construction, "serialize_list": serialize_list}
    load_before = load_average()
    results = measure(cases, args.repeats, warmup_calls=args.warmup)
    for r in results.values():
        r["us_per_file"] = 1e6 / r["items_per_s"]  # from the unrounded median
    old, new = results["header_check_every_file"], results["ImageFolder(train=True)"]
    ratio = new["items_per_s"] / old["items_per_s"]
    print(f"\nstartup: {n} files, median of {args.repeats} after {args.warmup} warm-up call(s)")
    print(f"{'case':<26} {'seconds (median, min-max)':>28} {'us/file':>9}")
    for name, r in results.items():
        spread = f"{r['median_s']:.4f} ({min(r['seconds']):.4f}-{max(r['seconds']):.4f})"
        print(f"{name:<26} {spread:>28} {r['us_per_file']:9.3f}")
    print(f"construction: {old['median_s']:.3f} s before (every header), {new['median_s']:.4f} s now "
          f"({ratio:.0f}x less), per rank")
    return {
        "environment": {**environment("cpu", "n/a", torch.get_num_threads()), "load_average_before": load_before},
        "settings": {"files": n, "source": source, "warmup": args.warmup, "repeats": args.repeats},
        "results": results,
        "construction_before_over_now": ratio,
        "notes": ["warm page cache; seconds per repeat over all files, us_per_file = 1e6 / items_per_s (median)",
                  "header_check_every_file is what ImageFolder(train=True) construction cost before the lazy check"],
    }
