"""Pictures of a VAE's latent space: interpolation, prior samples, latent channels, curves.

  lat inspect-vae --vae runs/my-vae --images a.png b.png --out inspect/
  lat inspect-vae --vae sd-vae.safetensors --images a.png b.png --resolution 512 --out inspect/
  lat inspect-vae --run runs/ldm-demo --out runs/ldm-demo/inspect     (curves.png alone, of either stage's run)

(From a checkout, scripts/inspect_vae.py takes the same arguments.)

Writes into --out: interpolation.png and interpolation.gif (decodes along the straight line
between the latents of the first two --images), prior_samples.png (decodes of z ~ N(0, I)
and of z ~ N(0, 1/scaling_factor^2)), latent_channels_<name>.png for every image (its
latent channels as grey images), and curves.png, the losses and validation metrics of a
training run's metrics.jsonl (when --vae or --run is a training output dir). With --run and
no --vae, only curves.png: this works for stage-2 (train-ldm) runs too.
"""

import argparse
import sys
from pathlib import Path

from lat.commands.args import check_device


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", help="diffusers folder, training output dir, or .safetensors/.ckpt file "
                                      "(without it, --run's curves.png alone)")
    parser.add_argument("--vae-config", help="config.json (or its folder) for a single-file --vae")
    parser.add_argument("--images", nargs="*", default=[], help="image files (two for the interpolation)")
    parser.add_argument("--run", help="training output dir whose metrics.jsonl to plot (default: --vae, if it is one)")
    parser.add_argument("--out", required=True, help="folder for the pictures")
    parser.add_argument("--resolution", type=int, default=256, help="centre-crop side in pixels (default 256)")
    parser.add_argument("--steps", type=int, default=8, help="decodes along the interpolation (default 8)")
    parser.add_argument("--num-prior", type=int, default=8, help="prior samples per row (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prior samples (default 0)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.vae is None:
        if args.run is None:
            sys.exit("error: give --vae (the pictures of a VAE) and/or --run (a training run's curves.png)")
        from autoencoderkl.atomic import write_atomic
        from autoencoderkl.data import png_bytes
        from autoencoderkl.visualize import plot_curves

        try:
            curves = png_bytes(plot_curves(Path(args.run) / "metrics.jsonl"))  # either stage's metrics.jsonl
        except (FileNotFoundError, ValueError) as exc:
            sys.exit(f"error: {exc}")
        Path(args.out).mkdir(parents=True, exist_ok=True)
        print(f"wrote {write_atomic(Path(args.out) / 'curves.png', curves)}")
        return
    from autoencoderkl.visualize import inspect_vae

    check_device(args.device)
    try:
        written = inspect_vae(args.vae, args.out, images=args.images, resolution=args.resolution, steps=args.steps,
                              num_prior=args.num_prior, seed=args.seed, run_dir=args.run, vae_config=args.vae_config,
                              device=args.device)
    except (FileNotFoundError, ValueError, OSError) as exc:
        sys.exit(f"error: {exc}")
    for reason in written.pop("skipped"):
        print(f"not drawn: {reason}")
    for path in written.values():
        print(f"wrote {path}")

