"""--what train_vae: optimizer steps of the real stage-1 loop, one fresh process per case."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from autoencoderkl.data import list_images

from .harness import (STAGE1_DEMO, STAGE1_OPTIMIZED, STAGE1_SWITCHES, count_flops, cpu_seconds, default_device,
                      environment, load_average, peak_memory, plan_cases, print_table, run_training_cases,
                      window_rates)


def child_train_vae(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: the real stage-1 loop, then the FLOPs of one step on the trained modules."""
    import torch

    from autoencoderkl.config import load_config
    from autoencoderkl.train import main as train

    cfg = load_config(spec["config"], spec["overrides"])
    perceptual_pretrained = cfg.loss.perceptual_pretrained
    t0, c0 = time.perf_counter(), cpu_seconds()
    summary = train(cfg, spec["out_dir"])
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    device = str(next(summary["vae"].parameters()).device)
    memory = peak_memory(device)  # before the FLOP count below adds its own activations
    cfg.loss.perceptual_pretrained = perceptual_pretrained
    flops = _vae_step_flops(cfg, summary["vae"], summary["discriminator"])
    images_per_step = cfg.data.batch_size * cfg.train.gradient_accumulation_steps
    teacher = _teacher_seconds(cfg, device) if cfg.loss.alignment_weight > 0 else {}
    return {
        "rates": window_rates(Path(spec["out_dir"]) / "metrics.jsonl", "images_per_sec"),
        "items_per_window": images_per_step * cfg.train.log_steps,
        "items_per_step": images_per_step,
        "flops": flops,
        **memory,
        "device": device,
        "threads": torch.get_num_threads(),
        "dtype": {"no": "fp32"}.get(cfg.train.mixed_precision, cfg.train.mixed_precision),
        "run_wall_s": round(wall, 2),
        "run_cpu_s": round(cpu, 2),
        "perceptual": (Path(spec["out_dir"]) / "config.yaml").read_text().split("# perceptual: ", 1)[-1].split("\n", 1)[0],
        **teacher,
    }


