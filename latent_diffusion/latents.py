"""The latent cache, reader side: its format, ``load_index`` and ``LatentDataset``.

Stage 2 trains on a folder of posteriors that ``latent_diffusion/encode.py``
(``encode_latents``, run by ``lat encode-latents``) writes once from an image
folder. This module defines that folder's format (described below, with the constants
both sides share) and reads it.

Reading order of this file:

1. The format, below, and its constants ``FORMAT_VERSION``, ``INDEX_FILE``,
   ``MANIFEST_FILE``, ``SHARD_TEMPLATE``, ``DTYPES``.
2. ``load_index``: ``index.json``, checked.
3. ``map_shard``: a shard's tensors, memory-mapped.
4. ``LatentDataset``: rows -> scaled latents (posterior samples or means) for stage 2.

The cache, format version 1::

    LATENTS/
      manifest.json            the plan, written before encoding: settings, VAE hash and
                               config, every source in order, labels. A rerun must match it.
      shard-00000.safetensors  rows of one shard: "mean", "std" (N, c, h, w) in the cache
      shard-00001.safetensors  dtype (posterior mean and standard deviation of z), and
      ...                      "label" (N,) int64 when the folder has class subfolders
      index.json               written last, by the main process: keys below

Each shard's safetensors metadata holds ``format_version`` and ``shard``: a JSON object
with its source range ``start``/``stop``, the ``skipped`` sources [[position, reason]],
the ``plan_sha256`` of the manifest it belongs to, and ``sums``: per-channel float64
sums (``count``, ``sum_mean``, ``sum_mean_sq``, ``sum_var``) of what it stores, from
which ``index.json``'s statistics are built without reading a tensor.

Shard ``k`` holds sources ``[k * shard_size, (k + 1) * shard_size)`` of the manifest, so
its content depends on that range alone, never on which rank wrote it or when: one
process and N processes, or a run and its resumption, give the same shards. A source that
cannot be decoded is left out of its shard (warned about, named and counted in
``index.json["skipped"]``), so shards can hold fewer rows than ``shard_size``; the cache
order is the manifest order with the skipped sources removed, and ``index.json["paths"]``
lists exactly the encoded sources in cache order.

With ``hflip`` every source is encoded twice, as is and mirrored left-right (the pixels
are flipped before encoding; the VAE is not flip-equivariant, so flipping a latent would
be wrong): row ``2 k`` of the cache is ``paths[k]``, row ``2 k + 1`` its mirror image.

``index.json`` keys: ``format_version``; ``paths`` (encoded sources in cache order:
files, or ``FILE#resizeS_yT_xL`` for demo tiles); ``resolution``; ``hflip``;
``dtype`` (a key of ``DTYPES``); ``latent_shape`` [c, h, w]; ``num_latents`` (rows; 2 x
paths with hflip); ``vae`` {``config``, ``sha256``, ``path`` (absolute)}; ``shards``
[{``file``, ``num_latents``, ``start``, ``stop``} with start/stop the shard's source
range in the manifest]; ``stats``; ``scaling_factor`` = 1 / ``stats.global_std`` (of
posterior samples: the default of ``LatentDataset(sample_posterior=True)``; the default
for ``sample_posterior=False`` is 1 / ``stats.posterior_mean.global_std``);
``shift_factor`` = ``stats.global_mean``; ``classes`` (names in label order, only when
labelled); ``skipped`` [{``path``, ``reason``}] and ``num_skipped``; ``data``.

``stats`` are of posterior samples z = mean + std * eps over the whole cache, taken in
exact expectation over eps (not a single draw): per channel c, ``mean[c]`` = E[mean_c]
and ``std[c]`` = sqrt(E[mean_c^2 + std_c^2] - E[mean_c]^2), over all rows and
positions; ``global_mean``/``global_std`` the same over all channels (Rombach et al.
2022, sec. 4.3.2, where a single batch was used). ``stats.posterior_mean`` holds the
same four figures (``mean``, ``std``, ``global_mean``, ``global_std``) for the posterior
mean alone (std_c taken as 0), the z of ``LatentDataset(sample_posterior=False)``.
``stats.of`` says this in words; ``stats.values_per_channel`` counts rows x h x w.

References: Rombach et al. 2022 (LDM), sec. 4.3.2 for the scaling factor; the latent
caches of facebookresearch/fast-DiT (``extract_features.py``) and CompVis
latent-diffusion, whose shortcomings this format answers (frozen flip and sample, one
file per image, a scale factor from one batch, no record of the VAE).
"""

