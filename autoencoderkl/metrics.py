"""Reconstruction metrics as the literature reports them: on 8-bit images.

Images are quantised to integers in [0, 255] first (what a PNG of the reconstruction
would hold), then PSNR and SSIM come from torchmetrics with ``data_range=255`` (SSIM
averaged as the reference implementation does, see ``psnr_ssim_8bit``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

SSIM_WINDOW = 11  # Gaussian window side (sigma 1.5): int(3.5 * 1.5 + 0.5) * 2 + 1, as torchmetrics sizes it


def to_uint8_range(images: Tensor) -> Tensor:
    """(B, 3, H, W) float in [-1, 1] -> the same shape, float32 integers in [0, 255].

    Values outside [-1, 1] (a decoder's output is unclamped) are clipped first.
    """
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round()


@torch.no_grad()
def psnr_ssim_8bit(inputs: Tensor, reconstructions: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image PSNR (dB) and SSIM after 8-bit quantisation of both images.

    Args:
        inputs, reconstructions: (B, 3, H, W) float in [-1, 1], same shape.
    Returns:
        psnr: (B,) float32 dB, 10 log10(255^2 / MSE) over all pixels and channels of an
            image (inf where the two are identical).
        ssim: (B,) float32 in [-1, 1], Gaussian window 11, sigma 1.5 (Wang et al. 2004),
            averaged over channels and over the positions whose window lies inside the
            image, as the reference ``ssim_index.m`` ('valid' filtering) and
            ``skimage.metrics.structural_similarity`` do. (torchmetrics' own mean also
            counts a 5-pixel border computed on reflect padding; we crop it from its map.)
            Images of 10 px or less keep the whole map.
    Raises:
        ValueError: if the shapes differ or are not (B, 3, H, W).
    """
    if inputs.shape != reconstructions.shape or inputs.ndim != 4:
        raise ValueError(f"need two (B, 3, H, W) tensors of one shape, got {tuple(inputs.shape)} and {tuple(reconstructions.shape)}")
    x, y = to_uint8_range(inputs), to_uint8_range(reconstructions)
    psnr = peak_signal_noise_ratio(y, x, data_range=255.0, reduction="none", dim=(1, 2, 3))
    _, ssim_map = structural_similarity_index_measure(
        y, x, data_range=255.0, gaussian_kernel=True, sigma=1.5, kernel_size=11, return_full_image=True
    )  # (B, 3, H, W); torchmetrics pads by reflection to keep the size
    r = SSIM_WINDOW // 2
    if min(ssim_map.shape[-2:]) > 2 * r:
        ssim_map = ssim_map[..., r:-r, r:-r]  # only windows that lie inside the image
    return psnr, ssim_map.flatten(1).mean(1)
