"""Diffusability: how easily a diffusion model learns an autoencoder's latents.

Reconstruction (PSNR, SSIM, LPIPS, rFID) says what a VAE keeps of an image; it does not
say whether a diffusion model can learn the distribution of its latents. Since 2024 that
second half has been the field's main lever (EQ-VAE, Kouzelis et al. 2025; Skorokhodov
et al. 2025, "Improving the Diffusability of Autoencoders"; VA-VAE; REPA-E). This module
measures it for any set of ``AutoencoderKL`` on the same images, with the same small
stage-2 model, seed and budget:

1. ``prepare_probe_images``: the crops every VAE is judged on (a folder, or ``"demo"``:
   the tiles of the photos scikit-image ships), written once as 8-bit PNGs, split BY
   SOURCE PHOTO into a training part and a fixed held-out part (no photo on both sides).
2. For each VAE (``probe_vae``): both parts are encoded into latent caches by
   ``latent_diffusion.encode.encode_latents`` (posterior means are what is used); the
   latents are standardised PER CHANNEL with that VAE's own measured means and stds over
   its training latents (``data.latent_normalization: per_channel``, as LightningDiT
   does: every VAE is judged at zero mean and unit variance in every channel, so channel
   offsets cannot lower the score; ``global`` is the older, gameable alternative); then ``probe_latents`` trains the probe U-Net with the stage-2 loop itself
   (``latent_diffusion.train.main`` with ``configs/latent_diffusion/probe.yaml``,
   ``data.sample_posterior=false``, ``data.val_latents`` = the held-out cache, no sample
   grids) and reads its held-out curve from ``metrics.jsonl``: ``val/loss``, the
   epsilon MSE on held-out latents at ``VAL_TIMESTEPS`` evenly spaced t with fixed
   noise, every ``train.validation_steps``. Reported: the curve, its final value, and
   its area (the trapezoidal integral over steps divided by the steps: the mean held-out
   loss over the run, which also rewards learning early). Beside it, the i.i.d.
   reference (``iid_gaussian_loss``: the epsilon-MSE of the best predictor that knows
   only each channel's mean and variance) and the probe's ratio to it: near 1 means the
   U-Net found no structure.
3. The latents' radial DCT power spectrum and their energy share above half the Nyquist
   frequency (``latent_diffusion.spectrum``), and per-channel mean and std.
4. ``interpolation_check``: training-free, decodes of latent midpoints between each
   held-out crop and its nearest training crop, scored against the held-out crops with
   the sliced Wasserstein distance (``latent_diffusion.swd``).
5. ``diffusability_report``: also the reconstruction metrics of every VAE on the same
   crops (``autoencoderkl.evaluate.evaluate_vae``); ``report.json`` with all of it, one
   PNG with the probe curves and the spectra overlaid, and a table (``format_table``).

A lower probe loss means the latents are easier to denoise from what the U-Net learnt in
its budget. It is a relative score: only VAEs probed together (same images, resolution,
config, steps, seed) compare. It does not predict sample quality on its own: a VAE that
throws the image away (a constant latent) is perfectly learnable, so read it beside
reconstruction (see ``docs/diffusability.md``).
"""

from __future__ import annotations

import logging
import math
import platform
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from autoencoderkl.atomic import write_atomic
from autoencoderkl.config import find_config
from autoencoderkl.data import DEMO_VAL, UnreadableImageWarning
from autoencoderkl.data import png_bytes
from autoencoderkl.evaluate import UNAVAILABLE, evaluate_vae, write_json
from autoencoderkl.metrics import to_uint8_range
from autoencoderkl.model import load_vae, vae_weights_sha256
from autoencoderkl.data import evenly_spaced
from autoencoderkl.visualize import chart, hstack, read_metrics, to_pil

from .config import load_config
from .encode import PathLike, Source, encode_batch, list_sources, load_source
from .latents import load_index, map_shard
from .pipeline import LatentNormalization
from .model import build_noise_scheduler
from .spectrum import HALF_NYQUIST, latent_spectrum
from .swd import swd
from .train import main as train_ldm
from .train import validation_timesteps

logger = logging.getLogger(__name__)

# The bundled probe config (configs/latent_diffusion/probe.yaml; lat/configs in a wheel).
PROBE_CONFIG = find_config("probe", "latent_diffusion")
# --probe-backbone -> its bundled config: the U-Net probe, or the same probe on a small DiT.
PROBE_CONFIGS = {"unet": PROBE_CONFIG, "dit": find_config("probe-dit", "latent_diffusion")}
REPORT_FORMAT_VERSION = 1
TRAIN, HELDOUT = "train", "heldout"  # the two folders of probe images


# ---- 1. the images ----------------------------------------------------------------------


