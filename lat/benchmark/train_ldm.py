"""--what train_ldm: the real stage-2 loop per case (and per --compare config), then cached latents vs encoding every step."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any, Callable

from .harness import (STAGE2_ABLATE_ON, STAGE2_DEMO, STAGE2_OPTIMIZED, STAGE2_SWITCHES, as_overrides, count_flops,
                      cpu_cores, cpu_seconds, default_device, demo_shaped_vae, environment, load_average, measure,
                      peak_memory, plan_cases, print_table, run_training_cases, track_memory, window_rates, with_rates)


def child_train_ldm(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: the real stage-2 loop, then the FLOPs of one denoiser step on the trained denoiser."""
    import torch

    from latent_diffusion.config import load_config
    from latent_diffusion.train import main as train

    cfg = load_config(spec["config"], spec["overrides"])
    t0, c0 = time.perf_counter(), cpu_seconds()
    summary = train(cfg, spec["out_dir"])
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    device = str(next(summary["denoiser"].parameters()).device)
    memory = peak_memory(device)
    latents_per_step = cfg.data.batch_size * cfg.train.gradient_accumulation_steps
    return {
        "rates": window_rates(Path(spec["out_dir"]) / "metrics.jsonl", "latents_per_sec"),
        "items_per_window": latents_per_step * cfg.train.log_steps,
        "items_per_step": latents_per_step,
        "flops": {"per_item": unet_step_flops(summary["denoiser"], cfg, cfg.data.batch_size) // cfg.data.batch_size,
                  "batch": cfg.data.batch_size},
        "model": {"class": type(summary["denoiser"]).__name__,
                  "parameters": sum(p.numel() for p in summary["denoiser"].parameters())},
        **memory,
        "device": device,
        "threads": torch.get_num_threads(),
        "dtype": {"no": "fp32"}.get(cfg.train.mixed_precision, cfg.train.mixed_precision),
        "run_wall_s": round(wall, 2),
        "run_cpu_s": round(cpu, 2),
    }


def unet_step_flops(unet: Any, cfg: Any, batch: int) -> int:
    """FLOPs of one denoiser training step (``diffusion_loss`` forward + backward) on a random batch.

    Args:
        unet: the denoiser, a ``UNet2DModel`` or ``DiTTransformer2DModel`` (eager).
        cfg: the stage-2 config (its noise section).
        batch: B latents of the denoiser's (in_channels, sample_size, sample_size) shape.
    Returns:
        Total FLOPs for the batch (divide by B for one latent).
    """
    import torch

    from latent_diffusion.model import build_noise_scheduler
    from latent_diffusion.pipeline import null_class_index
    from latent_diffusion.train import diffusion_loss

    device = next(unet.parameters()).device
    c, h = unet.config.in_channels, unet.config.sample_size
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, c, h, h, generator=gen).to(device)
    null = null_class_index(unet)  # classes 0..null-1 and the null class; None/0: unconditional
    labels = torch.randint(0, null + 1, (batch,), generator=gen).to(device) if null else None
    scheduler = build_noise_scheduler(cfg.noise)
    was_training = unet.training
    unet.train()

    def step() -> None:
        diffusion_loss(unet, scheduler, latents, labels, cfg.noise.snr_gamma, noise_cfg=cfg.noise).backward()

    flops = count_flops(step)
    unet.zero_grad(set_to_none=True)
    unet.train(was_training)
    return flops


def _image_paths_of_cache(index: dict[str, Any]) -> tuple[list[Path], int | None]:
    """The image files a cache was encoded from, and the resize its demo tiles used (None: folder images)."""
    files, resizes = [], []
    for name in index["paths"]:
        path, _, tile = name.partition("#")
        if not files or files[-1] != Path(path):
            files.append(Path(path))
        match = re.match(r"resize(\d+)_", tile)
        if match:
            resizes.append(int(match.group(1)))
    return list(dict.fromkeys(files)), (min(resizes) if resizes else None)


