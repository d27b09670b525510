"""The diffusability probe: spectra, the probe curve, held-out validation in stage 2, the report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import reset_accelerate_state, write_photos
from safetensors.torch import save_file
from test_ldm import TINY_UNET, tiny_vae

from latent_diffusion.config import load_config
from latent_diffusion.encode import encode_latents
from latent_diffusion.latents import load_index, map_shard
from latent_diffusion.probe import (
    PROBE_CONFIG,
    format_table,
    iid_gaussian_loss,
    prepare_probe_images,
    probe_latents,
)
from latent_diffusion.spectrum import latent_spectrum
from latent_diffusion.train import main as train_ldm

REPO = Path(__file__).resolve().parents[1]

# The probe config shrunk to seconds: the tiny U-Net of test_ldm, 40 steps, a point every 10.
TINY_PROBE = [f"{k}={v}" for k, v in {
    **TINY_UNET, "data.batch_size": 8, "data.num_val_latents": 8, "optim.lr": 3e-3, "optim.lr_warmup_steps": 0,
    "train.max_steps": 40, "train.validation_steps": 10, "train.log_steps": 10, "train.cpu_threads": 1,
}.items()]


def test_spectrum_of_white_noise_is_flat_and_smooth_latents_have_little_high_frequency_energy():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(400, 4, 8, 8, generator=g)
    white = latent_spectrum([noise[:200], noise[200:]])  # batches accumulate
    assert white["high_frequency_fraction"] == pytest.approx(white["white_noise_fraction"], abs=0.02)
    assert white["white_noise_fraction"] == pytest.approx(47 / 63)  # DCT coefficients above 0.25 cycles, 8 x 8 grid
    assert all(p == pytest.approx(1.0, abs=0.1) for p in white["power"])
    coarse = torch.randn(400, 4, 4, 4, generator=g)  # bilinear upsampling: smooth latents
    smooth = torch.nn.functional.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=True)
    scaled = latent_spectrum([7.0 * smooth + 3.0])  # shift and scale do not matter
    assert latent_spectrum([smooth])["high_frequency_fraction"] == pytest.approx(scaled["high_frequency_fraction"])
    assert scaled["high_frequency_fraction"] < 0.5 * white["high_frequency_fraction"]
    assert scaled["power"][0] > 1 > scaled["power"][-1]  # energy falls with frequency


def test_iid_gaussian_reference_is_the_mse_of_the_best_denoiser_for_white_latents():
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    var = [1.0, 0.25]
    x0 = torch.randn(200_000, 3, 2, generator=g, dtype=torch.float64) * torch.tensor(var).sqrt()
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    xt = a[:, None].sqrt() * x0 + (1 - a[:, None]).sqrt() * eps
    best = (1 - a[:, None]).sqrt() * xt / (a[:, None] * torch.tensor(var) + 1 - a[:, None])  # E[eps | x_t]
    assert iid_gaussian_loss(var, a) == pytest.approx(float(((eps - best) ** 2).mean()), rel=0.01)


@pytest.fixture(scope="module")
def probe_data(tmp_path_factory):
    """12 tiny photos cut into probe images; two tiny VAEs; the first one's two caches."""
    root = tmp_path_factory.mktemp("probe")
    write_photos(root / "photos", n=12)
    images = prepare_probe_images(root / "photos", 16, root / "images", heldout_fraction=0.25)
    for seed in (0, 1):
        tiny_vae(seed).save_pretrained(root / f"vae{seed}")
    for part in ("train", "heldout"):
        encode_latents(root / "vae0", root / "images" / part, root / f"latents-{part}", resolution=16, num_workers=0)
    reset_accelerate_state()
    return {"root": root, "images": images}


def test_probe_images_hold_out_an_evenly_spaced_part(probe_data):
    root, images = probe_data["root"], probe_data["images"]
    assert (images["num_train"], images["num_heldout"]) == (9, 3) and images["skipped"] == []
    assert sorted(p.name for p in (root / "images" / "heldout").iterdir()) == ["00000.png", "00006.png", "00011.png"]


