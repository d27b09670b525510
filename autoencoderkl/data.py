"""Image data for stage 1: folders of images -> (3, H, W) float32 tensors in [-1, 1].

Reading order of this file:

1. ``list_images``: every image file under a folder, recursively, in sorted order;
   ``broadcast_paths``: list on the main process only and send the list to the other
   ranks (N ranks need not each walk a network folder).
2. ``demo_image_paths``: the embedded demo set (the RGB photos scikit-image ships).
3. ``load_rgb`` / ``to_tensor``: one file -> an RGB ``PIL.Image`` -> a tensor. Every mode
   PIL can open (L, LA, P, RGBA, 16-bit, CMYK, 1-bit) becomes 8-bit RGB, alpha composited
   over white, EXIF orientation applied.
4. ``ImageFolder``: resize the shorter side, then a random crop + flip (training) or a
   fixed g x g grid of crops (evaluation). Unreadable files are skipped with a warning
   and a count instead of ending a run; for training they are found when first read, so
   building the dataset of a million files opens one file, not a million.
5. ``InfiniteSampler``: an endless, rank-sharded stream of ``(index, epoch)`` keys.

Randomness never comes from a global or per-worker RNG: the crop and flip of a training
sample are a pure function of ``(seed, epoch, index)``, and the sampler's order a pure
function of ``(seed, epoch)``. So the data a run sees is a function of how many samples
each rank has consumed, whatever ``num_workers`` or the number of processes, and a
resumed run continues exactly where it stopped (``InfiniteSampler(start=...)``).
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Sequence, Union

import numpy as np
import torch
import torchvision.transforms.functional as TF
from accelerate.utils import broadcast_object_list
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode

if TYPE_CHECKING:
    from accelerate import Accelerator

PathLike = Union[str, os.PathLike]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

# The demo set: RGB photos in ``skimage.data.data_dir`` (shipped in the wheel, no download).
DEMO_TRAIN = (
    "astronaut.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
)
DEMO_VAL = ("chelsea.png", "coffee.png")  # fixed held-out split

# Exceptions PIL raises on a file it cannot decode. Plugins are not uniform: besides
# OSError (UnidentifiedImageError, "image file is truncated") some raise ValueError,
# SyntaxError, EOFError, struct.error or IndexError on corrupt headers.
_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    IndexError,
    Image.DecompressionBombError,
)

# At most about this many files are named one warning each (per ImageFolder and its
# DataLoader workers); the rest are only counted (``ImageFolder.num_skipped``).
_MAX_NAMED_WARNINGS = 20


# The 6 orders of (R, G, B); index 0 is the identity.
_CHANNEL_ORDERS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


class UnreadableImageWarning(UserWarning):
    """A file with an image extension could not be read and was skipped."""


def list_images(root: PathLike) -> list[Path]:
    """All image files under ``root``, recursively, in sorted order.

    A file counts as an image by its extension (``IMAGE_EXTENSIONS``, case-insensitive);
    the content is not opened here (``ImageFolder`` checks it).

    Args:
        root: a folder.
    Returns:
        Sorted list of file paths (``pathlib.Path``), at least one.
    Raises:
        FileNotFoundError: if ``root`` does not exist or is not a folder.
        ValueError: if no file under ``root`` has an image extension.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} is not a folder")
    files = [p for p in root.rglob("*") if p.is_file()]
    images = sorted(p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise ValueError(
            f"no images in {root} (searched recursively for files ending in "
            f"{', '.join(IMAGE_EXTENSIONS)}; found {len(files)} other file(s))"
        )
    return images


def class_labels(root: PathLike, paths: Sequence[Path]) -> tuple[list[int] | None, list[str] | None]:
    """Labels from class subfolders, as torchvision's ``ImageFolder`` gives them.

    If every path sits inside a subfolder of ``root`` (none at its top level), the sorted
    names of those first-level subfolders are the classes 0..K-1 and a path's label is
    the subfolder it sits in (at any depth below it).

    Args:
        root: the folder ``paths`` were listed from.
        paths: files under ``root`` (e.g. ``list_images(root)``).
    Returns:
        ``(labels, classes)``: one int per path and the class names in label order, or
        ``(None, None)`` when some image lies at the top level (an unlabelled folder).
    """
    root = Path(root)
    parts = [p.relative_to(root).parts for p in paths]
    if any(len(q) == 1 for q in parts):  # images at the top level: no classes
        return None, None
    classes = sorted({q[0] for q in parts})
    label_of = {name: i for i, name in enumerate(classes)}
    return [label_of[q[0]] for q in parts], classes


def _distributed() -> bool:
    """Whether a torch.distributed process group is up (Accelerate's multi-process runs)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def broadcast_paths(accelerator: "Accelerator", list_paths: Callable[[], object]) -> object:
    """Run ``list_paths()`` on the main process only; every process returns its result.

    For a folder of a million files on network storage, N ranks each walking the folder
    (``list_images``: a readdir per folder, a stat per file) cost N times the listing and
    load the file server N times over. Here rank 0 lists and Accelerate's
    ``broadcast_object_list`` sends the result (about 60 MB for a million 60-character
    paths). Without a process group (one process) ``list_paths()`` just runs. A receiving
    rank pays for unpickling the list, about 11 us per path on a 2-core CPU (mostly
    building ``pathlib.Path`` objects; ``lat benchmark --what startup``), which is about
    what listing a folder in a local, warm page cache costs: the gain is on network
    storage, where every stat is a round trip.

    This is a collective: every process must call it, at the same point. If
    ``list_paths`` raises on the main process, the exception is sent instead and every
    process raises it, so no rank waits forever for a list that never comes.

    Args:
        accelerator: the run's ``Accelerator``.
        list_paths: called on the main process only; returns a list of paths (str or
            ``os.PathLike``) or a tuple of such lists, e.g. ``lambda: list_images(root)``
            or ``lambda: split_paths(cfg)``.
    Returns:
        The same structure on every process, paths as ``pathlib.Path``.
    Raises:
        What ``list_paths`` raises, on every process.
        TypeError: if ``list_paths`` returns something else than paths or lists of them.
    """
    if not _distributed():
        return _as_path_lists(list_paths())
    message: list[object] = [None]
    if accelerator.is_main_process:
        try:
            message = [_as_path_lists(list_paths())]
        except Exception as exc:  # sent to every rank, then raised everywhere
            message = [exc]
    broadcast_object_list(message, from_process=0)
    if isinstance(message[0], BaseException):
        raise message[0]
    return message[0]


def _as_path_lists(result: object) -> object:
    """A list of paths, or a tuple of lists, with every path a ``pathlib.Path``; TypeError otherwise."""
    is_tuple = isinstance(result, tuple)
    lists = result if is_tuple else [result]
    if not all(isinstance(x, list) and all(isinstance(p, (str, os.PathLike)) for p in x) for x in lists):
        raise TypeError(f"broadcast_paths: list_paths() must return a list of paths or a tuple of lists, "
                        f"got {type(result).__name__}")
    converted = [[p if isinstance(p, Path) else Path(p) for p in x] for x in lists]
    return tuple(converted) if is_tuple else converted[0]


def evenly_spaced(paths: Sequence[Any], n: int) -> list[Any]:
    """n items spread evenly over a sorted list (a split that does not depend on chance)."""
    if n >= len(paths):
        return list(paths)
    return [paths[round(i * (len(paths) - 1) / max(n - 1, 1))] for i in range(n)]


def demo_image_paths(split: str) -> list[Path]:
    """Paths of the demo dataset: RGB photos that scikit-image ships with its wheel.

    Args:
        split: ``"train"`` (the 7 files of ``DEMO_TRAIN``) or ``"val"`` (the 2 held-out
            files of ``DEMO_VAL``).
    Returns:
        List of existing file paths inside ``skimage.data.data_dir``, in the order above.
    Raises:
        ValueError: if ``split`` is neither ``"train"`` nor ``"val"``.
        ImportError: if scikit-image (the ``demo`` extra) is not installed.
        FileNotFoundError: if the installed scikit-image lacks one of the files.
    """
    names = {"train": DEMO_TRAIN, "val": DEMO_VAL}.get(split)
    if names is None:
        raise ValueError(f"demo split must be 'train' or 'val', got {split!r}")
    try:
        import skimage.data  # optional extra: imported only when the demo is used
    except ImportError as exc:
        raise ImportError(
            "the demo dataset needs scikit-image: "
            'pip install -e ".[demo]" -c constraints.txt'
        ) from exc
    data_dir = Path(skimage.data.data_dir)
    paths = [data_dir / name for name in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"scikit-image {skimage.__version__} lacks demo image(s) {missing}; "
            "install scikit-image>=0.22"
        )
    return paths


def _high_bit_depth_to_8bit(img: Image.Image) -> Image.Image:
    """Integer/float single-channel modes (I;16*, I, F) -> mode L, scaled by bit depth.

    ``Image.convert`` clips these to 255 instead of scaling, which turns a 16-bit image
    almost white. Here 16-bit values map as v / 257 (65535 -> 255). Mode ``I`` is
    treated as 16-bit when its values fit in [0, 65535] (how 16-bit PNG/TIFF files
    arrive in some Pillow versions), else as signed 32-bit. Mode ``F`` is taken as
    [0, 1] when its maximum is <= 1, else as [0, 255].
    """
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
    elif img.mode.startswith("I;16") or (arr.size and arr.min() >= 0 and arr.max() <= 65535):
        scale = 255.0 / 65535.0
    else:
        scale = 255.0 / (2**31 - 1)
    out = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def _composite_over_white(img: Image.Image) -> Image.Image:
    """Any mode with alpha or a transparency key -> RGB, alpha composited over white."""
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def load_rgb(path: PathLike | bytes, name: str | None = None) -> Image.Image:
    """Decode one image (a file, or its bytes) fully into an 8-bit RGB image.

    EXIF orientation is applied (``ImageOps.exif_transpose``). Modes: L, 1, CMYK, YCbCr
    and others convert to RGB; LA, PA, RGBA, and P/L/RGB with a transparency key are
    composited over white (a fully transparent pixel becomes (255, 255, 255)); 16-bit
    (I;16, I;16B, I) and 32-bit integer images are scaled by their bit depth, not clipped
    (16-bit v -> round(v / 257)). The pixels are decoded here (``.load()``), so a
    truncated or corrupt file fails in this call, not later.

    Args:
        path: an image file, or the encoded bytes of one (a tar member, a parquet cell).
        name: what error messages call it (default: the path; ``"<bytes>"`` for bytes).
    Returns:
        ``PIL.Image.Image`` in mode ``"RGB"`` (uint8 values in [0, 255]), size (W, H)
        after the EXIF rotation.
    Raises:
        FileNotFoundError: if ``path`` does not exist.
        OSError: ``"cannot read image {name}: {reason}"`` if it cannot be decoded (not an
            image, truncated, corrupt, or a decompression bomb).
    """
    is_bytes = isinstance(path, (bytes, bytearray, memoryview))
    name = name or ("<bytes>" if is_bytes else str(path))
    try:
        with Image.open(io.BytesIO(path) if is_bytes else Path(path)) as im:
            im.load()
            img = ImageOps.exif_transpose(im)  # a new image, so the file can close
        return _to_rgb(img)
    except FileNotFoundError:
        raise
    except _DECODE_ERRORS as exc:
        raise OSError(f"cannot read image {name}: {exc}") from exc


def png_bytes(img: Image.Image) -> bytes:
    """An image encoded as lossless PNG bytes (for ``write_atomic``, tar shards, reports)."""
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def load_resized(path: PathLike | bytes, size: int, name: str | None = None) -> Image.Image:
    """``load_rgb``, then the shorter side resized to ``size`` pixels (bicubic, antialiased).

    An image whose shorter side already is ``size`` is not resampled. A decompression
    bomb of warning size (> ``PIL.Image.MAX_IMAGE_PIXELS``) fails like one of error size.

    Args:
        path, name: as ``load_rgb``.
        size: the shorter side in pixels after resizing, aspect ratio kept.
    Returns:
        An RGB ``PIL.Image.Image`` whose shorter side is ``size``.
    Raises:
        FileNotFoundError, OSError: as ``load_rgb`` (a bomb: ``OSError`` too).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = load_rgb(path, name)
        except Image.DecompressionBombWarning as exc:
            raise OSError(f"cannot read image {name or path}: decompression bomb: {exc}") from exc
    if min(img.size) != size:
        # int size: the shorter side becomes `size`, aspect ratio kept.
        img = TF.resize(img, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded PIL mode -> 8-bit RGB (see ``load_rgb``)."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _high_bit_depth_to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        return _composite_over_white(img)
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK, YCbCr, ...; ValueError if PIL cannot
    return img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB image -> the model's pixel tensor.

    Args:
        img: ``PIL.Image.Image`` in mode ``"RGB"`` (as ``load_rgb`` returns), size (W, H).
    Returns:
        (3, H, W) float32 in [-1, 1]: uint8 value / 127.5 - 1 (0 -> -1.0, 255 -> 1.0).
    Raises:
        ValueError: if ``img`` is not in mode RGB.
    """
    if img.mode != "RGB":
        raise ValueError(f"to_tensor expects an RGB image, got mode {img.mode!r}; use load_rgb")
    x = TF.pil_to_tensor(img)  # (3, H, W) uint8
    return x.to(torch.float32) / 127.5 - 1.0


def _check_header(path: Path | io.BytesIO) -> str | None:
    """Cheap readability check (header only) of a file or in-memory bytes: None if fine, else the reason."""
    try:
        with warnings.catch_warnings():
            # A warning-sized bomb (> MAX_IMAGE_PIXELS) is skipped like an error-sized one.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return f"decompression bomb: {exc}"
    except FileNotFoundError:
        return "file not found"
    except _DECODE_ERRORS as exc:
        if isinstance(path, io.BytesIO) and not path.getbuffer().nbytes:
            return "empty (0 bytes)"
        if isinstance(path, Path) and path.is_file() and path.stat().st_size == 0:
            return "empty file (0 bytes)"
        return f"{type(exc).__name__}: {exc}"
    if w < 1 or h < 1:
        return f"empty image ({w}x{h})"
    return None


def _failure_reason(path: Path | object, exc: BaseException) -> str:
    """Why reading ``path`` failed, in the words ``_check_header`` uses."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc  # load_rgb wraps PIL's error
    if isinstance(cause, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"decompression bomb: {cause}"
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    try:
        if isinstance(path, Path) and path.stat().st_size == 0:
            return "empty file (0 bytes)"
    except OSError:
        pass
    return f"{type(cause).__name__}: {cause}"


def _folders(paths: Sequence[Path]) -> str:
    """Short description of where ``paths`` live, for error messages."""
    parents = sorted({str(p.parent) for p in paths})
    if len(parents) <= 3:
        return ", ".join(parents)
    try:
        return f"{os.path.commonpath(parents)} ({len(parents)} folders)"
    except ValueError:  # different drives
        return f"{len(parents)} folders"


class CropBox(NamedTuple):
    """Where a square crop is cut and what is done to it (``crop_to_tensor``)."""

    top: int  # pixels from the top of the resized image
    left: int  # pixels from its left edge
    flip: bool = False  # mirror left-right
    turns: int = 0  # quarter-turns counter-clockwise (torch.rot90), 0..3
    order: int = 0  # index into _CHANNEL_ORDERS (0: R, G, B)
    colour: tuple = ()  # (brightness, contrast, saturation, hue) factors, or () for none


def random_crop_box(
    h: int, w: int, resolution: int, key: Sequence[int], rotate: bool = False, permute_channels: bool = False,
    color_jitter: float = 0.0,
) -> CropBox:
    """The training augmentation of one sample, a pure function of ``key``.

    Drawn from ``numpy.random.default_rng(key)`` in a fixed order: the crop's top and left
    (uniform over every position), the flip (p = 0.5), then, only when switched on, the
    quarter-turn (uniform 0..3), the channel order (uniform over the 6) and the colour
    jitter factors; so switching on a later one leaves the earlier ones unchanged. Every
    training source (``ImageFolder``; ``autoencoderkl.hf_data`` streams and tables) cuts
    its crops here.

    Args:
        h, w: size of the resized image in pixels, each >= ``resolution``.
        resolution: side of the square crop in pixels.
        key: non-negative ints, e.g. ``(seed, epoch, index)``.
        rotate, permute_channels: also draw a quarter-turn, a channel order.
        color_jitter: s in [0, 1): brightness, contrast and saturation factors from
            U(1 - s, 1 + s), hue shift from U(-s/2, s/2) of a turn; 0 draws none.
    Returns:
        A ``CropBox``.
    """
    rng = np.random.default_rng(list(key))
    top = int(rng.integers(0, h - resolution + 1))
    left = int(rng.integers(0, w - resolution + 1))
    flip = bool(rng.random() < 0.5)
    turns = int(rng.integers(0, 4)) if rotate else 0
    order = int(rng.integers(0, 6)) if permute_channels else 0
    s = color_jitter
    colour = tuple(rng.uniform(1 - s, 1 + s, 3)) + (float(rng.uniform(-s / 2, s / 2)),) if s else ()
    return CropBox(top, left, flip, turns, order, colour)


def crop_to_tensor(img: Image.Image, resolution: int, box: CropBox) -> torch.Tensor:
    """Cut ``box`` out of an RGB image and apply its flip, colour, turn and channel order.

    Args:
        img: RGB ``PIL.Image.Image`` (already resized), at least ``resolution`` each side.
        resolution: side of the square crop in pixels.
        box: from ``random_crop_box`` (training) or a fixed ``CropBox(top, left)``.
    Returns:
        (3, resolution, resolution) float32 in [-1, 1].
    """
    img = TF.crop(img, box.top, box.left, resolution, resolution)
    if box.flip:
        img = TF.hflip(img)
    if box.colour:  # torchvision's ColorJitter operations, in its fixed order
        brightness, contrast, saturation, hue = box.colour
        img = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(
            img, brightness), contrast), saturation), hue)
    x = to_tensor(img)  # (3, resolution, resolution) float32 in [-1, 1]
    if box.turns:
        x = torch.rot90(x, box.turns, dims=(1, 2))
    if box.order:
        x = x[list(_CHANNEL_ORDERS[box.order])]
    return x


