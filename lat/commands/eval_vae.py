"""Measure an AutoencoderKL on a folder of held-out images (PSNR, SSIM, LPIPS, rFID, KL).

  lat eval-vae --vae runs/my-vae --data /data/heldout --resolution 256
  lat eval-vae --vae vae-ft-mse-840000-ema-pruned.safetensors --data /data/heldout
  lat eval-vae --vae stabilityai/sd-vae-ft-mse --data /data/heldout          (a Hub id, when online)
  lat eval-vae --vae runs/my-vae --data /data/train --latent-stats \\
      --write-config runs/my-vae/config.measured.json
  lat eval-vae --vae runs/vae-a --vae runs/vae-b --data /data/heldout --diffusability

(From a checkout, scripts/eval_vae.py takes the same arguments.) --vae takes a diffusers
folder, a training output dir (its vae/), an original single-file Stable Diffusion VAE
(.safetensors / .ckpt), or a Hugging Face Hub id. The evaluation writes the report
(--out, JSON), <stem>_per_image.csv and <stem>_worst8.png (input | reconstruction |
bicubic | difference x4) beside it. Every report sets the VAE beside bicubic down- and
up-sampling by its own factor on the same crops (the margin, and how many images the VAE
wins), and gives the mean-colour error (CIE76 Delta E of each image's mean L*a*b*
colour), flagging a colour cast above 2.3, a just-noticeable difference. --latent-stats instead measures the mean and std of posterior
samples and the scaling_factor = 1/std (and shift_factor = mean) that go with them.
--diffusability (several --vae allowed; --data may be "demo") also trains a fixed small
stage-2 model (a U-Net, or a DiT with --probe-backbone dit) on each VAE's normalised
latents and measures its held-out loss (and its ratio to the i.i.d. reference), the
latents' DCT spectra and, training-free, how the decoder renders latent midpoints (an SWD
interpolation check): report.json, report.png and a table (docs/diffusability.md). The
held-out part is split by source photo.
"""

import argparse
import json
import sys

