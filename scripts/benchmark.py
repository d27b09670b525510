#!/usr/bin/env python
"""Measure throughput: warm-up, then the median and spread over repeats, into a JSON file.

  python scripts/benchmark.py --what train_vae --baseline --out bench.json
  python scripts/benchmark.py --what train_ldm --baseline
  python scripts/benchmark.py --what sample --baseline
  python scripts/benchmark.py --what vae_tiling
  python scripts/benchmark.py --what encode --vae runs/vae-demo/vae --data /data/photos --resolution 128

Every --what prints a table at the end (one row per case: items/s as the median of the
timed repeats with the min-max range, steps/s, model GFLOP per item, the TFLOP/s that
achieves, peak memory, and the speed-up over the reference case) and --out writes all of
it as JSON: every repeat's figure, the config overrides of each case, FLOPs, peak memory,
and the environment (device, dtype, threads, library versions, load average before and
after), so figures from different machines and moments can be told apart. FLOPs are
torch.utils.flop_counter's: matrix multiplications, convolutions and attention, one
multiply-add = 2 FLOPs, forward and backward as executed (norms and pointwise ops are not
counted; a recomputed forward, with gradient checkpointing, is). Peak memory is the
resident set (ru_maxrss) of the process doing the work on CPU, or
torch.cuda.max_memory_allocated on CUDA.

--what train_vae: optimizer steps of the REAL stage-1 loop (autoencoderkl.train.main), one
  fresh process per case (isolating peak memory, compile caches and global flags), on
  --config (default configs/autoencoderkl/demo.yaml) with train.max_steps = (warmup +
  repeats) x steps, train.log_steps = steps, and validation and checkpoint only at the
  end. The loop logs images/s per window of --steps steps to metrics.jsonl: the first
  --warmup windows (compilation, allocator) are dropped, the rest are the repeats. The
  step measured is the FULL one: loss.disc_start=0, so every step runs the generator
  (L1/L2 + LPIPS + PatchGAN term with the adaptive weight) and the discriminator update.
  Without the VGG16 weights in the torchvision cache LPIPS gets a random backbone
  (loss.perceptual_pretrained=false: the same FLOPs). FLOPs: one step's forward and
  backward passes on the trained modules, per image.
--what train_ldm: the same for the real stage-2 loop (latent_diffusion.train.main, --config
  default configs/latent_diffusion/demo.yaml) on a latent cache: --latents DIR, or one
  built first (untimed) from --data (default: the demo tiles) at --resolution (default
  64) with --vae (default: a random demo-shaped VAE). Then, in this process, the two
  kinds of step alternate repeat by repeat: a U-Net step on cached latents vs a U-Net
  step that crops and encodes the images every step (as diffusers' example scripts do;
  decoded images stay in memory for up to 1000 files), same U-Net, AdamW, loss and
  --steps steps per call; their steps/s ratio is what the cache buys.
--what sample: images/s of LatentDiffusionPipeline(batch_size=B, num_inference_steps=
  --steps (default 50)): --model DIR, or a random pipeline of the demo's shape (the
  demo-shaped VAE, a U-Net from --config's model section, DDIM). FLOPs per image: the
  U-Net calls plus the decode.
--what vae_tiling: one image of --resolution px (default 512 on CPU, 1024 on CUDA; a demo
  photo upscaled) through encode + decode of --vae (default: random, demo-shaped), each
  case in its own process: plain, vae.enable_tiling() (tiles of --tile-size px, default
  the VAE's sample_size, overlapping by a quarter and blended), plain with a batch of 2,
  and vae.enable_slicing() with a batch of 2. Reports s/image, peak memory (and what the
  work added to it), how far the tiled (and sliced) reconstruction lies from the plain
  one (tiles are normalised apart and blended, so not exactly), and each one's 8-bit
  PSNR against the input. A random VAE's differences mean little: pass --vae.
--what encode: images/s of the real encode_latents path (files -> DataLoader workers ->
  VAE -> shard files, a fresh cache each repeat, worker start-up included) next to the
  VAE's pure encode on in-memory tensors of the same size, batch and thread count. The
  image files are read once first (page cache), and two batches go through the VAE as
  warm-up; the two cases alternate repeat by repeat, so a load that comes and goes (a
  shared machine) hits both alike.

Cases (train_vae, train_ldm, sample): "optimized" always: the config plus the fast paths
that pay off on this device (table below; the JSON records the overrides); "baseline"
with --baseline: every fast path off (fp32, eager, NCHW, unfused optimizer, no
DataLoader workers, three backward passes through LPIPS and the discriminator); with
--ablate, one more case per switch: optimized with that one switch flipped (switches
without effect on the device, such as TF32 or the fused optimizer on a CPU, are skipped).
--set key=value overrides apply to every case, last.

  stage 1 (train_vae)     baseline value                optimized on CPU     on CUDA
  train.mixed_precision   no                            no (no bf16 units)   bf16
  train.channels_last     false                         true                 true
  train.compile           false                         false (2x slower)    true
  train.allow_tf32        false                         (no effect)          true
  optim.fused             false                         (no effect)          true
  data.num_workers        0                             the config's         max(config, 4)
  loss.shared_backward    false (3 backward passes)     true                 true
  stage 2 (train_ldm): the same train.*/optim.* switches and data.num_workers; optimized
  on CPU: none of them (--ablate tries channels_last); on CUDA: bf16, channels_last,
  compile, TF32, fused.
  sample: baseline fp32, eager, NCHW; optimized on CPU channels_last (U-Net and VAE), on
  CUDA bf16 + channels_last + torch.compile(unet).

Switches a config does not know yet (an older checkout) are left out and listed under
"switches_unavailable" in the JSON.

Cases run one after another (train_vae, train_ldm, vae_tiling: a process each), so a
machine shared with other work can skew them unequally. train_vae and train_ldm therefore
run --rounds (2) rounds of processes in alternating order (A B, then B A) and pool the
timed windows; compare the load averages recorded with each case and round, and rerun if
one looks skewed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
STAGE1_DEMO = REPO / "configs" / "autoencoderkl" / "demo.yaml"
STAGE2_DEMO = REPO / "configs" / "latent_diffusion" / "demo.yaml"


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


def summarize_windows(rates: list[float], items: int, warmup: int) -> dict[str, Any]:
    """Per-window rates logged by a training loop -> the figures ``measure`` gives.

    Args:
        rates: items/s of each logged window, in order (``images_per_sec`` or
            ``latents_per_sec`` lines of metrics.jsonl).
        items: items per window (steps x images per step).
        warmup: leading windows to drop (compilation, allocator warm-up).
    Returns:
        ``{"items", "seconds", "median_s", "items_per_s", "items_per_s_min",
        "items_per_s_max", "warmup_items_per_s"}`` over the windows after the warm-up.
    Raises:
        ValueError: if no window is left after the warm-up.
    """
    timed = rates[warmup:]
    if not timed:
        raise ValueError(f"the loop logged {len(rates)} windows; none left after {warmup} warm-up window(s)")
    seconds = [items / r for r in timed]
    median = statistics.median(seconds)
    return {
        "items": items,
        "seconds": [round(s, 4) for s in seconds],
        "median_s": round(median, 4),
        "items_per_s": items / median,
        "items_per_s_min": items / max(seconds),
        "items_per_s_max": items / min(seconds),
        "warmup_items_per_s": [round(r, 3) for r in rates[:warmup]],
    }


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def load_average() -> float | None:
    """1-minute load average: runnable processes, ours included (about 1 per busy core we use)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def cpu_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
        "cpu_cores": cpu_cores(),
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


