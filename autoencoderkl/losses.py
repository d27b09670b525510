"""The stage-1 training objective: pixel + LPIPS -> NLL, KL, and a PatchGAN term.

This is CompVis latent-diffusion's ``LPIPSWithDiscriminator``
(``ldm/modules/losses/contperceptual.py``; Rombach et al. 2022, App. G), which is the
VQGAN objective of Esser et al. 2021 (eq. 7: the adaptive weight) with the quantiser loss
replaced by a KL term. Names follow that file one to one: ``rec_loss``, ``p_loss``,
``nll_loss``, ``kl_loss``, ``g_loss``, ``d_weight``, ``disc_factor``, ``d_loss``.

Reductions, so that the weights in ``LossConfig`` mean something:

- ``nll_loss``: per-pixel NLL summed over (3, H, W), mean over the batch.
- ``kl_loss``: KL to N(0, I) summed over (c, h, w), mean over the batch.
- ``g_loss`` / ``d_loss``: means over batch and patch logits.
- ``vf_loss`` (VA-VAE's alignment to a frozen vision model, off by default): means over
  positions and pairs of positions (``autoencoderkl.alignment``), times its adaptive weight.

Perceptual weights: ``build_perceptual`` gives LPIPS with torchvision's VGG16 ImageNet
weights (``VGG16_FILE`` under ``torch.hub.get_dir()/checkpoints``), or a random backbone
for tests, or nothing.
"""

from __future__ import annotations

import socket
import warnings
from pathlib import Path
from typing import Callable

import lpips
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import VGG16_Weights

from autoencoderkl.alignment import adaptive_alignment_weight, alignment_loss
from autoencoderkl.config import LossConfig

# The torchvision weights LPIPS(net="vgg", pnet_rand=False) loads for its backbone.
VGG16_URL: str = VGG16_Weights.IMAGENET1K_V1.url
VGG16_FILE: str = VGG16_URL.rsplit("/", 1)[-1]  # "vgg16-397923af.pth"
VGG16_SHA256_PREFIX: str = VGG16_FILE.rsplit("-", 1)[1].split(".")[0]  # torch.hub's naming convention
DOWNLOAD_TIMEOUT_S: float = 20.0  # socket timeout of the VGG16 download
# RGB -> (Cb, Cr), ITU-R BT.601 (the JPEG/JFIF matrix; offsets cancel in a difference).
_CHROMA_FROM_RGB = torch.tensor([[-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))).

    Args:
        logits_real: (B, 1, H', W') float discriminator logits of real images.
        logits_fake: (B, 1, H', W') float logits of reconstructions (any shape works).
    Returns:
        () float scalar: each term is a mean over all logits, the two terms averaged.
    Reference:
        taming-transformers / LDM ``hinge_d_loss``.
    """
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Non-saturating (binary cross-entropy) loss: 0.5 * (mean(softplus(-real)) + mean(softplus(fake))).

    Args:
        logits_real: (B, 1, H', W') float discriminator logits of real images.
        logits_fake: (B, 1, H', W') float logits of reconstructions (any shape works).
    Returns:
        () float scalar: each term is a mean over all logits, the two terms averaged.
    Reference:
        taming-transformers / LDM ``vanilla_d_loss``.
    """
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


LPIPS_MIN_SIZE = 16  # LPIPS' VGG pools four times; smaller images get the pixel term only


def vgg16_weights_path() -> Path:
    """Where torchvision looks for (and downloads) the VGG16 weights LPIPS needs.

    Returns:
        ``torch.hub.get_dir()/checkpoints/vgg16-397923af.pth``; ``torch.hub.get_dir()`` is
        ``$TORCH_HOME/hub`` (default ``~/.cache/torch/hub``).
    """
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


# The LPIPS linear heads (Zhang et al. 2018) ship inside the lpips package.
LPIPS_HEADS_FILE: Path = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"


