"""The habits of diffusers / Accelerate / Hub users: launcher settings, trackers, exports, the lat command."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import latent_diffusion.train as ldm_train
from autoencoderkl.config import load_config
from autoencoderkl.launch import start_run
from autoencoderkl.train import main as train_vae
from conftest import tiny_overrides
from latent_diffusion.config import load_config as load_ldm_config
from test_ldm import cache, overrides  # noqa: F401  (cache is a fixture)

REPO = Path(__file__).resolve().parents[1]


# --- Precedence: the launcher decides what the run config leaves unset -----------------

def test_launcher_mixed_precision_reaches_the_accelerator_when_the_config_leaves_it_unset(photo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "3")
    cfg = load_config(None, tiny_overrides(photo_dir))
    assert cfg.train.mixed_precision is None and cfg.train.gradient_accumulation_steps is None
    accelerator, _, _ = start_run(cfg.train, tmp_path / "run", None, False)
    assert accelerator.mixed_precision == "bf16" and accelerator.gradient_accumulation_steps == 3
    # The values in force are what the loop reads and config.yaml records.
    assert (cfg.train.mixed_precision, cfg.train.gradient_accumulation_steps, cfg.train.compile) == ("bf16", 3, False)


def test_a_run_config_value_wins_over_the_launcher_with_a_warning_naming_both(photo_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "3")
    cfg = load_config(None, tiny_overrides(photo_dir, **{"train.mixed_precision": "no",
                                                        "train.gradient_accumulation_steps": 2}))
    with caplog.at_level(logging.WARNING):
        accelerator, _, _ = start_run(cfg.train, tmp_path / "run", None, False)
    assert accelerator.mixed_precision == "no" and accelerator.gradient_accumulation_steps == 2
    text = caplog.text
    assert "train.mixed_precision=no in the run config overrides the launcher's --mixed_precision " \
           "(ACCELERATE_MIXED_PRECISION=bf16)" in text
    assert "train.gradient_accumulation_steps=2" in text and "ACCELERATE_GRADIENT_ACCUMULATION_STEPS=3" in text


# --- A failed start leaves nothing behind ---------------------------------------------

def test_a_missing_data_folder_fails_before_any_model_and_leaves_no_output_dir(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr("autoencoderkl.train.build_vae", lambda *a, **k: built.append(1))
    cfg = load_config(None, tiny_overrides(tmp_path / "no-such-folder"))
    with pytest.raises(FileNotFoundError, match="no-such-folder does not exist"):
        train_vae(cfg, tmp_path / "run")
    assert not built and not (tmp_path / "run").exists()


def test_a_stage2_run_without_its_cache_leaves_no_output_dir(cache, tmp_path):  # noqa: F811
    cfg = load_ldm_config(None, overrides(cache, **{"data.latents": str(tmp_path / "missing")}))
    with pytest.raises(FileNotFoundError, match=r"^no latent cache at /\S+/missing: /\S+/missing/index\.json does not "
                                                r"exist; create one with `lat encode-latents`$"):
        ldm_train.main(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --- Trackers ---------------------------------------------------------------------------

def test_wandb_offline_run_writes_its_files_with_metrics_and_grids(photo_dir, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train_vae(load_config(None, tiny_overrides(photo_dir, **{"train.report_to": "all", "train.max_steps": 2})), out)
    wandb.teardown()  # a command's process exit does this: the wandb service flushes the run file
    [run_dir] = (out / "wandb").glob("offline-run-*")
    [events] = run_dir.glob("run-*.wandb")
    data = events.read_bytes()
    assert b"rec_loss" in data and b"val/psnr" in data  # the metrics went to W&B
    assert list(run_dir.rglob("media/images/val/reconstructions*.png")), "sample grids were not logged as images"
    assert list((out / "logs").rglob("events.out.tfevents.*")), "report_to=all keeps TensorBoard too"


def test_wandb_without_the_package_is_a_clear_error_naming_the_extra(photo_dir, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r'needs the wandb package: pip install -e "\.\[wandb\]"'):
        load_config(None, tiny_overrides(photo_dir, **{"train.report_to": "wandb"}))


# --- Hub-ready exports -----------------------------------------------------------------

# Loads the pipeline with plain diffusers in a process where importing this project fails.
PLAIN_DIFFUSERS = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("autoencoderkl", "latent_diffusion", "lat"):
                raise ImportError("this project is not importable here: " + name)
    sys.meta_path.insert(0, Block())
    import torch
    from diffusers import DiffusionPipeline
    torch.set_num_threads(int(sys.argv[3]))  # the caller's: float sums then agree to the bit
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    images = pipe(batch_size=2, num_inference_steps=3, class_labels=[0, 1], guidance_scale=2.0,
                  generator=gens, output_type="pt").images
    torch.save(images, sys.argv[2])
    print(type(pipe).__name__, type(pipe).__module__)
""")