def default_device() -> str:
    """``cuda`` when a GPU is visible (what Accelerate picks), else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- memory and FLOPs


def peak_memory(device: str) -> dict[str, float]:
    """Peak memory of this process so far, in MiB.

    Returns:
        ``peak_rss_mib`` (ru_maxrss of this process), ``peak_rss_children_mib`` (the largest
        finished child, e.g. a DataLoader worker) and, on CUDA,
        ``cuda_max_memory_allocated_mib`` (since the last ``reset_peak_memory_stats``).
        ``peak_memory_mib`` is the one that matters on the device: CUDA's, else the RSS.
    """
    scale = 2**20 if sys.platform == "darwin" else 2**10  # ru_maxrss: bytes on macOS, KiB on Linux
    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / scale / 1024, 1),
           "peak_rss_children_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / scale / 1024, 1)}
    out["peak_memory_mib"] = out["peak_rss_mib"]
    if device.startswith("cuda"):
        import torch

        out["cuda_max_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["peak_memory_mib"] = out["cuda_max_memory_allocated_mib"]
    return out


def _register_cpu_attention_flops() -> None:
    """Count CPU attention too: torch's FLOP counter knows only the CUDA attention kernels.

    ``F.scaled_dot_product_attention`` runs ``_scaled_dot_product_flash_attention_for_cpu``
    on a CPU, which ``torch.utils.flop_counter`` (2.x) has no formula for, so a U-Net's or a
    VAE's attention would count as 0. The CUDA kernels' formulas (4 b h s s' d forward)
    apply unchanged.
    """
    import torch
    from torch.utils import flop_counter

    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", flop_counter.sdpa_flop),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", flop_counter.sdpa_backward_flop)):
        op = getattr(torch.ops.aten, name, None)
        if op is not None and op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op, get_raw=True)(formula)  # already shape-wrapped


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of running ``fn()`` once (``torch.utils.flop_counter.FlopCounterMode``).

    Counts matrix multiplications, convolutions and attention, forward and backward, as
    executed: 2 FLOPs per multiply-add (a (M, K) x (K, N) matmul is 2 M K N). Pointwise
    ops and norms are not counted.

    Returns:
        The total, an int.
    """
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_attention_flops()
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------- cases and tables

# Stage-1 speed switches -> the value that turns each off (the baseline).
STAGE1_SWITCHES: dict[str, Any] = {
    "train.mixed_precision": "no",
    "train.channels_last": False,
    "train.compile": False,
    "train.allow_tf32": False,
    "optim.fused": False,
    "data.num_workers": 0,
    "loss.shared_backward": False,
}
# What "optimized" sets on each device type; a callable gets the config. Unlisted switches
# keep the config's value (CPU: no bf16 units, and train.compile measured 2x slower on a
# 2-core CPU for the demo step, 4.7 vs 10 images/s).
STAGE1_OPTIMIZED: dict[str, dict[str, Any]] = {
    "cpu": {"train.channels_last": True, "loss.shared_backward": True},
    "cuda": {"train.mixed_precision": "bf16", "train.channels_last": True, "train.compile": True,
             "train.allow_tf32": True, "optim.fused": True, "loss.shared_backward": True,
             "data.num_workers": lambda cfg: max(cfg.data.num_workers, 4)},
}
# Stage 2 has the same switches, less the shared LPIPS/PatchGAN backward.
STAGE2_SWITCHES: dict[str, Any] = {k: v for k, v in STAGE1_SWITCHES.items() if k != "loss.shared_backward"}
STAGE2_OPTIMIZED: dict[str, dict[str, Any]] = {
    "cpu": {},
    "cuda": {"train.mixed_precision": "bf16", "train.channels_last": True, "train.compile": True,
             "train.allow_tf32": True, "optim.fused": True},
}
# Switches --ablate also tries ON where "optimized" leaves them off, to measure them.
STAGE2_ABLATE_ON: dict[str, dict[str, Any]] = {"cpu": {"train.channels_last": True}, "cuda": {}}
NO_EFFECT: dict[str, tuple[str, ...]] = {"cpu": ("train.allow_tf32", "optim.fused"), "cuda": ()}

SAMPLE_SWITCHES: dict[str, Any] = {"dtype": "fp32", "channels_last": False, "compile": False}
SAMPLE_OPTIMIZED: dict[str, dict[str, Any]] = {
    "cpu": {"channels_last": True},
    "cuda": {"dtype": "bf16", "channels_last": True, "compile": True},
}


def _format(value: Any) -> str:
    """A Python value as an OmegaConf dotlist value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def _as_overrides(values: dict[str, Any]) -> list[str]:
    """``{"train.compile": True}`` -> ``["train.compile=true"]``."""
    return [f"{k}={_format(v)}" for k, v in values.items()]


def _config_value(cfg: Any, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def plan_cases(
    load: Callable[[str, list[str]], Any],
    schema: type,
    config: str,
    device_type: str,
    switches: dict[str, Any],
    optimized: dict[str, dict[str, Any]],
    common: list[str],
    user_set: list[str],
    baseline: bool,
    ablate: bool,
    ablate_on: dict[str, dict[str, Any]] | None = None,
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """The config overrides of every case: optimized, baseline, one per ablated switch.

    Each case is ``common`` + its switch values + ``user_set`` (so ``--set`` wins), and is
    loaded once here, so an unknown key or a bad value fails before any work.

    Args:
        load: the stage's ``load_config(yaml_path, overrides)``.
        schema: the stage's config dataclass (which switches exist).
        config: the YAML file.
        device_type: ``cpu`` or ``cuda``.
        switches: key -> its baseline value.
        optimized: device type -> key -> value (or a function of the config) for "optimized".
        common: overrides every case gets first (steps, logging, ...).
        user_set: ``--set`` overrides, applied last.
        baseline, ablate: add those cases.
        ablate_on: device type -> switches to try ON with --ablate where optimized leaves them off.
    Returns:
        ``(cases, info)``: name -> overrides, in run order; info holds ``optimized`` (the
        switch values the optimized case sets), ``switches`` (key -> baseline value),
        ``switches_unavailable`` (keys this config does not know) and ``ablate_skipped``
        (key -> why no case was made).
    Raises:
        FileNotFoundError, ValueError: from ``load`` (unknown key, bad value, missing file).
    """
    from autoencoderkl.config import valid_keys

    known = set(valid_keys(schema))
    base_cfg = load(config, common + user_set)
    available = {k: v for k, v in switches.items() if k in known}
    fast = {k: (v(base_cfg) if callable(v) else v) for k, v in optimized.get(device_type, {}).items() if k in known}
    cases = {"optimized": common + _as_overrides(fast) + user_set}
    if baseline:
        cases["baseline"] = common + _as_overrides(available) + user_set
    skipped: dict[str, str] = {}
    if ablate:
        for key, off in available.items():
            value = fast.get(key, _config_value(base_cfg, key))
            if key in NO_EFFECT.get(device_type, ()):
                skipped[key] = f"no effect on {device_type}"
            elif value == off:
                try_on = (ablate_on or {}).get(device_type, {})
                if key in try_on:
                    on = {**fast, key: try_on[key]}
                    cases[f"optimized, {key}={_format(try_on[key])}"] = common + _as_overrides(on) + user_set
                else:
                    skipped[key] = f"already {_format(off)} (its baseline value) in the optimized case"
            else:
                cases[f"optimized, {key}={_format(off)}"] = common + _as_overrides({**fast, key: off}) + user_set
    for overrides in cases.values():
        load(config, overrides)
    info = {"switches": {k: _format(v) for k, v in switches.items()},
            "optimized": {k: _format(v) for k, v in fast.items()},
            "switches_unavailable": [k for k in switches if k not in known],
            "ablate_skipped": skipped}
    return cases, info


def print_table(title: str, results: dict[str, dict[str, Any]], reference: str | None, unit: str = "img") -> dict[str, float]:
    """Print one row per case; return each case's speed-up over ``reference`` (items/s ratio).

    Args:
        results: name -> a dict with ``items_per_s`` (+ ``_min``/``_max``) and optionally
            ``steps_per_s``, ``flops_per_item``, ``tflops_per_s``, ``peak_memory_mib``.
        reference: the case the speed-ups divide by (None: no column).
        unit: what an item is (img, latent).
    """
    ref = results.get(reference) if reference else None
    speedups = {name: r["items_per_s"] / ref["items_per_s"] for name, r in results.items()} if ref else {}
    width = max(len("case"), *(len(n) for n in results))
    head = (f"{'case':<{width}}  {unit + '/s (median, min-max)':>26}  {'steps/s':>8}  {'GFLOP/' + unit:>11}  "
            f"{'TFLOP/s':>8}  {'peak MiB':>9}" + (f"  {'x ' + reference:>12}" if ref else ""))
    print(f"\n{title}\n{head}\n{'-' * len(head)}")

    def cell(value: float | None, width: int, spec: str) -> str:
        return f"{value:{width}{spec}}" if value is not None else f"{'-':>{width}}"

    for name, r in results.items():
        spread = f"{r['items_per_s']:8.2f} ({r['items_per_s_min']:.2f}-{r['items_per_s_max']:.2f})"
        flops = r.get("flops_per_item")
        line = (f"{name:<{width}}  {spread:>26}  {cell(r.get('steps_per_s'), 8, '.3f')}  "
                f"{cell(flops / 1e9 if flops else None, 11, '.3f')}  {cell(r.get('tflops_per_s'), 8, '.4f')}  "
                f"{cell(r.get('peak_memory_mib'), 9, '.0f')}")
        print(line + (f"  {speedups[name]:11.2f}x" if ref else ""))
    return speedups


def _with_rates(result: dict[str, Any], flops_per_item: int | None, items_per_step: int | None) -> dict[str, Any]:
    """Add steps/s and the achieved TFLOP/s (FLOPs per item x items/s) to a result."""
    if items_per_step:
        result["steps_per_s"] = result["items_per_s"] / items_per_step
    if flops_per_item:
        result["flops_per_item"] = flops_per_item
        result["tflops_per_s"] = flops_per_item * result["items_per_s"] / 1e12
    return result


def _track_memory(cases: dict[str, Callable[[], int]], device: str) -> tuple[dict[str, Callable[[], int]], dict[str, dict]]:
    """Wrap in-process cases so each records peak memory after its calls.

    On CUDA the allocator's peak is reset before every call, so each case gets its own
    figure; a CPU process has one RSS peak for all of its cases (``scope`` says which).
    """
    import torch

    peaks: dict[str, dict] = {name: {} for name in cases}

    def wrap(name: str, fn: Callable[[], int]) -> Callable[[], int]:
        def run() -> int:
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            n = fn()
            now = peak_memory(device)
            peaks[name] = {k: max(v, peaks[name].get(k, 0.0)) for k, v in now.items()}
            peaks[name]["scope"] = "this case (CUDA allocator)" if device.startswith("cuda") else "the whole process (all its cases)"
            return n
        return run

    return {name: wrap(name, fn) for name, fn in cases.items()}, peaks


# --------------------------------------------------------------------------- child processes


class CaseFailed(RuntimeError):
    """A case's child process failed; the message holds the end of its log."""


def run_child(name: str, spec: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """Run one case in a fresh Python process (this script with ``--child``); its result.

    The child writes its figures to a JSON file; its stdout and stderr go to
    ``scratch/<case>.log``.

    Raises:
        CaseFailed: if the child exits non-zero or writes no result.
    """
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    spec_path, result_path, log_path = (scratch / f"{slug}.{ext}" for ext in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}, indent=1))
    load_before = load_average()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                              stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result_path.is_file():
        tail = log_path.read_text(errors="replace")[-4000:]
        raise CaseFailed(f"case {name!r} failed (exit status {proc.returncode}); the end of its log:\n{tail}")
    result = json.loads(result_path.read_text())
    result.update(process_wall_s=round(wall, 2), load_average_before=load_before, load_average_after=load_average())
    return result


