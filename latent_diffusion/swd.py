"""Sliced Wasserstein distance on Laplacian-pyramid patches: a sample metric without downloaded weights.

Karras et al. 2018 ("Progressive Growing of GANs for Improved Quality, Stability, and
Variation", ICLR 2018, sec. 5 and app. D; reference code tkarras/progressive_growing_of_gans
``metrics/sliced_wasserstein.py``, read and re-written here in torch). Two image sets are
compared through the distributions of their local patches, scale by scale:

1. **Laplacian pyramid** of each image (Burt & Adelson 1983): the 5 x 5 binomial kernel
   [1 4 6 4 1]^T [1 4 6 4 1] / 256 with mirrored edges (OpenCV's ``pyrDown`` /
   ``pyrUp``); levels from the full resolution down to 16 px (64 px images: 64, 32, 16).
   Every level but the last is the band-pass difference G_l - up(G_(l+1)); the last is
   the low-pass image itself.
2. **Descriptors**: ``PATCHES_PER_IMAGE`` (128) 7 x 7 x 3 patches per image at random
   positions on each level, flattened to 147 values.
3. **Normalisation** per level and colour channel (mean 0, std 1 over all patches and
   pixels). ProGAN normalises each set with its own statistics (``normalize="per_set"``),
   which makes the metric exactly blind to any per-channel affine change of colour (a
   colour cast, a contrast change): the default here (``normalize="reference"``) uses the
   reference set's statistics for both sets, so a cast shows up. This is the one
   deliberate departure from the reference code.
4. **Sliced Wasserstein distance** (Rabin et al. 2011): the descriptors of both sets are
   projected on ``DIRECTIONS`` (512 = ProGAN's 4 x 128) random unit directions; for each
   direction the 1D Wasserstein-1 distance between the two empirical distributions is
   the mean absolute difference of the sorted projections (equal counts); averaged over
   directions. Reported x 1e3 per level (by resolution) and averaged over levels, as ProGAN.

Patch positions and directions come from a seeded generator; both sets use the same
position stream and the same directions (common random numbers), so identical sets score
exactly 0 and two evaluations of similar sets differ less by chance. Both sets contribute
the same number of patches: ``PATCHES_PER_IMAGE`` x the smaller set's image count,
spread evenly over each set's images.

What it sees: the distribution of local structure (edges, textures, colour) at each
scale: a blurred set loses the fine band-pass levels, a colour cast moves the coarse one.
What it cannot see: anything larger than a 7 x 7 patch of the coarsest level (at 64 px,
7/16 of the image: global layout and object shape only weakly), whether a sample copies
a training image (copies score like real images: read ``lat eval-ldm``'s memorisation
check), and the pairing of patches within one image (a set of images whose blocks were
shuffled among each other keeps its fine-level patch statistics). It has no semantic
features: two sets with the same textures but different content score alike. And it is
biased upward at small sample sizes: compare figures only at equal image counts.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

PATCH_SIZE = 7  # ProGAN's nhood_size
PATCHES_PER_IMAGE = 128  # ProGAN's nhoods_per_image
DIRECTIONS = 512  # ProGAN's dir_repeats x dirs_per_repeat = 4 x 128
MIN_LEVEL_SIZE = 16  # the coarsest level ProGAN uses
NORMALIZE = ("reference", "per_set")
_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
GAUSSIAN_KERNEL = torch.outer(_BINOMIAL, _BINOMIAL) / 256.0  # (5, 5), sums to 1


def _blur(x: Tensor, weight: float = 1.0) -> Tensor:
    """5 x 5 binomial filter x ``weight``, mirrored edges (scipy's ``mirror``, torch's ``reflect``)."""
    c = x.shape[1]
    kernel = (GAUSSIAN_KERNEL * weight).to(x)[None, None].expand(c, 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=c)


def pyr_down(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, ceil(H/2), ceil(W/2)): blur, keep every other pixel (OpenCV's pyrDown)."""
    return _blur(x)[:, :, ::2, ::2]


def pyr_up(x: Tensor) -> Tensor:
    """(N, C, h, w) -> (N, C, 2h, 2w): zeros between the pixels, blur x 4 (OpenCV's pyrUp)."""
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = x
    return _blur(up, 4.0)


def laplacian_pyramid(images: Tensor, num_levels: int) -> list[Tensor]:
    """Band-pass levels, finest first; the last level is the low-pass residual.

    Args:
        images: (N, C, H, W) float; H and W divisible by 2 ** (num_levels - 1).
        num_levels: levels to build (1: the images themselves).
    Returns:
        ``num_levels`` float tensors, level l of size (H / 2^l, W / 2^l).
        ``sum(pyr_up^l(level_l))`` rebuilds the images exactly (up to round-off).
    """
    gauss = [images.float()]
    for _ in range(1, num_levels):
        gauss.append(pyr_down(gauss[-1]))
    return [g - pyr_up(g_next) for g, g_next in zip(gauss, gauss[1:])] + [gauss[-1]]


def pyramid_resolutions(size: int) -> list[int]:
    """The level sizes ProGAN uses for ``size`` px images: size, size/2, ... down to 16."""
    out = []
    while size >= MIN_LEVEL_SIZE:
        out.append(size)
        size //= 2
    return out


