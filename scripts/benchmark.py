#!/usr/bin/env python
"""Measure throughput: warm-up, then the median and spread over repeats, into a JSON file.

  python scripts/benchmark.py --what encode --vae runs/vae-demo/vae --data /data/photos --resolution 128
  python scripts/benchmark.py --what encode                 (a random demo-shaped VAE on the demo tiles)

--what encode: images/s of the real encode_latents path (files -> DataLoader workers ->
VAE -> shard files, a fresh cache each repeat, DataLoader worker start-up included) next to
the VAE's pure encode on in-memory tensors of the same size, batch and thread count. The
image files are read once first (page cache), and two batches go through the VAE as
warm-up. The two cases are timed alternately, repeat by repeat, so a load that comes and
goes (a shared machine) hits both alike.

The JSON (--out) holds every repeat's time, the device, dtype, thread counts, library
versions and the load average, so figures from different machines can be told apart.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- harness


def measure(cases: dict[str, Callable[[], int]], repeats: int, warmup: Callable[[], Any] | None = None,
            warmup_calls: int = 1) -> dict[str, dict[str, Any]]:
    """Warm up, then time each case ``repeats`` times, interleaving the cases within a repeat.

    Args:
        cases: name -> a function doing one unit of work and returning how many items
            (images, steps) it processed.
        repeats: timed calls of every case, >= 1.
        warmup: untimed work run ``warmup_calls`` times first (kernel selection, the
            allocator, caches); None: one untimed call of every case.
        warmup_calls: >= 0.
    Returns:
        name -> ``{"items", "seconds": [wall, per repeat], "median_s", "items_per_s"
        (items / median_s), "items_per_s_min", "items_per_s_max", "cpu_seconds":
        [per repeat], "cpu_ms_per_item" (median)}``. CPU time is user + system of this
        process and of its finished children (DataLoader workers): less sensitive than
        wall time to other programs sharing the cores, though it counts OpenMP threads
        spinning while they wait.
    """
    for _ in range(warmup_calls):
        for fn in [warmup] if warmup is not None else cases.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    items: dict[str, int] = {}
    for _ in range(repeats):
        for name, fn in cases.items():
            c0, t0 = _cpu_seconds(), time.perf_counter()
            items[name] = fn()
            seconds[name].append(time.perf_counter() - t0)
            cpu[name].append(_cpu_seconds() - c0)
    out = {}
    for name, secs in seconds.items():
        median = statistics.median(secs)
        out[name] = {
            "items": items[name],
            "seconds": [round(s, 4) for s in secs],
            "median_s": round(median, 4),
            "items_per_s": items[name] / median,
            "items_per_s_min": items[name] / max(secs),
            "items_per_s_max": items[name] / min(secs),
            "cpu_seconds": [round(c, 3) for c in cpu[name]],
            "cpu_ms_per_item": 1000 * statistics.median(cpu[name]) / items[name],
        }
    return out


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def load_average() -> float | None:
    """1-minute load average: runnable processes, ours included (about 1 per busy core we use)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def environment(device: str, dtype: str, threads: int) -> dict[str, Any]:
    """Device, dtype, threads, versions and load: what a figure depends on."""
    import accelerate
    import diffusers
    import torch

    if device.startswith("cuda"):
        device_name = torch.cuda.get_device_name(0)
    else:
        device_name = platform.processor() or platform.machine()
        try:
            names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")]
            device_name = names[0] if names else device_name
        except OSError:
            pass
    return {
        "device": device,
        "device_name": device_name,
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": threads,
        "dtype": dtype,
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "accelerate": accelerate.__version__,
        },
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def rate(result: dict[str, Any]) -> str:
    return (f"{result['items_per_s']:8.2f} img/s  (median of {len(result['seconds'])}; "
            f"{result['items_per_s_min']:.2f}-{result['items_per_s_max']:.2f}), {result['cpu_ms_per_item']:.0f} CPU-ms/img")


# --------------------------------------------------------------------------- --what encode


def _demo_shaped_vae(resolution: int, folder: Path) -> Path:
    """A randomly initialised VAE of the demo config's shape (speed does not need trained weights)."""
    import torch

    from autoencoderkl.config import load_config
    from autoencoderkl.model import build_vae

    torch.manual_seed(0)
    cfg = load_config(REPO / "configs" / "autoencoderkl" / "demo.yaml")
    build_vae(cfg.model, resolution).save_pretrained(folder)
    return folder


def _subset(data: str, num_images: int | None, folder: Path) -> str:
    """The first ``num_images`` images of ``data`` as a folder of symlinks (same relative paths)."""
    if num_images is None or data == "demo":
        return data
    from autoencoderkl.data import list_images

    root = Path(data).resolve()
    for path in list_images(root)[:num_images]:
        link = folder / path.relative_to(root)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    return str(folder)


