"""Argument types more than one command takes (no heavy imports: ``--help`` stays fast)."""

from __future__ import annotations

import argparse
import sys


def class_label(text: str) -> int | str:
    """--class-label: an integer class, or 'cycle' / 'none'.

    Raises:
        argparse.ArgumentTypeError: on anything else (argparse turns it into a usage error).
    """
    if text in ("cycle", "none"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer class, 'cycle' or 'none', got {text!r}") from None


def check_device(name: str | None) -> None:
    """``--device``: exit with one line unless it names a device torch knows and this machine has.

    Called after the heavy imports (it imports torch), before any work; None (the default:
    CUDA when available) passes.

    Raises:
        SystemExit: ``error: --device NAME: ...`` (status 1) for a name torch does not
            know (``gpu``) or a device it cannot use here (``cuda`` without a GPU).
    """
    if name is None:
        return
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        sys.exit(f"error: --device {name}: not a device name; use cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            sys.exit(f"error: --device {name}: no CUDA device on this machine (torch.cuda.is_available() is False); "
                     f"use --device cpu")
        if (device.index or 0) >= count:
            sys.exit(f"error: --device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device.type != "cpu":
        try:
            torch.empty(1, device=device)
        except (RuntimeError, AssertionError):  # a backend this build or machine lacks (mps off a Mac, ...)
            sys.exit(f"error: --device {name}: torch cannot use a {device.type} device on this machine; use --device cpu")
