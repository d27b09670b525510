"""Sample images from a trained LatentDiffusionPipeline (U-Net or DiT) into PNG files and a grid.

  lat sample-ldm --model runs/ldm-demo/pipeline --num-images 16 --guidance-scale 2 --out runs/samples-demo
  lat sample-ldm --model runs/my-ldm/pipeline --num-images 10000 --scheduler dpm --steps 25 \\
      --class-label 3 --guidance-scale 2 --batch-size 250 --out fid/ldm

(From a checkout, scripts/sample_ldm.py takes the same arguments.)

Writes OUT/000000.png ... (one per image), OUT/grid.png (the first 64) and
OUT/sampling.json (the settings). OUT must be new or empty, or hold the samples of the
same command (rewritten); earlier samples of other settings need --overwrite. Image i of seed S draws its noise from its own
generator seeded (S, i): the same --seed gives the same files (with another
--batch-size, the same images up to float rounding).
"""

import argparse
import sys

from latent_diffusion.config import SAMPLERS

from .args import check_device, class_label


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pipeline folder (OUTPUT_DIR/pipeline of lat train-ldm) or the run's output dir")
    parser.add_argument("--num-images", type=int, required=True, help="how many images to generate")
    parser.add_argument("--out", required=True,
                        help="folder for the PNGs: new or empty (or earlier samples of the same command, rewritten)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace earlier samples of other settings in --out (other files are never removed)")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    parser.add_argument("--scheduler", choices=SAMPLERS,
                        help="for epsilon/v_prediction models ddim (eta 0), ddpm (ancestral), dpm (DPM-Solver++ 2M) "
                             "or euler; for flow models flow_euler or flow_heun; made from the pipeline's scheduler "
                             "config (default: ddim, or flow_euler for a flow model)")
    parser.add_argument("--shift", type=float, help="flow samplers only: the timestep shift (default: the saved one)")
    parser.add_argument("--class-label", type=class_label, default="cycle", metavar="K|cycle|none",
                        help="class K for every image; cycle: image i gets class i %% K (default); none: "
                             "unconditional (the null class). An unconditional model takes only cycle or none")
    parser.add_argument("--guidance-scale", type=float, default=1.0,
                        help="classifier-free guidance scale (1 = off, default; try 1.5-4)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                        help="guide only the steps whose noise level t/T (1 = pure noise) lies in [LO, HI], the "
                             "conditional prediction alone elsewhere (Kynkaanniemi et al. 2024; LightningDiT skips the "
                             "noisiest 11%%: 0 0.89). Default: every step")
    parser.add_argument("--seed", type=int, default=0, help="seed of the run (default 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from latent_diffusion.sample import sample  # heavy imports after --help

    check_device(args.device)

    try:
        result = sample(args.model, args.out, args.num_images, steps=args.steps, scheduler=args.scheduler,
                        class_label=args.class_label, guidance_scale=args.guidance_scale, seed=args.seed,
                        batch_size=args.batch_size, device=args.device, shift=args.shift, overwrite=args.overwrite,
                        guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    print(f"wrote {len(result['paths'])} images ({result['images_per_sec']:.2f} images/s) and {result['grid']}")