from __future__ import annotations

import json
import os
from bisect import bisect_right
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from autoencoderkl.model import load_vae, vae_weights_sha256

from .pipeline import LatentNormalization

PathLike = Union[str, os.PathLike]

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
MANIFEST_FILE = "manifest.json"
SHARD_TEMPLATE = "shard-{:05d}.safetensors"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # index.json "dtype" -> torch


# --------------------------------------------------------------------------- reading


def load_index(root: PathLike) -> dict[str, Any]:
    """Read ``root/index.json`` of a latent cache.

    Returns:
        The index dict (keys as documented at the top of this module).
    Raises:
        FileNotFoundError: if ``root`` has no ``index.json`` (with a hint when it holds
            an unfinished cache).
        ValueError: if the file's ``format_version`` is missing or not ``FORMAT_VERSION``.
    """
    root = Path(root)
    path = root / INDEX_FILE
    if not path.is_file():
        if (root / MANIFEST_FILE).is_file():
            raise FileNotFoundError(
                f"{root} is an unfinished latent cache (no {INDEX_FILE} yet): rerun `lat encode-latents` "
                f"with the same arguments to finish it"
            )
        raise FileNotFoundError(f"no latent cache at {root}: {path} does not exist; create one with `lat encode-latents`")
    index = json.loads(path.read_text())
    version = index.get("format_version")
    if version is None:
        raise ValueError(f"{path} has no format_version: not a latent cache index")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version}; this code reads {FORMAT_VERSION}. Re-encode with `lat encode-latents`")
    return index


def map_shard(path: PathLike) -> dict[str, Tensor]:
    """The tensors of a shard file, memory-mapped: nothing is read until a row is indexed.

    ``safetensors.safe_open(path, framework="pt").get_tensor`` returns tensors whose
    storage is a private (copy-on-write) memory map of the file
    (``torch.UntypedStorage.from_file(..., shared=False)``): every process shares the
    page cache, an in-place change never reaches the file, and the map outlives the
    handle. Indexing one (4, 32, 32) float32 row of such a tensor takes ~1.6 us on a
    CPU core, as a hand-made ``mmap`` view did, where ``get_slice(name)[i : i + 1]``
    takes ~16 us per call.

    Args:
        path: a ``shard-NNNNN.safetensors`` file.
    Returns:
        name -> tensor: ``mean``, ``std`` (N, c, h, w) in the cache dtype; ``label`` (N,)
        int64 when the cache is labelled.
    Raises:
        FileNotFoundError: if ``path`` does not exist.
        safetensors.SafetensorError: if it is not a safetensors file.
    """
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def normalization_from_cache(
    index: dict[str, Any], kind: str = "global", sample_posterior: bool = True, scaling_factor: float | None = None,
    shift_factor: float | None = None, where: str = "the latent cache",
) -> LatentNormalization:
    """The ``LatentNormalization`` of a cache's z, from its ``index.json`` statistics.

    global: ``scaling_factor`` None -> 1 / the global std of the z drawn (posterior samples,
    ``index["scaling_factor"]``; or the posterior means with ``sample_posterior=False``);
    ``shift_factor`` None -> 0.0 (SD 1.x/2.x). per_channel: each channel's mean and std of
    the same z (``stats.mean`` / ``stats.std``, or ``stats.posterior_mean``'s), times
    ``scaling_factor`` (None -> 1.0); no shift_factor. A cache made by a VAE with its own
    normalisation (FLUX.2's batch norm, ``index["vae"]["latent_normalization"]``) always
    gets that one, whatever ``kind`` says: ``data.latent_normalization`` chooses for
    ``AutoencoderKL`` caches, and a scaling on top of the batch norm is refused.

    Raises:
        ValueError: an unknown kind, a std of 0, a shift_factor with per_channel, or a
            scaling_factor / shift_factor with a batch-norm cache.
    """
    own = index.get("vae", {}).get("latent_normalization")
    if own is not None:
        if scaling_factor not in (None, 1.0) or shift_factor:
            raise ValueError(f"{where} was made by a VAE with its own latent normalisation ({own['kind']}: FLUX.2's "
                             f"batch norm); it is used as is, with no scaling_factor / shift_factor on top (got "
                             f"{scaling_factor} / {shift_factor}): remove them")
        return LatentNormalization.from_dict(own)
    stats = index["stats"] if sample_posterior else index["stats"]["posterior_mean"]
    if kind == "per_channel":
        if shift_factor is not None:
            raise ValueError(f"per_channel normalisation takes no shift_factor (got {shift_factor}): it subtracts "
                             f"each channel's mean")
        if not all(s > 0 for s in stats["std"]):
            raise ValueError(f"a channel of the latents in {where} has standard deviation 0 ({stats['std']}): "
                             f"per_channel normalisation cannot divide by it")
        return LatentNormalization("per_channel", 1.0 if scaling_factor is None else scaling_factor,
                                   latents_mean=stats["mean"], latents_std=stats["std"])
    if kind != "global":
        raise ValueError(f"unknown latent normalisation {kind!r}; valid: global, per_channel")
    if scaling_factor is None and sample_posterior:
        scaling_factor = index["scaling_factor"]  # 1 / std of posterior samples
    elif scaling_factor is None:  # 1 / std of the posterior means
        if not stats["global_std"] > 0:
            raise ValueError(f"the posterior means in {where} have standard deviation {stats['global_std']}: pass a "
                             f"scaling_factor")
        scaling_factor = 1.0 / stats["global_std"]
    return LatentNormalization("global", float(scaling_factor), float(0.0 if shift_factor is None else shift_factor))


