"""lat.benchmark (scripts/benchmark.py): the harness's arithmetic, FLOP counts, case planning, and tiny runs."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from autoencoderkl.config import VAEConfig, load_config
from conftest import reset_accelerate_state, write_photos
from lat.benchmark import cli, harness, train_ldm, vae_tiling

REPO = Path(__file__).resolve().parents[1]

# A two-level 8-channel AutoencoderKL and a small PatchGAN on 16 px crops of the demo
# photos, one thread: a training step takes milliseconds, a case process a few seconds.
TINY_VAE = ["model.block_out_channels=[8,8]", "model.layers_per_block=1", "model.norm_num_groups=4",
            "model.mid_block_add_attention=false"]
TINY_TRAIN_VAE = TINY_VAE + ["loss.disc_ndf=8", "loss.disc_num_layers=2", "data.resize=32", "data.val_grid=1",
                             "train.cpu_threads=1"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # also for the case processes, which inherit it


def test_summarize_windows_drops_the_warmup_and_takes_the_median():
    # 8 images per window at 1, 10, 20, 40 images/s: the first window is warm-up.
    r = harness.summarize_windows([1.0, 10.0, 20.0, 40.0], items=8, warmup=1)
    assert r["seconds"] == [0.8, 0.4, 0.2]
    assert r["items_per_s"] == pytest.approx(20.0)
    assert (r["items_per_s_min"], r["items_per_s_max"]) == (pytest.approx(10.0), pytest.approx(40.0))
    assert r["warmup_items_per_s"] == [1.0]
    with pytest.raises(ValueError, match="none left after 4 warm-up"):
        harness.summarize_windows([1.0, 2.0], items=8, warmup=4)


def test_flop_count_of_a_convolution_matches_the_hand_count():
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False)
    x = torch.randn(2, 3, 16, 16)
    # 2 FLOPs per multiply-add: every output element (B * C_out * H * W) sums C_in * k * k products.
    assert harness.count_flops(lambda: conv(x)) == 2 * (2 * 8 * 16 * 16) * (3 * 3 * 3)
    # Backward: the input gradient and the weight gradient each cost as much as the forward.
    x.requires_grad_(True)
    assert harness.count_flops(lambda: conv(x).sum().backward()) == 3 * 2 * (2 * 8 * 16 * 16) * (3 * 3 * 3)


def test_cpu_attention_is_counted():
    """torch's counter has no formula for the CPU attention kernel; the script registers one."""
    b, h, s, d = 2, 3, 64, 16
    q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
    # Q K^T and softmax(.) V: two (s x d) x (d x s)-sized matmuls per head, 2 FLOPs per multiply-add.
    assert harness.count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 2 * 2 * b * h * s * s * d


def test_cases_and_ablations_follow_the_switch_tables():
    config = str(REPO / "configs" / "autoencoderkl" / "demo.yaml")
    cases, info = harness.plan_cases(load_config, VAEConfig, config, "cpu", harness.STAGE1_SWITCHES,
                                      harness.STAGE1_OPTIMIZED, ["train.max_steps=8"], ["data.batch_size=4"],
                                      baseline=True, ablate=True)
    assert list(cases) == ["optimized", "baseline", "optimized, train.channels_last=false",
                           "optimized, loss.shared_backward=false"]
    assert cases["optimized"] == ["train.max_steps=8", "train.channels_last=true", "loss.shared_backward=true",
                                  "data.batch_size=4"]  # --set comes last, so it wins
    base = load_config(config, cases["baseline"])
    assert (base.train.mixed_precision, base.train.channels_last, base.train.compile, base.train.allow_tf32,
            base.optim.fused, base.data.num_workers, base.loss.shared_backward) == ("no", False, False, False, False, 0, False)
    assert info["ablate_skipped"]["train.allow_tf32"] == "no effect on cpu"
    assert "baseline value" in info["ablate_skipped"]["train.compile"]
    assert info["switches_unavailable"] == []


