"""Stage 2: train a noise-predicting U-Net on cached latents, export a pipeline.

Latent diffusion (Rombach et al. 2022): the autoencoder is frozen and its latents were
encoded once (``lat encode-latents``). Each step draws clean latents c_0 from the
cache (a fresh posterior sample, times the scaling factor), t uniformly from {1..T} and
eps ~ N(0, I), forms c_t = sqrt(alpha_bar_t) c_0 + sqrt(1 - alpha_bar_t) eps
(``DDPMScheduler.add_noise``) and regresses the U-Net's eps_theta(c_t, t, y) on eps with
an MSE (Ho et al. 2020, "simple" loss; or on v, Salimans & Ho 2022), optionally Min-SNR
weighted (Hang et al. 2023). With ``noise.prediction_type: flow`` (rectified flow / flow
matching: Liu et al. 2022, Lipman et al. 2023; as trained in SiT, Ma et al. 2024, and
Stable Diffusion 3, Esser et al. 2024) t is drawn from [0, 1] (logit-normal by default),
c_t = (1 - t) c_0 + t eps, and the denoiser, given t * T, regresses the velocity eps - c_0.

The denoiser is a U-Net or a DiT (``model.type``; DiT with flow matching is SiT, Ma et
al. 2024), built by ``latent_diffusion.model.build_denoiser``; this loop is the same for
both and never asks which it has. With ``model.learn_sigma`` the denoiser also predicts
the reverse-step variance, trained by improved DDPM's L_vlb (``vlb_terms``).

Reads top to bottom like ``autoencoderkl/train.py``: Accelerator -> seed -> run dir ->
VAE and latent cache -> denoiser, schedulers, optimizer, EMA -> data -> ``prepare`` ->
resume -> loop -> export ``pipeline/``. Launch with ``accelerate launch
`lat train-ldm` --config ... --latents ...`` (any number of processes) or torchrun.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_density_for_timestep_sampling, compute_snr
from omegaconf import OmegaConf
from torch import Tensor, nn
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from autoencoderkl.atomic import atomic_path
from autoencoderkl.checkpoints import load_checkpoint
from autoencoderkl.faults import NonFiniteGuard, StopSignals, rollback
from autoencoderkl.launch import start_run
from autoencoderkl.logs import LogWindow, log_image, open_logs, write_logs
from autoencoderkl.loop import (
    due,
    ema_weights,
    final_weights,
    infinite_batches,
    optimizer_step,
    validate_and_checkpoint,
)
from autoencoderkl.model import load_vae

from .config import LDMConfig, NoiseConfig, default_sampler
from .latents import LatentDataset, load_index
from .export import save_pipeline
from .model import build_denoiser, build_noise_scheduler, build_sampler, is_flow
from .pipeline import LatentDiffusionPipeline, LatentNormalization, learns_sigma, null_class_index, null_labels
from .sample import image_generators

logger = logging.getLogger(__name__)

VAL_TIMESTEPS = 10  # the fixed-noise validation loss noises each latent at these many evenly spaced t


def min_snr_weights(noise_scheduler: DDPMScheduler, timesteps: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR").

    SNR_t = alpha_bar_t / (1 - alpha_bar_t). Weighting the x_0-space loss by
    min(SNR_t, gamma) is, in the space the U-Net predicts, a weight of
    min(SNR_t, gamma) / SNR_t on the epsilon MSE and min(SNR_t, gamma) / (SNR_t + 1)
    on the v MSE (the paper's eq. 9 and its v variant).

    Args:
        timesteps: (B,) int64 in [0, T).
        gamma: the clamp (5 in the paper).
    Returns:
        (B,) float32 weights, each in (0, 1].
    """
    snr = compute_snr(noise_scheduler, timesteps)  # (B,) float32
    clamped = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clamped / (snr + 1)
    return clamped / snr