def source_group(source: Source, root: Path | None, pattern: re.Pattern | None) -> str:
    """The source photo an image was cut from: images of one group never straddle the split.

    A demo tile: its photo. A folder image: the file itself, or with ``pattern`` the
    first match of the regular expression in its path relative to ``root`` (its first
    group if it has one), e.g. ``^[^/]+`` for one subfolder per photo or ``(.+)_\\d+\\.png$``
    for ``photo_003.png`` tiles.

    Raises:
        ValueError: the pattern matches nothing in that path.
    """
    if source.resize is not None or pattern is None:
        return str(source.path)
    rel = source.path.relative_to(root).as_posix() if root is not None else source.path.name
    match = pattern.search(rel)
    if match is None:
        raise ValueError(f"--source-pattern {pattern.pattern!r} matches nothing in {rel!r}: every image must name the "
                         f"photo it was cut from")
    return match.group(1) if pattern.groups else match.group(0)


def prepare_probe_images(
    data: PathLike, resolution: int, out: PathLike, heldout_fraction: float = 0.2, max_images: int | None = None,
    source_pattern: str | None = None,
) -> dict[str, Any]:
    """Write the crops every VAE is judged on: ``out/train/NNNNN.png``, ``out/heldout/NNNNN.png``.

    The sources are ``latent_diffusion.encode.list_sources(data, resolution)``: every image
    of a folder (recursively, sorted; centre crop of the shorter side resized to
    ``resolution``), or with ``data="demo"`` the tiles of the demo photos. They are decoded
    once here (``load_source``: exact 8-bit pixels, so the PNGs are lossless) so every VAE
    sees identical pixels. NNNNN is the source position.

    The split is by source photo (``source_group``), so that no photo has crops on both
    sides: with ``data="demo"`` the held-out part is every tile of the demo's two
    validation photos (``autoencoderkl.data.DEMO_VAL``, which the demo VAEs never trained
    on; ``heldout_fraction`` is not used); otherwise ``round(heldout_fraction * G)`` of the
    G photos (at least 1, at most G - 1), evenly spaced in order of first appearance.

    Args:
        data: an image folder, or ``"demo"``.
        resolution: crop side in pixels.
        out: a new or empty folder.
        heldout_fraction: the held-out share of the source photos, in (0, 1).
        max_images: use at most this many sources, evenly spaced.
        source_pattern: a regular expression naming each folder image's source photo
            (``source_group``); None: every file is its own photo.
    Returns:
        ``num_train``, ``num_heldout`` (crops), ``num_train_sources``,
        ``num_heldout_sources`` (photos), ``heldout_sources`` (their names), ``split``
        (how it was made), ``skipped`` ([[source, reason]]: unreadable files, left out
        with a warning), ``sources`` (the crops used, in order).
    Raises:
        FileNotFoundError: if ``data`` is not a folder (nor ``"demo"``).
        ValueError: on a bad fraction, count or pattern, fewer than 2 source photos, or
            a side without a readable image.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"the held-out fraction must lie in (0, 1), got {heldout_fraction}")
    if max_images is not None and max_images < 2:
        raise ValueError(f"max_images must be >= 2 (a training and a held-out part), got {max_images}")
    sources, _, _ = list_sources(data, resolution)
    if max_images is not None:
        sources = evenly_spaced(sources, max_images)
    demo = str(data) == "demo"
    root = None if demo else Path(data).resolve()
    pattern = re.compile(source_pattern) if source_pattern else None
    groups = [source_group(s, root, pattern) for s in sources]
    order = list(dict.fromkeys(groups))  # photos in order of first appearance
    if len(order) < 2:
        raise ValueError(f"{data}: all {len(sources)} images come from one source photo"
                         f"{f' (--source-pattern {source_pattern!r})' if source_pattern else ''}; the probe needs "
                         f"at least two, one on each side of the split")
    if demo:
        held_groups = {g for g in order if Path(g).name in DEMO_VAL}
        split = f"by photo: the held-out part is every tile of the demo's validation photos {list(DEMO_VAL)}"
    else:
        count = min(max(1, round(heldout_fraction * len(order))), len(order) - 1)
        held_groups = set(evenly_spaced(order, count))
        split = (f"by source photo ({'--source-pattern ' + repr(source_pattern) if source_pattern else 'each file its own'}"
                 f"): {count} of {len(order)} photos, evenly spaced, held out whole")
    out = Path(out)
    counts, skipped = {TRAIN: 0, HELDOUT: 0}, []
    for i, (source, group) in enumerate(zip(sources, groups)):
        try:
            image = load_source(source, resolution)  # (3, R, R) in [-1, 1], 8-bit levels
        except OSError as exc:
            warnings.warn(f"skipping {source.name()}: {exc}", UnreadableImageWarning, stacklevel=2)
            skipped.append([source.name(), str(exc)])
            continue
        part = HELDOUT if group in held_groups else TRAIN
        (out / part).mkdir(parents=True, exist_ok=True)
        to_pil(image[None])[0].save(out / part / f"{i:05d}.png")
        counts[part] += 1
    if min(counts.values()) < 1:
        raise ValueError(f"{data}: {counts[TRAIN]} training and {counts[HELDOUT]} held-out images could be read at "
                         f"{resolution} px ({len(skipped)} skipped); the probe needs at least one of each")
    return {"num_train": counts[TRAIN], "num_heldout": counts[HELDOUT],
            "num_train_sources": len(order) - len(held_groups), "num_heldout_sources": len(held_groups),
            "heldout_sources": [g for g in order if g in held_groups], "split": split, "skipped": skipped,
            "sources": [s.name() for s in sources]}


# ---- 2. one VAE ---------------------------------------------------------------------------


def cache_means(root: PathLike) -> Iterator[Tensor]:
    """The posterior means of a latent cache, shard by shard: (n, c, h, w) float32 each."""
    root = Path(root)
    for shard in load_index(root)["shards"]:
        yield map_shard(root / shard["file"])["mean"].float()


def cache_statistics(root: PathLike) -> dict[str, Any]:
    """Per-channel and global mean and std (population) of a cache's posterior means.

    Returns:
        ``per_channel_mean``, ``per_channel_std`` (c floats), ``global_mean``,
        ``global_std``, ``num_latents``, ``shape`` [c, h, w]; accumulated in float64.
    """
    s1 = s2 = None
    n = count = 0
    for z in cache_means(root):
        z = z.double()
        s1 = z.sum((0, 2, 3)) if s1 is None else s1 + z.sum((0, 2, 3))
        s2 = (z**2).sum((0, 2, 3)) if s2 is None else s2 + (z**2).sum((0, 2, 3))
        n += z.shape[0]
        count += z.shape[0] * z.shape[2] * z.shape[3]
        shape = list(z.shape[1:])
    mean_c = s1 / count
    std_c = (s2 / count - mean_c**2).clamp_min(0).sqrt()
    mean = float(s1.sum() / (count * len(s1)))
    std = math.sqrt(max(float(s2.sum() / (count * len(s1))) - mean**2, 0.0))
    return {"per_channel_mean": mean_c.tolist(), "per_channel_std": std_c.tolist(), "global_mean": mean,
            "global_std": std, "num_latents": n, "shape": shape}


def iid_gaussian_loss(per_channel_var: Sequence[float], alphas_cumprod: Tensor) -> float:
    """The probe's i.i.d. reference: the epsilon-MSE of the best predictor that knows only
    each channel's mean and variance.

    Derivation. Model every latent value of channel c as an independent draw
    x_0 ~ N(mu_c, v_c) (mean and variance of the normalised training latents), and
    x_t = sqrt(a) x_0 + sqrt(1 - a) eps with eps ~ N(0, 1) and a = alpha_bar_t. Then
    (x_t, eps) are jointly Gaussian with Var(x_t) = a v_c + 1 - a and
    Cov(x_t, eps) = sqrt(1 - a), so the best predictor of eps from x_t (the conditional
    mean, which is linear here) is

        eps_hat = sqrt(1 - a) (x_t - sqrt(a) mu_c) / (a v_c + 1 - a)

    and its MSE is 1 - (1 - a) / (a v_c + 1 - a) = a v_c / (a v_c + 1 - a). The means
    mu_c set the predictor but not its error. The reference is that MSE averaged over the
    channels and the probe's timesteps (``validation_timesteps``: the ones ``val/loss``
    uses), i.e. what the probe would score had it learnt each channel's mean and variance
    and nothing about how values relate across cells or channels. Unit-variance white
    latents give mean(a). A probe loss below it is structure learnt; the ratio
    probe / reference is the report's ``final_relative`` and ``area_relative``.

    What the ratio does not remove: with the global normalisation, channels whose means
    differ have within-channel variances below 1, which lowers this reference and the
    probe loss alike but not in proportion; per-channel standardisation of the latents
    (``data.latent_normalization: per_channel``) removes the cause.

    Args:
        per_channel_var: v_c of the normalised latents (c floats).
        alphas_cumprod: (K,) alpha_bar at the probe's timesteps.
    Returns:
        The mean over channels and timesteps of a v_c / (a v_c + 1 - a), float64 arithmetic.
    """
    a = alphas_cumprod.double()[:, None]
    v = torch.tensor(list(per_channel_var), dtype=torch.float64)[None, :]
    return float((a * v / (a * v + 1 - a)).mean())


def probe_latents(
    train_latents: PathLike,
    heldout_latents: PathLike,
    vae: PathLike,
    out_dir: PathLike,
    probe_config: PathLike = PROBE_CONFIG,
    steps: int | None = None,
    seed: int = 0,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Train the probe U-Net on one latent cache and follow its loss on a held-out one.

    The normalisation is the probe config's ``data.latent_normalization``, measured on the
    training cache's posterior means (the z the probe trains on,
    ``data.sample_posterior=false``) and applied to both caches. ``per_channel`` (the
    bundled probes' setting, LightningDiT's): each channel to mean 0 and std 1, so that
    channel offsets and relative channel scales, which any stage-2 model would remove the
    same way, do not change the score (with one global mean and std, channels whose means
    differ have within-channel variance below 1 and a lower loss for no structural reason).
    ``global``: ``shift_factor`` = the mean and ``scaling_factor`` = 1 / the std over all
    channels (SD's convention; the probe before December 2026). The run is
    ``latent_diffusion.train.main`` on ``probe_config`` + ``overrides`` + those settings,
    with ``data.val_latents`` = the held-out cache and the sample grid off.

    Args:
        train_latents, heldout_latents: latent caches of the same VAE (``encode_latents``).
        vae: the diffusers folder that made them (checked against their hash).
        out_dir: the probe run's output dir (replaced if it holds one).
        probe_config: the stage-2 YAML (``configs/latent_diffusion/probe.yaml``).
        steps: ``train.max_steps``; None keeps the config's.
        seed: ``train.seed`` (U-Net init, batches, noise; the fixed validation noise).
        overrides: more ``key=value`` settings for the probe config.
    Returns:
        ``latents`` (``cache_statistics`` of the training cache, plus ``num_heldout``),
        ``normalisation``, ``spectrum`` (``latent_spectrum`` of the training latents),
        ``probe``: ``steps`` and ``loss`` (the held-out curve), ``final``, ``area``,
        ``train_loss`` (the last logged training loss), ``iid_gaussian_loss`` (None for
        other targets than epsilon), ``final_relative`` and ``area_relative`` (final
        and area / ``iid_gaussian_loss``: 1 = nothing learnt beyond each channel's mean
        and variance), ``timesteps``, ``seconds``.
    Raises:
        ValueError: from the config (a bad override) or the caches (another VAE).
    """
    stats = cache_statistics(train_latents)
    if not stats["global_std"] > 0:
        raise ValueError(f"the latents in {train_latents} are constant (std 0): nothing to normalise or learn")
    settings = [f"data.latents={train_latents}", f"data.val_latents={heldout_latents}", f"data.vae={vae}",
                "data.sample_posterior=false", f"train.seed={seed}", "train.num_validation_samples=0"]
    if steps is not None:
        settings.append(f"train.max_steps={steps}")
    kind = load_config(probe_config, [*overrides, *settings]).data.latent_normalization
    own = load_index(train_latents)["vae"].get("latent_normalization")
    if own is not None:  # FLUX.2's batch norm: the VAE's own normalisation, what its stage 2 will see
        normalisation = {**own, "what": "the VAE's own batch-norm statistics (FLUX.2): each latent cell minus the "
                                        "running mean of its patchified channel, over sqrt(running var + eps)"}
        z = LatentNormalization.from_dict(own).normalize(torch.cat(list(cache_means(train_latents))).double())
        variances = z.transpose(0, 1).flatten(1).var(dim=1, unbiased=False).tolist()  # per channel, as normalised
    elif kind == "per_channel":  # each channel to mean 0, std 1 over the training latents (stage 2 measures them)
        if not all(s > 0 for s in stats["per_channel_std"]):
            raise ValueError(f"a channel of the latents in {train_latents} is constant (std 0): per-channel "
                             f"normalisation cannot divide by it; probe with data.latent_normalization=global")
        normalisation = {"kind": "per_channel", "latents_mean": stats["per_channel_mean"],
                         "latents_std": stats["per_channel_std"],
                         "what": "latents[:, c] = (mean[:, c] - latents_mean[c]) / latents_std[c], both measured on "
                                 "this VAE's training latents: every channel mean 0, std 1"}
        variances = [1.0] * len(stats["per_channel_std"])
        settings.append("data.scaling_factor=1.0")
    else:
        shift, scale = stats["global_mean"], 1.0 / stats["global_std"]
        normalisation = {"kind": "global", "shift_factor": shift, "scaling_factor": scale,
                         "what": "latents = (mean - shift_factor) * scaling_factor, both measured on this VAE's "
                                 "training latents: global mean 0, global std 1"}
        variances = [(s * scale) ** 2 for s in stats["per_channel_std"]]
        settings += [f"data.scaling_factor={scale!r}", f"data.shift_factor={shift!r}"]
    cfg = load_config(probe_config, [*overrides, *settings])
    t0 = time.perf_counter()
    train_ldm(cfg, out_dir, overwrite=True)
    seconds = time.perf_counter() - t0
    series = read_metrics(Path(out_dir) / "metrics.jsonl")
    curve_steps, curve = series["val/loss"]
    area = sum((b - a) * (la + lb) / 2 for a, b, la, lb in zip(curve_steps, curve_steps[1:], curve, curve[1:]))
    area /= max(curve_steps[-1] - curve_steps[0], 1)  # trapezoidal integral / steps: the mean over the run
    noise = build_noise_scheduler(cfg.noise)
    t = validation_timesteps(cfg.noise.num_train_timesteps)
    iid = iid_gaussian_loss(variances, noise.alphas_cumprod[t]) if cfg.noise.prediction_type == "epsilon" else None
    return {
        "latents": {**stats, "num_heldout": load_index(heldout_latents)["num_latents"],
                    "what": "posterior means of the training images, before normalisation"},
        "normalisation": normalisation,
        "spectrum": latent_spectrum(cache_means(train_latents)),
        "probe": {"steps": curve_steps, "loss": curve, "final": curve[-1], "area": area,
                  "train_loss": series["loss"][1][-1] if "loss" in series else None,
                  "iid_gaussian_loss": iid, "final_relative": curve[-1] / iid if iid else None,
                  "area_relative": area / iid if iid else None, "timesteps": t.tolist(), "seconds": round(seconds, 2)},
    }


