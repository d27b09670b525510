"""Typed stage-2 run configuration: defaults < YAML file < ``key=value`` overrides.

The same machinery as stage 1 (``autoencoderkl.config.merge_config`` / ``save_config``):
an unknown key, a wrong type or a value outside its choices stops the run before any
work, naming the key and listing the valid ones.

Defaults follow LDM (Rombach et al. 2022) where it has one: the DDPM noise schedule
"scaled_linear" from beta 0.00085 to 0.012 over 1000 steps, epsilon prediction, a plain
MSE; AdamW, warm-up and an EMA of the denoiser as diffusers' training examples do. The
flow-matching objective (``noise.prediction_type: flow``) follows Stable Diffusion 3
(Esser et al. 2024): logit-normal timesteps, the velocity target, diffusers'
FlowMatch schedulers for sampling.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from autoencoderkl.config import LOOP_CHOICES, LoopConfig, check_loop_config, merge_config

# diffusers block names a UNet2DModel accepts (the rest are conditioning-specific).
DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")


@dataclass
class ModelConfig:
    """The denoiser that predicts the noise (or v, or the flow velocity) of a latent.

    ``type`` picks the diffusers class (``latent_diffusion.model.build_denoiser``); the
    keys of the other type must stay unset (null), and each unset key of this type takes
    its default from ``MODEL_DEFAULTS``. In/out channels and ``sample_size`` are not
    options: they come from the latent cache (c and h of its (c, h, w) latents).
    """

    # unet: LDM's U-Net (diffusers UNet2DModel) | dit: DiT, Peebles & Xie 2023 (diffusers
    # DiTTransformer2DModel: patches, adaLN-Zero; with noise.prediction_type=flow it is SiT,
    # Ma et al. 2024).
    type: str = "unet"
    # unet only: channels of each resolution level; len - 1 downsamplings, so h must be
    # divisible by 2 ** (len - 1). null: [128, 256, 256].
    block_out_channels: Optional[list[int]] = None
    # unet only: one block type per level, from the input resolution down (Attn* =
    # self-attention after each ResNet layer of that level). null: [DownBlock2D,
    # AttnDownBlock2D, AttnDownBlock2D].
    down_block_types: Optional[list[str]] = None
    # unet only: the same levels on the way up, from the lowest resolution. null:
    # [AttnUpBlock2D, AttnUpBlock2D, UpBlock2D].
    up_block_types: Optional[list[str]] = None
    layers_per_block: Optional[int] = None  # unet only: ResNet layers per level (up blocks get one more). null: 2
    norm_num_groups: Optional[int] = None  # unet only: GroupNorm groups; must divide every block width. null: 32
    patch_size: Optional[int] = None  # dit only: p, each p x p patch of the latent is a token; p divides h. null: 2
    num_layers: Optional[int] = None  # dit only: transformer blocks (DiT's depth N). null: 12 (DiT-S)
    num_attention_heads: Optional[int] = None  # dit only: heads; hidden size = heads x attention_head_dim. null: 6
    # Channels per attention head (both types). null: unet 32; dit 64, as DiT-S/B/L (XL: 72).
    attention_head_dim: Optional[int] = None
    dropout: float = 0.0  # in the ResNet blocks (unet) or after attention and MLP (dit), in [0, 1)
    # Condition on the cache's class labels when it has any (a learned class embedding
    # with one extra row for the "null" class of classifier-free guidance). false trains
    # an unconditional model even on a labelled cache.
    class_conditional: bool = True
    # Probability that a training label is replaced by the null class (Ho & Salimans 2022,
    # classifier-free guidance); 0 disables guidance at sampling time in effect. Drawn by
    # the training loop (seeded, exact on resume), never by the model itself.
    label_dropout: float = 0.1
    # Also predict the variance of each reverse step (2c output channels; improved DDPM,
    # Nichol & Dhariwal 2021: trained by its L_vlb term with the mean frozen, as DiT does;
    # used by the ddpm sampler). epsilon and v_prediction only. false: fixed variances.
    learn_sigma: bool = False


# The default of each type-specific model key, per model.type: a key of another type
# must stay null (load_config refuses it), an unset key of this type takes this value.
MODEL_DEFAULTS: dict[str, dict[str, object]] = {
    "unet": {"block_out_channels": [128, 256, 256],
             "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
             "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
             "layers_per_block": 2, "norm_num_groups": 32, "attention_head_dim": 32},
    "dit": {"patch_size": 2, "num_layers": 12, "num_attention_heads": 6, "attention_head_dim": 64},
}
MODEL_TYPES = tuple(MODEL_DEFAULTS)


@dataclass
class NoiseConfig:
    """The forward process q(c_t | c_0) and the training target.

    epsilon and v_prediction: the DDPM process (diffusers ``DDPMScheduler``, the beta_*
    keys). flow: the straight path c_t = (1 - t) c_0 + t eps, t in [0, 1] (rectified
    flow, Liu et al. 2022; flow matching, Lipman et al. 2023), whose keys are
    timestep_sampling, logit_mean, logit_std and flow_shift; the beta_* keys and
    timestep_spacing do not apply to it.
    """

    # T. DDPM: training draws t uniformly from {1..T}. flow: the denoiser's timestep input is
    # t * T (t in [0, 1]), the units diffusers' FlowMatch schedulers feed it.
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"  # LDM: betas = linspace(sqrt(b0), sqrt(b1), T) ** 2
    beta_start: float = 0.00085  # beta_1 of the schedule (LDM's)
    beta_end: float = 0.012  # beta_T of the schedule (LDM's)
    # What the denoiser predicts: epsilon (LDM, DDPM) | v_prediction (Salimans & Ho 2022,
    # v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) c_0) | flow (the velocity eps - c_0 of
    # c_t = (1 - t) c_0 + t eps; SD3, Esser et al. 2024).
    prediction_type: str = "epsilon"
    # Min-SNR-gamma loss weighting (Hang et al. 2023): weight min(SNR_t, gamma) / SNR_t
    # for epsilon, / (SNR_t + 1) for v. null = the plain (unweighted) MSE. 5 is the paper's.
    # Defined for the DDPM objectives only: flow refuses it (its timestep density,
    # timestep_sampling, is where SD3 puts the weighting).
    snr_gamma: Optional[float] = None
    # flow: how t is drawn each step: logit_normal (t = sigmoid(n), n ~ N(logit_mean,
    # logit_std^2); SD3's default, which favours the middle of the path) | uniform on [0, 1).
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # flow: the samplers' shift s (diffusers' FlowMatch* ``shift``): sigma -> s sigma /
    # (1 + (s - 1) sigma); s > 1 spends more sampling steps at high noise (SD3: 3.0 at
    # 1024 px). Saved in pipeline/scheduler; lat sample-ldm --shift overrides it.
    flow_shift: float = 1.0
    # flow: also train on the shifted schedule: each drawn t becomes s t / (1 + (s - 1) t)
    # with s = flow_shift (SD3, Esser et al. 2024 sec. 5.3.2, as diffusers' SD3 training
    # scripts do; for logit_normal t it equals logit_mean + log s, LightningDiT's shifted
    # "lognorm"). false: the shift is for sampling only (plain SiT; the earlier behaviour).
    flow_shift_in_training: bool = False
    # Sampler saved in pipeline/ and used for the training-time sample grids: for epsilon
    # and v_prediction ddim (eta 0) | ddpm (ancestral, the training chain) | dpm | euler;
    # for flow flow_euler | flow_heun (diffusers' FlowMatchEuler/HeunDiscreteScheduler).
    # null: the objective's default, ddim or flow_euler. lat sample-ldm --scheduler can swap it.
    pipeline_scheduler: Optional[str] = None
    # How sampling picks its timesteps: trailing (starts at t = T, Lin et al. 2024) |
    # leading (SD 1.x) | linspace.
    timestep_spacing: str = "trailing"


@dataclass
class DataConfig:
    """The latent cache (``lat encode-latents``) and the VAE that decodes it."""

    latents: Optional[str] = None  # the cache folder (--latents)
    # A held-out latent cache (same VAE, same latent shape) for the fixed-noise validation
    # loss, normalised like the training latents. null: that loss uses latents of the
    # training cache (a measure of fit, not of generalisation).
    val_latents: Optional[str] = None
    # Latents (posterior means, evenly spaced over the cache) in the fixed-noise validation
    # loss, each noised at VAL_TIMESTEPS evenly spaced t; fewer if the cache has fewer.
    num_val_latents: int = 32
    # The diffusers AutoencoderKL the cache was encoded with (--vae); null = the path the
    # cache's index.json records. Used to decode sample grids; a cache made by a different
    # VAE (weights hash) is refused.
    vae: Optional[str] = None
    # z = mean + std * eps, a fresh posterior draw per use (LDM); false trains on the mean.
    sample_posterior: bool = True
    # How raw latents z become what the denoiser sees (pipeline.LatentNormalization; the
    # values are written into pipeline/vae/config.json, which sampling undoes):
    # global: latents = (z - shift_factor) * scaling_factor (LDM, DiT, SD3) |
    # per_channel: latents = (z - mean_c) * scaling_factor / std_c with the cache's
    # per-channel statistics (LightningDiT; saved as the VAE's latents_mean/latents_std).
    latent_normalization: str = "global"
    # global: scaling_factor null = 1 / std of what is trained on (LDM sec. 4.3.2), from the
    # cache's statistics: of the posterior samples, or of the means with sample_posterior
    # false. per_channel: a multiplier after standardising (LightningDiT's
    # latent_multiplier), null = 1.0.
    # shift_factor (global only) null: 0.0, as SD 1.x/2.x. (The cache's index.json records
    # the latents' mean as its shift_factor; pass that for an SD3-style centred space.)
    scaling_factor: Optional[float] = None
    shift_factor: Optional[float] = None  # subtracted from z before scaling_factor multiplies it; null: 0.0
    batch_size: int = 64  # per process
    # Latents are small and memory-mapped: 0 reads them in the main process (needed for a
    # bit-exact resume, since the posterior draws then come from the checkpointed RNG).
    num_workers: int = 0


@dataclass
class OptimConfig:
    """AdamW on the denoiser, with a warm-up."""

    lr: float = 1e-4  # per optimizer step; no hidden scaling with the batch
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2)
    weight_decay: float = 0.01  # decoupled weight decay of AdamW
    eps: float = 1e-8  # AdamW's epsilon
    max_grad_norm: Optional[float] = 1.0  # clip the global gradient norm; null = off
    # diffusers.optimization schedule over train.max_steps:
    # constant | constant_with_warmup | linear | cosine.
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 500  # optimizer steps of linear warm-up from 0
    fused: bool = True  # the fused (single-kernel) AdamW on CUDA; ignored on CPU


@dataclass
class TrainConfig(LoopConfig):
    """The stage-2 loop: ``autoencoderkl.config.LoopConfig`` plus EMA warm-up and sample grids."""

    use_ema: bool = True  # pipeline/ gets the EMA weights (diffusers EMAModel)
    ema_decay: float = 0.9999  # the EMA's decay (its maximum, with ema_warmup)
    # Ramp the decay up as 1 - (1 + step) ** -ema_power (diffusers' use_ema_warmup with
    # inv_gamma 1), capped at ema_decay, so short runs are not dominated by the init.
    ema_warmup: bool = True
    ema_power: float = 0.75  # see ema_warmup
    # Every train.validation_steps: a fixed-noise validation loss and a grid of
    # samples (EMA weights), num_validation_samples images from fixed seeds 0..N-1
    # (0: no grid, only the loss).
    num_validation_samples: int = 16
    validation_inference_steps: int = 50  # sampler steps for the grids
    validation_guidance_scale: float = 1.0  # classifier-free guidance for the grids


@dataclass
class LDMConfig:
    """A whole stage-2 run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# The training objectives, and the samplers that integrate each one's prediction.
