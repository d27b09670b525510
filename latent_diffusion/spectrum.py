"""The spatial power spectrum of latents, and how much of their energy is high-frequency.

Skorokhodov et al. 2025 ("Improving the Diffusability of Autoencoders") trace the gap
between how well an autoencoder reconstructs and how well a diffusion model learns its
latents to high-frequency energy: the denoiser's early (high-noise) steps set the coarse
structure, and fine, image-independent detail in the latents is what it cannot predict.
Their diagnostic is the spectrum of the latents; ``latent_spectrum`` computes its radial
profile and the share of the energy above half the Nyquist frequency.

Definitions, per latent (c, h, w) and channel:

- the spatial mean of the channel (its DC component) is removed: what is measured is how
  the latent *varies* across the grid, independent of any shift or scale (a global
  ``scaling_factor`` multiplies every term alike and cancels from every ratio below);
- P(k) = |FFT2(z_c - mean)(k)|^2 with orthonormal scaling, averaged over all latents and
  channels, at the frequencies k = (k_y, k_x) of ``numpy.fft.fftfreq`` in cycles per
  latent cell (the Nyquist frequency is 0.5);
- ``high_frequency_fraction`` = sum of P over |k| > 0.25 (half the Nyquist frequency)
  over the sum of P over every k != 0. White noise gives the share of the frequency bins
  that lie there (``white_noise_fraction``: 1 - pi/16 = 0.80 on large grids, 0.81 on an
  8 x 8 one); the latents of natural images, whose energy falls with frequency, far less;
- ``power``: P averaged over rings of width 1 / max(h, w) cycles per cell (the radially
  averaged power spectrum), divided by the mean of P over all k != 0, so that white noise
  of any variance is a flat line at 1 and the profiles of latents of any scale compare.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

HALF_NYQUIST = 0.25  # cycles per latent cell: half the Nyquist frequency 0.5


def radial_frequency(h: int, w: int) -> Tensor:
    """|k| in cycles per cell of every FFT bin of an (h, w) grid: (h, w) float64."""
    ky = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    kx = torch.fft.fftfreq(w, dtype=torch.float64)[None, :]
    return torch.sqrt(ky**2 + kx**2)


def latent_spectrum(batches: Iterable[Tensor]) -> dict[str, Any]:
    """Radially averaged power spectrum and high-frequency energy share of latents.

    Args:
        batches: tensors (N, c, h, w) of latents (any shift or scale; float), e.g. the
            posterior means of a latent cache shard by shard. All must share (c, h, w).
    Returns:
        ``frequency`` (ring centres, cycles per cell, from 1 / max(h, w) up), ``power``
        (mean P per ring / mean P over k != 0; white noise is 1), ``high_frequency_fraction``
        (energy share above ``HALF_NYQUIST``), ``per_channel_high_frequency_fraction``
        (c floats), ``white_noise_fraction`` (that share for white noise on this grid),
        ``num_latents``, ``grid`` [h, w]. See the module docstring for the definitions.
    Raises:
        ValueError: if there are no latents, or the grid is 1 x 1 (no frequency but DC).
    """
    power: Tensor | None = None  # (c, h, w) float64: sum over latents of |FFT|^2
    count = 0
    for z in batches:
        z = z.detach().to("cpu", torch.float64)
        z = z - z.mean(dim=(-2, -1), keepdim=True)  # DC removed: variation only
        p = torch.fft.fft2(z, norm="ortho").abs().pow(2).sum(0)  # (c, h, w)
        power = p if power is None else power + p
        count += z.shape[0]
    if power is None or count == 0:
        raise ValueError("latent_spectrum got no latents")
    _, h, w = power.shape
    if h * w < 2:
        raise ValueError(f"a {h} x {w} latent grid has no frequency but DC; no spectrum to measure")
    power = power / count
    radius = radial_frequency(h, w)
    ac = radius > 0  # every bin but DC
    high = radius > HALF_NYQUIST
    per_channel = (power[:, high].sum(-1) / power[:, ac].sum(-1).clamp_min(1e-300)).tolist()
    mean_power = power.mean(0)  # (h, w), over channels
    step = 1.0 / max(h, w)
    ring = torch.round(radius / step).long()
    rings = sorted({int(r) for r in ring[ac].unique()})
    reference = float(mean_power[ac].mean())
    profile = [float(mean_power[ring == r].mean()) / max(reference, 1e-300) for r in rings]
    return {
        "frequency": [r * step for r in rings],
        "power": profile,
        "high_frequency_fraction": float(mean_power[high].sum() / mean_power[ac].sum().clamp_min(1e-300)),
        "per_channel_high_frequency_fraction": per_channel,
        "white_noise_fraction": float(high.sum()) / float(ac.sum()),
        "num_latents": count,
        "grid": [h, w],
        "what": ("radially averaged power of the latents with each channel's spatial mean removed, per ring / "
                 "mean over all non-DC frequencies (white noise: 1); high_frequency_fraction: energy share above "
                 f"{HALF_NYQUIST} cycles per latent cell (half the Nyquist frequency)"),
    }