from lat.commands.args import check_device


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", required=True, action="append",
                        help="diffusers folder, training output dir, .safetensors/.ckpt file, or Hub id (owner/name); "
                             "repeat with --diffusability")
    parser.add_argument("--vae-config", help="config.json (or its folder) for a single-file --vae whose architecture "
                                             "or scaling_factor differs from SD 1.x's (e.g. SDXL's vae/config.json)")
    parser.add_argument("--data", required=True, help="image folder, searched recursively")
    parser.add_argument("--resolution", type=int, default=256, help="centre-crop side in pixels (default 256)")
    parser.add_argument("--max-images", type=int, help="at most N images, evenly spaced over the sorted files")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    parser.add_argument("--num-workers", type=int, default=1, help="DataLoader processes decoding images (default 1)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--out", help="report path (default report.json; latent_stats.json with --latent-stats)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--tiling", action="store_true",
                        help="encode/decode in overlapping tiles (diffusers' enable_tiling): the memory of one tile, for "
                             "--resolution well above the training size. Tiles are normalised separately and blended, so "
                             "figures differ from untiled ones (about +-0.3 dB for the demo VAE at 512 px)")
    parser.add_argument("--tile-size", type=int, metavar="PX",
                        help="with --tiling: tile side in pixels (default: the VAE's sample_size, its training size)")
    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--lpips", choices=("auto", "off"), default="auto",
                    help="LPIPS (VGG) when torchvision's VGG16 weights can be had (default auto)")
    ev.add_argument("--fid", choices=("auto", "off"), default="auto",
                    help="rFID when torch-fidelity and its Inception weights are present; never downloads (default auto)")
    ev.add_argument("--inception-weights", help="path of weights-inception-2015-12-05-6726825d.pth for rFID")
    ev.add_argument("--save-reconstructions", metavar="DIR", help="also write every 8-bit reconstruction as PNG")
    st = parser.add_argument_group("latent statistics")
    st.add_argument("--latent-stats", action="store_true",
                    help="measure posterior-sample statistics and scaling_factor instead of reconstructions")
    st.add_argument("--seed", type=int, default=0, help="seed of the posterior noise, or of the probe (default 0)")
    st.add_argument("--write-config", metavar="PATH",
                    help="write a copy of the VAE's config.json with the measured scaling_factor to PATH (a new file)")
    st.add_argument("--shift-factor", action="store_true", help="with --write-config: also write shift_factor = mean")
    dg = parser.add_argument_group("diffusability (latent_diffusion.probe)")
    dg.add_argument("--diffusability", action="store_true",
                    help="also probe how easily a diffusion model learns each VAE's latents")
    dg.add_argument("--probe-backbone", choices=("unet", "dit"), default=None,
                    help="the probe's denoiser: unet (configs/latent_diffusion/probe.yaml, default) or dit (a small "
                         "DiT, probe-dit.yaml: the backbone recent VAE papers rank latents with)")
    dg.add_argument("--probe-config", help="stage-2 YAML of the probe (default: the --probe-backbone's bundled one)")
    dg.add_argument("--probe-steps", type=int, help="probe training steps (default: the probe config's)")
    dg.add_argument("--heldout-fraction", type=float, default=0.2,
                    help="share of the source photos held out, whole (default 0.2; --data demo: its 2 validation photos)")
    dg.add_argument("--source-pattern", metavar="REGEX",
                    help="regular expression naming the source photo of each image (its path relative to --data; "
                         "group 1 if any), so that crops or tiles of one photo never straddle the split, e.g. "
                         "'(.+)_\\d+\\.png$' for photo_003.png (default: every file its own photo)")
    dg.add_argument("--probe-work-dir", help="keep the crops, latent caches and probe runs here (default: removed)")
    args = parser.parse_args(argv)
    if len(args.vae) > 1 and not args.diffusability:
        parser.error("several --vae need --diffusability")
    if args.diffusability and args.latent_stats:
        parser.error("--diffusability and --latent-stats are separate runs")
    if (args.write_config or args.shift_factor) and not args.latent_stats:
        parser.error("--write-config and --shift-factor need --latent-stats")
    if args.tile_size is not None and not args.tiling:
        parser.error("--tile-size needs --tiling")
    if args.probe_backbone and not args.diffusability:
        parser.error("--probe-backbone needs --diffusability")
    if args.probe_backbone and args.probe_config:
        parser.error("--probe-backbone picks a bundled probe config; with --probe-config, set model.type in that YAML")
    return args


