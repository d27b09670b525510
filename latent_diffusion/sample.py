"""Sample a trained ``LatentDiffusionPipeline`` into PNG files and a grid (``lat sample-ldm``).

Image i of a run with seed S starts from its own noise generator, seeded from (S, i)
(``image_generators``), and every later random draw of a stochastic sampler comes from
that generator too. So the same seed gives the same images, whatever the batch size
(up to float rounding of batched kernels) and however many images are asked for; seeds
S and S + 1 share no image. Thousands of images for an FID set are generated in
batches of ``batch_size`` and written as they come.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from autoencoderkl.atomic import atomic_path, write_atomic

from .config import default_sampler
from .export import load_pipeline
from .model import build_sampler
from .pipeline import LatentDiffusionPipeline, LatentNormalization, learns_sigma

GRID_MAX = 64  # images shown in grid.png (the first ones)
# What sample() writes into its folder: NNNNNN.png (six or more digits), grid.png, sampling.json.
SAMPLE_PNG = re.compile(r"^\d{6,}\.png$")
OWN_FILES = ("grid.png", "sampling.json")
# The settings that must match for a rerun into a folder of earlier samples to be "the same command".
SAME_RUN_KEYS = ("model", "num_images", "steps", "scheduler", "shift", "class_label", "guidance_scale",
                 "guidance_interval", "seed")


def image_generators(seed: int, indices: range | list[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One ``torch.Generator`` per image, seeded from ``numpy.random.SeedSequence([seed, i])``.

    Args:
        seed: >= 0, the run's seed.
        indices: image numbers i (>= 0) within the run.
        device: where the generators draw (the noise is drawn there).
    """
    gens = []
    for i in indices:
        state = np.random.SeedSequence([seed, i]).generate_state(2, dtype=np.uint32)
        gens.append(torch.Generator(device).manual_seed(int(state[0]) << 32 | int(state[1])))
    return gens


def class_labels_for(pipeline: LatentDiffusionPipeline, class_label: Union[int, str], indices: range) -> list[int] | None:
    """Labels for images ``indices``: "cycle" -> i % K, an int -> that class, "none" -> None (null class).

    Raises:
        ValueError: an int label with an unconditional U-Net or out of [0, K), or an
            unknown string.
    """
    k = pipeline.num_classes
    if class_label == "none" or (class_label == "cycle" and not k):
        return None
    if class_label == "cycle":
        return [i % k for i in indices]
    if isinstance(class_label, str):
        raise ValueError(f"class label must be an integer, 'cycle' or 'none', got {class_label!r}")
    if not k:
        raise ValueError(f"--class-label {class_label}: this model is unconditional (trained on a cache without labels)")
    if not 0 <= class_label < k:
        names = pipeline.config.class_names
        listing = ", ".join(f"{i}={n}" for i, n in enumerate(names)) if names else f"0..{k - 1}"
        raise ValueError(f"class label {class_label} out of range; this model has {k} classes: {listing}")
    return [class_label] * len(indices)


def check_samples_dir(out: Path, request: dict[str, Any], overwrite: bool) -> None:
    """Before sampling into ``out``: a new or empty folder, or earlier samples of the same request.

    A folder that holds earlier samples of other settings is refused unless
    ``overwrite`` (which removes them): mixing 16 old images with 2 new ones left 18 PNGs
    beside a ``sampling.json`` that said 2. A folder holding anything ``sample`` does not
    write (a training run, a latent cache) is refused even with ``overwrite``: nothing
    else is ever removed.

    Args:
        out: the folder.
        request: this call's values of ``SAME_RUN_KEYS`` (as ``sampling.json`` records them).
        overwrite: remove earlier samples (``NNNNNN.png``, ``grid.png``, ``sampling.json``).
    Raises:
        FileExistsError: naming the folder, what it holds and the way out.
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    foreign = [name for name in entries if not (SAMPLE_PNG.match(name) or name in OWN_FILES)]
    if foreign:
        listing = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise FileExistsError(f"--out {out} holds files that lat sample-ldm does not write ({listing}); choose another "
                              f"--out (--overwrite removes only earlier samples, never other files)")
    if overwrite:
        for name in entries:
            (out / name).unlink()
        return
    earlier = json.loads((out / "sampling.json").read_text()) if "sampling.json" in entries else None
    if earlier is not None and {k: earlier.get(k) for k in SAME_RUN_KEYS} == request:
        return  # the same command again: the same files, written again
    pngs = sum(bool(SAMPLE_PNG.match(name)) for name in entries)
    what = (f"{pngs} images of an earlier run ({earlier['num_images']} images, seed {earlier['seed']}, "
            f"{earlier['steps']} steps)" if earlier is not None else f"{pngs} images without a sampling.json")
    raise FileExistsError(f"--out {out} already holds {what}; pass --overwrite to replace them, or choose another --out")


def _save_png(array: np.ndarray, path: Path) -> None:
    """(H, W, 3) uint8 -> PNG, written to a temporary name and renamed into place."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp)


