"""EQ-VAE's equivariance regularisation, as published (Kouzelis et al. 2025).

"EQ-VAE: Equivariance Regularized Latent Space for Improved Generative Image Modeling"
(ICML 2025, arXiv 2502.09509). The reference implementation is zelaki/eqvae,
``train_eqvae/ldm/models/autoencoder.py`` (``AutoencoderKL.forward`` and
``training_step``; line numbers below are of that file), trained with the unchanged LDM
loss ``ldm/modules/losses/contperceptual.py``. Per optimizer step one of three things
happens, drawn by ``draw_equivariance_step``:

- with probability ``p_prior`` (the reference's name; ``loss.equivariance_prob``, 0.5;
  l. 46, 120) **the equivariance step**: a scale s is drawn uniformly from
  {8/32, 9/32, ..., 31/32} (l. 128: ``random.choice([s / 32 for s in range(8, 32)])``)
  AND a rotation by k quarter turns, k uniform in {1, 2, 3} (l. 131). tau = rotate(k) o
  resize(s) is applied to the posterior sample z (``forward``, l. 98-104: bilinear,
  ``align_corners=False``, no antialiasing, then ``torch.rot90(z, k, dims=[-1, -2])``)
  and the same to the images x (l. 135-138). The decoder's output for tau(z) and tau(x)
  then *replace* the reconstruction and the input of the whole LDM loss (l. 159, 169):
  pixel + LPIPS NLL with the learned logvar, KL of the posterior of x, the generator GAN
  term with its adaptive weight ``d_weight`` (computed on this pair), and the
  discriminator's loss (real: tau(x), fake: decode(tau(z))). x itself is not decoded on
  these steps.
- otherwise, with probability ``p_prior_s`` (``loss.equivariance_prior_scale_prob``,
  0.25; l. 47, 144) **prior preservation at low resolution**: x is downscaled by a scale
  drawn from the same set (l. 146-147) and reconstructed normally (l. 148): the encoder
  sees the small image;
- otherwise **prior preservation at full resolution** (l. 152-153): the ordinary step.

Generalised from the reference's 256 px (32 x 32 latents, where every s gives whole
latent cells) to any size: the latent grid (h, w) goes to (floor(s h), floor(s w)) and
the image to f times that, so pixel and latent grids stay aligned (at 256 px this is
exactly the reference's ``scale_factor=s``). Scales whose image would be smaller than
the PatchGAN's smallest input (``3 * 2 ** disc_num_layers`` px: 24 at LDM's 3 layers) or
a latent side under 1 are left out of the set; ``equivariance_scales`` lists what is left.

Deviations from the reference, and why:

- One draw per optimizer step, shared by the generator and the discriminator update. In
  the reference, PyTorch Lightning calls ``training_step`` once per optimizer, and each
  call draws again and runs the autoencoder again (l. 116-175), so the discriminator
  trains on an independent draw's pair. Here both updates use this step's one forward:
  half the autoencoder passes, and the discriminator sees the same transformed pairs
  in the same proportion.
- The draw is a pure function of (``train.seed``, step) (numpy ``default_rng``), not
  Python's global ``random``: every micro-batch and process of a step draws the same,
  and a resumed run replays the draws with nothing kept in the checkpoint.
- Resampling is done in float32 (bf16/fp16 tensors are cast for it and back).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

EQUIVARIANCE_MODES = ("off", "eqvae")
# The reference's scale set: s / 32 for s = 8 .. 31 (autoencoder.py l. 124, 128, 146).
SCALE_STEPS, SCALE_DENOMINATOR = tuple(range(8, 32)), 32
# Mixed into the seed of the per-step draw, so it never coincides with another seeded stream.
_EQUIVARIANCE_STREAM = 0x45515641  # "EQVA"


def patchgan_min_size(disc_num_layers: int) -> int:
    """The smallest image side (px) ``NLayerDiscriminator(n_layers=disc_num_layers)`` scores.

    Each stride-2 4x4 conv floors the side to half; the two stride-1 4x4 convs after them
    remove one pixel each; at least one logit must remain: ``3 * 2 ** disc_num_layers``.
    """
    return 3 * 2**disc_num_layers


def equivariance_scales(latent_hw: tuple[int, int], f: int, min_image_side: int) -> list[float]:
    """The reference's scales s / 32 that give at least a ``min_image_side`` px image here.

    Args:
        latent_hw: (h, w) of the full-size latent grid.
        f: pixels per latent cell (8 for kl-f8).
        min_image_side: the smallest transformed image side the loss must score.
    Returns:
        The usable scales, ascending (possibly empty).
    """
    h, w = latent_hw
    return [s / SCALE_DENOMINATOR for s in SCALE_STEPS
            if min(_scaled(h, s), _scaled(w, s)) >= 1 and f * min(_scaled(h, s), _scaled(w, s)) >= min_image_side]


def _scaled(n: int, step: int) -> int:
    """floor(n * step / 32) in integers (torch's output size for ``scale_factor=step/32``)."""
    return n * step // SCALE_DENOMINATOR


@dataclass(frozen=True)
class EquivarianceStep:
    """What one optimizer step does: the transform of the equivariance step, or a low-res prior step.

    Attributes:
        kind: ``"equivariance"`` (tau applied to z and x, the pair replaces the loss's
            inputs) or ``"prior_lowres"`` (x downscaled, reconstructed normally).
        scale_step: s * 32, the scale numerator (8 .. 31).
        quarter_turns: k in {1, 2, 3} for ``"equivariance"``, 0 for ``"prior_lowres"``.
    """

    kind: str
    scale_step: int
    quarter_turns: int = 0

    @property
    def scale(self) -> float:
        """s, the linear downscaling factor in (0, 1)."""
        return self.scale_step / SCALE_DENOMINATOR

    def resize(self, x: Tensor, f: int = 1) -> Tensor:
        """Bilinear downscale of a grid (``align_corners=False``, no antialiasing, as the reference).

        Args:
            x: (B, C, H, W) images in [-1, 1] (then ``f`` is pixels per latent cell and
                H = f h) or latents (``f`` = 1), any float dtype.
            f: the grid's cells per latent cell.
        Returns:
            (B, C, f floor(s H / f), f floor(s W / f)) in x's dtype. Differentiable.
        """
        h, w = x.shape[-2] // f, x.shape[-1] // f
        size = (f * _scaled(h, self.scale_step), f * _scaled(w, self.scale_step))
        return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False).to(x.dtype)

    def __call__(self, x: Tensor, f: int = 1) -> Tensor:
        """tau(x) = rotate(k) o resize(s) for ``"equivariance"``; resize(s) for ``"prior_lowres"``.

        Args:
            x: as ``resize``; the same call on z (``f`` = 1) and on x (``f`` = the VAE's
                factor) keeps the two grids aligned.
            f: as ``resize``.
        Returns:
            (B, C, H', W') in x's dtype, H' and W' swapped by an odd number of quarter turns.
        """
        x = self.resize(x, f)
        if self.quarter_turns:
            x = torch.rot90(x, k=self.quarter_turns, dims=(-1, -2))  # the reference's dims order (l. 104, 138)
        return x


