"""--what sample: images/s of LatentDiffusionPipeline, optimized vs baseline, interleaved."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from .harness import (STAGE2_DEMO, count_flops, cpu_cores, default_device, demo_shaped_vae, environment, format_value,
                      load_average, measure, print_table, track_memory, with_rates)

SAMPLE_SWITCHES: dict[str, Any] = {"dtype": "fp32", "channels_last": False, "compile": False}
SAMPLE_OPTIMIZED: dict[str, dict[str, Any]] = {
    "cpu": {"channels_last": True},
    "cuda": {"dtype": "bf16", "channels_last": True, "compile": True},
}


def bench_sample(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Images/s of the sampling pipeline: optimized vs baseline (and ablations), interleaved."""
    import torch

    from latent_diffusion.config import default_sampler, load_config
    from latent_diffusion.model import build_denoiser, build_noise_scheduler, build_sampler
    from latent_diffusion.export import load_pipeline
    from latent_diffusion.pipeline import LatentDiffusionPipeline

    device = default_device()
    cfg = load_config(args.config or STAGE2_DEMO, args.set)
    # The config's thread count: the demo's U-Net runs many small ops, and with two threads
    # on a shared 2-core CPU each op waits for both cores (measured 17x slower under load).
    threads = args.cpu_threads or cfg.train.cpu_threads or cpu_cores()
    if device == "cpu":
        torch.set_num_threads(threads)
    steps = args.steps or 50
    batch = args.batch_size or 8
    if args.model:
        base = load_pipeline(args.model)
        source = str(Path(args.model).resolve())
    else:
        from autoencoderkl.model import load_vae

        resolution = args.resolution or 64
        vae = load_vae(demo_shaped_vae(resolution, scratch / "vae"))
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        if resolution % f:
            raise ValueError(f"--resolution {resolution} must be a multiple of the VAE's factor {f}")
        num_classes = 9 if cfg.model.class_conditional else None  # the demo cache's photos
        torch.manual_seed(0)
        denoiser = build_denoiser(cfg.model, (vae.config.latent_channels, resolution // f, resolution // f), num_classes)
        sampler = build_sampler(default_sampler(cfg.noise.prediction_type), build_noise_scheduler(cfg.noise).config)
        base = LatentDiffusionPipeline(denoiser.eval(), sampler,
                                       vae.eval(), class_names=[f"class{i}" for i in range(num_classes)] if num_classes else None)
        source = (f"random: {type(denoiser).__name__} from {Path(args.config or STAGE2_DEMO).name} model section, "
                  f"VAE shaped like configs/autoencoderkl/demo.yaml, {type(sampler).__name__}, "
                  f"{resolution}x{resolution} px")
    base.set_progress_bar_config(disable=True)
    k = base.num_classes
    labels = [i % k for i in range(batch)] if k else None

    settings_of = {"optimized": {**SAMPLE_SWITCHES, **SAMPLE_OPTIMIZED[device]}}
    if args.baseline:
        settings_of["baseline"] = dict(SAMPLE_SWITCHES)
    skipped = {}
    if args.ablate:
        for key, off in SAMPLE_SWITCHES.items():
            if settings_of["optimized"][key] == off:
                skipped[key] = f"already {off} in the optimized case"
            else:
                settings_of[f"optimized, {key}={format_value(off)}"] = {**settings_of["optimized"], key: off}

    def build(settings: dict[str, Any]) -> Any:
        pipe = LatentDiffusionPipeline(copy.deepcopy(base.denoiser), copy.deepcopy(base.scheduler), copy.deepcopy(base.vae),
                                       class_names=base.config.class_names).to(device)
        pipe.set_progress_bar_config(disable=True)
        if settings["dtype"] == "bf16":
            pipe.to(dtype=torch.bfloat16)
        if settings["channels_last"]:
            pipe.denoiser.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        if settings["compile"]:
            pipe.denoiser = torch.compile(pipe.denoiser)
        return pipe

    pipes = {name: build(s) for name, s in settings_of.items()}

    def call(pipe: Any, n_steps: int = steps) -> int:
        gen = torch.Generator(device).manual_seed(0)
        pipe(batch_size=batch, num_inference_steps=n_steps, class_labels=labels, guidance_scale=1.0, generator=gen,
             output_type="pt").images.cpu()  # .cpu(): waits for the GPU
        return batch

    # FLOPs are linear in the steps: U-Net calls x steps + the decode. Count 1 and 2 steps.
    base.to(device)
    f1, f2 = count_flops(lambda: call(base, 1)), count_flops(lambda: call(base, 2))
    per_step, decode = f2 - f1, 2 * f1 - f2
    flops_per_image = (decode + per_step * steps) // batch
    cases, peaks = track_memory({name: (lambda p=p: call(p)) for name, p in pipes.items()}, device)
    load_before = load_average()
    print(f"sampling {batch} images x {steps} steps per call, {len(pipes)} case(s) alternating ...", flush=True)
    results = measure(cases, args.repeats, warmup_calls=args.warmup)
    for name, r in results.items():
        with_rates(r, flops_per_image, batch)
        r["steps_per_s"] = r["items_per_s"] / batch * steps  # sampler steps (U-Net calls on the batch) per second
        r.update(peaks[name], settings=settings_of[name])
    title = (f"sample: {batch} images x {steps} {type(base.scheduler).__name__} steps per call, {device} "
             f"({threads} threads); "
             f"median of {args.repeats} calls after {args.warmup} warm-up call(s)")
    speedups = print_table(title, results, "baseline" if args.baseline else None)
    return {
        "environment": {**environment(device, settings_of["optimized"]["dtype"], torch.get_num_threads()),
                        "load_average_before": load_before},
        "settings": {"pipeline": source, "batch_size": batch, "num_inference_steps": steps, "guidance_scale": 1.0,
                     "class_labels": labels, "warmup": args.warmup, "repeats": args.repeats, "set": args.set,
                     "resolution": base.denoiser.config.sample_size * 2 ** (len(base.vae.config.block_out_channels) - 1)},
        "switches": {k: format_value(v) for k, v in SAMPLE_SWITCHES.items()},
        "optimized": {k: format_value(v) for k, v in SAMPLE_OPTIMIZED[device].items()},
        "ablate_skipped": skipped,
        "flops": {"per_image": flops_per_image, "unet_call_on_batch": per_step, "decode_batch": decode},
        "cases": results,
        "speedup_over_baseline": speedups,
        "notes": ["steps_per_s counts sampler steps (one U-Net call on the whole batch each)"],
    }

