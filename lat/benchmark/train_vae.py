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
    }


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

    from autoencoderkl.losses import AutoencoderLoss, build_perceptual
    from autoencoderkl.model import AutoencoderWithPosterior

    device = next(vae.parameters()).device
    perceptual, _ = build_perceptual(cfg.loss.perceptual_pretrained)
    loss_fn = AutoencoderLoss(cfg.loss, perceptual).to(device)
    step = cfg.train.max_steps - 1
    shared_backward = cfg.loss.shared_backward and cfg.train.mixed_precision != "fp16"  # as train.main
    b, r = cfg.data.batch_size, cfg.data.resolution
    x = (torch.rand(b, 3, r, r, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    forward = AutoencoderWithPosterior(vae.train())
    discriminator.train()
    state: dict[str, Any] = {}

    def autoencoder_forward() -> None:
        state["rec"], moments = forward(x)
        state["posterior"] = DiagonalGaussianDistribution(moments)

    def generator() -> None:
        loss, _ = loss_fn.generator_loss(x, state["rec"], state["posterior"], step, vae.decoder.conv_out.weight,
                                         discriminator, shared_backward)
        loss.backward()

    def disc() -> None:
        loss, _ = loss_fn.discriminator_loss(x, state["rec"], step, discriminator)
        if loss.requires_grad:
            loss.backward()

    parts = {"autoencoder_forward": count_flops(autoencoder_forward), "generator_loss_and_backward": count_flops(generator),
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
    if args.shards:
        cases, note = folder_and_shard_cases(args, cases["optimized"], scratch, load_config, config)
        notes.append(note)
    load_before = load_average()
    results = run_training_cases(cases, "train_vae", config, args.warmup, scratch, "img", args.rounds)
    first = next(iter(cases))  # "optimized", or "folder" with --shards
    opt = results[first]
    cfg = load_config(config, cases[first])
    title = (f"train_vae: {Path(config).name}, {cfg.data.resolution}x{cfg.data.resolution}, batch {cfg.data.batch_size}, "
             f"{opt['device']} ({opt['threads']} threads); median of {args.repeats} x {args.rounds} windows of {steps} "
             f"steps after "
             f"{args.warmup} warm-up window(s)")
    speedups = print_table(title, results, "folder" if args.shards else "baseline" if args.baseline else None)
    return {
        "environment": {**environment(opt["device"], opt["dtype"], opt["threads"]), "load_average_before": load_before},
        "settings": {"config": config, "steps_per_window": steps, "warmup_windows": args.warmup,
                     "repeats": args.repeats, "rounds": args.rounds,
                     "common_overrides": common, "set": args.set, "resolution": cfg.data.resolution,
                     "batch_size": cfg.data.batch_size, "perceptual": opt["perceptual"]},
        **info,
        "notes": notes,
        "cases": results,
        ("speedup_over_folder" if args.shards else "speedup_over_baseline"): speedups,
    }