def probe_vae(
    vae: PathLike,
    images: PathLike,
    work_dir: PathLike,
    resolution: int,
    probe_config: PathLike = PROBE_CONFIG,
    steps: int | None = None,
    seed: int = 0,
    overrides: Sequence[str] = (),
    batch_size: int = 32,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Encode the probe images (``prepare_probe_images``) with one VAE and probe its latents.

    Args:
        vae: a diffusers ``AutoencoderKL`` folder (``probe_latents`` needs a folder).
        images: the folder holding ``train/`` and ``heldout/``.
        work_dir: where the two caches and the probe run go.
        resolution, probe_config, steps, seed, overrides: as ``probe_latents`` and the images.
        batch_size, num_workers: of the encoding.
    Returns:
        What ``probe_latents`` returns, plus ``seconds_encode``.
    """
    from .encode import encode_latents

    work_dir = Path(work_dir)
    t0 = time.perf_counter()
    for part in (TRAIN, HELDOUT):
        encode_latents(vae, Path(images) / part, work_dir / f"latents-{part}", resolution=resolution,
                       batch_size=batch_size, num_workers=num_workers)
    encoded = time.perf_counter() - t0
    result = probe_latents(work_dir / f"latents-{TRAIN}", work_dir / f"latents-{HELDOUT}", vae, work_dir / "run",
                           probe_config, steps, seed, overrides)
    result["probe"]["seconds_encode"] = round(encoded, 2)
    return result


# ---- 2b. the interpolation check -----------------------------------------------------------


def slerp(z1: Tensor, z2: Tensor, t: float, eps: float = 1e-7) -> Tensor:
    """Spherical interpolation of each pair of latents, flattened (tongdaxu's ``evalvae.slerp``).

    With theta the angle between z1 and z2 (flattened, per row): sin((1 - t) theta) /
    sin(theta) z1 + sin(t theta) / sin(theta) z2; linear where sin(theta) < 1e-6.

    Args:
        z1, z2: (B, c, h, w) float latents.
        t: 0 gives z1, 1 gives z2.
    Returns:
        (B, c, h, w) in z1's dtype.
    """
    a, b = z1.flatten(1), z2.flatten(1)
    cos = (F.normalize(a, dim=1, eps=eps) * F.normalize(b, dim=1, eps=eps)).sum(1).clamp(-1.0, 1.0)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) / (sin + eps))[:, None] * a + (torch.sin(t * theta) / (sin + eps))[:, None] * b
    small = sin < 1e-6
    out[small] = (1 - t) * a[small] + t * b[small]
    return out.reshape_as(z1)


def _read_pngs(folder: Path) -> Tensor:
    """The probe's PNG crops of one part, in name order: (N, 3, R, R) uint8."""
    return torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                        for p in sorted(folder.glob("*.png"))])


