"""An image folder -> WebDataset tar shards with an index (``lat make-shards``).

The shards are what ``data.source: hf`` with ``data.dataset: webdataset`` streams, and
what ``lat encode-latents --data hf:webdataset:...`` encodes. Written with
``webdataset.ShardWriter``; read back by ``datasets``' ``webdataset`` builder.

Layout of ``OUT`` (published atomically: written as a hidden temporary folder, then renamed)::

    OUT/train-000000.tar ...        shard_size samples each, in the folder's sorted order
    OUT/validation-000000.tar ...   with --val-fraction > 0: evenly spaced held-out images
    OUT/index.json                  splits, shard files, counts, sha256, classes, fields

A sample is ``KEY.jpg`` (or ``.png``, ... : the file's own bytes, untouched, so decoding
a shard gives exactly the pixels of the file), ``KEY.cls`` (the label, as text, when
every image sits in a class subfolder: the sorted subfolder names are the classes
0..K-1, as torchvision's ``ImageFolder``) and ``KEY.path.txt`` (the file's path relative
to the folder). ``KEY`` is the image's position in the sorted folder, 8 digits.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from .atomic import atomic_dir
from .data import (
    _MAX_NAMED_WARNINGS,
    PathLike,
    UnreadableImageWarning,
    _failure_reason,
    class_labels,
    evenly_spaced,
    list_images,
    load_rgb,
    png_bytes,
)

INDEX_FILE = "index.json"
# A file's extension -> the WebDataset field its bytes go to (datasets decodes these as images).
IMAGE_FIELDS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp", ".tif": "tiff",
                ".tiff": "tiff"}
IMAGE_FORMATS = ("keep", "png")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _decoded(path: Path, image_format: str) -> bytes:
    """What a sample stores for ``path``, after decoding it fully as training would.

    ``keep``: the file's bytes (decoded once only to check them); ``png``: the decoded
    image as lossless PNG. A decompression bomb of warning size fails like one of error
    size, as ``autoencoderkl.data.load_resized`` treats it.

    Raises:
        OSError: if the file is not a readable image (not an image, truncated, a bomb).
    """
    data = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = load_rgb(data, name=str(path))
        except Image.DecompressionBombWarning as exc:
            raise OSError(f"cannot read image {path}: decompression bomb: {exc}") from exc
    return data if image_format == "keep" else png_bytes(img)


def make_shards(
    folder: PathLike,
    out: PathLike,
    shard_size: int = 1000,
    val_fraction: float = 0.0,
    image_format: str = "keep",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the images under ``folder`` as WebDataset tar shards plus ``index.json``.

    Args:
        folder: an image folder, searched recursively (``list_images``); class
            subfolders become labels (``class_labels``).
        out: the shard folder to create.
        shard_size: samples per tar, >= 1 (the last shard of a split holds the rest).
            Streams split whole shards over ranks and DataLoader workers: aim for at
            least processes x workers shards per split.
        val_fraction: in [0, 1): this share of the images (round(n x f), evenly spaced
            in sorted order, a split that does not depend on chance) goes to the
            ``validation`` split instead of ``train``.
        image_format: ``keep``: each file's bytes untouched (the folder must hold one
            format; .jpg and .jpeg count as one); ``png``: every image decoded as
            training decodes it and stored as lossless PNG (mixed folders).
        overwrite: replace an existing non-empty ``out``.
    Every image is decoded once as it is packed (a tqdm bar counts them): a file that is
    not a readable image (text named .png, truncated, a decompression bomb) is skipped,
    named in an ``UnreadableImageWarning`` (the first 20) and counted, as training skips
    it; its sample is left out of its split.

    Returns:
        The index (as written to ``out/index.json``): ``splits`` {name: {``pattern``
        (brace pattern of its files, relative to ``out``), ``num_samples``, ``shards``
        [{``file``, ``num_samples``, ``sha256``}]}}, ``classes`` (or None),
        ``image_field``, ``label_field``, ``source``, ``image_format``, ``num_samples``
        (packed), ``num_skipped`` and ``skipped`` [[path relative to ``folder``, reason]].
    Raises:
        FileNotFoundError, ValueError: a missing or image-less ``folder`` (``list_images``).
        ValueError: a bad argument, a folder of several formats with ``keep``, nothing
            left to train on (none of the training split's images readable), or an
            existing ``out`` without ``overwrite``.
    """
    import webdataset as wds

    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must lie in [0, 1), got {val_fraction}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"--image-format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    root, out = Path(folder).resolve(), Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} already exists and is not empty; choose another OUT or pass --overwrite")
    paths = list_images(root)
    labels, classes = class_labels(root, paths)
    if image_format == "keep":
        kinds: dict[str, int] = {}
        for p in paths:
            field = IMAGE_FIELDS.get(p.suffix.lower(), p.suffix.lower().lstrip("."))
            kinds[field] = kinds.get(field, 0) + 1
        if len(kinds) > 1:
            counts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
            raise ValueError(f"{root} mixes image formats ({counts}); a shard set needs one image field: pass "
                             "--image-format png to store every image as lossless PNG")
        field = next(iter(kinds))
    else:
        field = "png"
    n_val = round(len(paths) * val_fraction)
    if n_val >= len(paths):
        raise ValueError(f"--val-fraction {val_fraction} of {len(paths)} images leaves none to train on")
    held = set(evenly_spaced(range(len(paths)), n_val)) if n_val else set()
    splits = {"train": [i for i in range(len(paths)) if i not in held], "validation": sorted(held)}

    index: dict[str, Any] = {"format": "webdataset", "source": str(root), "image_format": image_format,
                             "image_field": field, "label_field": "cls" if labels is not None else None,
                             "path_field": "path.txt", "classes": classes, "num_samples": 0, "splits": {},
                             "num_skipped": 0, "skipped": []}
    if out.exists() and overwrite:
        shutil.rmtree(out)
    progress = tqdm(total=len(paths), desc="make_shards", unit="img", dynamic_ncols=True)
    with atomic_dir(out) as tmp:
        for split, members in splits.items():
            if not members:
                continue
            written = 0
            with wds.ShardWriter(str(tmp / f"{split}-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
                for i in members:
                    progress.update(1)
                    try:
                        data = _decoded(paths[i], image_format)
                    except OSError as exc:
                        reason = _failure_reason(paths[i], exc)
                        index["skipped"].append([str(paths[i].relative_to(root)), reason])
                        if len(index["skipped"]) <= _MAX_NAMED_WARNINGS:
                            warnings.warn(f"skipping {paths[i]}: {reason}", UnreadableImageWarning, stacklevel=2)
                        progress.set_postfix(skipped=len(index["skipped"]), refresh=False)
                        continue
                    sample = {"__key__": f"{i:08d}", field: data, "path.txt": str(paths[i].relative_to(root))}
                    if labels is not None:
                        sample["cls"] = labels[i]
                    sink.write(sample)
                    written += 1
            files = sorted(tmp.glob(f"{split}-*.tar"))
            if not written:  # every image of the split was unreadable: no split, no empty tar
                for f in files:
                    f.unlink()
                if split == "train":
                    progress.close()
                    raise ValueError(f"none of the {len(members)} training images in {root} is readable "
                                     f"(e.g. {'; '.join(f'{p}: {r}' for p, r in index['skipped'][:3])})")
                continue
            for extra in files[(written + shard_size - 1) // shard_size:]:  # an empty tar opened last, if any
                extra.unlink()
            files = files[: (written + shard_size - 1) // shard_size]
            shards = [{"file": f.name, "num_samples": min(shard_size, written - k * shard_size),
                       "sha256": _sha256(f)} for k, f in enumerate(files)]
            index["splits"][split] = {"pattern": f"{split}-{{000000..{len(files) - 1:06d}}}.tar",
                                      "num_samples": written, "shards": shards}
            index["num_samples"] += written
        progress.close()
        index["num_skipped"] = len(index["skipped"])
        if index["skipped"]:
            warnings.warn(f"skipped {index['num_skipped']} of {len(paths)} files in {root}: not readable as images "
                          f"(listed in {out / INDEX_FILE} 'skipped')", UnreadableImageWarning, stacklevel=2)
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1))
    return index
