"""Encode an image folder into a latent cache for stage 2 (latent diffusion).

  accelerate launch -m lat encode-latents --vae runs/my-vae --data /data/photos --out latents/photos
  lat encode-latents --vae runs/vae-demo --data demo --resolution 64 --hflip --out latents/demo
  torchrun --nproc_per_node 2 -m lat encode-latents --vae ... --data ... --out ...   (CPU processes)
  accelerate launch -m lat encode-latents --vae runs/my-vae --data hf:webdataset \\
      --data-files '/data/shards/train-{000000..000099}.tar' --label-column cls --out latents/shards
  accelerate launch -m lat encode-latents --vae runs/my-vae --data hf:user/dataset --split train --out latents/hub

(From a checkout, scripts/encode_latents.py takes the same arguments.)

Writes LATENTS/shard-NNNNN.safetensors (posterior mean and std of every image, labels when
--data has class subfolders) and LATENTS/index.json (source paths in order, settings, the
VAE's config and weight hash, per-channel statistics, scaling_factor). Rerunning the same
command after an interruption keeps the finished shards and encodes only the rest; a
cache of other arguments needs --overwrite, and a folder of other files another --out.
"""

import argparse
import logging
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder, or a lat train-vae output dir (its vae/)")
    parser.add_argument("--data", required=True,
                        help="image folder (searched recursively; class subfolders become labels), or 'demo': "
                             "tiles of the photos scikit-image ships, labelled by photo (a folder named demo: ./demo), "
                             "or hf:DATASET: a Hugging Face datasets source read as a stream -- DATASET is a Hub name, "
                             "a local folder, or a builder (webdataset, parquet, imagefolder) with --data-files; "
                             "'hf:' alone takes the builder from the files' extension. One cache shard per input "
                             "shard (tar or parquet file); --shard-size is then unused")
    parser.add_argument("--out", required=True,
                        help="the cache folder: created, or resumed if it holds an unfinished cache of the same "
                             "arguments; a folder holding other files is refused")
    parser.add_argument("--overwrite", action="store_true",
                        help="remove a cache already in --out (made with other arguments) and encode afresh; "
                             "other files are never removed")
    parser.add_argument("--resolution", type=int, default=256,
                        help="square crop side in pixels: shorter side resized to it, centre crop (default: 256)")
    parser.add_argument("--hflip", action="store_true", help="also store each image's left-right mirror view")
    parser.add_argument("--batch-size", type=int, default=32, help="images per VAE forward, per process (default: 32)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                        help="storage dtype of the latents; the VAE runs in fp32 (default: fp32)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers decoding images, per process (default: 2)")
    parser.add_argument("--shard-size", type=int, default=256, help="images per shard file (default: 256)")
    parser.add_argument("--cpu-threads", type=int, help="intra-op threads per process on CPU (default: cores / processes)")
    hf = parser.add_argument_group("--data hf:... only (the data.* keys of data.source=hf in stage 1)")
    hf.add_argument("--data-files", nargs="+", metavar="PATTERN",
                    help="glob or brace patterns, local paths or fsspec URLs, e.g. '/data/shards/train-{000000..000099}.tar'")
    hf.add_argument("--split", default="train", help="split to encode (default: train)")
    hf.add_argument("--image-column", help="image column (default: the dataset's one Image column)")
    hf.add_argument("--label-column", help="integer or ClassLabel column stored as labels (WebDataset shards: cls)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    from latent_diffusion.encode import encode_latents  # heavy imports after --help

    try:
        index = encode_latents(
            args.vae, args.data, args.out, resolution=args.resolution, hflip=args.hflip, batch_size=args.batch_size,
            dtype=args.dtype, num_workers=args.num_workers, shard_size=args.shard_size, cpu_threads=args.cpu_threads,
            data_files=args.data_files, split=args.split, image_column=args.image_column, label_column=args.label_column,
            overwrite=args.overwrite,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    if int(os.environ.get("RANK", "0")) == 0:  # every process returns the index; one prints
        labels = f", {len(index['classes'])} classes" if "classes" in index else ""
        print(f"{args.out}: {index['num_latents']} latents {tuple(index['latent_shape'])} of {len(index['paths'])} images"
              f"{labels}, {index['num_skipped']} skipped; scaling_factor {index['scaling_factor']:.5f}")