def patch_descriptors(level: Tensor, num_patches: int, generator: torch.Generator) -> Tensor:
    """``num_patches`` random 7 x 7 patches, spread evenly over the images: (num_patches, C * 49).

    Patch i comes from image i mod N at a uniform random position (the patch inside the
    level), as ProGAN's ``get_descriptors_for_minibatch``.
    """
    n, c, h, w = level.shape
    if min(h, w) < PATCH_SIZE:
        raise ValueError(f"a {h} x {w} pyramid level is smaller than the {PATCH_SIZE} x {PATCH_SIZE} patches")
    image = torch.arange(num_patches) % n
    top = torch.randint(0, h - PATCH_SIZE + 1, (num_patches,), generator=generator)
    left = torch.randint(0, w - PATCH_SIZE + 1, (num_patches,), generator=generator)
    offs = torch.arange(PATCH_SIZE)
    rows = (top[:, None] + offs[None, :])[:, None, :, None]  # (P, 1, 7, 1)
    cols = (left[:, None] + offs[None, :])[:, None, None, :]  # (P, 1, 1, 7)
    chans = torch.arange(c)[None, :, None, None]  # (1, C, 1, 1)
    return level[image[:, None, None, None], chans, rows, cols].reshape(num_patches, -1)  # (P, C * 49)


def _channel_stats(desc: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """Per-colour-channel mean and std over all patches and pixels: two (1, C, 1) tensors."""
    x = desc.reshape(desc.shape[0], c, -1)
    return x.mean(dim=(0, 2), keepdim=True), x.std(dim=(0, 2), keepdim=True, unbiased=False).clamp_min(1e-8)


def sliced_wasserstein(a: Tensor, b: Tensor, directions: Tensor) -> float:
    """Mean over directions of the 1D Wasserstein-1 distance between the projections.

    Args:
        a, b: (P, D) descriptors, the same count P.
        directions: (D, K) unit columns.
    Returns:
        mean over the K directions of mean_i |sort(a d)_i - sort(b d)_i|.
    Raises:
        ValueError: different shapes.
    """
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equal descriptor sets, got {tuple(a.shape)} and {tuple(b.shape)}")
    pa, _ = torch.sort((a @ directions).T.contiguous(), dim=1)  # (K, P): each direction's sorted projections
    pb, _ = torch.sort((b @ directions).T.contiguous(), dim=1)
    return float((pa - pb).abs().mean())


def swd(
    reference: Tensor,
    images: Tensor,
    seed: int = 0,
    patches_per_image: int = PATCHES_PER_IMAGE,
    num_directions: int = DIRECTIONS,
    normalize: str = "reference",
) -> dict[str, Any]:
    """SWD x 1e3 between two image sets, per Laplacian level and averaged (ProGAN's ``SWDx1e3``).

    Args:
        reference: (N, 3, H, W) the real images: uint8, or float in any fixed range (the
            normalisation removes scale); square or not, H and W at least 16.
        images: (M, 3, H, W) the images judged (samples, decodes), the same size and range.
        seed: the patch positions and directions.
        patches_per_image: patches per image of the smaller set, per level.
        num_directions: random projection directions.
        normalize: ``"reference"`` (both sets by the reference's per-channel statistics)
            or ``"per_set"`` (ProGAN: each by its own; blind to colour casts).
    Returns:
        ``levels`` {"resolution in px": SWD x 1e3} (finest first), ``average`` (over levels),
        ``num_reference``, ``num_images``, ``patches_per_level``, ``directions``,
        ``normalize``, ``seed``.
    Raises:
        ValueError: different image sizes, images under 16 px, an empty set, a bad option.
    """
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {list(NORMALIZE)}, got {normalize!r}")
    if reference.ndim != 4 or images.ndim != 4 or reference.shape[1:] != images.shape[1:]:
        raise ValueError(f"SWD needs two (N, C, H, W) sets of one image size, got {tuple(reference.shape)} and "
                         f"{tuple(images.shape)}")
    if len(reference) == 0 or len(images) == 0:
        raise ValueError("SWD needs at least one image in each set")
    size = min(reference.shape[-2:])
    resolutions = pyramid_resolutions(size)
    if not resolutions:
        raise ValueError(f"SWD needs images of at least {MIN_LEVEL_SIZE} px, got {tuple(reference.shape[-2:])}")
    c = reference.shape[1]
    num_patches = patches_per_image * min(len(reference), len(images))
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(c * PATCH_SIZE**2, num_directions, generator=g)
    directions /= directions.norm(dim=0, keepdim=True)
    position_seed = int(torch.randint(0, 2**62, (1,), generator=g))
    levels = {}
    pyramids = [laplacian_pyramid(x.float(), len(resolutions)) for x in (reference, images)]
    for res, ref_level, img_level in zip(resolutions, *pyramids):
        # Common random numbers: the same position stream for both sets.
        desc = [patch_descriptors(level, num_patches, torch.Generator().manual_seed(position_seed))
                for level in (ref_level, img_level)]
        stats = [_channel_stats(d, c) for d in desc]
        normed = []
        for d, (mean, std) in zip(desc, stats if normalize == "per_set" else [stats[0], stats[0]]):
            normed.append(((d.reshape(num_patches, c, -1) - mean) / std).reshape(num_patches, -1))
        levels[str(res)] = 1e3 * sliced_wasserstein(normed[0], normed[1], directions)
    return {"levels": levels, "average": sum(levels.values()) / len(levels), "num_reference": len(reference),
            "num_images": len(images), "patches_per_level": num_patches, "directions": num_directions,
            "normalize": normalize, "seed": seed}