class LatentDataset(torch.utils.data.Dataset):
    """The latent cache as a dataset of scaled posterior samples, for stage 2.

    Item i is row i of the cache (shards concatenated in order). With ``hflip`` caches,
    row 2k is ``index["paths"][k]`` and row 2k+1 the same image mirrored; ``source(i)``
    says which. The shards are memory-mapped (``map_shard``, opened lazily in each
    process, so DataLoader workers share the page cache); reading a row copies it. A
    worker holds one file name and one row offset per shard, not the index: the list
    of sources (``index["paths"]``) is read only when ``source`` is called.

    ``latents = normalization.normalize(z)`` (``latent_diffusion.pipeline.LatentNormalization``,
    the one definition the training loop, the pipeline and the probe share) with
    ``z = mean + std * eps``, eps ~ N(0, I) drawn fresh on every call from torch's global
    RNG (DataLoader workers are seeded apart), or ``z = mean`` with ``sample_posterior=False``.
    ``global`` (the default) is ``latents = (z - shift_factor) * scaling_factor``, as below;
    ``per_channel`` is ``(z - mean_c) * scaling_factor / std_c`` with the cache's
    per-channel statistics of the same z (``stats.mean`` / ``stats.std``, or
    ``stats.posterior_mean``'s with ``sample_posterior=False``) and ``scaling_factor``
    default 1.0 (LightningDiT).

    ``scaling_factor`` defaults to 1 / the global std, over the whole cache, of the z this
    dataset draws, so that the latents have unit variance (Rombach et al. 2022, sec.
    4.3.2): with ``sample_posterior=True``, the cache's ``index["scaling_factor"]`` (1 /
    ``stats.global_std``, the std of posterior samples); with ``sample_posterior=False``,
    1 / ``index["stats"]["posterior_mean"]["global_std"]``, the std of the posterior
    means, which is smaller by the posterior's own variance (so this factor is larger).
    ``shift_factor`` defaults to 0.0 in both modes, NOT the cache's recorded
    ``shift_factor`` (its global mean): Stable Diffusion 1.x and 2.x use
    ``latents = z * scaling_factor`` with no shift; pass ``shift_factor=ds.index
    ["shift_factor"]`` for the SD3/FLUX-style ``(z - shift) * scale``. Whatever is
    applied here must be undone before decoding: ``z = latents / scaling_factor +
    shift_factor``.

    Args:
        root: the cache folder (holding ``index.json``).
        sample_posterior: draw z from the posterior (True) or take its mean (False).
        scaling_factor: the factor to multiply by; None: the one that gives unit variance
            in this mode (see above).
        shift_factor: the shift to subtract; None: 0.0 (see above).
        vae: the VAE stage 2 will decode with (a model, or a path for ``load_vae``). Its
            ``vae_weights_sha256`` must equal the cache's ``index["vae"]["sha256"]``.
        latent_normalization: ``global`` | ``per_channel``, resolved from the cache's
            statistics and the two factors as above; or a ``LatentNormalization`` to apply
            as it is (e.g. the training cache's, to a held-out cache), with both factors None.
    Attributes:
        index: the ``index.json`` dict, read from the file on each access (the dataset
            does not hold it; see the property).
        latent_shape: (c, h, w).
        num_classes / class_names: label count and names, or None when unlabelled.
        normalization: the ``LatentNormalization`` applied.
        scaling_factor / shift_factor: its factors (shift 0.0 for per_channel).
    Raises:
        FileNotFoundError / ValueError: from ``load_index``; ValueError if ``vae`` is not
            the VAE that made the cache, naming both hashes, or the cache's statistics
            cannot normalise (a channel of std 0).
    """

    def __init__(
        self,
        root: PathLike,
        sample_posterior: bool = True,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        vae: torch.nn.Module | PathLike | None = None,
        latent_normalization: str | LatentNormalization = "global",
    ) -> None:
        self.root = Path(root)
        index = load_index(self.root)  # not kept: its "paths" lists every image (see ``index``)
        if vae is not None:
            model = load_vae(vae) if isinstance(vae, (str, os.PathLike)) else vae  # the VAE class is the folder's
            sha = vae_weights_sha256(model)
            if sha != index["vae"]["sha256"]:
                raise ValueError(
                    f"the latent cache {self.root} was encoded by a VAE with weights sha256 "
                    f"{index['vae']['sha256']}, but the VAE given has sha256 {sha}: its latents "
                    f"would decode to garbage. Re-encode with `lat encode-latents --vae <this VAE> "
                    f"--out <new dir>`, or use the VAE that made the cache ({index['vae'].get('path')})."
                )
        self.sample_posterior = sample_posterior
        if isinstance(latent_normalization, LatentNormalization):
            if scaling_factor is not None or shift_factor is not None:
                raise ValueError("give either a LatentNormalization or scaling_factor/shift_factor, not both")
            self.normalization = latent_normalization
        else:
            self.normalization = normalization_from_cache(index, latent_normalization, sample_posterior, scaling_factor,
                                                          shift_factor, where=str(self.root))
        self.scaling_factor = self.normalization.scaling_factor
        self.shift_factor = self.normalization.shift_factor
        self.latent_shape = tuple(index["latent_shape"])
        self.class_names = index.get("classes")
        self.num_classes = len(self.class_names) if self.class_names is not None else None
        # What __getitem__ needs: one file name and one row offset per shard.
        self._files = [s["file"] for s in index["shards"]]
        self._offsets = np.cumsum([0] + [s["num_latents"] for s in index["shards"]]).tolist()
        self._views = 2 if index["hflip"] else 1
        self._handles: dict[int, Any] = {}  # shard -> map_shard's tensors, in process _pid
        self._pid = None
        self._paths: list[str] | None = None  # index["paths"], read by the first source()

    @property
    def index(self) -> dict[str, Any]:
        """The whole ``index.json`` dict (``load_index``), read from the file on each access.

        The dataset itself keeps only what reading rows needs (shard files and row
        offsets), not the index: its ``paths`` holds one string per image, which for
        millions of images would be copied into every DataLoader worker. Keep the
        returned dict to use it more than once.
        """
        return load_index(self.root)

    def __getstate__(self) -> dict[str, Any]:
        # Shard maps are per process; the source list is read again where it is needed.
        return {**self.__dict__, "_handles": {}, "_pid": None, "_paths": None}

    def __len__(self) -> int:
        """Number of latents (rows): images, or 2 x images with hflip."""
        return self._offsets[-1]

    def source(self, i: int) -> tuple[str, bool]:
        """(the source path of row i, as in ``index["paths"]``; whether it is the mirrored view).

        The first call reads ``index["paths"]`` and keeps it in this process.

        Raises:
            IndexError: if i is out of range.
        """
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a latent cache of {n} rows")
        if self._paths is None:
            self._paths = load_index(self.root)["paths"]
        i %= n
        return self._paths[i // self._views], bool(i % self._views)

    def _shard(self, shard: int) -> dict[str, Tensor]:
        if self._pid != os.getpid():  # first use in this process (e.g. a forked worker)
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = map_shard(self.root / self._files[shard])
        return self._handles[shard]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        """Row i.

        Returns:
            ``{"latents": (c, h, w) float32, "label": () int64}``; ``label`` only when
            the cache has labels.
        Raises:
            IndexError: if i is out of range.
        """
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a latent cache of {n} rows")
        i %= n
        shard = bisect_right(self._offsets, i) - 1
        row = i - self._offsets[shard]
        tensors = self._shard(shard)
        z = tensors["mean"][row].float()  # (c, h, w); a view of the file for fp32 caches: not modified in place
        if self.sample_posterior:
            z = z + tensors["std"][row].float() * torch.randn(z.shape)
        item = {"latents": self.normalization.normalize(z)}
        if self.num_classes is not None:
            item["label"] = tensors["label"][row].clone()  # () int64
        return item
