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
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from safetensors.torch import load_file, save_file

from .atomic import atomic_dir, publish_dir, write_atomic

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^step-(\d{7,})$")
STATE_FILE = "state.json"
EMA_FILE = "ema.safetensors"
# What a run writes at the top of its output dir; --overwrite removes exactly these.
RUN_ARTIFACTS = ("checkpoints", "vae", "pipeline", "samples", "logs", "metrics.jsonl", "config.yaml")


def build_accelerator(
    output_dir: str | os.PathLike,
    mixed_precision: str,
    gradient_accumulation_steps: int,
    compile: bool = False,
) -> Accelerator:
    """The run's ``Accelerator``: TensorBoard under ``output_dir/logs``, schedulers stepped by hand.

    Under ``torchrun`` (or any launcher that sets ``WORLD_SIZE``) on a machine without a
    GPU, accelerate only forms a multi-process (gloo) group when told ``cpu=True``;
    otherwise every process silently trains alone. We pass it, and check the result.

    Args:
        compile: ``torch.compile`` (inductor) every model ``prepare`` gets, after the DDP
            wrap as PyTorch recommends; ``unwrap_model`` returns the eager module.

    Raises:
        RuntimeError: if the launcher started N > 1 processes but accelerate formed none.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        cpu=world_size > 1 and not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with="tensorboard",
        # Our schedulers step once per optimizer step by hand: accelerate would step them
        # num_processes times, assuming a dataloader it had sharded (ours shards itself).
        step_scheduler_with_optimizer=False,
        dynamo_backend="inductor" if compile else "no",
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(Path(output_dir) / "logs")),
    )
    if world_size > 1 and accelerator.num_processes != world_size:
        raise RuntimeError(
            f"the launcher started {world_size} processes but accelerate formed a group of "
            f"{accelerator.num_processes}: each would train alone. Launch with accelerate launch "
            f"(--multi_gpu, or --cpu for CPU processes) or torchrun."
        )
    return accelerator


def prepare_output_dir(output_dir: str | os.PathLike, resume: str | None, overwrite: bool) -> Path:
    """Check (and with ``overwrite`` clear) the output dir before any work.

    Args:
        output_dir: where the run writes; created if missing.
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
    out.mkdir(parents=True, exist_ok=True)
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
        state: JSON-serialisable scalars to restore (``global_step`` is added).
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
    accelerator: Accelerator, path: Path, ema: Any = None, model_config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Restore what ``save_checkpoint`` wrote; returns ``state.json`` as a dict.

    Args:
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
    return state


class MetricsLog:
    """``metrics.jsonl``: one JSON object per log step, appended and flushed at once.

    Only the main process writes. On resume, lines after the resumed step (written by
    the interrupted run after its last checkpoint) are dropped, so each step appears once.
    """

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            write_atomic(path, "".join(line + "\n" for line in kept))

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

        The flag is all-reduced (max) so that every rank stops at the same step even when
        only one was signalled.
        """
        flag = self.received or 0
        if accelerator.num_processes > 1:
            flag = int(accelerator.reduce(torch.tensor([flag], device=accelerator.device), reduction="sum").max())
        return flag or None


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
    """Skip optimizer steps whose gradients are NaN or inf; give up after K in a row.

    One bad batch (a corrupt image decoded to garbage, a discriminator blow-up) should
    cost one step, not the run; a run that keeps producing non-finite values is broken
    and must stop with a clear message rather than train on NaNs or silently stall.
    Under DDP the gradients are all-reduced first, so every rank takes the same decision.

    Args:
        max_consecutive: K, consecutive skipped steps after which ``check`` raises.
        name: which model's gradients (for messages).
    Attributes:
        skipped: steps skipped so far in this process's run (logged as ``nonfinite_skips``).
    """

    def __init__(self, max_consecutive: int, name: str):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive, self.name = max_consecutive, name
        self.skipped = 0
        self.consecutive = 0

    def check(self, grad_norm: torch.Tensor | float, global_step: int) -> bool:
        """True if the step may go ahead; False to skip it (the caller zeroes the grads).

        Args:
            grad_norm: the total gradient norm of this optimizer step (any device).
            global_step: optimizer steps done so far (for messages).
        Raises:
            TrainingStopped: on the K-th consecutive non-finite step.
        """
        if bool(torch.isfinite(torch.as_tensor(grad_norm))):
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        logger.warning("step %d: non-finite %s gradient norm (%s); optimizer step skipped (%d in a row)",
                       global_step + 1, self.name, grad_norm, self.consecutive)
        if self.consecutive >= self.max_consecutive:
            raise TrainingStopped(
                f"{self.consecutive} consecutive optimizer steps of the {self.name} had NaN/inf gradients "
                f"(up to step {global_step + 1}); stopping. Resume from the last checkpoint with a lower "
                f"optim.lr, gradient clipping (optim.max_grad_norm), train.mixed_precision=no or bf16, "
                f"or check the data for broken images."
            )
        return False


def resume_command() -> str:
    """This process's command line with ``--resume`` dropped, for "resume with" messages.

    Under ``accelerate launch`` or ``torchrun`` ``sys.argv`` holds only the script and
    its arguments; the launcher is prefixed as ``accelerate launch``.
    """
    args, skip = [], False
    for a in sys.argv:
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = True
            continue
        if a.startswith("--resume="):
            continue
        args.append(a)
    return "accelerate launch " + shlex.join(args)


def save_pretrained_atomic(model: Any, out_dir: str | os.PathLike) -> Path:
    """``model.save_pretrained`` (safetensors) into ``out_dir``, atomically.

    For any diffusers model or pipeline. Writes a hidden temporary folder beside it, fsyncs
    it and renames it into place (``autoencoderkl.atomic.atomic_dir``), so a reader never
    sees a half-written folder; an existing ``out_dir`` is replaced.

    Returns:
        ``out_dir`` as a Path, loadable with the model's ``from_pretrained``.
    Raises:
        OSError: if the folder cannot be written; ``out_dir`` is then left as it was.
    """
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    return out