def main(argv=None):
    args = parse_args(argv)
    from autoencoderkl.evaluate import evaluate_vae, latent_statistics, write_config_with_latent_stats, write_json
    from autoencoderkl.model import load_vae

    check_device(args.device)
    common = dict(resolution=args.resolution, batch_size=args.batch_size, max_images=args.max_images,
                  num_workers=args.num_workers, device=args.device, progress=not args.quiet)
    try:
        if args.diffusability:
            from latent_diffusion.probe import PROBE_CONFIGS, diffusability_report, format_table

            report = diffusability_report(
                args.vae, args.data, out=args.out or "report.json",
                probe_config=args.probe_config or PROBE_CONFIGS[args.probe_backbone or "unet"],
                probe_steps=args.probe_steps, seed=args.seed, heldout_fraction=args.heldout_fraction,
                vae_config=args.vae_config, work_dir=args.probe_work_dir, lpips=args.lpips, fid=args.fid,
                source_pattern=args.source_pattern,
                inception_weights=args.inception_weights, **common)
            print(format_table(report))
            print(f"wrote {report['files']['report']}, {report['files']['png']}")
            return
        args.vae = args.vae[0]
        if args.latent_stats:
            vae = load_vae(args.vae, config=args.vae_config)
            stats = latent_statistics(vae, args.data, seed=args.seed, **common)
            stats["vae"] = args.vae
            out = args.out or "latent_stats.json"
            write_json(out, stats)
            if "batch_norm" in stats:
                bn = stats["batch_norm"]
                print(f"{stats['num_images']} images: latent mean {stats['mean']:.4f}, std {stats['std']:.4f}; this "
                      f"kl_flux2 VAE normalises with its own batch norm (no scaling_factor): normalised mean "
                      f"{bn['mean']:.4f}, std {bn['std']:.4f}")
            else:
                print(f"{stats['num_images']} images: latent mean {stats['mean']:.4f}, std {stats['std']:.4f} -> "
                      f"scaling_factor {stats['scaling_factor']:.5f} (config has {stats['config_scaling_factor']}), "
                      f"shift_factor {stats['shift_factor']:.4f}")
            print("per channel mean", json.dumps([round(v, 4) for v in stats["per_channel"]["mean"]]),
                  "std", json.dumps([round(v, 4) for v in stats["per_channel"]["std"]]))
            print(f"wrote {out}")
            if args.write_config and "batch_norm" in stats:
                sys.exit("error: --write-config: a kl_flux2 VAE's normalisation is its batch norm's running "
                         "statistics, not a scaling_factor in its config; nothing to write")
            if args.write_config:
                path = write_config_with_latent_stats(vae, stats, args.write_config, shift=args.shift_factor)
                print(f"wrote {path}")
            return
        report = evaluate_vae(args.vae, args.data, out=args.out or "report.json", lpips=args.lpips, fid=args.fid,
                              inception_weights=args.inception_weights, save_reconstructions=args.save_reconstructions,
                              vae_config=args.vae_config, tiling=args.tiling,
                              tile_size=args.tile_size, **common)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    p, s = report["psnr"], report["ssim"]
    print(f"{report['data']['num_images']} images at {report['data']['resolution']} px "
          f"({report['data']['num_skipped']} skipped, {report['data']['num_upscaled']} upscaled), "
          f"{report['run']['seconds']:.1f} s")
    print(f"PSNR {p['mean']:.2f} +- {p['std']:.2f} dB   SSIM {s['mean']:.4f} +- {s['std']:.4f}   "
          f"KL {report['kl']['mean']:.1f} nats")
    bic, vs, col = report["bicubic"], report["vs_bicubic"], report["colour"]
    n = vs["num_images"]
    print(f"bicubic x{bic['factor']}: PSNR {bic['psnr']['mean']:.2f} dB   SSIM {bic['ssim']['mean']:.4f}   "
          f"VAE margin {vs['psnr_margin']['mean']:+.2f} dB, SSIM {vs['ssim_margin']['mean']:+.4f}; "
          f"VAE wins {vs['psnr_wins']}/{n} images (PSNR), {vs['ssim_wins']}/{n} (SSIM)")
    shift, rgb_in, rgb_out = col["shift_lab"], col["input_mean_rgb"], col["reconstruction_mean_rgb"]
    print(f"colour: mean-colour error dE {col['error']['mean']:.2f} +- {col['error']['std']:.2f} "
          f"(bicubic {bic['colour_error']['mean']:.2f}); mean shift L* {shift[0]:+.1f} a* {shift[1]:+.1f} "
          f"b* {shift[2]:+.1f}; mean RGB ({', '.join(f'{v:.1f}' for v in rgb_in)}) -> "
          f"({', '.join(f'{v:.1f}' for v in rgb_out)})"
          + (f": COLOUR CAST (> {col['jnd']}, a just-noticeable difference)" if col["cast"] else ""))
    if col["chroma_gain"] != "unavailable":
        print(f"chroma: colour kept (chroma gain) {col['chroma_gain']['mean']:.2f} +- {col['chroma_gain']['std']:.2f} "
              f"(bicubic {bic['chroma_gain']['mean']:.2f}; slope of a*b* out on in, 1 = kept, 0 = grey or toned, "
              f"over {col['num_chroma_images']} coloured images)" + (": DESATURATED" if col["desaturated"] else "")
              + (": OVERSATURATED" if col["oversaturated"] else ""))
    for name in ("lpips", "rfid"):
        value = report[name]
        if value == "unavailable":
            print(f"{name.upper()}: unavailable: {report['notes'][name]}")
        else:
            base = report["bicubic"][name]
            base = base["mean"] if isinstance(base, dict) else base
            base = f"{base:.4f}" if isinstance(base, float) else base
            print(f"{name.upper()}: {value['mean'] if isinstance(value, dict) else value:.4f} (bicubic {base})")
    print(f"wrote {args.out or 'report.json'}, {report['files']['csv']}, {report['files']['worst']}")

