"""The spatial power spectrum of latents, and how much of their energy is high-frequency.

Skorokhodov et al. 2025 ("Improving the Diffusability of Autoencoders", ICML 2025) trace
the gap between how well an autoencoder reconstructs and how well a diffusion model
learns its latents to high-frequency energy: the denoiser's early (high-noise) steps set
the coarse structure, and fine, image-independent detail in the latents is what it
cannot predict. Their diagnostic is the 2D discrete cosine transform (DCT) of the
latents; ``latent_spectrum`` computes its radial profile and the share of the energy
above half the Nyquist frequency.

Why the DCT and not the FFT: the FFT treats each latent as one period of a periodic
signal, so the jump between its left and right (top and bottom) edges counts as a sharp
edge and leaks into the high frequencies. On 8 x 8 grids a linear ramp reads 0.16
high-frequency share by FFT and 0.001 by DCT, crops of a 1/f^2 field 0.41 against 0.30
(``tests/test_probe.py``), which compresses the differences between VAEs. The DCT-II is
the transform of the signal mirrored at its edges: no jump, no leak.

Definitions, per latent (c, h, w) and channel:

- C(k_y, k_x) = DCT-II of z_c over (h, w), orthonormal (``scipy.fft.dctn(type=2,
  norm="ortho")``), so sum_k C^2 = sum_n z^2 (Parseval). The DC coefficient C(0, 0) is
  sqrt(h w) times the channel's spatial mean and is left out of every sum below: what is
  measured is how the latent *varies* across the grid, independent of any shift or scale
  (a global ``scaling_factor`` multiplies every term alike and cancels from every ratio).
- Coefficient (k_y, k_x) has the frequency |k| = sqrt((k_y / 2h)^2 + (k_x / 2w)^2) in
  cycles per latent cell (basis cos(pi k (2n + 1) / 2N): k / 2N cycles per cell; the
  Nyquist frequency is 0.5). P(k) = C^2 averaged over all latents and channels.
- ``high_frequency_fraction`` = sum of P over |k| > 0.25 (half the Nyquist frequency)
  over the sum of P over every k != 0. The orthonormal DCT of white noise is white noise,
  so white noise gives the share of the non-DC coefficients that lie there
  (``white_noise_fraction``: 1 - pi/16 = 0.80 on large grids, 47/63 = 0.75 on an 8 x 8
  grid); the latents of natural
  images, whose energy falls with frequency, far less.
- ``power``: P averaged over rings of width 1 / (2 max(h, w)) cycles per cell (one DCT
  index; the radially averaged power spectrum), divided by the mean of P over all
  k != 0, so that white noise of any variance is a flat line at 1 and the profiles of
  latents of any scale compare.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
from scipy.fft import dctn
from torch import Tensor

HALF_NYQUIST = 0.25  # cycles per latent cell: half the Nyquist frequency 0.5


def dct_frequency(h: int, w: int) -> Tensor:
    """|k| in cycles per cell of every DCT-II coefficient of an (h, w) grid: (h, w) float64.

    Coefficient (k_y, k_x) has the frequencies k_y / 2h and k_x / 2w; |k| is their norm.
    """
    ky = torch.arange(h, dtype=torch.float64)[:, None] / (2 * h)
    kx = torch.arange(w, dtype=torch.float64)[None, :] / (2 * w)
    return torch.sqrt(ky**2 + kx**2)


def dct_power(z: Tensor) -> Tensor:
    """|DCT-II|^2 (orthonormal) over the last two axes, summed over the batch.

    Args:
        z: (N, c, h, w) float latents (any device; computed in float64 on the CPU).
    Returns:
        (c, h, w) float64: sum over the N latents of C(k_y, k_x)^2, DC included.
    """
    x = z.detach().to("cpu", torch.float64).numpy()
    return torch.from_numpy(np.square(dctn(x, type=2, norm="ortho", axes=(-2, -1))).sum(0))


def latent_spectrum(batches: Iterable[Tensor]) -> dict[str, Any]:
    """Radially averaged DCT power spectrum and high-frequency energy share of latents.

    Args:
        batches: tensors (N, c, h, w) of latents (any shift or scale; float), e.g. the
            posterior means of a latent cache shard by shard. All must share (c, h, w).
    Returns:
        ``frequency`` (ring centres, cycles per cell, from 1 / (2 max(h, w)) up),
        ``power`` (mean P per ring / mean P over k != 0; white noise is 1),
        ``high_frequency_fraction`` (energy share above ``HALF_NYQUIST``),
        ``per_channel_high_frequency_fraction`` (c floats), ``white_noise_fraction`` (that
        share for white noise on this grid), ``num_latents``, ``grid`` [h, w],
        ``transform`` ("dct-ii-ortho"). See the module docstring for the definitions.
    Raises:
        ValueError: if there are no latents, or the grid is 1 x 1 (no frequency but DC).
    """
    power: Tensor | None = None  # (c, h, w) float64: sum over latents of C^2
    count = 0
    for z in batches:
        p = dct_power(z)
        power = p if power is None else power + p
        count += z.shape[0]
    if power is None or count == 0:
        raise ValueError("latent_spectrum got no latents")
    _, h, w = power.shape
    if h * w < 2:
        raise ValueError(f"a {h} x {w} latent grid has no frequency but DC; no spectrum to measure")
    power = power / count
    radius = dct_frequency(h, w)
    ac = radius > 0  # every coefficient but DC
    high = radius > HALF_NYQUIST
    per_channel = (power[:, high].sum(-1) / power[:, ac].sum(-1).clamp_min(1e-300)).tolist()
    mean_power = power.mean(0)  # (h, w), over channels
    step = 1.0 / (2 * max(h, w))
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
        "transform": "dct-ii-ortho",
        "what": ("radially averaged power of the latents' 2D DCT-II (orthonormal, DC left out), per ring / mean "
                 "over all non-DC coefficients (white noise: 1); high_frequency_fraction: energy share above "
                 f"{HALF_NYQUIST} cycles per latent cell (half the Nyquist frequency)"),
    }
