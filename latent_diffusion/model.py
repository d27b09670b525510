"""Build the stage-2 U-Net and its noise schedulers (diffusers ``UNet2DModel``, schedulers).

The U-Net *is* ``diffusers.UNet2DModel`` (no subclass), so ``pipeline/unet`` loads in the
ecosystem. Class conditioning uses its ``num_class_embeds``: a learned embedding added
to the timestep embedding, with one extra row for the "null" class that classifier-free
guidance trains by label dropout (Ho & Salimans 2022) -- label ``num_classes`` means
"no label".
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UNet2DModel,
)
from diffusers.configuration_utils import FrozenDict

from .config import SAMPLERS, ModelConfig, NoiseConfig, check_sampler
from .pipeline import is_flow, scheduler_objective

__all__ = ["SAMPLERS", "build_noise_scheduler", "build_sampler", "build_unet", "is_flow", "scheduler_objective"]


def build_unet(cfg: ModelConfig, latent_shape: tuple[int, int, int], num_classes: int | None) -> UNet2DModel:
    """A randomly initialised ``UNet2DModel`` for (c, h, w) latents.

    Args:
        cfg: ``model.*`` options.
        latent_shape: (c, h, w) of one cached latent: in/out channels c, ``sample_size`` h.
        num_classes: classes in the cache, or None for an unconditional model. A
            conditional model gets ``num_class_embeds = num_classes + 1``; index
            ``num_classes`` is the null class (``null_class_index``).
    Returns:
        The U-Net in train mode, float32, on the CPU.
    Raises:
        ValueError: if h or w is not divisible by 2 ** (levels - 1), the latents are not
            square, or ``num_classes`` < 1.
    """
    c, h, w = latent_shape
    levels = len(cfg.block_out_channels)
    if h != w:
        raise ValueError(f"latents must be square, got (c, h, w) = {latent_shape}")
    if h % 2 ** (levels - 1):
        raise ValueError(
            f"latent size {h} must be divisible by 2 ** (levels - 1) = {2 ** (levels - 1)} for the "
            f"{levels}-level model.block_out_channels {cfg.block_out_channels}; use fewer levels"
        )
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 or None, got {num_classes}")
    return UNet2DModel(
        sample_size=h,
        in_channels=c,
        out_channels=c,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=tuple(cfg.down_block_types),
        up_block_types=tuple(cfg.up_block_types),
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        dropout=cfg.dropout,
        num_class_embeds=None if num_classes is None else num_classes + 1,
    )


def build_noise_scheduler(cfg: NoiseConfig) -> DDPMScheduler | FlowMatchEulerDiscreteScheduler:
    """The training forward process, as a diffusers scheduler.

    epsilon, v_prediction: ``DDPMScheduler`` with the configured betas.
    ``add_noise(c_0, eps, t)`` = sqrt(alpha_bar_t) c_0 + sqrt(1 - alpha_bar_t) eps, with
    alpha_bar_t = prod_{s <= t} (1 - beta_s) (``alphas_cumprod[t]``, t in 0..T-1 being
    the paper's 1..T). ``clip_sample`` is off: latents are not confined to [-1, 1].

    flow: ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=noise.flow_shift)``.
    Training uses only its config (T; ``train.flow_noisy_and_target`` forms c_t), and
    sampling schedulers are made from that config, so they feed the U-Net the t * T it
    was trained on.
    """
    if cfg.prediction_type == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps, shift=cfg.flow_shift)
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
        timestep_spacing=cfg.timestep_spacing,
    )


def build_sampler(name: str, config: FrozenDict | dict[str, Any], shift: float | None = None) -> Any:
    """A sampling scheduler made from another scheduler's config (same betas, target).

    Args:
        name: for epsilon and v_prediction models: ddim (eta 0, Song et al. 2021) | ddpm
            (ancestral) | dpm (DPM-Solver++ 2M, Lu et al. 2022: ``DPMSolverMultistepScheduler``
            with ``algorithm_type dpmsolver++``, ``solver_order`` 2) | euler
            (``EulerDiscreteScheduler``, Karras et al. 2022). For flow models: flow_euler
            (``FlowMatchEulerDiscreteScheduler``, one U-Net call per step) | flow_heun
            (``FlowMatchHeunDiscreteScheduler``, Karras et al.'s 2nd-order Heun: 2N - 1
            U-Net calls for N steps).
        config: e.g. ``pipeline.scheduler.config``; its betas, ``prediction_type`` and
            ``timestep_spacing`` (or, for flow, T and ``shift``) carry over.
        shift: flow samplers only: replaces the config's ``shift`` (sigma -> shift sigma /
            (1 + (shift - 1) sigma)); None keeps it.
    Raises:
        ValueError: on an unknown name, a name that does not fit the config's objective
            (``scheduler_objective``), or a ``shift`` for a DDPM-family sampler or <= 0.
    """
    check_sampler(name, scheduler_objective(config))
    config = dict(config)
    if shift is not None and (name not in ("flow_euler", "flow_heun") or not shift > 0):
        raise ValueError(f"shift={shift}: a shift > 0 applies to the flow samplers only, not to {name!r}")
    if name == "ddim":
        return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False)
    if name == "ddpm":
        return DDPMScheduler.from_config(config, clip_sample=False)
    if name == "dpm":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    shift = config["shift"] if shift is None else shift
    if name == "flow_euler":  # from_config keeps any other option of a saved FlowMatchEuler config
        return FlowMatchEulerDiscreteScheduler.from_config(config, shift=shift)
    return FlowMatchHeunDiscreteScheduler(num_train_timesteps=config["num_train_timesteps"], shift=shift)
