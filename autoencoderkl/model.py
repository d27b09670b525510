"""Build, load, run and export the diffusers ``AutoencoderKL``.

The model *is* ``diffusers.AutoencoderKL`` (no subclass), so every weight a run writes
loads with ``AutoencoderKL.from_pretrained(DIR)`` and its ``config.json`` is readable.
``AutoencoderWithPosterior`` is only a thin ``nn.Module`` around it whose ``forward``
does encode -> sample -> decode in one call: under DDP, only a call through the wrapped
module's ``forward`` all-reduces gradients, and ``AutoencoderKL.forward`` does not return
the posterior that the KL term needs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn

from .config import ModelConfig


def build_vae(cfg: ModelConfig, resolution: int) -> AutoencoderKL:
    """A randomly initialised ``AutoencoderKL`` with the configured shape.

    Args:
        cfg: ``model.*`` options; ``len(block_out_channels) - 1`` downsamplings give
            f = 2 ** (len - 1) (8 for the four levels of SD's kl-f8).
        resolution: training image side in pixels, stored as ``sample_size``.
    Returns:
        An ``AutoencoderKL`` in train mode, float32, on the CPU. Its ``scaling_factor``
        is 1.0 until the run measures the latents at export (``estimate_scaling_factor``).
    Raises:
        ValueError: if a block width is not divisible by ``norm_num_groups``.
    """
    bad = [c for c in cfg.block_out_channels if c % cfg.norm_num_groups]
    if bad:
        raise ValueError(
            f"model.block_out_channels {cfg.block_out_channels} must be divisible by "
            f"model.norm_num_groups={cfg.norm_num_groups} (GroupNorm); {bad} are not"
        )
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=resolution,
        scaling_factor=1.0,
        mid_block_add_attention=cfg.mid_block_add_attention,
    )


def load_vae(path: str | os.PathLike) -> AutoencoderKL:
    """Load an ``AutoencoderKL`` from a diffusers-format folder or a training output dir.

    Args:
        path: a folder holding ``config.json`` and ``diffusion_pytorch_model.safetensors``
            (what ``save_pretrained`` writes), or a run's output dir whose ``vae/`` is that.
    Returns:
        The model in eval mode, float32, on the CPU. Nothing is downloaded.
    Raises:
        FileNotFoundError: if neither ``path`` nor ``path/vae`` is such a folder.
    """
    root = Path(path)
    for candidate in (root, root / "vae"):
        if (candidate / "config.json").is_file():
            return AutoencoderKL.from_pretrained(candidate, local_files_only=True).eval()
    raise FileNotFoundError(
        f"no AutoencoderKL at {root}: expected a diffusers folder with config.json and "
        f"diffusion_pytorch_model.safetensors (AutoencoderKL.save_pretrained), or a "
        f"training output dir holding one as vae/"
    )


def freeze_encoder(vae: AutoencoderKL) -> None:
    """Freeze the encoder and ``quant_conv`` so only the decoder trains.

    The latent space (what stage 2 and any cache depend on) is kept exactly, as in
    diffusers' VAE fine-tuning example and Stability's sd-vae-ft-* releases.
    """
    for module in (vae.encoder, vae.quant_conv):
        if module is not None:
            module.requires_grad_(False)


class AutoencoderWithPosterior(nn.Module):
    """One forward: images -> (reconstructions, posterior moments), for DDP and the loss.

    ``accelerator.prepare`` wraps *this* module, so encode and decode both run inside
    DDP's forward and their gradients are all-reduced. (diffusers' research VAE example
    calls the unwrapped model and trains each GPU alone.)
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images: Tensor, sample_posterior: bool = True) -> tuple[Tensor, Tensor]:
        """Encode, draw z from the posterior, decode.

        Args:
            images: (B, 3, H, W) float in [-1, 1]; H and W divisible by f.
            sample_posterior: z ~ N(mean, std^2) (training) or z = mean.
        Returns:
            reconstructions: (B, 3, H, W), unclamped, in the autocast dtype.
            moments: (B, 2c, H/f, W/f) posterior mean and logvar concatenated on the
                channel axis; ``DiagonalGaussianDistribution(moments)`` rebuilds it.
        """
        encoder_frozen = not any(p.requires_grad for p in self.vae.encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not encoder_frozen):
            posterior = self.vae.encode(images).latent_dist
        z = posterior.sample() if sample_posterior else posterior.mode()
        reconstructions = self.vae.decode(z).sample
        return reconstructions, posterior.parameters


@torch.no_grad()
def estimate_scaling_factor(vae: AutoencoderKL, images: Tensor, batch_size: int = 16) -> float:
    """1 / std of posterior samples z over some images (Rombach et al. 2022, sec. 4.3.2).

    Args:
        images: (N, 3, H, W) float in [-1, 1], on the VAE's device.
    Returns:
        The ``scaling_factor`` that gives the latents unit variance. A small image set
        gives a rough value; the latent cache recomputes it over the whole dataset.
    """
    z = torch.cat([vae.encode(images[i : i + batch_size]).latent_dist.sample() for i in range(0, len(images), batch_size)])
    return float(1.0 / z.float().std())


def export_vae(vae: AutoencoderKL, out_dir: str | os.PathLike) -> Path:
    """``save_pretrained`` in safetensors into ``out_dir``, atomically.

    Writes to ``out_dir.tmp`` and renames it into place, so a reader never sees a
    half-written folder; an existing ``out_dir`` is replaced.

    Returns:
        ``out_dir`` as a Path, loadable with ``AutoencoderKL.from_pretrained``.
    """
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out
