"""The training loops' shared steps, both stages: batches, one optimizer step, what is due, EMA.

``infinite_batches`` is the endless, rank-sharded, resumable batch stream;
``optimizer_step`` unscales, clips, checks and steps one optimizer;
``validate_and_checkpoint`` ends an optimizer step (validation, checkpoint, signals);
``ema_weights`` / ``final_weights`` give the EMA weights for validation and export.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from .data import InfiniteSampler
from .faults import NonFiniteGuard, StopSignals, checkpoint_or_stop
from .logs import LogWindow


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


def due(step: int, every: int, last: int) -> bool:
    """Whether a periodic action (log, validation, checkpoint) happens at ``step``."""
    return step % every == 0 or step == last


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

    ``EMAModel`` averages parameters only; the copy takes the trained model's buffers
    (e.g. ``AutoencoderKLFlux2.bn``'s running statistics) as they are.

    Args:
        model: a diffusers model (``from_config`` and ``config``), unwrapped.
        ema: a diffusers ``EMAModel`` or None.
    """
    if ema is None:
        return model
    copy = type(model).from_config(model.config).to(next(model.parameters()).device)
    ema.copy_to(copy.parameters())
    buffers = dict(model.named_buffers())
    for name, buffer in copy.named_buffers():
        buffer.copy_(buffers[name])
    return copy