@torch.no_grad()
def interpolation_check(
    vae: PathLike, images: PathLike, seed: int = 0, batch_size: int = 32, device: str | None = None,
    fid: str = "off", inception_weights: PathLike | None = None,
) -> dict[str, Any]:
    """Decode latent midpoints between held-out images and their nearest training image; score the decodes.

    The idea of iFID ("Making Reconstruction FID Predictive of Diffusion Generation FID",
    arXiv 2603.05630; code tongdaxu/Making-rFID-Predictive-of-Diffusion-gFID ``evalvae.py``):
    a diffusion model generates latents between those of real images, so how the decoder
    renders such in-between latents predicts what samples look like. For each held-out
    crop, its posterior mean z is paired with the training crop whose posterior mean has
    the highest cosine similarity (flattened, raw latents), the spherical midpoint
    ``slerp(z, z_nn, 0.5)`` is decoded, and the decodes are compared with the held-out
    crops by ``latent_diffusion.swd.swd`` (and Frechet Inception distance when its
    weights are here). ``reconstruction``: the same for decode(z) itself, the rFID-like
    companion. No training: a second, training-free column beside the probe.

    Deviations from ``evalvae.py``: the nearest neighbour is the top-1 by cosine (the
    reference draws among the top 10 by a softmax of their MSE, which usually picks the
    same one), posterior means instead of samples, and SWD instead of FID (FID needs
    thousands of images and Inception weights; with a few hundred crops it is mostly bias).

    Args:
        vae: the diffusers folder (the probe's copy).
        images: the probe images folder (``train/`` and ``heldout/``).
        seed: of the SWD's patches and directions.
        batch_size: images per VAE forward.
        device: None: CUDA when available.
        fid: ``"auto"`` adds FID when torch-fidelity's Inception weights are here; ``"off"``.
        inception_weights: that weights file.
    Returns:
        ``swd`` and ``swd_reconstruction`` (``swd`` results: ``levels``, ``average``, ...),
        ``fid`` and ``fid_reconstruction`` (floats, or "unavailable"), ``fid_note``,
        ``num_heldout``, ``num_train``, ``neighbour_cosine`` (mean, min), ``what``.
    """
    from .evaluate import build_inception, extract_features, frechet_distance

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_vae(vae).to(dev).eval()
    images = Path(images)
    held, train = _read_pngs(images / HELDOUT), _read_pngs(images / TRAIN)

    def means(x: Tensor) -> Tensor:
        return torch.cat([encode_batch(model, (b.to(dev).float() / 127.5 - 1))[0].cpu()
                          for b in x.split(batch_size)])  # (N, c, h, w) float32

    def decode(z: Tensor) -> Tensor:
        return torch.cat([to_uint8_range(model.decode(b.to(dev)).sample).to(torch.uint8).cpu()
                          for b in z.split(batch_size)])

    z_held, z_train = means(held), means(train)
    cos = F.normalize(z_held.flatten(1), dim=1) @ F.normalize(z_train.flatten(1), dim=1).T  # (N_held, N_train)
    best, nn = cos.max(dim=1)
    midpoints, recons = decode(slerp(z_held, z_train[nn], 0.5)), decode(z_held)
    out = {"swd": swd(held, midpoints, seed=seed), "swd_reconstruction": swd(held, recons, seed=seed),
           "fid": UNAVAILABLE, "fid_reconstruction": UNAVAILABLE, "num_heldout": len(held), "num_train": len(train),
           "neighbour_cosine": {"mean": float(best.mean()), "min": float(best.min())},
           "what": ("decodes of slerp(z, z_nn, 0.5) for each held-out crop's posterior mean z and its nearest training "
                    "latent by cosine, scored against the held-out crops (SWD x 1e3 on Laplacian-pyramid patches; "
                    "lower is better); swd_reconstruction: the same for decode(z)")}
    net, out["fid_note"] = build_inception(fid, inception_weights) if fid != "off" else (None, "not computed (fid=off)")
    if net is not None:
        net = net.to(dev)
        real, mid, rec = (extract_features(net, x, batch_size, dev, "inception", False) for x in (held, midpoints, recons))
        out["fid"], out["fid_reconstruction"] = frechet_distance(mid, real), frechet_distance(rec, real)
        out["fid_note"] += f"; {len(held)} images per set: FID is biased upward, compare only at equal counts"
    return out


