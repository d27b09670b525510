"""Reconstruction metrics as the literature reports them: on 8-bit images.

Images are quantised to integers in [0, 255] first (what a PNG of the reconstruction
would hold), then PSNR and SSIM come from torchmetrics with ``data_range=255`` (SSIM
averaged as the reference implementation does, see ``psnr_ssim_8bit``).

Two references every reconstruction is judged against:

- ``bicubic_down_up``: the image shrunk by the VAE's factor f to an 8-bit thumbnail and
  enlarged back, bicubic both ways. A kl-f8 latent holds 4 numbers per 8 x 8 block
  where the thumbnail holds 3; an autoencoder that does not beat it has learned nothing a
  resize could not do.
- ``mean_colour_error``: how far the image's mean colour moved, in CIELAB. PSNR cannot
  tell a uniform tint from noise of the same energy; this figure can.
- ``chroma_gain``: how much of the colour survived (the slope of the reconstruction's
  a*b* on the input's). A sepia or grey reconstruction keeps the mean colour of a
  colourful photo roughly (its colours average out), so a small mean-colour error; this
  figure falls towards 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def bicubic_down_up(images: Tensor, factor: int) -> Tensor:
    """The bicubic baseline: shrink by ``factor`` to an 8-bit thumbnail, enlarge back.

    Both resamplings are torch's bicubic with ``antialias=True`` (Keys' kernel with
    a = -0.5, its support widened by the factor when shrinking), which is what Pillow's
    ``Image.resize(..., BICUBIC)`` does; the thumbnail is clipped and rounded to 8 bits,
    as a stored low-resolution image would be (the super-resolution literature's LR input).

    Args:
        images: (B, 3, H, W) float in [-1, 1]; H and W divisible by ``factor``.
        factor: the spatial factor f of the VAE compared (8 for kl-f8), >= 1.
    Returns:
        (B, 3, H, W) float32 in [-1, 1] (clipped, not yet rounded: ``psnr_ssim_8bit`` and
        ``to_uint8_range`` round).
    Raises:
        ValueError: if H or W is not a multiple of ``factor``, or ``factor`` < 1.
    """
    h, w = images.shape[-2:]
    if factor < 1 or h % factor or w % factor:
        raise ValueError(f"bicubic_down_up needs H and W divisible by factor >= 1, got {h}x{w} and {factor}")
    x = images.detach().float()
    thumb = F.interpolate(x, size=(h // factor, w // factor), mode="bicubic", antialias=True, align_corners=False)
    thumb = to_uint8_range(thumb) / 127.5 - 1  # (B, 3, H/f, W/f) 8-bit values
    return F.interpolate(thumb, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


# sRGB (D65) -> CIE XYZ, IEC 61966-2-1, and the D65 reference white: the constants
# scikit-image's ``skimage.color.rgb2lab`` uses (a test checks agreement with it).
_XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_D65_WHITE = (0.95047, 1.0, 1.08883)
# Sharma, "Digital Color Imaging Handbook" (2003): a CIE76 colour difference of about 2.3
# is just noticeable. A mean-colour error above it is a cast a viewer can see.
COLOUR_JND = 2.3


def srgb_to_lab(images: Tensor) -> Tensor:
    """sRGB images -> CIELAB (D65 white, 2 degree observer), per pixel.

    Args:
        images: (B, 3, H, W) float in [-1, 1] (clipped first), sRGB-encoded.
    Returns:
        (B, 3, H, W) float32: L* in [0, 100], a* (+red / -green) and b* (+yellow / -blue)
        roughly in [-110, 110].
    Reference:
        CIE 15:2004 (the L*a*b* formulas); IEC 61966-2-1 (the sRGB transfer function).
    """
    rgb = (images.detach().float().clamp(-1, 1) + 1) / 2
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    matrix = torch.tensor(_XYZ_FROM_RGB, dtype=torch.float32, device=rgb.device)
    white = torch.tensor(_D65_WHITE, dtype=torch.float32, device=rgb.device).view(1, 3, 1, 1)
    xyz = torch.einsum("ij,bjhw->bihw", matrix, linear) / white
    delta = 6 / 29
    f = torch.where(xyz > delta**3, xyz.clamp_min(1e-12) ** (1 / 3), xyz / (3 * delta**2) + 4 / 29)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], 1)


def mean_colour_error(inputs: Tensor, reconstructions: Tensor) -> tuple[Tensor, Tensor]:
    """How far each reconstruction's mean colour lies from its input's, in CIELAB.

    The mean colour of an image is the mean of its pixels' L*a*b* values after 8-bit
    rounding (``to_uint8_range``); the error is the CIE76 difference (Euclidean distance,
    "Delta E*ab") between the two means. Texture, blur and zero-mean noise leave it near
    0; a tint moves it (one just-noticeable difference is about ``COLOUR_JND`` = 2.3).
    What it cannot see: a cast confined to part of the image that averages out (red
    skies and green shadows), and a hue error in a small object.

    Args:
        inputs, reconstructions: (B, 3, H, W) float in [-1, 1], same shape.
    Returns:
        delta_e: (B,) float32 >= 0, the CIE76 distance between the mean colours.
        shift: (B, 3) float32, reconstruction's mean minus input's, (dL*, da*, db*).
    Raises:
        ValueError: if the shapes differ or are not (B, 3, H, W).
    """
    if inputs.shape != reconstructions.shape or inputs.ndim != 4:
        raise ValueError(f"need two (B, 3, H, W) tensors of one shape, got {tuple(inputs.shape)} and {tuple(reconstructions.shape)}")
    means = [srgb_to_lab(to_uint8_range(t) / 127.5 - 1).mean((2, 3)) for t in (inputs, reconstructions)]  # (B, 3) each
    shift = means[1] - means[0]
    return shift.norm(dim=1), shift


# Images whose chroma varies less than this (std of a*, b* about their means, CIELAB units)
# get no chroma gain: near-grey photos have no colour to keep.
MIN_CHROMA_STD = 2.0


def chroma_gain(inputs: Tensor, reconstructions: Tensor) -> Tensor:
    """How much of each image's colour the reconstruction kept: the least-squares slope of
    its chroma on the input's.

    With c(p) = (a*, b*) of pixel p (CIELAB, D65, after 8-bit rounding) minus the image's
    mean (a*, b*): ``gain = sum_p <c_out(p), c_in(p)> / sum_p |c_in(p)|^2``. 1: the colours
    vary as the input's; 0: the reconstruction's colour does not follow the input's (grey,
    or a sepia or other toning, which a ratio of mean chroma would count as colour: a
    brown toning of the Kodak parrots keeps ~0.6 of their mean chroma); above 1:
    oversaturated. Blur lowers it (colour detail lost; bicubic 8x: 0.84 on Kodak and on
    SUN-Hays 80 at 256 px). A hue rotation by theta gives cos(theta). What it cannot see: a shift of
    the mean colour (``mean_colour_error`` does), and which pixels are wrong.

    Args:
        inputs, reconstructions: (B, 3, H, W) float in [-1, 1], same shape.
    Returns:
        (B,) float32, NaN where the input's chroma std is below ``MIN_CHROMA_STD``.
    Raises:
        ValueError: if the shapes differ or are not (B, 3, H, W).
    """
    if inputs.shape != reconstructions.shape or inputs.ndim != 4:
        raise ValueError(f"need two (B, 3, H, W) tensors of one shape, got {tuple(inputs.shape)} and {tuple(reconstructions.shape)}")
    c_in, c_out = [(ab - ab.mean((2, 3), keepdim=True)).flatten(1)  # (B, 2 * H * W), centred a*, b*
                   for ab in (srgb_to_lab(to_uint8_range(t) / 127.5 - 1)[:, 1:] for t in (inputs, reconstructions))]
    power = c_in.pow(2).sum(1)  # (B,)
    enough = power / (c_in.shape[1] / 2) >= MIN_CHROMA_STD**2  # mean |c_in|^2 over pixels vs std^2 per axis x 2
    return torch.where(enough, (c_out * c_in).sum(1) / power.clamp_min(1e-12), torch.full_like(power, float("nan")))