def child_main(spec_path: str) -> None:
    """Entry point of a case's process: run ``spec["kind"]``, write its result JSON."""
    spec = json.loads(Path(spec_path).read_text())
    result = CHILDREN[spec["kind"]](spec)
    tmp = Path(spec["result"] + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, spec["result"])


def _window_rates(metrics: Path, key: str) -> list[float]:
    """The ``key`` values (images_per_sec, latents_per_sec) of a run's metrics.jsonl, in order."""
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [rec[key] for rec in lines if key in rec]


def _child_train_vae(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: the real stage-1 loop, then the FLOPs of one step on the trained modules."""
    import torch

    from autoencoderkl.config import load_config
    from autoencoderkl.train import main as train

    cfg = load_config(spec["config"], spec["overrides"])
    perceptual_pretrained = cfg.loss.perceptual_pretrained
    t0, c0 = time.perf_counter(), _cpu_seconds()
    summary = train(cfg, spec["out_dir"])
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    device = str(next(summary["vae"].parameters()).device)
    memory = peak_memory(device)  # before the FLOP count below adds its own activations
    cfg.loss.perceptual_pretrained = perceptual_pretrained
    flops = _vae_step_flops(cfg, summary["vae"], summary["discriminator"])
    images_per_step = cfg.data.batch_size * cfg.train.gradient_accumulation_steps
    return {
        "rates": _window_rates(Path(spec["out_dir"]) / "metrics.jsonl", "images_per_sec"),
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


def _child_train_ldm(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: the real stage-2 loop, then the FLOPs of one U-Net step on the trained U-Net."""
    import torch

    from latent_diffusion.config import load_config
    from latent_diffusion.train import main as train

    cfg = load_config(spec["config"], spec["overrides"])
    t0, c0 = time.perf_counter(), _cpu_seconds()
    summary = train(cfg, spec["out_dir"])
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    device = str(next(summary["unet"].parameters()).device)
    memory = peak_memory(device)
    latents_per_step = cfg.data.batch_size * cfg.train.gradient_accumulation_steps
    return {
        "rates": _window_rates(Path(spec["out_dir"]) / "metrics.jsonl", "latents_per_sec"),
        "items_per_window": latents_per_step * cfg.train.log_steps,
        "items_per_step": latents_per_step,
        "flops": {"per_item": unet_step_flops(summary["unet"], cfg, cfg.data.batch_size) // cfg.data.batch_size,
                  "batch": cfg.data.batch_size},
        **memory,
        "device": device,
        "threads": torch.get_num_threads(),
        "dtype": {"no": "fp32"}.get(cfg.train.mixed_precision, cfg.train.mixed_precision),
        "run_wall_s": round(wall, 2),
        "run_cpu_s": round(cpu, 2),
    }


def unet_step_flops(unet: Any, cfg: Any, batch: int) -> int:
    """FLOPs of one U-Net training step (``diffusion_loss`` forward + backward) on a random batch.

    Args:
        unet: a ``UNet2DModel`` (eager).
        cfg: the stage-2 config (its noise section).
        batch: B latents of the U-Net's (in_channels, sample_size, sample_size) shape.
    Returns:
        Total FLOPs for the batch (divide by B for one latent).
    """
    import torch

    from latent_diffusion.model import build_noise_scheduler
    from latent_diffusion.train import diffusion_loss

    device = next(unet.parameters()).device
    c, h = unet.config.in_channels, unet.config.sample_size
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, c, h, h, generator=gen).to(device)
    n = unet.config.num_class_embeds
    labels = torch.randint(0, n, (batch,), generator=gen).to(device) if n else None
    scheduler = build_noise_scheduler(cfg.noise)
    was_training = unet.training
    unet.train()

    def step() -> None:
        diffusion_loss(unet, scheduler, latents, labels, cfg.noise.snr_gamma).backward()

    flops = count_flops(step)
    unet.zero_grad(set_to_none=True)
    unet.train(was_training)
    return flops