def test_pipeline_folder_has_a_card_and_loads_in_plain_diffusers_without_this_package(cache, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    summary = ldm_train.main(load_ldm_config(None, overrides(cache, **{"train.max_steps": 2})), out)
    pipe_dir = Path(summary["export_dir"])
    card = (pipe_dir / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "diffusers" and "latent-diffusion" in meta["tags"]
    assert "trust_remote_code=True" in card and "epsilon" in card
    assert json.loads((pipe_dir / "model_index.json").read_text())["_class_name"] == ["pipeline", "LatentDiffusionPipeline"]

    script = tmp_path / "plain.py"
    script.write_text(PLAIN_DIFFUSERS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(script), str(pipe_dir), str(tmp_path / "plain.pt"),
                           str(torch.get_num_threads())], cwd=tmp_path,
                          capture_output=True, text=True, timeout=180, env={**env, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[0] == "LatentDiffusionPipeline"
    from latent_diffusion.export import load_pipeline

    ours = load_pipeline(pipe_dir)
    assert type(ours).__module__ == "latent_diffusion.pipeline"  # our class, not the folder's copy
    want = ours(batch_size=2, num_inference_steps=3, class_labels=[0, 1], guidance_scale=2.0,
                generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="pt").images
    assert torch.equal(torch.load(tmp_path / "plain.pt", weights_only=True), want)


def test_vae_card_records_the_measured_psnr_and_push_to_hub_uploads_the_folder(photo_dir, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw))
                        or f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw["repo_id"],
                                                                                     sorted(os.listdir(kw["folder_path"])))))
    from lat.commands.train_vae import main as command

    out = tmp_path / "run"
    command(["--config", "demo", "--output-dir", str(out), "--push-to-hub", "me/my-vae",
             *tiny_overrides(photo_dir, **{"train.max_steps": 2})])
    card = (out / "vae" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "diffusers" and sorted(meta["metrics"]) == ["psnr", "ssim"]
    psnr = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val/psnr" in line][-1]
    assert f"{psnr['val/psnr']:.2f} dB PSNR" in card
    assert calls[0][:2] == ("create", "me/my-vae")
    assert calls[1] == ("upload", "me/my-vae", ["README.md", "config.json", "diffusion_pytorch_model.safetensors"])


def test_a_hub_id_offline_says_so_and_how_to_download_it(monkeypatch):
    from autoencoderkl.model import load_vae

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"this machine is offline .*hf download stabilityai/sd-vae-ft-mse"):
        load_vae("stabilityai/sd-vae-ft-mse")


# --- The lat command --------------------------------------------------------------------

def lat(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lat", *args], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_lat_lists_its_commands_and_suggests_a_close_one():
    listing = lat("--help")
    assert listing.returncode == 0
    for name in ("train-vae", "eval-vae", "encode-latents", "train-ldm", "sample-ldm", "benchmark"):
        assert f"  {name} " in listing.stdout
    typo = lat("train-vea")
    assert typo.returncode != 0 and "did you mean train-vae?" in typo.stderr


def test_train_vae_help_shows_every_key_with_its_default_and_meaning_without_loading_torch():
    proc = lat("train-vae", "--help", env={"PYTHONPROFILEIMPORTTIME": ""})
    assert proc.returncode == 0
    assert "  loss.kl_weight = 1e-06\n      x KL summed over (c, h, w), mean over batch" in proc.stdout
    assert "  train.mixed_precision = null" in proc.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys; from lat.commands import train_vae, sample_ldm, train_ldm, "
                            "eval_vae, eval_ldm, encode_latents, make_shards, inspect_vae; import lat.benchmark.cli; "
                            "print(sorted({'torch', 'diffusers', 'accelerate'} & set(sys.modules)))"],
                           capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert probe.stdout.strip() == "[]", "--help must not import the heavy libraries"


def test_config_takes_a_bundled_name_and_dry_run_prints_the_resolved_config():
    proc = lat("train-vae", "--config", "demo", "--dry-run", "train.max_steps=7")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["train"]["max_steps"] == 7
    bad = lat("train-vae", "--config", "nonesuch", "--dry-run")
    assert bad.returncode == 2 and "(bundled: " in bad.stderr and " demo," in bad.stderr and "kl-f8" in bad.stderr
