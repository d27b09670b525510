"""What the training commands share: config lookup, the run flags, errors and exit codes.

Only light imports at the top (argparse, the config dataclasses): ``--help`` must not
load torch, diffusers or accelerate.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Callable

from autoencoderkl.config import find_config


def add_run_arguments(parser: argparse.ArgumentParser, stage: str) -> None:
    """The flags both training commands take (the config keys come after them as key=value)."""
    parser.add_argument("--config", required=True,
                        help=f"YAML run config, or the name of a bundled one (e.g. demo: configs/{stage}/demo.yaml)")
    parser.add_argument("--output-dir", help="where the run writes (default: runs/<stage>-<config name>)")
    parser.add_argument("--resume", metavar="latest|PATH",
                        help="continue from the newest checkpoint in the output dir, or from a checkpoints/step-NNNNNNN folder")
    parser.add_argument("--overwrite", action="store_true", help="remove an earlier run's files in the output dir first")
    parser.add_argument("--push-to-hub", metavar="REPO_ID",
                        help="after training, upload the exported model (with its model card) to this Hugging Face "
                             "Hub repository (created if missing; needs `hf auth login` or HF_TOKEN)")
    parser.add_argument("--dry-run", action="store_true", help="print the output dir and the resolved config, and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=200")


def load_or_exit(load: Callable[..., Any], config: str, stage: str, overrides: list[str]) -> Any:
    """``load(path, overrides)`` of a config path or bundled name, or exit with ``error: ...`` (status 2) before any work."""
    try:
        return load(find_config(config, stage), overrides)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def print_dry_run(cfg: Any, output_dir: str) -> None:
    """``--dry-run``: the output dir (a YAML comment) and the resolved config as YAML."""
    from omegaconf import OmegaConf

    print(f"# output dir: {output_dir}")
    print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")


def run_training(module: str, cfg: Any, args: argparse.Namespace, default_output_dir: str,
                 report: Callable[[dict[str, Any]], str]) -> dict[str, Any] | None:
    """``--dry-run``, or ``module.main(cfg, output_dir, resume, overwrite)`` with failures as exit codes.

    Heavy imports happen here, after the config was found good. A user error (a bad
    folder, a run already in the output dir, a bad checkpoint) exits 1 with ``error: ...``;
    a signal or NaN/inf stop exits with ``TrainingStopped.exit_code`` (143 after SIGTERM)
    after its checkpoint. The main process prints ``report(summary)`` and any NaN
    rollbacks, and with ``--push-to-hub`` uploads the export.

    Returns:
        The training summary (every process), or None after ``--dry-run``.
    """
    output_dir = args.output_dir or default_output_dir
    if args.dry_run:
        return print_dry_run(cfg, output_dir)
    train = importlib.import_module(module).main
    from autoencoderkl.faults import TrainingStopped

    try:
        summary = train(cfg, output_dir, resume=args.resume, overwrite=args.overwrite)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except TrainingStopped as exc:  # a signal (checkpoint written) or repeated NaN/inf gradients
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    if not summary["is_main_process"]:
        return summary
    print(report(summary))
    if summary["rollbacks"]:
        print(f"{len(summary['rollbacks'])} NaN rollback(s): "
              + "; ".join(f"step {r['from_step']} -> {r['to_step']}, lr x {r['lr_scale']:g}" for r in summary["rollbacks"]))
    if args.push_to_hub:
        from autoencoderkl.hub import push_folder

        url = push_folder(summary["export_dir"], args.push_to_hub)
        print(f"pushed {summary['export_dir']} to {url}")
    return summary
