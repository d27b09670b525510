"""The latent cache, writer side: encode an image folder once into shards and an index.

The folder this writes (layout, ``index.json`` keys, statistics, row order) is described
in ``latent_diffusion/latents.py``, which holds the format's constants and reads it back.

Reading order of this file:

1. ``_vae_config`` / ``_latent_shape``: what the cache records of the VAE (with its
   weights' fingerprint, ``autoencoderkl.model.vae_weights_sha256``) and the latent size.
2. ``list_sources`` / ``load_source``: what gets encoded (the images of a folder, with
   labels from class subfolders, or the tiles of the demo photos) and the exact pixels;
   ``SourceImages`` / ``_collate`` decode them in DataLoader workers.
3. ``encode_batch``: images -> posterior mean and standard deviation (one VAE forward).
4. ``_shard_sums`` and ``_ShardWriter``: the float64 sums behind the statistics, and the
   background thread that writes each finished shard.
5. ``_check_manifest``, ``encode_latents`` and its loop ``_encode_shards``: the plan
   (``manifest.json``), its check when a run resumes, shards dealt to the processes of
   an Accelerate launch, resumable after a kill.
6. ``_read_shard_meta``, ``_moments``, ``_build_index``: ``index.json`` from the
   manifest and the shards' headers alone (no tensor is read).

Every file (shards, ``manifest.json``, ``index.json``) is written with
``autoencoderkl.atomic``: under a hidden temporary name ``.NAME.tmp-PID.SUFFIX``,
fsynced, renamed onto its name, and the folder fsynced, so a reader or a resumed run
never sees half a file. The temporaries a killed run leaves (``_LEFTOVERS``) are
removed by the next run before anything is written.

References: Rombach et al. 2022 (LDM), sec. 4.3.2 for the scaling factor; the latent
caches of facebookresearch/fast-DiT (``extract_features.py``) and CompVis
latent-diffusion, whose shortcomings this format answers (frozen flip and sample, one
file per image, a scale factor from one batch, no record of the VAE).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import queue
import threading
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from accelerate import Accelerator
from diffusers import AutoencoderKL
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from autoencoderkl.atomic import atomic_path, write_atomic
from autoencoderkl.data import (
    DEMO_TRAIN,
    DEMO_VAL,
    UnreadableImageWarning,
    class_labels,
    demo_image_paths,
    list_images,
    load_resized,
    to_tensor,
)
from autoencoderkl.model import load_vae, vae_weights_sha256
from autoencoderkl.launch import build_accelerator, set_cpu_threads

from .latents import DTYPES, FORMAT_VERSION, INDEX_FILE, MANIFEST_FILE, SHARD_TEMPLATE, PathLike, load_index
from .pipeline import LatentNormalization

logger = logging.getLogger(__name__)

# Demo tiles: the photos' shorter side is resized to these multiples of the resolution.
DEMO_SCALES = (2, 3, 4)
_MAX_NAMED_WARNINGS = 20  # per process; the rest are only counted
# Temporary files a killed run can leave in a cache folder: autoencoderkl.atomic's
# ".NAME.tmp-PID.SUFFIX", and ".NAME.tmp" of caches written before it.
_LEFTOVERS = (".shard-*.safetensors.tmp*", f".{MANIFEST_FILE}.tmp*", f".{INDEX_FILE}.tmp*")


# --------------------------------------------------------------------------- VAE


def _vae_config(vae: AutoencoderKL) -> dict[str, Any]:
    """The VAE's ``config.json`` content (public keys), JSON-ready."""
    return json.loads(json.dumps({k: v for k, v in dict(vae.config).items() if not k.startswith("_")}, default=list))


def _latent_shape(vae: AutoencoderKL, resolution: int) -> tuple[int, int, int]:
    """(c, h, w) of the latents of a (3, resolution, resolution) image."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor:
        raise ValueError(
            f"resolution {resolution} is not divisible by the VAE's downsampling factor {factor}; "
            f"use a multiple of {factor}, e.g. {max(factor, resolution // factor * factor)}"
        )
    return vae.config.latent_channels, resolution // factor, resolution // factor


# --------------------------------------------------------------------------- sources


class Source(NamedTuple):
    """One image to encode: a file, and which square of it.

    ``resize`` None: the shorter side is resized to the resolution and the centre square
    is cropped (folders). Otherwise the shorter side is resized to ``resize`` pixels and
    the square at (``top``, ``left``) is cropped (demo tiles).
    """

    path: Path
    resize: int | None = None
    top: int = 0
    left: int = 0

    def name(self) -> str:
        """The string ``index.json["paths"]`` records: the path, plus ``#resizeS_yT_xL`` for a tile."""
        if self.resize is None:
            return str(self.path)
        return f"{self.path}#resize{self.resize}_y{self.top}_x{self.left}"

    @classmethod
    def parse(cls, name: str) -> "Source":
        """The inverse of ``name``: an ``index.json["paths"]`` entry -> the ``Source`` it records."""
        tile = _TILE_NAME.fullmatch(name)
        if tile is None:
            return cls(Path(name))
        return cls(Path(tile["path"]), int(tile["resize"]), int(tile["top"]), int(tile["left"]))


