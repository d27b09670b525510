"""Stage 1: train an AutoencoderKL with L1 + LPIPS + PatchGAN + KL under Accelerate.

Reads top to bottom: Accelerator -> seed -> run dir -> data -> model, loss, optimizers ->
``prepare`` -> resume -> logs -> loop -> export. The data comes first so that a bad folder
fails before any model is built or any download is tried; the output dir is created by
``open_logs`` just before the loop, so a run that fails to start leaves none behind.

One encoder/decoder forward per optimizer step feeds both the autoencoder update and the
discriminator update (on the detached reconstruction), as in LDM's
``LPIPSWithDiscriminator`` recipe (Rombach et al. 2022). With ``loss.equivariance=eqvae``
that forward decodes a transformed latent tau(z) instead on some steps, and (tau(x),
decode(tau(z))) are the loss's inputs; on some others the image is downscaled first
(EQ-VAE, Kouzelis et al. 2025; see ``autoencoderkl.equivariance``). With
``loss.alignment_weight`` > 0, a frozen vision model's patch features are compared with a
projection of z (VA-VAE, Yao et al. 2025; see ``autoencoderkl.alignment``).

Launch with ``accelerate launch -m lat train-vae --config ...`` (any number of
processes) or ``torchrun --nproc_per_node N -m lat train-vae ...``.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from omegaconf import OmegaConf
from torch import Tensor
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from .alignment import alignment_state, build_projection, load_teacher, teacher_precision
from .atomic import atomic_path
from .config import VAEConfig
from .data import ImageFolder, broadcast_paths, demo_image_paths, evenly_spaced, list_images
from .discriminator import NLayerDiscriminator
from .hf_data import HFImageStream, StreamBatches, open_hf_training
from .equivariance import draw_equivariance_step, equivariance_scales, patchgan_min_size
from .losses import AutoencoderLoss, build_perceptual
from .metrics import psnr_ssim_8bit
from .model import (
    AutoencoderWithPosterior,
    build_vae,
    estimate_latent_factors,
    export_vae,
    freeze_encoder,
    latent_batch_norm,
    latent_normalization,
    load_vae,
    vae_type,
)
from .checkpoints import DATA_STATE, load_checkpoint, load_data_state
from .faults import NonFiniteGuard, StopSignals, rollback
from .launch import start_run
from .logs import LogWindow, log_image, open_logs, write_logs
from .loop import due, ema_weights, final_weights, infinite_batches, optimizer_step, validate_and_checkpoint

logger = logging.getLogger(__name__)

GRID_PAIRS = 8  # validation crops shown in each input | reconstruction grid


def split_paths(cfg: VAEConfig) -> tuple[list[Path], list[Path]]:
    """(train paths, validation paths) for ``data.source`` and the held-out rule.

    Raises:
        FileNotFoundError, ValueError: from ``list_images`` for a missing or empty folder;
            ValueError when holding images out would leave none to train on.
    """
    d = cfg.data
    if d.source == "demo":
        return demo_image_paths("train"), demo_image_paths("val")
    train = list_images(d.train_dir)
    if d.val_dir:
        return train, evenly_spaced(list_images(d.val_dir), d.num_val_images)
    if len(train) <= d.num_val_images:
        raise ValueError(
            f"{d.train_dir} has {len(train)} images; holding out data.num_val_images={d.num_val_images} "
            f"for validation would leave none to train on. Give data.val_dir or lower data.num_val_images."
        )
    val = evenly_spaced(train, d.num_val_images)
    held = set(val)
    return [p for p in train if p not in held], val


@torch.no_grad()
def validate(
    accelerator: Accelerator, vae: torch.nn.Module, images: Tensor, batch_size: int
) -> tuple[dict[str, float], Tensor]:
    """Reconstruct the fixed validation crops with the posterior mode; 8-bit PSNR/SSIM.

    Args:
        images: (N, 3, H, W) float in [-1, 1], on the accelerator's device.
    Returns:
        metrics: ``val/psnr`` (dB), ``val/psnr_std``, ``val/ssim`` over the N crops.
        reconstructions: (min(N, GRID_PAIRS), 3, H, W) for the grid, float in [-1, 1].
    """
    was_training = vae.training
    vae.eval()
    psnrs, ssims, shown = [], [], []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        with accelerator.autocast():
            rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.float()
        psnr, ssim = psnr_ssim_8bit(x, rec)
        psnrs.append(psnr), ssims.append(ssim), shown.append(rec[: max(GRID_PAIRS - i, 0)].clamp(-1, 1))
    vae.train(was_training)
    psnr, ssim = torch.cat(psnrs), torch.cat(ssims)
    metrics = {"val/psnr": psnr.mean().item(), "val/psnr_std": psnr.std().item() if len(psnr) > 1 else 0.0,
               "val/ssim": ssim.mean().item()}
    return metrics, torch.cat(shown)


def save_grid(inputs: Tensor, reconstructions: Tensor, path: Path) -> None:
    """PNG of (input | reconstruction) pairs, four pairs a row; written atomically.

    Args:
        inputs, reconstructions: (N, 3, H, W) float in [-1, 1].
    """
    pairs = torch.stack([inputs[: len(reconstructions)].float().cpu(), reconstructions.float().cpu()], 1).flatten(0, 1)
    grid = make_grid((pairs + 1) / 2, nrow=8, padding=2, pad_value=1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_image(grid, tmp)


def main(
    cfg: VAEConfig,
    output_dir: str | Path,
    resume: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train, checkpoint, validate and export an AutoencoderKL.

    Args:
        cfg: the resolved config (``load_config``).
        output_dir: where checkpoints/, vae/, samples/, logs/, config.yaml and
            metrics.jsonl go.
        resume: None, ``"latest"`` or a ``checkpoints/step-NNNNNNN`` path.
        overwrite: clear an earlier run in ``output_dir`` first.
    Returns:
        A summary: ``global_step``, ``first_val`` and ``last_val`` metrics (main process;
        None elsewhere, and ``first_val`` is None on resume), ``vae_dir``, ``is_main_process``,
        ``nonfinite_skips`` and ``rollbacks`` (what the NaN guard did), and this process's
        trained (unwrapped) ``vae`` and ``discriminator`` modules.
    Raises:
        FileExistsError: ``output_dir`` holds a run and neither resume nor overwrite.
        FileNotFoundError, ValueError: bad data folder, checkpoint or config values.
        RuntimeError: ``loss.perceptual_pretrained=true`` and no VGG16 weights.
        TrainingStopped: a signal (after a checkpoint) or NaN/inf steps the guard gave up on.
    """
    # Same seed on every process while building (identical initial weights and LPIPS),
    # then a per-process seed for posterior noise in the loop.
    accelerator, out, resume_path = start_run(cfg.train, output_dir, resume, overwrite)

    # ---- data (first: a bad folder or source fails before any model is built or VGG16 fetched)
    hf = None
    if cfg.data.source == "hf":  # a map-style HFImages, or this rank's HFImageStream
        hf = open_hf_training(cfg.data, accelerator, cfg.train.seed)
        train_set, val_set = hf.train, hf.val
    else:
        # The main process lists the folders; the other ranks receive the list (a million
        # files on network storage are walked once, not once per rank).
        train_paths, val_paths = broadcast_paths(accelerator, lambda: split_paths(cfg))
        train_set = ImageFolder(train_paths, cfg.data.resolution, cfg.data.resize, train=True, seed=cfg.train.seed,
                                cache_images=cfg.data.cache_images, rotate=cfg.data.rotate,
                                permute_channels=cfg.data.permute_channels, color_jitter=cfg.data.color_jitter)
        val_set = ImageFolder(val_paths, cfg.data.resolution, cfg.data.resize, train=False, grid=cfg.data.val_grid)
    # Training photos measured like the held-out ones (val/train_psnr): the gap between the
    # two curves is what the model memorised rather than learned.
    seen_paths = evenly_spaced(train_paths, cfg.data.num_train_val_images) if hf is None else []
    seen_set = (ImageFolder(seen_paths, cfg.data.resolution, cfg.data.resize, train=False, grid=cfg.data.val_grid)
                if seen_paths else None)
    stream = isinstance(train_set, HFImageStream)  # resumed from its saved position, not from a sample count
    val_images = val_set.all_crops().to(accelerator.device)  # unreadable ones skipped and counted
    seen_images = seen_set.all_crops().to(accelerator.device) if seen_set else None
    logger.info(  # unreadable training images are found (skipped, counted) when first read
        "data: %s, %d validation crops of %d px from %d images",
        hf.description if hf else f"{len(train_set)} training images", len(val_images), cfg.data.resolution,
        len(val_set.paths),
    )

    # ---- model, loss, optimizers -------------------------------------------------
    # The alignment teacher first: a Hub id that cannot be had fails before any model is built.
    teacher = None
    if cfg.loss.alignment_weight > 0:
        with accelerator.main_process_first():  # one process downloads, the rest read the cache
            teacher = load_teacher(cfg.loss.alignment_teacher, cfg.loss.alignment_resolution, accelerator.device,
                                   teacher_precision(cfg.train.mixed_precision))
    if cfg.model.pretrained:
        vae = load_vae(cfg.model.pretrained).train()
        if vae_type(vae) != cfg.model.type:
            raise ValueError(f"model.pretrained={cfg.model.pretrained} holds a {type(vae).__name__} "
                             f"(model.type={vae_type(vae)}), but this run says model.type={cfg.model.type}")
    else:
        vae = build_vae(cfg.model, cfg.data.resolution)
    if cfg.train.decoder_only:
        freeze_encoder(vae)
    if cfg.train.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    discriminator = NLayerDiscriminator(3, cfg.loss.disc_ndf, cfg.loss.disc_num_layers)
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        # Batch statistics over the global batch; torch's SyncBatchNorm has no CPU kernel.
        discriminator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)
    with accelerator.main_process_first():  # one process downloads VGG16, the rest read the cache
        perceptual, perceptual_note = build_perceptual(cfg.loss.perceptual_pretrained)
    notes = [f"perceptual: {perceptual_note}"] + ([f"alignment teacher: {teacher.description}"] if teacher else [])
    if perceptual is None and cfg.loss.perceptual_weight:
        cfg.loss.perceptual_weight = 0.0  # the saved config records what was really used
        notes.append("loss.perceptual_weight was set to 0.0 for this run because the VGG16 weights are unavailable")
    loss_fn = AutoencoderLoss(cfg.loss, perceptual).to(accelerator.device)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    for module in (vae, discriminator, loss_fn):
        module.to(memory_format=memory_format)
    if cfg.train.compile:
        # The adaptive weight differentiates nll_loss and g_loss separately with
        # retain_graph=True, which compiled backward graphs allow only without donated
        # buffers (the switch PyTorch's own error message names).
        torch._functorch.config.donated_buffer = False
        if loss_fn.perceptual is not None:
            loss_fn.perceptual = torch.compile(loss_fn.perceptual)  # frozen: not prepared, so compiled here
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.allow_tf32
    torch.backends.cudnn.allow_tf32 = cfg.train.allow_tf32

    # VA-VAE's projection of z onto the teacher's width, trained with the autoencoder (not exported).
    projection = build_projection(vae.config.latent_channels, teacher.hidden_size) if teacher else None
    params_g = [p for p in vae.parameters() if p.requires_grad] + (list(projection.parameters()) if projection else [])
    if cfg.loss.learn_logvar:
        params_g.append(loss_fn.logvar)
    params_d = list(discriminator.parameters())
    adam = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    fused = cfg.optim.fused and accelerator.device.type == "cuda"
    opt_g = torch.optim.Adam(params_g, fused=fused, **adam)
    opt_d = torch.optim.Adam(params_d, fused=fused, **adam)
    # Stepped by hand once per optimizer step; prepared only so save_state checkpoints them.
    schedule = dict(num_warmup_steps=cfg.optim.lr_warmup_steps, num_training_steps=cfg.train.max_steps)
    sched_g = get_scheduler(cfg.optim.lr_scheduler, opt_g, **schedule)
    sched_d = get_scheduler(cfg.optim.lr_scheduler, opt_d, **schedule)
    ema = EMAModel(vae.parameters(), decay=cfg.train.ema_decay, model_cls=type(vae), model_config=vae.config) if cfg.train.use_ema else None

    vae_forward = AutoencoderWithPosterior(vae, projection)
    vae_forward, discriminator, opt_g, opt_d, sched_g, sched_d = accelerator.prepare(
        vae_forward, discriminator, opt_g, opt_d, sched_g, sched_d
    )
    vae_unwrapped = accelerator.unwrap_model(vae_forward).vae
    disc_unwrapped = accelerator.unwrap_model(discriminator)
    last_layer = vae_unwrapped.decoder.conv_out.weight  # where the adaptive weight balances nll and GAN
    f = 2 ** (len(vae_unwrapped.config.block_out_channels) - 1)  # spatial factor: h = H // f
    if ema is not None:
        ema.to(accelerator.device)

    # ---- resume -------------------------------------------------------------------
    guard = NonFiniteGuard.for_run(cfg.train)  # disabled under fp16 (the GradScaler skips)
    # What a checkpoint's weights depend on; a resume with anything else is refused.
    checkpoint_model_config = {**OmegaConf.to_container(OmegaConf.structured(cfg.model)),
                               "disc_ndf": cfg.loss.disc_ndf, "disc_num_layers": cfg.loss.disc_num_layers,
                               **alignment_state(cfg.loss.alignment_weight, cfg.loss.alignment_teacher)}
    global_step = 0
    if resume_path is not None:
        state = load_checkpoint(accelerator, resume_path, ema, checkpoint_model_config, guard)
        global_step = state["global_step"]
        with torch.no_grad():
            loss_fn.logvar.fill_(state["logvar"])
    else:
        set_seed(cfg.train.seed, device_specific=True)  # on resume, load_state restored each process's RNG

    metrics_log = open_logs(accelerator, cfg, out, notes, global_step if resume_path else None)
    samples_per_step = cfg.data.batch_size * cfg.train.gradient_accumulation_steps  # per process
    num_workers = hf.num_workers if hf else cfg.data.num_workers
    if stream:  # each rank's position in its stream comes back from the checkpoint (a rollback leaves it)
        batches = StreamBatches(train_set, cfg.data.batch_size, num_workers, accelerator.device.type == "cuda")
        if resume_path is not None:
            batches.load_state_dict(load_data_state(accelerator, resume_path))
    else:
        batches = infinite_batches(train_set, cfg.data.batch_size, num_workers, accelerator, cfg.train.seed,
                                   start=global_step * samples_per_step + guard.data_offset)

    def run_validation(step: int) -> dict[str, float]:
        """Main process: metrics.jsonl + TensorBoard + samples/step-NNNNNNN.png (EMA weights if any)."""
        with ema_weights(ema, vae_unwrapped):
            metrics, recs = validate(accelerator, vae_unwrapped, val_images, cfg.data.batch_size)
            if seen_images is not None:
                seen, _ = validate(accelerator, vae_unwrapped, seen_images, cfg.data.batch_size)
                metrics.update({"val/train_psnr": seen["val/psnr"], "val/train_ssim": seen["val/ssim"]})
        metrics_log.write(step, metrics)
        accelerator.log(metrics, step=step)
        grid = out / "samples" / f"step-{step:07d}.png"
        save_grid(val_images, recs, grid)
        log_image(accelerator, "val/reconstructions", grid, step)
        seen_note = f" (training photos {metrics['val/train_psnr']:.2f} dB)" if "val/train_psnr" in metrics else ""
        tqdm.write(f"step {step}: val PSNR {metrics['val/psnr']:.2f} dB, SSIM {metrics['val/ssim']:.3f}{seen_note}")
        return metrics

    def checkpoint_state() -> dict[str, Any]:
        """The scalars a checkpoint keeps beside Accelerate's state (state.json)."""
        return {"logvar": loss_fn.logvar.item(), "model": checkpoint_model_config,
                **guard.state(), **({DATA_STATE: batches.state_dict()} if stream else {})}

    first_val = last_val = None
    if accelerator.is_main_process and resume_path is None:
        first_val = last_val = run_validation(0)
    accelerator.wait_for_everyone()

    # ---- loop ---------------------------------------------------------------------
    n_params = sum(p.numel() for p in vae_unwrapped.parameters())
    logger.info(
        "training %.2fM-parameter %s for %d steps, %d images per step over %d process(es)",
        n_params / 1e6, type(vae_unwrapped).__name__, cfg.train.max_steps, samples_per_step * accelerator.num_processes, accelerator.num_processes,
    )
    progress = tqdm(total=cfg.train.max_steps, initial=global_step, disable=not accelerator.is_main_process,
                    desc="train_vae", unit="step", dynamic_ncols=True)
    window = LogWindow()
    micro = 1.0 / cfg.train.gradient_accumulation_steps  # each micro-batch's share of a logged step
    # One LPIPS and one PatchGAN backward per step once the GAN is on (not under fp16: the
    # shared gradients would be taken before the GradScaler scales the loss).
    shared_backward = cfg.loss.shared_backward and cfg.train.mixed_precision != "fp16"
    # EQ-VAE's scales that give whole latent cells and an image the loss can score (the
    # PatchGAN's smallest input, unless disc_factor is 0). Not tied to disc_start or
    # max_steps: a resumed run with another max_steps must replay the same draws.
    eq_scales = equivariance_scales((cfg.data.resolution // f,) * 2, f,
                                    patchgan_min_size(cfg.loss.disc_num_layers) if cfg.loss.disc_factor > 0 else f)
    with StopSignals() as stop:  # SIGTERM/SIGINT end the step, write a checkpoint and stop
        while global_step < cfg.train.max_steps:
            with accelerator.accumulate(vae_forward, discriminator):
                images = next(batches).to(accelerator.device, memory_format=memory_format, non_blocking=True)  # (B, 3, H, W) in [-1, 1]
                # EQ-VAE: this step's draw, a function of (seed, step); None: an ordinary step.
                eq = draw_equivariance_step(cfg.loss.equivariance, cfg.loss.equivariance_prob,
                                            cfg.loss.equivariance_prior_scale_prob, cfg.train.seed, global_step, eq_scales)
                if eq is not None and eq.kind == "prior_lowres":
                    images = eq(images, f)  # (B, 3, f h', f w'): the encoder sees the downscaled image
                tau = eq if eq is not None and eq.kind == "equivariance" else None
                # (B, 3, H, W) decode(z), or decode(tau(z)) on an equivariance step; (B, 2c, h, w);
                # [projection(z) (B, D, h, w) of the untransformed z, with the alignment on]
                reconstructions, moments, *extra = vae_forward(images, latent_transform=tau)
                posterior = DiagonalGaussianDistribution(moments)  # mean, logvar halves (of x, untransformed)
                alignment = None
                if teacher is not None:  # frozen teacher features (B, D, h, w) of the encoder's input, on z's grid
                    with accelerator.autocast():
                        features = teacher(images, extra[-1].shape[-2:])
                    alignment = (extra[-1], features, vae_unwrapped.encoder.conv_out.weight)
                if tau is not None:
                    images = tau(images, f)  # tau(x): the input of every loss term below, as EQ-VAE

                # Autoencoder (+ logvar) update. The unwrapped discriminator scores the
                # reconstruction without collecting gradients of its own.
                with accelerator.autocast():
                    loss_g, logs = loss_fn.generator_loss(images, reconstructions, posterior, global_step, last_layer,
                                                          disc_unwrapped, shared_backward, alignment)
                if cfg.loss.equivariance != "off":
                    logs.update(eq_applied=float(tau is not None), eq_lowres=float(eq is not None and tau is None))
                accelerator.backward(loss_g)
                if accelerator.sync_gradients and cfg.loss.learn_logvar and accelerator.num_processes > 1:
                    loss_fn.logvar.grad = accelerator.reduce(loss_fn.logvar.grad, reduction="mean")
                grad_norm = optimizer_step(accelerator, opt_g, params_g, cfg.optim.max_grad_norm, guard, "autoencoder")

                # Discriminator update on the detached reconstruction (silent before disc_start).
                with accelerator.autocast():
                    loss_d, logs_d = loss_fn.discriminator_loss(images, reconstructions, global_step, discriminator)
                logs.update(logs_d)
                if loss_d.requires_grad:
                    accelerator.backward(loss_d)
                    optimizer_step(accelerator, opt_d, params_d, cfg.optim.max_grad_norm, guard, "discriminator")
                window.add(logs, micro)

            if not accelerator.sync_gradients:
                continue
            guard.end_step(global_step)  # TrainingStopped after K bad steps in a row, unless rolling back
            if guard.rollback_due:  # reload the newest checkpoint, lower the LR, go on past these batches
                state = rollback(accelerator, out, guard, global_step, samples_per_step, [(opt_g, sched_g), (opt_d, sched_d)],
                                 metrics_log, ema, checkpoint_model_config, window, progress)
                global_step = state["global_step"]
                with torch.no_grad():
                    loss_fn.logvar.fill_(state["logvar"])
                continue
            global_step += 1
            window.end_step(grad_norm)
            sched_g.step()
            with warnings.catch_warnings():  # before disc_start opt_d has not stepped yet; that is intended
                warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
                sched_d.step()  # kept on the global schedule while the discriminator is silent
            if ema is not None:
                ema.step(vae_unwrapped.parameters())
            progress.update(1)

            if due(global_step, cfg.train.log_steps, cfg.train.max_steps):
                logs = window.emit(accelerator, samples_per_step * accelerator.num_processes, "images_per_sec")
                logs["lr"] = opt_g.param_groups[0]["lr"]
                logs["skipped_images"] = (batches if stream else train_set).num_skipped(accelerator)  # any rank; a collective
                write_logs(accelerator, metrics_log, global_step, logs, guard)
                progress.set_postfix(rec=f"{logs['rec_loss']:.4f}", kl=f"{logs['kl_loss']:.0f}",
                                     g=f"{logs['g_loss']:.3f}", d=f"{logs['d_loss']:.3f}", refresh=False)

            # Validation and checkpoints when due; after SIGTERM/SIGINT a checkpoint, then
            # TrainingStopped (the script exits 128 + signum).
            last_val = validate_and_checkpoint(accelerator, cfg.train, stop, out, global_step, run_validation,
                                               checkpoint_state, ema, progress, window) or last_val
    progress.close()

    # ---- export -------------------------------------------------------------------
    vae_dir = out / "vae"
    if accelerator.is_main_process:
        final = final_weights(vae_unwrapped, ema)
        keep_latent_space = cfg.model.pretrained and cfg.train.decoder_only
        # kl_flux2's batch-norm statistics were tracked while training: nothing is measured on top.
        if not keep_latent_space and latent_batch_norm(final) is None:
            # Measured, never a hard-coded 0.18215; the latent cache re-measures them over
            # the whole dataset.
            scaling_factor, shift_factor = estimate_latent_factors(final.eval(), val_images)
            final.register_to_config(scaling_factor=scaling_factor)
            if cfg.model.measure_shift_factor:
                final.register_to_config(shift_factor=shift_factor)
        export_vae(final, vae_dir, card=dict(steps=global_step, data=cfg.data.train_dir or cfg.data.source, val=last_val,
                                             config=OmegaConf.to_container(OmegaConf.structured(cfg))))
        logger.info("exported %s (%s)", vae_dir, latent_normalization(final))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"global_step": global_step, "first_val": first_val, "last_val": last_val, "vae_dir": str(vae_dir),
            "export_dir": str(vae_dir),
            "is_main_process": accelerator.is_main_process, "vae": vae_unwrapped, "discriminator": disc_unwrapped,
            "nonfinite_skips": guard.skipped, "rollbacks": guard.rollbacks}