# ---- 3. several VAEs, one report -----------------------------------------------------------


def vae_names(paths: Sequence[PathLike]) -> list[str]:
    """Short, distinct labels: the folder name (its parent's for a ``vae/`` folder) or file stem."""
    names = []
    for p in map(Path, paths):
        name = p.stem if p.is_file() else (p.resolve().parent.name if p.name == "vae" else p.resolve().name)
        names.append(name if name not in names else f"{name}-{len(names)}")
    return names


def diffusability_report(
    vaes: Sequence[PathLike],
    data: PathLike,
    out: PathLike = "report.json",
    resolution: int = 256,
    probe_config: PathLike = PROBE_CONFIG,
    probe_steps: int | None = None,
    seed: int = 0,
    heldout_fraction: float = 0.2,
    max_images: int | None = None,
    vae_config: PathLike | None = None,
    overrides: Sequence[str] = (),
    work_dir: PathLike | None = None,
    batch_size: int = 4,
    num_workers: int = 1,
    device: str | None = None,
    lpips: str = "auto",
    fid: str = "auto",
    inception_weights: PathLike | None = None,
    progress: bool = True,
    source_pattern: str | None = None,
) -> dict[str, Any]:
    """Reconstruction and diffusability of several VAEs on the same images; report, PNG, table.

    For every VAE, in order: the reconstruction metrics of ``evaluate_vae`` on all the
    probe crops (its report, per-image CSV and worst-8 PNG are written beside ``out`` as
    ``<stem>_<k>_<name>.*``), then ``probe_vae`` with the same images, config, steps and
    seed, then the training-free ``interpolation_check``. Single files and training dirs are first saved as diffusers folders in the work
    dir (same weights, same hash), since the latent cache and the stage-2 loop load a
    folder.

    Files written (atomically): ``out`` (JSON: ``data``, ``probe`` settings, one entry per
    VAE under ``vaes`` with ``reconstruction``, ``latents``, ``normalisation``,
    ``spectrum``, ``probe`` and ``seconds``, the ``table``); ``<stem>.png`` (probe curves
    and latent spectra overlaid).

    Args:
        vaes: paths ``load_vae`` accepts (diffusers folder, training output dir, single file).
        data: an image folder, or ``"demo"`` (see ``prepare_probe_images``).
        out: the report path (``.json``).
        resolution: crop side in pixels (a multiple of every VAE's factor f).
        probe_config, probe_steps, seed, overrides: the probe (``probe_latents``).
        heldout_fraction, max_images, source_pattern: the images and their split by
            source photo (``prepare_probe_images``).
        vae_config: a ``config.json`` for single-file VAEs (``load_vae``'s ``config``).
        work_dir: keep the crops, caches and probe runs there; None: a temporary folder
            beside ``out``, removed at the end.
        batch_size, num_workers, device, lpips, fid, inception_weights, progress: of the
            reconstruction evaluation (``evaluate_vae``); ``num_workers`` also decodes
            the images for the latent caches; ``fid`` and ``inception_weights`` also
            the interpolation check's FID.
    Returns:
        The report (what ``out`` holds).
    Raises:
        FileNotFoundError, ValueError: a missing VAE or folder, too few images, a bad
            option or probe config.
    """
    if not vaes:
        raise ValueError("give at least one VAE to probe")
    t_start = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = vae_names(vaes)
    temporary = work_dir is None
    work = Path(tempfile.mkdtemp(prefix=f".{out.stem}-probe-", dir=out.parent)) if temporary else Path(work_dir)
    try:
        images = prepare_probe_images(data, resolution, work / "images", heldout_fraction, max_images, source_pattern)
        entries = []
        for k, (path, name) in enumerate(zip(vaes, names)):
            logger.info("diffusability %d/%d: %s", k + 1, len(vaes), path)
            t0 = time.perf_counter()
            model = load_vae(path, config=vae_config if Path(path).is_file() else None)
            folder = work / f"vae-{k}"
            model.save_pretrained(folder, safe_serialization=True)  # a folder the cache and stage 2 load
            recon = evaluate_vae(model, work / "images", out=out.with_name(f"{out.stem}_{k}_{name}.json"),
                                 resolution=resolution, batch_size=batch_size, num_workers=num_workers,
                                 device=device, lpips=lpips, fid=fid, inception_weights=inception_weights,
                                 progress=progress)
            t1 = time.perf_counter()
            result = probe_vae(folder, work / "images", work / f"probe-{k}", resolution, probe_config, probe_steps,
                               seed, overrides, num_workers=num_workers)
            t2 = time.perf_counter()
            interpolation = interpolation_check(folder, work / "images", seed=seed, device=device, fid=fid,
                                                inception_weights=inception_weights)
            entries.append({
                "name": name, "path": str(path), "weights_sha256": vae_weights_sha256(model),
                "config": recon["vae"]["config"],
                "reconstruction": {key: recon[key] for key in ("psnr", "ssim", "lpips", "rfid", "kl", "notes", "files")},
                **result, "interpolation": interpolation,
                "seconds": {"reconstruction": round(t1 - t0, 2), "encode": result["probe"]["seconds_encode"],
                            "probe": result["probe"]["seconds"], "interpolation": round(time.perf_counter() - t2, 2),
                            "total": round(time.perf_counter() - t0, 2)},
            })
            entries[-1]["reconstruction"]["report"] = str(out.with_name(f"{out.stem}_{k}_{name}.json"))
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    cfg = load_config(probe_config, list(overrides))
    png = out.with_name(f"{out.stem}.png")
    report = {
        "format_version": REPORT_FORMAT_VERSION,
        "what": (f"diffusability probe: a fixed small stage-2 {cfg.model.type} trained on each VAE's normalised "
                 "latents; lower held-out loss (and final/iid) = easier for a diffusion model; beside it a training-free "
                 "interpolation check. Compare only VAEs probed together."),
        "data": {"source": str(data), "resolution": resolution, "heldout_fraction": heldout_fraction,
                 "max_images": max_images, "source_pattern": source_pattern,
                 **{k: v for k, v in images.items() if k != "sources"}},
        "probe": {"config_file": str(probe_config), "overrides": list(overrides),
                  "steps": probe_steps if probe_steps is not None else cfg.train.max_steps, "seed": seed,
                  "validation_steps": cfg.train.validation_steps, "num_val_latents": cfg.data.num_val_latents,
                  "normalisation": (f"{cfg.data.latent_normalization}: each VAE's own "
                                    + ("per-channel means and stds" if cfg.data.latent_normalization == "per_channel"
                                       else "mean and std over all channels") + " over its training latents"),
                  "area": "trapezoidal area under the held-out curve / steps (the mean held-out loss over the run)",
                  "relative": ("final and area / iid_gaussian_loss: the epsilon-MSE of the best predictor that knows "
                               "only each channel's mean and variance, on the same timesteps (1 = no structure learnt)"),
                  "high_frequency": (f"2D DCT-II energy share above {HALF_NYQUIST} cycles per latent cell (half the "
                                     f"Nyquist frequency)"),
                  "interpolation": ("training-free: SWD x 1e3 between held-out crops and decodes of slerp midpoints "
                                    "to each one's nearest training latent (lower is better)")},
        "vaes": entries,
        "table": [table_row(e) for e in entries],
        "files": {"report": str(out), "png": str(png)},
        "run": {"seconds": round(time.perf_counter() - t_start, 2), "torch": torch.__version__,
                "python": platform.python_version()},
    }
    write_atomic(png, png_bytes(plot_report(report)))
    write_json(out, report)
    return report


