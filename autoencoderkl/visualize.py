"""Pictures of what a VAE's latent space does, and of how its training went.

Reading order of this file:

1. ``interpolate``: decode points on the line between the latents of two images (a smooth
   path of plausible images says the latent space is continuous; a cross-fade of two
   pictures says the decoder only copies local texture). Saved as a strip and a GIF.
2. ``prior_samples``: decode z ~ N(0, I), the prior the KL term pulls towards. With LDM's
   tiny KL weight (1e-6) these are mostly texture: the autoencoder is a compressor, and
   generating is left to the diffusion model (Rombach et al. 2022, sec. 3). A second row
   draws N(0, (1/scaling_factor)^2 I), the spread the data's latents actually have.
3. ``latent_channel_panel``: the c latent channels of an image shown as images (for SD's
   kl-f8 the 4 channels look like a small, oddly coloured version of the picture).
4. ``plot_curves``: the losses and validation metrics of a run's ``metrics.jsonl``.

Everything is drawn with PIL (no plotting library needed). Images are (B, 3, H, W) float
in [-1, 1] inside, 8-bit RGB PNG/GIF outside. ``inspect_vae`` makes all of them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image, ImageDraw
from torch import Tensor

from .atomic import atomic_path, write_atomic
from .data import png_bytes
from .evaluate import _font, load_eval_image
from .model import load_vae

PathLike = Union[str, os.PathLike]

# metrics.jsonl keys that are bookkeeping, not curves
SKIP_KEYS = ("step", "time")


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) float in [-1, 1] (clipped) -> B 8-bit RGB images, rounded as ``metrics.to_uint8_range``."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).cpu().numpy()]


def hstack(images: Sequence[Image.Image], pad: int = 2, bg: str = "white") -> Image.Image:
    """Images side by side (top-aligned) with ``pad`` pixels between them."""
    w = sum(im.width for im in images) + pad * (len(images) - 1)
    sheet = Image.new("RGB", (w, max(im.height for im in images)), bg)
    x = 0
    for im in images:
        sheet.paste(im, (x, 0))
        x += im.width + pad
    return sheet


def vstack(images: Sequence[Image.Image], pad: int = 2, bg: str = "white") -> Image.Image:
    """Images one under another (left-aligned) with ``pad`` pixels between them."""
    h = sum(im.height for im in images) + pad * (len(images) - 1)
    sheet = Image.new("RGB", (max(im.width for im in images), h), bg)
    y = 0
    for im in images:
        sheet.paste(im, (0, y))
        y += im.height + pad
    return sheet


def caption(image: Image.Image, text: str, height: int = 16) -> Image.Image:
    """``image`` with a line of text above it."""
    font = _font(12)
    width = max(image.width, int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font)) + 4)
    sheet = Image.new("RGB", (width, image.height + height), "white")
    ImageDraw.Draw(sheet).text((2, 1), text, fill="black", font=font)
    sheet.paste(image, (0, height))
    return sheet


@torch.no_grad()
def interpolate(vae: AutoencoderKL, a: Tensor, b: Tensor, steps: int = 8) -> Tensor:
    """Decode z_t = (1 - t) z_a + t z_b for ``steps`` values of t evenly spaced in [0, 1].

    z_a, z_b are the posterior modes of the two images. Linear, not spherical: posterior
    means are not Gaussian noise vectors, whose norms slerp preserves.

    Args:
        vae: the model (eval mode).
        a, b: (3, H, W) float in [-1, 1], H and W divisible by f.
        steps: >= 2 decodes; the first is the reconstruction of a, the last of b.
    Returns:
        (steps, 3, H, W) float32, unclamped.
    Raises:
        ValueError: if ``steps`` < 2 or the shapes differ.
    """
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    if a.shape != b.shape:
        raise ValueError(f"the two images must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    device = next(vae.parameters()).device
    z = vae.encode(torch.stack([a, b]).to(device)).latent_dist.mode()  # (2, c, h, w)
    t = torch.linspace(0, 1, steps, device=device).view(-1, 1, 1, 1)
    zt = (1 - t) * z[0] + t * z[1]  # (steps, c, h, w)
    return torch.cat([vae.decode(chunk).sample for chunk in zt.split(4)]).float()


def save_gif(frames: Sequence[Image.Image], path: PathLike, duration_ms: int = 150) -> Path:
    """An endlessly looping GIF that goes forth and back through ``frames``; written atomically."""
    seq = list(frames) + list(frames[-2:0:-1])  # ping-pong, no frame shown twice in a row
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        seq[0].save(tmp, format="GIF", save_all=True, append_images=seq[1:], duration=duration_ms, loop=0)
    return path


@torch.no_grad()
def prior_samples(vae: AutoencoderKL, num: int, latent_size: tuple[int, int], seed: int = 0) -> tuple[Tensor, Tensor]:
    """Decode draws from the prior N(0, I), and the same draws scaled to the data's spread.

    Args:
        vae: the model.
        num: samples per row.
        latent_size: (h, w) of the latent, e.g. (32, 32) for 256 px and f = 8.
        seed: seed of the draws (a CPU generator, so any device gives the same picture).
    Returns:
        unit: (num, 3, f h, f w) decodes of eps ~ N(0, I), float32, unclamped.
        scaled: decodes of eps / scaling_factor (the std of the VAE's posterior samples,
            when ``scaling_factor`` was measured), same shape.
    """
    device = next(vae.parameters()).device
    c = vae.config.latent_channels
    eps = torch.randn(num, c, *latent_size, generator=torch.Generator().manual_seed(seed)).to(device)
    decode = lambda z: torch.cat([vae.decode(chunk).sample for chunk in z.split(4)]).float()  # noqa: E731
    return decode(eps), decode(eps / vae.config.scaling_factor)


@torch.no_grad()
def latent_channel_panel(vae: AutoencoderKL, image: Tensor) -> Image.Image:
    """input | each latent channel as a grey image | reconstruction, captioned.

    Each channel of the posterior mode is stretched from its own min (black) to max (white)
    (the caption gives the range) and enlarged f x with nearest-neighbour, so one latent
    pixel is an f x f block.

    Args:
        image: (3, H, W) float in [-1, 1].
    Returns:
        An RGB ``PIL.Image``.
    """
    device = next(vae.parameters()).device
    x = image[None].to(device)
    z = vae.encode(x).latent_dist.mode()  # (1, c, h, w)
    rec = vae.decode(z).sample.float()
    f = image.shape[-1] // z.shape[-1]
    panels = [caption(to_pil(x)[0], "input")]
    for k, channel in enumerate(z[0].float().cpu()):
        lo, hi = float(channel.min()), float(channel.max())
        grey = ((channel - lo) / max(hi - lo, 1e-8) * 255).round().to(torch.uint8).numpy()
        im = Image.fromarray(grey, mode="L").resize((grey.shape[1] * f, grey.shape[0] * f), Image.NEAREST)
        panels.append(caption(im.convert("RGB"), f"z[{k}] {lo:.2f}..{hi:.2f}"))
    panels.append(caption(to_pil(rec)[0], "reconstruction"))
    return hstack(panels, pad=4)


def read_metrics(path: PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """``metrics.jsonl`` -> key -> (steps, values), for every numeric key but step/time.

    Lines that are not JSON (a run killed mid-write) are skipped.

    Raises:
        FileNotFoundError: if the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path} (a training output dir holds metrics.jsonl)")
    series: dict[str, tuple[list[int], list[float]]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        for key, value in record.items():
            if key in SKIP_KEYS or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if not math.isfinite(value):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(int(record.get("step", len(steps))))
            values.append(float(value))
    return series


def _ticks(lo: float, hi: float) -> list[float]:
    return [lo + (hi - lo) * i / 4 for i in range(5)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


# matplotlib's "tab10" colours: one per series of a chart.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def line_chart(title: str, steps: Sequence[int], values: Sequence[float], size: tuple[int, int] = (360, 220)) -> Image.Image:
    """One panel: a titled line chart with y ticks and the first/last step on x.

    A series whose values are all positive and span more than 100x is drawn on a log10
    axis (the title says "log").
    """
    return chart(f"{title}   last {_fmt(float(values[-1]))}", [("", steps, values)], size, x_label="step")


def chart(
    title: str,
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    size: tuple[int, int] = (360, 220),
    x_label: str = "",
    log_y: bool | None = None,
    vline: float | None = None,
    hlines: Sequence[tuple[int, float]] = (),
) -> Image.Image:
    """A titled chart of one or more lines, each in its ``PALETTE`` colour, with a legend.

    Args:
        title: drawn above the plot.
        series: ``(label, xs, ys)`` each; labels (when not empty) form the legend, in the
            colours of ``PALETTE`` in order.
        x_label: drawn after the last x value (e.g. "step").
        log_y: a log10 y axis; None: when every value is positive and they span > 100x.
        vline: x of a dotted vertical marker line, or None.
        hlines: ``(series index, y)`` dashed horizontal lines in that series' colour.
    Returns:
        An RGB image of ``size``.
    """
    w, h = size
    left, right, top, bottom = 58, 10, 20, 24
    img = Image.new("RGB", size, "white")
    d, font = ImageDraw.Draw(img), _font(11)
    every = np.concatenate([np.asarray(ys, dtype=np.float64) for _, _, ys in series] +
                           [np.asarray([y for _, y in hlines], dtype=np.float64)])
    log = bool(len(every) and every.min() > 0 and every.max() / every.min() > 100) if log_y is None else log_y
    tr = np.log10 if log else (lambda v: v)
    lo, hi = float(tr(every).min()), float(tr(every).max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * max(abs(lo), 1e-3), hi + 0.5 * max(abs(hi), 1e-3)
    xs_all = [float(x) for _, xs, _ in series for x in xs]
    x0, x1 = min(xs_all), max(xs_all)
    sx = lambda x: left + (x - x0) / max(x1 - x0, 1e-12) * (w - left - right)  # noqa: E731
    sy = lambda val: top + (hi - val) / (hi - lo) * (h - top - bottom)  # noqa: E731
    d.text((left, 3), f"{title}{'  (log)' if log else ''}", fill="black", font=font)
    d.rectangle([left, top, w - right, h - bottom], outline=(160, 160, 160))
    for t in _ticks(lo, hi):
        yy = sy(t)
        d.line([left - 3, yy, left, yy], fill="black")
        d.line([left + 1, yy, w - right - 1, yy], fill=(235, 235, 235))
        d.text((2, yy - 6), _fmt(10**t if log else t), fill="black", font=font)
    d.text((left, h - bottom + 4), _fmt(x0) if x0 != int(x0) else str(int(x0)), fill="black", font=font)
    label = f"{x_label} {_fmt(x1) if x1 != int(x1) else int(x1)}".strip()
    d.text((w - right - d.textlength(label, font=font), h - bottom + 4), label, fill="black", font=font)
    if vline is not None and x0 <= vline <= x1:
        for y in range(top, h - bottom, 4):
            d.point((sx(vline), y), fill=(90, 90, 90))
    for index, value in hlines:
        yy, colour = sy(float(tr(value))), PALETTE[index % len(PALETTE)]
        for x in range(left, w - right - 4, 8):
            d.line([x, yy, x + 4, yy], fill=colour)
    for k, (name, xs, ys) in enumerate(series):
        colour = PALETTE[k % len(PALETTE)]
        points = [(sx(float(x)), sy(float(v))) for x, v in zip(xs, tr(np.asarray(ys, dtype=np.float64)))]
        if len(points) > 1:
            d.line(points, fill=colour, width=2)
        if len(points) <= 40:
            for px, py in points:
                d.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        if name:  # legend, top right, one line per series
            tw = d.textlength(name, font=font)
            d.line([w - right - tw - 22, top + 9 + 13 * k, w - right - tw - 8, top + 9 + 13 * k], fill=colour, width=2)
            d.text((w - right - tw - 4, top + 3 + 13 * k), name, fill=colour, font=font)
    return img


def plot_curves(metrics_path: PathLike, columns: int = 3) -> Image.Image:
    """Every curve of a run's ``metrics.jsonl`` as a grid of line charts.

    Validation metrics (``val/...``) come first, then the training logs, each in its own
    panel; constant series (a switched-off term) are left out. Where a run measured its
    training photos too (``val/train_psnr``, ``val/train_ssim``), they share the panel of
    the held-out ``val/psnr`` / ``val/ssim``: the gap between the two lines is overfitting.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it holds no numeric series.
    """
    series = read_metrics(metrics_path)
    keys = [k for k in series if len(set(series[k][1])) > 1 or k.startswith("val/")]
    keys.sort(key=lambda k: (not k.startswith("val/"), list(series).index(k)))
    if not keys:
        raise ValueError(f"{metrics_path} holds no numeric series to plot")
    shared = {k: seen for k, seen in (("val/psnr", "val/train_psnr"), ("val/ssim", "val/train_ssim"))
              if k in keys and seen in series}  # held-out key -> the training photos' key
    keys = [k for k in keys if k not in shared.values()]
    panels = [chart(f"{k}   last {_fmt(series[k][1][-1])}, training photos {_fmt(series[shared[k]][1][-1])}",
                    [("held-out", *series[k]), ("training photos", *series[shared[k]])], x_label="step")
              if k in shared else line_chart(k, *series[k]) for k in keys]
    rows = [hstack(panels[i : i + columns], pad=6) for i in range(0, len(panels), columns)]
    return vstack(rows, pad=6)


def inspect_vae(
    vae: AutoencoderKL | PathLike,
    out_dir: PathLike,
    images: Sequence[PathLike] = (),
    resolution: int = 256,
    steps: int = 8,
    num_prior: int = 8,
    seed: int = 0,
    run_dir: PathLike | None = None,
    vae_config: PathLike | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Make every picture this module knows into ``out_dir``.

    Writes ``interpolation.png`` + ``interpolation.gif`` (needs two images: input a |
    decodes of the line a -> b | input b), ``prior_samples.png`` (always), one
    ``latent_channels_<name>.png`` per image, and ``curves.png`` when ``run_dir`` (or
    ``vae``, if it is a training output dir) holds ``metrics.jsonl``.

    Args:
        vae: a model or any path ``load_vae`` accepts.
        out_dir: folder for the pictures (created).
        images: image files, centre-cropped to ``resolution`` as ``eval_vae`` does.
        resolution: crop side in pixels, a multiple of f; also sets the prior samples' size.
        steps: decodes along the interpolation line.
        num_prior: prior samples per row.
        seed: seed of the prior draws.
        run_dir: a training output dir whose ``metrics.jsonl`` to plot.
        vae_config: config for a single-file ``vae``.
        device: as ``evaluate_vae``.
    Returns:
        name -> path of every file written, and ``skipped``: what was not drawn and why.
    Raises:
        FileNotFoundError, ValueError: bad VAE path, image file, or resolution.
    """
    model = vae if isinstance(vae, torch.nn.Module) else load_vae(vae, config=vae_config)
    model = model.to(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))).eval()
    f = 2 ** (len(model.config.block_out_channels) - 1)
    if resolution < f or resolution % f:
        raise ValueError(f"resolution must be a positive multiple of the VAE's downsampling factor {f}, got {resolution}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {}
    skipped: list[str] = []
    tensors = []
    for p in images:
        if not Path(p).is_file():
            raise FileNotFoundError(f"image {p} does not exist")
        tensors.append(load_eval_image(p, resolution)[0])

    def save(name: str, img: Image.Image) -> None:
        write_atomic(out / name, png_bytes(img))
        written[name] = str(out / name)

    if len(tensors) >= 2:
        decodes = to_pil(interpolate(model, tensors[0], tensors[1], steps))
        a, b = to_pil(torch.stack(tensors[:2]))
        strip = hstack([caption(a, "input a")] + [caption(im, f"t={i / (steps - 1):.2f}") for i, im in enumerate(decodes)]
                       + [caption(b, "input b")], pad=2)
        save("interpolation.png", strip)
        written["interpolation.gif"] = str(save_gif(decodes, out / "interpolation.gif"))
    else:
        skipped.append("interpolation: needs two --images")

    unit, scaled = prior_samples(model, num_prior, (resolution // f, resolution // f), seed)
    sf = model.config.scaling_factor
    save("prior_samples.png", vstack([
        caption(hstack(to_pil(unit)), "decodes of z ~ N(0, I)"),
        caption(hstack(to_pil(scaled)), f"decodes of z ~ N(0, (1/scaling_factor)^2 I), scaling_factor {sf:.4g}"),
    ], pad=6))

    for p, x in zip(images, tensors):
        save(f"latent_channels_{Path(p).stem}.png", latent_channel_panel(model, x))
    if not tensors:
        skipped.append("latent channels: needs --images")

    metrics = None
    for candidate in ([Path(run_dir)] if run_dir is not None else []) + ([] if isinstance(vae, torch.nn.Module) else [Path(vae)]):
        if (candidate / "metrics.jsonl").is_file():
            metrics = candidate / "metrics.jsonl"
            break
    if metrics is not None:
        save("curves.png", plot_curves(metrics))
    elif run_dir is not None:
        raise FileNotFoundError(f"{run_dir} holds no metrics.jsonl (give a training output dir)")
    else:
        skipped.append("curves: needs --run DIR (a training output dir)")
    written["skipped"] = skipped
    return written