_TILE_NAME = re.compile(r"(?P<path>.*)#resize(?P<resize>\d+)_y(?P<top>\d+)_x(?P<left>\d+)")


def _demo_sources(resolution: int) -> tuple[list[Source], list[int], list[str]]:
    """Every non-overlapping tile of the demo photos at shorter sides 2, 3, 4 x resolution.

    The demo VAE learnt 64 px crops of photos whose shorter side was 128 px (2x); the
    3x and 4x scales zoom further in (smoother content, which the VAE reconstructs at
    least as well) and bring the count to a few hundred: 308 tiles at resolution 64.
    Each scale's grid of ``rows x cols`` tiles is centred (the leftover margin is split
    evenly); tiles go photo by photo, scale by scale, row-major. Label = the photo.
    """
    photos = demo_image_paths("train") + demo_image_paths("val")
    sources: list[Source] = []
    labels: list[int] = []
    for label, path in enumerate(photos):
        with Image.open(path) as im:
            w, h = im.size
        for scale in DEMO_SCALES:
            short = scale * resolution
            # torchvision's resize to an int: shorter side -> short, longer -> int(short * long / shorter).
            rw, rh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
            rows, cols = rh // resolution, rw // resolution
            top0, left0 = (rh - rows * resolution) // 2, (rw - cols * resolution) // 2
            for r in range(rows):
                for c in range(cols):
                    sources.append(Source(path, short, top0 + r * resolution, left0 + c * resolution))
                    labels.append(label)
    classes = [Path(name).stem for name in DEMO_TRAIN + DEMO_VAL]
    return sources, labels, classes


def list_sources(data: PathLike, resolution: int) -> tuple[list[Source], list[int] | None, list[str] | None]:
    """What ``encode_latents`` encodes, in cache order, with labels.

    A folder: every image under it, recursively, in sorted path order
    (``autoencoderkl.data.list_images``). If every image sits inside a subfolder of
    ``data`` (none at its top level), the folder is labelled as torchvision's
    ``ImageFolder`` does: the sorted names of the subfolders holding images are the
    classes 0..K-1, and an image's label is the subfolder it sits in. ``"demo"``: the
    tiles of the photos scikit-image ships (``_demo_sources``), labelled by photo.

    Args:
        data: a folder path, or ``"demo"``.
        resolution: side of the square crops in pixels (sets the demo tiles).
    Returns:
        ``(sources, labels, classes)``; ``labels`` (one int per source) and ``classes``
        (names in label order) are None for an unlabelled folder.
    Raises:
        FileNotFoundError: if ``data`` is not a folder.
        ValueError: if it holds no image files.
    """
    if str(data) == "demo":
        return _demo_sources(resolution)
    root = Path(data).resolve()
    paths = list_images(root)
    labels, classes = class_labels(root, paths)
    return [Source(p) for p in paths], labels, classes


def load_source(source: Source, resolution: int) -> Tensor:
    """Decode one source into the exact pixels the cache encodes.

    ``autoencoderkl.data.load_rgb`` (any mode -> 8-bit RGB, EXIF orientation), a bicubic
    antialiased resize of the shorter side (to ``resolution``, or ``source.resize`` for a
    tile), then the square crop (centre, or the tile's box).

    Args:
        source: a ``Source`` from ``list_sources``.
        resolution: side of the square in pixels.
    Returns:
        (3, resolution, resolution) float32 in [-1, 1].
    Raises:
        OSError: if the file cannot be decoded (also for decompression bombs).
    """
    return _crop(load_resized(source.path, resolution if source.resize is None else source.resize), source, resolution)


def _crop(img: Image.Image, source: Source, resolution: int) -> Tensor:
    """Crop the source's square out of the resized image -> (3, R, R) float32 in [-1, 1]."""
    if source.resize is None:
        img = TF.center_crop(img, [resolution, resolution])
    else:
        img = TF.crop(img, source.top, source.left, resolution, resolution)
    return to_tensor(img)


class SourceImages(torch.utils.data.Dataset):
    """Sources -> their pixels, in DataLoader workers (the encoder's and ``lat eval-ldm``'s reference).

    Item ``pos`` is ``(pos, pixels, reason)``: pixels (3, resolution, resolution) float32
    in [-1, 1] as ``load_source`` gives them, or None with the reason the file could not
    be read (``_collate`` counts those). Consecutive demo tiles of one photo decode it once.
    """

    def __init__(self, sources: Sequence[Source], resolution: int):
        self.sources, self.resolution = sources, resolution
        self._last: tuple[tuple[Path, int], Image.Image] | None = None  # demo: tiles share a photo

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, pos: int) -> tuple[int, Tensor | None, str | None]:
        source = self.sources[pos]
        try:
            if source.resize is None:
                return pos, load_source(source, self.resolution), None
            key = (source.path, source.resize)
            if self._last is None or self._last[0] != key:
                self._last = (key, load_resized(source.path, source.resize))
            return pos, _crop(self._last[1], source, self.resolution), None
        except FileNotFoundError:
            return pos, None, "file not found"
        except OSError as exc:
            return pos, None, str(exc)