def sample(
    model: Union[str, os.PathLike, LatentDiffusionPipeline],
    out: Union[str, os.PathLike],
    num_images: int,
    steps: int = 50,
    scheduler: str | None = None,
    class_label: Union[int, str] = "cycle",
    guidance_scale: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = True,
    shift: float | None = None,
    overwrite: bool = False,
    guidance_interval: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Generate ``num_images`` PNGs ``out/NNNNNN.png`` and ``out/grid.png`` of the first 64.

    Args:
        model: a pipeline folder (``OUTPUT_DIR/pipeline``), a run's output dir, or a
            loaded ``LatentDiffusionPipeline``.
        out: the folder for the PNGs (created): new, empty, or holding earlier samples of
            the same settings (``check_samples_dir``).
        num_images: N >= 1.
        steps: sampler steps per image.
        scheduler: for epsilon and v_prediction models ddim | ddpm | dpm (DPM-Solver++ 2M)
            | euler, for flow models flow_euler | flow_heun, made from the pipeline's
            scheduler config (same betas and prediction type, or T and shift); None: the
            default for the model's ``prediction_type`` (ddim, or flow_euler). ddpm steps
            with the model's learned variance when it has one (``learns_sigma``).
        class_label: "cycle" (image i gets class i % K; unconditional models ignore it),
            an int class for all images, or "none" (the null class: unconditional).
        guidance_scale: classifier-free guidance s (1 = none; needs class labels).
        guidance_interval: (lo, hi): guide only at noise levels t / T in [lo, hi]
            (``LatentDiffusionPipeline.__call__``); None: at every step.
        seed: >= 0; image i's noise comes from ``image_generators(seed, [i])``.
        batch_size: images per denoiser batch (x2 with guidance).
        device: default CUDA when available, else the CPU.
        progress: show a tqdm bar over the denoising steps of every batch (images done
            in its postfix).
        shift: flow samplers only: their ``shift`` instead of the saved one (see
            ``latent_diffusion.model.build_sampler``).
        overwrite: replace earlier samples of other settings in ``out``.
    Returns:
        ``paths`` (list of Paths, in image order), ``grid`` (Path), ``seconds``,
        ``images_per_sec``, and ``settings`` (also written to ``out/sampling.json``).
    Raises:
        FileNotFoundError: ``model`` is not a pipeline folder.
        FileExistsError: ``out`` holds other files, or samples of other settings without
            ``overwrite``.
        ValueError: a bad count, scheduler name or class label, a scheduler that does
            not fit the model's ``prediction_type``, or a shift for a DDPM sampler.
    """
    if num_images < 1 or batch_size < 1 or steps < 1:
        raise ValueError(f"num_images, batch_size and steps must be >= 1, got {num_images}, {batch_size}, {steps}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipeline = model if isinstance(model, LatentDiffusionPipeline) else load_pipeline(model)
    pipeline.to(device)
    pipeline.denoiser.eval(), pipeline.vae.eval()
    pipeline.check_scheduler()  # the saved one; then the one asked for must fit the same objective
    scheduler = scheduler or default_sampler(pipeline.config.prediction_type)
    pipeline.scheduler = build_sampler(scheduler, pipeline.scheduler.config, shift=shift,
                                       learned_variance=learns_sigma(pipeline.denoiser))
    pipeline.set_progress_bar_config(disable=True)
    class_labels_for(pipeline, class_label, range(1))  # a bad label fails before any work

    out = Path(out)
    check_samples_dir(out, {"model": str(model) if not isinstance(model, LatentDiffusionPipeline) else None,
                            "num_images": num_images, "steps": steps, "scheduler": type(pipeline.scheduler).__name__,
                            "shift": pipeline.scheduler.config.get("shift"), "class_label": class_label,
                            "guidance_scale": guidance_scale,
                            "guidance_interval": list(guidance_interval) if guidance_interval else None, "seed": seed},
                      overwrite)
    out.mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(num_images - 1)))
    paths, shown = [], []
    # One bar over every denoising step of every batch (a batch of 16 images is one step
    # per U-Net call, not one tick at its end): diffusers' per-call progress_bar hook,
    # pointed at ours for the length of this call.
    pipeline.scheduler.set_timesteps(steps, device=device)
    per_batch = len(pipeline.scheduler.timesteps)  # steps, or more for a 2nd-order sampler (flow_heun)
    bar = tqdm(total=math.ceil(num_images / batch_size) * per_batch, desc="sample_ldm", unit="step",
               disable=not progress, dynamic_ncols=True)

    def count_steps(iterable=None, total=None):
        for item in iterable:
            yield item
            bar.update(1)

    pipeline.progress_bar = count_steps
    start = time.perf_counter()
    try:
        for first in range(0, num_images, batch_size):
            indices = range(first, min(first + batch_size, num_images))
            images = pipeline(
                batch_size=len(indices), num_inference_steps=steps,
                class_labels=class_labels_for(pipeline, class_label, indices), guidance_scale=guidance_scale,
                generator=image_generators(seed, indices, device), output_type="np", guidance_interval=guidance_interval,
            ).images  # (b, H, W, 3) float32 in [0, 1]
            arrays = (images * 255).round().astype(np.uint8)
            for i, array in zip(indices, arrays):
                path = out / f"{i:0{width}d}.png"
                _save_png(array, path)
                paths.append(path)
                if len(shown) < GRID_MAX:
                    shown.append(torch.from_numpy(array).permute(2, 0, 1))
            bar.set_postfix(images=f"{len(paths)}/{num_images}")
    finally:
        del pipeline.progress_bar  # the class's own again
        bar.close()
    seconds = time.perf_counter() - start

    grid = out / "grid.png"
    k = pipeline.num_classes
    nrow = k if class_label == "cycle" and k and k <= 16 else math.ceil(math.sqrt(len(shown)))
    with atomic_path(grid) as tmp:
        save_image(make_grid(torch.stack(shown).float() / 255, nrow=nrow, padding=2, pad_value=1.0), tmp)
    settings = {"model": str(model) if not isinstance(model, LatentDiffusionPipeline) else None,
                "num_images": num_images, "steps": steps, "scheduler": type(pipeline.scheduler).__name__,
                "prediction_type": pipeline.config.prediction_type, "shift": pipeline.scheduler.config.get("shift"),
                "class_label": class_label, "guidance_scale": guidance_scale,
                "guidance_interval": list(guidance_interval) if guidance_interval else None, "seed": seed,
                "class_names": pipeline.config.class_names, "denoiser": type(pipeline.denoiser).__name__,
                "latent_normalization": LatentNormalization.from_vae(pipeline.vae).to_dict(),
                "vae_scaling_factor": pipeline.vae.config.get("scaling_factor"),
                "vae_shift_factor": pipeline.vae.config.get("shift_factor")}
    write_atomic(out / "sampling.json", json.dumps(settings, indent=2) + "\n")
    return {"paths": paths, "grid": grid, "seconds": seconds, "images_per_sec": num_images / seconds,
            "settings": settings}
