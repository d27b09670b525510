"""``LatentDiffusionPipeline``: noise -> U-Net denoising in latent space -> VAE decode -> images.

A ``diffusers.DiffusionPipeline`` with three components, ``unet`` (``UNet2DModel``),
``scheduler`` (any diffusers sampling scheduler) and ``vae`` (``AutoencoderKL``), so
``save_pretrained`` writes the usual folder (``model_index.json``, ``unet/``,
``scheduler/``, ``vae/``, safetensors) and ``LatentDiffusionPipeline.from_pretrained(DIR)``
loads it back, offline.

The objective the U-Net was trained with is recorded in ``model_index.json`` as
``prediction_type`` (epsilon | v_prediction | flow); every call checks that the scheduler
integrates that objective (a DDPM-family scheduler with the same ``prediction_type``, or
a ``FlowMatch*`` scheduler for flow), so a swapped-in sampler that does not fit is an
error, not a page of noise.

The scale of the latent space lives in the pipeline's ``vae.config``: the U-Net was
trained on ``latents = (z - shift_factor) * scaling_factor`` (z a raw posterior sample),
and ``train.py`` writes the ``scaling_factor`` and ``shift_factor`` it actually trained
with (those of the latent cache, or the run's override) into ``pipeline/vae/config.json``.
Sampling divides by exactly those numbers before decoding; nothing is hard-coded
(Rombach et al. 2022, sec. 4.3.2: SD 1.x's 0.18215 is one VAE's value, not a constant).

This file is self-contained (torch and diffusers only): ``latent_diffusion.export``
copies it into every exported pipeline folder as ``pipeline.py`` and names it in
``model_index.json``, so that plain diffusers loads the folder without this package,
through its custom-pipeline mechanism::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("runs/ldm-demo/pipeline", trust_remote_code=True)

Keep it free of imports from ``latent_diffusion`` and ``autoencoderkl``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")  # as latent_diffusion.config (which must not import diffusers)


def null_class_index(unet: UNet2DModel) -> int | None:
    """The label that means "no class" (the last embedding row), or None if unconditional."""
    n = unet.config.num_class_embeds
    return None if n is None else n - 1


def is_flow(scheduler_or_config: Any) -> bool:
    """Whether a scheduler (or its config) is one of diffusers' flow-matching schedulers.

    A ``FlowMatch*Scheduler`` integrates a velocity; its config has a ``shift`` and no
    ``prediction_type``, which every DDPM-family scheduler's config has.
    """
    if hasattr(scheduler_or_config, "config"):
        return type(scheduler_or_config).__name__.startswith("FlowMatch")
    config = dict(scheduler_or_config)
    return "prediction_type" not in config and "shift" in config


def scheduler_objective(scheduler_or_config: Any) -> str:
    """The objective a scheduler integrates: ``"flow"``, or its config's ``prediction_type``."""
    if is_flow(scheduler_or_config):
        return "flow"
    config = scheduler_or_config.config if hasattr(scheduler_or_config, "config") else scheduler_or_config
    return dict(config).get("prediction_type", "epsilon")


