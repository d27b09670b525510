"""Run plumbing shared by both stages: output dir, atomic checkpoints, metrics log.

A checkpoint is ``checkpoints/step-NNNNNNN/``: Accelerate's ``save_state`` (models in
safetensors, optimizers, GradScaler, per-process RNG) plus our ``state.json`` (step and
small scalars) and, with EMA, ``ema.safetensors``. It is written as
``checkpoints/.tmp-step-NNNNNNN`` and renamed into place once complete, so a folder named
``step-*`` is always whole; ``--resume latest`` picks the newest of those.

Nothing here pickles: Accelerate writes optimizer state with ``torch.save`` and reads it
back with ``weights_only=True``; our own files are JSON and safetensors.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DynamoBackend, GradientAccumulationPlugin, ProjectConfiguration, set_seed
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from .atomic import publish_dir, write_atomic
from .config import save_config
from .data import InfiniteSampler

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^step-(\d{7,})$")
STATE_FILE = "state.json"
EMA_FILE = "ema.safetensors"
# A checkpoint state key whose value each rank writes to its own JSON file (a stream's position).
DATA_STATE = "data_state"
DATA_STATE_FILE = "data_state/rank-{:05d}.json"
# What a run writes at the top of its output dir; --overwrite removes exactly these.
RUN_ARTIFACTS = ("checkpoints", "vae", "pipeline", "samples", "logs", "metrics.jsonl", "config.yaml")


# Settings that `accelerate launch` / `accelerate config` also make, with the environment
# variable through which the launcher passes each to the training process, and the value
# that means "the launcher was not asked for anything".
LAUNCHER_SETTINGS = {
    "mixed_precision": ("ACCELERATE_MIXED_PRECISION", "no", "--mixed_precision"),
    "gradient_accumulation_steps": ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1", "--gradient_accumulation_steps"),
    "compile": ("ACCELERATE_DYNAMO_BACKEND", "no", "--dynamo_backend"),
}
# train.report_to -> Accelerate's trackers (log_with).
TRACKERS = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"], "none": []}


def _launcher_conflicts(requested: dict[str, Any]) -> list[str]:
    """Warnings for each run-config value that overrides a different, explicit launcher setting."""
    found = []
    for key, value in requested.items():
        variable, neutral, flag = LAUNCHER_SETTINGS[key]
        launcher = os.environ.get(variable)
        if value is None or launcher is None or launcher.lower() == neutral:
            continue
        if key == "compile":
            differs = not value  # any dynamo backend compiles; ours is inductor
        elif key == "gradient_accumulation_steps":
            differs = int(launcher) != int(value)
        else:
            differs = launcher.lower() != str(value).lower()
        if differs:
            found.append(f"train.{key}={value} in the run config overrides the launcher's {flag} "
                         f"({variable}={launcher}); unset it (null) to let the launcher decide")
    return found


def build_accelerator(
    output_dir: str | os.PathLike,
    mixed_precision: str | None = None,
    gradient_accumulation_steps: int | None = None,
    compile: bool | None = None,
    report_to: str = "tensorboard",
) -> Accelerator:
    """The run's ``Accelerator``: trackers under ``output_dir/logs``, schedulers stepped by hand.

    Precedence, as in diffusers' example scripts: a setting left unset (None) comes from
    the launcher (``accelerate launch --mixed_precision bf16``, ``accelerate config``,
    passed through ``ACCELERATE_*`` environment variables), else accelerate's default
    (no, 1, no); a value given here wins, and a different explicit launcher value gets a
    warning naming both.

    Under ``torchrun`` (or any launcher that sets ``WORLD_SIZE``) on a machine without a
    GPU, accelerate only forms a multi-process (gloo) group when told ``cpu=True``;
    otherwise every process silently trains alone. We pass it, and check the result.

    Args:
        mixed_precision: ``no`` | ``fp16`` | ``bf16``, or None (the launcher's).
        gradient_accumulation_steps: >= 1, or None (the launcher's).
        compile: ``torch.compile`` (inductor) every model ``prepare`` gets, after the DDP
            wrap as PyTorch recommends (``unwrap_model`` returns the eager module); None:
            the launcher's ``--dynamo_backend``.
        report_to: ``tensorboard`` | ``wandb`` | ``all`` | ``none`` (``TRACKERS``).
    Raises:
        RuntimeError: if the launcher started N > 1 processes but accelerate formed none.
    """
    for warning in _launcher_conflicts({"mixed_precision": mixed_precision,
                                        "gradient_accumulation_steps": gradient_accumulation_steps,
                                        "compile": compile}):
        logger.warning(warning)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        cpu=world_size > 1 and not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        # A plugin, because a plain gradient_accumulation_steps= loses to the environment.
        gradient_accumulation_plugin=None if gradient_accumulation_steps is None
        else GradientAccumulationPlugin(num_steps=gradient_accumulation_steps),
        log_with=TRACKERS[report_to] or None,
        # Our schedulers step once per optimizer step by hand: accelerate would step them
        # num_processes times, assuming a dataloader it had sharded (ours shards itself).
        step_scheduler_with_optimizer=False,
        dynamo_backend=None if compile is None else ("inductor" if compile else "no"),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(Path(output_dir) / "logs")),
    )
    if world_size > 1 and accelerator.num_processes != world_size:
        raise RuntimeError(
            f"the launcher started {world_size} processes but accelerate formed a group of "
            f"{accelerator.num_processes}: each would train alone. Launch with accelerate launch "
            f"(--multi_gpu, or --cpu for CPU processes) or torchrun."
        )
    return accelerator


def resolved_launch_settings(accelerator: Accelerator) -> dict[str, Any]:
    """The mixed precision, accumulation and compile setting the accelerator really uses."""
    return {"mixed_precision": str(accelerator.mixed_precision),
            "gradient_accumulation_steps": int(accelerator.gradient_accumulation_steps),
            "compile": accelerator.state.dynamo_plugin.backend != DynamoBackend.NO}


def prepare_output_dir(output_dir: str | os.PathLike, resume: str | None, overwrite: bool) -> Path:
    """Check (and with ``overwrite`` clear) the output dir before any work.

    The folder itself is created by ``open_logs``, once everything that can fail before
    the first step has passed, so that a failed start leaves nothing behind.

    Args:
        output_dir: where the run writes.
        resume: ``None``, ``"latest"`` or a checkpoint path (``--resume``).
        overwrite: remove an earlier run's files (only the names in ``RUN_ARTIFACTS``).
    Returns:
        The output dir as a Path.
    Raises:
        FileExistsError: if the dir already holds a run and neither ``resume`` nor
            ``overwrite`` is given, so a finished run is never clobbered by accident.
    """
    out = Path(output_dir)
    existing = [name for name in RUN_ARTIFACTS if (out / name).exists()]
    if existing and resume is None:
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds a run ({', '.join(existing)}). Continue it with "
                f"--resume latest, start over with --overwrite, or choose another --output-dir."
            )
        for name in existing:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return out


def checkpoint_step(path: Path) -> int | None:
    """The step of a ``step-NNNNNNN`` checkpoint folder, else None."""
    match = CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match and (path / STATE_FILE).is_file() else None


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under ``checkpoint_dir``, oldest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if p.is_dir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """``--resume`` -> a checkpoint folder, or None to start fresh.

    ``latest`` with no checkpoint yet starts fresh (so one command serves a first launch
    and every relaunch of a preempted job) and says so.

    Raises:
        FileNotFoundError: if a given path is not a complete checkpoint folder.
    """
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir / "checkpoints")
        if not checkpoints:
            logger.warning("--resume latest: no checkpoint in %s yet; starting a new run", output_dir / "checkpoints")
            return None
        return checkpoints[-1]
    path = Path(resume)
    if checkpoint_step(path) is None:
        raise FileNotFoundError(
            f"--resume {resume}: not a complete checkpoint folder (expected checkpoints/step-NNNNNNN "
            f"holding {STATE_FILE}); complete ones here: {[str(p) for p in list_checkpoints(output_dir / 'checkpoints')]}"
        )
    return path


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    global_step: int,
    state: dict[str, Any],
    ema: Any = None,
    total_limit: int | None = None,
) -> Path:
    """Write ``checkpoints/step-NNNNNNN`` atomically; keep the newest ``total_limit``.

    Every process must call this (each saves its own RNG state).

    Args:
        state: JSON-serialisable scalars to restore (``global_step`` is added). Its
            ``DATA_STATE`` entry, if any, is this rank's own (a data stream's position:
            ``autoencoderkl.hf_data.StreamBatches.state_dict()``): every rank writes it to
            ``data_state/rank-NNNNN.json`` (``load_data_state`` reads it back) instead of
            ``state.json``.
        ema: a diffusers ``EMAModel`` or None; its shadow weights go to safetensors.
        total_limit: how many complete checkpoints to keep; None keeps all.
    Returns:
        The final checkpoint folder.
    """
    root = output_dir / "checkpoints"
    final = root / f"step-{global_step:07d}"
    tmp = root / f".tmp-step-{global_step:07d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    data_state = state.get(DATA_STATE)
    state = {k: v for k, v in state.items() if k != DATA_STATE}
    if data_state is not None:
        path = tmp / DATA_STATE_FILE.format(accelerator.process_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rank": accelerator.process_index, "num_processes": accelerator.num_processes,
                                    "state": data_state}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            ema_state = ema.state_dict()
            shadow = ema_state.pop("shadow_params")
            save_file({f"shadow.{i:05d}": t.detach().contiguous().cpu() for i, t in enumerate(shadow)}, tmp / EMA_FILE)
            state = {**state, "ema": ema_state}
        # state.json is written last: a folder holding it is complete.
        (tmp / STATE_FILE).write_text(json.dumps({**state, "global_step": global_step}, indent=2))
        # Every file fsynced, then the rename, then the parent fsynced: durable once returned.
        publish_dir(tmp, final)
        if total_limit is not None:
            for old in list_checkpoints(root)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    accelerator: Accelerator, path: Path, ema: Any = None, model_config: dict[str, Any] | None = None,
    guard: NonFiniteGuard | None = None,
) -> dict[str, Any]:
    """Restore what ``save_checkpoint`` wrote; returns ``state.json`` as a dict.

    Args:
        guard: the loop's ``NonFiniteGuard``, given its saved counts, LR scale and data offset.
        model_config: this run's model section (as saved under ``state["model"]`` by
            ``save_checkpoint`` callers); checked against the checkpoint's before any
            weight is loaded, so a mismatch reads as a config error, not a tensor-shape one.
    Raises:
        ValueError: if the checkpoint was written by a run with another model config.
        FileNotFoundError: if ``ema`` is given but the checkpoint has no EMA weights
            (it was written by a run without ``train.use_ema``).
    """
    state = json.loads((path / STATE_FILE).read_text())
    saved = state.get("model")
    if model_config is not None and saved is not None and saved != model_config:
        diff = ", ".join(f"model.{k}: checkpoint {saved.get(k)!r} vs this run {model_config.get(k)!r}"
                         for k in sorted(set(saved) | set(model_config)) if saved.get(k) != model_config.get(k))
        raise ValueError(f"{path} was written by a run with another model config ({diff}); resume with "
                         f"that run's config (its config.yaml), or start a new output dir")
    accelerator.load_state(str(path))
    if ema is not None:
        if not (path / EMA_FILE).is_file() or "ema" not in state:
            raise FileNotFoundError(f"{path} holds no EMA weights ({EMA_FILE}); it was written without train.use_ema")
        tensors = load_file(path / EMA_FILE)
        shadow = [tensors[k] for k in sorted(tensors)]
        ema.load_state_dict({**state["ema"], "shadow_params": shadow})
        ema.to(accelerator.device)
    if guard is not None:
        guard.restore(state)
    logger.info("resumed from %s at step %d", path, state["global_step"])
    return state


def load_data_state(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """This rank's data-stream position from checkpoint ``path`` (written by ``save_checkpoint``).

    Raises:
        FileNotFoundError: the checkpoint holds no position for this rank (it was written
            by a run reading another source, e.g. a folder).
        ValueError: it was written by a run of another number of processes (a stream's
            position is per rank: resume with as many processes, or start a new run).
    """
    file = path / DATA_STATE_FILE.format(accelerator.process_index)
    if not file.is_file():
        raise FileNotFoundError(f"{path} holds no data stream position for rank {accelerator.process_index} ({file}); "
                                "it was written by a run that read another data source")
    saved = json.loads(file.read_text())
    if saved["num_processes"] != accelerator.num_processes:
        raise ValueError(f"{path} was written by a run of {saved['num_processes']} processes, this one has "
                         f"{accelerator.num_processes}: each rank's stream position belongs to that split of the "
                         f"shards. Resume with {saved['num_processes']} processes, or start a new output dir.")
    return saved["state"]


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


def set_cpu_threads(accelerator: Accelerator, threads: int | None) -> int:
    """On CPU, use ``threads`` intra-op threads, or this process's share of the cores.

    Returns:
        The thread count now in force (unchanged on GPU).
    """
    if accelerator.device.type != "cpu":
        return torch.get_num_threads()
    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))  # set by torchrun
        threads = max(1, cores // local_processes)
    torch.set_num_threads(threads)
    return threads


def reduce_mean(accelerator: Accelerator, values: dict[str, float]) -> dict[str, float]:
    """Average a dict of floats over processes (every process must call it)."""
    if accelerator.num_processes == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=accelerator.device)
    t = accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.tolist()))


class TrainingStopped(Exception):
    """A run stopped early on purpose (a signal, or too many non-finite steps).

    Attributes:
        exit_code: what the entry point should exit with: 128 + signal number for a
            signal (143 for SIGTERM, 130 for SIGINT, as shells report), 1 otherwise.
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """SIGTERM/SIGINT -> a flag the training loop polls once per optimizer step.

    Preemptible clusters send SIGTERM and give a grace period; the loop then writes a
    checkpoint and stops (``TrainingStopped``) instead of dying mid-step. A second
    SIGINT (Ctrl-C twice) restores the default behaviour and interrupts at once.
    Use as a context manager; handlers are installed only in the main thread.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        logger.warning("received %s: stopping after this step with a checkpoint", signal.Signals(signum).name)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def requested(self, accelerator: Accelerator) -> int | None:
        """The signal number if any process received one, else None (all processes call).

        Accelerate's trigger (``set_trigger`` / ``check_trigger``, an all-reduced flag)
        makes every rank stop at the same step even when only one was signalled; a rank
        that received nothing itself reports SIGTERM.
        """
        if self.received is not None:
            accelerator.set_trigger()
        if accelerator.check_trigger():
            return self.received or signal.SIGTERM
        return None


def stop_message(signum: int, global_step: int, checkpoint: Path, resume_hint: str) -> TrainingStopped:
    """The exception a signalled run raises after its checkpoint is written.

    Args:
        signum: the signal received (``signal.SIGTERM`` or ``signal.SIGINT``).
        global_step: optimizer steps done, i.e. the step of ``checkpoint``.
        checkpoint: the ``checkpoints/step-NNNNNNN`` folder just written.
        resume_hint: the command to rerun (``resume_command()``); ``--resume latest`` is appended.
    Returns:
        ``TrainingStopped`` with ``exit_code`` 128 + ``signum`` (143 for SIGTERM, 130 for SIGINT).
    """
    name = signal.Signals(signum).name
    return TrainingStopped(
        f"stopped by {name} at step {global_step}; checkpoint saved to {checkpoint}. "
        f"Resume with: {resume_hint} --resume latest",
        exit_code=128 + signum,
    )


def checkpoint_or_stop(
    accelerator: Accelerator,
    stop: StopSignals,
    output_dir: Path,
    global_step: int,
    due: bool,
    state: Callable[[], dict[str, Any]],
    ema: Any = None,
    total_limit: int | None = None,
    progress: Any = None,
) -> Path | None:
    """The end of an optimizer step: a checkpoint when due; after SIGTERM/SIGINT, one and a stop.

    Every process calls this once per optimizer step (``save_checkpoint`` and
    ``StopSignals.requested`` are collective).

    Args:
        stop: the loop's ``StopSignals``.
        output_dir: the run's output dir.
        global_step: optimizer steps done.
        due: whether the checkpoint schedule wants one at this step.
        state: returns the scalars for ``state.json``; called only when a checkpoint is
            written (it may sync the device).
        ema, total_limit: as ``save_checkpoint``.
        progress: the loop's tqdm bar, closed before stopping.
    Returns:
        The checkpoint written at this step, or None.
    Raises:
        TrainingStopped: when any process received a signal, after the checkpoint of this
            step is written (``exit_code`` 128 + signal number, the resume command in the
            message); TensorBoard is flushed first (``accelerator.end_training``).
    """
    checkpoint = None
    if due:
        checkpoint = save_checkpoint(accelerator, output_dir, global_step, state(), ema, total_limit)
        logger.info("saved %s", checkpoint)
    signum = stop.requested(accelerator)
    if signum is None:
        return checkpoint
    if checkpoint is None:
        checkpoint = save_checkpoint(accelerator, output_dir, global_step, state(), ema, total_limit)
    if progress is not None:
        progress.close()
    accelerator.end_training()
    raise stop_message(signum, global_step, checkpoint, resume_command())


class NonFiniteGuard:
    """Skip optimizer steps whose gradients are NaN or inf; after K in a row, stop or roll back.

    One bad batch (a corrupt image decoded to garbage, a discriminator blow-up) should
    cost one step, not the run. A run that keeps producing non-finite values is either
    stopped with advice (``action="stop"``) or rolled back (``action="rollback"``): the
    loop reloads the newest checkpoint, lowers the learning rates and moves past the
    batches that failed (``rollback``), at most ``max_rollbacks`` times. Under DDP the
    gradients are all-reduced before their norm is taken, so every rank decides alike.

    Per optimizer step the loop calls ``check`` once per optimizer, then ``end_step``.

    Args:
        max_consecutive: K, consecutive non-finite steps that trigger ``action``.
        action: ``"stop"`` or ``"rollback"`` (``train.nonfinite_action``).
        enabled: False makes ``check`` pass everything (fp16 runs: the GradScaler skips
            overflowing steps itself); the rollback bookkeeping stays (all zero).
        max_rollbacks: rollbacks allowed; the next failure stops the run.
        lr_factor: learning rates x this at each rollback (``train.rollback_lr_factor``).
    Attributes:
        skipped: optimizer steps skipped so far in the run (``nonfinite_skips`` in metrics.jsonl).
        consecutive: non-finite steps in a row up to now.
        rollback_due: set by ``end_step`` when the loop must call ``rollback`` now.
        rollbacks: one dict per rollback done (``from_step``, ``to_step``, ``lr_scale``).
        lr_scale: product of the rollback factors applied so far (1.0 before any).
        data_offset: samples per process consumed beyond ``global_step x samples per
            step``: the batches rolled-back steps used, which are not drawn again.
    Raises:
        ValueError: on ``max_consecutive < 1`` or an unknown ``action``.
    """

    def __init__(self, max_consecutive: int, action: str = "stop", max_rollbacks: int = 0, lr_factor: float = 0.5,
                 enabled: bool = True):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        if action not in ("stop", "rollback"):
            raise ValueError(f"action must be 'stop' or 'rollback', got {action!r}")
        self.max_consecutive, self.action, self.enabled = max_consecutive, action, enabled
        self.max_rollbacks, self.lr_factor = max_rollbacks, lr_factor
        self.skipped = self.consecutive = 0
        self.rollback_due = False
        self.rollbacks: list[dict[str, Any]] = []
        self.lr_scale, self.data_offset = 1.0, 0
        self._bad: list[str] = []

    @classmethod
    def for_run(cls, train: Any) -> NonFiniteGuard:
        """The guard a run's ``train`` section (``LoopConfig``) asks for; disabled under fp16.

        fp16's GradScaler already skips overflowing steps (routinely while it calibrates
        its scale), so the guard watches fp32 and bf16 runs only.
        """
        return cls(train.max_consecutive_nonfinite, train.nonfinite_action, train.max_rollbacks,
                   train.rollback_lr_factor, enabled=train.mixed_precision != "fp16")

    def check(self, grad_norm: torch.Tensor | float, name: str) -> bool:
        """True if this optimizer's step may go ahead; False to skip it (the caller zeroes its grads).

        Args:
            grad_norm: the total gradient norm of this optimizer's parameters (any device).
            name: the model it belongs to, for messages.
        """
        if not self.enabled or bool(torch.isfinite(torch.as_tensor(grad_norm))):
            return True
        self._bad.append(f"{name} ({float(grad_norm)})")
        return False

    def end_step(self, global_step: int) -> None:
        """Close optimizer step ``global_step + 1``: count it, and act after K bad ones in a row.

        Raises:
            TrainingStopped: on the K-th consecutive non-finite step with ``action="stop"``,
                or with ``action="rollback"`` once ``max_rollbacks`` are used up.
        """
        if not self._bad:
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        bad, self._bad = ", ".join(self._bad), []
        logger.warning("step %d: non-finite gradient norm of the %s; optimizer step skipped (%d in a row)",
                       global_step + 1, bad, self.consecutive)
        if self.consecutive < self.max_consecutive:
            return
        if self.action == "rollback" and len(self.rollbacks) < self.max_rollbacks:
            self.rollback_due = True
            return
        used = f" after {len(self.rollbacks)} rollback(s) (train.max_rollbacks={self.max_rollbacks})" \
            if self.action == "rollback" else ""
        raise TrainingStopped(
            f"{self.consecutive} consecutive optimizer steps had NaN/inf gradients (up to step {global_step + 1}, "
            f"the last in the {bad})"
            f"{used}; stopping. Resume from the last checkpoint with a lower optim.lr, gradient clipping "
            f"(optim.max_grad_norm), train.mixed_precision=no or bf16, train.nonfinite_action=rollback, "
            f"or check the data for broken images."
        )

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the guard (JSON): counts, the LR scale, the data offset."""
        return {"nonfinite_skips": self.skipped, "rollbacks": self.rollbacks, "lr_scale": self.lr_scale,
                "data_offset": self.data_offset}

    def restore(self, state: dict[str, Any]) -> None:
        """Resume the counts that ``state()`` saved (missing keys: a checkpoint from before them)."""
        self.skipped = state.get("nonfinite_skips", 0)
        self.rollbacks = list(state.get("rollbacks", []))
        self.lr_scale = state.get("lr_scale", 1.0)
        self.data_offset = state.get("data_offset", 0)


