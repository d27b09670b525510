"""What a run records, shared by both stages: metrics.jsonl, the trackers, the log window.

``open_logs`` writes the run's ``config.yaml``, starts Accelerate's trackers and prints
where the run writes (``start_message``);
``LogWindow`` averages a window of optimizer steps (every micro-batch weighted alike) and
``write_logs`` sends one line to ``metrics.jsonl`` (``MetricsLog``) and the trackers;
``log_image`` logs a PNG grid.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf
from PIL import Image

from .atomic import write_atomic
from .config import save_config
from .launch import launch_command, resume_command

if TYPE_CHECKING:
    from .faults import NonFiniteGuard


class MetricsLog:
    """``metrics.jsonl``: one JSON object per log step, appended and flushed at once.

    Only the main process writes. On resume, lines after the resumed step (written by
    the interrupted run after its last checkpoint) are dropped, so each step appears once.
    """

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None):
        self.path, self.enabled = path, enabled
        if resume_step is not None:
            self.truncate(resume_step)

    def truncate(self, step: int) -> None:
        """Drop the lines of steps after ``step`` (they are about to be redone)."""
        if self.enabled and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            write_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, step: int, values: dict[str, Any]) -> None:
        """Append ``{"step": step, "time": unix seconds, **values}``."""
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def reduce_mean(accelerator: Accelerator, values: dict[str, float]) -> dict[str, float]:
    """Average a dict of floats over processes (every process must call it)."""
    if accelerator.num_processes == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=accelerator.device)
    t = accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.tolist()))


class LogWindow:
    """Means over the optimizer steps since the last log line, for metrics.jsonl and the tracker.

    Values may be python floats or 0-d tensors (kept on the device: no sync per step).
    ``add`` weights a micro-batch's values by ``1 / gradient_accumulation_steps``, so a
    line's ``loss`` is the mean over every micro-batch of the window, in both stages.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, values: dict[str, Any], weight: float = 1.0) -> None:
        """Accumulate ``values`` x ``weight`` (``1 / accumulation`` per micro-batch)."""
        for key, value in values.items():
            value = value.detach() if isinstance(value, torch.Tensor) else float(value)
            self.sums[key] = self.sums.get(key, 0.0) + value * weight

    def end_step(self, grad_norm: torch.Tensor | None = None) -> None:
        """Count one optimizer step (and average its gradient norm, when given, as ``grad_norm``)."""
        self.steps += 1
        if grad_norm is not None:
            self.add({"grad_norm": grad_norm})

    def reset(self) -> None:
        """Forget the window (a rollback redoes its steps)."""
        self.sums, self.steps = {}, 0
        self.restart_clock()

    def restart_clock(self) -> None:
        """Keep time spent outside training steps (validation, checkpoints) out of the rate."""
        self.start = time.perf_counter()

    def emit(self, accelerator: Accelerator, items_per_step: int, rate_key: str) -> dict[str, float]:
        """The window's means (averaged over processes) and its rate; then start a new window.

        Every process calls this.

        Args:
            items_per_step: items per optimizer step over all processes.
            rate_key: the name of the rate, e.g. ``images_per_sec``.
        Returns:
            ``{key: mean over the window's steps}`` plus ``rate_key`` (items per second).
        """
        elapsed = time.perf_counter() - self.start
        steps = max(self.steps, 1)
        logs = reduce_mean(accelerator, {k: float(v) / steps for k, v in self.sums.items()})
        logs[rate_key] = self.steps * items_per_step / elapsed if elapsed > 0 else 0.0
        self.reset()
        return logs


def write_logs(
    accelerator: Accelerator, metrics_log: MetricsLog, global_step: int, logs: dict[str, float],
    guard: NonFiniteGuard,
) -> None:
    """One log line: ``logs`` plus the guard's counts (unless disabled), to metrics.jsonl and the tracker."""
    if guard.enabled:
        logs.update(nonfinite_skips=guard.skipped, rollbacks=len(guard.rollbacks))
    metrics_log.write(global_step, logs)
    accelerator.log(logs, step=global_step)


def start_message(out: Path, report_to: str, resume: str) -> str:
    """Where a run writes, where to watch its curves and how to resume it: three lines for the console.

    Args:
        out: the run's output dir.
        report_to: ``train.report_to`` (which trackers run).
        resume: the command that resumes the run, without ``--resume`` (``launch_command``).
    """
    watch = [f"tensorboard --logdir {shlex.quote(str(out / 'logs'))}"] if report_to in ("tensorboard", "all") else []
    watch += ["W&B (project $WANDB_PROJECT or latent-autoencoders)"] if report_to in ("wandb", "all") else []
    run = shlex.quote(str(out))
    watch += [f"lat inspect-vae --run {run} --out {shlex.quote(str(out / 'inspect'))} (curves.png)"]
    return (f"run folder: {out}/ (config.yaml, metrics.jsonl, samples/, checkpoints/; the export when it ends)\n"
            f"curves: {' | '.join(watch)}\n"
            f"stop: Ctrl-C or SIGTERM writes a checkpoint; resume: {resume} --resume latest")


def open_logs(accelerator: Accelerator, cfg: Any, out: Path, notes: list[str], resume_step: int | None) -> MetricsLog:
    """Write ``config.yaml``, start the tracker (main process) and open ``metrics.jsonl``.

    The main process also prints ``start_message`` once: the run folder, how to watch
    the curves, how to resume.

    Args:
        cfg: the resolved config, saved as the run's ``config.yaml`` with ``notes``.
        resume_step: the step resumed from (later lines of metrics.jsonl are dropped), or None.
    """
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)  # the first file a run writes: a run that failed earlier left none
        save_config(cfg, out / "config.yaml", notes, command=launch_command(), resume=resume_command())
        print(start_message(out, cfg.train.report_to, resume_command()), flush=True)
        flat = {key: value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
                for key, value in _flatten(OmegaConf.to_container(OmegaConf.structured(cfg)))}
        # The project groups runs in W&B (WANDB_PROJECT overrides it); the run is named after the output dir.
        accelerator.init_trackers(os.environ.get("WANDB_PROJECT", "latent-autoencoders"), config=flat,
                                  init_kwargs={"wandb": {"name": out.resolve().name, "dir": str(out)}})
    return MetricsLog(out / "metrics.jsonl", accelerator.is_main_process, resume_step)


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
    return [item for key, value in tree.items()
            for item in (_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else [(f"{prefix}{key}", value)])]


def log_image(accelerator: Accelerator, name: str, path: Path, step: int) -> None:
    """Log a PNG the run just wrote (a sample grid) to every tracker as an image.

    Args:
        name: the tracker's key, e.g. ``val/reconstructions``.
        path: an RGB PNG file.
        step: ``global_step``.
    """
    if not accelerator.trackers:
        return
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"))  # (H, W, 3) uint8
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: pixels[None]}, step=step, dataformats="NHWC")
        else:
            tracker.log_images({name: [pixels]}, step=step)