def bench_encode(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """End-to-end ``encode_latents`` vs pure ``vae.encode``, same images, batch and threads."""
    import torch
    from accelerate import Accelerator

    from autoencoderkl.model import load_vae
    from autoencoderkl.run import set_cpu_threads
    from latent_diffusion.latents import encode_batch, encode_latents, list_sources

    accelerator = Accelerator()
    threads = set_cpu_threads(accelerator, args.cpu_threads)
    vae_path = args.vae or str(_demo_shaped_vae(args.resolution, scratch / "vae"))
    data = _subset(args.data, args.num_images, scratch / "images")
    sources = list_sources(data, args.resolution)[0]
    for s in {s.path for s in sources}:  # the files in the page cache, as after any first epoch
        s.read_bytes()
    n = len(sources)

    runs = iter(range(10**6))

    def end_to_end() -> int:
        out = scratch / f"cache-{next(runs)}"
        index = encode_latents(vae_path, data, out, resolution=args.resolution, hflip=args.hflip,
                               batch_size=args.batch_size, dtype=args.dtype, num_workers=args.num_workers,
                               shard_size=args.shard_size, accelerator=accelerator, cpu_threads=threads)
        shutil.rmtree(out)
        return len(index["paths"]) + index["num_skipped"]

    vae = load_vae(vae_path).to(accelerator.device).requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    batch = (torch.rand(args.batch_size, 3, args.resolution, args.resolution, generator=gen) * 2 - 1).to(accelerator.device)
    sizes = [min(args.batch_size, n - b) for b in range(0, n, args.batch_size)]

    def pure_encode() -> int:
        for size in sizes:
            mean, std = encode_batch(vae, batch[:size], args.hflip)
            mean.cpu(), std.cpu()  # as the cache path does (and a CUDA sync)
        return n

    def warmup() -> None:  # oneDNN/cuDNN kernel choice and the allocator serve both cases
        for _ in range(2):
            encode_batch(vae, batch, args.hflip)

    load_before = load_average()
    results = measure({"end_to_end": end_to_end, "pure_encode": pure_encode}, args.repeats, warmup, args.warmup)
    ratio = results["end_to_end"]["items_per_s"] / results["pure_encode"]["items_per_s"]
    print(f"encode {n} images at {args.resolution}x{args.resolution}{' + mirrors' if args.hflip else ''}, batch "
          f"{args.batch_size}, {accelerator.device} ({threads} threads), {args.num_workers} DataLoader workers, "
          f"latents stored as {args.dtype}:")
    print(f"  end to end (files -> workers -> VAE -> shards)  {rate(results['end_to_end'])}")
    print(f"  pure vae.encode on in-memory tensors            {rate(results['pure_encode'])}")
    print(f"  end to end / pure = {ratio:.3f}; 1-min load average {load_before} before, {load_average()} after "
          f"(other programs on these cores skew both)")
    return {
        "environment": {**environment(str(accelerator.device), "fp32", threads), "load_average_before": load_before},
        "settings": {"vae": vae_path if args.vae else "random, configs/autoencoderkl/demo.yaml shape", "data": args.data,
                     "num_images": n, "resolution": args.resolution, "hflip": args.hflip, "batch_size": args.batch_size,
                     "latent_dtype": args.dtype, "num_workers": args.num_workers, "shard_size": args.shard_size,
                     "warmup": args.warmup, "repeats": args.repeats},
        "results": results,
        "end_to_end_over_pure": ratio,
    }


WHAT = {"encode": bench_encode}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=sorted(WHAT), default="encode", help="what to measure (default: encode)")
    parser.add_argument("--out", help="write the figures as JSON here (e.g. bench.json)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed warm-up rounds first (encode: 2 batches through the VAE) (default: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each case; the median is reported (default: 3)")
    parser.add_argument("--resolution", type=int, default=64, help="image side in pixels (default: 64)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward (default: 32)")
    parser.add_argument("--cpu-threads", type=int, help="intra-op threads on CPU (default: all cores)")
    enc = parser.add_argument_group("--what encode")
    enc.add_argument("--vae", help="AutoencoderKL folder (default: a random one shaped like configs/autoencoderkl/demo.yaml)")
    enc.add_argument("--data", default="demo", help="image folder, or 'demo' (default: demo)")
    enc.add_argument("--num-images", type=int, help="encode only the first N images of --data (default: all)")
    enc.add_argument("--hflip", action="store_true", help="also encode mirror views")
    enc.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="latent storage dtype (default: fp32)")
    enc.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (default: 2)")
    enc.add_argument("--shard-size", type=int, default=256, help="images per shard (default: 256)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory(prefix="benchmark-") as tmp:
        try:
            report = {"what": args.what, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                      **WHAT[args.what](args, Path(tmp))}
        except (FileNotFoundError, ValueError) as exc:
            sys.exit(f"error: {exc}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