class LatentDiffusionPipeline(DiffusionPipeline):
    """Class-conditional or unconditional latent diffusion with classifier-free guidance.

    Args:
        unet: predicts epsilon, v or the flow velocity (``prediction_type``) of
            (B, c, h, w) latents; class-conditional when ``unet.config.num_class_embeds``
            is set, whose last index is the null class (see ``latent_diffusion.model``).
        scheduler: a diffusers scheduler configured as in training (same betas and
            prediction type, or the flow T and shift); DDIM, DDPM, DPM-Solver++ and Euler
            are tested for epsilon and v, FlowMatchEuler and FlowMatchHeun for flow.
        vae: the frozen ``AutoencoderKL`` the latents came from; its config's
            ``scaling_factor`` (and ``shift_factor``, when set) are those the U-Net was
            trained with.
        class_names: optional names of the class indices 0..K-1 (e.g. the cache's class
            folders), saved in ``model_index.json``.
        prediction_type: the U-Net's training objective, saved in ``model_index.json``;
            None (a pipeline saved before it was recorded) takes the scheduler's
            (``latent_diffusion.model.scheduler_objective``).
    Raises:
        ValueError: an unknown ``prediction_type``.

    Example::

        pipe = LatentDiffusionPipeline.from_pretrained("runs/ldm-demo/pipeline")
        images = pipe(batch_size=4, class_labels=[0, 1, 2, 3], guidance_scale=2.0,
                      generator=[torch.Generator().manual_seed(i) for i in range(4)]).images
    """

    model_cpu_offload_seq = "unet->vae"

    def __init__(self, unet: UNet2DModel, scheduler, vae: AutoencoderKL, class_names: Optional[list[str]] = None,
                 prediction_type: Optional[str] = None):
        super().__init__()
        prediction_type = prediction_type or scheduler_objective(scheduler)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        self.register_to_config(class_names=list(class_names) if class_names is not None else None,
                                prediction_type=prediction_type)
        self.image_processor = VaeImageProcessor(vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs) -> "LatentDiffusionPipeline":
        """Load a saved pipeline folder (or a Hub repository holding one) as THIS class.

        The folder's ``model_index.json`` names its own ``pipeline.py`` (so that plain
        ``DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)`` works without
        this package); loaded through this class, the components are read directly and
        no code from the folder runs.

        Args:
            pretrained_model_name_or_path: a folder with ``model_index.json``, ``unet/``,
                ``scheduler/``, ``vae/``; or a Hub id (downloaded into the HF cache).
            kwargs: ``torch_dtype`` for the models; ``local_files_only``, ``revision``,
                ``cache_dir``, ``token`` for the download.
        Raises:
            FileNotFoundError: if the folder lacks ``model_index.json``.
        """
        hub = {k: kwargs[k] for k in ("local_files_only", "revision", "cache_dir", "token") if k in kwargs}
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(pretrained_model_name_or_path), **hub))
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"{folder} holds no model_index.json: not a saved pipeline")
        index = json.loads((folder / "model_index.json").read_text())
        dtype = {"torch_dtype": kwargs["torch_dtype"]} if "torch_dtype" in kwargs else {}
        scheduler_class = getattr(importlib.import_module(index["scheduler"][0]), index["scheduler"][1])
        return cls(UNet2DModel.from_pretrained(folder / "unet", **dtype),
                   scheduler_class.from_pretrained(folder / "scheduler"),
                   AutoencoderKL.from_pretrained(folder / "vae", **dtype),
                   class_names=index.get("class_names"), prediction_type=index.get("prediction_type"))

    @property
    def num_classes(self) -> int | None:
        """K, the number of real classes (labels 0..K-1), or None for an unconditional U-Net."""
        null = null_class_index(self.unet)
        return None if null is None else null

    def check_scheduler(self) -> None:
        """Raise unless ``self.scheduler`` integrates what the U-Net predicts (``prediction_type``).

        Raises:
            ValueError: naming the scheduler, the objective and the samplers that fit.
        """
        have, want = scheduler_objective(self.scheduler), self.config.prediction_type
        if have != want:
            raise ValueError(
                f"scheduler {type(self.scheduler).__name__} integrates prediction_type {have!r}, but this U-Net was "
                f"trained with {want!r} (model_index.json); sample with "
                f"{'a FlowMatch scheduler (flow_euler, flow_heun)' if want == 'flow' else 'a DDPM-family scheduler (ddim, ddpm, dpm, euler)'} "
                f"(lat sample-ldm --scheduler, or latent_diffusion.model.build_sampler)"
            )

    def _labels(self, class_labels, batch_size: int, device: torch.device) -> Tensor | None:
        """(B,) int64 labels; the null class where none is given; None if unconditional."""
        null = null_class_index(self.unet)
        if null is None:
            if class_labels is not None:
                raise ValueError("class_labels given, but this U-Net is unconditional (unet.config.num_class_embeds is None)")
            return None
        if class_labels is None:
            return torch.full((batch_size,), null, dtype=torch.long, device=device)
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(batch_size)
        if labels.numel() != batch_size:
            raise ValueError(f"got {labels.numel()} class labels for batch_size {batch_size}")
        if labels.min() < 0 or labels.max() >= null:
            raise ValueError(f"class labels must lie in [0, {null - 1}] ({null} classes), got {labels.tolist()}")
        return labels

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        class_labels: Union[int, list[int], Tensor, None] = None,
        guidance_scale: float = 1.0,
        generator: Union[torch.Generator, list[torch.Generator], None] = None,
        latents: Optional[Tensor] = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Union[ImagePipelineOutput, tuple]:
        """Sample images.

        Args:
            batch_size: B, images to generate.
            num_inference_steps: sampler steps.
            class_labels: one int for all images, or B ints in [0, K); None samples the
                null class (unconditional; with an unconditional U-Net, must be None).
            guidance_scale: s of classifier-free guidance, eps = eps(null) + s (eps(y) -
                eps(null)) (Ho & Salimans 2022; likewise for v and the flow velocity). 1
                uses the conditional prediction alone (one U-Net call per step); other
                values cost two. Ignored without labels.
            generator: a ``torch.Generator``, or B of them (one per image: image i then
                depends only on generator i, not on the batch it shares).
            latents: optional (B, c, h, w) starting noise, instead of drawing it.
            eta: DDIM's eta (0: deterministic); ignored by schedulers without it.
            output_type: pil (list of PIL images) | np ((B, H, W, 3) float32 in [0, 1]) |
                pt ((B, 3, H, W) float32 in [0, 1]) | latent ((B, c, h, w) denoised
                latents, still multiplied by the scaling factor).
            return_dict: return ``ImagePipelineOutput`` (else a 1-tuple).
        Returns:
            ``ImagePipelineOutput(images=...)`` in ``output_type``.
        Raises:
            ValueError: on a label out of range or for an unconditional U-Net, a wrong
                number of labels or generators, an unknown ``output_type``, or a scheduler
                that does not fit the U-Net's ``prediction_type`` (``check_scheduler``).
        """
        self.check_scheduler()
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for batch_size {batch_size}; give one or B")
        device = self._execution_device
        labels = self._labels(class_labels, batch_size, device)
        guided = labels is not None and class_labels is not None and guidance_scale != 1.0
        null_labels = torch.full_like(labels, null_class_index(self.unet)) if guided else None

        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        shape = (batch_size, self.unet.config.in_channels, h, w)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        # Flow schedulers start from unit noise at sigma = 1 and have no input scaling.
        latents = latents.to(device) * getattr(self.scheduler, "init_noise_sigma", 1.0)
        scale_input = getattr(self.scheduler, "scale_model_input", lambda x, t: x)

        step_params = inspect.signature(self.scheduler.step).parameters
        step_kwargs = {k: v for k, v in (("generator", generator), ("eta", eta)) if k in step_params}
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = scale_input(model_input, t)  # t: an int step, or flow's float sigma * T
            model_labels = torch.cat([labels, null_labels]) if guided else labels
            out = self.unet(model_input, t, class_labels=model_labels).sample  # (B or 2B, c, h, w)
            if guided:
                cond, uncond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(out, t, latents, **step_kwargs).prev_sample

        if output_type == "latent":
            images = latents
        else:
            # Undo the training scale: z = latents / scaling_factor + shift_factor.
            z = latents / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
            decoded = self.vae.decode(z.to(self.vae.dtype)).sample.float()  # (B, 3, H, W), about [-1, 1]
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
