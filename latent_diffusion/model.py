"""Build the stage-2 denoiser and its noise schedulers (diffusers models and schedulers).

``build_denoiser`` is the one place that turns ``model.type`` into a diffusers class:
``unet`` -> ``UNet2DModel`` (no subclass), ``dit`` -> ``DiTTransformer2DModel``, so the
exported folder loads in the ecosystem. Everything after it (the training loop, the
pipeline, the exports) reads what differs between the two from the built object
(``latent_diffusion.pipeline.DENOISERS``: the null class, the folder name, a learned
variance), never from the config's type again.

Class conditioning: a learned class embedding with one extra row for the "null" class
that classifier-free guidance trains by label dropout (Ho & Salimans 2022). The U-Net
adds it to the timestep embedding (``num_class_embeds`` = K + 1, null = K); the DiT feeds
timestep + class embedding to every block's adaLN-Zero (``num_embeds_ada_norm`` = K, its
``LabelEmbedding`` adds the null row K).
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UNet2DModel,
)
from diffusers.configuration_utils import FrozenDict
from diffusers.models.embeddings import LabelEmbedding
from torch import nn

from .config import SAMPLERS, ModelConfig, NoiseConfig, check_sampler
from .pipeline import is_flow, learns_sigma, scheduler_objective

__all__ = ["SAMPLERS", "build_denoiser", "build_dit", "build_noise_scheduler", "build_sampler", "build_unet",
           "is_flow", "learns_sigma", "scheduler_objective"]


def build_denoiser(cfg: ModelConfig, latent_shape: tuple[int, int, int], num_classes: int | None) -> nn.Module:
    """A randomly initialised denoiser of ``cfg.type`` for (c, h, w) latents.

    Args:
        cfg: ``model.*`` options (resolved by ``load_config``: the type's keys set).
        latent_shape: (c, h, w) of one normalised latent.
        num_classes: classes in the cache, or None for an unconditional model.
    Returns:
        ``build_unet``'s ``UNet2DModel`` or ``build_dit``'s ``DiTTransformer2DModel``, in
        train mode, float32, on the CPU.
    Raises:
        ValueError: from the builder (a latent shape the model cannot take), or an
            unknown ``cfg.type``.
    """
    builders = {"unet": build_unet, "dit": build_dit}
    if cfg.type not in builders:
        raise ValueError(f"unknown model.type {cfg.type!r}; valid: {list(builders)}")
    return builders[cfg.type](cfg, latent_shape, num_classes)


def build_unet(cfg: ModelConfig, latent_shape: tuple[int, int, int], num_classes: int | None) -> UNet2DModel:
    """A randomly initialised ``UNet2DModel`` for (c, h, w) latents.

    Args:
        cfg: ``model.*`` options.
        latent_shape: (c, h, w) of one cached latent: in/out channels c, ``sample_size`` h.
        num_classes: classes in the cache, or None for an unconditional model. A
            conditional model gets ``num_class_embeds = num_classes + 1``; index
            ``num_classes`` is the null class (``null_class_index``).
    Returns:
        The U-Net in train mode, float32, on the CPU; 2c output channels with
        ``cfg.learn_sigma`` (``learns_sigma``).
    Raises:
        ValueError: if h or w is not divisible by 2 ** (levels - 1), the latents are not
            square, or ``num_classes`` < 1.
    """
    c, h, w = latent_shape
    levels = len(cfg.block_out_channels)
    _check_classes_and_square(latent_shape, num_classes)
    if h % 2 ** (levels - 1):
        raise ValueError(
            f"latent size {h} must be divisible by 2 ** (levels - 1) = {2 ** (levels - 1)} for the "
            f"{levels}-level model.block_out_channels {cfg.block_out_channels}; use fewer levels"
        )
    return UNet2DModel(
        sample_size=h,
        in_channels=c,
        out_channels=2 * c if cfg.learn_sigma else c,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=tuple(cfg.down_block_types),
        up_block_types=tuple(cfg.up_block_types),
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        dropout=cfg.dropout,
        num_class_embeds=None if num_classes is None else num_classes + 1,
    )


def _check_classes_and_square(latent_shape: tuple[int, int, int], num_classes: int | None) -> None:
    c, h, w = latent_shape
    if h != w:
        raise ValueError(f"latents must be square, got (c, h, w) = {latent_shape}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 or None, got {num_classes}")


def build_dit(cfg: ModelConfig, latent_shape: tuple[int, int, int], num_classes: int | None) -> DiTTransformer2DModel:
    """A randomly initialised ``DiTTransformer2DModel`` (DiT, Peebles & Xie 2023) for (c, h, w) latents.

    The latent is cut into p x p patches, (h / p)^2 tokens of width d = heads x head dim
    with fixed 2-D sin-cos positions, through ``num_layers`` adaLN-Zero blocks, then
    unpatchified to c (or 2c with ``learn_sigma``) channels. Initialised as DiT's
    ``initialize_weights`` (``dit_init``), which diffusers' class does not do.

    Two differences from the paper's network, both diffusers': every block has its own
    timestep and label embedder (DiT shares one), so the parameter count is higher
    (DiT-XL/2: 750M against 675M) at the same FLOPs; and its ``LabelEmbedding`` would drop
    labels by itself in train mode (``class_dropout_prob`` 0.1, in every block
    independently), which is switched off here (``dropout_prob`` = 0): labels are dropped
    once, by the training loop (``train.drop_labels``, ``model.label_dropout``).

    Args:
        cfg: ``model.*`` options (``patch_size``, ``num_layers``, ``num_attention_heads``,
            ``attention_head_dim``, ``dropout``, ``learn_sigma``).
        latent_shape: (c, h, w): in channels c, ``sample_size`` h.
        num_classes: K classes, or None: ``num_embeds_ada_norm`` = K (0 when
            unconditional: the table then holds only the null row, label 0).
    Returns:
        The DiT in train mode, float32, on the CPU.
    Raises:
        ValueError: if the latents are not square, p does not divide h, or ``num_classes`` < 1.
    """
    c, h, w = latent_shape
    _check_classes_and_square(latent_shape, num_classes)
    if h % cfg.patch_size:
        raise ValueError(f"latent size {h} must be divisible by model.patch_size={cfg.patch_size}; "
                         f"use a patch size that divides it")
    model = DiTTransformer2DModel(
        num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim,
        in_channels=c,
        out_channels=2 * c if cfg.learn_sigma else c,
        num_layers=cfg.num_layers,
        dropout=cfg.dropout,
        sample_size=h,
        patch_size=cfg.patch_size,
        num_embeds_ada_norm=num_classes or 0,
    )
    dit_init(model)
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0  # the loop drops labels (seeded, model.label_dropout); never here too
    return model


def dit_init(model: DiTTransformer2DModel) -> None:
    """DiT's initialisation (facebookresearch/DiT ``models.py``, ``initialize_weights``) on diffusers' modules.

    Every linear layer xavier-uniform with zero bias; the patch projection likewise on its
    flattened kernel; label tables and the timestep MLPs N(0, 0.02); and adaLN-Zero: each
    block's modulation (``norm1.linear``: shift, scale and gate of attention and MLP) and
    the final layer (``proj_out_1`` modulation, ``proj_out_2`` projection) zero, so every
    block starts as the identity and the model's first output is 0.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    proj = model.pos_embed.proj
    nn.init.xavier_uniform_(proj.weight.data.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    for block in model.transformer_blocks:
        emb = block.norm1.emb
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def build_noise_scheduler(cfg: NoiseConfig) -> DDPMScheduler | FlowMatchEulerDiscreteScheduler:
    """The training forward process, as a diffusers scheduler.

    epsilon, v_prediction: ``DDPMScheduler`` with the configured betas.
    ``add_noise(c_0, eps, t)`` = sqrt(alpha_bar_t) c_0 + sqrt(1 - alpha_bar_t) eps, with
    alpha_bar_t = prod_{s <= t} (1 - beta_s) (``alphas_cumprod[t]``, t in 0..T-1 being
    the paper's 1..T). ``clip_sample`` is off: latents are not confined to [-1, 1].

    flow: ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=noise.flow_shift)``.
    Training uses only its config (T; ``train.flow_noisy_and_target`` forms c_t), and
    sampling schedulers are made from that config, so they feed the denoiser the t * T it
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


def build_sampler(name: str, config: FrozenDict | dict[str, Any], shift: float | None = None,
                  learned_variance: bool | None = None) -> Any:
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
        learned_variance: ddpm only: True steps with the denoiser's learned variance
            (``variance_type`` learned_range, for ``learns_sigma`` models: improved DDPM's
            interpolation between beta_t and the posterior variance); False with the fixed
            one; None keeps the config's. The other samplers never take a variance (dpm is
            made with ``variance_type`` None: with a learned one diffusers' DPM-Solver would
            keep only the first 3 channels of the prediction).
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
        variance = {} if learned_variance is None else {"variance_type": "learned_range" if learned_variance
                                                        else "fixed_small"}
        return DDPMScheduler.from_config(config, clip_sample=False, **variance)
    if name == "dpm":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                       variance_type=None)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    shift = config["shift"] if shift is None else shift
    if name == "flow_euler":  # from_config keeps any other option of a saved FlowMatchEuler config
        return FlowMatchEulerDiscreteScheduler.from_config(config, shift=shift)
    return FlowMatchHeunDiscreteScheduler(num_train_timesteps=config["num_train_timesteps"], shift=shift)
