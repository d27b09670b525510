"""Argument types more than one command takes (no heavy imports: ``--help`` stays fast)."""

from __future__ import annotations

import argparse


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
