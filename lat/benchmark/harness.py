"""The benchmark harness: timing, FLOPs, memory, environment, case planning, tables, case processes.

Every ``--what`` module (``train_vae``, ``train_ldm``, ``sample``, ``encode``,
``vae_tiling``, ``startup``) builds on these; the figures they define are described in
``lat.benchmark.cli`` (the ``--help`` text).
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import lat
from autoencoderkl.config import find_config

STAGE1_DEMO = find_config("demo", "autoencoderkl")
STAGE2_DEMO = find_config("demo", "latent_diffusion")


# --------------------------------------------------------------------------- timing and environment


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
            c0, t0 = cpu_seconds(), time.perf_counter()
            items[name] = fn()
            seconds[name].append(time.perf_counter() - t0)
            cpu[name].append(cpu_seconds() - c0)
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


def cpu_seconds() -> float:
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


def format_value(value: Any) -> str:
    """A Python value as an OmegaConf dotlist value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def as_overrides(values: dict[str, Any]) -> list[str]:
    """``{"train.compile": True}`` -> ``["train.compile=true"]``."""
    return [f"{k}={format_value(v)}" for k, v in values.items()]


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
    cases = {"optimized": common + as_overrides(fast) + user_set}
    if baseline:
        cases["baseline"] = common + as_overrides(available) + user_set
    skipped: dict[str, str] = {}
    if ablate:
        for key, off in available.items():
            value = fast.get(key, _config_value(base_cfg, key))
            if value is None:  # unset: the launcher's choice, which is its default (off) in a benchmark child
                value = off
            if key in NO_EFFECT.get(device_type, ()):
                skipped[key] = f"no effect on {device_type}"
            elif value == off:
                try_on = (ablate_on or {}).get(device_type, {})
                if key in try_on:
                    on = {**fast, key: try_on[key]}
                    cases[f"optimized, {key}={format_value(try_on[key])}"] = common + as_overrides(on) + user_set
                else:
                    skipped[key] = f"already {format_value(off)} (its baseline value) in the optimized case"
            else:
                cases[f"optimized, {key}={format_value(off)}"] = common + as_overrides({**fast, key: off}) + user_set
    for overrides in cases.values():
        load(config, overrides)
    info = {"switches": {k: format_value(v) for k, v in switches.items()},
            "optimized": {k: format_value(v) for k, v in fast.items()},
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


def with_rates(result: dict[str, Any], flops_per_item: int | None, items_per_step: int | None) -> dict[str, Any]:
    """Add steps/s and the achieved TFLOP/s (FLOPs per item x items/s) to a result."""
    if items_per_step:
        result["steps_per_s"] = result["items_per_s"] / items_per_step
    if flops_per_item:
        result["flops_per_item"] = flops_per_item
        result["tflops_per_s"] = flops_per_item * result["items_per_s"] / 1e12
    return result


def track_memory(cases: dict[str, Callable[[], int]], device: str) -> tuple[dict[str, Callable[[], int]], dict[str, dict]]:
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


def _child_env() -> dict[str, str]:
    """This environment with the folder holding the ``lat`` package first on PYTHONPATH."""
    root = str(Path(lat.__file__).resolve().parents[1])
    rest = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + rest if rest else "")}


def run_child(name: str, spec: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """Run one case in a fresh Python process (``python -m lat.benchmark --child SPEC``); its result.

    The child imports the same ``lat`` package as this process (its folder leads the
    child's PYTHONPATH, so a checkout works without ``pip install``), writes its figures
    to a JSON file, and sends its stdout and stderr to ``scratch/<case>.log``.

    Raises:
        CaseFailed: if the child exits non-zero or writes no result.
    """
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    spec_path, result_path, log_path = (scratch / f"{slug}.{ext}" for ext in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}, indent=1))
    load_before = load_average()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "lat.benchmark", "--child", str(spec_path)],
                              stdout=log, stderr=subprocess.STDOUT, check=False, env=_child_env())
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result_path.is_file():
        tail = log_path.read_text(errors="replace")[-4000:]
        raise CaseFailed(f"case {name!r} failed (exit status {proc.returncode}); the end of its log:\n{tail}")
    result = json.loads(result_path.read_text())
    result.update(process_wall_s=round(wall, 2), load_average_before=load_before, load_average_after=load_average())
    return result


# --------------------------------------------------------------------------- training cases (train_vae, train_ldm)


def window_rates(metrics: Path, key: str) -> list[float]:
    """The ``key`` values (images_per_sec, latents_per_sec) of a run's metrics.jsonl, in order."""
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [rec[key] for rec in lines if key in rec]


def run_training_cases(cases: dict[str, list[str]], kind: str, config: str | dict[str, str], warmup: int, scratch: Path,
                        unit: str, rounds: int = 1) -> dict[str, dict[str, Any]]:
    """Run every case's child, ``rounds`` times in alternating order; per case the pooled figures.

    ``config`` is the YAML every case loads, or case name -> its YAML (cases of different
    models side by side).

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
            case_config = config[name] if isinstance(config, dict) else config
            out = run_child(slug, {"kind": kind, "config": case_config, "overrides": cases[name],
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
        result = with_rates(result, first["flops"]["per_item"], first["items_per_step"])
        result.update(overrides=cases[name], **first)
        for key in ("peak_memory_mib", "peak_rss_mib", "cuda_max_memory_allocated_mib"):
            if key in first:
                result[key] = max(out[key] for out in outs)
        result["rounds_detail"] = [{k: out.get(k) for k in ("process_wall_s", "load_average_before", "load_average_after")}
                                   for out in outs]
        results[name] = result
    return results


# --------------------------------------------------------------------------- models


def demo_shaped_vae(resolution: int, folder: Path, overrides: list[str] = ()) -> Path:
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
