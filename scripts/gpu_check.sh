#!/usr/bin/env bash
# The prepared GPU check: every CUDA path for 2 steps on both stages, then the kl-f8 benchmark.
#
#   bash scripts/gpu_check.sh [OUT_DIR]          on a machine with one CUDA GPU (about 5-8 min)
#   bash scripts/gpu_check.sh --cpu-smoke DIR    the same steps on CPU, compile and benchmark
#                                                skipped: checks the script itself (about 3 min)
#   bash scripts/gpu_check.sh --help             this text
#
# The Python it runs: $PYTHON if set, else the active virtual environment's ($VIRTUAL_ENV),
# else the one the `lat` command on PATH runs with (its #! line), else this checkout's
# .venv, else python3 on PATH. It says which, and stops (exit 2) if that one cannot
# import torch and this project, or (without --cpu-smoke) sees no CUDA device.
#
# Writes OUT_DIR/gpu_check.json: one entry per case (command, exit status, seconds, the last
# lines of its output) plus the environment, and OUT_DIR/bench_train_vae_kl-f8.json from
# lat.benchmark. Each case runs in its own process so one failure does not hide the others;
# the script exits 1 if any case failed. Run it whenever a GPU is at hand and copy the figures
# into docs/performance.md. Default OUT_DIR: $OUT (the device runner's folder) or runs/gpu-check.
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=0
out=""
while (( $# )); do
  case $1 in
    -h|--help) sed -n '2,/^set -uo pipefail/{/^set -uo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    --cpu-smoke) smoke=1 ;;
    -*) echo "gpu_check: unknown option $1 (see bash scripts/gpu_check.sh --help)" >&2; exit 2 ;;
    *) if [[ -n $out ]]; then echo "gpu_check: one OUT_DIR only, got $out and $1" >&2; exit 2; fi; out=$1 ;;
  esac
  shift
done
out=${out:-${OUT:-runs/gpu-check}}

