"""Images from Hugging Face ``datasets``: the Hub, parquet files, WebDataset tar shards.

``data.source: hf`` reads a dataset through ``datasets.load_dataset`` -- a Hub name, a
local folder, or one of the builders ``imagefolder``, ``parquet``, ``webdataset`` with
``data.data_files`` (globs or brace patterns ``train-{000000..000099}.tar``, local paths
or fsspec URLs such as ``s3://bucket/train-*.tar``) -- and turns its images into the same
(3, resolution, resolution) float32 crops in [-1, 1] as the folder source: decoded by
``autoencoderkl.data.load_resized`` (any mode -> RGB, EXIF, bicubic resize of the
shorter side) and cut by ``random_crop_box`` / ``crop_to_tensor``, the functions
``ImageFolder`` uses.

Reading order of this file:

1. ``expand_data_files`` / ``load_hf``: the patterns checked and expanded, the dataset
   opened (streaming or not), every failure an error naming the ``data.*`` key;
   ``find_image_column``; ``image_bytes``: one cell -> encoded bytes.
2. ``HFImages``: a map-style table (``data.streaming: false``, or the validation rows)
   as an ``ImageFolder``: the same lazy skipping of unreadable rows, ``InfiniteSampler``
   and its exact resume.
3. ``HFImageStream`` and ``StreamBatches``: a streaming dataset split over ranks
   (``datasets.distributed.split_dataset_by_node``: whole shards per rank when their
   count divides by the world size, else every N-th example), shuffled by shard order
   and a seeded buffer, read by ``torchdata``'s ``StatefulDataLoader`` workers, endless
   over epochs, with a JSON state for checkpoints.
4. ``open_hf_training``: what the stage-1 loop calls.

Resume of a stream. ``StreamBatches.state_dict()`` holds the epoch and the
``StatefulDataLoader`` state, which holds each worker's ``IterableDataset.state_dict()``
(the shard and the example in it that the worker read last) as of the last batch the
loop received. The augmentation of a sample is a pure function of
``(seed, epoch, blake2b(image bytes))``. So with ``data.shuffle_buffer: 0`` (shard order
shuffled per epoch, examples in shard order) a resumed run sees exactly the samples,
crops and order of an uninterrupted one. With a buffer of B > 0, ``datasets`` does not
save the buffer's content: on resume each worker refills it from where its source
stopped, so the examples that sat in a buffer are skipped for this epoch -- at most
B - 1 per DataLoader worker (one stream when ``num_workers`` is 0) per rank -- none is
replayed, and the order after the resume differs from the uninterrupted run's
(``tests/test_hf_data.py`` checks the bound).

Bad samples (undecodable bytes, a missing image field, a mode PIL cannot convert) are
skipped and counted (``StreamBatches.num_skipped``, the ``skipped_images`` of stage 1's
log lines), the first ~20 per worker named in an ``UnreadableImageWarning``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from collections.abc import Sequence
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple

import torch
from PIL import Image

from .data import (
    _MAX_NAMED_WARNINGS,
    ImageFolder,
    UnreadableImageWarning,
    crop_to_tensor,
    load_resized,
    random_crop_box,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

# The builders data.dataset may name (with data.data_files); anything else is a Hub name
# or a local folder that datasets inspects itself.
HF_BUILDERS = ("imagefolder", "parquet", "webdataset")
# data.data_files without data.dataset: the builder from the files' extension.
_BUILDER_OF_EXTENSION = {".tar": "webdataset", ".parquet": "parquet"}

INSTALL_HINT = 'data.source=hf needs the data extra: pip install -e ".[data]" -c constraints.txt'


def _import_datasets() -> Any:
    """``datasets``, or an ImportError saying how to install it."""
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return datasets


# --------------------------------------------------------------------------- opening


def expand_data_files(data_files: Any, key: str = "data.data_files") -> Any:
    """Brace patterns expanded, local patterns checked: what ``load_dataset`` gets.

    ``{000000..000099}`` and ``{a,b}`` are expanded (webdataset's ``expand_urls``,
    which ``datasets`` lacks); ``*``/``**`` globs are left to ``datasets``. A local
    pattern (no ``scheme://``) that matches no file is an error here, before any work;
    remote ones are checked by ``load_dataset``.

    Args:
        data_files: None, a pattern, a list of them, or ``{split: pattern(s)}``.
        key: the config key, for messages.
    Returns:
        The same shape with every pattern a list of expanded patterns (None stays None).
    Raises:
        FileNotFoundError: naming ``key`` and the local pattern that matches nothing.
        ValueError: if ``data_files`` is none of those shapes.
    """
    if data_files is None:
        return None
    if isinstance(data_files, dict):
        return {str(split): expand_data_files(v, f"{key}.{split}") for split, v in data_files.items()}
    if isinstance(data_files, str):
        data_files = [data_files]
    if not isinstance(data_files, (list, tuple)) or not all(isinstance(p, str) for p in data_files):
        raise ValueError(f"{key} must be a pattern, a list of patterns or {{split: patterns}}, got {data_files!r}")
    from webdataset.shardlists import expand_urls

    expanded = [p for pattern in data_files for p in expand_urls(pattern)]
    for pattern in expanded:
        if "://" in pattern:
            continue
        import glob

        if not glob.glob(os.path.expanduser(pattern), recursive=True):
            raise FileNotFoundError(f"{key}: no file matches {pattern!r}")
    return expanded


def _builder(dataset: str | None, data_files: Any) -> str:
    """``load_dataset``'s ``path``: ``data.dataset``, or the builder the files' extension names."""
    if dataset:
        return dataset
    patterns = [p for v in (data_files.values() if isinstance(data_files, dict) else [data_files]) for p in v]
    kinds = {_BUILDER_OF_EXTENSION.get(Path(p.split("::")[0]).suffix.lower(), "imagefolder") for p in patterns}
    if len(kinds) != 1:
        raise ValueError(f"data.data_files mixes file kinds ({sorted(kinds)}); set data.dataset to one of {HF_BUILDERS}")
    return kinds.pop()


def load_hf(dataset: str | None, data_files: Any, split: str, streaming: bool) -> Any:
    """``datasets.load_dataset`` with errors that name the config keys.

    Args:
        dataset: a Hub name (``user/name``), a local folder, a builder (``HF_BUILDERS``),
            or None to take the builder from ``data_files``' extension (.tar:
            webdataset, .parquet: parquet, else imagefolder).
        data_files: patterns (``expand_data_files``; None: the dataset's own files).
        split: the split to read, e.g. ``"train"``.
        streaming: an ``IterableDataset`` read as it goes (True) or a map-style
            ``Dataset`` converted once into the local Arrow cache (False).
    Returns:
        ``datasets.IterableDataset`` or ``datasets.Dataset``.
    Raises:
        ImportError: without the ``data`` extra.
        FileNotFoundError: a missing dataset or data file (naming it).
        ValueError: an unknown split (listing the ones there), or nothing to read.
    """
    datasets = _import_datasets()
    data_files = expand_data_files(data_files)  # idempotent
    if not dataset and not data_files:
        raise ValueError(f"data.source=hf needs data.dataset (a Hub name, a folder, or one of {HF_BUILDERS}) "
                         "and/or data.data_files")
    path = _builder(dataset, data_files)
    if path in HF_BUILDERS and not data_files and not (dataset and Path(dataset).is_dir()):
        raise ValueError(f"data.dataset={path} needs data.data_files (e.g. data.data_files='/data/shards/train-*.tar')")
    what = f"data.dataset={dataset!r}" + (f" with data.data_files={data_files!r}" if data_files else "")
    kwargs = {"data_files": data_files} if data_files else {}
    try:
        return datasets.load_dataset(path, split=split, streaming=streaming, **kwargs)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"cannot open {what}: {exc}") from exc
    except ValueError as exc:
        if "at least one table" in str(exc):  # pyarrow, inferring the features of an empty tar
            raise ValueError(f"{what} holds no samples (an empty tar?)") from exc
        if "split" in str(exc).lower():
            raise ValueError(f"data.split={split!r} (or data.val_split) is not in {what}: {exc}") from exc
        raise ValueError(f"cannot open {what}: {exc}") from exc
    except IndexError as exc:  # the webdataset builder on an empty file list or an empty tar
        raise ValueError(f"{what} holds no samples (an empty tar or no file for split {split!r})") from exc


def find_image_column(features: Any, requested: str | None, where: str) -> str:
    """The column that holds the images.

    Args:
        features: the dataset's ``datasets.Features`` (None when unknown).
        requested: ``data.image_column``, or None to take the one ``datasets.Image`` feature.
        where: the dataset, for messages.
    Raises:
        ValueError: the requested column is missing, or there is not exactly one image
            feature to choose (the message lists the columns).
    """
    datasets = _import_datasets()
    columns = list(features or {})
    if requested is not None:
        if features is not None and requested not in features:
            raise ValueError(f"data.image_column={requested!r} is not a column of {where}; columns: {columns}")
        return requested
    images = [name for name, f in (features or {}).items() if isinstance(f, datasets.Image)]
    if len(images) != 1:
        found = f"image columns {images}" if images else "no image column"
        raise ValueError(f"{where} has {found}; set data.image_column to one of {columns}")
    return images[0]


def image_bytes(value: Any) -> bytes:
    """One image cell -> its encoded bytes.

    Args:
        value: ``{"bytes": ..., "path": ...}`` (a ``datasets.Image(decode=False)`` cell;
            bytes None means read the path), raw ``bytes``, or None (a missing field).
    Raises:
        ValueError: a missing field or a cell of another kind.
        OSError: a path that cannot be read.
    """
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict) and (value.get("bytes") is not None or value.get("path")):
        if value.get("bytes") is not None:
            return value["bytes"]
        from datasets.utils.file_utils import xopen  # local paths, hf://, s3://, zip://

        with xopen(value["path"], "rb") as f:
            return f.read()
    if value is None or value == {} or (isinstance(value, dict) and not any(value.values())):
        raise ValueError("no image in this sample (missing field)")
    raise ValueError(f"not an image cell: {type(value).__name__}")


def sample_key(data: bytes) -> int:
    """A 64-bit int naming a sample by its bytes (the augmentation's key; no rank or order in it)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def sample_name(example: dict[str, Any], column: str, fallback: str) -> str:
    """How messages name one sample: ``tar#key`` (WebDataset), the image's path, or ``fallback``."""
    if example.get("__key__") is not None:
        return f"{example.get('__url__', '')}#{example['__key__']}"
    value = example.get(column)
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    return fallback


def prepare_columns(ds: Any, column: str, keep: Sequence[str] = ()) -> Any:
    """The image column as undecoded bytes (we decode, count and skip), other columns dropped."""
    datasets = _import_datasets()
    if isinstance(ds.features.get(column) if ds.features else None, datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))
    names = [c for c in [column, *keep, "__key__", "__url__"] if ds.features is None or c in ds.features]
    return ds.select_columns(list(dict.fromkeys(names)))


# --------------------------------------------------------------------------- map-style


class _Row(NamedTuple):
    """Row ``index`` of a table, named ``table[index]`` in messages."""

    table: str
    index: int

    def __str__(self) -> str:
        return f"{self.table}[{self.index}]"

    @property
    def name(self) -> str:
        return str(self)


class _Rows(Sequence):
    """``_Row(table, i)`` for i < n, made on demand (a million rows are not a million objects)."""

    def __init__(self, table: str, n: int):
        self.table, self.n = table, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> _Row:  # type: ignore[override]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return _Row(self.table, i % self.n)


class HFImages(ImageFolder):
    """Rows of a map-style table -> crops, exactly as ``ImageFolder`` does with files.

    The same geometry, training draws ``(seed, draw, index)``, evaluation grid, and lazy
    skipping of unreadable rows (replaced by the next readable one, flagged for every
    worker, counted by ``num_skipped``); only reading differs: the image comes from
    ``rows[i][column]`` (``image_bytes``). Used for ``data.streaming: false`` (an
    ``InfiniteSampler`` then gives an exact resume whatever the shuffle) and for the
    validation rows of a split.

    Args:
        rows: indexable rows (a ``datasets.Dataset`` whose image column is undecoded,
            see ``prepare_columns``, or a list of such example dicts).
        column: the image column.
        name: what messages call the table.
        **kwargs: ``ImageFolder``'s (resolution, resize, train, seed, grid, ...).
    """

    def __init__(self, rows: Any, column: str, name: str, resolution: int, **kwargs: Any):
        self.rows, self.column, self.name = rows, column, name
        super().__init__(_Rows(name, len(rows)), resolution, **kwargs)

    def _items(self, paths: Sequence[Any]) -> Sequence[Any]:  # type: ignore[override]
        return paths

    def _bytes(self, row: _Row) -> bytes:
        return image_bytes(self.rows[row.index][self.column])

    def _read(self, row: _Row) -> Image.Image:  # type: ignore[override]
        try:
            data = self._bytes(row)
        except ValueError as exc:
            raise OSError(f"cannot read image {row}: {exc}") from exc
        return load_resized(data, self.resize, str(row))

    def _header(self, row: _Row) -> str | None:  # type: ignore[override]
        from .data import _check_header

        try:
            return _check_header(io.BytesIO(self._bytes(row)))
        except (ValueError, OSError) as exc:
            return str(exc)

    def _where(self, paths: Sequence[Any]) -> str:
        return self.name


# --------------------------------------------------------------------------- streams


class HFImageStream(torch.utils.data.IterableDataset):
    """A streaming ``datasets.IterableDataset`` of images -> training crops, skipping bad samples.

    Iterated inside ``StatefulDataLoader`` workers: ``datasets`` gives each worker its
    share of the rank's shards; each sample's bytes are decoded (``load_resized``) and
    cut with ``random_crop_box(key=(seed, epoch, sample_key(bytes)))``. A sample that
    cannot be decoded, or lacks the image, is skipped and counted (``skipped`` is part of
    the state, so counts survive a resume and are summed over workers by
    ``StreamBatches.num_skipped``); the first ~20 per worker are named in a warning.

    Args:
        hf: the rank's ``IterableDataset`` (split, shuffled; image column undecoded).
        column: the image column.
        resolution, resize, seed, rotate, permute_channels, color_jitter: as ``ImageFolder``.
    Yields:
        (3, resolution, resolution) float32 in [-1, 1].
    """

    def __init__(self, hf: Any, column: str, resolution: int, resize: int | None = None, seed: int = 0,
                 rotate: bool = False, permute_channels: bool = False, color_jitter: float = 0.0):
        self.hf, self.column, self.resolution = hf, column, resolution
        self.resize = resolution if resize is None else resize
        self.seed, self.rotate, self.permute_channels, self.color_jitter = seed, rotate, permute_channels, color_jitter
        self.skipped = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch = self.hf.epoch
        for position, example in enumerate(self.hf):
            name = sample_name(example, self.column, f"sample {position} of this worker's stream")
            try:
                data = image_bytes(example.get(self.column))
                img = load_resized(data, self.resize, name)
            except (OSError, ValueError) as exc:
                self.skipped += 1
                if self.skipped <= _MAX_NAMED_WARNINGS:
                    reason = str(exc).replace(f"cannot read image {name}: ", "")
                    warnings.warn(f"skipping {name}: {reason}", UnreadableImageWarning, stacklevel=2)
                continue
            w, h = img.size
            box = random_crop_box(h, w, self.resolution, (self.seed, epoch, sample_key(data)), self.rotate,
                                  self.permute_channels, self.color_jitter)
            yield crop_to_tensor(img, self.resolution, box)

    def state_dict(self) -> dict[str, Any]:
        """The ``datasets`` stream position after the last sample yielded, and the skip count."""
        return {"hf": self.hf.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.hf.load_state_dict(state["hf"])
        self.skipped = state["skipped"]


def _worker_states(loader_state: dict[str, Any]) -> list[dict[str, Any]]:
    """The dataset states inside a ``StatefulDataLoader.state_dict()`` (one per worker, or one)."""
    if "_snapshot" in loader_state:
        return [w["dataset_state"] for w in loader_state["_snapshot"]["_worker_snapshots"].values()
                if w.get("dataset_state")]
    return [loader_state["dataset_state"]] if loader_state.get("dataset_state") else []


class StreamBatches:
    """Endless, resumable batches of an ``HFImageStream`` (``StatefulDataLoader``, epoch after epoch).

    When the rank's stream ends, the next epoch begins with ``set_epoch(epoch + 1)``
    (``datasets`` reshuffles the shard order and the buffer's draws). Each worker's last
    partial batch of an epoch is dropped (``drop_last``), as a map-style epoch drops its
    tail.

    Args:
        stream: the rank's ``HFImageStream``.
        batch_size: per process.
        num_workers: DataLoader workers (at most the rank's shard count: more would idle).
        pin_memory: for CUDA.
    """

    def __init__(self, stream: HFImageStream, batch_size: int, num_workers: int, pin_memory: bool = False):
        from torchdata.stateful_dataloader import StatefulDataLoader

        self.stream, self.epoch, self.skipped_before = stream, 0, 0
        with warnings.catch_warnings():  # torchdata 0.11 calls an API torch >= 2.10 deprecates
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            self.loader = StatefulDataLoader(
                stream, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, drop_last=True,
                prefetch_factor=2 if num_workers else None,
                # Its own generator: each new iterator draws a worker seed, which must not come
                # from the global RNG that a resumed run has just restored (posterior noise).
                generator=torch.Generator().manual_seed(stream.seed))
        self._iter: Iterator[torch.Tensor] | None = None
        self._empty_epochs = 0

    def __iter__(self) -> StreamBatches:
        return self

    def __next__(self) -> torch.Tensor:
        while True:
            if self._iter is None:
                self.stream.hf.set_epoch(self.epoch)
                self._iter = iter(self.loader)
            try:
                batch = next(self._iter)
                self._empty_epochs = 0
                return batch
            except StopIteration:
                self.skipped_before += self._current_skipped()
                self.epoch, self._iter = self.epoch + 1, None
                self.stream.skipped = 0  # the next epoch's workers count afresh
                self._empty_epochs += 1
                if self._empty_epochs > 1:
                    raise RuntimeError(
                        "the training stream yields no full batch: every sample was skipped as unreadable, or this "
                        f"rank's share holds fewer than data.batch_size={self.loader.batch_size} samples per worker"
                    ) from None

    def _current_skipped(self) -> int:
        return sum(s.get("skipped", 0) for s in _worker_states(self.loader.state_dict()))

    def num_skipped(self, accelerator: Accelerator | None = None) -> int:
        """Samples skipped as unreadable so far (this rank; with ``accelerator``, all ranks: a collective)."""
        count = self.skipped_before + (self._current_skipped() if self._iter is not None else 0)
        if accelerator is not None and accelerator.num_processes > 1:
            t = torch.tensor([count], dtype=torch.int64, device=accelerator.device)
            count = int(accelerator.reduce(t, reduction="sum").item())  # ranks read disjoint samples
        return count

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready: the epoch, the skip count of finished epochs, and the loader's state."""
        return {"epoch": self.epoch, "skipped_before": self.skipped_before,
                "loader": self.loader.state_dict() if self._iter is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` was taken (call before the first ``next``)."""
        self.epoch, self.skipped_before, self._iter = state["epoch"], state["skipped_before"], None
        loader = state["loader"]
        if loader is not None and loader.get("_iterator_finished"):
            self.skipped_before += sum(s.get("skipped", 0) for s in _worker_states(loader))
            self.epoch, loader = self.epoch + 1, None  # that epoch had ended: the next one starts afresh
        if loader is not None:
            self.loader.load_state_dict(loader)


# --------------------------------------------------------------------------- stage 1


class HFTraining(NamedTuple):
    """What ``open_hf_training`` returns to the stage-1 loop."""

    train: HFImages | HFImageStream  # map-style (streaming false) or this rank's stream
    val: ImageFolder  # evaluation crops (an ImageFolder of val_dir, or HFImages of val_split rows)
    num_workers: int  # DataLoader workers to use (a stream: at most this rank's shards)
    description: str  # one line for the log


def rank_stream(ds: Any, column: str, d: Any, seed: int, rank: int, world_size: int,
                where: str = "the stream") -> tuple[HFImageStream, int, str]:
    """One rank's shuffled share of a streaming dataset, as training crops.

    ``shuffle(seed, buffer_size=max(1, data.shuffle_buffer), max_buffer_input_shards=1)``
    -- a buffer of 1 yields each example as it arrives, so 0 means the shard order alone
    is shuffled; one input shard feeds the buffer at a time, because the state of
    ``datasets``' interleaved shards (max_buffer_input_shards > 1) cannot be restored
    inside DataLoader workers (an IndexError in datasets 5.2) -- then
    ``split_dataset_by_node(rank, world_size)``: whole shards per rank when their count
    divides by the world size, else every ``world_size``-th example of each.

    Args:
        ds: the streaming dataset, image column undecoded (``prepare_columns``).
        column: the image column.
        d: the run's ``DataConfig`` (resolution, resize, augmentations, shuffle_buffer,
            num_workers).
        seed: ``train.seed``: shard order, buffer draws and crops.
        rank, world_size: this process and the number of processes.
        where: the dataset, for messages.
    Returns:
        ``(stream, DataLoader workers to use (at most this rank's shards), a log line)``.
    """
    from datasets.distributed import split_dataset_by_node

    total_shards = ds.num_shards
    ds = ds.shuffle(seed=seed, buffer_size=max(1, d.shuffle_buffer), max_buffer_input_shards=1)
    ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    if total_shards % world_size:
        logger.warning("%s has %d shards, not a multiple of the %d processes: every rank reads all of them and keeps "
                       "every %d-th example (make the shard count a multiple of processes x data.num_workers)",
                       where, total_shards, world_size, world_size)
    mine = ds.num_shards
    num_workers = min(d.num_workers, mine)
    stream = HFImageStream(ds, column, d.resolution, d.resize, seed, d.rotate, d.permute_channels, d.color_jitter)
    description = (f"{where}: stream of {total_shards} shards, {mine} read by this rank with {num_workers} worker(s), "
                   f"shuffle buffer {d.shuffle_buffer}")
    return stream, num_workers, description


def open_hf_training(d: Any, accelerator: Accelerator, seed: int) -> HFTraining:
    """Open ``data.source=hf`` for training: this rank's share, shuffled, and the validation rows.

    Every process calls this (before the model is built, so a missing or empty source
    fails in seconds). Non-streaming datasets are converted on the main process first
    (``main_process_first``), then read from the cache by the others.

    Streams: this rank's share, shuffled (``rank_stream``).

    Args:
        d: the run's ``DataConfig``.
        accelerator: for the rank, the world size and ``main_process_first``.
        seed: ``train.seed`` (shard order, buffer draws, crops).
    Raises:
        ImportError, FileNotFoundError, ValueError: as ``load_hf`` / ``find_image_column``;
            ValueError also when the split holds no sample.
    """
    _import_datasets()  # an ImportError with the install line
    from .data import evenly_spaced, list_images

    data_files = expand_data_files(d.data_files)
    with accelerator.main_process_first():
        ds = load_hf(d.dataset, data_files, d.split, d.streaming)
    where = f"{d.dataset or _builder(None, data_files)}[{d.split}]"
    column = find_image_column(ds.features, d.image_column, where)
    ds = prepare_columns(ds, column)
    if (next(iter(ds), None) if d.streaming else (ds[0] if len(ds) else None)) is None:
        raise ValueError(f"{where} holds no samples (data.dataset={d.dataset!r}, data.data_files={d.data_files!r})")

    common = dict(resize=d.resize)
    if d.val_dir:
        val: ImageFolder = ImageFolder(evenly_spaced(list_images(d.val_dir), d.num_val_images), d.resolution,
                                       train=False, grid=d.val_grid, **common)
    else:
        val_ds = prepare_columns(load_hf(d.dataset, data_files, d.val_split, streaming=True), column)
        rows = list(islice(iter(val_ds), d.num_val_images))
        if not rows:
            raise ValueError(f"data.val_split={d.val_split!r} of {d.dataset or where} holds no samples")
        val = HFImages(rows, column, f"{where.rsplit('[', 1)[0]}[{d.val_split}]", d.resolution, train=False,
                       grid=d.val_grid, **common)

    augment = dict(rotate=d.rotate, permute_channels=d.permute_channels, color_jitter=d.color_jitter)
    if not d.streaming:
        train = HFImages(ds, column, where, d.resolution, train=True, seed=seed, cache_images=d.cache_images,
                         **common, **augment)
        return HFTraining(train, val, d.num_workers, f"{where}: {len(ds)} rows (map-style, Arrow cache)")
    train, num_workers, description = rank_stream(ds, column, d, seed, accelerator.process_index,
                                                  accelerator.num_processes, where)
    return HFTraining(train, val, num_workers, description)