# --------------------------------------------------------------------------- --what train_vae


def _run_training_cases(cases: dict[str, list[str]], kind: str, config: str, warmup: int, scratch: Path,
                        unit: str, rounds: int = 1) -> dict[str, dict[str, Any]]:
    """Run every case's child, ``rounds`` times in alternating order; per case the pooled figures.

    A shared machine's speed drifts over tens of seconds, so cases run one after another
    are skewed unequally; alternating rounds (A B, then B A, ...) spread the drift over
    all cases. Each child drops its own ``warmup`` windows; the timed windows of all its
    rounds are pooled (median, min-max). Peak memory is the largest of the rounds; the
    load averages and process times are those of each round (``rounds_detail``).
    """
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in cases}
    for r in range(rounds):
        for name in (list(cases) if r % 2 == 0 else list(reversed(cases))):
            label = f"{name}, round {r + 1}/{rounds}" if rounds > 1 else name
            print(f"[{label}] running the {kind} loop in a fresh process ...", flush=True)
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{name}-{r}")
            out = run_child(slug, {"kind": kind, "config": config, "overrides": cases[name],
                                   "out_dir": str(scratch / slug)}, scratch)
            runs[name].append(out)
            timed = out["rates"][warmup:]
            print(f"[{label}] {statistics.median(timed) if timed else float('nan'):.2f} {unit}/s (median of {len(timed)} "
                  f"windows), peak {out['peak_memory_mib']:.0f} MiB, 1-min load {out['load_average_before']} -> "
                  f"{out['load_average_after']}", flush=True)
    results = {}
    for name, outs in runs.items():
        rates = [rate for out in outs for rate in out["rates"][:warmup]] + [rate for out in outs for rate in out["rates"][warmup:]]
        result = summarize_windows(rates, outs[0]["items_per_window"], warmup * len(outs))
        first = {k: v for k, v in outs[0].items() if k != "rates"}
        result = _with_rates(result, first["flops"]["per_item"], first["items_per_step"])
        result.update(overrides=cases[name], **first)
        for key in ("peak_memory_mib", "peak_rss_mib", "cuda_max_memory_allocated_mib"):
            if key in first:
                result[key] = max(out[key] for out in outs)
        result["rounds_detail"] = [{k: out.get(k) for k in ("process_wall_s", "load_average_before", "load_average_after")}
                                   for out in outs]
        results[name] = result
    return results


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
    cases, info = plan_cases(load_config, VAEConfig, config, device, STAGE1_SWITCHES, STAGE1_OPTIMIZED, common,
                             args.set, args.baseline, args.ablate)
    load_before = load_average()
    results = _run_training_cases(cases, "train_vae", config, args.warmup, scratch, "img", args.rounds)
    opt = results["optimized"]
    cfg = load_config(config, cases["optimized"])
    title = (f"train_vae: {Path(config).name}, {cfg.data.resolution}x{cfg.data.resolution}, batch {cfg.data.batch_size}, "
             f"{opt['device']} ({opt['threads']} threads); median of {args.repeats} x {args.rounds} windows of {steps} "
             f"steps after "
             f"{args.warmup} warm-up window(s)")
    speedups = print_table(title, results, "baseline" if args.baseline else None)
    return {
        "environment": {**environment(opt["device"], opt["dtype"], opt["threads"]), "load_average_before": load_before},
        "settings": {"config": config, "steps_per_window": steps, "warmup_windows": args.warmup,
                     "repeats": args.repeats, "rounds": args.rounds,
                     "common_overrides": common, "set": args.set, "resolution": cfg.data.resolution,
                     "batch_size": cfg.data.batch_size, "perceptual": opt["perceptual"]},
        **info,
        "notes": notes,
        "cases": results,
        "speedup_over_baseline": speedups,
    }