class ImageFolder(torch.utils.data.Dataset):
    """Image files -> square (3, resolution, resolution) float32 crops in [-1, 1].

    Geometry: the image is resized (bicubic, antialiased) so that its SHORTER side is
    ``resize`` pixels (an image smaller than the crop is upscaled), then cropped:

    * ``train=True``: one random ``resolution x resolution`` crop and a horizontal flip
      with p = 0.5 (optionally a quarter-turn and a channel order, see below), drawn from ``numpy.random.default_rng([seed, draw, index])``. The key
      is ``index`` (draw 0) or ``(index, draw)`` as ``InfiniteSampler`` yields, with the
      epoch as the draw, so a sample is a pure function of its key: no global RNG,
      the same for any ``num_workers`` or process count. ``len`` = number of images.
    * ``train=False``: no randomness; each image gives ``grid * grid`` crops at evenly
      spaced positions (grid 1: the centre crop; grid 3: corners, edge middles, centre).
      ``len`` = images * grid**2; index i -> image i // grid**2, crop i % grid**2 in
      row-major order.

    Unreadable files (zero bytes, not an image despite the extension, a decompression
    bomb (> ``PIL.Image.MAX_IMAGE_PIXELS``), truncated or corrupt):

    * ``train=True``: found lazily. Construction opens no file but the first readable
      one: headers are read in order until one passes (normally the first file; every
      file only when none is readable, which raises ``ValueError``), so a dataset of a
      million files on network storage is built in a second instead of minutes per
      rank. A bad file is found when a sample first reads it: it is flagged, warned
      about (``UnreadableImageWarning``; the first ~20 files by name, then one notice)
      and counted, and the next readable image ((i + 1) % n, same draw and crop) is
      returned in its place, now and whenever that index comes again. ``paths`` is the
      list given, bad files included, so ``len`` and the indices stay fixed.
    * ``train=False``: every header is checked at construction (evaluation sets are
      small, and a replaced image would count a neighbour twice in the metrics); bad
      files are dropped from ``paths`` with a warning each (up to 20) and a summary
      "skipped N of M files". One that passes the header but fails to decode later is
      replaced as in training by ``__getitem__``, and dropped and counted by ``all_crops``
      (the fixed validation batch).

    The count works across DataLoader workers: the per-file flags are one byte each in a
    shared-memory tensor made here, before any worker starts (forked workers inherit
    it; spawned ones receive it through torch's shared-memory pickling), so a file found
    bad in one worker is skipped by all and ``num_skipped()``, called in the main
    process (the training loop), counts what every worker found. ``skipped`` holds the
    reasons only for the files met in the calling process.

    Attributes:
        paths: the image files samples come from, in the given order (``train=False``:
            those whose header passed).
        skipped: ``(path, reason)`` of every file skipped in THIS process (construction,
            or samples read here; a DataLoader worker's findings stay in that worker).

    Args:
        paths: image files (e.g. from ``list_images`` or ``demo_image_paths``).
        resolution: crop side in pixels, > 0.
        resize: shorter side in pixels after resizing, before cropping; >= resolution.
            None means ``resolution`` (the crop then sees the whole shorter side).
        train: random crop + flip (True) or the fixed evaluation grid (False).
        seed: >= 0, the base of every training crop/flip draw.
        grid: >= 1, crops per side in evaluation mode (ignored when training).
        cache_images: keep each decoded, resized image in memory after its first use (per
            DataLoader worker), so later samples only crop. For small datasets (the demo:
            decoding a 1411 px JPEG per sample took a fifth of a 2-core CPU); off by default.
        rotate: training only: also turn each crop by a random multiple of 90 degrees.
        permute_channels: training only: also put its R, G, B planes in a random one of
            the 6 orders. Both are lossless and drawn after the crop and flip; they multiply
            the variety of a tiny dataset (the demo's 7 photos) at the cost of orientation
            and colour priors a large dataset would teach. Off by default.
    Raises:
        ValueError: on an empty ``paths``, bad ``resolution``/``resize``/``seed``/``grid``,
            or when no file is a readable image (naming the folders and the reasons).
        TypeError: when ``paths`` is one folder or file path (a str) instead of a list.
    """

    def __init__(
        self,
        paths: Sequence[PathLike],
        resolution: int,
        resize: int | None = None,
        train: bool = True,
        seed: int = 0,
        grid: int = 1,
        cache_images: bool = False,
        rotate: bool = False,
        permute_channels: bool = False,
        color_jitter: float = 0.0,
    ) -> None:
        resize = resolution if resize is None else resize
        if resolution < 1:
            raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
        if resize < resolution:
            raise ValueError(f"resize ({resize}) must be >= resolution ({resolution}) or None")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        if isinstance(paths, (str, os.PathLike)):  # a str would be read as a list of one-letter paths
            raise TypeError(f"ImageFolder takes a list of image paths, not the folder {str(paths)!r}: "
                            f"pass list_images({str(paths)!r})")
        all_paths = self._items(paths)
        if not all_paths:
            raise ValueError("ImageFolder got an empty list of image paths")

        self.resolution = resolution
        self.resize = resize
        self.train = train
        self.seed = seed
        self.grid = grid
        self.rotate = rotate
        self.permute_channels = permute_channels
        if not 0.0 <= color_jitter < 1.0:
            raise ValueError(f"color_jitter must be in [0, 1), got {color_jitter}")
        self.color_jitter = color_jitter
        self._cache: dict[int, Image.Image] | None = {} if cache_images else None
        self.skipped: list[tuple[Path, str]] = []
        # Named warnings so far, shared with the DataLoader workers (as _bad below).
        self._named = torch.zeros(1, dtype=torch.int32).share_memory_()
        if train:  # lazy: headers in order until the first readable one; the rest when first read
            self.paths = all_paths
            self._dropped = 0  # files left out of self.paths at construction
            self._bad = torch.zeros(len(self.paths), dtype=torch.uint8).share_memory_()  # (n,) 1: unreadable
            for i, p in enumerate(self.paths):
                reason = self._header(p)
                if reason is None:
                    break
                self._skip(i, reason)
            readable = reason is None
        else:  # eager: every header now, unreadable files left out
            self.paths = []
            for p in all_paths:
                reason = self._header(p)
                if reason is None:
                    self.paths.append(p)
                else:
                    self.skipped.append((p, reason))
            self._dropped = len(self.skipped)
            self._bad = torch.zeros(len(self.paths), dtype=torch.uint8).share_memory_()
            if self.skipped:
                for p, reason in self.skipped[:_MAX_NAMED_WARNINGS]:
                    warnings.warn(f"skipping {p}: {reason}", UnreadableImageWarning, stacklevel=2)
                more = len(self.skipped) - _MAX_NAMED_WARNINGS
                tail = f" ({more} not named above; see ImageFolder.skipped)" if more > 0 else ""
                warnings.warn(
                    f"skipped {len(self.skipped)} of {len(all_paths)} files in "
                    f"{self._where(all_paths)}: not readable as images{tail}",
                    UnreadableImageWarning,
                    stacklevel=2,
                )
            readable = bool(self.paths)
        if not readable:
            reasons = "; ".join(f"{getattr(p, 'name', p)}: {r}" for p, r in self.skipped[:3])
            raise ValueError(
                f"none of the {len(all_paths)} files in {self._where(all_paths)} is a readable "
                f"image (e.g. {reasons})"
            )

    @staticmethod
    def _items(paths: Sequence[PathLike]) -> Sequence[Path]:
        """``paths`` as ``pathlib.Path`` objects (the list itself when it holds Paths already)."""
        return [p if isinstance(p, Path) else Path(p) for p in paths]

    def _skip(self, index: int, reason: str) -> None:
        """Flag ``paths[index]`` as unreadable for every worker, record it, warn (the first ~20 by name)."""
        path = self.paths[index]
        self.skipped.append((path, reason))
        if self._bad[index]:  # another worker flagged it in the meantime
            return
        self._bad[index] = 1
        named = int(self._named[0])  # racy across workers: "about 20" names, never a wrong count
        if named > _MAX_NAMED_WARNINGS:
            return
        self._named[0] = named + 1
        if named < _MAX_NAMED_WARNINGS:
            message = f"skipping {path}: {reason}; its samples are replaced by the next readable image's"
        else:
            message = ("skipping more unreadable files without naming them; ImageFolder.num_skipped() counts "
                       "them and skipped_paths() lists them")
        warnings.warn(message, UnreadableImageWarning, stacklevel=3)

    def num_skipped(self, accelerator: "Accelerator | None" = None) -> int:
        """How many files have been skipped as unreadable so far.

        Counts the files found bad by this process and all of its DataLoader workers
        (shared flags, see the class docstring), plus, in evaluation mode, those dropped
        at construction. In training mode the count grows as samples first read the bad
        files: after one epoch it covers the whole dataset.

        Args:
            accelerator: None: this process (rank) only. Given, with a process group of
                several ranks: the distinct files skipped on ANY rank (an all-reduce, max,
                of the n flag bytes on ``accelerator.device``), so a collective: call it
                on every rank at the same point, not under ``is_main_process``.
        Returns:
            An int >= 0.
        """
        flags = self._bad
        if accelerator is not None and _distributed():
            flags = flags.to(accelerator.device, copy=True)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return int(flags.sum()) + self._dropped

    def skipped_paths(self) -> list[Path]:
        """The files skipped so far by this process and its workers (not the reasons: see ``skipped``)."""
        dropped = [p for p, _ in self.skipped[: self._dropped]]
        return dropped + [self.paths[i] for i in self._bad.nonzero().flatten().tolist()]

    def __len__(self) -> int:
        """Number of samples: images (train) or images * grid**2 (evaluation)."""
        return len(self.paths) if self.train else len(self.paths) * self.grid**2

    def _crop_box(self, h: int, w: int, image_index: int, crop: int, draw: int) -> CropBox:
        """Where and how sample (``image_index``, ``crop``, ``draw``) is cut from the resized image."""
        r = self.resolution
        if self.train:
            return random_crop_box(h, w, r, (self.seed, draw, image_index), self.rotate, self.permute_channels,
                                   self.color_jitter)
        g = self.grid
        row, col = divmod(crop, g)
        if g == 1:  # the centre, rounded as torchvision's center_crop
            return CropBox(int(round((h - r) / 2.0)), int(round((w - r) / 2.0)))
        return CropBox(int(round(row * (h - r) / (g - 1))), int(round(col * (w - r) / (g - 1))))

    def _resized(self, image_index: int) -> Image.Image:
        """The decoded image with its shorter side resized to ``resize`` (cached if asked)."""
        if self._cache is not None and image_index in self._cache:
            return self._cache[image_index]
        img = self._read(self.paths[image_index])
        if self._cache is not None:
            self._cache[image_index] = img
        return img

    def _sample(self, image_index: int, crop: int, draw: int) -> torch.Tensor:
        img = self._resized(image_index)
        w, h = img.size
        return crop_to_tensor(img, self.resolution, self._crop_box(h, w, image_index, crop, draw))

    # How an item of ``paths`` is read; a subclass for other storage (a ``datasets``
    # table, see ``autoencoderkl.hf_data.HFImages``) overrides these four.
    def _read(self, path: Path) -> Image.Image:
        """The RGB image of ``path``, its shorter side resized to ``resize``; OSError if unreadable."""
        return load_resized(path, self.resize)

    def _header(self, path: Path) -> str | None:
        """None if ``path`` passes the cheap header check, else why not."""
        return _check_header(path)

    def _reason(self, path: Path, exc: BaseException) -> str:
        """Why reading ``path`` failed with ``exc``."""
        return _failure_reason(path, exc)

    def _where(self, paths: Sequence[Path]) -> str:
        """Where ``paths`` live, for messages."""
        return _folders(paths)

    def __getitem__(self, key: int | tuple[int, int]) -> torch.Tensor:
        """One sample.

        Args:
            key: ``index`` or ``(index, draw)`` (ints, draw >= 0, e.g. the epoch from
                ``InfiniteSampler``); a plain index means draw 0. The draw only matters
                in training mode.
        Returns:
            (3, resolution, resolution) float32 in [-1, 1].
        Raises:
            IndexError: if ``index`` is out of range.
            ValueError: if every image fails to decode (naming the files that did).
        Warns:
            UnreadableImageWarning: when a file is found unreadable (first ~20 by name).
        """
        if isinstance(key, tuple):
            index, draw = (int(k) for k in key)
        else:
            index, draw = int(key), 0
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for ImageFolder of length {n}")
        index %= n
        per_image = 1 if self.train else self.grid**2
        image_index, crop = divmod(index, per_image)

        num_images = len(self.paths)
        for step in range(num_images):
            j = (image_index + step) % num_images
            if self._bad[j]:  # found unreadable before, here or in another worker
                continue
            try:
                return self._sample(j, crop, draw)
            except (OSError, Image.DecompressionBombWarning) as exc:
                self._skip(j, self._reason(self.paths[j], exc))
        raise ValueError(f"none of the {num_images} images in {self._where(self.paths)} could be decoded "
                         f"({self._failures()})")

    def _failures(self) -> str:
        """The files that failed to decode, with their reasons (those found in this process), for messages."""
        found = self.skipped[self._dropped:]
        named = "; ".join(f"{p}: {r}" for p, r in found[:3]) + (f"; and {len(found) - 3} more" if len(found) > 3 else "")
        return named or "found unreadable by DataLoader workers"

    def all_crops(self) -> torch.Tensor:
        """Every crop of every readable image, in order: the fixed validation batch.

        Evaluation mode only. A file whose header passed but whose pixels fail to decode
        (a truncated PNG) is dropped from ``paths`` and counted as skipped, with a warning,
        as construction drops the files whose header fails; it is not replaced by a
        neighbour, which would count that neighbour twice.

        Returns:
            (len(paths) * grid**2, 3, resolution, resolution) float32 in [-1, 1].
        Raises:
            ValueError: in training mode, or when no image is left, naming every file and
                why it was skipped.
        Warns:
            UnreadableImageWarning: once per file dropped here.
        """
        if self.train:
            raise ValueError("all_crops() is for an evaluation ImageFolder (train=False)")
        crops, kept, failed = [], [], []
        for j, path in enumerate(self.paths):
            try:
                crops += [self._sample(j, crop, 0) for crop in range(self.grid**2)]
                kept.append(path)
            except (OSError, Image.DecompressionBombWarning) as exc:
                failed.append((path, self._reason(path, exc)))
                warnings.warn(f"skipping {path}: {failed[-1][1]}", UnreadableImageWarning, stacklevel=2)
        if failed:
            self.skipped[self._dropped:self._dropped] = failed  # dropped files come first (skipped_paths)
            self._dropped += len(failed)
            self.paths = kept
            self._bad = torch.zeros(len(kept), dtype=torch.uint8).share_memory_()
        if not crops:
            dropped = self.skipped[:self._dropped]
            reasons = "; ".join(f"{getattr(p, 'name', p)}: {r}" for p, r in dropped)
            raise ValueError(f"none of the {len(dropped)} validation images in {self._where([p for p, _ in dropped])} "
                             f"is readable ({reasons})")
        return torch.stack(crops)


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless ``(index, epoch)`` keys for ``ImageFolder``, sharded over ranks, resumable.

    Epoch e is the permutation ``numpy.random.default_rng([seed, e]).permutation(n)``,
    truncated to ``per_rank * world_size`` items (``per_rank = n // world_size``, so the
    last ``n % world_size`` indices of that permutation are dropped this epoch); rank r
    takes ``perm[r::world_size]``. Ranks see disjoint indices within an epoch, and every
    rank's k-th sample is fixed by ``(seed, rank, world_size, k)`` alone.

    ``start`` is how many samples THIS rank has consumed already (for an exact resume:
    optimizer steps x per-process batch size x gradient accumulation steps). Iteration
    begins at epoch ``start // per_rank``, offset ``start % per_rank``, without
    generating or loading anything before it.

    Args:
        num_samples: dataset length n, >= world_size.
        seed: >= 0.
        rank: this process's index in [0, world_size).
        world_size: number of processes, >= 1.
        start: samples this rank has already consumed, >= 0.
    Raises:
        ValueError: on ``num_samples < world_size`` or an out-of-range argument.
    """

    def __init__(
        self, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if num_samples < world_size:
            raise ValueError(
                f"num_samples ({num_samples}) must be >= world_size ({world_size}): "
                "every rank needs at least one sample per epoch"
            )
        if seed < 0 or start < 0:
            raise ValueError(f"seed and start must be >= 0, got seed={seed}, start={start}")
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.per_rank = num_samples // world_size  # samples per rank per epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """Yield ``(index, epoch)`` forever, from this rank's ``start``-th sample on."""
        epoch, offset = divmod(self.start, self.per_rank)
        usable = self.per_rank * self.world_size
        while True:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            mine = perm[:usable][self.rank :: self.world_size]
            for index in mine[offset:]:
                yield int(index), epoch
            epoch, offset = epoch + 1, 0
