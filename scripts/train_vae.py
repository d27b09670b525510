#!/usr/bin/env python
"""Train a Stable-Diffusion-style AutoencoderKL (stage 1 of latent diffusion).

  accelerate launch scripts/train_vae.py --config configs/autoencoderkl/demo.yaml
  accelerate launch scripts/train_vae.py --config configs/autoencoderkl/kl-f8.yaml \\
      data.train_dir=/data/photos train.mixed_precision=bf16 --output-dir runs/my-vae
  accelerate launch scripts/train_vae.py --config ... --output-dir runs/my-vae --resume latest

Options after the flags are dotted config overrides (section.key=value); --dry-run prints
the resolved config and exits. The run leaves checkpoints/, vae/ (diffusers format),
samples/, logs/ (TensorBoard), metrics.jsonl and config.yaml in the output dir.
"""

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from autoencoderkl.config import load_config, valid_keys, VAEConfig


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="config keys (override with key=value):\n  " + "\n  ".join(valid_keys(VAEConfig)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/autoencoderkl/demo.yaml")
    parser.add_argument("--output-dir", help="where the run writes (default: runs/vae-<config name>)")
    parser.add_argument("--resume", metavar="latest|PATH",
                        help="continue from the newest checkpoint in the output dir, or from a checkpoints/step-NNNNNNN folder")
    parser.add_argument("--overwrite", action="store_true", help="remove an earlier run's files in the output dir first")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=200")
    return parser.parse_intermixed_args(argv)  # key=value may come before or after the flags


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
    if args.dry_run:
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
        return
    output_dir = args.output_dir or str(Path("runs") / f"vae-{Path(args.config).stem}")
    from autoencoderkl.train import main as train  # heavy imports only once the config is good

    from autoencoderkl.run import TrainingStopped

    try:
        summary = train(cfg, output_dir, resume=args.resume, overwrite=args.overwrite)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    except TrainingStopped as exc:  # a signal (checkpoint written) or repeated NaN/inf gradients
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    if not summary["is_main_process"]:
        return
    first, last = summary["first_val"], summary["last_val"]
    if first and last:
        print(f"validation PSNR {first['val/psnr']:.2f} dB at step 0 -> {last['val/psnr']:.2f} dB at step "
              f"{summary['global_step']} (SSIM {last['val/ssim']:.3f})")
    print(f"exported {summary['vae_dir']}: load it with diffusers.AutoencoderKL.from_pretrained({summary['vae_dir']!r})")


if __name__ == "__main__":
    main()