def _lpips_vgg(backbone: dict[str, Tensor] | None) -> lpips.LPIPS:
    """LPIPS(net="vgg") whose every weight file is read with ``weights_only=True``.

    lpips itself reads its heads with a bare ``torch.load`` and has torchvision read the
    backbone with ``weights_only=False`` (a full unpickle of a file in the user's cache), so
    both are loaded here instead.

    Args:
        backbone: torchvision's VGG16 state dict (``features.N.weight``, ...), or None to
            keep the random backbone.
    Raises:
        KeyError, RuntimeError: if a file lacks a tensor LPIPS needs or has the wrong shape.
    """
    with warnings.catch_warnings():
        # lpips calls torchvision's deprecated `pretrained=` argument; noise for our users.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\..*")
        module = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    heads = torch.load(LPIPS_HEADS_FILE, map_location="cpu", weights_only=True)
    missing, unexpected = module.load_state_dict(heads, strict=False)
    missing = [k for k in missing if k[:3] == "lin" and k[3].isdigit()]  # ("lins.N" aliases linN)
    if missing or unexpected:
        raise RuntimeError(f"{LPIPS_HEADS_FILE}: missing {missing}, unexpected {unexpected}")
    if backbone is not None:
        net = module.net
        for block in (net.slice1, net.slice2, net.slice3, net.slice4, net.slice5):
            for index, layer in block.named_children():  # children keep torchvision's indices
                for name, param in layer.named_parameters(recurse=False):
                    with torch.no_grad():
                        param.copy_(backbone[f"features.{index}.{name}"])
    return module


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def build_perceptual(pretrained: str) -> tuple[lpips.LPIPS | None, str]:
    """Build the frozen LPIPS(net="vgg") module for the perceptual term.

    The LPIPS linear heads ship with the ``lpips`` package; only the VGG16 backbone needs
    torchvision's ImageNet weights. In a multi-process run, call this on the main process
    first (``accelerator.main_process_first()``) so that only one process downloads.

    Args:
        pretrained: ``LossConfig.perceptual_pretrained``:
            "true": VGG16 ImageNet weights required: taken from the torchvision cache, else
            downloaded (socket timeout ``DOWNLOAD_TIMEOUT_S``), else an error.
            "false": random VGG16 backbone -- for tests only, not a perceptual metric.
            "auto": as "true", but when the weights cannot be had, return ``None`` (the
            perceptual term is switched off) with a loud ``UserWarning``.
    Returns:
        ``(module, description)``: the LPIPS module in eval mode with no trainable
        parameters (``None`` when "auto" could not get the weights), and one line saying
        what was used, for the run's log and saved config.
    Raises:
        ValueError: if ``pretrained`` is not one of "true", "false", "auto".
        RuntimeError: for "true" when the weights are neither cached nor downloadable; the
            message names the file, the directory it is looked for in, the URL, and that
            ``TORCH_HOME`` moves that directory.
    """
    choice = str(pretrained).lower()
    if choice not in ("true", "false", "auto"):
        raise ValueError(f"perceptual_pretrained must be one of 'true', 'false', 'auto', got {pretrained!r}")
    if choice == "false":
        return _freeze(_lpips_vgg(None)), ("LPIPS with a RANDOM VGG16 backbone (perceptual_pretrained=false): "
                                           "for tests only, not a perceptual metric")

    path = vgg16_weights_path()
    was_cached = path.is_file()
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        if not was_cached:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Checks the sha256 prefix; writes a temporary file, then renames it into place.
            torch.hub.download_url_to_file(VGG16_URL, str(path), hash_prefix=VGG16_SHA256_PREFIX, progress=False)
        module = _lpips_vgg(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:  # URLError, socket.timeout, a corrupt or foreign cache file, ...
        why = (f"the cached file could not be loaded ({type(exc).__name__}: {exc}); delete it to re-download"
               if was_cached else f"it is not cached and the download failed ({type(exc).__name__}: {exc})")
        where = (f"LPIPS needs torchvision's VGG16 ImageNet weights '{VGG16_FILE}' in {path.parent} "
                 f"(from {VGG16_URL}); {why}. Download that file into that directory on a machine with "
                 f"the network, or set TORCH_HOME to move the directory (it is $TORCH_HOME/hub/checkpoints).")
        if choice == "true":
            raise RuntimeError(where) from exc
        message = (f"PERCEPTUAL LOSS SWITCHED OFF (perceptual_pretrained=auto): {where} "
                   f"Then rerun, or set loss.perceptual_pretrained=true to make this an error.")
        warnings.warn(message, UserWarning, stacklevel=2)
        return None, f"LPIPS off: VGG16 weights '{VGG16_FILE}' unavailable in {path.parent}"
    finally:
        socket.setdefaulttimeout(old_timeout)
    how = "cached" if was_cached else "downloaded"
    return _freeze(module), f"LPIPS with VGG16 ImageNet weights ({how}: {path})"


class AutoencoderLoss(nn.Module):
    """LDM's ``LPIPSWithDiscriminator``: NLL (pixel + LPIPS, learned logvar) + KL + GAN.

    Generator side (Rombach et al. 2022, App. G; Esser et al. 2021, eq. 7)::

        rec      = |x - x_hat| (or squared) + perceptual_weight * LPIPS(x, x_hat)
        nll_loss = sum(rec / exp(logvar) + logvar) / B
        loss     = nll_loss + kl_weight * kl_loss + d_weight * disc_factor * g_loss

    Discriminator side: ``d_loss = disc_factor * hinge_or_vanilla(D(x), D(x_hat))``. Both
    GAN terms are off before ``cfg.disc_start`` optimizer steps.

    The module holds the frozen LPIPS network (kept in eval mode even when ``.train()`` is
    called, so LPIPS' dropout never fires) and the scalar ``logvar``. In LDM the logvar is
    an ``nn.Parameter`` that is in no optimizer, so it never trains; with
    ``cfg.learn_logvar=True`` it requires grad and the training loop adds it to the
    autoencoder's optimizer.

    Args:
        cfg: the ``LossConfig`` of the run.
        perceptual: from ``build_perceptual``; ``None`` switches the perceptual term off
            (``perceptual_weight`` is then treated as 0). Its parameters are frozen here.
    Raises:
        ValueError: if ``cfg.pixel_loss`` or ``cfg.disc_loss`` is not a known choice.
    """

    def __init__(self, cfg: LossConfig, perceptual: lpips.LPIPS | None) -> None:
        super().__init__()
        if cfg.pixel_loss not in ("l1", "l2"):
            raise ValueError(f"loss.pixel_loss must be 'l1' or 'l2', got {cfg.pixel_loss!r}")
        if cfg.disc_loss not in D_LOSSES:
            raise ValueError(f"loss.disc_loss must be one of {list(D_LOSSES)}, got {cfg.disc_loss!r}")
        self.cfg = cfg
        self.perceptual = _freeze(perceptual) if perceptual is not None else None
        self.perceptual_weight = cfg.perceptual_weight if perceptual is not None else 0.0
        self.d_loss_fn = D_LOSSES[cfg.disc_loss]
        self.logvar = nn.Parameter(torch.full((), float(cfg.logvar_init)), requires_grad=cfg.learn_logvar)

    def train(self, mode: bool = True) -> AutoencoderLoss:
        """As ``nn.Module.train``, but the LPIPS network always stays in eval mode."""
        super().train(mode)
        if self.perceptual is not None:
            self.perceptual.eval()
        return self

    def gan_active(self, global_step: int) -> bool:
        """Whether the GAN terms are on at this optimizer step (``>= disc_start``, factor > 0)."""
        return global_step >= self.cfg.disc_start and self.cfg.disc_factor > 0

    def calculate_adaptive_weight(self, nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor) -> Tensor:
        """Adaptive GAN weight, Esser et al. 2021 eq. 7 (as LDM's ``calculate_adaptive_weight``).

        ``d_weight = clamp(||grad_L nll_loss|| / (||grad_L g_loss|| + 1e-4), 0, 1e4) * disc_weight``
        with ``L`` the decoder's last layer weight, so the GAN gradient at the decoder's
        output is scaled to the size of the reconstruction gradient.

        Args:
            nll_loss: () float scalar with a graph through ``last_layer``.
            g_loss: () float scalar with a graph through ``last_layer``.
            last_layer: the decoder's last weight (``vae.decoder.conv_out.weight``).
        Returns:
            () float32 scalar, detached (no gradient flows through the weight itself).
        Raises:
            RuntimeError: (from autograd) if either loss does not depend on ``last_layer``.
        """
        # retain_graph: the same graph is backpropagated afterwards through `loss`.
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        return self._adaptive_weight(nll_grads, g_grads)

    def _adaptive_weight(self, nll_grads: Tensor, g_grads: Tensor) -> Tensor:
        """``clamp(||nll_grads|| / (||g_grads|| + 1e-4), 0, 1e4) * disc_weight``, detached, float32."""
        d_weight = torch.norm(nll_grads.float()) / (torch.norm(g_grads.float()) + 1e-4)
        return torch.clamp(d_weight, 0.0, 1e4).detach() * self.cfg.disc_weight

    def _shared_backward_loss(
        self, reconstructions: Tensor, nll_loss: Tensor, kl_loss: Tensor, g_loss: Tensor,
        last_layer: Tensor, disc_factor: float,
    ) -> tuple[Tensor, Tensor]:
        """The GAN-on generator loss, backpropagating LPIPS and the discriminator only once.

        LDM differentiates ``nll_loss`` and ``g_loss`` down to the decoder's last layer for
        the adaptive weight and then once more inside ``loss.backward()``: three passes
        through LPIPS and the PatchGAN. Here each is backpropagated once, to the
        reconstruction x_hat; those gradients give the last-layer gradients (one conv's
        weight gradient each) and, combined, the gradient the update sends into the
        decoder: ``dL/dx_hat = dnll/dx_hat + d_weight * disc_factor * dg/dx_hat``.

        Args:
            reconstructions: (B, 3, H, W) decoder output, with its graph.
            nll_loss, kl_loss, g_loss: () float32 scalars with graphs (nll through
                x_hat and, when learned, the logvar; g through x_hat).
            last_layer: ``vae.decoder.conv_out.weight``, whose output is x_hat.
            disc_factor: ``cfg.disc_factor`` (the GAN term is on here).
        Returns:
            ``(loss, d_weight)``: ``loss`` has the value nll + kl_weight * kl + d_weight *
            disc_factor * g and the same gradients as LDM's loss; d_weight is detached.
        """
        logvar = [self.logvar] if self.logvar.requires_grad else []
        nll_grad, *logvar_grad = torch.autograd.grad(nll_loss, [reconstructions, *logvar])  # frees LPIPS' graph
        g_grad = torch.autograd.grad(g_loss, reconstructions)[0]  # frees the discriminator's graph
        # Only the last conv's weight-gradient node runs; the decoder graph is kept for the update.
        nll_last = torch.autograd.grad(reconstructions, last_layer, nll_grad, retain_graph=True)[0]
        g_last = torch.autograd.grad(reconstructions, last_layer, g_grad, retain_graph=True)[0]
        d_weight = self._adaptive_weight(nll_last, g_last)
        rec_grad = (nll_grad.float() + (d_weight * disc_factor) * g_grad.float()).detach()
        surrogate = (reconstructions.float() * rec_grad).sum() + self.cfg.kl_weight * kl_loss
        if logvar:
            surrogate = surrogate + self.logvar.float() * logvar_grad[0].detach()
        value = (nll_loss + self.cfg.kl_weight * kl_loss + d_weight * disc_factor * g_loss).detach()
        return surrogate - surrogate.detach() + value, d_weight  # value of the loss, gradient of the surrogate

    def generator_loss(
        self,
        inputs: Tensor,
        reconstructions: Tensor,
        posterior,
        global_step: int,
        last_layer: nn.Parameter | None,
        discriminator: nn.Module | None,
        shared_backward: bool = False,
        alignment: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """The autoencoder's loss (LDM ``LPIPSWithDiscriminator.forward``, optimizer_idx 0).

        Args:
            inputs: (B, 3, H, W) float images in [-1, 1].
            reconstructions: (B, 3, H, W) decoder output for ``inputs`` (nominally [-1, 1]),
                with its graph: gradients flow through it, LPIPS included.
            posterior: the encoder's ``diffusers...vae.DiagonalGaussianDistribution`` with
                (B, c, h, w) mean/logvar; its ``.kl()`` (sum over c, h, w) is used.
            global_step: optimizer steps taken so far; the GAN term is on from
                ``cfg.disc_start``.
            last_layer: the decoder's last weight, for the adaptive weight; may be ``None``
                while the GAN term is off.
            discriminator: the unwrapped PatchGAN (its parameters get no gradient from this
                loss: they are frozen during its forward and restored afterwards), or
                ``None`` for no GAN term. Not called at all before ``disc_start``.
            shared_backward: with the GAN on and gradients enabled, backpropagate LPIPS
                and the discriminator to the reconstruction here, once, and return a loss
                whose backward reuses those gradients (``_shared_backward_loss``): same
                value and gradients, fewer FLOPs. Not for fp16 autocast (the shared
                gradients are taken before the GradScaler scales the loss).
            alignment: ``(projection(z), teacher features, encoder last-layer weight)``,
                (B, D, h, w) twice and ``vae.encoder.conv_out.weight``, when
                ``cfg.alignment_weight`` > 0: ``vf_weight * vf_loss`` is added
                (``autoencoderkl.alignment``; the adaptive weight needs gradients, so under
                no_grad it is 0). Ignored when the weight is 0.
        Returns:
            ``(loss, logs)``: ``loss`` a () float32 scalar to backpropagate; ``logs`` python
            floats ``loss``, ``nll_loss`` (sum over pixels, mean over batch), ``rec_loss``
            (per-element mean of the pixel + weighted LPIPS term), ``p_loss`` (mean LPIPS,
            0 when off), ``kl_loss`` (sum over (c, h, w), mean over batch), ``g_loss``,
            ``d_weight``, ``disc_factor`` (0 before ``disc_start``), ``logvar``; with the
            alignment on also ``vf_loss``, ``vf_weight``, ``vf_mdms_loss`` and ``vf_mcos_loss``.
        Raises:
            ValueError: if the GAN term is on and ``last_layer`` is None, or if inputs and
                reconstructions differ in shape.
        """
        B = inputs.shape[0]
        x = inputs.float()
        rec_loss, p_loss = self.rec_loss(inputs, reconstructions)
        logvar = self.logvar.float()
        nll_loss = torch.sum(rec_loss / torch.exp(logvar) + logvar) / B

        kl_loss = posterior.kl().to(device=x.device, dtype=torch.float32).sum() / B

        zero = torch.zeros((), device=x.device)
        vf_terms = None
        if self.cfg.alignment_weight > 0 and alignment is not None:
            # Before the GAN's shared backward, which frees LPIPS' graph that this weight needs.
            vf_terms = alignment_loss(alignment[0], alignment[1], self.cfg.alignment_margins)
            vf_weight = (adaptive_alignment_weight(nll_loss, vf_terms[0], alignment[2], self.cfg.alignment_weight)
                         if torch.is_grad_enabled() else zero)
        use_gan = discriminator is not None and self.gan_active(global_step)
        if use_gan:
            if last_layer is None:
                raise ValueError("generator_loss needs last_layer (the decoder's last weight, "
                                 "vae.decoder.conv_out.weight) once the GAN term is on "
                                 f"(global_step {global_step} >= disc_start {self.cfg.disc_start})")
            params = list(discriminator.parameters())
            flags = [p.requires_grad for p in params]
            try:  # the generator step must not leave gradients in the discriminator
                for p in params:
                    p.requires_grad_(False)
                logits_fake = discriminator(reconstructions.contiguous())
            finally:
                for p, flag in zip(params, flags):
                    p.requires_grad_(flag)
            g_loss = -torch.mean(logits_fake.float())
            disc_factor = float(self.cfg.disc_factor)
            if torch.is_grad_enabled() and shared_backward:
                loss, d_weight = self._shared_backward_loss(reconstructions, nll_loss, kl_loss, g_loss,
                                                            last_layer, disc_factor)
            elif torch.is_grad_enabled():
                d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer)
            else:  # evaluation under no_grad: no gradients to balance, as LDM outside training
                d_weight = zero
        else:
            g_loss, d_weight, disc_factor = zero, zero, 0.0

        if not (use_gan and torch.is_grad_enabled() and shared_backward):
            loss = nll_loss + self.cfg.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        names = ["loss", "nll_loss", "rec_loss", "p_loss", "kl_loss", "g_loss", "d_weight", "logvar"]
        terms = [nll_loss, rec_loss.mean(), p_loss.mean(), kl_loss, g_loss, d_weight, logvar]
        if vf_terms is not None:  # its own graph: outside the GAN's adaptive weight, as VA-VAE
            loss = loss + vf_weight * vf_terms[0]
            names += ["vf_loss", "vf_weight", "vf_mdms_loss", "vf_mcos_loss"]
            terms += [vf_terms[0], vf_weight, vf_terms[1], vf_terms[2]]
        values = torch.stack([loss, *terms]).detach().tolist()  # one device sync
        logs = dict(zip(names, values))
        logs["disc_factor"] = disc_factor
        return loss, logs

    def rec_loss(self, inputs: Tensor, reconstructions: Tensor) -> tuple[Tensor, Tensor]:
        """LDM's per-pixel ``rec_loss``: |x - x_hat| (or squared) + perceptual_weight * LPIPS.

        With ``chroma_weight`` > 0, each pixel adds ``chroma_weight * (|dCb| + |dCr|)``
        (squares for ``l2``), dCb and dCr the ITU-R BT.601 chroma of ``x - x_hat``, spread
        evenly over the three channels so the sum over (3, H, W) counts it once per pixel.

        Args:
            inputs: (B, 3, H, W) float images in [-1, 1] (no gradient flows into them).
            reconstructions: (B, 3, H, W) decoder output, with its graph.
        Returns:
            ``(rec_loss, p_loss)``: (B, 3, H, W) float32, and the LPIPS distance (B, 1, 1,
            1) float32, or a () zero when the perceptual term is off or the images are
            smaller than ``LPIPS_MIN_SIZE`` on a side (then the pixel term stands alone).
        Raises:
            ValueError: if inputs and reconstructions differ in shape.
        """
        if inputs.shape != reconstructions.shape:
            raise ValueError(f"inputs {tuple(inputs.shape)} and reconstructions "
                             f"{tuple(reconstructions.shape)} must have the same shape")
        x, x_hat = inputs.float(), reconstructions.float()
        diff = x.detach() - x_hat
        rec_loss = diff.abs() if self.cfg.pixel_loss == "l1" else diff.pow(2)  # (B, 3, H, W)
        if self.cfg.chroma_weight > 0:  # per pixel, spread over the 3 channels the sum runs over
            chroma = torch.einsum("ij,bjhw->bihw", _CHROMA_FROM_RGB.to(diff.device), diff)  # (B, 2, H, W)
            chroma = chroma.abs() if self.cfg.pixel_loss == "l1" else chroma.pow(2)
            rec_loss = rec_loss + self.cfg.chroma_weight * chroma.sum(1, keepdim=True) / 3
        if self.perceptual is not None and self.perceptual_weight > 0 and min(x.shape[-2:]) >= LPIPS_MIN_SIZE:
            p_loss = self.perceptual(x.detach(), x_hat).float()  # (B, 1, 1, 1)
            rec_loss = rec_loss + self.perceptual_weight * p_loss
        else:
            p_loss = torch.zeros((), device=x.device)
        return rec_loss, p_loss

    def discriminator_loss(
        self,
        inputs: Tensor,
        reconstructions: Tensor,
        global_step: int,
        discriminator: nn.Module,
    ) -> tuple[Tensor, dict[str, float]]:
        """The PatchGAN's loss (LDM ``LPIPSWithDiscriminator.forward``, optimizer_idx 1).

        Real and fake images go through the discriminator in two separate calls, as LDM,
        so BatchNorm normalises each kind with its own statistics. Both are detached: no
        gradient reaches the autoencoder.

        Args:
            inputs: (B, 3, H, W) float real images in [-1, 1].
            reconstructions: (B, 3, H, W) float reconstructions in [-1, 1] (detached here).
            global_step: optimizer steps taken so far; the loss is on from ``cfg.disc_start``.
            discriminator: the PatchGAN (wrapped or not).
        Returns:
            ``(d_loss, logs)``: ``d_loss`` a () float32 scalar, ``disc_factor *``
            hinge/vanilla loss (means over batch and patches). Before ``disc_start`` (or
            with ``disc_factor`` 0) it is a constant zero with ``requires_grad=False``, the
            discriminator is not called, and the training loop should skip its backward.
            ``logs``: python floats ``d_loss``, ``logits_real``, ``logits_fake`` (means).
        """
        if not self.gan_active(global_step):
            zero = torch.zeros((), device=inputs.device)
            return zero, {"d_loss": 0.0, "logits_real": 0.0, "logits_fake": 0.0}
        logits_real = discriminator(inputs.detach().contiguous()).float()
        logits_fake = discriminator(reconstructions.detach().contiguous()).float()
        d_loss = self.cfg.disc_factor * self.d_loss_fn(logits_real, logits_fake)
        values = torch.stack([d_loss, logits_real.mean(), logits_fake.mean()]).detach().tolist()
        return d_loss, dict(zip(("d_loss", "logits_real", "logits_fake"), values))