def cached_vs_encoded(cfg: Any, latents: str, vae_path: str, device: str, steps: int, repeats: int, warmup: int,
                      threads: int) -> dict[str, Any]:
    """Steps/s of the denoiser step on cached latents vs on images encoded every step.

    Both cases: the same ``build_denoiser`` model, AdamW (the config's), ``diffusion_loss``
    (Min-SNR as configured), gradient clipping, batch ``data.batch_size``, DataLoader with
    ``data.num_workers``; they alternate repeat by repeat (``measure``). "cached" draws
    batches from ``LatentDataset``; "encode_every_step" from ``ImageFolder`` over the
    cache's source images (random crops at the cache's resolution; decoded images kept in
    memory for up to 1000 files, so it times the encoder, not the PNG decoder), then
    ``vae.encode(x).latent_dist.sample()``, shifted and scaled as the cache, under
    no_grad (diffusers' example scripts do this). Labels: the cache's, random ones for
    the images (the same denoiser work).

    Returns:
        ``{"results": measure()'s, with steps/s, FLOPs and memory, "cached_over_encoded":
        steps/s ratio, "flops": {"unet_step_per_latent", "encode_per_latent"}, "settings"}``.
    """
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from autoencoderkl.data import ImageFolder
    from autoencoderkl.model import load_vae
    from latent_diffusion.latents import LatentDataset
    from latent_diffusion.model import build_denoiser, build_noise_scheduler
    from latent_diffusion.train import diffusion_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dataset = LatentDataset(latents, sample_posterior=cfg.data.sample_posterior, scaling_factor=cfg.data.scaling_factor,
                            shift_factor=cfg.data.shift_factor, latent_normalization=cfg.data.latent_normalization)
    files, resize = _image_paths_of_cache(dataset.index)
    resolution = dataset.index["resolution"]
    images = ImageFolder(files, resolution, resize, train=True, cache_images=len(files) <= 1000)
    vae = load_vae(vae_path).to(device).eval().requires_grad_(False)
    num_classes = dataset.num_classes if cfg.model.class_conditional else None
    unet = build_denoiser(cfg.model, tuple(dataset.latent_shape), num_classes).to(device).train()
    noise_scheduler = build_noise_scheduler(cfg.noise)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps)
    b, workers = cfg.data.batch_size, cfg.data.num_workers

    def loader(ds: Any) -> Any:
        sampler = RandomSampler(ds, replacement=True, num_samples=10**9, generator=torch.Generator().manual_seed(0))
        return iter(DataLoader(ds, batch_size=b, sampler=sampler, num_workers=workers, drop_last=True,
                               pin_memory=device.startswith("cuda"), persistent_workers=workers > 0))

    cached_batches, image_batches = loader(dataset), loader(images)
    bf16 = cfg.train.mixed_precision == "bf16"
    label_gen = torch.Generator().manual_seed(1)

    def train_step(latents_: Any, labels: Any) -> None:
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion_loss(unet, noise_scheduler, latents_, labels, cfg.noise.snr_gamma, noise_cfg=cfg.noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.optim.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def encode(x: Any) -> Any:
        with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            z = vae.encode(x).latent_dist.sample().float()  # (B, c, h, w)
        return dataset.normalization.normalize(z)

    def cached() -> int:
        for _ in range(steps):
            batch = next(cached_batches)
            labels = batch["label"].to(device) if num_classes else None
            train_step(batch["latents"].to(device, non_blocking=True), labels)
        return steps

    def encode_every_step() -> int:
        for _ in range(steps):
            x = next(image_batches).to(device, non_blocking=True)  # (B, 3, R, R) in [-1, 1]
            labels = torch.randint(0, num_classes, (b,), generator=label_gen).to(device) if num_classes else None
            train_step(encode(x), labels)
        return steps

    def sync(fn: Callable[[], int]) -> Callable[[], int]:
        def run() -> int:
            n = fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return n
        return run

    x = next(image_batches).to(device)
    flops = {"unet_step_per_latent": unet_step_flops(unet, cfg, b) // b,
             "encode_per_latent": count_flops(lambda: encode(x)) // b}
    cases, peaks = track_memory({"cached": sync(cached), "encode_every_step": sync(encode_every_step)}, device)
    results = measure(cases, repeats, warmup_calls=warmup)
    for name, r in results.items():
        per_latent = flops["unet_step_per_latent"] + (flops["encode_per_latent"] if name == "encode_every_step" else 0)
        r["steps_per_s"] = r["items_per_s"]
        # Figures per latent (steps x batch), as the training loops log them.
        for key in ("items_per_s", "items_per_s_min", "items_per_s_max"):
            r[key] *= b
        r["cpu_ms_per_item"] /= b
        r["items"] *= b
        with_rates(r, per_latent, b)
        r.update(peaks[name])
    return {"results": results,
            "cached_over_encoded": results["cached"]["steps_per_s"] / results["encode_every_step"]["steps_per_s"],
            "flops": flops,
            "settings": {"steps_per_call": steps, "batch_size": b, "num_workers": workers, "threads": threads,
                         "images": len(images.paths), "image_resize": resize, "resolution": resolution,
                         "images_kept_in_memory": len(files) <= 1000, "mixed_precision": cfg.train.mixed_precision}}


def bench_train_ldm(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """The real stage-2 training step (one process per case) and cached vs encode-every-step."""
    from autoencoderkl.config import find_config
    from latent_diffusion.config import LDMConfig, load_config
    from latent_diffusion.encode import encode_latents
    from latent_diffusion.latents import load_index

    config = str(Path(find_config(args.config, "latent_diffusion") if args.config else STAGE2_DEMO).resolve())
    steps = args.steps or 10
    device = default_device()
    load_config(config, args.set)  # a bad --set fails before the cache is built
    notes = []
    if args.latents:
        latents = str(Path(args.latents).resolve())
        index = load_index(latents)
        vae_path = args.vae or (index.get("vae") or {}).get("path")
        if not vae_path or not Path(vae_path).exists():
            raise FileNotFoundError(f"which VAE made {latents}? Its index records {vae_path!r}; give --vae DIR")
    else:
        resolution = args.resolution or 64
        vae_path = args.vae or str(demo_shaped_vae(resolution, scratch / "vae"))
        latents = str(scratch / "latents")
        print(f"building a latent cache of --data {args.data} at {resolution} px (untimed) ...", flush=True)
        t0 = time.perf_counter()
        encode_latents(vae_path, args.data, latents, resolution=resolution, batch_size=32, num_workers=args.num_workers,
                       cpu_threads=args.cpu_threads)
        notes.append(f"latent cache built from --data {args.data} at {resolution} px in {time.perf_counter() - t0:.1f} s "
                     f"(untimed) with {'--vae ' + args.vae if args.vae else 'a random demo-shaped VAE'}")
        index = load_index(latents)
    max_steps = (args.warmup + args.repeats) * steps
    common = [f"data.latents={latents}", f"data.vae={vae_path}", f"train.max_steps={max_steps}",
              f"train.log_steps={steps}", f"train.validation_steps={max_steps}", f"train.checkpointing_steps={max_steps}",
              "train.num_validation_samples=2", "train.validation_inference_steps=2"]
    if args.batch_size:
        common.append(f"data.batch_size={args.batch_size}")
    cases, info = plan_cases(load_config, LDMConfig, config, device, STAGE2_SWITCHES, STAGE2_OPTIMIZED, common,
                             args.set, args.baseline, args.ablate, STAGE2_ABLATE_ON)
    configs = {name: config for name in cases}
    for other in args.compare:  # other models on the same cache, with the optimized case's switches
        path = str(Path(find_config(other, "latent_diffusion")).resolve())
        name = f"{Path(path).stem} (optimized)"
        cases[name] = common + as_overrides(info["optimized"]) + args.set
        load_config(path, cases[name])  # a bad config fails before any case runs
        configs[name] = path
    load_before = load_average()
    results = run_training_cases(cases, "train_ldm", configs, args.warmup, scratch, "latent", args.rounds)
    opt = results["optimized"]
    cfg = load_config(config, cases["optimized"])
    shape = "x".join(str(s) for s in index["latent_shape"])
    title = (f"train_ldm: {Path(config).name}{' (optimized) vs ' + ', '.join(args.compare) if args.compare else ''}, "
             f"{index['num_latents']} cached {shape} latents, batch {cfg.data.batch_size}, "
             f"{opt['device']} ({opt['threads']} threads); median of {args.repeats} x {args.rounds} windows of {steps} "
             f"steps after "
             f"{args.warmup} warm-up window(s)")
    speedups = print_table(title, results, "baseline" if args.baseline else None, unit="latent")
    for name, r in results.items():
        print(f"  {name}: {r['model']['class']}, {r['model']['parameters'] / 1e6:.2f}M parameters")
    report = {
        "environment": {**environment(opt["device"], opt["dtype"], opt["threads"]), "load_average_before": load_before},
        "settings": {"config": config, "compare": {n: c for n, c in configs.items() if c != config}, "latents": latents,
                     "vae": vae_path, "latent_shape": index["latent_shape"],
                     "num_latents": index["num_latents"], "steps_per_window": steps, "warmup_windows": args.warmup,
                     "repeats": args.repeats, "rounds": args.rounds, "common_overrides": common, "set": args.set,
                     "batch_size": cfg.data.batch_size},
        **info,
        "notes": notes,
        "cases": results,
        "speedup_over_baseline": speedups,
    }
    if args.compare:  # the cache comparison is about --config's model alone
        return report

    threads = args.cpu_threads or cfg.train.cpu_threads or cpu_cores()
    print(f"\n[cached vs encode_every_step] {args.repeats} x {steps} steps each, alternating, in this process ...", flush=True)
    comparison = cached_vs_encoded(cfg, latents, vae_path, device, steps, args.repeats, args.warmup, threads)
    ratio = comparison["cached_over_encoded"]
    print_table(f"denoiser step on cached latents vs encoding the images every step (same model, AdamW, loss; "
                f"{threads} thread(s)):", comparison["results"], "encode_every_step", unit="latent")
    print(f"cached / encode every step = {ratio:.2f}x steps/s; the encoder costs "
          f"{comparison['flops']['encode_per_latent'] / 1e9:.3f} GFLOP per latent vs "
          f"{comparison['flops']['unet_step_per_latent'] / 1e9:.3f} for the denoiser step")
    return {**report, "cached_vs_encoded": comparison}