def _collate(items: list[tuple[int, Tensor | None, str | None]]) -> dict[str, Any]:
    """Worker side: stack the decoded images of a batch, keep the failures apart."""
    ok = [x for _, x, _ in items if x is not None]
    return {
        "positions": [pos for pos, _, _ in items],
        "images": torch.stack(ok) if ok else None,  # (k, 3, R, R) float32 in [-1, 1]
        "ok": [x is not None for _, x, _ in items],
        "failed": [(pos, reason) for pos, x, reason in items if x is None],
    }


class HFSource(NamedTuple):
    """``--data hf:...``: a streaming ``datasets`` source, one cache shard per input shard (tar, parquet file)."""

    ds: Any  # the streaming IterableDataset, image column undecoded (autoencoderkl.hf_data.prepare_columns)
    column: str  # the image column
    label_column: str | None
    sources: list[str]  # what each input shard is called (its file), in order: cache shard k = input shard k
    classes: list[str] | None  # the label column's ClassLabel names, if it has them
    identity: dict[str, Any]  # what index.json["data"] records


def open_hf_source(dataset: str, data_files: Any = None, split: str = "train", image_column: str | None = None,
                   label_column: str | None = None) -> HFSource:
    """Open ``--data hf:DATASET`` for encoding: always streamed (a single pass needs no Arrow copy).

    Args:
        dataset: a Hub name, a local folder, a builder (imagefolder | parquet | webdataset),
            or "" to take the builder from ``data_files``' extension.
        data_files, split, image_column, label_column: as the ``data.*`` keys of stage 1
            (``autoencoderkl.hf_data``); ``label_column`` must hold ints or a ClassLabel.
    Returns:
        An ``HFSource``; its ``identity`` holds the builder, split, columns and the
        resolved data files (a Hub dataset's include its commit).
    Raises:
        ImportError, FileNotFoundError, ValueError: as ``autoencoderkl.hf_data.load_hf``;
            ValueError also for a missing or non-integer label column, or an empty source.
    """
    import datasets

    from autoencoderkl.hf_data import _builder, expand_data_files, find_image_column, load_hf, prepare_columns

    files = expand_data_files(data_files, "--data-files")
    ds = load_hf(dataset or None, files, split, streaming=True)
    where = f"hf:{dataset}[{split}]"
    column = find_image_column(ds.features, image_column, where)
    classes = None
    if label_column is not None:
        feature = (ds.features or {}).get(label_column)
        if feature is None:
            raise ValueError(f"--label-column {label_column!r} is not a column of {where}; columns: {list(ds.features or {})}")
        if isinstance(feature, datasets.ClassLabel):
            classes = list(feature.names)
        elif not (isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))):
            raise ValueError(f"--label-column {label_column!r} of {where} holds {feature}, not integer labels")
    ds = prepare_columns(ds, column, [label_column] if label_column else [])
    builder = datasets.load_dataset_builder(_builder(dataset or None, files), **({"data_files": files} if files else {}))
    resolved = [str(f) for f in (builder.config.data_files or {}).get(split, [])]
    sources = resolved if len(resolved) == ds.num_shards else [f"{where} input shard {k}" for k in range(ds.num_shards)]
    identity = {"source": "hf", "dataset": dataset, "builder": builder.name, "split": split, "image_column": column,
                "label_column": label_column, "data_files": resolved}
    return HFSource(ds, column, label_column, sources, classes, identity)


class _HFShardImages(torch.utils.data.IterableDataset):
    """Worker side: whole input shards -> batches of centre crops that never straddle a shard.

    Worker w of W takes the cache shards ``shards[w::W]``; each input shard is read in
    order (``IterableDataset.shard(contiguous=True).iter(batch_size)``, which ``datasets``
    does not divide among DataLoader workers) and ends with an empty batch marked ``last``.
    """

    def __init__(self, hf: HFSource, shards: list[int], resolution: int, batch_size: int):
        self.hf, self.shards, self.resolution, self.batch_size = hf, shards, resolution, batch_size

    def __iter__(self) -> Any:
        from autoencoderkl.hf_data import image_bytes, sample_name

        info = torch.utils.data.get_worker_info()
        mine = self.shards[info.id :: info.num_workers] if info else self.shards
        hf, centre = self.hf, Source(Path())
        for k in mine:
            part = hf.ds.shard(num_shards=len(hf.sources), index=k, contiguous=True)
            position = 0
            for rows in part.iter(batch_size=self.batch_size):
                examples = [dict(zip(rows, values)) for values in zip(*rows.values())]
                items = []
                for example in examples:
                    name = sample_name(example, hf.column, f"{hf.sources[k]}#{position}")
                    position += 1
                    try:
                        x = _crop(load_resized(image_bytes(example.get(hf.column)), self.resolution, name), centre,
                                  self.resolution)
                        items.append((name, x, None, example.get(hf.label_column) if hf.label_column else None))
                    except (OSError, ValueError) as exc:
                        items.append((name, None, str(exc), None))
                yield {"shard": k, "last": False, **_batch_of(items)}
            yield {"shard": k, "last": True, **_batch_of([])}


