"""Measure what a trained LatentDiffusionPipeline generates, against its training images.

  lat eval-ldm --model runs/ldm-demo/pipeline --reference runs/latents-demo --guidance-scale 2
  lat eval-ldm --model runs/my-ldm --reference /data/photos --num-images 10000 --steps 25 \\
      --batch-size 250 --heldout /data/photos_val --out eval/my-ldm.json
  lat eval-ldm --model runs/my-ldm --reference /data/photos --samples fid/ldm   (PNGs already made)

(From a checkout, scripts/eval_ldm.py takes the same arguments.)

Generates --num-images images (default: as many as the reference has) with sample_ldm's
seeded generators into OUT_samples/ (or reads --samples DIR), then writes OUT (JSON):
FID, KID and improved precision/recall (k = 3) on torch-fidelity's InceptionV3 features
when its weights file is on this machine, FD_DINOv2 when torch.hub holds DINOv2 ViT-L/14
("unavailable" with the file and where to put it otherwise; nothing is downloaded); and
always the sliced Wasserstein distance on Laplacian-pyramid patches (ProGAN's SWD, no
weights needed) against the --heldout images (or the reference), the latent FD (the pipeline VAE's posterior means of both sets: a sanity score)
and a memorisation check (each sample's nearest reference image in pixels and in latent
space, against held-out images or leave-one-out within the reference, and against the
VAE's own round trip of the reference: what a perfect copy scores), with OUT_closest8.png
(sample | nearest reference image | |difference| x 4) and OUT_nearest.csv (per sample). --reference is a folder of images
or a latent cache (its recorded source crops are reloaded: exactly what was trained on).
"""

from __future__ import annotations

import argparse
import sys

from lat.commands.args import check_device, class_label
from latent_diffusion.config import SAMPLERS  # light: no torch or diffusers import


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pipeline folder (OUTPUT_DIR/pipeline of lat train-ldm) or the run's output dir")
    parser.add_argument("--reference", required=True, help="the training images: an image folder or the latent cache the model trained on")
    parser.add_argument("--out", default="report.json", help="the report (default report.json); files named after it go beside it")
    parser.add_argument("--num-images", type=int, help="images to generate (default: as many as the reference has)")
    parser.add_argument("--samples", help="read generated PNGs from this folder instead of generating")
    parser.add_argument("--heldout", help="held-out images (folder or latent cache) for the memorisation baseline "
                                          "(default: leave-one-out within the reference)")
    parser.add_argument("--max-reference", type=int, help="use at most this many reference images, evenly spaced")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    parser.add_argument("--scheduler", choices=SAMPLERS,
                        help="default: the model's (ddim for epsilon/v_prediction, flow_euler for flow)")
    parser.add_argument("--shift", type=float, help="flow samplers' timestep shift (default: the saved one)")
    parser.add_argument("--class-label", type=class_label, default="cycle", metavar="K|cycle|none",
                        help="class K for every image; cycle: image i gets class i %% K (default); none: the null class")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance scale (default 1: off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated images (default 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--fid", choices=("auto", "off"), default="auto", help="the Inception metrics (default auto)")
    parser.add_argument("--inception-weights", help="torch-fidelity's InceptionV3 weights file "
                                                    "(default: torch.hub's checkpoints folder)")
    parser.add_argument("--dinov2", choices=("auto", "off"), default="auto", help="FD_DINOv2 (default auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def _figure(value) -> str:
    return value if isinstance(value, str) else f"{value:.4g}"


def main(argv=None) -> None:
    args = parse_args(argv)
    from latent_diffusion.evaluate import evaluate_ldm  # heavy imports after --help

    check_device(args.device)

    try:
        report = evaluate_ldm(args.model, args.reference, out=args.out, num_images=args.num_images, samples=args.samples,
                              heldout=args.heldout, max_reference=args.max_reference, steps=args.steps,
                              scheduler=args.scheduler, shift=args.shift, class_label=args.class_label,
                              guidance_scale=args.guidance_scale, seed=args.seed, batch_size=args.batch_size,
                              device=args.device, fid=args.fid, inception_weights=args.inception_weights,
                              dinov2=args.dinov2, progress=not args.quiet)
    except (OSError, ValueError) as exc:  # a missing or unreadable file, a bad option
        sys.exit(f"error: {exc}")
    kid = report["kid"]
    mem = report["memorisation"]
    print(f"{report['samples']['num_images']} generated vs {report['reference']['num_images']} reference images")
    sw, floor = report["swd"], report["swd_floor"]
    print(f"SWD x1e3 {sw['average']:.2f} (" + ", ".join(f"{r} px {v:.2f}" for r, v in sw["levels"].items()) +
          f") vs {'held-out' if report['heldout'] else 'reference'} images"
          + (f"; floor (held-out vs reference) {floor['average']:.2f}" if floor else ""))
    print(f"FID {_figure(report['fid'])}  KID {_figure(kid if isinstance(kid, str) else kid['mean'])}  "
          f"precision {_figure(report['precision'])}  recall {_figure(report['recall'])}  "
          f"FD_DINOv2 {_figure(report['fd_dinov2'])}  latent FD {report['latent_fd']:.4g}")
    for space in ("pixel", "latent"):
        m = mem[space]
        print(f"{space} nearest-neighbour RMS: samples median {m['samples_to_train']['median']:.4g}, baseline median "
              f"{m['baseline_to_train']['median']:.4g} (ratio {m['median_ratio']:.3f}), copy floor median "
              f"{m['copy_floor']['median']:.4g}, near copies {m['near_copies']}")
    for key, figure in (("inception", report["fid"]), ("dinov2", report["fd_dinov2"])):
        if figure == "unavailable":
            print(f"{key} metrics unavailable: {report['notes'][key]}")
    print(f"wrote {args.out} and {mem['closest_png']}")


if __name__ == "__main__":
    main()
