"""Measure an AutoencoderKL on held-out images, and measure its latents.

Reading order of this file:

1. ``EvalImages``: image files -> centre crops, as ``ImageFolder(train=False)`` makes them.
2. ``build_lpips`` / ``build_fid``: the optional metrics, or the reason they are unavailable.
3. ``evaluate_vae``: encode with the posterior mode, decode, compare in 8 bits, beside the
   bicubic baseline (down and up by the VAE's factor), the mean-colour error and the chroma gain; writes
   ``report.json``, a per-image CSV and a PNG of the worst reconstructions.
4. ``latent_statistics`` / ``write_config_with_latent_stats``: mean and std of posterior
   samples -> ``scaling_factor`` (and ``shift_factor``) in a copy of the VAE's config.

Conventions, as the literature reports reconstructions (LDM, Rombach et al. 2022, Tab. 8;
SD's VAE model cards): the image's shorter side is resized to the resolution (bicubic,
antialiased) and the centre square is cropped; the reconstruction of the posterior mode
is clipped to [-1, 1] and rounded to 8 bits, and so is the input; PSNR (dB) and SSIM
(Gaussian window 11, sigma 1.5; Wang et al. 2004) are computed per image on [0, 255] by
torchmetrics and averaged over images (mean of per-image PSNR, not PSNR of the mean MSE).
An image whose shorter side is below the resolution is UPSCALED (as training does), so
every file counts; the report says how many were, and the CSV marks each.
"""

from __future__ import annotations

import csv
import heapq
import importlib.util
import io
import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
import torchvision.transforms.functional as TF
from diffusers import AutoencoderKL
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from tqdm.auto import tqdm

from .atomic import write_atomic
from .data import ImageFolder, list_images, load_rgb, png_bytes, to_tensor
from .losses import build_perceptual
from .metrics import (
    COLOUR_JND,
    MIN_CHROMA_STD,
    bicubic_down_up,
    chroma_gain,
    mean_colour_error,
    psnr_ssim_8bit,
    to_uint8_range,
)
from .model import latent_batch_norm, load_vae, vae_weights_sha256

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

REPORT_FORMAT_VERSION = 1
WORST_N = 8  # reconstructions shown in the worst-N PNG
DIFF_GAIN = 4  # the difference panel shows |input - reconstruction| x this, clipped to 255
# torchmetrics' FID runs torch-fidelity's InceptionV3 (the TF-FID network ported to PyTorch).
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
FID_RELIABLE_IMAGES = 2048  # fewer images than feature dimensions: a singular covariance, a biased FID
UNAVAILABLE = "unavailable"
# A reconstruction whose chroma gain is below 0.5 on average (half the colour gone; or above
# 2) is flagged: bicubic 8x keeps 0.84 on Kodak at 256 px (blur), grey or a sepia toning ~0.
CHROMA_LOW = 0.5


# ---- images -------------------------------------------------------------------------


def load_eval_image(path: PathLike, resolution: int) -> tuple[Tensor, tuple[int, int]]:
    """One file -> its centre crop, exactly as ``ImageFolder(train=False, grid=1)``.

    The shorter side is resized to ``resolution`` (bicubic, antialiased; a smaller image is
    upscaled), then the centre ``resolution`` square is cropped (torchvision's rounding).

    Args:
        path: an image file (any mode ``load_rgb`` reads).
        resolution: crop side in pixels.
    Returns:
        image: (3, resolution, resolution) float32 in [-1, 1].
        size: (width, height) of the file after its EXIF rotation, before resizing.
    Raises:
        OSError: if the file cannot be decoded (from ``load_rgb``).
    """
    img = load_rgb(path)
    size = img.size
    if min(size) != resolution:
        img = TF.resize(img, resolution, interpolation=InterpolationMode.BICUBIC, antialias=True)
    img = TF.center_crop(img, [resolution, resolution])
    return to_tensor(img), size


class EvalImages(Dataset):
    """Image files -> ``{"index", "image", "width", "height"}``, or ``{"index", "error"}``.

    Unlike ``ImageFolder`` (which, for training, puts the next image in place of one that
    fails to decode), a failure here is returned as such, so the evaluation skips the file
    and counts it instead of scoring another image under its name.

    Args:
        paths: image files.
        resolution: crop side in pixels.
    """

    def __init__(self, paths: Sequence[PathLike], resolution: int) -> None:
        self.paths = [Path(p) for p in paths]
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            image, (width, height) = load_eval_image(self.paths[index], self.resolution)
        except OSError as exc:
            return {"index": index, "error": str(exc)}
        return {"index": index, "image": image, "width": width, "height": height}