def _batch_of(items: list[tuple[Any, Tensor | None, str | None, int | None]]) -> dict[str, Any]:
    """(name or position, pixels or None, failure reason or None, label or None) -> one batch."""
    ok = [x for _, x, _, _ in items if x is not None]
    return {
        "count": len(items),
        "images": torch.stack(ok) if ok else None,  # (k, 3, R, R) float32 in [-1, 1]
        "names": [n for n, x, _, _ in items if x is not None],
        "labels": [label for _, x, _, label in items if x is not None],
        "failed": [(n, reason) for n, x, reason, _ in items if x is None],
    }


# --------------------------------------------------------------------------- encoding


@torch.no_grad()
def encode_batch(vae: AutoencoderKL, images: Tensor, hflip: bool = False) -> tuple[Tensor, Tensor]:
    """Images -> posterior mean and standard deviation of z (one VAE forward).

    Args:
        vae: the frozen ``AutoencoderKL``, in eval mode.
        images: (B, 3, H, W) float32 in [-1, 1] on the VAE's device.
        hflip: also encode each image mirrored left-right.
    Returns:
        ``(mean, std)``, each (B, c, H/f, W/f) float32, or (2B, ...) with ``hflip``: rows
        2k and 2k+1 are image k and its mirror. ``std = exp(logvar / 2)`` with logvar
        clamped to [-30, 20] (diffusers' ``DiagonalGaussianDistribution``).
    """
    if hflip:
        images = torch.stack([images, images.flip(-1)], dim=1).flatten(0, 1)  # (2B, 3, H, W)
    posterior = vae.encode(images).latent_dist
    return posterior.mean.float(), posterior.std.float()