def test_unknown_set_key_fails_with_the_configs_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--what", "train_vae", "--set", "train.max_stepz=3"])
    message = str(exit_info.value.code)
    assert "unknown config key 'train.max_stepz'" in message and "did you mean train.max_steps" in message


def test_train_vae_runs_the_real_loop_per_case_and_writes_the_json(tmp_path, monkeypatch):
    out, scratch = tmp_path / "bench.json", tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(cli.tempfile, "TemporaryDirectory", lambda prefix: contextlib.nullcontext(str(scratch)))  # kept
    cli.main(["--what", "train_vae", "--baseline", "--steps", "1", "--warmup", "1", "--repeats", "1", "--rounds", "2",
                   "--resolution", "16", "--batch-size", "2", "--out", str(out), "--set", *TINY_TRAIN_VAE])
    report = json.loads(out.read_text())
    assert report["what"] == "train_vae" and set(report["cases"]) == {"optimized", "baseline"}
    assert {"device", "dtype", "torch_threads", "versions", "load_average_1_5_15min"} <= set(report["environment"])
    for name, case in report["cases"].items():
        # two alternating rounds of one process per case, each dropping its warm-up window
        assert len(case["seconds"]) == 2 and len(case["warmup_items_per_s"]) == 2 and len(case["rounds_detail"]) == 2
        # Recomputed from what each case's loop logged: 1-step windows of 2 images, the first of each round dropped.
        rates = [[json.loads(line)["images_per_sec"] for line in (scratch / f"{name}-{r}" / "metrics.jsonl").read_text()
                  .splitlines() if "images_per_sec" in line] for r in range(2)]
        assert [len(r) for r in rates] == [2, 2]
        seconds = sorted(2 / r[1] for r in rates)
        assert case["items_per_s"] == pytest.approx(2 / ((seconds[0] + seconds[1]) / 2), rel=1e-9)
        assert (case["items_per_s_min"], case["items_per_s_max"]) == (pytest.approx(2 / seconds[1], rel=1e-9),
                                                                      pytest.approx(2 / seconds[0], rel=1e-9))
        assert case["warmup_items_per_s"] == [round(r[0], 3) for r in rates]
        assert case["peak_memory_mib"] > 0
        assert case["steps_per_s"] == pytest.approx(case["items_per_s"] / 2)  # batch 2, no accumulation
        assert case["tflops_per_s"] == pytest.approx(case["flops_per_item"] * case["items_per_s"] / 1e12)
        assert case["threads"] == 1 and "loss.disc_start=0" in case["overrides"]
    opt, base = report["cases"]["optimized"], report["cases"]["baseline"]
    assert "loss.shared_backward=false" in base["overrides"] and "loss.shared_backward=true" in opt["overrides"]
    # One LPIPS and one PatchGAN backward fewer per step: less work per image, counted.
    assert opt["flops"]["shared_backward"] and not base["flops"]["shared_backward"]
    assert opt["flops_per_item"] < base["flops_per_item"]
    assert report["speedup_over_baseline"]["baseline"] == 1.0