def rollback(
    accelerator: Accelerator,
    output_dir: Path,
    guard: NonFiniteGuard,
    global_step: int,
    samples_per_step: int,
    optimizers: list[tuple[Any, Any]],
    metrics_log: MetricsLog,
    ema: Any = None,
    model_config: dict[str, Any] | None = None,
    window: LogWindow | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Reload the newest checkpoint after repeated NaN/inf steps, with lower learning rates.

    Weights, optimizer moments, schedulers, RNG and EMA come back from the checkpoint;
    every learning rate (optimizer and scheduler base) is multiplied so that the total
    scale is ``guard.lr_scale x guard.lr_factor`` relative to the config; the data
    stream is NOT rewound (the steps since the checkpoint consumed batches that are not
    drawn again: ``guard.data_offset`` grows, and a resume honours it). ``metrics.jsonl``
    loses the lines after the checkpoint's step (they are redone) and gains one line
    ``{"event": "rollback", ...}``. Every process calls this.

    Args:
        global_step: optimizer steps done before the step whose failure was the last straw
            (that step, ``global_step + 1``, consumed its batches too).
        samples_per_step: samples per process per optimizer step (batch x accumulation).
        optimizers: ``(optimizer, lr_scheduler)`` pairs, as prepared.
        ema, model_config: as ``load_checkpoint``.
        window: the loop's ``LogWindow``, emptied (its steps are redone).
        progress: the loop's tqdm bar, set back to the checkpoint's step.
    Returns:
        The checkpoint's ``state.json`` dict (its ``global_step`` is where the loop resumes).
    Raises:
        TrainingStopped: if there is no checkpoint to roll back to yet.
    """
    checkpoints = list_checkpoints(output_dir / "checkpoints")
    if not checkpoints:
        raise TrainingStopped(
            f"{guard.consecutive} consecutive NaN/inf steps up to step {global_step} and no checkpoint yet to roll "
            f"back to; lower optim.lr or train.checkpointing_steps and start again."
        )
    state = load_checkpoint(accelerator, checkpoints[-1], ema, model_config)
    to_step = state["global_step"]
    new_scale = guard.lr_scale * guard.lr_factor
    ratio = new_scale / state.get("lr_scale", 1.0)  # the checkpoint's rates carry its own scale
    for optimizer, scheduler in optimizers:
        for group in optimizer.param_groups:
            group["lr"] *= ratio
        inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper
        inner.base_lrs = [lr * ratio for lr in inner.base_lrs]
    guard.lr_scale = new_scale
    failed_step = global_step + 1
    guard.data_offset += (failed_step - to_step) * samples_per_step
    event = {"from_step": failed_step, "to_step": to_step, "lr_scale": new_scale}
    guard.rollbacks.append(event)
    guard.consecutive, guard.rollback_due = 0, False
    if window is not None:
        window.reset()
    if progress is not None:
        progress.n = to_step
    metrics_log.truncate(to_step)
    metrics_log.write(to_step, {"event": "rollback", "rollback": len(guard.rollbacks), **event,
                                "skipped_samples_per_process": (failed_step - to_step) * samples_per_step})
    logger.warning("rollback %d/%d: NaN/inf steps up to step %d; reloaded %s, learning rates x %.3g of the "
                   "config's, data continues past the failed batches", len(guard.rollbacks), guard.max_rollbacks,
                   failed_step, checkpoints[-1], new_scale)
    return state


def resume_command() -> str:
    """This process's command line with ``--resume`` dropped, for "resume with" messages.

    Under ``accelerate launch`` or ``torchrun`` ``sys.argv`` holds only the script and
    its arguments; the launcher is prefixed as ``accelerate launch`` (``accelerate launch
    -m lat COMMAND`` for the ``lat`` command, whose ``sys.argv[0]`` is ``"lat COMMAND"``).
    """
    program = sys.argv[0].split() if sys.argv and sys.argv[0].startswith("lat ") else sys.argv[:1]
    launch = ["accelerate", "launch", "-m"] if program[:1] == ["lat"] else ["accelerate", "launch"]
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = True
            continue
        if a.startswith("--resume="):
            continue
        args.append(a)
    return shlex.join(launch + program + args)


# ---------------------------------------------------------------- the loops' shared pieces


def start_run(
    train: Any, output_dir: str | os.PathLike, resume: str | None, overwrite: bool
) -> tuple[Accelerator, Path, Path | None]:
    """The first lines of both training loops: Accelerator, logging, threads, seed, run dir.

    Args:
        train: the run's ``train`` section (``autoencoderkl.config.LoopConfig``).
        output_dir, resume, overwrite: as the loops' ``main``.
    Returns:
        ``(accelerator, output dir, checkpoint to resume from or None)``. Every process
        is seeded with ``train.seed`` (identical initial weights); the loops reseed per
        process before their first step. ``train.mixed_precision``,
        ``gradient_accumulation_steps`` and ``compile`` hold the values in force (the
        run config's, else the launcher's, else the defaults), and are logged.
    Raises:
        FileExistsError, FileNotFoundError: from ``prepare_output_dir`` / ``resolve_resume``.
    """
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per checkpoint file is noise
    requested = {key: getattr(train, key) for key in LAUNCHER_SETTINGS}
    accelerator = build_accelerator(output_dir, report_to=train.report_to, **requested)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    # The values in force from here on, in the config the loop reads and config.yaml records.
    resolved = resolved_launch_settings(accelerator)
    for key, value in resolved.items():
        setattr(train, key, value)
    origin = {key: "run config" if requested[key] is not None
              else "launcher" if os.environ.get(LAUNCHER_SETTINGS[key][0]) else "default" for key in resolved}
    threads = set_cpu_threads(accelerator, train.cpu_threads)
    logger.info("device %s, %d process(es), %d CPU threads each; %s", accelerator.device, accelerator.num_processes,
                threads, ", ".join(f"{k} {v} ({origin[k]})" for k, v in resolved.items()))
    set_seed(train.seed)
    out = Path(output_dir)
    if accelerator.is_main_process:
        prepare_output_dir(out, resume, overwrite)
    accelerator.wait_for_everyone()
    return accelerator, out, resolve_resume(out, resume)


def open_logs(accelerator: Accelerator, cfg: Any, out: Path, notes: list[str], resume_step: int | None) -> MetricsLog:
    """Write ``config.yaml``, start the tracker (main process) and open ``metrics.jsonl``.

    Args:
        cfg: the resolved config, saved as the run's ``config.yaml`` with ``notes``.
        resume_step: the step resumed from (later lines of metrics.jsonl are dropped), or None.
    """
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)  # the first file a run writes: a run that failed earlier left none
        save_config(cfg, out / "config.yaml", notes)
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


class _Indices(torch.utils.data.Sampler):
    """``InfiniteSampler``'s ``(index, epoch)`` keys -> plain indices, for datasets without draws."""

    def __init__(self, sampler: InfiniteSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[int]:
        return (index for index, _ in self.sampler)


def infinite_batches(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    num_workers: int,
    accelerator: Accelerator,
    seed: int,
    start: int,
    keys: str = "pairs",
) -> Iterator[Any]:
    """An endless, rank-sharded, resumable stream of batches (``InfiniteSampler`` + DataLoader).

    Args:
        dataset: a map-style dataset of ``len >= num_processes``.
        batch_size: per process.
        num_workers: DataLoader worker processes (persistent when > 0).
        seed: the sampler's seed (also seeds the DataLoader's own generator).
        start: samples this process has consumed already (exact resume).
        keys: ``"pairs"`` gives the dataset ``(index, epoch)`` keys (``ImageFolder``
            draws its crop from them), ``"index"`` plain indices (``LatentDataset``).
    Returns:
        An iterator over collated batches; never ends.
    """
    sampler = InfiniteSampler(len(dataset), seed=seed, rank=accelerator.process_index,
                              world_size=accelerator.num_processes, start=start)
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler if keys == "pairs" else _Indices(sampler),
        num_workers=num_workers, pin_memory=accelerator.device.type == "cuda", drop_last=True,
        persistent_workers=num_workers > 0,
        # Its own generator: creating the iterator draws a worker seed, which must not come
        # from the global RNG that a resumed run has just restored.
        generator=torch.Generator().manual_seed(seed),
    )
    return iter(loader)


def optimizer_step(
    accelerator: Accelerator,
    optimizer: Any,
    parameters: list[torch.nn.Parameter],
    max_grad_norm: float | None,
    guard: NonFiniteGuard,
    name: str,
) -> torch.Tensor | None:
    """Unscale, clip, check and step ONE optimizer inside ``accelerator.accumulate``.

    At a synchronising micro-batch: unscale this optimizer's gradients only (fp16), take
    their global norm (clipped to ``max_grad_norm`` if given), skip the update when the
    norm is not finite (``guard``); then ``step`` and ``zero_grad``, which accelerate makes
    no-ops between synchronising micro-batches.

    ``accelerator.clip_grad_norm_`` would unscale *every* prepared optimizer: with two
    optimizers (autoencoder and discriminator) under fp16 and gradient accumulation, the
    discriminator's gradients of the earlier micro-batches were divided by the loss scale
    twice (~1/65536), training it on the last micro-batch alone.

    Args:
        optimizer: the prepared optimizer.
        parameters: the parameters it updates (those with gradients are clipped).
        max_grad_norm: clip threshold; None measures the norm only.
        guard: the loop's ``NonFiniteGuard``.
        name: the model's name for the guard's messages.
    Returns:
        The total gradient norm before clipping (a 0-d tensor), or None between
        synchronising micro-batches.
    """
    grad_norm = None
    if accelerator.sync_gradients:
        accelerator.unscale_gradients(optimizer=optimizer)
        # max_norm inf: the norm only (grads are multiplied by exactly 1.0).
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm or math.inf)
        if not guard.check(grad_norm, name):
            optimizer.zero_grad(set_to_none=True)  # Adam skips parameters without grads
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


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


