"""VA-VAE's alignment of the latents to a frozen vision model (the "vision foundation" loss).

Yao et al. 2025, "Reconstruction vs. Generation: Taming Optimization Dilemma in Latent
Diffusion Models" (VA-VAE), sec. 3; reference code: hustvl/LightningDiT ``vavae/``
(``ldm/modules/losses/contperceptual.py``, ``ldm/models/autoencoder.py``,
``ldm/models/foundation_models.py``; config ``configs/f16d32_vfdinov2.yaml``).

A high-dimensional latent (f16, 32 channels) reconstructs well but is hard for a diffusion
model to learn; VA-VAE pulls its geometry towards a frozen DINOv2's patch features:

- ``projection``: a learned 1x1 convolution (no bias) from the posterior sample z,
  (B, c, h, w), to the teacher's width D (the reference's ``reverse_proj: true``); it is
  trained with the autoencoder and never exported.
- ``AlignmentTeacher``: the frozen teacher's patch tokens, (B, D, h, w) on z's grid.
- ``alignment_loss``: the marginal cosine-similarity term ``L_mcos`` (per position) plus
  the marginal distance-matrix term ``L_mdms`` (between all pairs of positions of an
  image), each with its margin (``loss.alignment_margins``), weights 1 and 1.
- ``adaptive_alignment_weight``: ``||grad nll_loss|| / (||grad vf_loss|| + 1e-4)`` at the
  encoder's last convolution, clamped to [0, 1e8], times ``loss.alignment_weight`` (0.1):
  the alignment's gradient at the encoder is held to a tenth of the reconstruction's.

What guards against the collapse to flat colours that re-implementations met (LightningDiT
issue #1): the adaptive weight (the alignment can never outweigh reconstruction at the
encoder), the margins (positions already aligned stop pulling), and the projection (the
latent need not *be* the 1024-d feature, only map linearly onto its geometry).

One deliberate difference from the reference: the teacher sees the images as it was trained
to (in [0, 1], normalised with its processor's mean and std, resized bicubically with
antialiasing); the reference feeds it the [-1, 1] images unnormalised, resized bilinearly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hub import is_hub_id

# DINOv2's preprocessing (its preprocessor_config.json on the Hub: ImageNet's statistics);
# used when the teacher's folder has no preprocessor_config.json.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STAND_IN = "stand-in:"
# The published shapes of the DINOv2 models a stand-in copies (each Hub repository's
# config.json: patch 14, MLP ratio 4, image_size 518). VA-VAE uses dinov2-large.
DINOV2_SHAPES: dict[str, dict[str, int]] = {
    "facebook/dinov2-small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6},
    "facebook/dinov2-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
    "facebook/dinov2-large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16},
}
STAND_IN_SEED = 0  # a stand-in's weights are the same in every run and process


def resolve_teacher(name: str) -> tuple[str, bool]:
    """Where the teacher comes from, checked before any model is built.

    Args:
        name: ``loss.alignment_teacher``: a local folder (``save_pretrained``), a Hub id,
            or ``stand-in:HUB_ID`` with HUB_ID a key of ``DINOV2_SHAPES``.
    Returns:
        ``(source, local_files_only)``: the folder, Hub id or stand-in name to load, and
        whether loading must not touch the network (a folder, a cached Hub id, a stand-in).
    Raises:
        ValueError: a stand-in of an unknown shape.
        FileNotFoundError: a folder without ``config.json``; a path that does not exist and
            is no Hub id; a Hub id that is not in the HF cache while offline
            (``HF_HUB_OFFLINE``), with the command that downloads it.
    """
    if name.startswith(STAND_IN):
        if name[len(STAND_IN):] not in DINOV2_SHAPES:
            raise ValueError(f"loss.alignment_teacher={name}: a stand-in copies one of the shapes "
                             f"{', '.join(STAND_IN + k for k in DINOV2_SHAPES)}")
        return name, True
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"loss.alignment_teacher={name} is a folder without config.json: expected a "
                                    f"transformers model saved with save_pretrained (e.g. DINOv2)")
        return str(path), True
    if not is_hub_id(name):
        raise FileNotFoundError(f"loss.alignment_teacher={name} does not exist and is not a Hugging Face Hub id "
                                f"(owner/name, e.g. facebook/dinov2-large)")
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return name, True
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(teacher_download_hint(name, "this machine is offline (HF_HUB_OFFLINE) and the Hugging "
                                                            "Face cache does not hold it"))
    return name, False


def teacher_download_hint(name: str, why: str) -> str:
    """The one-line error for a teacher that cannot be had, with the command that fetches it."""
    return (f"loss.alignment_teacher={name}: {why}. Download it first on a machine with network: "
            f"huggingface-cli download {name} (into the HF cache; set HF_HOME to use that cache here), or "
            f"huggingface-cli download {name} --local-dir DIR and set loss.alignment_teacher=DIR")


def _image_statistics(source: str, local_files_only: bool) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, where from) of the teacher's input normalisation: its preprocessor_config.json, else ImageNet's."""
    try:
        from transformers.utils import cached_file

        file = cached_file(source, "preprocessor_config.json", local_files_only=local_files_only,
                           _raise_exceptions_for_missing_entries=False)
    except (OSError, ValueError):
        file = None
    if file:
        stats = json.loads(Path(file).read_text())
        if "image_mean" in stats and "image_std" in stats:
            return tuple(stats["image_mean"]), tuple(stats["image_std"]), "its preprocessor_config.json"
    return IMAGENET_MEAN, IMAGENET_STD, "ImageNet's (no preprocessor_config.json)"


