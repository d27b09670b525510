#!/usr/bin/env python
"""Train a latent diffusion U-Net on cached latents (stage 2 of latent diffusion).

  accelerate launch scripts/train_ldm.py --config configs/latent_diffusion/demo.yaml --latents runs/latents-demo
  accelerate launch scripts/train_ldm.py --config configs/latent_diffusion/small.yaml \\
      --latents /data/latents --vae runs/my-vae/vae train.mixed_precision=bf16 --output-dir runs/my-ldm
  accelerate launch scripts/train_ldm.py --config ... --latents ... --output-dir runs/my-ldm --resume latest

The cache comes from scripts/encode_latents.py; --vae defaults to the VAE the cache
records. Options after the flags are dotted config overrides (section.key=value);
--dry-run prints the resolved config and exits. The run leaves checkpoints/, pipeline/
(a diffusers LatentDiffusionPipeline with the EMA U-Net), samples/, logs/ (TensorBoard),
metrics.jsonl and config.yaml in the output dir.
"""

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from autoencoderkl.config import valid_keys
from latent_diffusion.config import LDMConfig, load_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="config keys (override with key=value):\n  " + "\n  ".join(valid_keys(LDMConfig)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/latent_diffusion/demo.yaml")
    parser.add_argument("--latents", help="latent cache folder from encode_latents.py (sets data.latents)")
    parser.add_argument("--vae", help="the AutoencoderKL folder that made the cache (sets data.vae; "
                                      "default: the one the cache records)")
    parser.add_argument("--output-dir", help="where the run writes (default: runs/ldm-<config name>)")
    parser.add_argument("--resume", metavar="latest|PATH",
                        help="continue from the newest checkpoint in the output dir, or from a checkpoints/step-NNNNNNN folder")
    parser.add_argument("--overwrite", action="store_true", help="remove an earlier run's files in the output dir first")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=200")
    return parser.parse_intermixed_args(argv)  # key=value may come before or after the flags


def main(argv=None):
    args = parse_args(argv)
    overrides = list(args.overrides)
    overrides += [f"data.latents={args.latents}"] if args.latents else []
    overrides += [f"data.vae={args.vae}"] if args.vae else []
    try:
        cfg = load_config(args.config, overrides)
        if not cfg.data.latents:
            raise ValueError("no latent cache: give --latents DIR (made by scripts/encode_latents.py)")
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
    if args.dry_run:
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
        return
    output_dir = args.output_dir or str(Path("runs") / f"ldm-{Path(args.config).stem}")
    from latent_diffusion.train import main as train  # heavy imports only once the config is good

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
    first, last = summary["first_val_loss"], summary["last_val_loss"]
    if first is not None and last is not None:
        print(f"validation loss {first:.4f} at step 0 -> {last:.4f} at step {summary['global_step']}")
    print(f"exported {summary['pipeline_dir']}: sample it with "
          f"python scripts/sample_ldm.py --model {summary['pipeline_dir']} --num-images 16 --out SAMPLES_DIR")


if __name__ == "__main__":
    main()