def flow_noisy_and_target(latents: Tensor, noise: Tensor, sigmas: Tensor) -> tuple[Tensor, Tensor]:
    """The flow-matching path and its velocity: c_t = (1 - t) c_0 + t eps, target eps - c_0.

    The straight (rectified-flow) path from data at t = 0 to noise at t = 1 (Liu et al.
    2022; Lipman et al. 2023's conditional OT path with sigma_min = 0; SD3's "RF",
    Esser et al. 2024, eq. 2 with a_t = 1 - t, b_t = t). Its time derivative, the
    velocity, is eps - c_0 for every t: what diffusers' ``FlowMatch*Scheduler.step``
    integrates from sigma = 1 down to 0 (c_{t'} = c_t + (t' - t) v).

    Args:
        latents: c_0, (B, c, h, w) float.
        noise: eps, (B, c, h, w) float, standard normal.
        sigmas: t, (B,) float in [0, 1].
    Returns:
        ``(noisy, target)``: c_t and eps - c_0, both (B, c, h, w).
    """
    t = sigmas.to(latents.dtype).view(-1, *([1] * (latents.dim() - 1)))  # (B, 1, 1, 1)
    return (1 - t) * latents + t * noise, noise - latents


def draw_timesteps(
    noise_scheduler: Any, batch_size: int, device: torch.device, noise_cfg: NoiseConfig | None = None
) -> Tensor:
    """Training timesteps in the units the U-Net takes, from the global RNG of ``device``.

    DDPM (epsilon, v_prediction): (B,) int64 uniform on {0..T-1} (the paper's 1..T).
    flow: (B,) float32 t * T with t ~ ``noise.timestep_sampling``: logit_normal, t =
    sigmoid(n), n ~ N(logit_mean, logit_std^2) (SD3's default, Esser et al. 2024 sec.
    3.1; diffusers' ``compute_density_for_timestep_sampling``), or uniform on [0, 1);
    with ``noise.flow_shift_in_training`` then shifted, t -> s t / (1 + (s - 1) t),
    s = ``noise.flow_shift`` (SD3 sec. 5.3.2; the same map the FlowMatch samplers apply
    to their sigmas).

    Args:
        noise_scheduler: from ``build_noise_scheduler`` (its T, and whether it is flow).
        noise_cfg: the ``noise.*`` options for flow; None: SD3's defaults (logit-normal 0, 1).
    """
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    if not is_flow(noise_scheduler):
        return torch.randint(0, num_train_timesteps, (batch_size,), device=device)
    noise_cfg = noise_cfg or NoiseConfig(prediction_type="flow")
    t = compute_density_for_timestep_sampling(noise_cfg.timestep_sampling, batch_size, noise_cfg.logit_mean,
                                              noise_cfg.logit_std, device=device)  # (B,) in [0, 1]
    if noise_cfg.flow_shift_in_training:
        s = noise_cfg.flow_shift
        t = s * t / (1 + (s - 1) * t)
    return t.float() * num_train_timesteps


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (ADM's ``normal_kl``)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) of a Gaussian integrated over 8-bit bins of [-1, 1] (Ho et al. 2020, eq. 13; ADM's code).

    DiT keeps this decoder term at t = 0 for latents, which are not 8-bit values: it is
    what the published recipe optimises, so it is kept as is.

    Args:
        x, means, log_scales: like tensors; log_scales = log of the standard deviation.
    Returns:
        Elementwise log-likelihoods, in nats.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)

    def cdf(v: Tensor) -> Tensor:  # ADM's tanh approximation of the standard normal CDF
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))

    cdf_plus, cdf_min = cdf(inv_std * (centered + 1.0 / 255.0)), cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vlb_terms(noise_scheduler: DDPMScheduler, latents: Tensor, noisy: Tensor, timesteps: Tensor, pred: Tensor,
              var_values: Tensor) -> Tensor:
    """Improved DDPM's L_vlb term per sample, for a learned variance (Nichol & Dhariwal 2021, sec. 3.1).

    The model's reverse step p(c_{t-1} | c_t) = N(mu_theta, Sigma_theta) has the mean of
    the posterior q(c_{t-1} | c_t, c_0-hat) with c_0-hat from the (frozen) prediction and
    log Sigma_theta = v log beta_t + (1 - v) log beta~_t, v = (var_values + 1) / 2 (eq.
    15; beta~_t the posterior variance, clipped at t = 0 to beta~_1, as ADM). The term is
    KL(q(c_{t-1} | c_t, c_0) || p) for t > 0 and the discretised decoder NLL at t = 0,
    averaged over (c, h, w), in bits (/ ln 2). DiT adds it unscaled to the MSE (its
    ``learn_sigma`` with loss type MSE); the caller passes ``pred`` detached, so it trains
    only the variance ("L_hybrid" with the mean's gradient from L_simple alone).

    Args:
        noise_scheduler: the training ``DDPMScheduler`` (betas, alphas_cumprod).
        latents: c_0, (B, c, h, w).
        noisy: c_t, (B, c, h, w).
        timesteps: (B,) int64 in [0, T).
        pred: the model's epsilon or v (per the scheduler's prediction_type), (B, c, h, w).
        var_values: the model's other c channels, (B, c, h, w), about [-1, 1].
    Returns:
        (B,) float32, bits per latent value.
    """
    device = latents.device
    betas = noise_scheduler.betas.to(device, torch.float64)
    a = noise_scheduler.alphas_cumprod.to(device, torch.float64)
    a_prev = torch.cat([a.new_ones(1), a[:-1]])
    post_var = betas * (1 - a_prev) / (1 - a)
    post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))  # clipped: log 0 at t = 0 replaced
    coef0, coef_t = betas * a_prev.sqrt() / (1 - a), (1 - a_prev) * (1 - betas).sqrt() / (1 - a)

    def at(v: Tensor) -> Tensor:  # (B, 1, 1, 1) float64 of a per-t table
        return v[timesteps].view(-1, 1, 1, 1)

    x0, xt, pred = latents.double(), noisy.double(), pred.double()
    if noise_scheduler.config.prediction_type == "v_prediction":
        x0_hat = at(a).sqrt() * xt - (1 - at(a)).sqrt() * pred
    else:
        x0_hat = (xt - (1 - at(a)).sqrt() * pred) / at(a).sqrt()
    frac = (var_values.double() + 1) / 2
    model_logvar = frac * torch.log(at(betas)) + (1 - frac) * at(post_logvar)
    model_mean = at(coef0) * x0_hat + at(coef_t) * xt
    true_mean = at(coef0) * x0 + at(coef_t) * xt
    kl = normal_kl(true_mean, at(post_logvar), model_mean, model_logvar).mean(dim=(1, 2, 3)) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar).mean(dim=(1, 2, 3)) / math.log(2.0)
    return torch.where(timesteps == 0, nll, kl).float()


