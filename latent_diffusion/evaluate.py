"""Measure what a ``LatentDiffusionPipeline`` generates (``lat eval-ldm``).

Reading order of this file:

1. ``frechet_distance``: the one Frechet distance every FD figure here uses.
2. ``load_reference`` / ``load_samples``: image folders or a latent cache -> 8-bit
   images at the model's sample size.
3. ``build_inception`` / ``build_dinov2`` and ``extract_features``: the optional
   feature networks, or the reason they are unavailable (nothing is ever downloaded).
4. ``nearest_neighbours`` / ``memorisation``: does the model copy its training images?
5. ``evaluate_ldm``: generate (or read) samples, compute everything, write ``report.json``
   and a PNG of the closest sample / training-image pairs.

Conventions. Generated images are the 8-bit PNGs ``sample_ldm`` writes (the literature
evaluates saved 8-bit files, clean-fid's point: Parmar et al. 2022); reference images
are loaded exactly as training saw them (a latent cache's own crops, or a folder's
centre crops at the sample size), rounded to 8 bits the same way. The Inception
metrics use torch-fidelity's InceptionV3 (the TF-FID network, its bilinear resize to
299 px and uint8 input; Heusel et al. 2017 FID, Binkowski et al. 2018 KID, Kynkaanniemi
et al. 2019 improved precision and recall with k = 3), DINOv2 ViT-L/14 the CLS features
of Stein et al. 2023 (dgm-eval: 224 px bicubic, ImageNet normalisation). The latent FD
and the memorisation check need nothing but the pipeline's own VAE.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import Tensor, nn
from tqdm.auto import tqdm

from autoencoderkl.atomic import write_atomic
from autoencoderkl.data import list_images, png_bytes
from autoencoderkl.evaluate import (
    FID_RELIABLE_IMAGES,
    UNAVAILABLE,
    WORST_N,
    find_inception_weights,
    load_eval_image,
    not_tensors_only,
    select_images,
    worst_grid,
    write_json,
)
from autoencoderkl.metrics import to_uint8_range

from .config import check_sampler
from .encode import Source, SourceImages, encode_batch
from .latents import INDEX_FILE, load_index
from .export import load_pipeline
from .pipeline import LatentDiffusionPipeline, LatentNormalization
from .sample import sample
from .swd import swd

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

REPORT_FORMAT_VERSION = 1
CLOSEST_N = WORST_N  # sample / nearest training image pairs shown in the PNG
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's (and the KID paper's) defaults
PRC_NEIGHBOURHOOD = 3  # k of the k-NN radii (Kynkaanniemi et al. 2019)
DINOV2_MODEL = "dinov2_vitl14"  # Stein et al. 2023's FD_DINOv2 network
DINOV2_REPO = "facebookresearch_dinov2_main"  # torch.hub's folder name for the repository
DINOV2_WEIGHTS = "dinov2_vitl14_pretrain.pth"
DINOV2_SIZE = 224
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---- Frechet distance ----------------------------------------------------------------


def _centred(features: Union[Tensor, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and X_c = (x - mean) / sqrt(N - 1), float64: cov = X_c^T X_c."""
    x = features.detach().cpu().double().numpy() if isinstance(features, Tensor) else np.asarray(features, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need (N >= 2, D) features for a mean and covariance, got shape {x.shape}")
    mean = x.mean(axis=0)
    return mean, (x - mean) / math.sqrt(len(x) - 1)


def frechet_distance(a: Union[Tensor, np.ndarray], b: Union[Tensor, np.ndarray]) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (Dowson & Landau 1982).

    FD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), the formula of FID (Heusel
    et al. 2017) applied to any features, with the covariance estimator pytorch-fid,
    torch-fidelity and clean-fid use (N - 1). Tr((S_a S_b)^(1/2)) is the sum of the square
    roots of the eigenvalues of S_a S_b, computed without a general matrix square root:
    with S_a = A^T A and S_b = B^T B (A, B the centred features / sqrt(N - 1)), those
    eigenvalues are the squared singular values of A B^T, so the trace is its nuclear
    norm (used when both N < D: an N_a x N_b problem), or the eigenvalues of the symmetric
    PSD S_a^(1/2) S_b S_a^(1/2) (otherwise: D x D). Both are exact; neither produces the
    complex round-off of ``scipy.linalg.sqrtm``, and singular covariances are fine.

    Args:
        a: (N_a, D) features, N_a >= 2; a tensor or array, any float dtype.
        b: (N_b, D) features.
    Returns:
        FD >= 0 (up to round-off) in the features' squared units; float64 arithmetic.
        Biased upward for small N: compare figures only at equal N.
    Raises:
        ValueError: fewer than 2 rows, or different D.
    """
    mu_a, x_a = _centred(a)
    mu_b, x_b = _centred(b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature dimensions differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    if max(len(x_a), len(x_b)) < len(mu_a):
        tr_covmean = np.linalg.svd(x_a @ x_b.T, compute_uv=False).sum()
    else:
        s_a, s_b = x_a.T @ x_a, x_b.T @ x_b  # (D, D) covariances
        w, v = np.linalg.eigh(s_a)
        root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S_a^(1/2), symmetric
        m = root_a @ s_b @ root_a
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + (x_a**2).sum() + (x_b**2).sum() - 2 * tr_covmean)


# ---- image sets ----------------------------------------------------------------------


def is_latent_cache(path: PathLike) -> bool:
    """Whether ``path`` is a latent cache folder (it has ``index.json``)."""
    return (Path(path) / INDEX_FILE).is_file()


def load_reference(
    reference: PathLike, resolution: int, max_images: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """A reference set as 8-bit images at the sample size.

    An image folder (recursive): each file's centre crop, the shorter side resized to
    ``resolution`` (``autoencoderkl.evaluate.load_eval_image``). A latent cache: the
    exact crops it encoded, rebuilt from the sources its ``index.json`` records (files,
    or demo tiles ``FILE#resizeS_yT_xL``), in cache order, unflipped; the cache's
    ``resolution`` must be the sample size. (The cached latents themselves are not used:
    both image sets go through the pipeline's own VAE the same way.)

    Args:
        reference: a folder of images or a latent cache folder.
        resolution: the pipeline's image size in pixels.
        max_images: at most this many, evenly spaced over the set.
    Returns:
        ``names`` (N strings), ``images`` (N, 3, R, R) uint8, ``kind`` ("folder" |
        "latent_cache"), ``skipped`` [[name, reason]].
    Raises:
        FileNotFoundError: a missing folder, or a cache whose source files are gone.
        ValueError: no readable image, or a cache made at another resolution.
    """
    from autoencoderkl.data import evenly_spaced  # the held-out split rule training uses

    if is_latent_cache(reference):
        index = load_index(reference)
        if index["resolution"] != resolution:
            raise ValueError(f"the latent cache {reference} holds {index['resolution']} px crops, but the model "
                             f"makes {resolution} px images; give a cache (or folder) at {resolution} px")
        sources = [Source.parse(name) for name in index["paths"]]
        if max_images is not None:
            sources = evenly_spaced(sources, max_images)
        loader = SourceImages(sources, resolution)  # decodes each demo photo once for its tiles
        items = [loader[i] for i in tqdm(range(len(sources)), desc="reference", disable=not progress)]
        skipped = [[sources[i].name(), reason] for i, x, reason in items if x is None]
        if len(skipped) == len(sources):
            raise FileNotFoundError(f"none of the {len(sources)} source images of {reference} can be read "
                                    f"(first: {skipped[0]}); the cache's index.json records where they were")
        names = [sources[i].name() for i, x, _ in items if x is not None]
        images = torch.stack([x for _, x, _ in items if x is not None])
        kind = "latent_cache"
    else:
        paths, skipped_paths = select_images(reference, resolution, max_images)
        names, crops, skipped = [], [], [[str(p), r] for p, r in skipped_paths]
        for path in tqdm(paths, desc="reference", disable=not progress):
            try:
                crops.append(load_eval_image(path, resolution)[0])
                names.append(str(path))
            except OSError as exc:
                skipped.append([str(path), str(exc)])
        if not crops:
            raise ValueError(f"none of the images in {reference} could be decoded: {skipped[:3]}")
        images, kind = torch.stack(crops), "folder"
    return {"names": names, "images": to_uint8_range(images).to(torch.uint8), "kind": kind, "skipped": skipped}


def load_samples(folder: PathLike, resolution: int, paths: Sequence[Path] | None = None) -> dict[str, Any]:
    """Generated images (PNG files) as 8-bit images at the sample size.

    Every image under ``folder`` except, in a ``sample_ldm`` output folder (one with
    ``sampling.json``), its ``grid.png``. Files of another size are centre-cropped and
    resized like reference images (and counted in ``resized``).

    Args:
        folder: the samples folder.
        resolution: the pipeline's image size.
        paths: the files to read, instead of listing ``folder``.
    Returns:
        ``names``, ``images`` (N, 3, R, R) uint8, ``resized`` (count), ``settings``
        (``sampling.json``'s content, or None).
    Raises:
        FileNotFoundError / ValueError: no folder, or no image in it.
    """
    folder = Path(folder)
    settings_file = folder / "sampling.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else None
    if paths is None:
        paths = [p for p in list_images(folder) if not (settings is not None and p.name == "grid.png" and p.parent == folder)]
    crops, resized = [], 0
    for path in paths:
        image, size = load_eval_image(path, resolution)
        resized += size != (resolution, resolution)
        crops.append(image)
    if not crops:
        raise ValueError(f"no generated images in {folder}")
    return {"names": [Path(p).name for p in paths], "images": to_uint8_range(torch.stack(crops)).to(torch.uint8),
            "resized": resized, "settings": settings}


# ---- features ------------------------------------------------------------------------


def _batches(images: Tensor, batch_size: int, device: torch.device, desc: str, progress: bool):
    for i in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
        yield images[i : i + batch_size].to(device)


@torch.no_grad()
def encode_images(
    vae: AutoencoderKL, images: Tensor, batch_size: int, device: torch.device, progress: bool = False
) -> Tensor:
    """8-bit images -> the denoiser's latents of their posterior means, flattened.

    Args:
        vae: the pipeline's VAE (its config records the ``LatentNormalization`` the
            denoiser was trained with).
        images: (N, 3, H, W) uint8.
    Returns:
        (N, c * h * w) float32: the posterior means, normalised as in training.
    """
    normalization = LatentNormalization.from_vae(vae)
    out = []
    for x in _batches(images, batch_size, device, "encode", progress):
        mean, _ = encode_batch(vae, x.float() / 127.5 - 1)  # (b, c, h, w)
        out.append(normalization.normalize(mean).flatten(1).cpu())
    return torch.cat(out)


@torch.no_grad()
def reconstruct_images(vae: AutoencoderKL, images: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """8-bit images -> 8-bit decodes of their posterior means: what a perfect copy would look like."""
    out = []
    for x in _batches(images, batch_size, device, "reconstruct", False):
        mean, _ = encode_batch(vae, x.float() / 127.5 - 1)
        out.append(to_uint8_range(vae.decode(mean).sample).to(torch.uint8).cpu())
    return torch.cat(out)


def build_inception(mode: str = "auto", weights: PathLike | None = None) -> tuple[nn.Module | None, str]:
    """torch-fidelity's InceptionV3 (2048-d pool features, uint8 input), or None and the reason.

    The weights file is found and checked by ``autoencoderkl.evaluate.find_inception_weights``
    (as eval_vae's rFID): never downloaded, loaded as tensors only first.
    """
    path, note = find_inception_weights(mode, weights)
    if path is None:
        return None, note
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    return net, f"torch-fidelity InceptionV3 (inception-v3-compat), 2048-d pool features, weights {path}"


def dinov2_paths() -> tuple[Path, Path]:
    """Where torch.hub keeps the DINOv2 repository and the ViT-L/14 weights."""
    hub = Path(torch.hub.get_dir())
    return hub / DINOV2_REPO, hub / "checkpoints" / DINOV2_WEIGHTS


class DinoV2Features(nn.Module):
    """uint8 images -> DINOv2 CLS features, preprocessed as dgm-eval (Stein et al. 2023).

    Resize to 224 x 224 (bicubic, antialiased), ImageNet normalisation, the backbone's
    forward (the normalised CLS token; 1024-d for ViT-L/14).
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) uint8 -> (B, D) float32."""
        x = F.interpolate(images.float() / 255, size=(DINOV2_SIZE, DINOV2_SIZE), mode="bicubic", antialias=True,
                          align_corners=False).clamp(0, 1)
        return self.backbone((x - self.mean) / self.std).float()


def build_dinov2(mode: str = "auto") -> tuple[nn.Module | None, str]:
    """DINOv2 ViT-L/14 from torch.hub's cache, or None and the reason. Never downloads.

    Needs the repository (``torch.hub.load("facebookresearch/dinov2", "dinov2_vitl14")``
    leaves it at ``<hub>/facebookresearch_dinov2_main``) and its weights at
    ``<hub>/checkpoints/dinov2_vitl14_pretrain.pth``; the weights are first checked to
    load with ``weights_only=True``.
    """
    if mode == "off":
        return None, "not computed (dinov2=off)"
    if mode != "auto":
        raise ValueError(f"dinov2 must be 'auto' or 'off', got {mode!r}")
    repo, weights = dinov2_paths()
    if not (repo / "hubconf.py").is_file() or not weights.is_file():
        return None, (f"DINOv2 ViT-L/14 needs the torch.hub repository at {repo} and the weights file {weights}; "
                      f"no download is attempted. On a machine with the network run python -c \"import torch; "
                      f"torch.hub.load('facebookresearch/dinov2', '{DINOV2_MODEL}')\" and copy {repo.parent} here "
                      f"(or set TORCH_HOME)")
    problem = not_tensors_only(weights)
    if problem:
        return None, problem
    backbone = torch.hub.load(str(repo), DINOV2_MODEL, source="local")  # reads the cached weights
    return DinoV2Features(backbone), f"DINOv2 {DINOV2_MODEL} CLS features from {repo} and {weights}"


@torch.no_grad()
def extract_features(
    net: Callable[[Tensor], Any], images: Tensor, batch_size: int, device: torch.device, desc: str, progress: bool
) -> Tensor:
    """(N, 3, H, W) uint8 -> (N, D) float32 features of a network taking uint8 batches."""
    out = []
    for x in _batches(images, batch_size, device, desc, progress):
        f = net(x)
        out.append((f[0] if isinstance(f, tuple) else f).reshape(len(x), -1).float().cpu())
    return torch.cat(out)


def inception_metrics(generated: Tensor, reference: Tensor) -> dict[str, Any]:
    """FID, KID and improved precision/recall from (N, 2048) Inception features.

    FID: ``frechet_distance``. KID (Binkowski et al. 2018) and precision/recall
    (Kynkaanniemi et al. 2019, k = 3): torch-fidelity's ``kid_features_to_metric`` and
    ``prc_features_to_metric`` (generated first), KID over 100 subsets of 1000 with
    torch-fidelity's seed; with N < 1000 images, subsets of N // 2 (subsets of all N would
    all be the same set and give a std of exactly 0), and ``kid_note`` says so; with
    N < 4, KID is "unavailable".
    """
    from torch_fidelity.defaults import DEFAULTS
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    n = min(len(generated), len(reference))
    # Subsets of the whole set would all be the whole set (std exactly 0): below 1000
    # images, half-size subsets, whose spread is real (about sqrt(2) x that of a
    # whole-set estimate).
    subset = KID_SUBSET_SIZE if n >= KID_SUBSET_SIZE else n // 2
    out: dict[str, Any] = {"fid": frechet_distance(generated, reference)}
    if subset < 2:
        out["kid"] = UNAVAILABLE
        out["kid_note"] = f"KID needs subsets of at least 2 images of each set; there are {n}"
    else:
        kid = kid_features_to_metric(generated, reference, kid_subsets=KID_SUBSETS, kid_subset_size=subset,
                                     verbose=False)
        out["kid"] = {"mean": float(kid["kernel_inception_distance_mean"]),
                      "std": float(kid["kernel_inception_distance_std"]),
                      "subsets": KID_SUBSETS, "subset_size": subset, "seed": DEFAULTS["rng_seed"]}
        if subset < KID_SUBSET_SIZE:
            out["kid_note"] = (f"{n} images (< {KID_SUBSET_SIZE}): mean and std over {KID_SUBSETS} random subsets "
                               f"of {subset} (half the set), so that they differ; the std is the spread of a "
                               f"half-size estimate")
    if min(len(generated), len(reference)) > PRC_NEIGHBOURHOOD:
        prc = prc_features_to_metric(generated, reference, prc_neighborhood=PRC_NEIGHBOURHOOD, verbose=False)
        out.update(precision=float(prc["precision"]), recall=float(prc["recall"]))
    else:
        out.update(precision=UNAVAILABLE, recall=UNAVAILABLE)
    return out


# ---- memorisation --------------------------------------------------------------------


def nearest_neighbours(queries: Tensor, keys: Tensor, exclude_same_index: bool = False,
                       chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Each query's nearest key in RMS distance sqrt(mean((q - k)^2)).

    Args:
        queries: (N, D) float.
        keys: (M, D) float.
        exclude_same_index: query i may not match key i (leave-one-out, when the queries
            are the keys).
        chunk: queries per ``torch.cdist`` call (memory N_chunk x M).
    Returns:
        ``(distance, index)``: (N,) float64 RMS distances and (N,) int64 key indices.
    """
    q, k = queries.double(), keys.double()
    dist, idx = [], []
    for start in range(0, len(q), chunk):
        d = torch.cdist(q[start : start + chunk], k)  # (n, M) L2
        if exclude_same_index:
            rows = torch.arange(len(d))
            d[rows, rows + start] = math.inf
        best = d.min(dim=1)
        dist.append(best.values / math.sqrt(q.shape[1]))
        idx.append(best.indices)
    return torch.cat(dist), torch.cat(idx)


def _summary(x: Tensor) -> dict[str, float]:
    a = x.double().numpy()
    return {"min": float(a.min()), "p05": float(np.percentile(a, 5)), "median": float(np.median(a)),
            "mean": float(a.mean()), "max": float(a.max())}


def memorisation(
    samples: Tensor, train: Tensor, baseline: Tensor, floor: Tensor, leave_one_out: bool = False
) -> dict[str, Any]:
    """Nearest training neighbour of each sample, against what new images and copies score.

    Samples are VAE decodes, so both yardsticks go through the VAE too. ``baseline``:
    VAE round trips of images the model never saw, scored like the samples (a model
    that generates new images from the training distribution scores like them).
    ``floor``: each training image's distance to its own round trip (a model that
    reproduces training images scores like this). Where the two are apart (the floor's
    95th percentile below the baseline's 5th), a sample at or below the floor's 95th
    percentile is counted as a near copy; where they overlap (a VAE whose round trip
    moves an image as far as the gap to its neighbours), copies cannot be told from new
    images in that space and ``near_copies`` is None.

    Args:
        samples: (N, D) float, the generated images' vectors (pixels in [0, 1], or latents).
        train: (M, D) the training images' vectors, M >= 2.
        baseline: (K, D) round trips of held-out images; or, with ``leave_one_out``, the
            (M, D) round trips of the training images, each scored against the others.
        floor: (M,) RMS distance between each training image and its round trip.
        leave_one_out: ``baseline`` row i is training image i's round trip: exclude i.
    Returns:
        ``nn_distance`` (per sample, RMS), ``nn_index``; summaries (min, p05, median,
        mean, max) ``samples_to_train``, ``baseline_to_train``, ``copy_floor``;
        ``median_ratio`` = median(samples) / median(baseline) (about 1: as far from the
        training set as new images; towards median(floor) / median(baseline): copies);
        ``fraction_below_baseline_p05`` (about 0.05 for new images); ``copy_cutoff`` (the
        floor's 95th percentile) and ``near_copies`` (None where it is not below the
        baseline's 5th percentile).
    """
    dist, idx = nearest_neighbours(samples, train)
    base, _ = nearest_neighbours(baseline, train, exclude_same_index=leave_one_out)
    base_p05, floor_p95 = float(np.percentile(base.numpy(), 5)), float(np.percentile(floor.numpy(), 95))
    return {"nn_distance": dist.tolist(), "nn_index": idx.tolist(),
            "samples_to_train": _summary(dist), "baseline_to_train": _summary(base), "copy_floor": _summary(floor),
            "median_ratio": float(dist.median() / base.median()) if base.median() > 0 else math.inf,
            "fraction_below_baseline_p05": float((dist < base_p05).double().mean()), "copy_cutoff": floor_p95,
            "near_copies": int((dist <= floor_p95).sum()) if floor_p95 < base_p05 else None}


# ---- evaluation ----------------------------------------------------------------------


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "accelerate", "torch-fidelity", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _nearest_csv(samples: Sequence[str], train: Sequence[str], mem: dict[str, dict[str, Any]]) -> bytes:
    """One row per sample: its nearest reference image and distance in each space, and the near-copy flags."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["sample", "pixel_nearest", "pixel_rms", "pixel_near_copy", "latent_nearest", "latent_rms",
                     "latent_near_copy"])
    px, lat = mem["pixel"], mem["latent"]
    for i, name in enumerate(samples):
        row = [name]
        for m in (px, lat):
            d = m["nn_distance"][i]
            row += [train[m["nn_index"][i]], f"{d:.6g}", "" if m["near_copies"] is None else int(d <= m["copy_cutoff"])]
        writer.writerow(row)
    return buf.getvalue().encode()


def _flat_pixels(images: Tensor) -> Tensor:
    """(N, 3, H, W) uint8 -> (N, 3 H W) float64 in [0, 1]."""
    return images.flatten(1).double() / 255


@torch.no_grad()
def evaluate_ldm(
    model: Union[PathLike, LatentDiffusionPipeline],
    reference: PathLike,
    out: PathLike = "report.json",
    num_images: int | None = None,
    samples: PathLike | None = None,
    heldout: PathLike | None = None,
    max_reference: int | None = None,
    steps: int = 50,
    scheduler: str | None = None,
    shift: float | None = None,
    class_label: Union[int, str] = "cycle",
    guidance_scale: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    device: str | None = None,
    fid: str = "auto",
    inception_weights: PathLike | None = None,
    dinov2: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Generate images (or read them) and measure them against a reference set.

    Figures (each in the report with a note on what it is): FID, KID and precision /
    recall on Inception features and FD_DINOv2 when those networks' weights are on this
    machine ("unavailable" with the file and where to put it otherwise); always the
    sliced Wasserstein distance on Laplacian-pyramid patches (``latent_diffusion.swd``)
    of the samples against the held-out images (the reference without ``heldout``) and
    its floor (held-out vs reference); always the latent FD (``frechet_distance`` of the pipeline VAE's posterior means of both sets,
    flattened (c * h * w), in the U-Net's scaled units: a sanity score for comparing
    runs on one VAE, not a literature metric) and ``memorisation`` in pixel space (the
    sample size, [0, 1]) and latent space, with a PNG of the ``CLOSEST_N`` samples
    nearest a training image (sample | training image | |difference| x 4).

    Files: ``out`` (report JSON); beside it ``<stem>_closest8.png``, ``<stem>_nearest.csv``
    (per sample: the nearest reference image and distance in each space, near-copy
    flags) and, when generating, ``<stem>_samples/`` (``sample_ldm``'s PNGs).

    Args:
        model: a pipeline folder, a run's output dir, or a loaded pipeline.
        reference: the training images: an image folder or the latent cache the model
            was trained on (its recorded source crops are reloaded). The memorisation
            check means "nearest training image" only if this is the training set.
        out: the report's path.
        num_images: images to generate; None: as many as the reference has. Ignored
            with ``samples``.
        samples: a folder of generated PNGs (``sample_ldm`` output) to read instead.
        heldout: held-out images (folder or cache) for the memorisation baseline; None:
            leave-one-out within the reference.
        max_reference: use at most this many reference images, evenly spaced.
        steps, scheduler, shift, class_label, guidance_scale, seed, batch_size: as
            ``latent_diffusion.sample.sample`` (scheduler None: the model's default).
        device: None: CUDA when available.
        fid: "auto" | "off" (the Inception metrics).
        inception_weights: torch-fidelity's InceptionV3 weights file.
        dinov2: "auto" | "off".
        progress: tqdm bars.
    Returns:
        The report (what ``out`` holds).
    Raises:
        FileNotFoundError: a missing model, reference or samples folder.
        ValueError: bad options, no images, a cache at another resolution, a scheduler
            that does not fit the model.
    """
    t0 = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipeline = model if isinstance(model, LatentDiffusionPipeline) else load_pipeline(model)
    pipeline.to(dev)
    vae = pipeline.vae.eval()
    resolution = pipeline.denoiser.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    out = Path(out)
    notes: dict[str, str] = {}
    if samples is None and scheduler is not None:  # a sampler that does not fit fails before any work
        check_sampler(scheduler, pipeline.config.prediction_type)

    ref = load_reference(reference, resolution, max_reference, progress)
    held = load_reference(heldout, resolution, None, progress) if heldout is not None else None
    if samples is None:
        n = num_images or len(ref["names"])
        samples_dir = out.with_name(f"{out.stem}_samples")
        result = sample(pipeline, samples_dir, n, steps=steps, scheduler=scheduler, class_label=class_label,
                        guidance_scale=guidance_scale, seed=seed, batch_size=batch_size, device=dev,
                        progress=progress, shift=shift, overwrite=True)  # its own folder: a rerun replaces it
        gen = load_samples(samples_dir, resolution, result["paths"])
        settings = {k: v for k, v in result["settings"].items() if k != "model"}  # the model is in report["model"]
        sampling = {"generated": True, "folder": str(samples_dir), "seconds": round(result["seconds"], 2), **settings}
    else:
        gen = load_samples(samples, resolution)
        sampling = {"generated": False, "folder": str(samples), "resized": gen["resized"],
                    "settings": gen["settings"]}
    sampling["num_images"] = len(gen["names"])

    # ---- always: latents through the pipeline's own VAE, and memorisation --------------
    # Round trips (8-bit decodes of posterior means) of the reference, or of the held-out
    # images, stand for new images as the VAE renders them; see ``memorisation``.
    lat_gen, lat_ref = (encode_images(vae, s["images"], batch_size, dev, progress) for s in (gen, ref))
    trip = reconstruct_images(vae, ref["images"], batch_size, dev)  # (M, 3, R, R) uint8
    lat_trip = encode_images(vae, trip, batch_size, dev)
    floor_px = (_flat_pixels(trip) - _flat_pixels(ref["images"])).pow(2).mean(1).sqrt()
    floor_lat = (lat_trip - lat_ref).double().pow(2).mean(1).sqrt()
    if held is not None:
        trip = reconstruct_images(vae, held["images"], batch_size, dev)
        lat_trip = encode_images(vae, trip, batch_size, dev)
    mem = {
        "pixel": memorisation(_flat_pixels(gen["images"]), _flat_pixels(ref["images"]), _flat_pixels(trip), floor_px,
                              leave_one_out=held is None),
        "latent": memorisation(lat_gen, lat_ref, lat_trip, floor_lat, leave_one_out=held is None),
    }
    latent_fd = frechet_distance(lat_gen, lat_ref)
    # Sliced Wasserstein distance on Laplacian-pyramid patches: samples vs held-out images
    # (vs the reference when none are given), beside its floor, held-out vs reference.
    swd_against = held if held is not None else ref
    report_swd = swd(swd_against["images"], gen["images"], seed=seed)
    swd_floor = swd(held["images"], ref["images"], seed=seed) if held is not None else None

    # ---- optional: Inception and DINOv2 features -------------------------------------
    report_fid: dict[str, Any] = {k: UNAVAILABLE for k in ("fid", "kid", "precision", "recall")}
    inception, notes["inception"] = build_inception(fid, inception_weights)
    if inception is not None:
        feats = [extract_features(inception.to(dev), s["images"], batch_size, dev, "inception", progress)
                 for s in (gen, ref)]
        report_fid = inception_metrics(*feats)
        if "kid_note" in report_fid:
            notes["kid"] = report_fid.pop("kid_note")
        if min(len(f) for f in feats) < FID_RELIABLE_IMAGES:
            notes["inception"] += (f"; {len(feats[0])} generated vs {len(feats[1])} reference images (< "
                                   f"{FID_RELIABLE_IMAGES}): FID is biased upward, compare only at equal counts")
    fd_dinov2: Any = UNAVAILABLE
    dino, notes["dinov2"] = build_dinov2(dinov2)
    if dino is not None:
        feats = [extract_features(dino.to(dev), s["images"], batch_size, dev, "dinov2", progress) for s in (gen, ref)]
        fd_dinov2 = frechet_distance(*feats)

    # ---- the closest pairs, and the report -------------------------------------------
    px = mem["pixel"]
    order = np.argsort(px["nn_distance"])[:CLOSEST_N]
    rows, closest = [], []
    for i in order:
        j = px["nn_index"][i]
        closest.append({"sample": gen["names"][i], "train": ref["names"][j], "train_index": j,
                        "pixel_rms": px["nn_distance"][i], "latent_rms": mem["latent"]["nn_distance"][i],
                        "latent_nn_is_same_image": mem["latent"]["nn_index"][i] == j})
        rows.append((f"{Path(gen['names'][i]).stem} ~ {Path(ref['names'][j]).name}: {px['nn_distance'][i]:.3f}",
                     gen["images"][i].permute(1, 2, 0).numpy(), ref["images"][j].permute(1, 2, 0).numpy()))
    closest_png = out.with_name(f"{out.stem}_closest{CLOSEST_N}.png")
    write_atomic(closest_png, png_bytes(worst_grid(rows)))
    nearest_csv = out.with_name(f"{out.stem}_nearest.csv")
    write_atomic(nearest_csv, _nearest_csv(gen["names"], ref["names"], mem))
    for space in mem.values():  # per-sample lists stay out of the summary report
        space.pop("nn_distance"), space.pop("nn_index")

    report = {
        "format_version": REPORT_FORMAT_VERSION,
        "model": {"path": None if isinstance(model, LatentDiffusionPipeline) else str(model),
                  "prediction_type": pipeline.config.prediction_type,
                  "unet_parameters": sum(p.numel() for p in pipeline.denoiser.parameters()),  # the denoiser's
                  "num_classes": pipeline.num_classes, "resolution": resolution,
                  "vae_scaling_factor": vae.config.get("scaling_factor"), "vae_shift_factor": vae.config.get("shift_factor")},
        "samples": sampling,
        "reference": {"path": str(reference), "kind": ref["kind"], "num_images": len(ref["names"]),
                      "max_images": max_reference, "num_skipped": len(ref["skipped"]), "skipped": ref["skipped"][:20]},
        "heldout": None if held is None else {"path": str(heldout), "kind": held["kind"],
                                              "num_images": len(held["names"])},
        **report_fid,
        "fd_dinov2": fd_dinov2,
        "swd": report_swd,
        "swd_floor": swd_floor,
        "latent_fd": latent_fd,
        "memorisation": {**mem, "closest": closest, "closest_png": str(closest_png), "nearest_csv": str(nearest_csv)},
        "notes": {
            **notes,
            "latent_fd": (f"Frechet distance of the pipeline VAE's posterior means ((z - shift) * scaling_factor, "
                          f"flattened to {lat_ref.shape[1]} dims) of generated vs reference images: a sanity "
                          f"score for runs on the same VAE and reference at equal N, not a literature metric"),
            "memorisation": ("RMS distance of each sample to its nearest reference image: pixels in [0, 1] at "
                             "the sample size, latents in the U-Net's units. baseline: VAE round trips (8-bit decodes "
                             "of posterior means) of " + ("the held-out images, to the reference" if held else
                                                          "the reference images, each to its nearest OTHER reference "
                                                          "image (leave-one-out)") +
                             ": what new images score; copy_floor: each reference image to its own round trip, what "
                             "a copy scores; near_copies: samples at or below the floor's 95th percentile, None when "
                             "that is not below the baseline's 5th percentile (copies indistinguishable)"),
            "swd": ("sliced Wasserstein distance x 1e3 on 7x7 Laplacian-pyramid patches (Karras et al. 2018), per "
                    "level and averaged, of the generated images against the " + ("held-out images" if held else
                    "reference (training) images: copies of them would score like real images") + "; swd_floor: "
                    "the held-out images against the reference, what new real images score. Lower is better; "
                    "biased upward at small counts: compare at equal counts"),
            "reference_images": ("the exact crops the latent cache encoded, reloaded from the sources in its "
                                 "index.json" if ref["kind"] == "latent_cache" else
                                 "centre crops, shorter side resized to the sample size (bicubic, antialiased)"),
        },
        "run": {"device": str(dev), "batch_size": batch_size, "seconds": round(time.perf_counter() - t0, 2),
                "versions": _versions()},
    }
    write_json(out, report)
    return report