def _shard_sums(mean: Tensor, std: Tensor) -> dict[str, Any]:
    """Per-channel float64 sums of mean, mean^2 and std^2 over (N, h, w), in numpy.

    numpy's single-threaded pairwise summation makes the sums independent of the thread
    count, so any number of processes gives bit-identical statistics.
    """
    m = mean.double().numpy()
    v = std.double().numpy() ** 2
    return {
        "count": int(m.shape[0] * m.shape[2] * m.shape[3]),  # values per channel
        "sum_mean": m.sum(axis=(0, 2, 3)).tolist(),
        "sum_mean_sq": (m * m).sum(axis=(0, 2, 3)).tolist(),
        "sum_var": v.sum(axis=(0, 2, 3)).tolist(),
    }


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _ShardWriter:
    """A background thread that writes finished shards atomically (``autoencoderkl.atomic``).

    The main thread only hands over tensors; computing the statistics' sums and writing
    happen here, overlapping the next batches' encoding. An error in the thread is
    raised again in the main thread at the next ``put`` or at ``close``.
    """

    def __init__(self, out: Path, dtype: torch.dtype, plan_sha256: str):
        self.out, self.dtype, self.plan_sha256 = out, dtype, plan_sha256
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.written: list[int] = []
        self.mode = 0o666 & ~_umask()  # safetensors creates files 0600; shards are for sharing
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self._write(*job)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                    self.error = exc

    def _write(self, shard: int, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        tensors = {k: v.to(self.dtype).contiguous() if v.is_floating_point() else v.contiguous() for k, v in tensors.items()}
        # Statistics of what is stored (after rounding to the cache dtype).
        meta = {**meta, "plan_sha256": self.plan_sha256, "sums": _shard_sums(tensors["mean"], tensors["std"])}
        with atomic_path(self.out / SHARD_TEMPLATE.format(shard)) as tmp:  # never readable half-written
            save_file(tensors, str(tmp), metadata={"format_version": str(FORMAT_VERSION), "shard": json.dumps(meta)})
            os.chmod(tmp, self.mode)
        self.written.append(shard)

    def _check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"writing a shard into {self.out} failed: {self.error}") from self.error

    def put(self, shard: int, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self._check()
        self.queue.put((shard, tensors, meta))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._check()


def _is_cache_file(name: str) -> bool:
    """Whether a file name in a cache folder is one ``encode_latents`` writes (or a temporary of it)."""
    return (name in (MANIFEST_FILE, INDEX_FILE) or fnmatch.fnmatch(name, "shard-*.safetensors")
            or any(fnmatch.fnmatch(name, pattern) for pattern in _LEFTOVERS))


def _check_out_folder(out: Path) -> None:
    """Refuse an ``--out`` that is a file, or a folder holding anything but a latent cache's files.

    Raises:
        FileExistsError: naming the files (a training run's checkpoints, say): nothing is
            written beside them, and ``--overwrite`` never removes them.
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    foreign = sorted(p.name for p in out.iterdir() if not _is_cache_file(p.name)) if out.is_dir() else []
    if foreign:
        listing = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise FileExistsError(f"--out {out} is not empty and holds files that are not a latent cache's ({listing}); "
                              f"choose another --out (--overwrite removes only a cache's own files)")


def _check_manifest(out: Path, plan: dict[str, Any]) -> bool:
    """Compare a cache dir's manifest with this run's plan. True if one exists (a resume).

    Raises:
        ValueError: if the dir was (partly) encoded by another VAE, with other settings,
            or from another list of sources.
    """
    path = out / MANIFEST_FILE
    if not path.is_file():
        if (out / INDEX_FILE).is_file() or any(out.glob("shard-*.safetensors")):
            raise ValueError(f"{out} holds shards or an index.json but no {MANIFEST_FILE}; pass --overwrite to "
                             f"encode it afresh, or choose another --out")
        return False
    old = json.loads(path.read_text())
    advice = ("Rerun with the arguments it was made with to resume it, pass --overwrite to encode it afresh, "
              "or choose another --out.")
    if old.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{out} holds a cache of format_version {old.get('format_version')}, this code writes {FORMAT_VERSION}. {advice}")
    if old["vae"]["sha256"] != plan["vae"]["sha256"]:
        raise ValueError(
            f"{out} was encoded by a different VAE: its weights have sha256 {old['vae']['sha256']}, "
            f"the VAE given now has {plan['vae']['sha256']}. {advice}"
        )
    diffs = [f"{k}: cache {old['settings'].get(k)!r}, now {v!r}" for k, v in plan["settings"].items() if old["settings"].get(k) != v]
    if diffs:
        raise ValueError(f"{out} was encoded with other settings ({'; '.join(diffs)}). {advice}")
    if old["sources"] != plan["sources"] or old.get("labels") != plan.get("labels"):
        added = len(set(plan["sources"]) - set(old["sources"]))
        removed = len(set(old["sources"]) - set(plan["sources"]))
        raise ValueError(
            f"the images of {plan['settings']['data']} changed since {out} was started "
            f"({added} added, {removed} gone, or their order or labels differ). {advice}"
        )
    return True


def _own_normalization(vae: Any) -> dict[str, Any]:
    """``{"latent_normalization": ...}`` for a VAE that defines its own (FLUX.2's batch norm), else {}.

    Recorded in the cache index beside the VAE's hash, so stage 2 and the probe normalise a
    kl_flux2 cache with exactly the statistics of the weights that made it.
    """
    norm = LatentNormalization.from_vae(vae)
    return {"latent_normalization": norm.to_dict()} if norm.kind == "batch_norm" else {}


def encode_latents(
    vae_path: PathLike,
    data: PathLike,
    out: PathLike,
    resolution: int = 256,
    hflip: bool = False,
    batch_size: int = 32,
    dtype: str = "fp32",
    num_workers: int = 2,
    shard_size: int = 256,
    accelerator: Accelerator | None = None,
    cpu_threads: int | None = None,
    data_files: Any = None,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Encode an image folder, the demo photos or a ``datasets`` source into a latent cache at ``out``.

    ``data="hf:DATASET"`` (a Hub name, a folder, a builder, or ``hf:`` alone with
    ``data_files``) reads a Hugging Face dataset as a stream (``open_hf_source``): cache
    shard k holds input shard k (a tar, a parquet file) in its order, each row centre
    cropped exactly as a folder's image; ``shard_size`` is then unused. Input shards are
    dealt to ranks, and within a rank to DataLoader workers, whole. ``index.json``
    records the source (``data``: builder, split, columns, resolved files) and each row
    as ``TAR#KEY`` (WebDataset) or the image's path.

    Every process of an Accelerate launch calls this. Every process lists the sources,
    hashes the VAE and checks an existing ``manifest.json`` against them (so all raise
    the same errors); the main process writes it on a first run. The shards not yet on
    disk are dealt to the ranks round-robin (rank r takes the r-th, (r + N)-th, ...
    missing shard); each rank decodes its images in ``num_workers`` DataLoader workers,
    encodes them in batches that never straddle a shard, and hands each finished shard
    to a writer thread. After all ranks finish, the main process reads every shard's
    header and writes ``index.json``.
    A rerun with the same arguments keeps the finished shards and encodes only the
    missing ones (a shard interrupted mid-write exists only under a temporary name).

    What ``index.json`` records (keys, statistics, ``scaling_factor``) and how the rows
    are ordered is described in ``latent_diffusion/latents.py``.

    Args:
        vae_path: a diffusers ``AutoencoderKL`` folder or a stage-1 output dir (``load_vae``).
        data: an image folder (labels from class subfolders, see ``list_sources``) or ``"demo"``.
        out: the cache folder: created, or resumed when it holds a partial cache of the
            same arguments. A folder holding other files is refused.
        resolution: side of the square crops in pixels; a multiple of the VAE's factor.
        hflip: also store each image's mirror view (rows interleaved: row 2k + 1 mirrors
            row 2k).
        batch_size: images per VAE forward (2x that many with ``hflip``), per process.
        dtype: storage dtype of ``mean``/``std``: ``"fp32"``, ``"fp16"`` or ``"bf16"``.
            The VAE itself always runs in float32.
        num_workers: DataLoader worker processes decoding images, per process (0: in the
            main process).
        shard_size: source images per shard file.
        accelerator: an existing ``Accelerator``; by default one is built
            (``autoencoderkl.launch.build_accelerator``: gloo group on CPU under torchrun).
        cpu_threads: intra-op threads per process on CPU; None: the cores / processes.
        data_files, split, image_column, label_column: for ``hf:`` sources only, as
            ``open_hf_source``.
        overwrite: remove the cache files already in ``out`` (of any arguments) and
            encode afresh; other files are never removed.
    Returns:
        The index dict (as written to ``index.json``), on every process.
    Raises:
        FileNotFoundError: if ``vae_path`` or ``data`` does not exist.
        FileExistsError: if ``out`` is a file or holds files that are not a cache's.
        ValueError: on a bad argument, a resolution the VAE cannot divide, or an ``out``
            made with another VAE, other settings or other sources (without ``overwrite``).
        RuntimeError: if writing a shard fails.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    for name, value, low in (("resolution", resolution, 1), ("batch_size", batch_size, 1),
                             ("shard_size", shard_size, 1), ("num_workers", num_workers, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    out = Path(out)
    _check_out_folder(out)  # before any work: never beside a training run's files
    if accelerator is None:
        accelerator = build_accelerator(out, "no", 1)
    threads = set_cpu_threads(accelerator, cpu_threads)
    rank, world = accelerator.process_index, accelerator.num_processes

    # Plan: every rank computes it (read-only), so every rank raises the same errors.
    vae = load_vae(vae_path)
    latent_shape = _latent_shape(vae, resolution)
    if str(data).startswith("hf:"):
        sources = open_hf_source(str(data)[3:], data_files, split, image_column, label_column)
        labels, classes, names, identity = None, sources.classes, sources.sources, sources.identity
        shard_size, num_shards = None, len(names)  # one cache shard per input shard
    else:
        sources, labels, classes = list_sources(data, resolution)
        names = [s.name() for s in sources]
        identity = "demo" if str(data) == "demo" else str(Path(data).resolve())
        num_shards = (len(sources) + shard_size - 1) // shard_size
    plan = {
        "format_version": FORMAT_VERSION,
        "settings": {"data": identity, "resolution": resolution, "hflip": hflip, "dtype": dtype,
                     "shard_size": shard_size},
        "vae": {"sha256": vae_weights_sha256(vae), "config": _vae_config(vae), "path": str(Path(vae_path).resolve()),
                **_own_normalization(vae)},
        "latent_shape": list(latent_shape),
        "num_shards": num_shards,
        "sources": names,
        "labels": labels,
        "classes": classes,
        **({"label_column": label_column} if isinstance(sources, HFSource) else {}),
    }
    plan["plan_sha256"] = hashlib.sha256(
        json.dumps({k: v for k, v in plan.items() if k != "vae"} | {"vae": plan["vae"]["sha256"]}, sort_keys=True).encode()
    ).hexdigest()
    resumed = _check_manifest(out, plan) if out.is_dir() and not overwrite else False
    accelerator.wait_for_everyone()  # every rank has checked the folder before the main process changes it
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for pattern in _LEFTOVERS if not overwrite else ("*",):  # temporaries of a killed run; nobody writes yet
            for tmp in out.glob(pattern):
                if _is_cache_file(tmp.name):  # --overwrite: every file of the earlier cache
                    tmp.unlink()
        if not resumed:
            write_atomic(out / MANIFEST_FILE, json.dumps(plan, indent=1))
    accelerator.wait_for_everyone()
    num_shards = plan["num_shards"]
    missing = [k for k in range(num_shards) if not (out / SHARD_TEMPLATE.format(k)).is_file()]
    accelerator.wait_for_everyone()  # everyone has listed the shards before anyone writes one
    mine = missing[rank::world]
    logger.info(
        "%s: %s; %d finished%s, %d to encode (%d on rank %d of %d, device %s, %d threads)", out,
        f"{num_shards} input shards, one cache shard each" if shard_size is None  # a stream: rows not counted yet
        else f"{len(sources)} sources in {num_shards} shards of {shard_size}",
        num_shards - len(missing), " (resumed)" if resumed else "",
        len(missing), len(mine), rank, world, accelerator.device, threads,
    )

    if mine:
        _encode_shards(vae, sources, labels, mine, out, plan, accelerator, batch_size, num_workers)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        index = _build_index(out, plan)
        write_atomic(out / INDEX_FILE, json.dumps(index, indent=1))
        logger.info(
            "wrote %s: %d latents %s of %d images (%d skipped), scaling_factor %.5f, shift_factor %.5f",
            out / INDEX_FILE, index["num_latents"], tuple(latent_shape), len(index["paths"]),
            index["num_skipped"], index["scaling_factor"], index["shift_factor"],
        )
    accelerator.wait_for_everyone()
    return load_index(out)


def _encode_shards(
    vae: AutoencoderKL,
    sources: list[Source] | HFSource,
    labels: list[int] | None,
    shards: list[int],
    out: Path,
    plan: dict[str, Any],
    accelerator: Accelerator,
    batch_size: int,
    num_workers: int,
) -> None:
    """Encode the given shards on this rank (the loop of ``encode_latents``).

    Batches never straddle a shard, so a shard's content (and its float rounding)
    depends only on its sources and the batch size, not on the rank or the run.
    """
    settings = plan["settings"]
    resolution, shard_size = settings["resolution"], settings["shard_size"]
    pin = accelerator.device.type == "cuda"
    if isinstance(sources, HFSource):
        workers = min(num_workers, len(shards))
        loader = DataLoader(_HFShardImages(sources, shards, resolution, batch_size), batch_size=None,
                            num_workers=workers, pin_memory=pin, prefetch_factor=4 if workers else None)
        _encode_loop(vae, loader, shards, out, plan, accelerator, total=None)
        return
    n = len(sources)
    ranges = {k: (k * shard_size, min((k + 1) * shard_size, n)) for k in shards}
    positions = [list(range(b, min(b + batch_size, stop))) for start, stop in (ranges[k] for k in shards)
                 for b in range(start, stop, batch_size)]
    loader = DataLoader(SourceImages(sources, resolution), batch_sampler=positions, num_workers=num_workers,
                        collate_fn=_collate, pin_memory=pin, prefetch_factor=4 if num_workers else None)

    def batches() -> Any:
        for batch in loader:
            k = batch["positions"][0] // shard_size
            good = [p for p, ok in zip(batch["positions"], batch["ok"]) if ok]
            yield {"shard": k, "last": batch["positions"][-1] == ranges[k][1] - 1, "count": len(batch["positions"]),
                   "images": batch["images"], "names": good, "labels": [labels[p] for p in good] if labels else [],
                   "failed": batch["failed"]}

    _encode_loop(vae, batches(), shards, out, plan, accelerator, total=sum(b - a for a, b in ranges.values()),
                 ranges=ranges, describe=lambda pos: sources[pos].name())


def _encode_loop(
    vae: AutoencoderKL,
    batches: Any,
    shards: list[int],
    out: Path,
    plan: dict[str, Any],
    accelerator: Accelerator,
    total: int | None,
    ranges: dict[int, tuple[int, int]] | None = None,
    describe: Any = str,
) -> None:
    """Encode ``batches`` (dicts of ``_batch_of`` plus ``shard`` and ``last``) and write each shard when it ends.

    Args:
        ranges: folder sources: each shard's ``(start, stop)`` in the manifest (its
            metadata records positions); None for ``HFSource``, whose shards record the
            names of their rows instead (``names``).
        describe: a failed item's name or position -> how warnings name it.
    """
    settings = plan["settings"]
    hflip, device = settings["hflip"], accelerator.device
    vae = vae.to(device).eval().requires_grad_(False)
    writer = _ShardWriter(out, DTYPES[settings["dtype"]], plan["plan_sha256"])
    views = 2 if hflip else 1
    labelled = plan["labels"] is not None or plan.get("label_column") is not None
    c, h, w = plan["latent_shape"]
    progress = tqdm(total=total, unit="img", desc=f"encode rank {accelerator.process_index}/{accelerator.num_processes}",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    parts: dict[int, dict[str, list[Any]]] = {}  # shard -> its pieces so far (workers may interleave shards)
    skipped = seen = 0
    try:
        for batch in batches:
            k = batch["shard"]
            part = parts.setdefault(k, {"mean": [], "std": [], "label": [], "names": [], "skipped": []})
            if batch["images"] is not None:
                mean, std = encode_batch(vae, batch["images"].to(device, non_blocking=True), hflip)
                part["mean"].append(mean.cpu())
                part["std"].append(std.cpu())
                part["names"] += batch["names"]
                if labelled:
                    part["label"].append(torch.tensor(batch["labels"], dtype=torch.int64).repeat_interleave(views))
            for name, reason in batch["failed"]:
                part["skipped"].append((name, reason))
                if skipped < _MAX_NAMED_WARNINGS:
                    warnings.warn(f"skipping {describe(name)}: {reason}", UnreadableImageWarning, stacklevel=2)
                skipped += 1
            seen += batch["count"]
            progress.update(batch["count"])
            if skipped:
                progress.set_postfix(skipped=skipped, refresh=False)
            if not batch["last"]:
                continue
            part = parts.pop(k)
            empty = torch.empty((0, c, h, w))
            tensors = {"mean": torch.cat(part["mean"]) if part["mean"] else empty,
                       "std": torch.cat(part["std"]) if part["std"] else empty}
            if labelled:
                tensors["label"] = torch.cat(part["label"]) if part["label"] else torch.empty(0, dtype=torch.int64)
            meta: dict[str, Any] = {"shard": k, "skipped": part["skipped"]}
            if ranges is not None:
                meta.update(start=ranges[k][0], stop=ranges[k][1])
            else:
                meta.update(names=part["names"], source=plan["sources"][k],
                            max_label=int(tensors["label"].max()) if labelled and len(tensors["label"]) else -1)
            writer.put(k, tensors, meta)
    finally:
        progress.close()
        writer.close()
    if skipped:
        warnings.warn(
            f"rank {accelerator.process_index}: skipped {skipped} of {seen} images: not readable "
            f"(named in index.json 'skipped')", UnreadableImageWarning, stacklevel=2,
        )


def _read_shard_meta(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format_version") != str(FORMAT_VERSION) or "shard" not in meta:
        raise ValueError(f"{path} is not a format-{FORMAT_VERSION} latent shard")
    return json.loads(meta["shard"])


def _moments(count: float, sum_mean: np.ndarray, sum_mean_sq: np.ndarray, sum_var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of z = mean + std * eps (or of the mean alone, with sum_var = 0)."""
    mu = sum_mean / count
    var = (sum_mean_sq + sum_var) / count - mu * mu
    return mu, np.sqrt(np.maximum(var, 0.0))


def _build_index(out: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """``index.json`` from the manifest and the shards' headers (no tensor is read)."""
    views = 2 if plan["settings"]["hflip"] else 1
    channels = plan["latent_shape"][0]
    paths: list[str] = []
    shards: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    count = position = max_label = 0
    sums = {k: np.zeros(channels) for k in ("sum_mean", "sum_mean_sq", "sum_var")}
    for k in range(plan["num_shards"]):
        path = out / SHARD_TEMPLATE.format(k)
        if not path.is_file():
            raise RuntimeError(f"{path} is missing after encoding: a process failed; rerun to finish the cache")
        meta = _read_shard_meta(path)
        if meta["plan_sha256"] != plan["plan_sha256"]:
            raise ValueError(f"{path} belongs to another cache (plan {meta['plan_sha256'][:12]}); delete it and rerun")
        if "names" in meta:  # a datasets source: the shard names its rows; positions count rows in cache order
            kept, named = meta["names"], meta["skipped"]
            meta["start"] = position
            meta["stop"] = position = position + len(kept) + len(named)
            max_label = max(max_label, meta["max_label"])
        else:
            bad = {pos for pos, _ in meta["skipped"]}
            kept = [plan["sources"][p] for p in range(meta["start"], meta["stop"]) if p not in bad]
            named = [(plan["sources"][p], reason) for p, reason in meta["skipped"]]
        paths += kept
        skipped += [{"path": name, "reason": reason} for name, reason in named]
        shards.append({"file": path.name, "num_latents": len(kept) * views, "start": meta["start"], "stop": meta["stop"]})
        count += meta["sums"]["count"]
        for key in sums:
            sums[key] += np.asarray(meta["sums"][key])  # shard order: deterministic
    if count == 0:
        raise ValueError(f"no image of {plan['settings']['data']} could be read; nothing was encoded into {out}")
    mu_c, std_c = _moments(count, sums["sum_mean"], sums["sum_mean_sq"], sums["sum_var"])
    mu, std = _moments(count * channels, *(np.asarray([s.sum()]) for s in sums.values()))
    pmu_c, pstd_c = _moments(count, sums["sum_mean"], sums["sum_mean_sq"], 0.0)
    pmu, pstd = _moments(count * channels, sums["sum_mean"].sum(), sums["sum_mean_sq"].sum(), 0.0)
    stats = {
        "of": "posterior samples z = mean + std * eps, exact expectation over eps, all rows and positions",
        "mean": mu_c.tolist(),
        "std": std_c.tolist(),
        "global_mean": float(mu[0]),
        "global_std": float(std[0]),
        "posterior_mean": {"mean": pmu_c.tolist(), "std": pstd_c.tolist(), "global_mean": float(pmu), "global_std": float(pstd)},
        "values_per_channel": count,
    }
    labels = plan["labels"]
    index = {
        "format_version": FORMAT_VERSION,
        "data": plan["settings"]["data"],
        "paths": paths,
        "resolution": plan["settings"]["resolution"],
        "hflip": plan["settings"]["hflip"],
        "dtype": plan["settings"]["dtype"],
        "latent_shape": plan["latent_shape"],
        "num_latents": len(paths) * views,
        "vae": plan["vae"],
        "shards": shards,
        "stats": stats,
        "scaling_factor": 1.0 / stats["global_std"],
        "shift_factor": stats["global_mean"],
        "skipped": skipped,
        "num_skipped": len(skipped),
    }
    if labels is not None:
        index["classes"] = plan["classes"]
    elif plan.get("label_column"):  # names from a ClassLabel, else the integers up to the largest label
        index["classes"] = plan["classes"] or [str(i) for i in range(max_label + 1)]
    return index