def diffusion_loss(
    unet: nn.Module,
    noise_scheduler: Any,
    latents: Tensor,
    class_labels: Tensor | None,
    snr_gamma: float | None = None,
    noise: Tensor | None = None,
    timesteps: Tensor | None = None,
    noise_cfg: NoiseConfig | None = None,
    vlb: bool = True,
) -> Tensor:
    """The denoising (or flow-matching) loss of one batch of clean latents.

    Per ``build_noise_scheduler``'s kind: DDPM: c_t = sqrt(alpha_bar_t) c_0 +
    sqrt(1 - alpha_bar_t) eps; target eps (epsilon prediction) or v = sqrt(alpha_bar_t)
    eps - sqrt(1 - alpha_bar_t) c_0 (v_prediction), per its ``prediction_type``. flow:
    c_t = (1 - t) c_0 + t eps, target eps - c_0 (``flow_noisy_and_target``), the U-Net
    given t * T.

    A denoiser with 2c output channels (``learns_sigma``) also gets the ``vlb_terms`` of
    its variance channels, its mean frozen for that term (DiT / improved DDPM).

    Args:
        unet: the denoiser: maps (c_t, t (B,), class_labels=y) to an object with
            ``.sample`` (B, c or 2c, h, w); the (possibly DDP-wrapped) ``UNet2DModel`` or
            ``DiTTransformer2DModel``.
        noise_scheduler: ``build_noise_scheduler``'s ``DDPMScheduler`` or, for flow,
            ``FlowMatchEulerDiscreteScheduler``.
        latents: c_0, (B, c, h, w) float32, already ``(z - shift) * scaling_factor``.
        class_labels: (B,) int64 (the null class where dropped), or None: unconditional
            (``null_labels``: the null class for a denoiser that always takes a label).
        snr_gamma: Min-SNR-gamma weighting (``min_snr_weights``); None = unweighted.
            DDPM only.
        noise: eps, (B, c, h, w); None draws it from the global RNG.
        timesteps: (B,) the U-Net's timestep input: DDPM int64 in [0, T) (the paper's
            1..T); flow float t * T, t in [0, 1] (ints are taken as such floats). None
            draws them (``draw_timesteps``, after the noise).
        noise_cfg: flow's timestep density (``draw_timesteps``); None: SD3's defaults.
        vlb: add the learned variance's ``vlb_terms`` (when the denoiser has them); False
            gives the MSE of the target alone (the validation loss).
    Returns:
        Scalar float32: the squared error averaged over (c, h, w), weighted per sample
        (plus the L_vlb bits of a learned variance), then averaged over the batch.
    Raises:
        ValueError: ``snr_gamma`` with a flow scheduler.
    """
    b = latents.shape[0]
    if noise is None:  # not randn_like: its values would follow the memory layout (channels_last)
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
    if timesteps is None:
        timesteps = draw_timesteps(noise_scheduler, b, latents.device, noise_cfg)
    if is_flow(noise_scheduler):
        if snr_gamma is not None:
            raise ValueError("snr_gamma (Min-SNR) is defined for the DDPM objectives, not for flow matching")
        timesteps = timesteps.float()
        noisy, target = flow_noisy_and_target(latents, noise, timesteps / noise_scheduler.config.num_train_timesteps)
    else:
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)  # (B, c, h, w)
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
    if class_labels is None:
        class_labels = null_labels(unet, b, latents.device)
    out = unet(noisy, timesteps, class_labels=class_labels).sample  # (B, c or 2c, h, w)
    c = latents.shape[1]
    pred = out[:, :c]
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(noise_scheduler, timesteps, snr_gamma)
    if vlb and out.shape[1] == 2 * c:
        if is_flow(noise_scheduler):
            raise ValueError("a learned variance (2c output channels) is defined for the DDPM objectives, not for flow")
        per_sample = per_sample + vlb_terms(noise_scheduler, latents, noisy, timesteps, pred.detach(), out[:, c:])
    return per_sample.mean()