def validate_and_checkpoint(
    accelerator: Accelerator,
    train: Any,
    stop: StopSignals,
    output_dir: Path,
    global_step: int,
    run_validation: Callable[[int], Any],
    checkpoint_state: Callable[[], dict[str, Any]],
    ema: Any,
    progress: Any,
    window: LogWindow,
) -> Any:
    """The end of an optimizer step in both loops: validation, then a checkpoint, when due.

    Validation runs on the main process every ``train.validation_steps`` (and at the
    last step); then ``checkpoint_or_stop`` (a checkpoint when due, or after a signal one
    and ``TrainingStopped``). Time spent here is kept out of the log window's rate when
    the window has just started. Every process calls this.

    Returns:
        What ``run_validation`` returned, or None when it did not run here.
    """
    result = None
    if due(global_step, train.validation_steps, train.max_steps):
        if accelerator.is_main_process:
            result = run_validation(global_step)
        accelerator.wait_for_everyone()
    checkpoint_or_stop(accelerator, stop, output_dir, global_step,
                       due(global_step, train.checkpointing_steps, train.max_steps), checkpoint_state, ema,
                       train.checkpoints_total_limit, progress)
    if window.steps == 0:  # keep validation and checkpoint time out of the next window's rate
        window.restart_clock()
    return result