def _teacher_seconds(cfg: Any, device: str, calls: int = 3) -> dict[str, Any]:
    """The alignment teacher's forward alone, on one batch of the run's shape: seconds per call (median).

    Timed in the case's process after its run (one warm-up call, then ``calls``), under the
    run's autocast dtype, so its share of a step is ``teacher_s_per_step / (batch / img/s)``.
    """
    import statistics

    import torch

    from autoencoderkl.alignment import load_teacher, teacher_precision

    teacher = load_teacher(cfg.loss.alignment_teacher, cfg.loss.alignment_resolution, device,
                           teacher_precision(cfg.train.mixed_precision))
    b, r = cfg.data.batch_size, cfg.data.resolution
    f = 2 ** (len(cfg.model.block_out_channels) - 1)
    x = (torch.rand(b, 3, r, r, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    seconds = []
    for i in range(calls + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        teacher(x, (r // f, r // f))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:
            seconds.append(time.perf_counter() - t0)
    return {"teacher_s_per_step": round(statistics.median(seconds), 4), "teacher": teacher.description}


def _vae_step_flops(cfg: Any, vae: Any, discriminator: Any) -> dict[str, Any]:
    """FLOPs of one stage-1 optimizer step at the run's batch shape, per image.

    The trained modules run the loop's step once (fp32, eager) on a random batch: the
    autoencoder forward, ``AutoencoderLoss.generator_loss`` (pixel + LPIPS + GAN term with
    the adaptive weight, its ``autograd.grad`` calls included) and its backward, then
    ``discriminator_loss`` and its backward. The GAN state (on or off) is that of the
    run's last step; ``loss.shared_backward`` is passed as the loop passes it (off under
    fp16), so a case that backpropagates LPIPS and the PatchGAN once counts less.
    """
    import torch
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from autoencoderkl.alignment import build_projection, load_teacher
    from autoencoderkl.losses import AutoencoderLoss, build_perceptual
    from autoencoderkl.model import AutoencoderWithPosterior

    device = next(vae.parameters()).device
    perceptual, _ = build_perceptual(cfg.loss.perceptual_pretrained)
    loss_fn = AutoencoderLoss(cfg.loss, perceptual).to(device)
    step = cfg.train.max_steps - 1
    shared_backward = cfg.loss.shared_backward and cfg.train.mixed_precision != "fp16"  # as train.main
    b, r = cfg.data.batch_size, cfg.data.resolution
    x = (torch.rand(b, 3, r, r, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    teacher = projection = None
    if cfg.loss.alignment_weight > 0:  # a fresh projection: same FLOPs as the trained one
        teacher = load_teacher(cfg.loss.alignment_teacher, cfg.loss.alignment_resolution, device)
        projection = build_projection(vae.config.latent_channels, teacher.hidden_size).to(device)
    forward = AutoencoderWithPosterior(vae.train(), projection)
    discriminator.train()
    state: dict[str, Any] = {}

    def autoencoder_forward() -> None:
        state["rec"], moments, *projected = forward(x)
        state["posterior"] = DiagonalGaussianDistribution(moments)
        state["projected"] = projected[-1] if projected else None

    def teacher_forward() -> None:
        state["features"] = teacher(x, state["projected"].shape[-2:])

    def generator() -> None:
        alignment = (state["projected"], state["features"], vae.encoder.conv_out.weight) if teacher else None
        loss, _ = loss_fn.generator_loss(x, state["rec"], state["posterior"], step, vae.decoder.conv_out.weight,
                                         discriminator, shared_backward, alignment)
        loss.backward()

    def disc() -> None:
        loss, _ = loss_fn.discriminator_loss(x, state["rec"], step, discriminator)
        if loss.requires_grad:
            loss.backward()

    parts = {"autoencoder_forward": count_flops(autoencoder_forward),
             **({"teacher_forward": count_flops(teacher_forward)} if teacher else {}),
             "generator_loss_and_backward": count_flops(generator),
             "discriminator_loss_and_backward": count_flops(disc)}
    vae.zero_grad(set_to_none=True)
    discriminator.zero_grad(set_to_none=True)
    return {"per_item": sum(parts.values()) // b, "per_item_parts": {k: v // b for k, v in parts.items()},
            "batch": b, "global_step": step, "shared_backward": shared_backward}


def folder_and_shard_cases(args: argparse.Namespace, optimized: list[str], scratch: Path, load: Any,
                           config: str) -> tuple[dict[str, list[str]], str]:
    """--shards: the optimized case on ``--data`` as a folder, and on the same images as streamed shards.

    The shards (``make_shards``, untimed) hold every image of the folder; both cases take
    their validation images from the folder itself (validation runs only at the end) and
    the same ``data.num_workers``; the stream reads with ``data.shuffle_buffer`` 0.
    """
    from autoencoderkl.shards import make_shards

    if args.data == "demo":
        raise ValueError("--shards needs --data FOLDER (the images to shard)")
    folder = str(Path(args.data).resolve())
    workers = load(config, optimized).data.num_workers
    shard_size = max(1, -(-len(list_images(folder)) // max(4, 2 * workers)))  # >= 2 shards per worker
    make_shards(folder, scratch / "shards", shard_size=shard_size)
    shards = ["data.source=hf", "data.dataset=webdataset", f"data.data_files={scratch / 'shards'}/train-*.tar",
              f"data.val_dir={folder}", "data.shuffle_buffer=0"]
    cases = {"folder": optimized, "shards": optimized + shards}
    for overrides in cases.values():
        load(config, overrides)
    return cases, (f"--shards: {folder} as a folder (data.source=folder) and as {shard_size}-image WebDataset shards "
                   f"streamed with data.shuffle_buffer=0, same data.num_workers={workers}")


def bench_train_vae(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """The real stage-1 training step: optimized (and baseline, ablations), one process each."""
    from autoencoderkl.config import VAEConfig, load_config
    from autoencoderkl.losses import vgg16_weights_path

    config = str(Path(args.config or STAGE1_DEMO).resolve())
    steps = args.steps or 4
    max_steps = (args.warmup + args.repeats) * steps
    common = [f"train.max_steps={max_steps}", f"train.log_steps={steps}", f"train.validation_steps={max_steps}",
              f"train.checkpointing_steps={max_steps}", "loss.disc_start=0"]
    notes = [("loss.disc_start=0: every timed step is the full one (generator with LPIPS, PatchGAN term and "
              "adaptive weight; discriminator update)")]
    weights = vgg16_weights_path()
    if not weights.is_file():
        common.append("loss.perceptual_pretrained=false")
        notes.append(f"LPIPS with a random VGG16 backbone (same FLOPs): the VGG16 weights are not at {weights}")
    if args.resolution:
        common.append(f"data.resolution={args.resolution}")
        resize = load_config(config, common).data.resize
        if resize is not None and resize < args.resolution:
            common.append(f"data.resize={args.resolution}")
            notes.append(f"data.resize raised from {resize} to {args.resolution} (>= data.resolution)")
    if args.batch_size:
        common.append(f"data.batch_size={args.batch_size}")
    device = default_device()
    if args.data != "demo":  # a folder: data.source=folder over it (with --shards: against its shards)
        common += [f"data.train_dir={Path(args.data).resolve()}", "data.cache_images=false"]
    cases, info = plan_cases(load_config, VAEConfig, config, device, STAGE1_SWITCHES, STAGE1_OPTIMIZED,
                             common + (["data.source=folder"] if args.data != "demo" else []), args.set,
                             args.baseline, args.ablate)
    if args.alignment:
        cases, note = alignment_cases(args, cases["optimized"], load_config, config)
        notes.append(note)
    if args.shards:
        cases, note = folder_and_shard_cases(args, cases["optimized"], scratch, load_config, config)
        notes.append(note)
    load_before = load_average()
    results = run_training_cases(cases, "train_vae", config, args.warmup, scratch, "img", args.rounds)
    first = next(iter(cases))  # "optimized", or "folder" with --shards, or "alignment off"
    opt = results[first]
    cfg = load_config(config, cases[first])
    title = (f"train_vae: {Path(config).name}, {cfg.data.resolution}x{cfg.data.resolution}, batch {cfg.data.batch_size}, "
             f"{opt['device']} ({opt['threads']} threads); median of {args.repeats} x {args.rounds} windows of {steps} "
             f"steps after "
             f"{args.warmup} warm-up window(s)")
    speedups = print_table(title, results, "folder" if args.shards else "alignment off" if args.alignment
                           else "baseline" if args.baseline else None)
    if args.alignment:
        on = results["alignment on"]
        step_s = cfg.data.batch_size / on["items_per_s"]
        on["teacher_share_of_step"] = round(on["teacher_s_per_step"] / step_s, 4)
        on["teacher_share_of_flops"] = round(on["flops"]["per_item_parts"]["teacher_forward"] / on["flops"]["per_item"], 4)
        print(f"alignment on / off: {speedups['alignment on']:.3f}x the images/s; the teacher's forward alone: "
              f"{on['teacher_s_per_step']:.3f} s per step of {cfg.data.batch_size} images = "
              f"{100 * on['teacher_share_of_step']:.1f}% of the aligned step's time, "
              f"{100 * on['teacher_share_of_flops']:.1f}% of its FLOPs ({on['teacher']})")
    return {
        "environment": {**environment(opt["device"], opt["dtype"], opt["threads"]), "load_average_before": load_before},
        "settings": {"config": config, "steps_per_window": steps, "warmup_windows": args.warmup,
                     "repeats": args.repeats, "rounds": args.rounds,
                     "common_overrides": common, "set": args.set, "resolution": cfg.data.resolution,
                     "batch_size": cfg.data.batch_size, "perceptual": opt["perceptual"]},
        **info,
        "notes": notes,
        "cases": results,
        ("speedup_over_folder" if args.shards else "speedup_over_alignment_off" if args.alignment
         else "speedup_over_baseline"): speedups,
    }


def alignment_cases(args: argparse.Namespace, optimized: list[str], load: Any, config: str) -> tuple[dict[str, list[str]], str]:
    """--alignment: the optimized case with VA-VAE's alignment off and on, nothing else changed.

    The teacher: ``--teacher``, else the config's ``loss.alignment_teacher``; a Hub id of a
    known DINOv2 shape that is not in the HF cache becomes ``stand-in:`` of that shape (a
    random model: the same FLOPs, no download). The weight: the config's, else VA-VAE's 0.1.
    """
    from huggingface_hub import try_to_load_from_cache

    from autoencoderkl.alignment import DINOV2_SHAPES, STAND_IN

    cfg = load(config, optimized)
    teacher = args.teacher or cfg.loss.alignment_teacher
    if teacher in DINOV2_SHAPES and not Path(teacher).is_dir() and not isinstance(
            try_to_load_from_cache(teacher, "config.json"), str):
        teacher = STAND_IN + teacher
    weight = cfg.loss.alignment_weight or 0.1
    cases = {"alignment off": optimized + ["loss.alignment_weight=0"],
             "alignment on": optimized + [f"loss.alignment_weight={weight}", f"loss.alignment_teacher={teacher}"]}
    for overrides in cases.values():
        load(config, overrides)
    return cases, (f"--alignment: the optimized case with loss.alignment_weight 0 and {weight} (teacher {teacher}, "
                   f"input {cfg.loss.alignment_resolution} px)")

