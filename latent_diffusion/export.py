"""Exporting and loading a trained pipeline: the folder, its model card, its standalone code.

``save_pipeline`` writes what ``DiffusionPipeline.save_pretrained`` writes (safetensors),
plus ``pipeline.py`` (a copy of ``latent_diffusion/pipeline.py``, which imports only
torch and diffusers) named in ``model_index.json`` as ``["pipeline",
"LatentDiffusionPipeline"]`` -- diffusers' custom-pipeline convention -- so the folder
loads in plain diffusers, without this package::

    DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)

and ``README.md``, a Hub model card (``write_pipeline_card``). The whole folder is
written atomically (``autoencoderkl.atomic``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from autoencoderkl.atomic import atomic_dir
from autoencoderkl.hub import write_model_card

from . import pipeline as pipeline_module
from .pipeline import LatentDiffusionPipeline

CUSTOM_PIPELINE = ["pipeline", "LatentDiffusionPipeline"]  # model_index.json's _class_name: (file stem, class)


def save_pipeline(pipeline: LatentDiffusionPipeline, out_dir: str | os.PathLike,
                  card: Optional[dict[str, Any]] = None) -> Path:
    """``save_pretrained`` (safetensors) + ``pipeline.py`` + model card into ``out_dir``, atomically.

    Args:
        pipeline: the pipeline to save.
        out_dir: the folder (an existing one is replaced only once the new one is whole).
        card: keyword arguments of ``write_pipeline_card`` (without the folder); None
            writes no card.
    Returns:
        ``out_dir`` as a Path, loadable with ``LatentDiffusionPipeline.from_pretrained``
        and with plain diffusers (``DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)``).
    """
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        shutil.copyfile(pipeline_module.__file__, tmp / f"{CUSTOM_PIPELINE[0]}.py")
        index = json.loads((tmp / "model_index.json").read_text())
        index["_class_name"] = CUSTOM_PIPELINE
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if card is not None:
            write_pipeline_card(tmp, **card)
    return out


def write_pipeline_card(folder: str | os.PathLike, pipeline: LatentDiffusionPipeline, steps: int,
                        latents: str, val_loss: Optional[float], config: dict[str, Any]) -> Path:
    """The pipeline's ``README.md``: Hub metadata, what it was trained on and how, how to load it.

    Args:
        folder: the pipeline folder.
        pipeline: the exported pipeline (its U-Net, scheduler and VAE are described).
        steps: optimizer steps trained.
        latents: the latent cache it was trained on (its path).
        val_loss: the last fixed-noise validation loss (EMA weights), or None.
        config: the run's resolved config as a plain dict (model, noise, optim, train).
    """
    unet, vae = pipeline.unet, pipeline.vae
    n_params = sum(p.numel() for p in unet.parameters()) / 1e6
    classes = pipeline.config.class_names
    cond = f"class-conditional on {len(classes)} classes ({', '.join(map(str, classes[:10]))}" \
           f"{', ...' if len(classes) > 10 else ''}), classifier-free guidance" if classes else "unconditional"
    c, h = unet.config.in_channels, unet.config.sample_size
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    body = f"""A {n_params:.1f}M-parameter latent diffusion U-Net (diffusers `UNet2DModel`), {cond}, on
the {c} x {h} x {h} latents of its own `AutoencoderKL` (f = {f}: {h * f} x {h * f} px images), trained with
latent-autoencoders for {steps} optimizer steps on the latent cache `{latents}`.

| | |
|---|---|
| objective | `{config['noise']['prediction_type']}` |
| sampler saved | `{type(pipeline.scheduler).__name__}` |
| latent scale | `scaling_factor` {vae.config.scaling_factor:.6g}, `shift_factor` {vae.config.shift_factor or 0.0:.6g} (in `vae/config.json`) |
| batch x accumulation | {config['data']['batch_size']} x {config['train']['gradient_accumulation_steps']} per process |
| learning rate | {config['optim']['lr']:g} ({config['optim']['lr_scheduler']}), EMA {config['train']['use_ema']} |
| validation loss | {f'{val_loss:.4f}' if val_loss is not None else 'not measured'} (fixed noise, EMA weights) |

## Use

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("THIS_FOLDER_OR_REPO", trust_remote_code=True)  # runs pipeline.py
images = pipe(batch_size=4, num_inference_steps=50{', class_labels=[0, 0, 1, 1], guidance_scale=2.0' if classes else ''}).images
```

With the toolkit installed: `lat sample-ldm --model THIS_FOLDER --num-images 16 --out samples/`.
`pipeline.py` holds the whole sampling code (torch and diffusers only).
"""
    return write_model_card(folder, "Latent diffusion pipeline", body,
                            tags=["diffusers", "latent-diffusion", "unconditional-image-generation"
                                  if not classes else "class-conditional-image-generation"],
                            metrics={"validation_loss": val_loss} if val_loss is not None else None)


def load_pipeline(path: str | os.PathLike, device: str | torch.device | None = None) -> LatentDiffusionPipeline:
    """Load a saved pipeline from its folder or from a training run's output dir, offline.

    Args:
        path: a folder holding ``model_index.json`` (``save_pipeline``), or a run's output
            dir whose ``pipeline/`` is that.
        device: where to move it (default: stay on the CPU).
    Raises:
        FileNotFoundError: if neither ``path`` nor ``path/pipeline`` is a pipeline folder.
    """
    root = Path(path)
    for candidate in (root, root / "pipeline"):
        if (candidate / "model_index.json").is_file():
            pipe = LatentDiffusionPipeline.from_pretrained(candidate, local_files_only=True)
            return pipe.to(device) if device is not None else pipe
    raise FileNotFoundError(
        f"no LatentDiffusionPipeline at {root}: expected a folder with model_index.json, unet/, scheduler/ "
        f"and vae/ (what `lat train-ldm` writes as OUTPUT_DIR/pipeline), or a run's output dir holding one"
    )