def write_logs(
    accelerator: Accelerator, metrics_log: MetricsLog, global_step: int, logs: dict[str, float],
    guard: NonFiniteGuard,
) -> None:
    """One log line: ``logs`` plus the guard's counts (unless disabled), to metrics.jsonl and the tracker."""
    if guard.enabled:
        logs.update(nonfinite_skips=guard.skipped, rollbacks=len(guard.rollbacks))
    metrics_log.write(global_step, logs)
    accelerator.log(logs, step=global_step)


def due(step: int, every: int, last: int) -> bool:
    """Whether a periodic action (log, validation, checkpoint) happens at ``step``."""
    return step % every == 0 or step == last


@contextmanager
def ema_weights(ema: Any, model: torch.nn.Module) -> Iterator[None]:
    """Temporarily load the EMA weights into ``model`` (no-op when ``ema`` is None)."""
    if ema is None:
        yield
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield
    finally:
        ema.restore(model.parameters())


def final_weights(model: Any, ema: Any) -> Any:
    """The model to export: ``model`` itself, or a fresh copy holding the EMA weights.

    Args:
        model: a diffusers model (``from_config`` and ``config``), unwrapped.
        ema: a diffusers ``EMAModel`` or None.
    """
    if ema is None:
        return model
    copy = type(model).from_config(model.config).to(next(model.parameters()).device)
    ema.copy_to(copy.parameters())
    return copy