class AlignmentTeacher(nn.Module):
    """A frozen transformers vision model -> its patch features on the latent grid.

    Always in eval mode with no trainable parameter (``.train()`` keeps it so); its forward
    runs without gradients.

    Args:
        model: a transformers model with ``config.patch_size`` and ``config.hidden_size``
            whose output's ``last_hidden_state`` is (B, prefix + gh * gw, D), the patch tokens
            last in row-major order (DINOv2: one CLS token, then the patches; its final
            layer norm applied, as timm's ``forward_features`` that VA-VAE uses).
        resolution: side in pixels of the images it sees, a multiple of the patch size.
        mean, std: its input normalisation, per RGB channel, for images in [0, 1].
        description: one line for the run's log and config.yaml.
    Raises:
        ValueError: if the model has no patch size or hidden size, or ``resolution`` is not
            a positive multiple of the patch size.
    """

    def __init__(self, model: nn.Module, resolution: int, mean: tuple[float, ...], std: tuple[float, ...],
                 description: str):
        super().__init__()
        config = model.config
        patch = getattr(config, "patch_size", None)
        if not isinstance(patch, int) or not isinstance(getattr(config, "hidden_size", None), int):
            raise ValueError(f"the alignment teacher ({type(model).__name__}) has no integer config.patch_size / "
                             f"hidden_size: a ViT-like vision model with patch tokens (DINOv2, ...) is needed")
        if resolution < patch or resolution % patch:
            raise ValueError(f"loss.alignment_resolution={resolution} must be a positive multiple of the teacher's "
                             f"patch size {patch}")
        self.model = model.eval().requires_grad_(False)
        self.patch_size, self.hidden_size, self.resolution = patch, int(config.hidden_size), resolution
        self.description = description
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> AlignmentTeacher:
        """Frozen: stays in eval mode whatever ``mode`` says."""
        return super().train(False)

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The teacher's input (H', W') for (height, width) images: the longer side at ``resolution``, multiples of the patch."""
        p, scale = self.patch_size, self.resolution / max(height, width)
        return max(p, round(height * scale / p) * p), max(p, round(width * scale / p) * p)

    @torch.no_grad()
    def forward(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """The teacher's patch features of ``images``, resized to ``grid``.

        Args:
            images: (B, 3, H, W) float in [-1, 1].
            grid: (h, w) of the latent the features are compared with.
        Returns:
            (B, D, h, w) float32, no gradient. The images are mapped to [0, 1], normalised
            with the teacher's mean/std, resized (bicubic, antialiased) to
            ``input_size(H, W)``; the (gh, gw) patch tokens are resized bilinearly to
            (h, w) when the grids differ (VA-VAE at 256 px: 224 px -> 16 x 16 tokens, the
            f16 latent's grid, so no resize).
        """
        B, _, H, W = images.shape
        size = self.input_size(H, W)
        x = ((images.float() + 1) / 2 - self.mean) / self.std
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        dtype = next(self.model.parameters()).dtype
        tokens = self.model(pixel_values=x.to(dtype)).last_hidden_state  # (B, prefix + gh * gw, D)
        gh, gw = size[0] // self.patch_size, size[1] // self.patch_size
        patches = tokens[:, tokens.shape[1] - gh * gw:]  # drop the CLS (and register) tokens
        features = patches.transpose(1, 2).reshape(B, -1, gh, gw).float()  # (B, D, gh, gw)
        if (gh, gw) != tuple(grid):
            features = F.interpolate(features, size=tuple(grid), mode="bilinear", antialias=True, align_corners=False)
        return features


def load_teacher(name: str, resolution: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> AlignmentTeacher:
    """The frozen alignment teacher, loaded through ``transformers.AutoModel.from_pretrained``.

    Draws nothing from the run's random streams (a stand-in is built under its own seed).

    Args:
        name: ``loss.alignment_teacher`` (see ``resolve_teacher``).
        resolution: ``loss.alignment_resolution``.
        device: where it runs.
        dtype: its weights' dtype: the run's precision (bfloat16 / float16 under mixed
            precision, else float32).
    Returns:
        An ``AlignmentTeacher`` in eval mode on ``device``.
    Raises:
        ValueError, FileNotFoundError: from ``resolve_teacher``, or a teacher that cannot
            be had (the message gives the download command) or has no patch tokens.
    """
    source, local_only = resolve_teacher(name)
    from transformers import AutoModel, Dinov2Config, Dinov2Model

    with torch.random.fork_rng(devices=[]):
        if source.startswith(STAND_IN):
            torch.manual_seed(STAND_IN_SEED)
            shape = DINOV2_SHAPES[source[len(STAND_IN):]]
            model = Dinov2Model(Dinov2Config(**shape, patch_size=14, image_size=518, mlp_ratio=4))
            mean, std, stats = IMAGENET_MEAN, IMAGENET_STD, "ImageNet's"
            what = (f"a RANDOMLY initialised model of {source[len(STAND_IN):]}'s shape (a stand-in: it shows the "
                    f"mechanism and its cost, not a benefit)")
        else:
            try:
                model = AutoModel.from_pretrained(source, local_files_only=local_only)
            except OSError as exc:  # not on the Hub, no network, no permission
                raise FileNotFoundError(teacher_download_hint(name, f"it could not be loaded "
                                                                    f"({str(exc).splitlines()[0][:200]})")) from None
            mean, std, stats = _image_statistics(source, True)
            what = f"{type(model).__name__} from {source}"
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    description = (f"{what}, {n_params:.1f}M parameters, frozen, {str(dtype).removeprefix('torch.')}; input "
                   f"{resolution} px normalised with {stats} mean/std")
    return AlignmentTeacher(model, resolution, mean, std, description).to(device=device, dtype=dtype)


def build_projection(latent_channels: int, teacher_width: int) -> nn.Conv2d:
    """VA-VAE's ``linear_proj`` with ``reverse_proj: true``: latents (c) -> teacher width (D).

    A 1x1 convolution without bias, PyTorch's default initialisation (as the reference);
    trained by the autoencoder's optimizer, checkpointed, never exported.
    """
    return nn.Conv2d(latent_channels, teacher_width, kernel_size=1, bias=False)


def alignment_loss(projected: Tensor, features: Tensor, margins: tuple[float, float] | list[float]
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """VA-VAE's vision-foundation loss ``vf_loss = L_mdms + L_mcos`` (both weights 1, as the reference).

    With ``z'`` the projected latent and ``f`` the teacher's features at each of the N = h w
    positions of an image, both L2-normalised over their D channels:

    - ``L_mcos = mean_{b, i} relu(1 - cos_margin - cos(z'_i, f_i))``: each position's
      projected latent should point where the teacher's feature points; once the cosine
      exceeds ``1 - cos_margin`` it is left alone.
    - ``L_mdms = mean_{b, i, j} relu(|cos(z'_i, z'_j) - cos(f_i, f_j)| - distmat_margin)``:
      the N x N similarity structure of the latent should match the teacher's, up to the
      margin.

    Args:
        projected: (B, D, h, w) ``projection(z)``, with its graph.
        features: (B, D, h, w) the teacher's features (no gradient).
        margins: ``(cos_margin, distmat_margin)``, ``loss.alignment_margins``.
    Returns:
        ``(vf_loss, mdms_loss, mcos_loss)``, () float32 each (computed in float32). The
        distance matrices cost O(B N^2 D) and B N^2 floats: 256 positions at f16 / 256 px.
    Raises:
        ValueError: if the two shapes differ.
    """
    if projected.shape != features.shape:
        raise ValueError(f"projected latents {tuple(projected.shape)} and teacher features {tuple(features.shape)} "
                         f"must have the same shape")
    cos_margin, distmat_margin = margins
    z = F.normalize(projected.float().flatten(2), dim=1)  # (B, D, N)
    f = F.normalize(features.float().flatten(2), dim=1)
    mcos_loss = F.relu(1.0 - cos_margin - (z * f).sum(1)).mean()
    mdms_loss = F.relu((z.transpose(1, 2) @ z - f.transpose(1, 2) @ f).abs() - distmat_margin).mean()  # (B, N, N)
    return mdms_loss + mcos_loss, mdms_loss, mcos_loss


def adaptive_alignment_weight(nll_loss: Tensor, vf_loss: Tensor, last_layer: Tensor, weight: float) -> Tensor:
    """VA-VAE's ``calculate_adaptive_weight_vf``: the alignment's weight, balanced at the encoder.

    ``vf_weight = clamp(||grad_L nll_loss|| / (||grad_L vf_loss|| + 1e-4), 0, 1e8) * weight``
    with ``L`` the encoder's last convolution's weight (``vae.encoder.conv_out.weight``), so
    the alignment gradient reaching the encoder is ``weight`` times the reconstruction's.

    Args:
        nll_loss: () float scalar with a graph through ``last_layer`` (decoder and LPIPS).
        vf_loss: () float scalar from ``alignment_loss``.
        last_layer: the encoder's last weight.
        weight: ``loss.alignment_weight``.
    Returns:
        () float32, detached, finite for finite gradients: 0 when the reconstruction's
        gradient at the encoder is zero, at most ``1e8 * weight`` when the alignment's is
        (every position inside the margins). 0 when ``vf_loss`` has no graph.
    """
    if not vf_loss.requires_grad:
        return torch.zeros((), device=vf_loss.device)
    norms = []
    for loss in (nll_loss, vf_loss):
        grad = torch.autograd.grad(loss, last_layer, retain_graph=True, allow_unused=True)[0]
        norms.append(torch.norm(grad.float()) if grad is not None else torch.zeros((), device=vf_loss.device))
    return torch.clamp(norms[0] / (norms[1] + 1e-4), 0.0, 1e8).detach() * weight


def teacher_precision(mixed_precision: str | None) -> torch.dtype:
    """The teacher's weight dtype under ``train.mixed_precision``."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision or "no", torch.float32)


def alignment_state(weight: float, teacher: str) -> dict[str, Any]:
    """What a checkpoint's weights depend on (the projection's shape follows the teacher); {} when off."""
    return {"alignment_teacher": teacher} if weight > 0 else {}