# --------------------------------------------------------------------------- --what train_ldm


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
    """Steps/s of the U-Net step on cached latents vs on images encoded every step.

    Both cases: the same ``build_unet`` U-Net, AdamW (the config's), ``diffusion_loss``
    (Min-SNR as configured), gradient clipping, batch ``data.batch_size``, DataLoader with
    ``data.num_workers``; they alternate repeat by repeat (``measure``). "cached" draws
    batches from ``LatentDataset``; "encode_every_step" from ``ImageFolder`` over the
    cache's source images (random crops at the cache's resolution; decoded images kept in
    memory for up to 1000 files, so it times the encoder, not the PNG decoder), then
    ``vae.encode(x).latent_dist.sample()``, shifted and scaled as the cache, under
    no_grad (diffusers' example scripts do this). Labels: the cache's, random ones for
    the images (the same U-Net work).

    Returns:
        ``{"results": measure()'s, with steps/s, FLOPs and memory, "cached_over_encoded":
        steps/s ratio, "flops": {"unet_step_per_latent", "encode_per_latent"}, "settings"}``.
    """
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from autoencoderkl.data import ImageFolder
    from autoencoderkl.model import load_vae
    from latent_diffusion.latents import LatentDataset
    from latent_diffusion.model import build_noise_scheduler, build_unet
    from latent_diffusion.train import diffusion_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dataset = LatentDataset(latents, sample_posterior=cfg.data.sample_posterior, scaling_factor=cfg.data.scaling_factor,
                            shift_factor=cfg.data.shift_factor)
    scale, shift = dataset.scaling_factor, dataset.shift_factor
    files, resize = _image_paths_of_cache(dataset.index)
    resolution = dataset.index["resolution"]
    images = ImageFolder(files, resolution, resize, train=True, cache_images=len(files) <= 1000)
    vae = load_vae(vae_path).to(device).eval().requires_grad_(False)
    num_classes = dataset.num_classes if cfg.model.class_conditional else None
    unet = build_unet(cfg.model, tuple(dataset.latent_shape), num_classes).to(device).train()
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
            loss = diffusion_loss(unet, noise_scheduler, latents_, labels, cfg.noise.snr_gamma)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.optim.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def encode(x: Any) -> Any:
        with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            z = vae.encode(x).latent_dist.sample().float()  # (B, c, h, w)
        return (z - shift) * scale

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
    cases, peaks = _track_memory({"cached": sync(cached), "encode_every_step": sync(encode_every_step)}, device)
    results = measure(cases, repeats, warmup_calls=warmup)
    for name, r in results.items():
        per_latent = flops["unet_step_per_latent"] + (flops["encode_per_latent"] if name == "encode_every_step" else 0)
        r["steps_per_s"] = r["items_per_s"]
        # Figures per latent (steps x batch), as the training loops log them.
        for key in ("items_per_s", "items_per_s_min", "items_per_s_max"):
            r[key] *= b
        r["cpu_ms_per_item"] /= b
        r["items"] *= b
        _with_rates(r, per_latent, b)
        r.update(peaks[name])
    return {"results": results,
            "cached_over_encoded": results["cached"]["steps_per_s"] / results["encode_every_step"]["steps_per_s"],
            "flops": flops,
            "settings": {"steps_per_call": steps, "batch_size": b, "num_workers": workers, "threads": threads,
                         "images": len(images.paths), "image_resize": resize, "resolution": resolution,
                         "images_kept_in_memory": len(files) <= 1000, "mixed_precision": cfg.train.mixed_precision}}


