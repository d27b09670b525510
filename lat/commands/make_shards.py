"""Turn an image folder into WebDataset tar shards with an index.

  lat make-shards /data/photos /data/photos-shards
  lat make-shards /data/imagenet/train /data/in-shards --shard-size 2000 --val-fraction 0.01

(From a checkout, scripts/make_shards.py takes the same arguments.)

Class subfolders become labels (KEY.cls; the sorted subfolder names are the classes).
Every image is decoded once as it is packed: unreadable files (not an image, truncated)
are skipped, named and counted in OUT/index.json, as training skips them.
Each image's bytes are stored untouched (KEY.jpg, KEY.png, ...; --image-format png for a
folder of mixed formats). OUT/index.json lists the splits, their shard files, sample
counts and sha256. Train on the shards with

  accelerate launch -m lat train-vae --config ... data.source=hf data.dataset=webdataset \\
      "data.data_files={train: 'OUT/train-*.tar', validation: 'OUT/validation-*.tar'}" data.val_split=validation

(see docs/data-at-scale.md).
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; the module docstring is the ``--help`` text."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="image folder, searched recursively (class subfolders become labels)")
    parser.add_argument("out", help="the shard folder to create (written atomically)")
    parser.add_argument("--shard-size", type=int, default=1000,
                        help="images per tar (default: 1000); aim for >= processes x workers shards per split")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="share of the images, evenly spaced in sorted order, held out as the validation split "
                             "(default: 0)")
    parser.add_argument("--image-format", choices=("keep", "png"), default="keep",
                        help="keep: each file's bytes untouched (one format per folder); png: decode and store as "
                             "lossless PNG (default: keep)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty OUT")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Write the shards and print one line per split.

    Raises:
        SystemExit: ``error: ...`` on a missing folder or a bad argument.
    """
    args = parse_args(argv)
    from autoencoderkl.shards import make_shards  # heavy imports after --help

    try:
        index = make_shards(args.folder, args.out, args.shard_size, args.val_fraction, args.image_format,
                            args.overwrite)
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    labels = f", {len(index['classes'])} classes" if index["classes"] else ", unlabelled"
    for split, info in index["splits"].items():
        print(f"{args.out}/{info['pattern']}: {info['num_samples']} images in {len(info['shards'])} shards "
              f"({split}{labels}, field {index['image_field']})")
    if index["num_skipped"]:
        print(f"skipped {index['num_skipped']} unreadable files (listed in {args.out}/index.json)")
