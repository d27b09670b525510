"""Measure throughput: warm-up, then the median and spread over repeats, into a JSON file.

  lat benchmark --what train_vae --baseline --out bench.json
  lat benchmark --what train_ldm --baseline
  lat benchmark --what sample --baseline
  lat benchmark --what vae_tiling
  lat benchmark --what encode --vae runs/vae-demo/vae --data /data/photos --resolution 128
  lat benchmark --what startup --num-images 100000

(From a checkout, scripts/benchmark.py takes the same arguments.)

Every --what prints a table at the end (one row per case: items/s as the median of the
timed repeats with the min-max range, steps/s, model GFLOP per item, the TFLOP/s that
achieves, peak memory, and the speed-up over the reference case) and --out writes all of
it as JSON: every repeat's figure, the config overrides of each case, FLOPs, peak memory,
and the environment (device, dtype, threads, library versions, load average before and
after), so figures from different machines and moments can be told apart. FLOPs are
torch.utils.flop_counter's: matrix multiplications, convolutions and attention, one
multiply-add = 2 FLOPs, forward and backward as executed (norms and pointwise ops are not
counted; a recomputed forward, with gradient checkpointing, is). Peak memory is the
resident set (ru_maxrss) of the process doing the work on CPU, or
torch.cuda.max_memory_allocated on CUDA.

--what train_vae: optimizer steps of the REAL stage-1 loop (autoencoderkl.train.main), one
  fresh process per case (isolating peak memory, compile caches and global flags), on
  --config (default configs/autoencoderkl/demo.yaml) with train.max_steps = (warmup +
  repeats) x steps, train.log_steps = steps, and validation and checkpoint only at the
  end. The loop logs images/s per window of --steps steps to metrics.jsonl: the first
  --warmup windows (compilation, allocator) are dropped, the rest are the repeats. The
  step measured is the FULL one: loss.disc_start=0, so every step runs the generator
  (L1/L2 + LPIPS + PatchGAN term with the adaptive weight) and the discriminator update.
  Without the VGG16 weights in the torchvision cache LPIPS gets a random backbone
  (loss.perceptual_pretrained=false: the same FLOPs). FLOPs: one step's forward and
  backward passes on the trained modules, per image.
--what train_ldm: the same for the real stage-2 loop (latent_diffusion.train.main, --config
  default configs/latent_diffusion/demo.yaml) on a latent cache: --latents DIR, or one
  built first (untimed) from --data (default: the demo tiles) at --resolution (default
  64) with --vae (default: a random demo-shaped VAE). Then, in this process, the two
  kinds of step alternate repeat by repeat: a U-Net step on cached latents vs a U-Net
  step that crops and encodes the images every step (as diffusers' example scripts do;
  decoded images stay in memory for up to 1000 files), same U-Net, AdamW, loss and
  --steps steps per call; their steps/s ratio is what the cache buys. With --compare
  CONFIG ..., each of those configs (a U-Net or a DiT: e.g. small dit-s2 dit-b2) runs too,
  as one more case on the same cache with the same switches, batch and steps, and the
  cache comparison is left out: models side by side at one latent shape (GFLOP per
  latent from the counter below, parameters listed under the table).
--what sample: images/s of LatentDiffusionPipeline(batch_size=B, num_inference_steps=
  --steps (default 50)): --model DIR, or a random pipeline of the demo's shape (the
  demo-shaped VAE, a U-Net from --config's model section, the objective's default sampler:
  DDIM, or FlowMatch Euler with --set noise.prediction_type=flow noise.snr_gamma=null).
  FLOPs per image: the U-Net calls plus the decode.
--what vae_tiling: one image of --resolution px (default 512 on CPU, 1024 on CUDA; a demo
  photo upscaled) through encode + decode of --vae (default: random, demo-shaped), each
  case in its own process: plain, vae.enable_tiling() (tiles of --tile-size px, default
  the VAE's sample_size, overlapping by a quarter and blended), plain with a batch of 2,
  and vae.enable_slicing() with a batch of 2. Reports s/image, peak memory (and what the
  work added to it), how far the tiled (and sliced) reconstruction lies from the plain
  one (tiles are normalised apart and blended, so not exactly), and each one's 8-bit
  PSNR against the input. A random VAE's differences mean little: pass --vae.
--what encode: images/s of the real encode_latents path (files -> DataLoader workers ->
  VAE -> shard files, a fresh cache each repeat, worker start-up included) next to the
  VAE's pure encode on in-memory tensors of the same size, batch and thread count. The
  image files are read once first (page cache), and two batches go through the VAE as
  warm-up; the two cases alternate repeat by repeat, so a load that comes and goes (a
  shared machine) hits both alike.
--shards (with --what train_vae or encode, and --data FOLDER): the folder's images are
  also written as WebDataset tar shards (make_shards, untimed) and read as a stream
  (data.source=hf, shuffle_buffer 0; encode: --data hf:webdataset); the two run side by
  side (train_vae: cases "folder" and "shards" in alternating rounds; encode: alternating
  repeats) and the table gives shards / folder.
--alignment (with --what train_vae): two cases, the optimized one with VA-VAE's alignment
  loss off and on (loss.alignment_weight 0 vs the config's, else 0.1; teacher --teacher or
  the config's, an uncached DINOv2 Hub id replaced by a random stand-in of its shape). The
  table gives on / off; the "alignment on" case also times the teacher's forward alone on
  one batch (after its run, in its process) and reports its share of the step's time and
  FLOPs (the rest of the extra cost is the projection, the loss and the adaptive weight's
  gradient through the decoder and LPIPS).
--what startup: seconds (and microseconds per file) that building the stage-1 training
  data costs each rank before the first step: list_images on the folder, the header
  check of every file that ImageFolder(train=True) construction used to do, that
  construction now (lazy: one header), and pickling + unpickling the list as
  broadcast_paths sends it to the other ranks. Files: --data FOLDER, or --num-images
  (default 100000) synthetic ones (hard links to 16 tiny PNGs); warm page cache.

Cases (train_vae, train_ldm, sample): "optimized" always: the config plus the fast paths
that pay off on this device (table below; the JSON records the overrides); "baseline"
with --baseline: every fast path off (fp32, eager, NCHW, unfused optimizer, no
DataLoader workers, three backward passes through LPIPS and the discriminator); with
--ablate, one more case per switch: optimized with that one switch flipped (switches
without effect on the device, such as TF32 or the fused optimizer on a CPU, are skipped).
--set key=value overrides apply to every case, last.

  stage 1 (train_vae)     baseline value                optimized on CPU     on CUDA
  train.mixed_precision   no                            no (no bf16 units)   bf16
  train.channels_last     false                         true                 true
  train.compile           false                         false (2x slower)    true
  train.allow_tf32        false                         (no effect)          true
  optim.fused             false                         (no effect)          true
  data.num_workers        0                             the config's         max(config, 4)
  loss.shared_backward    false (3 backward passes)     true                 true
  stage 2 (train_ldm): the same train.*/optim.* switches and data.num_workers; optimized
  on CPU: none of them (--ablate tries channels_last); on CUDA: bf16, channels_last,
  compile, TF32, fused.
  sample: baseline fp32, eager, NCHW; optimized on CPU channels_last (U-Net and VAE), on
  CUDA bf16 + channels_last + torch.compile(unet).

Switches a config does not know yet (an older checkout) are left out and listed under
"switches_unavailable" in the JSON.

Cases run one after another (train_vae, train_ldm, vae_tiling: a process each), so a
machine shared with other work can skew them unequally. train_vae and train_ldm therefore
run --rounds (2) rounds of processes in alternating order (A B, then B A) and pool the
timed windows; compare the load averages recorded with each case and round, and rerun if
one looks skewed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from autoencoderkl.atomic import write_atomic

from .harness import CaseFailed, load_average

# --what -> its function (module of lat.benchmark, name); a case process's spec "kind" ->
# its function. Imported only when used, so that --help does not load torch.
WHAT = {"encode": ("encode", "bench_encode"), "train_vae": ("train_vae", "bench_train_vae"),
        "train_ldm": ("train_ldm", "bench_train_ldm"), "sample": ("sample", "bench_sample"),
        "vae_tiling": ("vae_tiling", "bench_vae_tiling"), "startup": ("startup", "bench_startup")}
CHILDREN = {"train_vae": ("train_vae", "child_train_vae"), "train_ldm": ("train_ldm", "child_train_ldm"),
            "vae_tiling": ("vae_tiling", "child_vae_tiling")}


def _function(table: dict[str, tuple[str, str]], key: str) -> Callable[..., Any]:
    module, name = table[key]
    return getattr(importlib.import_module(f"lat.benchmark.{module}"), name)


def child_main(spec_path: str) -> None:
    """Entry point of a case's process: run ``spec["kind"]``, write its result JSON."""
    spec = json.loads(Path(spec_path).read_text())
    result = _function(CHILDREN, spec["kind"])(spec)
    write_atomic(spec["result"], json.dumps(result, indent=1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; the module docstring is the ``--help`` text."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=sorted(WHAT), default="encode", help="what to measure (default: encode)")
    parser.add_argument("--out", help="write the figures as JSON here (e.g. bench.json)")
    parser.add_argument("--config",
                        help="run config: train_vae (default configs/autoencoderkl/demo.yaml); train_ldm and sample "
                             "(default configs/latent_diffusion/demo.yaml; sample takes its model section)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides for every case, applied last (train_vae, train_ldm, sample: that "
                             "config; encode, vae_tiling: the random demo-shaped VAE's model.* keys)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="train_vae, train_ldm: run the cases' processes this many times, alternating the order "
                             "(A B, B A, ...), and pool their timed windows: a shared machine's drifting speed then "
                             "hits every case alike (default: 2)")
    parser.add_argument("--baseline", action="store_true",
                        help="also run the baseline case: every fast path off (train_vae, train_ldm, sample)")
    parser.add_argument("--ablate", action="store_true",
                        help="also run optimized with one switch flipped, a case per switch (train_vae, train_ldm, sample)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed warm-up first: train_vae/train_ldm windows of --steps steps; other --what calls "
                             "(encode: 2 batches through the VAE) (default: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each case; the median is reported (default: 3)")
    parser.add_argument("--steps", type=int,
                        help="train_vae/train_ldm: optimizer steps per timed window (default 4 / 10); sample: sampler "
                             "steps (default 50)")
    parser.add_argument("--resolution", type=int,
                        help="image side in pixels (default: encode, train_ldm's cache, sample 64; train_vae the "
                             "config's; vae_tiling 512 on CPU, 1024 on CUDA)")
    parser.add_argument("--batch-size", type=int,
                        help="images per step or call (default: encode 32; train_vae/train_ldm the config's; sample 8; "
                             "vae_tiling 1, and 2 for the batched cases)")
    parser.add_argument("--cpu-threads", type=int,
                        help="intra-op threads on CPU for encode, sample, vae_tiling and train_ldm's in-process "
                             "comparison (default: the config's train.cpu_threads where it sets one (the stage-2 demo: "
                             "1), else all cores; the training loops always use the config's, see --set)")
    enc = parser.add_argument_group("data and models (the --what each applies to is named)")
    enc.add_argument("--vae", help="encode, train_ldm (its cache), vae_tiling: AutoencoderKL folder (default: a random one "
                                    "shaped like configs/autoencoderkl/demo.yaml)")
    enc.add_argument("--data", default="demo", help="encode, train_ldm (its cache), startup, train_vae: image folder, or "
                                                    "'demo' (default: demo; startup: synthetic files; train_vae: the "
                                                    "config's data)")
    enc.add_argument("--shards", action="store_true",
                     help="train_vae, encode: also the same images as WebDataset shards (make_shards, untimed), "
                          "streamed through datasets side by side with the folder; reports shards / folder")
    enc.add_argument("--alignment", action="store_true",
                     help="train_vae: the cases 'alignment off' and 'alignment on' (VA-VAE's loss with the config's "
                          "weight, else 0.1), otherwise the optimized case; reports on / off and the teacher's share")
    enc.add_argument("--teacher", help="train_vae --alignment: the teacher (default: the config's "
                                       "loss.alignment_teacher; an uncached DINOv2 Hub id becomes stand-in:ID, a random "
                                       "model of its shape: the same FLOPs)")
    enc.add_argument("--num-images", type=int, help="encode, startup: only the first N images of --data (default: all; "
                                                     "startup's synthetic files: 100000)")
    enc.add_argument("--hflip", action="store_true", help="encode: also encode mirror views")
    enc.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="encode: latent storage dtype (default: fp32)")
    enc.add_argument("--num-workers", type=int, default=2,
                     help="encode, and building train_ldm's cache: DataLoader workers (default: 2)")
    enc.add_argument("--shard-size", type=int, default=256, help="encode: images per shard (default: 256)")
    enc.add_argument("--latents", help="train_ldm: an existing latent cache (default: build one from --data)")
    enc.add_argument("--compare", nargs="+", default=[], metavar="CONFIG",
                     help="train_ldm: more stage-2 configs (paths or bundled names: small, dit-s2, ...) to run as cases "
                          "beside --config on the same cache")
    enc.add_argument("--model", help="sample: a trained pipeline folder (default: a random demo-shaped pipeline)")
    enc.add_argument("--tile-size", type=int, help="vae_tiling: tile side in pixels (default: the VAE's sample_size)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one case from a spec file
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--repeats and --rounds must be >= 1 and --warmup >= 0")
    for name in ("steps", "resolution", "batch_size", "cpu_threads", "tile_size", "num_images"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.what in ("train_vae", "train_ldm") and args.warmup < 1:
        parser.error(f"--what {args.what} needs --warmup >= 1: the first window includes start-up and compilation")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run ``--what`` (or, with ``--child``, one case's process) and write ``--out``.

    Raises:
        SystemExit: ``error: ...`` on a missing file, a bad value or a failed case process.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return
    with tempfile.TemporaryDirectory(prefix="benchmark-") as tmp:
        try:
            report = {"what": args.what, "command": " ".join(["benchmark.py", *argv]),
                      **_function(WHAT, args.what)(args, Path(tmp))}
        except (FileNotFoundError, ValueError, CaseFailed) as exc:
            sys.exit(f"error: {exc}")
    report["environment"]["load_average_after"] = load_average()
    if args.out:
        write_atomic(args.out, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
