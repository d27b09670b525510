"""Checkpoints, shared by both stages: written atomically, found, pruned and restored.

A checkpoint is ``checkpoints/step-NNNNNNN/``: Accelerate's ``save_state`` (models in
safetensors, optimizers, GradScaler, per-process RNG) plus our ``state.json`` (step and
small scalars), with EMA ``ema.safetensors``, and for a streamed data source one
``data_state/rank-NNNNN.json`` per process. It is written as
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
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from .atomic import publish_dir

if TYPE_CHECKING:
    from .faults import NonFiniteGuard

logger = logging.getLogger(__name__)


CHECKPOINT_RE = re.compile(r"^step-(\d{7,})$")


STATE_FILE = "state.json"


EMA_FILE = "ema.safetensors"


# A checkpoint state key whose value each rank writes to its own JSON file (a stream's position).
DATA_STATE = "data_state"


DATA_STATE_FILE = "data_state/rank-{:05d}.json"


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