def drop_labels(labels: Tensor, null_index: int, p: float) -> Tensor:
    """Replace each label by the null class with probability p (classifier-free guidance).

    Args:
        labels: (B,) int64 in [0, null_index).
    Returns:
        (B,) int64; draws from the global RNG of ``labels.device``.
    """
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_index), labels)


def resolve_vae_path(cfg: LDMConfig, index: dict[str, Any]) -> str:
    """The VAE to decode with: ``data.vae``, else the path the cache's index records.

    Raises:
        ValueError: if neither names one.
    """
    if cfg.data.vae:
        return cfg.data.vae
    recorded = (index.get("vae") or {}).get("path")
    if recorded and Path(recorded).exists():
        return str(recorded)
    where = f" (the cache records {recorded!r}, which does not exist here)" if recorded else ""
    raise ValueError(
        f"which VAE made {cfg.data.latents}? Give --vae DIR (the diffusers AutoencoderKL folder given to "
        f"encode_latents.py){where}"
    )


def validation_cache(cfg: LDMConfig, dataset: LatentDataset) -> str:
    """The cache the fixed-noise validation loss reads: ``data.val_latents``, else the training cache.

    Raises:
        FileNotFoundError, ValueError: from ``load_index``; ValueError if the held-out
            cache was made by another VAE than ``dataset``'s, or has another latent shape
            or other classes.
    """
    if not cfg.data.val_latents:
        return cfg.data.latents
    held_out, train = load_index(cfg.data.val_latents), load_index(cfg.data.latents)
    if held_out["vae"]["sha256"] != train["vae"]["sha256"] or tuple(held_out["latent_shape"]) != dataset.latent_shape:
        raise ValueError(
            f"data.val_latents {cfg.data.val_latents} (VAE sha256 {held_out['vae']['sha256'][:12]}, latents "
            f"{tuple(held_out['latent_shape'])}) must be encoded by the VAE of data.latents {cfg.data.latents} "
            f"(sha256 {train['vae']['sha256'][:12]}) at the same resolution {dataset.latent_shape}"
        )
    if held_out.get("classes") != train.get("classes"):
        raise ValueError(f"data.val_latents {cfg.data.val_latents} has classes {held_out.get('classes')}, but data.latents "
                         f"has {train.get('classes')}: a held-out cache needs the same class folders (or none on both)")
    return cfg.data.val_latents


def validation_timesteps(num_train_timesteps: int) -> Tensor:
    """The fixed-noise validation loss's timesteps: (VAL_TIMESTEPS,) int64, t = (k + 0.5) T / VAL_TIMESTEPS."""
    return ((torch.arange(VAL_TIMESTEPS) + 0.5) * num_train_timesteps / VAL_TIMESTEPS).long()


