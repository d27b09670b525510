"""Stage 2: train a noise-predicting U-Net on cached latents, export a pipeline.

Latent diffusion (Rombach et al. 2022): the autoencoder is frozen and its latents were
encoded once (``scripts/encode_latents.py``). Each step draws clean latents c_0 from the
cache (a fresh posterior sample, times the scaling factor), t uniformly from {1..T} and
eps ~ N(0, I), forms c_t = sqrt(alpha_bar_t) c_0 + sqrt(1 - alpha_bar_t) eps
(``DDPMScheduler.add_noise``) and regresses the U-Net's eps_theta(c_t, t, y) on eps with
an MSE (Ho et al. 2020, "simple" loss; or on v, Salimans & Ho 2022), optionally Min-SNR
weighted (Hang et al. 2023).

Reads top to bottom like ``autoencoderkl/train.py``: Accelerator -> seed -> run dir ->
VAE and latent cache -> U-Net, schedulers, optimizer, EMA -> data -> ``prepare`` ->
resume -> loop -> export ``pipeline/``. Launch with ``accelerate launch
scripts/train_ldm.py --config ... --latents ...`` (any number of processes) or torchrun.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from autoencoderkl.atomic import atomic_path
from autoencoderkl.config import save_config
from autoencoderkl.data import InfiniteSampler
from autoencoderkl.model import load_vae
from autoencoderkl.run import (
    MetricsLog,
    NonFiniteGuard,
    StopSignals,
    build_accelerator,
    checkpoint_or_stop,
    load_checkpoint,
    prepare_output_dir,
    reduce_mean,
    resolve_resume,
    set_cpu_threads,
)

from .config import LDMConfig
from .latents import LatentDataset, load_index
from .model import build_noise_scheduler, build_sampler, build_unet, null_class_index
from .pipeline import LatentDiffusionPipeline, save_pipeline
from .sample import image_generators

logger = logging.getLogger(__name__)

VAL_LATENTS = 32  # cached latents (posterior means, evenly spaced) in the fixed-noise validation loss
VAL_TIMESTEPS = 10  # ... each noised at these many evenly spaced t


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


def diffusion_loss(
    unet: nn.Module,
    noise_scheduler: DDPMScheduler,
    latents: Tensor,
    class_labels: Tensor | None,
    snr_gamma: float | None = None,
    noise: Tensor | None = None,
    timesteps: Tensor | None = None,
) -> Tensor:
    """The denoising loss of one batch of clean latents.

    c_t = sqrt(alpha_bar_t) c_0 + sqrt(1 - alpha_bar_t) eps; target eps (epsilon
    prediction) or v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) c_0 (v_prediction),
    per ``noise_scheduler.config.prediction_type``.

    Args:
        unet: maps (c_t, t, class_labels=y) to an object with ``.sample`` (B, c, h, w);
            the (possibly DDP-wrapped) ``UNet2DModel``.
        latents: c_0, (B, c, h, w) float32, already ``(z - shift) * scaling_factor``.
        class_labels: (B,) int64 (the null class where dropped), or None.
        snr_gamma: Min-SNR-gamma weighting (``min_snr_weights``); None = unweighted.
        noise: eps, (B, c, h, w); None draws it from the global RNG.
        timesteps: (B,) int64 in [0, T) (the paper's 1..T); None draws them uniformly.
    Returns:
        Scalar float32: the squared error averaged over (c, h, w), weighted per sample,
        then averaged over the batch.
    """
    b = latents.shape[0]
    if noise is None:  # not randn_like: its values would follow the memory layout (channels_last)
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
    if timesteps is None:
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), device=latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)  # (B, c, h, w)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    pred = unet(noisy, timesteps, class_labels=class_labels).sample
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(noise_scheduler, timesteps, snr_gamma)
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


class _Indices(torch.utils.data.Sampler):
    """``InfiniteSampler``'s ``(index, epoch)`` keys -> plain indices for ``LatentDataset``."""

    def __init__(self, sampler: InfiniteSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[int]:
        return (index for index, _ in self.sampler)


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


def fixed_validation_batch(
    root: str, scaling_factor: float, shift_factor: float, num_train_timesteps: int, seed: int, labelled: bool
) -> dict[str, Tensor]:
    """The fixed-noise validation set: VAL_LATENTS posterior means x VAL_TIMESTEPS timesteps.

    Uses no global RNG (its own generator), so validating never changes training.

    Returns:
        ``latents`` (N, c, h, w) float32, ``noise`` like it, ``timesteps`` (N,) int64
        (t = (k + 0.5) T / VAL_TIMESTEPS, k = 0..VAL_TIMESTEPS-1), and with ``labelled``
        the true ``labels`` (N,) int64; N = min(VAL_LATENTS, len) * VAL_TIMESTEPS.
    """
    means = LatentDataset(root, sample_posterior=False, scaling_factor=scaling_factor, shift_factor=shift_factor)
    n = len(means)
    picks = sorted({round(i * (n - 1) / max(VAL_LATENTS - 1, 1)) for i in range(min(VAL_LATENTS, n))})
    items = [means[i] for i in picks]
    k = VAL_TIMESTEPS
    latents = torch.stack([item["latents"] for item in items]).repeat_interleave(k, 0)
    t = ((torch.arange(k) + 0.5) * num_train_timesteps / k).long().repeat(len(items))
    batch = {"latents": latents, "timesteps": t,
             "noise": torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))}
    if labelled:
        batch["labels"] = torch.stack([item["label"] for item in items]).repeat_interleave(k, 0)
    return batch


