"""The start of a run, shared by both stages: the Accelerator, the output folder, the relaunch line.

``start_run`` is the first call of both training loops: it builds the ``Accelerator``
(launcher settings vs the run config's, trackers, a gloo group for CPU processes under
torchrun), sets the CPU threads and the seed, checks the output folder (``--resume``,
``--overwrite``) and finds the checkpoint to resume from. ``launch_command`` rebuilds the
command line that relaunches the run, for messages and ``config.yaml``.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DynamoBackend, GradientAccumulationPlugin, ProjectConfiguration, set_seed

from .checkpoints import resolve_resume

logger = logging.getLogger(__name__)


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


def launched() -> bool:
    """Whether a launcher started this process: ``accelerate launch`` (it always sets
    ``ACCELERATE_MIXED_PRECISION``) or ``torchrun`` (``TORCHELASTIC_RUN_ID``)."""
    return any(name in os.environ for name in ("ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID"))


def launch_command(drop_resume: bool = False) -> str:
    """This process's command line as a user types it, to print and to record in ``config.yaml``.

    ``lat``'s ``sys.argv[0]`` is ``"lat COMMAND"`` (set by ``lat.cli``): two words, not one
    quoted program. Under a launcher the process sees only the program and its
    arguments, so ``accelerate launch -m lat COMMAND ...`` (or ``accelerate launch
    scripts/x.py ...``) stands for it; its own options (process count, precision) are not
    visible from here. Without one: ``lat COMMAND ...`` or ``python scripts/x.py ...``.

    Args:
        drop_resume: leave out ``--resume X`` (for "resume with ... --resume latest").
    """
    argv0 = sys.argv[0] if sys.argv else "python"
    is_lat = argv0.startswith("lat ")
    program = argv0.split() if is_lat else [argv0]
    if launched():
        prefix = ["accelerate", "launch", "-m"] if is_lat else ["accelerate", "launch"]
    else:
        prefix = [] if is_lat else ["python"]
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if drop_resume and a == "--resume":
            skip = True
            continue
        if drop_resume and a.startswith("--resume="):
            continue
        args.append(a)
    return shlex.join(prefix + program + args)


def resume_command() -> str:
    """``launch_command`` without ``--resume``: what a "resume with" message appends ``--resume latest`` to."""
    return launch_command(drop_resume=True)


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