def fixed_validation_batch(
    root: str, normalization: LatentNormalization, num_train_timesteps: int, seed: int, labelled: bool,
    num_latents: int = 32,
) -> dict[str, Tensor]:
    """The fixed-noise validation set: ``num_latents`` posterior means x VAL_TIMESTEPS timesteps.

    Uses no global RNG (its own generator), so validating never changes training.

    Args:
        root: the latent cache to take them from (the training cache, or a held-out one).
        normalization: the training latents' (``LatentDataset.normalization``), applied
            as it is, not re-measured on ``root``.
        num_latents: latents taken, evenly spaced over the cache (all, if it has fewer).
    Returns:
        ``latents`` (N, c, h, w) float32, ``noise`` like it, ``timesteps`` (N,) int64
        (t = (k + 0.5) T / VAL_TIMESTEPS, k = 0..VAL_TIMESTEPS-1; for flow the same
        numbers are the U-Net's t * T, i.e. t = (k + 0.5) / VAL_TIMESTEPS), and with
        ``labelled`` the true ``labels`` (N,) int64; N = min(num_latents, len) * VAL_TIMESTEPS.
    """
    means = LatentDataset(root, sample_posterior=False, latent_normalization=normalization)
    n = len(means)
    picks = sorted({round(i * (n - 1) / max(num_latents - 1, 1)) for i in range(min(num_latents, n))})
    items = [means[i] for i in picks]
    k = VAL_TIMESTEPS
    latents = torch.stack([item["latents"] for item in items]).repeat_interleave(k, 0)
    t = validation_timesteps(num_train_timesteps).repeat(len(items))
    batch = {"latents": latents, "timesteps": t,
             "noise": torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))}
    if labelled:
        batch["labels"] = torch.stack([item["label"] for item in items]).repeat_interleave(k, 0)
    return batch


@torch.no_grad()
def validation_loss(
    unet: nn.Module, noise_scheduler: DDPMScheduler, batch: dict[str, Tensor], batch_size: int, autocast
) -> float:
    """Unweighted MSE of the objective's target on the fixed validation batch (noise and t fixed).

    The target is eps, v or the flow velocity eps - c_0, at the objective's own t, so
    the figure compares runs of one objective, not objectives: the targets differ in
    scale (eps has unit variance, the velocity about 2 for unit-variance latents) and in
    which t are hard. It compares denoisers (U-Net, DiT) of one objective; a learned
    variance's L_vlb is left out, so learn_sigma runs compare too.
    """
    was_training = unet.training
    unet.eval()
    total, n = 0.0, len(batch["latents"])
    device = next(unet.parameters()).device
    for i in range(0, n, batch_size):
        part = {k: v[i : i + batch_size].to(device) for k, v in batch.items()}
        with autocast():
            loss = diffusion_loss(unet, noise_scheduler, part["latents"], part.get("labels"),
                                  noise=part["noise"], timesteps=part["timesteps"], vlb=False)
        total += loss.item() * len(part["latents"])
    unet.train(was_training)
    return total / n