def noisy_copy(src: Path, dst: Path, sigma: float) -> None:
    """The cache with white Gaussian noise of std sigma x the latents' std added to every posterior mean."""
    shutil.copytree(src, dst)
    std = float(torch.cat([map_shard(src / s["file"])["mean"] for s in load_index(src)["shards"]]).std())
    g = torch.Generator().manual_seed(1)
    for shard in load_index(src)["shards"]:
        tensors = {k: v.clone() for k, v in map_shard(src / shard["file"]).items()}
        tensors["mean"] += sigma * std * torch.randn(tensors["mean"].shape, generator=g)
        save_file(tensors, str(dst / shard["file"]))


def test_probe_loss_falls_and_white_noise_in_the_latents_scores_worse(probe_data, tmp_path):
    root = probe_data["root"]
    clean = probe_latents(root / "latents-train", root / "latents-heldout", root / "vae0", tmp_path / "clean",
                          overrides=TINY_PROBE)
    reset_accelerate_state()
    curve = clean["probe"]["loss"]
    assert clean["probe"]["steps"] == [0, 10, 20, 30, 40]
    assert curve[-1] < 0.7 * curve[0] and clean["probe"]["area"] < curve[0]
    assert clean["normalisation"]["kind"] == "per_channel"  # the bundled probe's: channel offsets cannot score
    # Stage 2 used the held-out cache for val/loss, the per-channel normalisation, and drew no sample grid.
    saved = load_config(tmp_path / "clean" / "config.yaml")
    assert saved.data.latent_normalization == "per_channel" and saved.data.shift_factor is None
    assert saved.data.val_latents == str(root / "latents-heldout") and saved.train.num_validation_samples == 0
    assert not (tmp_path / "clean" / "samples").exists()

    # The same latents plus white noise (before the normalisation): what diffusion cannot learn.
    for part in ("train", "heldout"):
        noisy_copy(root / f"latents-{part}", tmp_path / f"noisy-{part}", sigma=1.0)
    noisy = probe_latents(tmp_path / "noisy-train", tmp_path / "noisy-heldout", root / "vae0", tmp_path / "noisy",
                          overrides=TINY_PROBE)
    reset_accelerate_state()
    assert noisy["probe"]["final"] > clean["probe"]["final"] and noisy["probe"]["area"] > clean["probe"]["area"]
    assert noisy["spectrum"]["high_frequency_fraction"] > clean["spectrum"]["high_frequency_fraction"]


def test_stage2_refuses_a_held_out_cache_of_another_vae(probe_data, tmp_path):
    root = probe_data["root"]
    encode_latents(root / "vae1", root / "images" / "heldout", tmp_path / "other", resolution=16, num_workers=0)
    reset_accelerate_state()
    cfg = load_config(None, [*TINY_PROBE, f"data.latents={root / 'latents-train'}", f"data.val_latents={tmp_path / 'other'}",
                             f"data.vae={root / 'vae0'}", "train.max_steps=1"])
    with pytest.raises(ValueError, match="data.val_latents .* must be encoded by the VAE of data.latents"):
        train_ldm(cfg, tmp_path / "run")


