"""``lat``: one command for the whole toolkit, with a subcommand per task.

    lat train-vae --config demo                 # stage 1 on one process
    accelerate launch -m lat train-vae --config kl-f8 data.train_dir=/data/photos
    lat eval-vae --vae runs/vae-demo --data /data/heldout
    lat --help                                  # the subcommands

One command with subcommands (as ``accelerate``, ``hf`` and ``git`` do)
rather than nine ``lat-*`` executables: one name to remember and to put after
``accelerate launch -m`` or ``torchrun -m``, one ``--help`` that lists every task, and
nothing imported but the chosen subcommand (each ``--help`` answers in well under a
second). The ``scripts/*.py`` files of a checkout call the same functions.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from pathlib import Path

# name -> (module with main(argv), one line for `lat --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "train-vae": ("lat.commands.train_vae", "train an AutoencoderKL (stage 1; under accelerate launch for many processes)"),
    "eval-vae": ("lat.commands.eval_vae", "measure VAEs on held-out images: PSNR, SSIM, LPIPS, rFID, latent statistics"),
    "inspect-vae": ("lat.commands.inspect_vae", "pictures of a VAE's latent space and training curves"),
    "make-shards": ("lat.commands.make_shards", "turn an image folder into WebDataset tar shards (data at scale)"),
    "encode-latents": ("lat.commands.encode_latents", "encode images once into a latent cache for stage 2"),
    "train-ldm": ("lat.commands.train_ldm", "train a latent diffusion U-Net on a latent cache (stage 2)"),
    "sample-ldm": ("lat.commands.sample_ldm", "sample a trained pipeline into PNG files and a grid"),
    "eval-ldm": ("lat.commands.eval_ldm", "measure generated samples: FID/KID/precision-recall, latent FD, memorisation"),
    "benchmark": ("lat.benchmark.cli", "measure training, encoding and sampling throughput"),
}


def usage() -> str:
    """The text of ``lat --help``."""
    width = max(map(len, COMMANDS))
    lines = [__doc__.split("\n\n")[0].replace("``", ""), "", "usage: lat COMMAND [options]   (lat COMMAND --help for its options)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run ``lat COMMAND ...``: import only that command's module and call its ``main``.

    Raises:
        SystemExit: 2 with the list of commands (and a close match) for an unknown one;
            1 with one line after Ctrl-C. A command that fails removes the folders it
            created and left empty (``missing_dirs``, ``remove_empty``).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if argv else 2)
    if argv[0] == "--version":
        from importlib.metadata import version

        print(f"lat (latent-autoencoders) {version('latent-autoencoders')}")
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        sys.exit(f"lat: unknown command {name!r}{hint}\n\n{usage()}")
    sys.argv = [f"lat {name}", *rest]  # argparse's prog, and the resume hint, name the subcommand
    new_dirs = missing_dirs(rest)
    try:
        importlib.import_module(COMMANDS[name][0]).main(rest)
    except BaseException as exc:  # a failure (exit status != 0, an error, Ctrl-C): no empty folder stays behind
        if not (isinstance(exc, SystemExit) and exc.code in (0, None)):
            remove_empty(new_dirs)
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C outside a training loop (which checkpoints and stops)
            sys.exit(f"lat {name}: interrupted")  # one line, exit status 1, no traceback
        raise


def missing_dirs(argv: list[str]) -> list[Path]:
    """The paths that ``argv``'s path-like arguments name, with their parents, that do not exist yet.

    Every argument that is not a flag or a ``key=value`` override counts (``--out=DIR``
    too): a command that fails removes those of them it created and left empty
    (``remove_empty``), whatever its options are called.
    """
    found = []
    for token in argv:
        value = token.split("=", 1)[1] if token.startswith("--") and "=" in token else token
        if not value or value.startswith("-") or (not token.startswith("--") and "=" in value):
            continue
        path = Path(value)
        while path != path.parent and not path.exists():
            found.append(path)
            path = path.parent
    return found


def remove_empty(paths: list[Path]) -> None:
    """Remove each of ``paths`` that is now an empty folder, deepest first (nothing else is touched)."""
    for path in sorted(set(paths), key=lambda p: len(p.parts), reverse=True):
        try:
            path.rmdir()  # only an empty folder; a file or a folder with content stays
        except OSError:
            pass