def sample_grid(
    pipeline: LatentDiffusionPipeline, num_images: int, steps: int, guidance_scale: float, path: Path
) -> None:
    """Generate ``num_images`` from seeds 0..N-1 (classes cycled) and save a PNG grid atomically.

    Image i uses ``image_generators(0, [i])`` and, for a class-conditional denoiser, class
    i % K (with K <= 16 classes each grid row holds one image of every class): the same
    images ``lat sample-ldm --seed 0`` draws first from the exported pipeline.
    """
    k = pipeline.num_classes
    labels = [i % k for i in range(num_images)] if k else None
    gens = image_generators(0, range(num_images), pipeline.device)
    was_training = pipeline.denoiser.training
    pipeline.denoiser.eval()
    images = pipeline(batch_size=num_images, num_inference_steps=steps, class_labels=labels,
                      guidance_scale=guidance_scale, generator=gens, output_type="pt").images
    pipeline.denoiser.train(was_training)
    nrow = k if k and k <= 16 else math.ceil(math.sqrt(num_images))
    grid = make_grid(images.cpu(), nrow=nrow, padding=2, pad_value=1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_image(grid, tmp)


def describe_normalization(normalization: LatentNormalization | dict[str, Any]) -> str:
    """One line for logs and errors: the kind and its values."""
    d = normalization.to_dict() if isinstance(normalization, LatentNormalization) else normalization
    if d["kind"] == "batch_norm":
        return (f"the VAE's own batch-norm normalisation (FLUX.2; {len(d['latents_mean'])} patchified channels, "
                f"patch {d['patch_size']})")
    if d["kind"] == "per_channel":
        return (f"per_channel normalisation (mean {[round(v, 4) for v in d['latents_mean']]}, std "
                f"{[round(v, 4) for v in d['latents_std']]}, scaling_factor {d['scaling_factor']:.6g})")
    return f"global normalisation (scaling_factor {d['scaling_factor']:.6g}, shift_factor {d['shift_factor'] or 0.0:.6g})"


def main(cfg: LDMConfig, output_dir: str | Path, resume: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train the denoiser (U-Net or DiT) on a latent cache, checkpoint, sample, and export ``pipeline/``.

    Args:
        cfg: the resolved config (``latent_diffusion.config.load_config``), with
            ``data.latents`` set (and ``data.vae``, unless the cache records its VAE).
        output_dir: where checkpoints/, pipeline/, samples/, logs/, config.yaml and
            metrics.jsonl go.
        resume: None, ``"latest"`` or a ``checkpoints/step-NNNNNNN`` path.
        overwrite: clear an earlier run in ``output_dir`` first.
    Returns:
        A summary: ``global_step``, ``first_val_loss`` / ``last_val_loss`` (main process;
        None elsewhere, and first is None on resume), ``pipeline_dir``, ``is_main_process``,
        ``nonfinite_skips`` and ``rollbacks`` (what the NaN guard did), and this process's
        trained (unwrapped) ``denoiser`` (also under its older name ``unet``) and ``ema``
        (or None).
    Raises:
        FileExistsError: ``output_dir`` holds a run and neither resume nor overwrite.
        FileNotFoundError: a missing cache, VAE or checkpoint.
        ValueError: no ``data.latents``; no VAE; a cache made by another VAE; a latent
            shape the denoiser cannot take; a resume whose latent normalisation differs
            from this run's.
        TrainingStopped: a signal (after a checkpoint) or NaN/inf steps the guard gave up on.
    """
    if not cfg.data.latents:
        raise ValueError("no latent cache: give --latents DIR (made by `lat encode-latents`) or data.latents=DIR")
    accelerator, out, resume_path = start_run(cfg.train, output_dir, resume, overwrite)  # same seed on every process

    # ---- frozen VAE and the latent cache ------------------------------------------
    # The saved config records the VAE used. (The index is not kept: its list of every
    # source path would be copied into each DataLoader worker.)
    cfg.data.vae = resolve_vae_path(cfg, load_index(cfg.data.latents))
    vae = load_vae(cfg.data.vae).requires_grad_(False)
    # Refuses a cache encoded by a different VAE (weights hash in index.json).
    dataset = LatentDataset(cfg.data.latents, sample_posterior=cfg.data.sample_posterior,
                            scaling_factor=cfg.data.scaling_factor, shift_factor=cfg.data.shift_factor, vae=vae,
                            latent_normalization=cfg.data.latent_normalization)
    normalization = dataset.normalization
    # What the denoiser trains on is what the pipeline's VAE must undo before decoding.
    vae.register_to_config(**normalization.vae_config())
    vae.to(accelerator.device)
    num_classes = dataset.num_classes if cfg.model.class_conditional else None
    notes = [f"latents: {len(dataset)} x {tuple(dataset.latent_shape)} from {cfg.data.latents}, "
             f"{describe_normalization(normalization)}, "
             f"{num_classes or 'no'} classes{' (labels ignored)' if dataset.num_classes and not num_classes else ''}"]

    # ---- denoiser, noise, optimizer, EMA ------------------------------------------
    unet = build_denoiser(cfg.model, tuple(dataset.latent_shape), num_classes)  # UNet2DModel or DiTTransformer2DModel
    null_index = null_class_index(unet) if num_classes else None  # None: no labels to drop
    noise_scheduler = build_noise_scheduler(cfg.noise)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    unet.to(memory_format=memory_format)
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.allow_tf32
    torch.backends.cudnn.allow_tf32 = cfg.train.allow_tf32
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps,
                                  fused=cfg.optim.fused and accelerator.device.type == "cuda")
    lr_scheduler = get_scheduler(cfg.optim.lr_scheduler, optimizer, num_warmup_steps=cfg.optim.lr_warmup_steps,
                                 num_training_steps=cfg.train.max_steps)
    ema = None
    if cfg.train.use_ema:
        ema = EMAModel(unet.parameters(), decay=cfg.train.ema_decay, use_ema_warmup=cfg.train.ema_warmup,
                       inv_gamma=1.0, power=cfg.train.ema_power, model_cls=type(unet), model_config=unet.config)

    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    unet_unwrapped: nn.Module = accelerator.unwrap_model(unet)
    params = list(unet_unwrapped.parameters())
    if ema is not None:
        ema.to(accelerator.device)
    sampler_name = cfg.noise.pipeline_scheduler or default_sampler(cfg.noise.prediction_type)
    learned_variance = learns_sigma(unet_unwrapped) or None  # the ddpm sampler steps with it
    sampler_scheduler = build_sampler(sampler_name, noise_scheduler.config, learned_variance=learned_variance)
    pipeline = LatentDiffusionPipeline(unet_unwrapped, sampler_scheduler, vae,
                                       class_names=dataset.class_names if num_classes else None,
                                       prediction_type=cfg.noise.prediction_type)
    pipeline.set_progress_bar_config(disable=True)
    val_batch = fixed_validation_batch(validation_cache(cfg, dataset), normalization,
                                       cfg.noise.num_train_timesteps, cfg.train.seed, null_index is not None,
                                       cfg.data.num_val_latents)

    # ---- resume -------------------------------------------------------------------
    guard = NonFiniteGuard.for_run(cfg.train)  # disabled under fp16 (the GradScaler skips)
    checkpoint_model_config = OmegaConf.to_container(OmegaConf.structured(cfg.model))  # refused if it differs
    global_step = 0
    if resume_path is not None:
        state = load_checkpoint(accelerator, resume_path, ema, checkpoint_model_config, guard)
        global_step = state["global_step"]
        trained = state.get("latent_normalization") or LatentNormalization(
            "global", state["scaling_factor"], state["shift_factor"]).to_dict()  # checkpoints from before it was kept
        if trained != normalization.to_dict():
            kind = trained["kind"]
            fix = (f"data.latent_normalization={kind} data.scaling_factor={trained['scaling_factor']}"
                   + (f" data.shift_factor={trained['shift_factor']}" if kind == "global" else " (and the same cache)"))
            raise ValueError(
                f"{resume_path} was trained on latents normalised as {describe_normalization(trained)}, but this run "
                f"gives {describe_normalization(normalization)}; resume with {fix}"
            )
    else:
        set_seed(cfg.train.seed, device_specific=True)  # on resume, load_state restored each process's RNG

    metrics_log = open_logs(accelerator, cfg, out, notes, global_step if resume_path else None)
    samples_per_step = cfg.data.batch_size * cfg.train.gradient_accumulation_steps  # per process
    batches = infinite_batches(dataset, cfg.data.batch_size, cfg.data.num_workers, accelerator, cfg.train.seed,
                               start=global_step * samples_per_step + guard.data_offset, keys="index")

    def run_validation(step: int) -> float:
        """Main process, EMA weights: val/loss in metrics.jsonl + TensorBoard, samples/step-NNNNNNN.png."""
        with ema_weights(ema, unet_unwrapped):
            val_loss = validation_loss(unet_unwrapped, noise_scheduler, val_batch, cfg.data.batch_size,
                                       accelerator.autocast)
            if cfg.train.num_validation_samples:
                grid = out / "samples" / f"step-{step:07d}.png"
                sample_grid(pipeline, cfg.train.num_validation_samples, cfg.train.validation_inference_steps,
                            cfg.train.validation_guidance_scale, grid)
                log_image(accelerator, "val/samples", grid, step)
        metrics_log.write(step, {"val/loss": val_loss})
        accelerator.log({"val/loss": val_loss}, step=step)
        tqdm.write(f"step {step}: validation loss {val_loss:.4f}")
        return val_loss

    def checkpoint_state() -> dict[str, Any]:
        """The scalars a checkpoint keeps beside Accelerate's state (state.json)."""
        return {"latent_normalization": normalization.to_dict(), "model": checkpoint_model_config, **guard.state()}

    first_val = last_val = None
    if accelerator.is_main_process and resume_path is None:
        first_val = last_val = run_validation(0)
    accelerator.wait_for_everyone()

    # ---- loop ---------------------------------------------------------------------
    n_params = sum(p.numel() for p in params)
    logger.info(
        "training a %.2fM-parameter %s (%s) for %d steps, %d latents per step over %d process(es)",
        n_params / 1e6, type(unet_unwrapped).__name__, f"{num_classes} classes + null" if num_classes else "unconditional",
        cfg.train.max_steps,
        samples_per_step * accelerator.num_processes, accelerator.num_processes,
    )
    progress = tqdm(total=cfg.train.max_steps, initial=global_step, disable=not accelerator.is_main_process,
                    desc="train_ldm", unit="step", dynamic_ncols=True)
    window = LogWindow()
    micro = 1.0 / cfg.train.gradient_accumulation_steps  # each micro-batch's share of a logged step
    with StopSignals() as stop:  # SIGTERM/SIGINT end the step, write a checkpoint and stop
        while global_step < cfg.train.max_steps:
            with accelerator.accumulate(unet):
                batch = next(batches)
                latents = batch["latents"].to(accelerator.device, memory_format=memory_format,
                                              non_blocking=True)  # (B, c, h, w) c_0
                labels = None
                if null_index is not None:
                    labels = drop_labels(batch["label"].to(accelerator.device), null_index, cfg.model.label_dropout)
                with accelerator.autocast():
                    loss = diffusion_loss(unet, noise_scheduler, latents, labels, cfg.noise.snr_gamma,
                                          noise_cfg=cfg.noise)
                accelerator.backward(loss)
                grad_norm = optimizer_step(accelerator, optimizer, params, cfg.optim.max_grad_norm, guard,
                                           type(unet_unwrapped).__name__)
                window.add({"loss": loss}, micro)  # a tensor: no device sync per step

            if not accelerator.sync_gradients:
                continue
            guard.end_step(global_step)  # TrainingStopped after K bad steps in a row, unless rolling back
            if guard.rollback_due:  # reload the newest checkpoint, lower the LR, go on past these batches
                global_step = rollback(accelerator, out, guard, global_step, samples_per_step, [(optimizer, lr_scheduler)],
                                       metrics_log, ema, checkpoint_model_config, window, progress)["global_step"]
                continue
            global_step += 1
            window.end_step(grad_norm)
            lr_scheduler.step()
            if ema is not None:
                ema.step(params)
            progress.update(1)

            if due(global_step, cfg.train.log_steps, cfg.train.max_steps):
                logs = window.emit(accelerator, samples_per_step * accelerator.num_processes, "latents_per_sec")
                logs["lr"] = optimizer.param_groups[0]["lr"]
                if ema is not None:
                    logs["ema_decay"] = ema.cur_decay_value
                write_logs(accelerator, metrics_log, global_step, logs, guard)
                progress.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

            # Validation and checkpoints when due; after SIGTERM/SIGINT a checkpoint, then
            # TrainingStopped (the script exits 128 + signum).
            val = validate_and_checkpoint(accelerator, cfg.train, stop, out, global_step, run_validation,
                                          checkpoint_state, ema, progress, window)
            last_val = val if val is not None else last_val
    progress.close()

    # ---- export -------------------------------------------------------------------
    pipeline_dir = out / "pipeline"
    if accelerator.is_main_process:
        export = LatentDiffusionPipeline(final_weights(unet_unwrapped, ema).eval(),
                                         build_sampler(sampler_name, noise_scheduler.config, learned_variance=learned_variance),
                                         vae.eval(), class_names=pipeline.config.class_names,
                                         prediction_type=cfg.noise.prediction_type)
        save_pipeline(export, pipeline_dir, card=dict(pipeline=export, steps=global_step, latents=str(cfg.data.latents),
                                                      val_loss=last_val, config=OmegaConf.to_container(OmegaConf.structured(cfg))))
        logger.info("exported %s (%s scheduler; %s)", pipeline_dir, type(export.scheduler).__name__,
                    describe_normalization(normalization))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"global_step": global_step, "first_val_loss": first_val, "last_val_loss": last_val,
            "pipeline_dir": str(pipeline_dir), "export_dir": str(pipeline_dir), "is_main_process": accelerator.is_main_process,
            "denoiser": unet_unwrapped, "unet": unet_unwrapped, "ema": ema, "nonfinite_skips": guard.skipped,
            "rollbacks": guard.rollbacks}