def test_report_holds_every_field_for_two_vaes_and_the_command_prints_the_table(probe_data, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_vae", REPO / "scripts" / "eval_vae.py")
    eval_vae = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_vae)
    root = probe_data["root"]
    out = tmp_path / "eval" / "report.json"
    # The CLI takes the probe's settings from a YAML; the tiny one here.
    tiny = tmp_path / "probe.yaml"
    cfg = load_config(PROBE_CONFIG, TINY_PROBE)
    from autoencoderkl.config import save_config

    save_config(cfg, tiny)
    eval_vae.main(["--vae", str(root / "vae0"), "--vae", str(root / "vae1"), "--data", str(root / "photos"),
                   "--resolution", "16", "--diffusability", "--probe-config", str(tiny), "--probe-steps", "20",
                   "--lpips", "off", "--fid", "off", "--num-workers", "0", "--quiet", "--out", str(out)])
    reset_accelerate_state()
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [v["name"] for v in report["vaes"]] == ["vae0", "vae1"]
    for vae in report["vaes"]:
        assert {"psnr", "ssim", "lpips", "rfid", "kl"} <= set(vae["reconstruction"])
        assert {"per_channel_mean", "per_channel_std", "global_mean", "global_std"} <= set(vae["latents"])
        assert len(vae["latents"]["per_channel_std"]) == 4 and vae["normalisation"]["kind"] == "per_channel"
        assert {"frequency", "power", "high_frequency_fraction", "white_noise_fraction"} <= set(vae["spectrum"])
        probe = vae["probe"]
        assert probe["steps"][-1] == 20 and len(probe["loss"]) == len(probe["steps"])
        assert {"final", "area", "iid_gaussian_loss", "final_relative", "area_relative", "timesteps", "seconds"} <= set(probe)
        assert probe["final_relative"] == pytest.approx(probe["final"] / probe["iid_gaussian_loss"])
        assert set(vae["seconds"]) == {"reconstruction", "encode", "probe", "interpolation", "total"}
        interp = vae["interpolation"]
        assert interp["num_heldout"] == 2 and interp["num_train"] == 10 and interp["fid"] == "unavailable"
        assert set(interp["swd"]["levels"]) == {"16"} and interp["swd"]["average"] > 0
        assert Path(vae["reconstruction"]["report"]).is_file()
    # The same images, seed and config: the VAEs differ, so do their curves.
    assert report["vaes"][0]["probe"]["loss"] != report["vaes"][1]["probe"]["loss"]
    assert report["data"]["num_train"] == 10 and report["probe"]["steps"] == 20
    assert (report["data"]["num_train_sources"], report["data"]["num_heldout_sources"]) == (10, 2)
    assert Path(report["files"]["png"]).stat().st_size > 0
    assert printed.count("\n") >= 4 and "probe final" in printed and "interp SWD" in printed and "vae1" in printed
    assert format_table(report).splitlines()[1].startswith("vae0")
    assert not list(out.parent.glob(".report-probe-*")), "the temporary work dir was not removed"


def offset_vae(src: Path, dst: Path, offsets: torch.Tensor) -> None:
    """The same autoencoder with its posterior means moved by per-channel ``offsets``:
    quant_conv's mean biases += offsets, post_quant_conv's bias compensates, so every
    decode and every latent's structure are unchanged."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(src)
    with torch.no_grad():
        c = len(offsets)
        vae.quant_conv.bias[:c] += offsets
        vae.post_quant_conv.bias -= vae.post_quant_conv.weight[:, :, 0, 0] @ offsets
    vae.save_pretrained(dst)


def test_latent_sets_that_differ_only_in_channel_offsets_get_the_same_score(probe_data, tmp_path):
    root = probe_data["root"]
    std = float(torch.cat([map_shard(root / "latents-train" / s["file"])["mean"]
                           for s in load_index(root / "latents-train")["shards"]]).std())
    offset_vae(root / "vae0", tmp_path / "vae-offset", torch.tensor([0.0, 0.0, 2.0, -2.0]) * std)
    for part in ("train", "heldout"):
        encode_latents(tmp_path / "vae-offset", root / "images" / part, tmp_path / f"latents-{part}", resolution=16,
                       num_workers=0)
        reset_accelerate_state()
    runs = []
    for vae, latents in ((root / "vae0", root), (tmp_path / "vae-offset", tmp_path)):
        runs.append(probe_latents(latents / "latents-train", latents / "latents-heldout", vae,
                                  tmp_path / f"run-{len(runs)}", overrides=TINY_PROBE))
        reset_accelerate_state()
    plain, moved = runs
    means = [plain["latents"]["per_channel_mean"], moved["latents"]["per_channel_mean"]]
    assert means[1][2] - means[0][2] == pytest.approx(2 * std, rel=1e-3)  # the sets differ by the offsets
    assert moved["probe"]["final_relative"] == pytest.approx(plain["probe"]["final_relative"], rel=1e-3)
    assert moved["probe"]["final"] == pytest.approx(plain["probe"]["final"], rel=1e-3)