def draw_equivariance_step(
    mode: str, prob: float, prior_scale_prob: float, seed: int, global_step: int, scales: list[float]
) -> EquivarianceStep | None:
    """This optimizer step's draw: an equivariance step, a low-res prior step, or None (ordinary).

    A pure function of ``(seed, global_step)``: numpy's ``default_rng`` seeded with both
    (and a constant naming this stream); no global RNG is touched, and ``mode="off"``
    draws nothing.

    Args:
        mode: ``loss.equivariance``: ``"off"`` (returns None) or ``"eqvae"``.
        prob: ``loss.equivariance_prob``, EQ-VAE's ``p_prior``.
        prior_scale_prob: ``loss.equivariance_prior_scale_prob``, EQ-VAE's ``p_prior_s``.
        seed: ``train.seed``.
        global_step: optimizer steps taken so far.
        scales: the usable scales (``equivariance_scales``); empty: every step is ordinary.
    Raises:
        ValueError: an unknown mode.
    """
    if mode not in EQUIVARIANCE_MODES:
        raise ValueError(f"loss.equivariance must be one of {list(EQUIVARIANCE_MODES)}, got {mode!r}")
    if mode == "off" or not scales:
        return None
    rng = np.random.default_rng([_EQUIVARIANCE_STREAM, seed, global_step])
    u, v = rng.random(2)
    step = round(scales[int(rng.integers(len(scales)))] * SCALE_DENOMINATOR)
    if u < prob:
        return EquivarianceStep("equivariance", step, int(rng.integers(1, 4)))
    if v < prior_scale_prob:
        return EquivarianceStep("prior_lowres", step)
    return None