@torch.no_grad()
def validation_loss(
    unet: UNet2DModel, noise_scheduler: DDPMScheduler, batch: dict[str, Tensor], batch_size: int, autocast
) -> float:
    """Unweighted denoising MSE on the fixed validation batch (noise and t fixed, so curves are smooth)."""
    was_training = unet.training
    unet.eval()
    total, n = 0.0, len(batch["latents"])
    device = next(unet.parameters()).device
    for i in range(0, n, batch_size):
        part = {k: v[i : i + batch_size].to(device) for k, v in batch.items()}
        with autocast():
            loss = diffusion_loss(unet, noise_scheduler, part["latents"], part.get("labels"),
                                  noise=part["noise"], timesteps=part["timesteps"])
        total += loss.item() * len(part["latents"])
    unet.train(was_training)
    return total / n


def sample_grid(
    pipeline: LatentDiffusionPipeline, num_images: int, steps: int, guidance_scale: float, path: Path
) -> None:
    """Generate ``num_images`` from seeds 0..N-1 (classes cycled) and save a PNG grid atomically.

    Image i uses ``image_generators(0, [i])`` and, for a class-conditional U-Net, class
    i % K (with K <= 16 classes each grid row holds one image of every class): the same
    images ``sample_ldm.py --seed 0`` draws first from the exported pipeline.
    """
    k = pipeline.num_classes
    labels = [i % k for i in range(num_images)] if k else None
    gens = image_generators(0, range(num_images), pipeline.device)
    was_training = pipeline.unet.training
    pipeline.unet.eval()
    images = pipeline(batch_size=num_images, num_inference_steps=steps, class_labels=labels,
                      guidance_scale=guidance_scale, generator=gens, output_type="pt").images
    pipeline.unet.train(was_training)
    nrow = k if k and k <= 16 else math.ceil(math.sqrt(num_images))
    grid = make_grid(images.cpu(), nrow=nrow, padding=2, pad_value=1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_image(grid, tmp)


def main(cfg: LDMConfig, output_dir: str | Path, resume: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train the U-Net on a latent cache, checkpoint, sample, and export ``pipeline/``.

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
        and this process's trained (unwrapped) ``unet`` and ``ema`` (or None).
    Raises:
        FileExistsError: ``output_dir`` holds a run and neither resume nor overwrite.
        FileNotFoundError: a missing cache, VAE or checkpoint.
        ValueError: no ``data.latents``; no VAE; a cache made by another VAE; a latent
            shape the U-Net cannot take; a resume whose scaling differs from the cache's.
    """
    if not cfg.data.latents:
        raise ValueError("no latent cache: give --latents DIR (made by scripts/encode_latents.py) or data.latents=DIR")
    accelerator = build_accelerator(output_dir, cfg.train.mixed_precision, cfg.train.gradient_accumulation_steps,
                                    compile=cfg.train.compile)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    threads = set_cpu_threads(accelerator, cfg.train.cpu_threads)
    logger.info("device %s, %d process(es), %d CPU threads each", accelerator.device, accelerator.num_processes, threads)
    set_seed(cfg.train.seed)  # identical initial weights on every process

    out = Path(output_dir)
    if accelerator.is_main_process:
        prepare_output_dir(out, resume, overwrite)
    accelerator.wait_for_everyone()
    resume_path = resolve_resume(out, resume)

    # ---- frozen VAE and the latent cache ------------------------------------------
    index = load_index(cfg.data.latents)
    cfg.data.vae = resolve_vae_path(cfg, index)  # the saved config records the VAE used
    vae = load_vae(cfg.data.vae).requires_grad_(False)
    # Refuses a cache encoded by a different VAE (weights hash in index.json).
    dataset = LatentDataset(cfg.data.latents, sample_posterior=cfg.data.sample_posterior,
                            scaling_factor=cfg.data.scaling_factor, shift_factor=cfg.data.shift_factor, vae=vae)
    scaling_factor, shift_factor = float(dataset.scaling_factor), float(dataset.shift_factor)
    # What the U-Net trains on is what the pipeline's VAE must undo before decoding.
    vae.register_to_config(scaling_factor=scaling_factor, shift_factor=shift_factor)
    vae.to(accelerator.device)
    num_classes = dataset.num_classes if cfg.model.class_conditional else None
    notes = [f"latents: {len(dataset)} x {tuple(dataset.latent_shape)} from {cfg.data.latents}, "
             f"scaling_factor {scaling_factor:.6g}, shift_factor {shift_factor:.6g}, "
             f"{num_classes or 'no'} classes{' (labels ignored)' if dataset.num_classes and not num_classes else ''}"]

    # ---- U-Net, noise, optimizer, EMA ---------------------------------------------
    unet = build_unet(cfg.model, tuple(dataset.latent_shape), num_classes)
    null_index = null_class_index(unet)
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
                       inv_gamma=1.0, power=cfg.train.ema_power, model_cls=UNet2DModel, model_config=unet.config)

    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    unet_unwrapped: UNet2DModel = accelerator.unwrap_model(unet)
    if ema is not None:
        ema.to(accelerator.device)
    sampler_scheduler = build_sampler(cfg.noise.pipeline_scheduler, noise_scheduler.config)
    pipeline = LatentDiffusionPipeline(unet_unwrapped, sampler_scheduler, vae,
                                       class_names=dataset.class_names if num_classes else None)
    pipeline.set_progress_bar_config(disable=True)
    val_batch = fixed_validation_batch(cfg.data.latents, scaling_factor, shift_factor,
                                       cfg.noise.num_train_timesteps, cfg.train.seed, null_index is not None)

    # ---- resume -------------------------------------------------------------------
    checkpoint_model_config = OmegaConf.to_container(OmegaConf.structured(cfg.model))  # refused if it differs
    global_step = 0
    if resume_path is not None:
        state = load_checkpoint(accelerator, resume_path, ema, model_config=checkpoint_model_config)
        global_step = state["global_step"]
        trained = (state.get("scaling_factor"), state.get("shift_factor"))
        if trained != (scaling_factor, shift_factor):
            raise ValueError(
                f"{resume_path} was trained on latents scaled by (scaling_factor, shift_factor) = {trained}, "
                f"but the cache now gives {(scaling_factor, shift_factor)}; resume with "
                f"data.scaling_factor={trained[0]} data.shift_factor={trained[1]}"
            )
        logger.info("resumed from %s at step %d", resume_path, global_step)
    else:
        set_seed(cfg.train.seed, device_specific=True)  # on resume, load_state restored each process's RNG

    if accelerator.is_main_process:
        save_config(cfg, out / "config.yaml", notes)
        accelerator.init_trackers("tensorboard")
    metrics_log = MetricsLog(out / "metrics.jsonl", accelerator.is_main_process, global_step if resume_path else None)

    samples_per_step = cfg.data.batch_size * cfg.train.gradient_accumulation_steps  # per process
    sampler = InfiniteSampler(len(dataset), seed=cfg.train.seed, rank=accelerator.process_index,
                              world_size=accelerator.num_processes, start=global_step * samples_per_step)
    loader = DataLoader(
        dataset, batch_size=cfg.data.batch_size, sampler=_Indices(sampler), num_workers=cfg.data.num_workers,
        pin_memory=accelerator.device.type == "cuda", drop_last=True, persistent_workers=cfg.data.num_workers > 0,
        generator=torch.Generator().manual_seed(cfg.train.seed),  # not the global RNG a resume restored
    )
    batches = iter(loader)

    def run_validation(step: int) -> float:
        """Main process, EMA weights: val/loss in metrics.jsonl + TensorBoard, samples/step-NNNNNNN.png."""
        if ema is not None:
            ema.store(unet_unwrapped.parameters())
            ema.copy_to(unet_unwrapped.parameters())
        val_loss = validation_loss(unet_unwrapped, noise_scheduler, val_batch, cfg.data.batch_size, accelerator.autocast)
        sample_grid(pipeline, cfg.train.num_validation_samples, cfg.train.validation_inference_steps,
                    cfg.train.validation_guidance_scale, out / "samples" / f"step-{step:07d}.png")
        if ema is not None:
            ema.restore(unet_unwrapped.parameters())
        metrics_log.write(step, {"val/loss": val_loss})
        accelerator.log({"val/loss": val_loss}, step=step)
        return val_loss

    # The scalars a checkpoint keeps beside Accelerate's state (state.json).
    checkpoint_state = {"scaling_factor": scaling_factor, "shift_factor": shift_factor, "model": checkpoint_model_config}

    first_val = last_val = None
    if accelerator.is_main_process and resume_path is None:
        first_val = last_val = run_validation(0)
        logger.info("step 0: validation loss %.4f", first_val)
    accelerator.wait_for_everyone()

    # ---- loop ---------------------------------------------------------------------
    n_params = sum(p.numel() for p in unet_unwrapped.parameters())
    logger.info(
        "training a %.2fM-parameter UNet2DModel (%s) for %d steps, %d latents per step over %d process(es)",
        n_params / 1e6, f"{num_classes} classes + null" if num_classes else "unconditional", cfg.train.max_steps,
        samples_per_step * accelerator.num_processes, accelerator.num_processes,
    )
    progress = tqdm(total=cfg.train.max_steps, initial=global_step, disable=not accelerator.is_main_process,
                    desc="train_ldm", unit="step", dynamic_ncols=True)
    loss_sum, grad_norm = torch.zeros((), device=accelerator.device), None  # a tensor: no sync per step
    window_start, window_steps = time.perf_counter(), 0
    # fp16's GradScaler already skips overflowing steps, routinely while it calibrates.
    guard = NonFiniteGuard(cfg.train.max_consecutive_nonfinite, "U-Net") if cfg.train.mixed_precision != "fp16" else None
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
                    loss = diffusion_loss(unet, noise_scheduler, latents, labels, cfg.noise.snr_gamma)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    # max_norm inf: the norm only (grads are multiplied by exactly 1.0).
                    grad_norm = accelerator.clip_grad_norm_(unet.parameters(), cfg.optim.max_grad_norm or math.inf)
                    if guard is not None and not guard.check(grad_norm, global_step):
                        optimizer.zero_grad(set_to_none=True)  # AdamW skips parameters without grads
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach() / cfg.train.gradient_accumulation_steps

            if not accelerator.sync_gradients:
                continue
            global_step += 1
            window_steps += 1
            lr_scheduler.step()
            if ema is not None:
                ema.step(unet_unwrapped.parameters())
            progress.update(1)

            if global_step % cfg.train.log_steps == 0 or global_step == cfg.train.max_steps:
                elapsed = time.perf_counter() - window_start
                logs = {"loss": loss_sum.item() / window_steps}  # mean over the optimizer steps since the last line
                if grad_norm is not None:
                    logs["grad_norm"] = float(grad_norm)
                if guard is not None:
                    logs["nonfinite_skips"] = guard.skipped
                logs = reduce_mean(accelerator, logs)
                logs["latents_per_sec"] = window_steps * samples_per_step * accelerator.num_processes / elapsed
                logs["lr"] = optimizer.param_groups[0]["lr"]
                if ema is not None:
                    logs["ema_decay"] = ema.cur_decay_value
                metrics_log.write(global_step, logs)
                accelerator.log(logs, step=global_step)
                progress.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
                loss_sum.zero_()
                window_start, window_steps = time.perf_counter(), 0

            if global_step % cfg.train.validation_steps == 0 or global_step == cfg.train.max_steps:
                if accelerator.is_main_process:
                    last_val = run_validation(global_step)
                    progress.write(f"step {global_step}: validation loss {last_val:.4f}")
                accelerator.wait_for_everyone()

            # SIGTERM/SIGINT: a checkpoint, then TrainingStopped (the script exits 128 + signum)
            checkpoint_or_stop(accelerator, stop, out, global_step,
                               global_step % cfg.train.checkpointing_steps == 0 or global_step == cfg.train.max_steps,
                               lambda: checkpoint_state, ema, cfg.train.checkpoints_total_limit, progress)
            if window_steps == 0:  # keep validation and checkpoint time out of latents_per_sec
                window_start = time.perf_counter()
    progress.close()

    # ---- export -------------------------------------------------------------------
    pipeline_dir = out / "pipeline"
    if accelerator.is_main_process:
        final_unet = unet_unwrapped
        if ema is not None:
            final_unet = UNet2DModel.from_config(unet_unwrapped.config).to(accelerator.device)
            ema.copy_to(final_unet.parameters())
        export = LatentDiffusionPipeline(final_unet.eval(), build_sampler(cfg.noise.pipeline_scheduler,
                                                                          noise_scheduler.config),
                                         vae.eval(), class_names=pipeline.config.class_names)
        save_pipeline(export, pipeline_dir)
        logger.info("exported %s (%s scheduler; vae scaling_factor %.6g, shift_factor %.6g)", pipeline_dir,
                    type(export.scheduler).__name__, scaling_factor, shift_factor)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"global_step": global_step, "first_val_loss": first_val, "last_val_loss": last_val,
            "pipeline_dir": str(pipeline_dir), "is_main_process": accelerator.is_main_process,
            "unet": unet_unwrapped, "ema": ema}