def test_sample_counts_flops_linearly_in_the_steps(tmp_path):
    out = tmp_path / "sample.json"
    tiny_unet = ["model.block_out_channels=[16,32]", "model.attention_head_dim=8", "model.norm_num_groups=8",
                 "model.layers_per_block=1"]
    cli.main(["--what", "sample", "--baseline", "--steps", "3", "--batch-size", "2", "--warmup", "0",
                   "--repeats", "1", "--cpu-threads", "1", "--out", str(out), "--set", *tiny_unet])
    report = json.loads(out.read_text())
    flops = report["flops"]
    assert flops["per_image"] == (flops["decode_batch"] + 3 * flops["unet_call_on_batch"]) // 2
    # Counted again on the models alone: one U-Net call on the batch of 2, one decode of it.
    from autoencoderkl.model import load_vae
    from latent_diffusion.config import load_config as load_ldm_config
    from latent_diffusion.model import build_unet

    vae = load_vae(harness.demo_shaped_vae(64, tmp_path / "vae")).eval()  # the case's VAE: 64 px by default
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (vae.config.latent_channels, 64 // f, 64 // f)
    unet = build_unet(load_ldm_config(harness.STAGE2_DEMO, tiny_unet).model, shape, 9).eval()  # 9 demo classes
    z = torch.randn(2, *shape)
    with torch.no_grad():
        assert flops["unet_call_on_batch"] == harness.count_flops(lambda: unet(z, torch.tensor([999, 999]),
                                                                               class_labels=torch.tensor([0, 1])))
        assert flops["decode_batch"] == harness.count_flops(lambda: vae.decode(z))
    for case in report["cases"].values():
        # (the seconds are rounded to 0.1 ms)
        assert 2 / case["items_per_s"] == pytest.approx(statistics.median(case["seconds"]), abs=1e-4)
        assert case["steps_per_s"] == pytest.approx(case["items_per_s"] / 2 * 3)  # U-Net calls on the batch
    assert report["cases"]["optimized"]["settings"] == {"dtype": "fp32", "channels_last": True, "compile": False}
    assert report["cases"]["baseline"]["settings"] == {"dtype": "fp32", "channels_last": False, "compile": False}
    assert report["cases"]["optimized"]["items"] == 2


def test_cached_vs_encoded_trains_the_same_unet_both_ways(tmp_path, monkeypatch):
    """Both modes step one U-Net on the same latents: the encoded path's equal cached ones.

    16 px photos (the crop is the whole image, flipped or not), a cache of both flips, the
    posterior means on both paths (``sample_posterior=false``; the encoder's draw is its mean
    here), so every latent the encode-every-step case feeds the U-Net is one of the cache's.
    """
    from diffusers import AutoencoderKL
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    import latent_diffusion.train as ldm_train
    from latent_diffusion.config import load_config as load_ldm_config
    from latent_diffusion.encode import encode_latents
    from latent_diffusion.latents import LatentDataset

    for c in range(2):
        write_photos(tmp_path / "photos" / f"class{c}", n=2, size=(16, 16), seed=c)
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                  latent_channels=4, sample_size=16).save_pretrained(tmp_path / "vae")
    encode_latents(tmp_path / "vae", tmp_path / "photos", tmp_path / "latents", resolution=16, batch_size=4,
                   num_workers=0, hflip=True)
    reset_accelerate_state()
    cfg = load_ldm_config(REPO / "configs" / "latent_diffusion" / "demo.yaml",
                          ["model.block_out_channels=[16,32]", "model.attention_head_dim=8", "model.norm_num_groups=8",
                           "model.layers_per_block=1", "data.batch_size=2", "data.sample_posterior=false"])
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    calls, real_loss = [], ldm_train.diffusion_loss

    def recording(unet, scheduler, latents, *args, **kwargs):
        loss = real_loss(unet, scheduler, latents, *args, **kwargs)
        calls.append((unet, latents.detach().clone(), loss.item()))
        return loss

    monkeypatch.setattr(ldm_train, "diffusion_loss", recording)
    r = train_ldm.cached_vs_encoded(cfg, str(tmp_path / "latents"), str(tmp_path / "vae"), "cpu", steps=2, repeats=1,
                                   warmup=0, threads=1)
    assert set(r["results"]) == {"cached", "encode_every_step"}
    assert r["settings"]["images"] == 4 and r["settings"]["image_resize"] is None
    for case in r["results"].values():
        assert case["items"] == 2 * 2  # steps x batch latents
        assert case["steps_per_s"] == pytest.approx(case["items_per_s"] / 2)
    enc = r["results"]["encode_every_step"]
    assert enc["flops_per_item"] == r["flops"]["unet_step_per_latent"] + r["flops"]["encode_per_latent"]

    # The FLOP count's step first, then (repeats 1, no warm-up) 2 cached steps and 2 encoded ones.
    cached, encoded = calls[-4:-2], calls[-2:]
    assert len({id(unet) for unet, _, _ in calls}) == 1  # one U-Net, trained by both
    means = LatentDataset(tmp_path / "latents", sample_posterior=False)
    table = torch.stack([means[i]["latents"] for i in range(len(means))])  # (8, 4, 8, 8): 4 photos x 2 flips
    for _, latents, loss in cached + encoded:
        assert latents.shape == (2, 4, 8, 8) and torch.isfinite(torch.tensor(loss))
        for z in latents:  # each is one of the cache's latents, scaled and shifted as the cache's
            assert (z - table).flatten(1).abs().amax(1).min() < 1e-4


