"""``LatentDiffusionPipeline``: noise -> denoiser in latent space -> VAE decode -> images.

A ``diffusers.DiffusionPipeline`` with three components: the denoiser, ``scheduler`` (any
diffusers sampling scheduler) and ``vae`` (the ``AutoencoderKL`` the latents came from).
The denoiser is a U-Net (``UNet2DModel``, saved as ``unet/``) or a transformer
(``DiTTransformer2DModel``, saved as ``transformer/``: diffusers' name for it, as in
``DiTPipeline``); ``DENOISERS`` below is the one table of what differs between the two.
``save_pretrained`` writes the usual folder (``model_index.json``, the denoiser,
``scheduler/``, ``vae/``, safetensors) and ``LatentDiffusionPipeline.from_pretrained(DIR)``
loads it back, offline, reading each component's class from ``model_index.json``.

The objective the denoiser was trained with is recorded in ``model_index.json`` as
``prediction_type`` (epsilon | v_prediction | flow); every call checks that the scheduler
integrates that objective (a DDPM-family scheduler with the same ``prediction_type``, or
a ``FlowMatch*`` scheduler for flow), so a swapped-in sampler that does not fit is an
error, not a page of noise.

The scale of the latent space lives in the pipeline's ``vae.config`` and is read by
``LatentNormalization`` (the one place that maps raw VAE latents z to what the denoiser
sees and back): ``global`` (LDM, SD 1.x/2.x/3: ``latents = (z - shift_factor) *
scaling_factor``) or ``per_channel`` (LightningDiT's channel-wise mean/std, stored in the
``latents_mean`` / ``latents_std`` fields diffusers' ``AutoencoderKL`` config has for
SDXL-style VAEs). ``train.py`` writes the values it actually trained with into
``pipeline/vae/config.json``; sampling undoes exactly those before decoding; nothing is
hard-coded (Rombach et al. 2022, sec. 4.3.2: SD 1.x's 0.18215 is one VAE's value, not a
constant).

This file is self-contained (torch and diffusers only): ``latent_diffusion.export``
copies it into every exported pipeline folder as ``pipeline.py`` and names it in
``model_index.json``, so that plain diffusers loads the folder without this package,
through its custom-pipeline mechanism::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("runs/ldm-demo/pipeline", trust_remote_code=True)

(A class-conditional DiT that ``diffusers.DiTPipeline`` can sample is exported for
``DiTPipeline`` instead; ``latent_diffusion.export`` says when.) Keep it free of imports
from ``latent_diffusion`` and ``autoencoderkl``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")  # as latent_diffusion.config (which must not import diffusers)
LEARNED_VARIANCES = ("learned", "learned_range")  # diffusers' variance_type values of a predicted variance


# ---- the denoiser families --------------------------------------------------------------


@dataclass(frozen=True)
class DenoiserFamily:
    """What differs between the denoiser classes, for everything after ``build_denoiser``.

    Attributes:
        component: the pipeline's name for the model (``model_index.json`` key and folder):
            ``unet``, or ``transformer`` as diffusers' transformer pipelines call it.
        class_config_key: the config key that sizes the class embedding.
        null_is_last_row: True: that key counts all rows, the null class being the last
            (``UNet2DModel.num_class_embeds`` = K + 1; None = no embedding, no label
            input). False: it counts the real classes K and the null class is row K
            (``DiTTransformer2DModel.num_embeds_ada_norm``: its ``LabelEmbedding`` adds
            the row; K = 0 for an unconditional DiT, which is still given label 0).
        plain_pipeline: the diffusers pipeline class that can sample it without our
            ``pipeline.py`` (``latent_diffusion.export`` checks when), or None.
        noun: what messages call it.
    """

    component: str
    class_config_key: str
    null_is_last_row: bool
    plain_pipeline: Optional[str] = None
    noun: str = "model"


DENOISERS = {
    "UNet2DModel": DenoiserFamily("unet", "num_class_embeds", null_is_last_row=True, noun="U-Net"),
    "DiTTransformer2DModel": DenoiserFamily("transformer", "num_embeds_ada_norm", null_is_last_row=False,
                                            plain_pipeline="DiTPipeline", noun="DiT"),
}
DENOISER_COMPONENTS = tuple(dict.fromkeys(f.component for f in DENOISERS.values()))  # ("unet", "transformer")


def denoiser_family(model: nn.Module) -> DenoiserFamily:
    """The ``DENOISERS`` entry of a model, by its class or a base class.

    ``torch.compile`` and DDP wrappers are looked through. Any other model is taken to be
    called like ``UNet2DModel`` and gets its entry (a stand-in in a test, a subclass).
    """
    model = getattr(model, "_orig_mod", getattr(model, "module", model))
    for cls in type(model).__mro__:
        if cls.__name__ in DENOISERS:
            return DENOISERS[cls.__name__]
    return DENOISERS["UNet2DModel"]


def null_class_index(model: nn.Module) -> int | None:
    """The label that means "no class": the null row of classifier-free guidance.

    UNet2DModel: ``num_class_embeds - 1``, or None when unconditional (it takes no label).
    DiTTransformer2DModel: ``num_embeds_ada_norm`` (0 for an unconditional DiT). A model
    without a config takes no label.
    """
    family = denoiser_family(model)
    config = getattr(getattr(model, "_orig_mod", getattr(model, "module", model)), "config", None)
    n = getattr(config, family.class_config_key, None)
    if n is None:
        return None
    return n - 1 if family.null_is_last_row else n


def null_labels(model: nn.Module, batch_size: int, device: Union[str, torch.device]) -> Tensor | None:
    """(B,) int64 filled with ``null_class_index``: what an unconditional call passes as
    ``class_labels``; None for a denoiser that takes no label (an unconditional U-Net)."""
    null = null_class_index(model)
    return None if null is None else torch.full((batch_size,), null, dtype=torch.long, device=device)


def learns_sigma(model: nn.Module) -> bool:
    """Whether the model predicts a variance too: 2c output channels for c input channels.

    The extra c channels are the interpolation v of improved DDPM's learned variance
    (Nichol & Dhariwal 2021, eq. 15; DiT's ``learn_sigma``), used by a ``DDPMScheduler``
    whose ``variance_type`` is ``learned_range``.
    """
    config = getattr(model, "_orig_mod", getattr(model, "module", model)).config
    return (getattr(config, "out_channels", None) or config.in_channels) == 2 * config.in_channels


# ---- latent normalisation ----------------------------------------------------------------

LATENT_NORMALIZATIONS = ("global", "per_channel", "batch_norm")


class LatentNormalization:
    """The map between raw VAE latents z and the latents the denoiser sees, and back.

    ``global`` (Rombach et al. 2022, sec. 4.3.2; SD3 adds the shift)::

        latents = (z - shift_factor) * scaling_factor
        z = 1 / scaling_factor * latents + shift_factor     (DiTPipeline's and SD's decode order)

    ``per_channel`` (LightningDiT, Yao et al. 2025: each channel standardised by the
    dataset's mean and std, times a ``latent_multiplier``, here ``scaling_factor``; the
    ``latents_mean`` / ``latents_std`` fields of diffusers' ``AutoencoderKL`` config, read
    by SDXL-style pipelines with the same formula)::

        latents = (z - latents_mean[c]) * scaling_factor / latents_std[c]
        z = latents * latents_std[c] / scaling_factor + latents_mean[c]

    ``batch_norm`` (FLUX.2's ``AutoencoderKLFlux2``: a non-affine BatchNorm over the 2x2-
    patchified latents, whose running statistics are the VAE's own normalisation; diffusers'
    ``Flux2Pipeline`` patchifies, then applies ``(x - running_mean) / sqrt(running_var +
    eps)``). Written in z's own f8 layout, with k = c p q + (y mod p) q + (x mod q) the
    patchified channel that cell (c, y, x) lands in::

        latents[:, c, y, x] = (z[:, c, y, x] - latents_mean[k]) / latents_std[k]

    which is exactly FLUX.2's patchify -> batch norm -> unpatchify (a test checks it
    against ``vae.bn``), so a DiT with 2x2 patches sees FLUX.2's tokens. No scaling on top:
    ``scaling_factor`` is 1. The statistics live in the VAE's ``bn`` buffers, not its
    config (``from_vae`` reads them).

    global and per_channel are stored in the VAE's config (``vae_config`` /
    ``from_vae_config``), so a saved pipeline carries what it was trained on. A new kind is
    one more branch in ``from_vae``, ``normalize`` and ``denormalize``.

    Args:
        kind: ``global`` | ``per_channel`` | ``batch_norm``.
        scaling_factor: > 0 (1 for batch_norm).
        shift_factor: global only.
        latents_mean, latents_std: per_channel: c floats each; batch_norm: c p q floats
            each (the patchified channels); every std > 0.
        patch_size: batch_norm only: (p, q).
    Raises:
        ValueError: on an unknown kind, a missing or inconsistent value.
    """

    def __init__(self, kind: str = "global", scaling_factor: float = 1.0, shift_factor: float = 0.0,
                 latents_mean: Optional[Sequence[float]] = None, latents_std: Optional[Sequence[float]] = None,
                 patch_size: Optional[Sequence[int]] = None):
        if kind not in LATENT_NORMALIZATIONS:
            raise ValueError(f"latent normalisation must be one of {list(LATENT_NORMALIZATIONS)}, got {kind!r}")
        if not scaling_factor > 0:
            raise ValueError(f"scaling_factor must be > 0, got {scaling_factor}")
        self.kind, self.scaling_factor = kind, float(scaling_factor)
        self.shift_factor = float(shift_factor or 0.0)
        self.latents_mean = self.latents_std = self.patch_size = None
        if kind == "batch_norm":
            if self.scaling_factor != 1.0 or self.shift_factor:
                raise ValueError(f"batch_norm normalisation is the VAE's own (FLUX.2's batch norm): no scaling_factor "
                                 f"or shift_factor on top, got {scaling_factor} and {shift_factor}")
            if patch_size is None or len(patch_size) != 2 or latents_mean is None or latents_std is None or not (
                    len(latents_mean) == len(latents_std) and len(latents_mean) % (patch_size[0] * patch_size[1]) == 0):
                raise ValueError(f"batch_norm normalisation needs a patch_size (p, q) and latents_mean / latents_std of "
                                 f"c * p * q entries each, got {patch_size}, {latents_mean} and {latents_std}")
            self.patch_size = [int(v) for v in patch_size]
        if kind in ("per_channel", "batch_norm"):
            if latents_mean is None or latents_std is None or len(latents_mean) != len(latents_std):
                raise ValueError(f"per_channel normalisation needs latents_mean and latents_std of one length, got "
                                 f"{latents_mean} and {latents_std}")
            if not all(s > 0 for s in latents_std):
                raise ValueError(f"latents_std must be > 0 in every channel, got {list(latents_std)}")
            if self.shift_factor:
                raise ValueError(f"{kind} normalisation takes no shift_factor (latents_mean is the shift)")
            self.latents_mean, self.latents_std = [float(v) for v in latents_mean], [float(v) for v in latents_std]
        self._tensors: dict[Any, tuple[Tensor, Tensor]] = {}

    @classmethod
    def from_vae(cls, vae: Any) -> "LatentNormalization":
        """The normalisation a VAE defines: ``batch_norm`` from an ``AutoencoderKLFlux2``'s ``bn``
        buffers (std = sqrt(running_var + eps)), else ``from_vae_config(vae.config)``."""
        bn = getattr(vae, "bn", None)
        if isinstance(bn, torch.nn.BatchNorm2d) and bn.running_mean is not None:
            std = torch.sqrt(bn.running_var.double() + bn.eps)
            return cls("batch_norm", latents_mean=bn.running_mean.double().tolist(), latents_std=std.tolist(),
                       patch_size=list(vae.config.patch_size))
        return cls.from_vae_config(vae.config)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LatentNormalization":
        """The inverse of ``to_dict`` (what checkpoints, reports and cache indexes keep)."""
        return cls(d["kind"], d.get("scaling_factor") or 1.0, d.get("shift_factor") or 0.0,
                   latents_mean=d.get("latents_mean"), latents_std=d.get("latents_std"), patch_size=d.get("patch_size"))

    @classmethod
    def from_vae_config(cls, config: Any) -> "LatentNormalization":
        """Read it from a VAE config: per_channel when ``latents_mean`` and ``latents_std`` are set, else global."""
        config = dict(config)
        if config.get("latents_mean") is not None and config.get("latents_std") is not None:
            return cls("per_channel", config.get("scaling_factor") or 1.0, latents_mean=config["latents_mean"],
                       latents_std=config["latents_std"])
        return cls("global", config.get("scaling_factor") or 1.0, config.get("shift_factor") or 0.0)

    def vae_config(self) -> dict[str, Any]:
        """The VAE config fields that record it (``vae.register_to_config(**this)``); the unused ones set to None.

        batch_norm records nothing: its statistics are the VAE's own ``bn`` buffers.
        """
        if self.kind == "batch_norm":
            return {}
        if self.kind == "per_channel":
            return {"scaling_factor": self.scaling_factor, "shift_factor": None,
                    "latents_mean": list(self.latents_mean), "latents_std": list(self.latents_std)}
        return {"scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "latents_mean": None, "latents_std": None}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description (``kind`` plus ``vae_config``): what checkpoints and reports keep."""
        if self.kind == "batch_norm":
            return {"kind": self.kind, "scaling_factor": 1.0, "patch_size": list(self.patch_size),
                    "latents_mean": list(self.latents_mean), "latents_std": list(self.latents_std)}
        return {"kind": self.kind, **self.vae_config()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LatentNormalization) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"LatentNormalization({self.to_dict()})"

    def _per_channel(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std broadcastable to ``like`` (..., c, h, w), on its device and dtype (cached).

        per_channel: (c, 1, 1). batch_norm: (c, h, w), entry (c, y, x) the statistic of
        patchified channel c p q + (y mod p) q + (x mod q).
        """
        key = (like.device, like.dtype, tuple(like.shape[-2:]) if self.kind == "batch_norm" else None)
        if key not in self._tensors:
            mean = torch.tensor(self.latents_mean, dtype=torch.float64)
            std = torch.tensor(self.latents_std, dtype=torch.float64)
            if self.kind == "batch_norm":
                (p, q), (h, w) = self.patch_size, like.shape[-2:]
                if h % p or w % q:
                    raise ValueError(f"latents of {h}x{w} cells do not split into the batch norm's {p}x{q} patches")
                mean, std = (torch.tile(v.view(-1, p, q), (1, h // p, w // q)) for v in (mean, std))
            else:
                mean, std = mean.view(-1, 1, 1), std.view(-1, 1, 1)
            self._tensors[key] = (mean.to(like.device, like.dtype), std.to(like.device, like.dtype))
        return self._tensors[key]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tensors": {}}  # DataLoader workers rebuild their own

    def normalize(self, z: Tensor) -> Tensor:
        """Raw latents (..., c, h, w) -> what the denoiser sees, same shape and dtype."""
        if self.kind == "batch_norm":
            mean, std = self._per_channel(z)
            return (z - mean) / std
        if self.kind == "per_channel":
            mean, std = self._per_channel(z)
            return (z - mean) * self.scaling_factor / std
        return (z - self.shift_factor) * self.scaling_factor

    def denormalize(self, latents: Tensor) -> Tensor:
        """The inverse of ``normalize``: the denoiser's latents (..., c, h, w) -> raw latents for ``vae.decode``."""
        if self.kind == "batch_norm":
            mean, std = self._per_channel(latents)
            return latents * std + mean
        if self.kind == "per_channel":
            mean, std = self._per_channel(latents)
            return latents * std / self.scaling_factor + mean
        return 1 / self.scaling_factor * latents + self.shift_factor


# ---- schedulers -----------------------------------------------------------------------------


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
        unet: the denoiser: predicts epsilon, v or the flow velocity (``prediction_type``)
            of (B, c, h, w) latents; a ``UNet2DModel`` or a ``DiTTransformer2DModel``
            (``DENOISERS``; a transformer given here is registered as ``transformer``).
            Class-conditional when it has a class embedding with real classes
            (``null_class_index``); with ``learns_sigma`` its extra c output channels are
            a learned variance.
        scheduler: a diffusers scheduler configured as in training (same betas and
            prediction type, or the flow T and shift); DDIM, DDPM, DPM-Solver++ and Euler
            are tested for epsilon and v, FlowMatchEuler and FlowMatchHeun for flow.
        vae: the frozen VAE the latents came from; its config records the
            ``LatentNormalization`` the denoiser was trained with.
        class_names: optional names of the class indices 0..K-1 (e.g. the cache's class
            folders), saved in ``model_index.json``.
        prediction_type: the denoiser's training objective, saved in ``model_index.json``;
            None (a pipeline saved before it was recorded) takes the scheduler's
            (``scheduler_objective``).
        transformer: the denoiser, when it is a transformer (how diffusers' loader passes
            a saved ``transformer/``); give either this (``unet=None``) or ``unet``.
    Raises:
        ValueError: an unknown ``prediction_type``, or no denoiser or two.

    Example::

        pipe = LatentDiffusionPipeline.from_pretrained("runs/ldm-demo/pipeline")
        images = pipe(batch_size=4, class_labels=[0, 1, 2, 3], guidance_scale=2.0,
                      generator=[torch.Generator().manual_seed(i) for i in range(4)]).images
    """

    model_cpu_offload_seq = "unet->transformer->vae"
    _optional_components = list(DENOISER_COMPONENTS)

    def __init__(self, unet: Optional[nn.Module], scheduler, vae,
                 class_names: Optional[list[str]] = None, prediction_type: Optional[str] = None,
                 transformer: Optional[nn.Module] = None):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("give the pipeline one denoiser: unet (or transformer), not none or both")
        denoiser = unet if unet is not None else transformer
        prediction_type = prediction_type or scheduler_objective(scheduler)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")
        slots = {name: None for name in DENOISER_COMPONENTS}
        slots[denoiser_family(denoiser).component] = denoiser
        self.register_modules(**slots, scheduler=scheduler, vae=vae)
        self.register_to_config(class_names=list(class_names) if class_names is not None else None,
                                prediction_type=prediction_type)
        self.image_processor = VaeImageProcessor(vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1))

    @property
    def denoiser(self) -> nn.Module:
        """The denoising model, whichever ``DENOISERS`` family it is (``self.unet`` or ``self.transformer``)."""
        return next(m for m in (getattr(self, name, None) for name in DENOISER_COMPONENTS) if m is not None)

    @denoiser.setter
    def denoiser(self, model: nn.Module) -> None:
        """Swap the denoiser for another of the same family (e.g. its ``torch.compile`` wrapper)."""
        setattr(self, denoiser_family(model).component, model)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs) -> "LatentDiffusionPipeline":
        """Load a saved pipeline folder (or a Hub repository holding one) as THIS class.

        The folder's ``model_index.json`` names its own ``pipeline.py`` (so that plain
        ``DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)`` works without
        this package), or ``DiTPipeline``; loaded through this class, each component is
        read with the diffusers class its ``model_index.json`` entry names, and no code
        from the folder runs. Class names come from ``class_names`` or, in a
        ``DiTPipeline`` folder, ``id2label``; the objective from ``prediction_type`` or
        the scheduler.

        Args:
            pretrained_model_name_or_path: a folder with ``model_index.json``, the
                denoiser (``unet/`` or ``transformer/``), ``scheduler/``, ``vae/``; or a
                Hub id (downloaded into the HF cache).
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

        def load(name: str, **options: Any) -> Any:
            library, class_name = index.get(name) or (None, None)
            if class_name is None:
                return None
            return getattr(importlib.import_module(library), class_name).from_pretrained(folder / name, **options)

        class_names = index.get("class_names")
        if class_names is None and index.get("id2label"):
            labels = index["id2label"]
            class_names = [labels[str(i)] for i in range(len(labels))]
        return cls(scheduler=load("scheduler"), vae=load("vae", **dtype), class_names=class_names,
                   prediction_type=index.get("prediction_type"),
                   **{name: load(name, **dtype) for name in DENOISER_COMPONENTS})

    @property
    def num_classes(self) -> int | None:
        """K, the number of real classes (labels 0..K-1), or None for an unconditional denoiser.

        ``class_names`` when saved (a DiT exported for ``DiTPipeline`` has a 1000-row
        label table whatever K is), else the denoiser's class embedding.
        """
        if self.config.class_names:
            return len(self.config.class_names)
        return null_class_index(self.denoiser) or None

    def check_scheduler(self) -> None:
        """Raise unless ``self.scheduler`` integrates what the denoiser predicts.

        The objective must match ``prediction_type``; a scheduler that expects a learned
        variance (``variance_type`` learned / learned_range) needs a denoiser that predicts
        one and must be a ``DDPMScheduler``: diffusers' ``DPMSolverMultistepScheduler``
        with a learned variance keeps only the first 3 channels of the prediction.

        Raises:
            ValueError: naming the scheduler, the objective and the samplers that fit.
        """
        have, want = scheduler_objective(self.scheduler), self.config.prediction_type
        if have != want:
            raise ValueError(
                f"scheduler {type(self.scheduler).__name__} integrates prediction_type {have!r}, but this "
                f"{denoiser_family(self.denoiser).noun} was "
                f"trained with {want!r} (model_index.json); sample with "
                f"{'a FlowMatch scheduler (flow_euler, flow_heun)' if want == 'flow' else 'a DDPM-family scheduler (ddim, ddpm, dpm, euler)'} "
                f"(lat sample-ldm --scheduler, or latent_diffusion.model.build_sampler)"
            )
        if self.scheduler.config.get("variance_type") in LEARNED_VARIANCES:
            name = type(self.scheduler).__name__
            if name != "DDPMScheduler":
                raise ValueError(f"{name} with variance_type={self.scheduler.config.variance_type!r} would use only the "
                                 f"first 3 channels of the prediction (diffusers); make it with variance_type=None "
                                 f"(latent_diffusion.model.build_sampler does)")
            if not learns_sigma(self.denoiser):
                raise ValueError(f"{name} with variance_type={self.scheduler.config.variance_type!r} needs a denoiser "
                                 f"that predicts the variance (model.learn_sigma); this one does not")

    def _labels(self, class_labels, batch_size: int, device: torch.device) -> Tensor | None:
        """(B,) int64 labels; the null class where none is given; None if the denoiser takes no label."""
        k = self.num_classes
        if not k and class_labels is not None:
            raise ValueError("class_labels given, but this denoiser is unconditional (no class embedding)")
        if class_labels is None:
            return null_labels(self.denoiser, batch_size, device)
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(batch_size)
        if labels.numel() != batch_size:
            raise ValueError(f"got {labels.numel()} class labels for batch_size {batch_size}")
        if labels.min() < 0 or labels.max() >= k:
            raise ValueError(f"class labels must lie in [0, {k - 1}] ({k} classes), got {labels.tolist()}")
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
        guidance_interval: Optional[tuple[float, float]] = None,
    ) -> Union[ImagePipelineOutput, tuple]:
        """Sample images.

        Args:
            batch_size: B, images to generate.
            num_inference_steps: sampler steps.
            class_labels: one int for all images, or B ints in [0, K); None samples the
                null class (unconditional; with an unconditional denoiser, must be None).
            guidance_scale: s of classifier-free guidance, eps = eps(null) + s (eps(y) -
                eps(null)) on every latent channel (Ho & Salimans 2022; likewise for v and
                the flow velocity; a learned variance is the conditional one, as in DiT).
                1 uses the conditional prediction alone (one denoiser call per step);
                other values cost two. Ignored without labels.
            generator: a ``torch.Generator``, or B of them (one per image: image i then
                depends only on generator i, not on the batch it shares).
            latents: optional (B, c, h, w) starting noise, instead of drawing it.
            eta: DDIM's eta (0: deterministic); ignored by schedulers without it.
            output_type: pil (list of PIL images) | np ((B, H, W, 3) float32 in [0, 1]) |
                pt ((B, 3, H, W) float32 in [0, 1]) | latent ((B, c, h, w) denoised
                latents, still normalised as in training).
            return_dict: return ``ImagePipelineOutput`` (else a 1-tuple).
            guidance_interval: (lo, hi) with 0 <= lo <= hi <= 1: guide only the steps
                whose noise level t / T (the step's timestep over the scheduler's
                ``num_train_timesteps``: 1 = pure noise; for flow, sigma) lies in
                [lo, hi], and use the conditional prediction alone (one call) at the
                others (Kynkaanniemi et al. 2024, "Applying guidance in a limited
                interval"; LightningDiT skips the noisiest 11%: (0, 0.89)). None: every step.
        Returns:
            ``ImagePipelineOutput(images=...)`` in ``output_type``.
        Raises:
            ValueError: on a label out of range or for an unconditional denoiser, a wrong
                number of labels or generators, an unknown ``output_type``, a bad
                ``guidance_interval``, or a scheduler that does not fit the denoiser
                (``check_scheduler``).
        """
        self.check_scheduler()
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for batch_size {batch_size}; give one or B")
        if guidance_interval is not None:
            lo, hi = guidance_interval
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"guidance_interval must be (lo, hi) with 0 <= lo <= hi <= 1, got {guidance_interval}")
        denoiser = self.denoiser
        device = self._execution_device
        labels = self._labels(class_labels, batch_size, device)
        guided = labels is not None and class_labels is not None and guidance_scale != 1.0
        uncond_labels = torch.full_like(labels, null_class_index(denoiser)) if guided else None

        size = denoiser.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        c = denoiser.config.in_channels
        shape = (batch_size, c, h, w)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=denoiser.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        # Flow schedulers start from unit noise at sigma = 1 and have no input scaling.
        latents = latents.to(device) * getattr(self.scheduler, "init_noise_sigma", 1.0)
        scale_input = getattr(self.scheduler, "scale_model_input", lambda x, t: x)
        # Only a DDPMScheduler with a learned variance takes the 2c channels of learns_sigma.
        keep_variance = self.scheduler.config.get("variance_type") in LEARNED_VARIANCES
        num_train_timesteps = self.scheduler.config.num_train_timesteps

        step_params = inspect.signature(self.scheduler.step).parameters
        step_kwargs = {k: v for k, v in (("generator", generator), ("eta", eta)) if k in step_params}
        for t in self.progress_bar(self.scheduler.timesteps):
            guide = guided and (guidance_interval is None
                                or guidance_interval[0] <= float(t) / num_train_timesteps <= guidance_interval[1])
            model_input = torch.cat([latents, latents]) if guide else latents
            model_input = scale_input(model_input, t)  # t: an int step, or flow's float sigma * T
            model_labels = torch.cat([labels, uncond_labels]) if guide else labels
            timesteps = torch.as_tensor(t, device=device).reshape(1).expand(len(model_input))  # (B or 2B,): a DiT needs it
            out = denoiser(model_input, timesteps, class_labels=model_labels).sample  # (B or 2B, c or 2c, h, w)
            if guide:
                cond, uncond = out.chunk(2)
                # Every latent channel is guided (DiT #41: the original code guided 3); a
                # learned variance stays the conditional one.
                out = torch.cat([uncond[:, :c] + guidance_scale * (cond[:, :c] - uncond[:, :c]), cond[:, c:]], dim=1)
            if not keep_variance:
                out = out[:, :c]
            latents = self.scheduler.step(out, t, latents, **step_kwargs).prev_sample

        if output_type == "latent":
            images = latents
        else:
            z = LatentNormalization.from_vae(self.vae).denormalize(latents)  # undo the training scale
            decoded = self.vae.decode(z.to(self.vae.dtype)).sample.float()  # (B, 3, H, W), about [-1, 1]
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