# The project's interpreter (see the header), and where it came from.
lat_python() {  # the interpreter in the #! line of the lat command on PATH, if it is one
  local lat line
  lat=$(command -v lat) || return 1
  IFS= read -r line < "$lat" || return 1
  line=${line#\#!}
  [[ $line == /* && -x ${line%% *} && ${line%% *} == *python* ]] && echo "${line%% *}"
}
if [[ -n ${PYTHON:-} ]]; then py=$PYTHON; from="\$PYTHON"
elif [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then py=$VIRTUAL_ENV/bin/python; from="\$VIRTUAL_ENV"
elif py=$(lat_python); then from="the #! line of $(command -v lat)"
elif [[ -x .venv/bin/python ]]; then py=$PWD/.venv/bin/python; from="this checkout's .venv"
else py=$(command -v python3 || command -v python || echo python3); from="PATH"
fi
echo "gpu_check: python $py (from $from)"
if ! why=$($py -c "import torch, lat, sys; print(torch.__version__)" 2>&1); then
  echo "gpu_check: $py cannot import torch and this project: ${why##*$'\n'}; set PYTHON=/path/to/venv/bin/python" >&2
  exit 2
fi
if [[ $smoke == 0 ]] && ! why=$($py -c "
import sys, torch
if not torch.cuda.is_available():
    built = f'built for CUDA {torch.version.cuda}' if torch.version.cuda else 'a CPU-only build'
    sys.exit(f'torch {torch.__version__} ({built}) sees no CUDA device')" 2>&1); then
  echo "gpu_check: no CUDA device: $py: $why (use --cpu-smoke to check the script on a CPU)" >&2
  exit 2
fi
mkdir -p "$out"
log="$out/cases.tsv"
: > "$log"

# run NAME COMMAND...: time one case, keep its exit status and the tail of its output.
run() {
  local name=$1; shift
  local start status
  start=$(date +%s%N)
  "$@" > "$out/$name.log" 2>&1
  status=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( ($(date +%s%N) - start) / 1000000 ))" "$*" >> "$log"
  echo "gpu_check: $name: exit $status"
}

steps="train.max_steps=2 train.validation_steps=2 train.checkpointing_steps=2 train.log_steps=1"
# Stage 1 at 256 px on the demo photos (kl-f8's crop size), the GAN on from step 0.
vae_common="--config demo --overwrite $steps loss.disc_start=0 data.resolution=256 data.resize=256 data.batch_size=4"
run vae_bf16 $py -m lat train-vae $vae_common --output-dir "$out/vae-bf16" train.mixed_precision=bf16
run vae_channels_last $py -m lat train-vae $vae_common --output-dir "$out/vae-cl" train.channels_last=true
run vae_fused_tf32 $py -m lat train-vae $vae_common --output-dir "$out/vae-fused" optim.fused=true train.allow_tf32=true \
  train.mixed_precision=no
run vae_fp16 $py -m lat train-vae $vae_common --output-dir "$out/vae-fp16" train.mixed_precision=fp16 \
  train.gradient_accumulation_steps=2
if [[ $smoke == 0 ]]; then
  run vae_compile_all $py -m lat train-vae $vae_common --output-dir "$out/vae-compile" train.compile=true \
    train.mixed_precision=bf16 train.channels_last=true
fi
# Tiling: encode + decode 512 px crops of the demo's held-out photos tile by tile.
photos=$($py -c "import skimage.data, pathlib; print(pathlib.Path(skimage.data.data_dir))")
mkdir -p "$out/photos" && cp "$photos/chelsea.png" "$photos/coffee.png" "$out/photos/"
run vae_tiling $py -m lat eval-vae --vae "$out/vae-bf16" --data "$out/photos" --resolution 512 --tiling --tile-size 256 \
  --out "$out/tiling.json" --lpips off --fid off --quiet

# Stage 2 on a demo latent cache of the bf16 VAE.
run encode $py -m lat encode-latents --vae "$out/vae-bf16" --data demo --resolution 256 --out "$out/latents"
ldm_common="--config demo --latents $out/latents --overwrite $steps train.num_validation_samples=4 train.validation_inference_steps=4"
run ldm_bf16 $py -m lat train-ldm $ldm_common --output-dir "$out/ldm-bf16" train.mixed_precision=bf16
run ldm_channels_last_fused $py -m lat train-ldm $ldm_common --output-dir "$out/ldm-cl" train.channels_last=true \
  optim.fused=true train.allow_tf32=true
if [[ $smoke == 0 ]]; then
  run ldm_compile $py -m lat train-ldm $ldm_common --output-dir "$out/ldm-compile" train.compile=true \
    train.mixed_precision=bf16
fi
run sample $py -m lat sample-ldm --model "$out/ldm-bf16" --num-images 8 --steps 10 --out "$out/samples"

# Stage 2 with the transformer on the same cache: DiT (dit-demo's shape) in bf16, SiT (flow), the DiT under
# torch.compile, its DiTPipeline export sampled with guidance; SDPA: diffusers' attention processor must be
# AttnProcessor2_0 (F.scaled_dot_product_attention), checked on DiT-S/2 in bf16.
dit_common="--config dit-demo --latents $out/latents --overwrite $steps train.num_validation_samples=4 train.validation_inference_steps=4"
run dit_bf16 $py -m lat train-ldm $dit_common --output-dir "$out/dit-bf16" train.mixed_precision=bf16
run sit_bf16 $py -m lat train-ldm $dit_common --output-dir "$out/sit-bf16" train.mixed_precision=bf16 \
  noise.prediction_type=flow noise.snr_gamma=null
run dit_sample $py -m lat sample-ldm --model "$out/dit-bf16" --num-images 8 --steps 10 --class-label 0 --guidance-scale 2 \
  --out "$out/dit-samples"
if [[ $smoke == 0 ]]; then
  run dit_sdpa $py -c "
import torch; from latent_diffusion.config import load_config; from latent_diffusion.model import build_denoiser
m = build_denoiser(load_config('configs/latent_diffusion/dit-s2.yaml').model, (4, 32, 32), 1000).cuda()
assert type(m.transformer_blocks[0].attn1.processor).__name__ == 'AttnProcessor2_0', m.transformer_blocks[0].attn1.processor
with torch.autocast('cuda', torch.bfloat16):
    m(torch.randn(32, 4, 32, 32, device='cuda'), torch.randint(0, 1000, (32,), device='cuda'),
      class_labels=torch.randint(0, 1000, (32,), device='cuda')).sample.float().square().mean().backward()
print('sdpa ok, peak', torch.cuda.max_memory_allocated() // 2**20, 'MiB')"
  run dit_compile $py -m lat train-ldm $dit_common --output-dir "$out/dit-compile" train.compile=true \
    train.mixed_precision=bf16
  # U-Net small.yaml beside DiT-S/2 and DiT-B/2 on 32x32x4 latents (the 256 px cache above), bf16 + compile.
  run bench_dit $py -m lat benchmark --what train_ldm --latents "$out/latents" --config small --compare dit-s2 dit-b2 \
    --rounds 1 --repeats 3 --steps 5 --set data.batch_size=32 --out "$out/bench_train_ldm_dit.json"
fi

# The benchmark: kl-f8 (SD's VAE shape) at 256 px, bf16 (the "optimized" CUDA case) against the baseline.
if [[ $smoke == 0 ]]; then
  run bench_kl_f8 $py -m lat benchmark --what train_vae --config configs/autoencoderkl/kl-f8.yaml --baseline \
    --rounds 1 --repeats 3 --steps 5 --set data.source=demo data.resolution=256 data.resize=256 data.batch_size=8 \
    --out "$out/bench_train_vae_kl-f8.json"
fi

$py - "$out" "$smoke" <<'EOF'
import json, platform, sys
from pathlib import Path

import torch

out, smoke = Path(sys.argv[1]), sys.argv[2] == "1"
cases = []
for line in (out / "cases.tsv").read_text().splitlines():
    name, status, millis, command = line.split("\t", 3)
    tail = (out / f"{name}.log").read_text(errors="replace").splitlines()[-5:]
    cases.append({"case": name, "exit": int(status), "seconds": int(millis) / 1000, "command": command, "tail": tail})
env = {"python": platform.python_version(), "torch": torch.__version__, "cpu_smoke": smoke,
       "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
(out / "gpu_check.json").write_text(json.dumps({"environment": env, "cases": cases}, indent=2) + "\n")
failed = [c["case"] for c in cases if c["exit"]]
print(f"gpu_check: {len(cases) - len(failed)}/{len(cases)} cases passed; {out / 'gpu_check.json'}")
sys.exit(1 if failed else 0)
EOF
