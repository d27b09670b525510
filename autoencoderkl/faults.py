"""Faults, shared by both stages: stop signals, non-finite steps, rollback.

``StopSignals`` turns SIGTERM/SIGINT into a checkpoint and a clean stop
(``checkpoint_or_stop`` raises ``TrainingStopped`` with the resume command);
``NonFiniteGuard`` skips optimizer steps with NaN/inf gradients and, after K in a row,
stops the run or asks for a ``rollback`` to the newest checkpoint at a lower learning rate.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator

from .checkpoints import list_checkpoints, load_checkpoint, save_checkpoint
from .launch import resume_command
from .logs import LogWindow, MetricsLog

logger = logging.getLogger(__name__)


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