def bench_train_ldm(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """The real stage-2 training step (one process per case) and cached vs encode-every-step."""
    from latent_diffusion.config import LDMConfig, load_config
    from latent_diffusion.encode import encode_latents
    from latent_diffusion.latents import load_index

    config = str(Path(args.config or STAGE2_DEMO).resolve())
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
        vae_path = args.vae or str(_demo_shaped_vae(resolution, scratch / "vae"))
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
    load_before = load_average()
    results = _run_training_cases(cases, "train_ldm", config, args.warmup, scratch, "latent", args.rounds)
    opt = results["optimized"]
    cfg = load_config(config, cases["optimized"])
    shape = "x".join(str(s) for s in index["latent_shape"])
    title = (f"train_ldm: {Path(config).name}, {index['num_latents']} cached {shape} latents, batch {cfg.data.batch_size}, "
             f"{opt['device']} ({opt['threads']} threads); median of {args.repeats} x {args.rounds} windows of {steps} "
             f"steps after "
             f"{args.warmup} warm-up window(s)")
    speedups = print_table(title, results, "baseline" if args.baseline else None, unit="latent")

    threads = args.cpu_threads or cfg.train.cpu_threads or cpu_cores()
    print(f"\n[cached vs encode_every_step] {args.repeats} x {steps} steps each, alternating, in this process ...", flush=True)
    comparison = cached_vs_encoded(cfg, latents, vae_path, device, steps, args.repeats, args.warmup, threads)
    ratio = comparison["cached_over_encoded"]
    print_table(f"U-Net step on cached latents vs encoding the images every step (same U-Net, AdamW, loss; "
                f"{threads} thread(s)):", comparison["results"], "encode_every_step", unit="latent")
    print(f"cached / encode every step = {ratio:.2f}x steps/s; the encoder costs "
          f"{comparison['flops']['encode_per_latent'] / 1e9:.3f} GFLOP per latent vs "
          f"{comparison['flops']['unet_step_per_latent'] / 1e9:.3f} for the U-Net step")
    return {
        "environment": {**environment(opt["device"], opt["dtype"], opt["threads"]), "load_average_before": load_before},
        "settings": {"config": config, "latents": latents, "vae": vae_path, "latent_shape": index["latent_shape"],
                     "num_latents": index["num_latents"], "steps_per_window": steps, "warmup_windows": args.warmup,
                     "repeats": args.repeats, "rounds": args.rounds, "common_overrides": common, "set": args.set,
                     "batch_size": cfg.data.batch_size},
        **info,
        "notes": notes,
        "cases": results,
        "speedup_over_baseline": speedups,
        "cached_vs_encoded": comparison,
    }


# --------------------------------------------------------------------------- --what sample


def bench_sample(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Images/s of the sampling pipeline: optimized vs baseline (and ablations), interleaved."""
    import torch

    from latent_diffusion.config import load_config
    from latent_diffusion.model import build_noise_scheduler, build_sampler, build_unet
    from latent_diffusion.pipeline import LatentDiffusionPipeline, load_pipeline

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
        vae = load_vae(_demo_shaped_vae(resolution, scratch / "vae"))
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        if resolution % f:
            raise ValueError(f"--resolution {resolution} must be a multiple of the VAE's factor {f}")
        num_classes = 9 if cfg.model.class_conditional else None  # the demo cache's photos
        torch.manual_seed(0)
        unet = build_unet(cfg.model, (vae.config.latent_channels, resolution // f, resolution // f), num_classes)
        base = LatentDiffusionPipeline(unet.eval(), build_sampler("ddim", build_noise_scheduler(cfg.noise).config),
                                       vae.eval(), class_names=[f"class{i}" for i in range(num_classes)] if num_classes else None)
        source = (f"random: U-Net from {Path(args.config or STAGE2_DEMO).name} model section, "
                  f"VAE shaped like configs/autoencoderkl/demo.yaml, DDIM, {resolution}x{resolution} px")
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
                settings_of[f"optimized, {key}={_format(off)}"] = {**settings_of["optimized"], key: off}

    def build(settings: dict[str, Any]) -> Any:
        pipe = LatentDiffusionPipeline(copy.deepcopy(base.unet), copy.deepcopy(base.scheduler), copy.deepcopy(base.vae),
                                       class_names=base.config.class_names).to(device)
        pipe.set_progress_bar_config(disable=True)
        if settings["dtype"] == "bf16":
            pipe.to(dtype=torch.bfloat16)
        if settings["channels_last"]:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        if settings["compile"]:
            pipe.unet = torch.compile(pipe.unet)
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
    cases, peaks = _track_memory({name: (lambda p=p: call(p)) for name, p in pipes.items()}, device)
    load_before = load_average()
    print(f"sampling {batch} images x {steps} steps per call, {len(pipes)} case(s) alternating ...", flush=True)
    results = measure(cases, args.repeats, warmup_calls=args.warmup)
    for name, r in results.items():
        _with_rates(r, flops_per_image, batch)
        r["steps_per_s"] = r["items_per_s"] / batch * steps  # sampler steps (U-Net calls on the batch) per second
        r.update(peaks[name], settings=settings_of[name])
    title = (f"sample: {batch} images x {steps} DDIM steps per call, {device} ({threads} threads); "
             f"median of {args.repeats} calls after {args.warmup} warm-up call(s)")
    speedups = print_table(title, results, "baseline" if args.baseline else None)
    return {
        "environment": {**environment(device, settings_of["optimized"]["dtype"], torch.get_num_threads()),
                        "load_average_before": load_before},
        "settings": {"pipeline": source, "batch_size": batch, "num_inference_steps": steps, "guidance_scale": 1.0,
                     "class_labels": labels, "warmup": args.warmup, "repeats": args.repeats, "set": args.set,
                     "resolution": base.unet.config.sample_size * 2 ** (len(base.vae.config.block_out_channels) - 1)},
        "switches": {k: _format(v) for k, v in SAMPLE_SWITCHES.items()},
        "optimized": {k: _format(v) for k, v in SAMPLE_OPTIMIZED[device].items()},
        "ablate_skipped": skipped,
        "flops": {"per_image": flops_per_image, "unet_call_on_batch": per_step, "decode_batch": decode},
        "cases": results,
        "speedup_over_baseline": speedups,
        "notes": ["steps_per_s counts sampler steps (one U-Net call on the whole batch each)"],
    }


# --------------------------------------------------------------------------- --what vae_tiling


def _child_vae_tiling(spec: dict[str, Any]) -> dict[str, Any]:
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
    vae_path = str(Path(args.vae).resolve()) if args.vae else str(_demo_shaped_vae(64, scratch / "vae", args.set))
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
        _with_rates(r, r.pop("flops_per_item"), None)
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


# --------------------------------------------------------------------------- --what encode


def _demo_shaped_vae(resolution: int, folder: Path, overrides: list[str] = ()) -> Path:
    """A randomly initialised VAE of the demo config's shape (speed does not need trained weights)."""
    import torch

    from autoencoderkl.config import load_config
    from autoencoderkl.model import build_vae

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    cfg = load_config(STAGE1_DEMO, list(overrides))
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
    from latent_diffusion.encode import encode_batch, encode_latents, list_sources

    resolution, batch_size = args.resolution or 64, args.batch_size or 32
    accelerator = Accelerator()
    threads = set_cpu_threads(accelerator, args.cpu_threads)
    vae_path = args.vae or str(_demo_shaped_vae(resolution, scratch / "vae", args.set))
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
    cases, peaks = _track_memory({"end_to_end": end_to_end, "pure_encode": pure_encode}, device)
    load_before = load_average()
    results = measure(cases, args.repeats, warmup, args.warmup)
    for name, r in results.items():
        _with_rates(r, flops_per_image, None)
        r.update(peaks[name])
    ratio = results["end_to_end"]["items_per_s"] / results["pure_encode"]["items_per_s"]
    print(f"encode {n} images at {resolution}x{resolution}{' + mirrors' if args.hflip else ''}, batch "
          f"{batch_size}, {accelerator.device} ({threads} threads), {args.num_workers} DataLoader workers, "
          f"latents stored as {args.dtype}:")
    print(f"  end to end (files -> workers -> VAE -> shards)  {rate(results['end_to_end'])}")
    print(f"  pure vae.encode on in-memory tensors            {rate(results['pure_encode'])}")
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
        "flops": {"per_image": flops_per_image},
    }


WHAT = {"encode": bench_encode, "train_vae": bench_train_vae, "train_ldm": bench_train_ldm, "sample": bench_sample,
        "vae_tiling": bench_vae_tiling}
CHILDREN = {"train_vae": _child_train_vae, "train_ldm": _child_train_ldm, "vae_tiling": _child_vae_tiling}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=sorted(WHAT), default="encode", help="what to measure (default: encode)")
    parser.add_argument("--out", help="write the figures as JSON here (e.g. bench.json)")
    parser.add_argument("--config",
                        help="run config: train_vae (default configs/autoencoderkl/demo.yaml); train_ldm and sample "
                             "(default configs/latent_diffusion/demo.yaml; sample takes its model section)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides for every case, applied last (train_vae, train_ldm, sample: that "
                             "config; encode, vae_tiling: the random demo-shaped VAE's model.* keys)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="train_vae, train_ldm: run the cases' processes this many times, alternating the order "
                             "(A B, B A, ...), and pool their timed windows: a shared machine's drifting speed then "
                             "hits every case alike (default: 2)")
    parser.add_argument("--baseline", action="store_true",
                        help="also run the baseline case: every fast path off (train_vae, train_ldm, sample)")
    parser.add_argument("--ablate", action="store_true",
                        help="also run optimized with one switch flipped, a case per switch (train_vae, train_ldm, sample)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed warm-up first: train_vae/train_ldm windows of --steps steps; other --what calls "
                             "(encode: 2 batches through the VAE) (default: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each case; the median is reported (default: 3)")
    parser.add_argument("--steps", type=int,
                        help="train_vae/train_ldm: optimizer steps per timed window (default 4 / 10); sample: sampler "
                             "steps (default 50)")
    parser.add_argument("--resolution", type=int,
                        help="image side in pixels (default: encode, train_ldm's cache, sample 64; train_vae the "
                             "config's; vae_tiling 512 on CPU, 1024 on CUDA)")
    parser.add_argument("--batch-size", type=int,
                        help="images per step or call (default: encode 32; train_vae/train_ldm the config's; sample 8; "
                             "vae_tiling 1, and 2 for the batched cases)")
    parser.add_argument("--cpu-threads", type=int,
                        help="intra-op threads on CPU for encode, sample, vae_tiling and train_ldm's in-process "
                             "comparison (default: the config's train.cpu_threads where it sets one (the stage-2 demo: "
                             "1), else all cores; the training loops always use the config's, see --set)")
    enc = parser.add_argument_group("data and models (the --what each applies to is named)")
    enc.add_argument("--vae", help="encode, train_ldm (its cache), vae_tiling: AutoencoderKL folder (default: a random one "
                                    "shaped like configs/autoencoderkl/demo.yaml)")
    enc.add_argument("--data", default="demo", help="encode, train_ldm (its cache): image folder, or 'demo' (default: demo)")
    enc.add_argument("--num-images", type=int, help="encode: only the first N images of --data (default: all)")
    enc.add_argument("--hflip", action="store_true", help="encode: also encode mirror views")
    enc.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="encode: latent storage dtype (default: fp32)")
    enc.add_argument("--num-workers", type=int, default=2,
                     help="encode, and building train_ldm's cache: DataLoader workers (default: 2)")
    enc.add_argument("--shard-size", type=int, default=256, help="encode: images per shard (default: 256)")
    enc.add_argument("--latents", help="train_ldm: an existing latent cache (default: build one from --data)")
    enc.add_argument("--model", help="sample: a trained pipeline folder (default: a random demo-shaped pipeline)")
    enc.add_argument("--tile-size", type=int, help="vae_tiling: tile side in pixels (default: the VAE's sample_size)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one case from a spec file
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--repeats and --rounds must be >= 1 and --warmup >= 0")
    for name in ("steps", "resolution", "batch_size", "cpu_threads", "tile_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.what in ("train_vae", "train_ldm") and args.warmup < 1:
        parser.error(f"--what {args.what} needs --warmup >= 1: the first window includes start-up and compilation")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.child:
        child_main(args.child)
        return
    with tempfile.TemporaryDirectory(prefix="benchmark-") as tmp:
        try:
            report = {"what": args.what, "command": " ".join(["benchmark.py", *argv]),
                      **WHAT[args.what](args, Path(tmp))}
        except (FileNotFoundError, ValueError, CaseFailed) as exc:
            sys.exit(f"error: {exc}")
    report["environment"]["load_average_after"] = load_average()
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