def select_images(data: PathLike, resolution: int, max_images: int | None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(readable image files, skipped files with reasons) of a folder, at most ``max_images``.

    ``max_images`` takes images evenly spaced over the sorted list (not the first N, which
    in a class-sorted folder would all be one class).

    Raises:
        FileNotFoundError: if ``data`` is not a folder.
        ValueError: if it holds no image file, none is readable, or ``max_images`` < 1.
    """
    from .data import evenly_spaced  # the split rule training uses for held-out images

    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
    paths = list_images(data)
    if max_images is not None:
        paths = evenly_spaced(paths, max_images)
    folder = ImageFolder(paths, resolution, train=False)  # header check: warns about and drops unreadable files
    return folder.paths, list(folder.skipped)


def _loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=list, persistent_workers=False)


# ---- optional metrics ---------------------------------------------------------------


def build_lpips(mode: str = "auto") -> tuple[nn.Module | None, str]:
    """LPIPS (VGG) for evaluation, or None and the reason.

    Args:
        mode: "auto": torchvision's VGG16 ImageNet weights (cache, else one download
            attempt bounded by ``losses.DOWNLOAD_TIMEOUT_S``), else unavailable;
            "off": not computed; "random": a random VGG16 backbone, for tests only.
    Returns:
        ``(module or None, note)``: the frozen ``lpips.LPIPS(net="vgg")`` on the CPU, and
        one line saying what was used or why it is unavailable (which file, where).
    Raises:
        ValueError: on another mode.
    """
    if mode == "off":
        return None, "not computed (lpips=off)"
    if mode == "random":
        return build_perceptual("false")
    if mode != "auto":
        raise ValueError(f"lpips must be 'auto', 'off' or 'random', got {mode!r}")
    try:
        return build_perceptual("true")
    except RuntimeError as exc:
        return None, str(exc)


def inception_weights_path() -> Path:
    """Where torch-fidelity keeps its InceptionV3 weights (torch.hub's checkpoints dir)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def find_inception_weights(mode: str = "auto", weights: PathLike | None = None) -> tuple[Path | None, str]:
    """torch-fidelity's InceptionV3 weights file, checked, or None and the reason.

    Never downloads: torch-fidelity would fetch the weights and unpickle them without
    ``weights_only``. The file must be there already, and is first checked to load with
    ``torch.load(weights_only=True)`` (tensors only) before torch-fidelity reads it.

    Args:
        mode: "auto" (use it when the package and weights are present) or "off".
        weights: the InceptionV3 weights file; None looks in ``inception_weights_path()``.
    Returns:
        ``(path or None, note)``; the note says why it is unavailable (which file, where).
    Raises:
        ValueError: on another mode.
    """
    if mode == "off":
        return None, "not computed (fid=off)"
    if mode != "auto":
        raise ValueError(f"fid must be 'auto' or 'off', got {mode!r}")
    if importlib.util.find_spec("torch_fidelity") is None:
        return None, ("the Inception metrics need the torch-fidelity package (its InceptionV3): "
                      "pip install torch-fidelity, and its weights file (see --inception-weights)")
    path = Path(weights) if weights is not None else inception_weights_path()
    if not path.is_file():
        return None, (f"InceptionV3 weights '{INCEPTION_FILE}' not found at {path}; no download is attempted. "
                      f"Fetch {INCEPTION_URL} on a machine with the network and put it there "
                      f"(or pass its path with --inception-weights)")
    problem = not_tensors_only(path)
    return (None, problem) if problem else (path, f"InceptionV3 weights {path}")


def not_tensors_only(path: PathLike) -> str | None:
    """None if ``torch.load(path, weights_only=True)`` reads the file, else why not.

    Checked before handing a weights file to code that unpickles it in full
    (torch-fidelity, torch.hub), so a file holding pickled objects is never executed.
    """
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, a truncated file, ...
        return f"cannot load {path} with torch.load(weights_only=True): {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None


def build_fid(mode: str = "auto", weights: PathLike | None = None) -> tuple[nn.Module | None, str]:
    """torchmetrics' ``FrechetInceptionDistance`` (2048-d pool features), or None and the reason.

    Args:
        mode, weights: as ``find_inception_weights`` (which checks the file; nothing is
            downloaded).
    Returns:
        ``(metric or None, note)``; the note says what was used or why it is unavailable.
    Raises:
        ValueError: on another mode.
    """
    path, note = find_inception_weights(mode, weights)
    if path is None:
        return None, note
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=2048, normalize=False, feature_extractor_weights_path=str(path))
    return fid, f"torchmetrics FrechetInceptionDistance, 2048-d InceptionV3 pool features ({path})"


