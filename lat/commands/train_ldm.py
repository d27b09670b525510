"""Train a latent diffusion model (a U-Net, or a DiT / SiT transformer) on cached latents (stage 2).

  lat train-ldm --config demo --latents runs/latents-demo
  lat train-ldm --config dit-demo --latents runs/latents-demo          (DiT; + noise.prediction_type=flow: SiT)
  accelerate launch --mixed_precision bf16 -m lat train-ldm --config small \\
      --latents /data/latents --vae runs/my-vae/vae --output-dir runs/my-ldm
  accelerate launch -m lat train-ldm --config ... --latents ... --output-dir runs/my-ldm --resume latest

(From a checkout, scripts/train_ldm.py takes the same arguments.) The cache comes from
`lat encode-latents`; --vae defaults to the VAE the cache records. Options after the
flags are dotted config overrides (section.key=value); --dry-run prints the resolved
config and exits. The run leaves checkpoints/, pipeline/ (a diffusers pipeline with the
EMA weights and a model card), samples/, logs/, metrics.jsonl and config.yaml.
"""

import argparse
import sys
from pathlib import Path

from autoencoderkl.config import keys_help
from latent_diffusion.config import LDMConfig, load_config

from .common import add_run_arguments, load_or_exit, run_training


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1] + "\n" + keys_help(LDMConfig),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, "latent_diffusion")
    parser.add_argument("--latents", help="latent cache folder from `lat encode-latents` (sets data.latents)")
    parser.add_argument("--vae", help="the AutoencoderKL folder that made the cache (sets data.vae; "
                                      "default: the one the cache records)")
    return parser.parse_intermixed_args(argv)  # key=value may come before or after the flags


def report(summary: dict) -> str:
    """What the main process prints at the end."""
    first, last, out = summary["first_val_loss"], summary["last_val_loss"], summary["export_dir"]
    loss = (f"validation loss {first:.4f} at step 0 -> {last:.4f} at step {summary['global_step']}\n"
            if first is not None and last is not None else "")
    return loss + f"exported {out}: sample it with lat sample-ldm --model {out} --num-images 16 --out SAMPLES_DIR"


def main(argv=None):
    args = parse_args(argv)
    overrides = list(args.overrides)
    overrides += [f"data.latents={args.latents}"] if args.latents else []
    overrides += [f"data.vae={args.vae}"] if args.vae else []
    cfg = load_or_exit(load_config, args.config, "latent_diffusion", overrides)
    if not cfg.data.latents:
        print("error: no latent cache: give --latents DIR (made by `lat encode-latents`)", file=sys.stderr)
        sys.exit(2)
    run_training("latent_diffusion.train", cfg, args, str(Path("runs") / f"ldm-{Path(args.config).stem}"), report)
