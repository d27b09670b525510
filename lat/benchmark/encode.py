"""--what encode: the real encode_latents path vs the VAE's pure encode on in-memory tensors."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from .harness import (count_flops, demo_shaped_vae, environment, load_average, measure, print_table, rate,
                      track_memory, with_rates)


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
    from autoencoderkl.launch import set_cpu_threads
    from latent_diffusion.encode import encode_batch, encode_latents, list_sources

    resolution, batch_size = args.resolution or 64, args.batch_size or 32
    accelerator = Accelerator()
    threads = set_cpu_threads(accelerator, args.cpu_threads)
    vae_path = args.vae or str(demo_shaped_vae(resolution, scratch / "vae", args.set))
    data = _subset(args.data, args.num_images, scratch / "images")
    sources = list_sources(data, resolution)[0]
    for s in {s.path for s in sources}:  # the files in the page cache, as after any first epoch
        s.read_bytes()
    n = len(sources)

    runs = iter(range(10**6))

    def end_to_end() -> int:
        out = scratch / f"cache-{next(runs)}"
        index = encode_latents(vae_path, data, out, resolution=resolution, hflip=args.hflip,
                               batch_size=batch_size, dtype=args.dtype, num_workers=args.num_workers,
                               shard_size=args.shard_size, accelerator=accelerator, cpu_threads=threads)
        shutil.rmtree(out)
        return len(index["paths"]) + index["num_skipped"]

    vae = load_vae(vae_path).to(accelerator.device).requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    batch = (torch.rand(batch_size, 3, resolution, resolution, generator=gen) * 2 - 1).to(accelerator.device)
    sizes = [min(batch_size, n - b) for b in range(0, n, batch_size)]

    def pure_encode() -> int:
        for size in sizes:
            mean, std = encode_batch(vae, batch[:size], args.hflip)
            mean.cpu(), std.cpu()  # as the cache path does (and a CUDA sync)
        return n

    def warmup() -> None:  # oneDNN/cuDNN kernel choice and the allocator serve both cases
        for _ in range(2):
            encode_batch(vae, batch, args.hflip)

    device = str(accelerator.device)
    flops_per_image = count_flops(lambda: encode_batch(vae, batch, args.hflip)) // batch_size  # mirrors included
    timed = {"end_to_end": end_to_end, "pure_encode": pure_encode}
    if args.shards:  # the same images as WebDataset shards, streamed: one cache shard per tar
        from autoencoderkl.shards import make_shards

        if data == "demo":
            raise ValueError("--shards needs --data FOLDER (the images to shard)")
        make_shards(data, scratch / "shards", shard_size=args.shard_size)
        tars = [str(scratch / "shards" / "train-*.tar")]

        def end_to_end_shards() -> int:
            out = scratch / f"cache-{next(runs)}"
            index = encode_latents(vae_path, "hf:webdataset", out, resolution=resolution, hflip=args.hflip,
                                   batch_size=batch_size, dtype=args.dtype, num_workers=args.num_workers,
                                   accelerator=accelerator, cpu_threads=threads, data_files=tars)
            shutil.rmtree(out)
            return len(index["paths"]) + index["num_skipped"]

        timed = {"end_to_end": end_to_end, "end_to_end_shards": end_to_end_shards, "pure_encode": pure_encode}
    cases, peaks = track_memory(timed, device)
    load_before = load_average()
    results = measure(cases, args.repeats, warmup, args.warmup)
    for name, r in results.items():
        with_rates(r, flops_per_image, None)
        r.update(peaks[name])
    ratio = results["end_to_end"]["items_per_s"] / results["pure_encode"]["items_per_s"]
    print(f"encode {n} images at {resolution}x{resolution}{' + mirrors' if args.hflip else ''}, batch "
          f"{batch_size}, {accelerator.device} ({threads} threads), {args.num_workers} DataLoader workers, "
          f"latents stored as {args.dtype}:")
    print(f"  end to end (files -> workers -> VAE -> shards)  {rate(results['end_to_end'])}")
    print(f"  pure vae.encode on in-memory tensors            {rate(results['pure_encode'])}")
    if args.shards:
        shard_ratio = results["end_to_end_shards"]["items_per_s"] / results["end_to_end"]["items_per_s"]
        print(f"  end to end from WebDataset shards (streamed)    {rate(results['end_to_end_shards'])}")
        print(f"  shards / folder = {shard_ratio:.3f}")
    print(f"  end to end / pure = {ratio:.3f}; 1-min load average {load_before} before, {load_average()} after "
          f"(other programs on these cores skew both)")
    print_table(f"encode: {n} images at {resolution}x{resolution}, batch {batch_size}", results, "pure_encode")
    return {
        "environment": {**environment(device, "fp32", threads), "load_average_before": load_before},
        "settings": {"vae": vae_path if args.vae else "random, configs/autoencoderkl/demo.yaml shape", "data": args.data,
                     "num_images": n, "resolution": resolution, "hflip": args.hflip, "batch_size": batch_size,
                     "latent_dtype": args.dtype, "num_workers": args.num_workers, "shard_size": args.shard_size,
                     "warmup": args.warmup, "repeats": args.repeats},
        "results": results,
        "end_to_end_over_pure": ratio,
        **({"shards_over_folder": results["end_to_end_shards"]["items_per_s"] / results["end_to_end"]["items_per_s"]}
           if args.shards else {}),
        "flops": {"per_image": flops_per_image},
    }

