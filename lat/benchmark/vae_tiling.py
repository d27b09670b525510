"""--what vae_tiling: encode + decode of one large image, plain vs tiled vs sliced, a process per case."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from .harness import (count_flops, cpu_cores, default_device, demo_shaped_vae, environment, load_average, measure,
                      peak_memory, print_table, run_child, with_rates)


def child_vae_tiling(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: encode + decode (posterior mode) of the given images, plain, tiled or sliced."""
    import torch
    from safetensors.torch import load_file, save_file

    from autoencoderkl.model import load_vae

    device = default_device()
    torch.set_num_threads(spec["threads"])
    vae = load_vae(spec["vae"]).to(device).eval().requires_grad_(False)
    images = load_file(spec["images"])["images"][: spec["batch"]].to(device)  # (B, 3, R, R) in [-1, 1]
    if spec["mode"] == "tiled":
        vae.enable_tiling()
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        vae.tile_sample_min_size, vae.tile_latent_min_size = spec["tile_size"], spec["tile_size"] // f
    elif spec["mode"] == "sliced":
        vae.enable_slicing()
    before = peak_memory(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    out: dict[str, Any] = {}

    @torch.no_grad()
    def run() -> int:
        out["rec"] = vae.decode(vae.encode(images).latent_dist.mode()).sample
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return len(images)

    flops: dict[str, int] = {}

    def counted_warmup() -> None:  # under the FLOP counter: slower, but not timed
        flops["total"] = count_flops(run)

    result = measure({spec["mode"]: run}, spec["repeats"], warmup=counted_warmup if spec["warmup"] else None,
                     warmup_calls=spec["warmup"])[spec["mode"]]
    if not flops:
        flops["total"] = count_flops(run)
    save_file({"rec": out["rec"][:1].float().cpu().contiguous()}, spec["rec_out"])
    memory = peak_memory(device)
    return {**result, **memory, "peak_rss_before_work_mib": before["peak_rss_mib"],
            "peak_rss_work_mib": round(memory["peak_rss_mib"] - before["peak_rss_mib"], 1),
            "flops_per_item": flops["total"] // len(images), "device": device, "threads": torch.get_num_threads()}


def bench_vae_tiling(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Encode + decode of one large image: plain vs tiled vs sliced, a process per case."""
    import torch
    from safetensors.torch import load_file, save_file

    from autoencoderkl.data import demo_image_paths
    from autoencoderkl.model import load_vae
    from latent_diffusion.encode import Source, load_source

    device = default_device()
    resolution = args.resolution or (1024 if device == "cuda" else 512)
    vae_path = str(Path(args.vae).resolve()) if args.vae else str(demo_shaped_vae(64, scratch / "vae", args.set))
    vae = load_vae(vae_path)
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % f:
        raise ValueError(f"--resolution {resolution} must be a multiple of the VAE's factor {f}")
    size = vae.config.sample_size
    tile = args.tile_size or (size[0] if isinstance(size, (list, tuple)) else size)
    if tile % f:
        raise ValueError(f"--tile-size {tile} must be a multiple of the VAE's factor {f}")
    photo = demo_image_paths("val")[0]
    image = load_source(Source(photo), resolution)  # (3, R, R): shorter side resized to R, centre crop
    batch = args.batch_size or 1
    images = torch.stack([image, image.flip(-1)] * max(1, (max(batch, 2) + 1) // 2))[: max(batch, 2)]
    save_file({"images": images.contiguous()}, scratch / "images.safetensors")
    threads = args.cpu_threads or cpu_cores()
    plan = {"plain": ("plain", batch), "tiled": ("tiled", batch), f"plain, batch {max(batch, 2)}": ("plain", max(batch, 2)),
            f"sliced, batch {max(batch, 2)}": ("sliced", max(batch, 2))}
    load_before = load_average()
    results = {}
    for name, (mode, b) in plan.items():
        print(f"[{name}] encode + decode of {b} x {resolution}x{resolution} px in a fresh process ...", flush=True)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        spec = {"kind": "vae_tiling", "vae": vae_path, "mode": mode, "batch": b, "tile_size": tile,
                "images": str(scratch / "images.safetensors"), "rec_out": str(scratch / f"{slug}.rec.safetensors"),
                "warmup": args.warmup, "repeats": args.repeats, "threads": threads}
        r = run_child(name, spec, scratch)
        r["seconds_per_image"] = r["median_s"] / b
        r["steps_per_s"] = r["items_per_s"] / b  # calls (encode + decode of the batch) per second
        with_rates(r, r.pop("flops_per_item"), None)
        r["rec"] = load_file(spec["rec_out"])["rec"]
        results[name] = r
        print(f"[{name}] {r['seconds_per_image']:.2f} s/image, peak {r['peak_memory_mib']:.0f} MiB "
              f"({r['peak_rss_before_work_mib']:.0f} before the work), 1-min load {r['load_average_before']} -> "
              f"{r['load_average_after']}", flush=True)
    from autoencoderkl.metrics import psnr_ssim_8bit

    for r in results.values():
        r["psnr_vs_input_db"] = float(psnr_ssim_8bit(images[:1], r["rec"])[0][0])  # the first image, 8-bit
    plain = results["plain"].pop("rec")
    spread = float((plain - plain.mean()).abs().mean())  # how much the reconstruction itself varies
    for name, r in results.items():
        if name != "plain":
            diff = (r.pop("rec") - plain).abs()
            r["abs_diff_vs_plain"] = {"max": float(diff.max()), "mean": float(diff.mean()),
                                      "mean_over_plain_mean_abs_deviation": float(diff.mean()) / spread}
    print_table(f"vae_tiling: encode + decode of a {resolution}x{resolution} photo, {vae_path if args.vae else 'random demo-shaped VAE'}, "
                f"tiles of {tile} px, {device} ({threads} threads); median of {args.repeats} after {args.warmup} warm-up",
                results, "plain")
    print(f"\n{'case':<16} {'s/image':>8} {'peak MiB':>9} {'(work)':>8} {'max |diff|':>11} {'mean |diff|':>12} "
          f"{'(relative)':>11} {'PSNR dB':>8}")
    for name, r in results.items():
        d = r.get("abs_diff_vs_plain", {"max": 0.0, "mean": 0.0, "mean_over_plain_mean_abs_deviation": 0.0})
        work = r["cuda_max_memory_allocated_mib"] if device == "cuda" else r["peak_rss_work_mib"]
        print(f"{name:<16} {r['seconds_per_image']:8.2f} {r['peak_memory_mib']:9.0f} {work:8.0f} {d['max']:11.4f} "
              f"{d['mean']:12.5f} {d['mean_over_plain_mean_abs_deviation']:11.5f} {r['psnr_vs_input_db']:8.2f}")
    print("(work): memory the encode + decode added; |diff|: from the plain reconstruction (images in [-1, 1]), "
          "relative: / its mean absolute deviation; PSNR: 8-bit, of the first image's reconstruction vs the input")
    return {
        "environment": {**environment(device, "fp32", threads), "load_average_before": load_before},
        "settings": {"vae": vae_path if args.vae else "random, configs/autoencoderkl/demo.yaml shape (+ --set)",
                     "image": f"{photo} resized (shorter side) and centre-cropped to {resolution} px, and its mirror",
                     "resolution": resolution, "tile_size": tile, "tile_overlap": 0.25, "batch_size": batch,
                     "warmup": args.warmup, "repeats": args.repeats},
        "cases": results,
        "notes": [("peak memory is the whole process's; peak_rss_work_mib = peak_rss_mib - peak_rss_before_work_mib "
                   "(after loading the model and the images): what the encode + decode itself added"),
                  ("psnr_vs_input_db: 8-bit PSNR of the first image's reconstruction against the input; "
                   "abs_diff_vs_plain compares that reconstruction with the plain case's; "
                   "mean_over_plain_mean_abs_deviation divides its mean by the plain reconstruction's mean absolute "
                   "deviation. A random VAE's output is not an image (nor in [-1, 1]): pass --vae for a meaningful "
                   "difference")],
    }