def test_tiled_encode_decode_case_does_the_overlapping_tiles_work(tmp_path):
    """The vae_tiling case body, in this process: tiles of 32 px over a 64 px image, overlap 1/4."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    vae = harness.demo_shaped_vae(32, tmp_path / "vae", TINY_VAE)  # f = 2, sample_size 32
    save_file({"images": torch.rand(2, 3, 64, 64) * 2 - 1}, tmp_path / "images.safetensors")
    spec = {"vae": str(vae), "batch": 1, "tile_size": 32, "images": str(tmp_path / "images.safetensors"),
            "warmup": 1, "repeats": 2, "threads": 1}
    plain = vae_tiling.child_vae_tiling({**spec, "mode": "plain", "rec_out": str(tmp_path / "plain.safetensors")})
    tiled = vae_tiling.child_vae_tiling({**spec, "mode": "tiled", "rec_out": str(tmp_path / "tiled.safetensors")})
    assert len(tiled["seconds"]) == 2 and tiled["items"] == 1
    # Tiles start every 24 px (0, 24, 48): 3 x 3 tiles, overlapping, so more convolution work than one pass.
    assert tiled["flops_per_item"] > plain["flops_per_item"] > 0
    rec_plain, rec_tiled = (load_file(tmp_path / f"{m}.safetensors")["rec"] for m in ("plain", "tiled"))
    assert rec_plain.shape == rec_tiled.shape == (1, 3, 64, 64)
    assert not torch.equal(rec_plain, rec_tiled)  # blended tiles: close, not identical


def test_the_script_is_a_thin_entry_point_that_runs_from_any_folder(tmp_path):
    """scripts/benchmark.py finds this checkout's lat/ without PYTHONPATH and shows the package's help."""
    script = REPO / "scripts" / "benchmark.py"
    assert len(script.read_text().splitlines()) < 150
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert cli.__doc__.split("\n\n")[0] in proc.stdout and "--what train_vae: optimizer steps" in proc.stdout


def test_startup_times_listing_the_old_header_check_and_the_lazy_construction(tmp_path):
    out = tmp_path / "startup.json"
    cli.main(["--what", "startup", "--num-images", "30", "--repeats", "2", "--warmup", "0", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["what"] == "startup" and report["settings"]["files"] == 30
    assert set(report["results"]) == {"list_images", "header_check_every_file", "ImageFolder(train=True)",
                                      "serialize_list"}
    for r in report["results"].values():
        assert r["items"] == 30 and len(r["seconds"]) == 2
        assert r["us_per_file"] == pytest.approx(1e6 * statistics.median(r["seconds"]) / 30, abs=1e6 * 1e-4 / 30)
    assert report["construction_before_over_now"] > 0
    # An existing folder instead of synthetic files: its images, the first --num-images of them.
    write_photos(tmp_path / "photos", n=4)
    cli.main(["--what", "startup", "--data", str(tmp_path / "photos"), "--num-images", "3", "--repeats", "1",
              "--warmup", "0", "--out", str(out)])
    assert json.loads(out.read_text())["settings"]["files"] == 3