def table_row(entry: dict[str, Any]) -> dict[str, Any]:
    """One VAE's line of the summary table."""
    rec, probe, interp = entry["reconstruction"], entry["probe"], entry["interpolation"]
    return {"name": entry["name"], "psnr": rec["psnr"]["mean"], "ssim": rec["ssim"]["mean"],
            "probe_final": probe["final"], "probe_area": probe["area"], "iid_gaussian_loss": probe["iid_gaussian_loss"],
            "probe_final_relative": probe["final_relative"],
            "interpolation_swd": interp["swd"]["average"], "reconstruction_swd": interp["swd_reconstruction"]["average"],
            "high_frequency_fraction": entry["spectrum"]["high_frequency_fraction"],
            "seconds": entry["seconds"]["total"]}


def format_table(report: dict[str, Any]) -> str:
    """The report's table as aligned text, one row per VAE."""
    def f(value, spec):
        return "-" if value is None else format(value, spec)

    head = ("VAE", "PSNR dB", "SSIM", "probe final", "probe area", "iid ref", "final/iid", "interp SWD", "rec SWD",
            "HF frac", "time s")
    rows = [(r["name"], f"{r['psnr']:.2f}", f"{r['ssim']:.4f}", f"{r['probe_final']:.4f}", f"{r['probe_area']:.4f}",
             f(r["iid_gaussian_loss"], ".4f"), f(r["probe_final_relative"], ".3f"), f"{r['interpolation_swd']:.1f}",
             f"{r['reconstruction_swd']:.1f}", f"{r['high_frequency_fraction']:.3f}", f"{r['seconds']:.0f}")
            for r in report["table"]]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in [head, *rows])