# ---- evaluation ---------------------------------------------------------------------


def _summary(values: Sequence[float]) -> dict[str, float]:
    """mean, sample std (n - 1; 0 for one value), min, max."""
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max())}


def _jsonable(x: Any) -> Any:
    """inf/nan (PSNR of an exact reconstruction) -> strings, so the report is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_json(path: PathLike, obj: Any) -> None:
    """JSON (strict: no NaN/Infinity literals), indented, written atomically."""
    write_atomic(Path(path), (json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n").encode())


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the bitmap font
        return ImageFont.load_default()


def worst_grid(rows: Sequence[tuple[Any, ...]], gain: int = DIFF_GAIN) -> Image.Image:
    """One row per image: input | reconstruction [| baseline] | |difference| x gain, captioned.

    Args:
        rows: ``(caption, input, reconstruction)`` or ``(caption, input, reconstruction,
            baseline)`` (e.g. the bicubic baseline); arrays (H, W, 3) uint8. The
            difference panel is |input - reconstruction|.
        gain: amplification of the absolute difference (clipped to 255).
    Returns:
        An RGB ``PIL.Image``.
    """
    h, w = rows[0][1].shape[:2]
    pad, cap = 4, 16
    panels = max(len(r) for r in rows)  # caption + images; the difference is one more panel
    width = max(panels * w + (panels + 1) * pad, 320)
    sheet = Image.new("RGB", (width, len(rows) * (h + cap + pad) + pad), "white")
    draw, font = ImageDraw.Draw(sheet), _font(12)
    for i, (caption, x, y, *baseline) in enumerate(rows):
        top = pad + i * (h + cap + pad)
        draw.text((pad, top), caption, fill="black", font=font)
        diff = np.clip(np.abs(x.astype(np.int16) - y.astype(np.int16)) * gain, 0, 255).astype(np.uint8)
        for j, panel in enumerate((x, y, *baseline, diff)):
            sheet.paste(Image.fromarray(panel), (pad + j * (w + pad), top + cap))
    return sheet


def _output_paths(out: Path) -> dict[str, Path]:
    """report.json -> report_per_image.csv, report_worst8.png beside it."""
    return {"report": out, "csv": out.with_name(f"{out.stem}_per_image.csv"),
            "worst": out.with_name(f"{out.stem}_worst{WORST_N}.png")}


def _describe_source(vae: AutoencoderKL | PathLike) -> dict[str, Any]:
    if isinstance(vae, nn.Module):
        return {"path": None, "format": "in-memory model"}
    p = Path(vae)
    if p.is_file():
        return {"path": str(p), "format": f"original single file ({p.suffix})"}
    if (p / "config.json").is_file():
        return {"path": str(p), "format": "diffusers folder"}
    return {"path": str(p), "format": "diffusers folder vae/ inside this dir"}


def _vae_info(vae: AutoencoderKL, source: dict[str, Any]) -> dict[str, Any]:
    c = vae.config
    return {**source, "weights_sha256": vae_weights_sha256(vae),
            "num_parameters": sum(p.numel() for p in vae.parameters()),
            "config": {k: c.get(k) for k in ("block_out_channels", "layers_per_block", "latent_channels",
                                             "norm_num_groups", "scaling_factor", "shift_factor")}}


@torch.no_grad()
def evaluate_vae(
    vae: AutoencoderKL | PathLike,
    data: PathLike,
    out: PathLike = "report.json",
    resolution: int = 256,
    batch_size: int = 4,
    max_images: int | None = None,
    num_workers: int = 1,
    device: str | None = None,
    lpips: str = "auto",
    fid: str = "auto",
    inception_weights: PathLike | None = None,
    save_reconstructions: PathLike | None = None,
    vae_config: PathLike | None = None,
    progress: bool = True,
    tiling: bool = False,
    tile_size: int | None = None,
) -> dict[str, Any]:
    """Reconstruct every image of a folder and report the metrics the literature uses.

    For each image x (a centre crop, see the module docstring): posterior = encode(x);
    z = posterior mode; x_hat = decode(z); both rounded to 8 bits. Per image: PSNR (dB),
    SSIM, LPIPS (VGG) when its weights can be had, KL(posterior || N(0, I)) in nats summed
    over (c, h, w), and the mean and std of z per channel over (h, w). Over the set: mean,
    std (n - 1), min and max of each; the per-channel mean and std of z over all images
    and positions; rFID between inputs and reconstructions when the Inception weights are
    present. Unavailable metrics are ``"unavailable"`` with the reason in ``notes``.

    Beside them, on the same crops: the bicubic baseline (``metrics.bicubic_down_up`` by
    the VAE's own factor f: PSNR, SSIM, LPIPS, rFID, colour error) and the VAE's margin over it
    per image (``vs_bicubic``: margins and how many images the VAE wins); and the colour
    figure (``metrics.mean_colour_error``): the CIE76 distance between each image's mean
    L*a*b* colour and its reconstruction's, the mean shift over the set, and ``cast``,
    true when the mean error exceeds ``metrics.COLOUR_JND`` (2.3, just noticeable); and
    ``chroma_gain`` (``metrics.chroma_gain``: the slope of the reconstruction's a*b* on the
    input's, per image with colour), ``desaturated`` below ``CHROMA_LOW``.

    Files written (each atomically): ``out`` (the report as JSON), ``<stem>_per_image.csv``
    and ``<stem>_worst8.png`` beside it (the 8 lowest-PSNR images: input | reconstruction |
    bicubic | |input - reconstruction| x ``DIFF_GAIN``), and with ``save_reconstructions``
    one PNG per image.

    Args:
        vae: a model, or any path ``load_vae`` accepts (diffusers folder, training output
            dir, original ``.safetensors``/``.ckpt``).
        data: image folder, searched recursively.
        out: the report's path (``.json``).
        resolution: crop side in pixels, a multiple of the VAE's factor f (8 for kl-f8).
        batch_size: images per forward pass.
        max_images: evaluate at most this many, evenly spaced over the sorted files.
        num_workers: DataLoader processes decoding images (0: in this process).
        device: "cpu", "cuda", ...; None picks CUDA when available. Always float32.
        lpips: "auto" | "off" (see ``build_lpips``; "random" for tests).
        fid: "auto" | "off" (see ``build_fid``).
        inception_weights: the InceptionV3 weights file for rFID.
        save_reconstructions: a folder for the 8-bit reconstructions as PNG, named after
            the files (``<index>_<stem>.png``), to look at or to check the numbers.
        vae_config: config for a single-file ``vae`` (``load_vae``'s ``config``).
        progress: show a tqdm bar.
        tiling: encode and decode in overlapping tiles (diffusers' ``enable_tiling``: a
            quarter overlap, seams blended linearly): memory stays that of one tile, for
            crops larger than the training size. Each tile is normalised on its own, so
            the figures differ from untiled ones (the demo VAE at 512 px: -0.3 dB with
            64 px tiles, +0.3 dB with 256 px tiles; ``lat benchmark --what
            vae_tiling``).
        tile_size: tile side in pixels, a multiple of f; None: the VAE's ``sample_size``
            (its training resolution for our VAEs, 512 for SD's).
    Returns:
        The report (what ``out`` holds).
    Raises:
        FileNotFoundError: missing image folder or VAE path.
        ValueError: no readable image, an unreadable checkpoint, a resolution that is not
            a multiple of f, or a bad option.
    """
    t0 = time.perf_counter()
    source = _describe_source(vae)
    model = vae if isinstance(vae, nn.Module) else load_vae(vae, config=vae_config)
    f = 2 ** (len(model.config.block_out_channels) - 1)
    if resolution < f or resolution % f:
        raise ValueError(f"resolution must be a positive multiple of the VAE's downsampling factor {f}, got {resolution}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(dev).eval()  # load_vae gives float32
    if tile_size is not None and (tile_size < f or tile_size % f):
        raise ValueError(f"tile_size must be a positive multiple of the VAE's downsampling factor {f}, got {tile_size}")
    if tiling:
        model.enable_tiling()
        if tile_size is not None:
            model.tile_sample_min_size, model.tile_latent_min_size = tile_size, tile_size // f
    paths, skipped = select_images(data, resolution, max_images)

    lpips_net, lpips_note = build_lpips(lpips)
    if lpips_net is not None:
        lpips_net = lpips_net.to(dev)
    fid_metric, fid_note = build_fid(fid, inception_weights)
    fid_bicubic = None
    if fid_metric is not None:
        fid_metric = fid_metric.to(dev)
        fid_bicubic = build_fid(fid, inception_weights)[0].to(dev)  # the baseline's own rFID

    files = _output_paths(Path(out))
    recon_dir = Path(save_reconstructions) if save_reconstructions is not None else None
    if recon_dir is not None:
        recon_dir.mkdir(parents=True, exist_ok=True)

    rows: list[dict[str, Any]] = []
    worst: list[tuple[float, int, str, np.ndarray, np.ndarray, np.ndarray]] = []  # max-heap by -PSNR
    c = model.config.latent_channels
    z_sum = torch.zeros(c, dtype=torch.float64)
    z_sq = torch.zeros(c, dtype=torch.float64)
    z_count = 0
    bar = tqdm(total=len(paths), desc="eval_vae", unit="img", disable=not progress, dynamic_ncols=True)
    for items in _loader(EvalImages(paths, resolution), batch_size, num_workers):
        for it in items:
            if "error" in it:
                skipped.append((paths[it["index"]], it["error"]))
                logger.warning("skipping %s: %s", paths[it["index"]], it["error"])
        items = [it for it in items if "image" in it]
        if not items:
            continue
        x = torch.stack([it["image"] for it in items]).to(dev)  # (B, 3, R, R) in [-1, 1]
        posterior = model.encode(x).latent_dist
        z = posterior.mode()  # (B, c, R/f, R/f)
        x_hat = model.decode(z).sample.float()  # (B, 3, R, R), unclamped
        psnr, ssim = psnr_ssim_8bit(x, x_hat)
        kl = posterior.kl().float()  # (B,) nats, summed over (c, h, w)
        x_bic = bicubic_down_up(x, f)  # (B, 3, R, R): the baseline, by the VAE's own factor
        psnr_bic, ssim_bic = psnr_ssim_8bit(x, x_bic)
        colour_err, colour_shift = mean_colour_error(x, x_hat)  # (B,), (B, 3) in L*a*b*
        colour_err_bic, _ = mean_colour_error(x, x_bic)
        chroma, chroma_bic = chroma_gain(x, x_hat), chroma_gain(x, x_bic)  # (B,), NaN for near-grey inputs
        x8, y8, b8 = to_uint8_range(x), to_uint8_range(x_hat), to_uint8_range(x_bic)  # (B, 3, R, R) in [0, 255]
        lp = lpips_net(x8 / 127.5 - 1, y8 / 127.5 - 1).flatten() if lpips_net is not None else None
        lp_bic = lpips_net(x8 / 127.5 - 1, b8 / 127.5 - 1).flatten() if lpips_net is not None else None
        rgb_in, rgb_out = x8.mean((2, 3)).cpu(), y8.mean((2, 3)).cpu()  # (B, 3) mean 8-bit colour
        if fid_metric is not None:
            fid_metric.update(x8.to(torch.uint8), real=True)
            fid_metric.update(y8.to(torch.uint8), real=False)
            fid_bicubic.update(x8.to(torch.uint8), real=True)
            fid_bicubic.update(b8.to(torch.uint8), real=False)
        zd = z.double().cpu()
        z_sum += zd.sum((0, 2, 3))
        z_sq += (zd**2).sum((0, 2, 3))
        z_count += zd.shape[0] * zd.shape[2] * zd.shape[3]
        z_mean, z_std = z.mean((2, 3)).cpu(), z.std((2, 3), unbiased=False).cpu()  # (B, c)
        x8n = x8.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()  # (B, R, R, 3)
        y8n = y8.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()
        b8n = b8.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()
        for b, it in enumerate(items):
            path = paths[it["index"]]
            row = {"index": it["index"], "path": str(path), "width": it["width"], "height": it["height"],
                   "upscaled": min(it["width"], it["height"]) < resolution,
                   "psnr": float(psnr[b]), "ssim": float(ssim[b]),
                   "lpips": float(lp[b]) if lp is not None else None, "kl": float(kl[b]),
                   "bicubic_psnr": float(psnr_bic[b]), "bicubic_ssim": float(ssim_bic[b]),
                   "bicubic_lpips": float(lp_bic[b]) if lp_bic is not None else None,
                   "psnr_margin": float(psnr[b] - psnr_bic[b]),
                   "colour_error": float(colour_err[b]), "bicubic_colour_error": float(colour_err_bic[b]),
                   "chroma_gain": float(chroma[b]), "bicubic_chroma_gain": float(chroma_bic[b])}
            row.update({f"colour_shift_{k}": float(colour_shift[b, i]) for i, k in enumerate(("L", "a", "b"))})
            row.update({f"mean_rgb_{k}": float(rgb_in[b, i]) for i, k in enumerate("rgb")})
            row.update({f"rec_mean_rgb_{k}": float(rgb_out[b, i]) for i, k in enumerate("rgb")})
            row.update({f"z_mean_{k}": float(z_mean[b, k]) for k in range(c)})
            row.update({f"z_std_{k}": float(z_std[b, k]) for k in range(c)})
            rows.append(row)
            entry = (-row["psnr"], it["index"], path.name, x8n[b], y8n[b], b8n[b])
            if len(worst) < WORST_N:
                heapq.heappush(worst, entry)
            elif entry > worst[0]:
                heapq.heapreplace(worst, entry)
            if recon_dir is not None:
                write_atomic(recon_dir / f"{it['index']:05d}_{path.stem}.png", png_bytes(Image.fromarray(y8n[b])))
        bar.update(len(x))
    bar.close()
    if not rows:
        raise ValueError(f"none of the {len(paths)} images in {data} could be decoded: {skipped[:3]}")

    notes = {"lpips": lpips_note, "rfid": fid_note}
    rfid: Any = UNAVAILABLE
    rfid_bicubic: Any = UNAVAILABLE
    if fid_metric is not None:
        try:
            rfid = float(fid_metric.compute())
            rfid_bicubic = float(fid_bicubic.compute())
            if len(rows) < FID_RELIABLE_IMAGES:
                notes["rfid"] += (f"; only {len(rows)} images (< {FID_RELIABLE_IMAGES} feature dimensions): "
                                  f"the estimate is biased upward, compare only at equal image counts")
        except (RuntimeError, ValueError) as exc:
            notes["rfid"] = f"could not be computed: {exc}"
    mean = z_sum / z_count
    std = (z_sq / z_count - mean**2).clamp_min(0).sqrt()
    colour_error = _summary([r["colour_error"] for r in rows])
    coloured = [r for r in rows if not math.isnan(r["chroma_gain"])]  # near-grey inputs have no gain
    chroma = _summary([r["chroma_gain"] for r in coloured]) if coloured else UNAVAILABLE
    chroma_bic = _summary([r["bicubic_chroma_gain"] for r in coloured]) if coloured else UNAVAILABLE
    seconds = time.perf_counter() - t0
    report = {
        "format_version": REPORT_FORMAT_VERSION,
        "vae": _vae_info(model, source),
        "data": {"folder": str(data), "num_images": len(rows), "resolution": resolution,
                 "max_images": max_images, "num_skipped": len(skipped),
                 "skipped": [[str(p), r] for p, r in skipped],
                 "num_upscaled": sum(r["upscaled"] for r in rows),
                 "preprocessing": "shorter side resized to resolution (bicubic, antialiased; smaller images "
                                  "upscaled), centre crop; posterior mode; 8-bit comparison"},
        "psnr": _summary([r["psnr"] for r in rows]),
        "ssim": _summary([r["ssim"] for r in rows]),
        "lpips": _summary([r["lpips"] for r in rows]) if lpips_net is not None else UNAVAILABLE,
        "rfid": rfid,
        "kl": _summary([r["kl"] for r in rows]),
        "bicubic": {"factor": f, "thumbnail_px": resolution // f,
                    "psnr": _summary([r["bicubic_psnr"] for r in rows]),
                    "ssim": _summary([r["bicubic_ssim"] for r in rows]),
                    "lpips": _summary([r["bicubic_lpips"] for r in rows]) if lpips_net is not None else UNAVAILABLE,
                    "rfid": rfid_bicubic,
                    "colour_error": _summary([r["bicubic_colour_error"] for r in rows]),
                    "chroma_gain": chroma_bic},
        "vs_bicubic": {"psnr_margin": _summary([r["psnr_margin"] for r in rows]),
                       "ssim_margin": _summary([r["ssim"] - r["bicubic_ssim"] for r in rows]),
                       "psnr_wins": sum(r["psnr"] > r["bicubic_psnr"] for r in rows),
                       "ssim_wins": sum(r["ssim"] > r["bicubic_ssim"] for r in rows),
                       "num_images": len(rows)},
        "colour": {"error": colour_error,
                   "shift_lab": [float(np.mean([r[f"colour_shift_{k}"] for r in rows])) for k in ("L", "a", "b")],
                   "input_mean_rgb": [float(np.mean([r[f"mean_rgb_{k}"] for r in rows])) for k in "rgb"],
                   "reconstruction_mean_rgb": [float(np.mean([r[f"rec_mean_rgb_{k}"] for r in rows])) for k in "rgb"],
                   "jnd": COLOUR_JND, "cast": colour_error["mean"] > COLOUR_JND,
                   "chroma_gain": chroma, "num_chroma_images": len(coloured),
                   "desaturated": chroma != UNAVAILABLE and chroma["mean"] < CHROMA_LOW,
                   "oversaturated": chroma != UNAVAILABLE and chroma["mean"] > 1 / CHROMA_LOW},
        "latents": {"what": "posterior mode z over all images and positions (not yet x scaling_factor)",
                    "per_channel_mean": mean.tolist(), "per_channel_std": std.tolist()},
        "notes": {**notes,
                  "psnr": "dB, 10 log10(255^2 / MSE) per image on 8-bit images; mean over images; std is n - 1",
                  "ssim": "torchmetrics SSIM, Gaussian window 11, sigma 1.5, data range 255, per image",
                  "kl": "KL(posterior || N(0, I)) per image in nats, summed over (c, h, w)",
                  "bicubic": (f"the same crops shrunk by the VAE's factor {f} (bicubic, antialiased, as Pillow) to an "
                              f"8-bit {resolution // f} px thumbnail and enlarged back (bicubic); vs_bicubic: VAE minus "
                              f"bicubic per image (positive: the VAE is better), wins: images where the VAE scores higher"),
                  "colour": ("error: CIE76 distance (Delta E*ab) between the mean L*a*b* colour (D65) of each image and "
                             "of its reconstruction, per image; shift_lab: mean over images of reconstruction minus "
                             "input (dL*, da* +red/-green, db* +yellow/-blue); *_mean_rgb: mean 8-bit colour over the "
                             f"set; cast: mean error > {COLOUR_JND} (a just-noticeable difference); chroma_gain: "
                             f"least-squares slope of the reconstruction's a*b* (about its mean) on the input's, per "
                             f"image whose a*b* std is >= {MIN_CHROMA_STD} (1 = colour kept, 0 = grey or a toning "
                             f"that does not follow the input; bicubic's is below 1 from blur); "
                             f"desaturated / oversaturated: mean gain < {CHROMA_LOW} / > {1 / CHROMA_LOW:.3g}")},
        "files": {"csv": str(files["csv"]), "worst": str(files["worst"]),
                  "reconstructions": str(recon_dir) if recon_dir is not None else None},
        "run": {"device": str(dev), "batch_size": batch_size, "num_workers": num_workers,
                "tiling": {"tile_px": model.tile_sample_min_size, "overlap": model.tile_overlap_factor} if tiling else None,
                "seconds": round(seconds, 2), "images_per_sec": round(len(rows) / seconds, 3),
                "torch": torch.__version__, "python": platform.python_version()},
    }

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    write_atomic(files["csv"], buf.getvalue().encode())
    shown = sorted(worst, reverse=True)  # lowest PSNR first
    by_index = {r["index"]: r for r in rows}
    grid = worst_grid([(f"{name}  PSNR {-neg:.2f} dB (bicubic {by_index[i]['bicubic_psnr']:.2f})  "
                        f"SSIM {by_index[i]['ssim']:.3f}  colour dE {by_index[i]['colour_error']:.1f}", x8, y8, b8)
                       for neg, i, name, x8, y8, b8 in shown])
    write_atomic(files["worst"], png_bytes(grid))
    write_json(files["report"], report)
    return report


# ---- latent statistics --------------------------------------------------------------


@torch.no_grad()
def latent_statistics(
    vae: AutoencoderKL | PathLike,
    data: PathLike,
    resolution: int = 256,
    batch_size: int = 4,
    max_images: int | None = None,
    num_workers: int = 1,
    device: str | None = None,
    seed: int = 0,
    vae_config: PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Mean and std of posterior samples over a folder -> ``scaling_factor``, ``shift_factor``.

    z = mean + std * eps (eps from a generator seeded with ``seed``) for the centre crop of
    every image; statistics over all images, positions and (for the global ones) channels,
    accumulated in float64, population std. ``scaling_factor`` = 1 / global std, which gives
    the latents of this data unit variance (Rombach et al. 2022, sec. 4.3.2 and App. D.1:
    SD 1.x's 0.18215 is this number for its VAE on its data); ``shift_factor`` = global mean,
    for models that centre the latents as (z - shift_factor) * scaling_factor (SD3, Flux).

    Args:
        vae, data, resolution, batch_size, max_images, num_workers, device, vae_config:
            as ``evaluate_vae``.
        seed: seed of the posterior noise.
    An ``AutoencoderKLFlux2`` (``model.type: kl_flux2``) normalises its latents with its own
    batch norm, so no ``scaling_factor`` applies to it: the report adds ``batch_norm``, the
    mean and std of the latents after that normalisation (near 0 and 1 when the running
    statistics fit this data), and stage 2 uses the batch norm as it is.

    Returns:
        ``num_images``, ``resolution``, ``elements_per_channel``, ``per_channel`` (``mean``,
        ``std`` lists of c floats), ``mean``, ``std`` (global), ``scaling_factor``,
        ``shift_factor``, ``seed``, ``skipped``, and the VAE's current values as
        ``config_scaling_factor`` / ``config_shift_factor`` (None when its config has
        none); for a kl_flux2 VAE also ``batch_norm`` (``mean``, ``std`` of the normalised
        latents, global).
    Raises:
        As ``evaluate_vae``.
    """
    model = vae if isinstance(vae, nn.Module) else load_vae(vae, config=vae_config)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(dev).eval()
    paths, skipped = select_images(data, resolution, max_images)
    generator = torch.Generator(dev).manual_seed(seed)
    c = model.config.latent_channels
    s1 = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    count = images = 0
    bn = latent_batch_norm(model)
    if bn is not None:  # FLUX.2: the batch norm's running statistics are the normalisation
        from latent_diffusion.pipeline import LatentNormalization

        own = LatentNormalization.from_vae(model)
        n1 = n2 = 0.0
    bar = tqdm(total=len(paths), desc="latent_stats", unit="img", disable=not progress, dynamic_ncols=True)
    for items in _loader(EvalImages(paths, resolution), batch_size, num_workers):
        bar.update(len(items))  # the encoder alone is quick; count each batch as it arrives
        skipped += [(paths[it["index"]], it["error"]) for it in items if "error" in it]
        items = [it for it in items if "image" in it]
        if not items:
            continue
        x = torch.stack([it["image"] for it in items]).to(dev)  # (B, 3, R, R) in [-1, 1]
        z = model.encode(x).latent_dist.sample(generator=generator).double().cpu()  # (B, c, h, w)
        s1 += z.sum((0, 2, 3))
        s2 += (z**2).sum((0, 2, 3))
        if bn is not None:
            zn = own.normalize(z)
            n1, n2 = n1 + float(zn.sum()), n2 + float((zn**2).sum())
        count += z.shape[0] * z.shape[2] * z.shape[3]
        images += len(items)
    bar.close()
    if not images:
        raise ValueError(f"none of the {len(paths)} images in {data} could be decoded: {skipped[:3]}")
    mean_c = s1 / count
    std_c = (s2 / count - mean_c**2).clamp_min(0).sqrt()
    mean = float(s1.sum() / (count * c))
    std = math.sqrt(max(float(s2.sum() / (count * c)) - mean**2, 0.0))
    return {
        "num_images": images, "resolution": resolution, "elements_per_channel": count,
        "what": f"posterior samples z = mean + std * eps (seed {seed}), before any scaling",
        "per_channel": {"mean": mean_c.tolist(), "std": std_c.tolist()},
        "mean": mean, "std": std, "scaling_factor": 1.0 / std, "shift_factor": mean,
        "config_scaling_factor": model.config.get("scaling_factor"), "config_shift_factor": model.config.get("shift_factor"),
        "seed": seed, "skipped": [[str(p), r] for p, r in skipped],
        **({"batch_norm": {"mean": n1 / (count * c), "std": math.sqrt(max(n2 / (count * c) - (n1 / (count * c)) ** 2, 0.0)),
                           "what": "the same samples after the VAE's own batch-norm normalisation (FLUX.2), which "
                                   "stage 2 uses instead of a scaling_factor"}} if bn is not None else {}),
    }


def write_config_with_latent_stats(
    vae: AutoencoderKL, stats: dict[str, Any], path: PathLike, shift: bool = False
) -> Path:
    """Write a copy of the VAE's ``config.json`` with the measured ``scaling_factor``.

    Args:
        vae: the model the statistics were measured on (its config is copied).
        stats: what ``latent_statistics`` returned.
        path: a ``.json`` file, or a folder to hold ``config.json``; must not exist yet
            (the VAE's own config is never overwritten by accident).
        shift: also write ``shift_factor`` = the measured mean; otherwise it keeps the
            VAE's value.
    Returns:
        The file written (atomically). Put it beside a copy of the weights to use it.
    Raises:
        FileExistsError: if the file exists.
    """
    target = Path(path)
    if target.suffix.lower() != ".json":
        target = target / "config.json"
    if target.exists():
        raise FileExistsError(f"{target} exists; choose another --write-config path or delete it first")
    config = json.loads(vae.to_json_string())
    config.pop("_name_or_path", None)
    config["scaling_factor"] = stats["scaling_factor"]
    if shift:
        config["shift_factor"] = stats["shift_factor"]
    write_atomic(target, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return target
