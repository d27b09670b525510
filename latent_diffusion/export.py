"""Exporting and loading a trained pipeline: the folder, its model card, its standalone code.

``save_pipeline`` writes what ``DiffusionPipeline.save_pretrained`` writes (safetensors),
plus ``pipeline.py`` (a copy of ``latent_diffusion/pipeline.py``, which imports only
torch and diffusers) and ``README.md``, a Hub model card (``write_pipeline_card``). The
whole folder is written atomically (``autoencoderkl.atomic``). Which diffusers class the
folder's ``model_index.json`` names depends on what the model needs (``plain_pipeline``):

* ``DiTPipeline``, when diffusers' own pipeline samples the model exactly as ours does: a
  class-conditional DiT (at most 1000 classes) trained with epsilon or v prediction, on
  globally scaled latents without a shift factor, sampled by a scheduler that takes no
  learned variance. ``DiTPipeline.from_pretrained(DIR)`` and
  ``DiffusionPipeline.from_pretrained(DIR)`` then load it with no remote code.
  DiTPipeline feeds the null class as label 1000, so the exported transformer's label
  tables have 1001 rows (``fit_null_class``: the K classes, then copies of the null row up
  to row 1000) and the class names are saved as its ``id2label``.
* ``["pipeline", "LatentDiffusionPipeline"]`` otherwise -- diffusers' custom-pipeline
  convention -- so the folder loads in plain diffusers through the copied file::

      DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)

``load_pipeline`` reads either kind into this package's ``LatentDiffusionPipeline``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from autoencoderkl.atomic import atomic_dir
from autoencoderkl.hub import write_model_card

from . import pipeline as pipeline_module
from .pipeline import (
    DENOISER_COMPONENTS,
    LEARNED_VARIANCES,
    LatentDiffusionPipeline,
    LatentNormalization,
    denoiser_family,
    learns_sigma,
    null_class_index,
)

CUSTOM_PIPELINE = ["pipeline", "LatentDiffusionPipeline"]  # model_index.json's _class_name: (file stem, class)
DIT_PIPELINE_NULL_CLASS = 1000  # diffusers.DiTPipeline's hard-coded class_null (ImageNet's 1000 classes)


def plain_pipeline(pipeline: LatentDiffusionPipeline) -> tuple[Optional[str], list[str]]:
    """The diffusers pipeline class that samples this pipeline exactly without our code, or why none does.

    Returns:
        ``(name, [])`` (e.g. ``("DiTPipeline", [])``), or ``(None, reasons)``: one line per
        thing that pipeline cannot express (what the model card lists).
    """
    family = denoiser_family(pipeline.denoiser)
    if family.plain_pipeline is None:
        return None, [f"diffusers has no pipeline for a {type(pipeline.denoiser).__name__} on AutoencoderKL latents "
                      f"with class labels (LDMPipeline is unconditional and decodes a VQModel)"]
    reasons = []
    k = pipeline.num_classes
    if not k:
        reasons.append(f"{family.plain_pipeline} always conditions on class labels; this model is unconditional")
    elif k > DIT_PIPELINE_NULL_CLASS:
        reasons.append(f"{family.plain_pipeline} uses label {DIT_PIPELINE_NULL_CLASS} as the null class; this model "
                       f"has {k} classes")
    if pipeline.config.prediction_type == "flow":
        reasons.append(f"flow matching: {family.plain_pipeline} steps DDPM-family schedulers (it calls "
                       f"scale_model_input, which the FlowMatch schedulers lack)")
    norm = LatentNormalization.from_vae(pipeline.vae)
    if norm.kind == "batch_norm":
        reasons.append(f"FLUX.2's batch-norm latent normalisation: {family.plain_pipeline} decodes latents / "
                       f"scaling_factor and knows nothing of the VAE's batch norm")
    elif norm.kind != "global":
        reasons.append(f"{norm.kind} latent normalisation: {family.plain_pipeline} decodes latents / scaling_factor "
                       f"and ignores latents_mean / latents_std")
    elif norm.shift_factor:
        reasons.append(f"shift_factor {norm.shift_factor:.6g}: {family.plain_pipeline} decodes latents / "
                       f"scaling_factor without adding it back")
    if pipeline.scheduler.config.get("variance_type") in LEARNED_VARIANCES:
        reasons.append(f"a {type(pipeline.scheduler).__name__} stepping with the learned variance: "
                       f"{family.plain_pipeline} passes the scheduler the mean channels only")
    return (None, reasons) if reasons else (family.plain_pipeline, [])


def fit_null_class(transformer: nn.Module, null_class: int = DIT_PIPELINE_NULL_CLASS) -> nn.Module:
    """A copy of a DiT whose label tables put the null class at row ``null_class`` (DiTPipeline's 1000).

    ``DiTTransformer2DModel`` with K classes has, in every block, a (K + 1, d) table: rows
    0..K-1 the classes, row K the null class. The copy has ``num_embeds_ada_norm =
    null_class``: rows 0..K-1 the same, and every row from K to ``null_class`` the null
    row (labels K..999 thus sample unconditionally). Its outputs for labels 0..K-1 and for
    the null class are those of the original, bit for bit.

    Raises:
        ValueError: if the model has more than ``null_class`` classes.
    """
    k = null_class_index(transformer)
    if k > null_class:
        raise ValueError(f"{k} classes do not fit below the null class {null_class}")
    fitted = type(transformer).from_config({**transformer.config, "num_embeds_ada_norm": null_class})
    state = transformer.state_dict()
    for key, table in state.items():
        if key.endswith("class_embedder.embedding_table.weight"):  # (K + 1, d)
            rows = table[k].expand(null_class + 1, -1).clone()
            rows[:k] = table[:k]
            state[key] = rows
    fitted.load_state_dict(state)
    return fitted.to(dtype=transformer.dtype).eval()


def save_pipeline(pipeline: LatentDiffusionPipeline, out_dir: str | os.PathLike,
                  card: Optional[dict[str, Any]] = None) -> Path:
    """``save_pretrained`` (safetensors) + ``pipeline.py`` + model card into ``out_dir``, atomically.

    The folder names ``DiTPipeline`` when ``plain_pipeline`` says it samples the model
    exactly (its transformer then goes through ``fit_null_class``), else our copied
    ``pipeline.py`` (see the module docstring).

    Args:
        pipeline: the pipeline to save.
        out_dir: the folder (an existing one is replaced only once the new one is whole).
        card: keyword arguments of ``write_pipeline_card`` (without the folder); None
            writes no card.
    Returns:
        ``out_dir`` as a Path, loadable with ``LatentDiffusionPipeline.from_pretrained``
        and with plain diffusers.
    """
    out = Path(out_dir)
    plain, _ = plain_pipeline(pipeline)
    to_save = pipeline
    if plain == "DiTPipeline":
        to_save = LatentDiffusionPipeline(None, pipeline.scheduler, pipeline.vae, class_names=pipeline.config.class_names,
                                          prediction_type=pipeline.config.prediction_type,
                                          transformer=fit_null_class(pipeline.denoiser))
    with atomic_dir(out) as tmp:
        to_save.save_pretrained(tmp, safe_serialization=True)
        shutil.copyfile(pipeline_module.__file__, tmp / f"{CUSTOM_PIPELINE[0]}.py")
        index = json.loads((tmp / "model_index.json").read_text())
        if plain == "DiTPipeline":
            names = index.pop("class_names") or [str(i) for i in range(pipeline.num_classes)]
            index = {k: v for k, v in index.items() if k not in DENOISER_COMPONENTS or v[0] is not None}
            index.pop("prediction_type")  # the scheduler's config holds it
            index.update(_class_name="DiTPipeline", id2label={str(i): name for i, name in enumerate(names)})
        else:
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
        pipeline: the exported pipeline (its denoiser, scheduler and VAE are described).
        steps: optimizer steps trained.
        latents: the latent cache it was trained on (its path).
        val_loss: the last fixed-noise validation loss (EMA weights), or None.
        config: the run's resolved config as a plain dict (model, noise, optim, train).
    """
    denoiser, vae = pipeline.denoiser, pipeline.vae
    n_params = sum(p.numel() for p in denoiser.parameters()) / 1e6
    classes = pipeline.config.class_names
    cond = f"class-conditional on {len(classes)} classes ({', '.join(map(str, classes[:10]))}" \
           f"{', ...' if len(classes) > 10 else ''}), classifier-free guidance" if classes else "unconditional"
    c, h = denoiser.config.in_channels, denoiser.config.sample_size
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    norm = LatentNormalization.from_vae(vae)
    if norm.kind == "batch_norm":
        scale = ("FLUX.2's batch norm: each latent cell `(z - running_mean) / sqrt(running_var + eps)` with the "
                 "statistics of its 2x2-patchified channel, from the VAE's own `bn` buffers; no scaling_factor")
    elif norm.kind == "per_channel":
        scale = (f"per channel: `(z - latents_mean) * scaling_factor / latents_std`, scaling_factor "
                 f"{norm.scaling_factor:.6g} (`latents_mean` / `latents_std` in `vae/config.json`)")
    else:
        scale = (f"global: `(z - shift_factor) * scaling_factor`, scaling_factor {norm.scaling_factor:.6g}, "
                 f"shift_factor {norm.shift_factor:.6g} (in `vae/config.json`)")
    plain, reasons = plain_pipeline(pipeline)
    kind = type(denoiser).__name__
    label_args = ", class_labels=[0, 0, 1, 1], guidance_scale=2.0" if classes else ""
    if plain == "DiTPipeline":
        use = f"""```python
from diffusers import DiTPipeline

pipe = DiTPipeline.from_pretrained("THIS_FOLDER_OR_REPO")  # plain diffusers, no remote code
images = pipe(class_labels=[0, 0, 1, 1], guidance_scale=2.0, num_inference_steps=50).images
```

`DiTPipeline` feeds label {DIT_PIPELINE_NULL_CLASS} as the null class of guidance, so the transformer's label
tables have {DIT_PIPELINE_NULL_CLASS + 1} rows: the {len(classes)} classes (`id2label` in `model_index.json`;
`pipe.get_label_ids([...])` finds them by name), then copies of the null row (labels {len(classes)}..{DIT_PIPELINE_NULL_CLASS}
sample unconditionally). It guides only when `guidance_scale > 1` (default 4.0) and always decodes
`latents / scaling_factor`. `pipeline.py` (this toolkit's sampler: the guidance interval, every scheduler check)
samples the same folder: `lat sample-ldm --model THIS_FOLDER`."""
    else:
        why = "".join(f"\n- {r}" for r in reasons)
        use = f"""```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("THIS_FOLDER_OR_REPO", trust_remote_code=True)  # runs pipeline.py
images = pipe(batch_size=4, num_inference_steps=50{label_args}).images
```

`pipeline.py` holds the whole sampling code (torch and diffusers only). No diffusers pipeline class samples this
model as trained:{why}"""
    body = f"""A {n_params:.1f}M-parameter latent diffusion model (diffusers `{kind}`), {cond}, on the {c} x {h} x {h}
latents of its own VAE (f = {f}: {h * f} x {h * f} px images), trained with latent-autoencoders for {steps} optimizer
steps on the latent cache `{latents}`.

| | |
|---|---|
| denoiser | `{kind}`{', learned variance' if learns_sigma(denoiser) else ''} |
| objective | `{config['noise']['prediction_type']}` |
| sampler saved | `{type(pipeline.scheduler).__name__}` |
| latent normalisation | {scale} |
| batch x accumulation | {config['data']['batch_size']} x {config['train']['gradient_accumulation_steps']} per process |
| learning rate | {config['optim']['lr']:g} ({config['optim']['lr_scheduler']}), EMA {config['train']['use_ema']} |
| validation loss | {f'{val_loss:.4f}' if val_loss is not None else 'not measured'} (fixed noise, EMA weights) |

## Use

{use}

With the toolkit installed: `lat sample-ldm --model THIS_FOLDER --num-images 16 --out samples/`.
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
        f"no LatentDiffusionPipeline at {root}: expected a folder with model_index.json, unet/ or transformer/, "
        f"scheduler/ and vae/ (what `lat train-ldm` writes as OUTPUT_DIR/pipeline), or a run's output dir holding one"
    )