def plot_report(report: dict[str, Any]) -> Image.Image:
    """Two panels: the held-out probe curves from the first point after step 0 (dashed: each
    VAE's i.i.d. reference) and the latents' radial power spectra relative to white noise
    (dotted: half the Nyquist frequency)."""
    vaes = report["vaes"]
    # From the first point after step 0: the untrained U-Net scores ~1 for every VAE and
    # would squash the part of the curves that differs.
    skip = 1 if all(len(v["probe"]["steps"]) > 2 for v in vaes) else 0
    curves = [(v["name"], v["probe"]["steps"][skip:], v["probe"]["loss"][skip:]) for v in vaes]
    refs = [(k, v["probe"]["iid_gaussian_loss"]) for k, v in enumerate(vaes) if v["probe"]["iid_gaussian_loss"]]
    left = chart("probe: held-out denoising loss (dashed: i.i.d. reference)", curves, (520, 320), x_label="step",
                 hlines=refs)
    spectra = [(f"{v['name']}  HF {v['spectrum']['high_frequency_fraction']:.2f}", v["spectrum"]["frequency"],
                v["spectrum"]["power"]) for v in vaes]
    freq = vaes[0]["spectrum"]["frequency"]
    spectra.append((f"white noise  HF {vaes[0]['spectrum']['white_noise_fraction']:.2f}", freq, [1.0] * len(freq)))
    right = chart("latent power / white noise vs cycles per cell", spectra, (520, 320), x_label="cycles/cell",
                  log_y=True, vline=HALF_NYQUIST)
    return hstack([left, right], pad=8)