# Objectives and the samplers (latent_diffusion.model.build_sampler) that fit each; here,
# not in model.py, so that command-line --help lists them without importing diffusers.
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")
DDPM_SAMPLERS = ("ddim", "ddpm", "dpm", "euler")
FLOW_SAMPLERS = ("flow_euler", "flow_heun")
SAMPLERS = DDPM_SAMPLERS + FLOW_SAMPLERS


def samplers_for(prediction_type: str) -> tuple[str, ...]:
    """The sampler names (``latent_diffusion.model.build_sampler``) that fit an objective."""
    return FLOW_SAMPLERS if prediction_type == "flow" else DDPM_SAMPLERS


def default_sampler(prediction_type: str) -> str:
    """ddim for epsilon and v_prediction, flow_euler for flow."""
    return samplers_for(prediction_type)[0]


def check_sampler(name: str, prediction_type: str, what: str = "scheduler") -> None:
    """Raise unless sampler ``name`` integrates what a ``prediction_type`` denoiser predicts.

    Raises:
        ValueError: naming ``what`` (e.g. ``--scheduler``), the objective and the samplers
            that fit it.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown {what} {name!r}; valid: {list(SAMPLERS)}")
    if name not in samplers_for(prediction_type):
        flow = prediction_type == "flow"
        why = ("the model predicts the flow velocity, which only the flow samplers integrate" if flow
               else "the flow samplers integrate a velocity, which this model does not predict")
        raise ValueError(f"{what} {name!r} does not fit a model trained with prediction_type {prediction_type!r}: "
                         f"{why}; use one of {list(samplers_for(prediction_type))}")


CHOICES: dict[str, tuple[str, ...]] = {
    "model.type": MODEL_TYPES,
    "data.latent_normalization": ("global", "per_channel"),
    "noise.beta_schedule": ("scaled_linear", "linear", "squaredcos_cap_v2"),
    "noise.prediction_type": PREDICTION_TYPES,
    "noise.timestep_sampling": ("logit_normal", "uniform"),
    "noise.timestep_spacing": ("trailing", "leading", "linspace"),
    **LOOP_CHOICES,
}


def load_config(yaml_path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> LDMConfig:
    """Stage-2 config: ``merge_config(LDMConfig, ...)`` plus cross-field checks.

    Args:
        yaml_path: a YAML file with any subset of the keys, nested (e.g.
            ``configs/latent_diffusion/demo.yaml``).
        overrides: dotted ``section.key=value`` strings, e.g. ``train.max_steps=200``.
    Returns:
        The typed ``LDMConfig``. ``data.latents`` may still be None here: the command line
        fills it from ``--latents``, and ``train.main`` checks it.
    Raises:
        FileNotFoundError: if ``yaml_path`` does not exist.
        ValueError: on an unknown key (listing the valid ones), a wrong type, a value
            outside its choices, a block list that does not match ``block_out_channels``,
            or a count, probability or rate out of range.
    """
    cfg = merge_config(LDMConfig, yaml_path, overrides, CHOICES)
    m = cfg.model
    resolve_model_keys(m)
    MODEL_CHECKS[m.type](m)
    check_loop_config(cfg, extra_positive=("train.validation_inference_steps", "data.num_val_latents",
                                            "noise.num_train_timesteps"))
    if cfg.train.num_validation_samples < 0:
        raise ValueError(f"train.num_validation_samples must be >= 0 (0: no sample grid), got {cfg.train.num_validation_samples}")
    for key, value in (("model.label_dropout", m.label_dropout), ("model.dropout", m.dropout),
                       ("train.ema_decay", cfg.train.ema_decay)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{key} must lie in [0, 1), got {value}")
    noise = cfg.noise
    if noise.snr_gamma is not None and noise.prediction_type == "flow":
        raise ValueError(
            f"noise.snr_gamma={noise.snr_gamma}: Min-SNR weighting (Hang et al. 2023) is defined for the DDPM "
            f"objectives (epsilon, v_prediction), not for noise.prediction_type=flow, whose weighting over t is "
            f"noise.timestep_sampling (logit_normal, SD3); set noise.snr_gamma=null"
        )
    if noise.snr_gamma is not None and noise.snr_gamma <= 0:
        raise ValueError(f"noise.snr_gamma must be > 0 (5 in Hang et al. 2023) or null, got {noise.snr_gamma}")
    if noise.pipeline_scheduler is not None:
        check_sampler(noise.pipeline_scheduler, noise.prediction_type, "noise.pipeline_scheduler")
    for key, value in (("noise.logit_std", noise.logit_std), ("noise.flow_shift", noise.flow_shift)):
        if not value > 0:
            raise ValueError(f"{key} must be > 0, got {value}")
    if m.learn_sigma and noise.prediction_type == "flow":
        raise ValueError("model.learn_sigma=true: a learned variance (improved DDPM's L_vlb) belongs to the DDPM "
                         "objectives (epsilon, v_prediction), not to noise.prediction_type=flow; set model.learn_sigma=false")
    if cfg.data.scaling_factor is not None and cfg.data.scaling_factor <= 0:
        raise ValueError(f"data.scaling_factor must be > 0 or null (the cache's), got {cfg.data.scaling_factor}")
    if cfg.data.latent_normalization == "per_channel" and cfg.data.shift_factor is not None:
        raise ValueError(f"data.shift_factor={cfg.data.shift_factor} applies to data.latent_normalization=global only: "
                         f"per_channel subtracts each channel's mean; set data.shift_factor=null")
    return cfg


def resolve_model_keys(m: ModelConfig) -> None:
    """Refuse the keys of the other model type; fill the unset keys of this one from ``MODEL_DEFAULTS``.

    Raises:
        ValueError: naming each key set for another type and listing this type's keys.
    """
    own = MODEL_DEFAULTS[m.type]
    others = sorted({k for defaults in MODEL_DEFAULTS.values() for k in defaults} - set(own))
    wrong = [k for k in others if getattr(m, k) is not None]
    if wrong:
        raise ValueError(
            f"model.type={m.type} does not use {', '.join('model.' + k for k in wrong)} (keys of "
            f"model.type={'/'.join(t for t in MODEL_TYPES if t != m.type)}); remove them or set model.type. "
            f"model.type={m.type} takes: {', '.join('model.' + k for k in own)}, and model.dropout, "
            f"model.class_conditional, model.label_dropout, model.learn_sigma"
        )
    for key, default in own.items():
        if getattr(m, key) is None:
            setattr(m, key, list(default) if isinstance(default, list) else default)
    for key in own:
        value = getattr(m, key)
        if isinstance(value, int) and value < 1:
            raise ValueError(f"model.{key} must be >= 1, got {value}")


def check_unet_keys(m: ModelConfig) -> None:
    """The U-Net's block lists agree with its widths and are diffusers block names.

    Raises:
        ValueError: naming the key.
    """
    levels = len(m.block_out_channels)
    if levels < 1 or len(m.down_block_types) != levels or len(m.up_block_types) != levels:
        raise ValueError(
            f"model.block_out_channels ({levels} levels: {m.block_out_channels}), model.down_block_types "
            f"({m.down_block_types}) and model.up_block_types ({m.up_block_types}) must have the same length"
        )
    for key, names, allowed in (("model.down_block_types", m.down_block_types, DOWN_BLOCKS),
                                ("model.up_block_types", m.up_block_types, UP_BLOCKS)):
        bad = [n for n in names if n not in allowed]
        if bad:
            raise ValueError(f"{key}: unknown block type(s) {bad}; valid: {list(allowed)}")
    bad = [c for c in m.block_out_channels if c % m.norm_num_groups or c % m.attention_head_dim]
    if bad:
        raise ValueError(
            f"model.block_out_channels {m.block_out_channels} must be divisible by model.norm_num_groups="
            f"{m.norm_num_groups} and model.attention_head_dim={m.attention_head_dim}; {bad} are not"
        )


def check_dit_keys(m: ModelConfig) -> None:
    """The DiT's hidden size (heads x head dim) is even, as its 2-D sin-cos position embedding needs.

    Raises:
        ValueError: naming the keys.
    """
    hidden = m.num_attention_heads * m.attention_head_dim
    if hidden % 4:
        raise ValueError(f"the DiT hidden size model.num_attention_heads x model.attention_head_dim = "
                         f"{m.num_attention_heads} x {m.attention_head_dim} = {hidden} must be divisible by 4 "
                         f"(its 2-D sin-cos position embedding splits it in four)")


MODEL_CHECKS = {"unet": check_unet_keys, "dit": check_dit_keys}  # per model.type, after resolve_model_keys
