"""Train a Stable-Diffusion-style AutoencoderKL (stage 1 of latent diffusion).

  lat train-vae --config demo                                   (one process)
  accelerate launch -m lat train-vae --config demo              (the launcher's processes)
  accelerate launch --mixed_precision bf16 -m lat train-vae --config kl-f8 \\
      data.train_dir=/data/photos --output-dir runs/my-vae
  accelerate launch -m lat train-vae --config ... --output-dir runs/my-vae --resume latest

(From a checkout, scripts/train_vae.py takes the same arguments.) --config takes a YAML
file or a bundled config's name (demo, kl-f8, ...). Options after the flags are dotted
config overrides (section.key=value); --dry-run prints the resolved config and exits. The
run leaves checkpoints/, vae/ (diffusers format, with a model card), samples/, logs/,
metrics.jsonl and config.yaml in the output dir.
"""

import argparse
from pathlib import Path

from autoencoderkl.config import VAEConfig, keys_help, load_config

from .common import add_run_arguments, load_or_exit, run_training


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1] + "\n" + keys_help(VAEConfig),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, "autoencoderkl")
    return parser.parse_intermixed_args(argv)  # key=value may come before or after the flags


def report(summary: dict) -> str:
    """What the main process prints at the end."""
    first, last, out = summary["first_val"], summary["last_val"], summary["export_dir"]
    psnr = (f"validation PSNR {first['val/psnr']:.2f} dB at step 0 -> {last['val/psnr']:.2f} dB at step "
            f"{summary['global_step']} (SSIM {last['val/ssim']:.3f})\n") if first and last else ""
    return psnr + f"exported {out}: load it with diffusers.{type(summary['vae']).__name__}.from_pretrained({out!r})"


def main(argv=None):
    args = parse_args(argv)
    cfg = load_or_exit(load_config, args.config, "autoencoderkl", args.overrides)
    run_training("autoencoderkl.train", cfg, args, str(Path("runs") / f"vae-{Path(args.config).stem}"), report)
