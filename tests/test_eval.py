"""Evaluation of a VAE on a folder, the accepted VAE formats, and latent statistics."""

from __future__ import annotations

import argparse
import csv
import json
import runpy
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import save_file

import autoencoderkl.evaluate as evaluate
from autoencoderkl.evaluate import evaluate_vae, latent_statistics, write_config_with_latent_stats
from autoencoderkl.metrics import psnr_ssim_8bit
from autoencoderkl.model import (
    export_vae,
    load_vae,
    original_state_dict,
    save_original_checkpoint,
    vae_weights_sha256,
)
from conftest import write_photos

REPO = Path(__file__).resolve().parents[1]
RES = 16  # crop side of the tiny tests; the tiny VAE has f = 2


def tiny_vae(widths=(8, 16), groups=4, seed=0, scaling_factor=0.5) -> AutoencoderKL:
    """Two levels, mid-block attention (so the attention keys are converted too)."""
    torch.manual_seed(seed)
    n = len(widths)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=widths, layers_per_block=1, latent_channels=4, norm_num_groups=groups,
        sample_size=RES, scaling_factor=scaling_factor,
    ).eval()


def public_config(vae: AutoencoderKL) -> dict:
    """config.json's content without the bookkeeping keys (tuples as lists, as JSON has them)."""
    return {k: v for k, v in json.loads(vae.to_json_string()).items() if not k.startswith("_")}


def assert_same_weights(a: AutoencoderKL, b: AutoencoderKL) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, different


def to_pm1(a: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.array(a)).permute(2, 0, 1)[None].float() / 127.5 - 1


def centre_crop_pil(path: Path, r: int) -> np.ndarray:
    """Independent of our code: PIL bicubic resize of the shorter side to r, centre crop."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    nw, nh = (r, round(h * r / w)) if w <= h else (round(w * r / h), r)
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = round((nw - r) / 2), round((nh - r) / 2)
    return np.asarray(im.crop((left, top, left + r, top + r)))


@pytest.fixture
def vae_dir(tmp_path) -> Path:
    return export_vae(tiny_vae(), tmp_path / "vae-folder")


@pytest.fixture
def no_lpips_weights(monkeypatch):
    """LPIPS as on a machine without the VGG16 weights, and no network touched."""

    def unavailable(choice):
        assert choice == "true"
        raise RuntimeError("LPIPS needs torchvision's VGG16 ImageNet weights 'vgg16-397923af.pth' in /nowhere")

    monkeypatch.setattr(evaluate, "build_perceptual", unavailable)


# ---- formats ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_original_single_file_round_trip_is_bit_exact(tmp_path, suffix):
    vae = tiny_vae()
    path = save_original_checkpoint(vae, tmp_path / f"vae{suffix}")
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
        # The CompVis layout, not diffusers': attention as 1x1 convs, up blocks counted from the top.
        assert {"encoder.down.0.block.0.conv1.weight", "decoder.up.1.upsample.conv.weight",
                "encoder.mid.attn_1.q.weight", "decoder.mid.block_2.norm2.bias"} <= keys
        assert not any("down_blocks" in k or "to_q" in k for k in keys)
    loaded = load_vae(path)
    assert_same_weights(vae, loaded)
    assert public_config(loaded) == public_config(vae)  # norm_num_groups 4, scaling_factor 0.5 kept
    assert vae_weights_sha256(loaded) == vae_weights_sha256(vae)


def test_whole_sd_checkpoint_without_config_infers_the_architecture(tmp_path):
    """A VAE under first_stage_model. beside other weights, no stored config: shapes + LDM defaults."""
    vae = tiny_vae(widths=(32, 64), groups=32)
    tensors = original_state_dict(vae, prefix="first_stage_model.")
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(3)
    tensors = {k: v.half() for k, v in tensors.items()}  # SD files are often fp16
    save_file(tensors, str(tmp_path / "sd.safetensors"))
    with pytest.warns(UserWarning, match="scaling_factor"):
        loaded = load_vae(tmp_path / "sd.safetensors")
    assert loaded.config.block_out_channels == [32, 64] and loaded.config.layers_per_block == 1
    assert loaded.config.scaling_factor == 0.18215  # diffusers' default for LDM checkpoints
    assert next(loaded.parameters()).dtype == torch.float32
    half = {k: v.half().float() for k, v in vae.state_dict().items()}
    assert all(torch.equal(half[k], v) for k, v in loaded.state_dict().items())

    # An explicit config wins over the defaults.
    cfg = tmp_path / "cfg"
    vae.save_config(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_vae(tmp_path / "sd.safetensors", config=cfg).config.scaling_factor == 0.5


def test_load_vae_errors_name_the_problem(tmp_path, vae_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vae(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without config.json"):
        load_vae(tmp_path / "empty")
    (tmp_path / "vae.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown checkpoint suffix"):
        load_vae(tmp_path / "vae.bin")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_vae(tmp_path / "broken.safetensors")
    # A .ckpt carrying a pickled object is refused, never unpickled.
    torch.save({"state_dict": original_state_dict(tiny_vae()), "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_vae(tmp_path / "pickled.ckpt")
    # diffusers' own weights file, handed over without its folder.
    with pytest.raises(ValueError, match="diffusers' layout"):
        load_vae(vae_dir / "diffusion_pytorch_model.safetensors")
    # Widths that GroupNorm(32) cannot divide and no config: say what to pass.
    save_file(original_state_dict(tiny_vae()), str(tmp_path / "narrow.safetensors"))
    with pytest.raises(ValueError, match="--vae-config"):
        load_vae(tmp_path / "narrow.safetensors")


# ---- metrics ------------------------------------------------------------------------


def test_psnr_of_known_noise_matches_the_formula():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    y = np.clip(x.astype(np.int64) + rng.integers(-20, 21, x.shape), 0, 255).astype(np.uint8)
    mse = np.mean((x.astype(np.float64) - y) ** 2)
    psnr, _ = psnr_ssim_8bit(to_pm1(x), to_pm1(y))
    assert float(psnr[0]) == pytest.approx(10 * np.log10(255**2 / mse), abs=1e-4)


def test_ssim_agrees_with_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:48, 0:40] / 48
    x = np.stack([128 + 100 * np.sin(5 * xx + c) * np.cos(3 * yy) for c in range(3)], -1).round().astype(np.uint8)
    y = np.clip(x + rng.normal(0, 12, x.shape), 0, 255).round().astype(np.uint8)
    _, ssim = psnr_ssim_8bit(to_pm1(x), to_pm1(y))
    want = metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                         data_range=255, channel_axis=2)
    assert float(ssim[0]) == pytest.approx(want, abs=1e-5)


# ---- evaluation ---------------------------------------------------------------------


def test_report_matches_a_direct_computation(tmp_path, vae_dir, no_lpips_weights):
    photos = write_photos(tmp_path / "photos", n=5, size=(20, 28))
    report = evaluate_vae(vae_dir, tmp_path / "photos", out=tmp_path / "out" / "report.json", resolution=RES,
                          batch_size=2, num_workers=0, fid="off", progress=False,
                          save_reconstructions=tmp_path / "recs")
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    rows = list(csv.DictReader((tmp_path / "out" / "report_per_image.csv").open()))
    assert [Path(r["path"]).name for r in rows] == [p.name for p in photos]

    vae = load_vae(vae_dir)
    psnrs, kls, zs = [], [], []
    for row, path in zip(rows, photos):
        x8 = centre_crop_pil(path, RES)
        with torch.no_grad():
            moments = vae.quant_conv(vae.encoder(to_pm1(x8)))
            mean, logvar = moments.chunk(2, dim=1)
            logvar = logvar.clamp(-30, 20)
            rec = vae.decode(mean).sample
        y8 = ((rec.clamp(-1, 1) + 1) * 127.5).round()[0].permute(1, 2, 0).numpy().astype(np.uint8)
        saved = np.asarray(Image.open(tmp_path / "recs" / f"{int(row['index']):05d}_{path.stem}.png"))
        assert np.array_equal(saved, y8)
        psnr = 10 * np.log10(255**2 / np.mean((x8.astype(np.float64) - y8) ** 2))
        kl = 0.5 * float((mean**2 + logvar.exp() - 1 - logvar).sum())
        assert float(row["psnr"]) == pytest.approx(psnr, abs=1e-3)
        assert float(row["kl"]) == pytest.approx(kl, rel=1e-4)
        assert float(row["z_mean_2"]) == pytest.approx(float(mean[0, 2].mean()), abs=1e-5)
        assert row["upscaled"] == "False" and row["lpips"] == ""
        psnrs.append(psnr), kls.append(kl), zs.append(mean)
    assert report["psnr"]["mean"] == pytest.approx(np.mean(psnrs), abs=1e-3)
    assert report["psnr"]["std"] == pytest.approx(np.std(psnrs, ddof=1), abs=1e-3)
    assert report["kl"]["mean"] == pytest.approx(np.mean(kls), rel=1e-4)
    z = torch.cat(zs)
    assert report["latents"]["per_channel_std"] == pytest.approx(z.std((0, 2, 3), unbiased=False).tolist(), abs=1e-4)
    assert report["data"]["num_images"] == 5 and report["vae"]["weights_sha256"] == vae_weights_sha256(vae)
    assert report["lpips"] == "unavailable" and "vgg16-397923af.pth" in report["notes"]["lpips"]
    assert report["rfid"] == "unavailable"
    # Worst 5 of 5, lowest PSNR first: 5 rows of input | reconstruction | difference.
    worst = Image.open(tmp_path / "out" / "report_worst8.png")
    assert worst.height == 4 + 5 * (RES + 16 + 4)


def test_single_files_and_run_dir_give_the_same_report_as_the_folder(tmp_path, vae_dir, no_lpips_weights):
    write_photos(tmp_path / "photos", n=3, size=(20, 28))
    vae = load_vae(vae_dir)
    run_dir = tmp_path / "run"
    export_vae(vae, run_dir / "vae")
    sources = {"folder": vae_dir, "run": run_dir,
               "safetensors": save_original_checkpoint(vae, tmp_path / "vae.safetensors"),
               "ckpt": save_original_checkpoint(vae, tmp_path / "vae.ckpt")}
    reports = {}
    for name, source in sources.items():
        r = evaluate_vae(source, tmp_path / "photos", out=tmp_path / name / "report.json", resolution=RES,
                         num_workers=0, fid="off", progress=False)
        reports[name] = {k: v for k, v in r.items() if k not in ("run", "files")}
        reports[name]["vae"] = {k: v for k, v in r["vae"].items() if k not in ("path", "format")}
    assert reports["safetensors"] == reports["folder"]
    assert reports["ckpt"] == reports["folder"]
    assert reports["run"] == reports["folder"]
    csvs = {n: (tmp_path / n / "report_per_image.csv").read_text() for n in sources}
    assert len(set(csvs.values())) == 1


def test_unreadable_files_are_skipped_and_small_images_upscaled(tmp_path, vae_dir, no_lpips_weights):
    photos = write_photos(tmp_path / "photos", n=2, size=(20, 28))
    write_photos(tmp_path / "photos" / "small", n=1, size=(10, 12))  # below the 16 px crop
    (tmp_path / "photos" / "notes.png").write_bytes(b"not an image")  # fails the header check
    data = photos[0].read_bytes()
    (tmp_path / "photos" / "truncated.png").write_bytes(data[: len(data) // 2])  # fails only when decoded
    with pytest.warns(UserWarning):
        report = evaluate_vae(vae_dir, tmp_path / "photos", out=tmp_path / "report.json", resolution=RES,
                              num_workers=0, fid="off", progress=False)
    assert report["data"]["num_images"] == 3
    assert sorted(Path(p).name for p, _ in report["data"]["skipped"]) == ["notes.png", "truncated.png"]
    assert report["data"]["num_upscaled"] == 1
    rows = {Path(r["path"]).relative_to(tmp_path / "photos").as_posix(): r
            for r in csv.DictReader((tmp_path / "report_per_image.csv").open())}
    assert rows["photo_00.png"]["upscaled"] == "False" and rows["photo_00.png"]["width"] == "28"
    small = rows["small/photo_00.png"]
    assert small["upscaled"] == "True" and (small["width"], small["height"]) == ("12", "10")


def test_empty_folder_and_bad_vae_path_are_clear_errors(tmp_path, vae_dir):
    script = runpy.run_path(str(REPO / "scripts" / "eval_vae.py"), run_name="eval_vae")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(SystemExit, match=r"error: no images in .*empty"):
        script["main"](["--vae", str(vae_dir), "--data", str(tmp_path / "empty"), "--quiet"])
    with pytest.raises(SystemExit, match=r"error: no AutoencoderKL at .*nowhere .*does not exist"):
        script["main"](["--vae", str(tmp_path / "nowhere"), "--data", str(tmp_path / "empty"), "--quiet"])
    with pytest.raises(SystemExit, match=r"error: image folder .*missing does not exist"):
        script["main"](["--vae", str(vae_dir), "--data", str(tmp_path / "missing"), "--quiet"])


def test_unavailable_metrics_say_why_without_touching_the_network(tmp_path, monkeypatch, no_lpips_weights):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    start = time.perf_counter()
    fid, note = evaluate.build_fid("auto")
    assert fid is None and time.perf_counter() - start < 5
    assert "torch-fidelity" in note or ("weights-inception-2015-12-05-6726825d.pth" in note and "torch-home" in note)
    lp, note = evaluate.build_lpips("auto")
    assert lp is None and "vgg16-397923af.pth" in note
    assert evaluate.build_fid("off")[0] is None and evaluate.build_lpips("off")[0] is None


def pixel_identity_vae(shift: float) -> AutoencoderKL:
    """f = 1 and z = x: its reconstruction is the input plus ``shift`` (in [-1, 1] units)."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
    from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution

    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        block_out_channels=(8,), layers_per_block=1, latent_channels=3, norm_num_groups=4,
                        sample_size=RES).eval()
    moments = lambda x: torch.cat([x, torch.full_like(x, -20.0)], 1)  # noqa: E731  (mean x, log-variance -20)
    vae.encode = lambda x: AutoencoderKLOutput(DiagonalGaussianDistribution(moments(x)))
    vae.decode = lambda z: DecoderOutput(sample=z + shift)
    return vae


@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")  # the std of PSNR = inf
def test_rfid_is_computed_from_a_local_inception_file(tmp_path, scaled_inception_weights, no_lpips_weights):
    """rFID (random Inception weights at He scale): ~0 for a perfect reconstruction, larger for a brighter one."""
    write_photos(tmp_path / "photos", n=2, size=(20, 28))  # torchmetrics runs InceptionV3 in float64: slow

    def rfid(shift):
        report = evaluate_vae(pixel_identity_vae(shift), tmp_path / "photos", out=tmp_path / f"report{shift}.json",
                              resolution=RES, num_workers=0, inception_weights=scaled_inception_weights, progress=False)
        assert "biased" in report["notes"]["rfid"]
        # The bicubic baseline gets its own rFID against the same real images.
        assert isinstance(report["bicubic"]["rfid"], float)
        return report["rfid"]

    perfect, brighter = rfid(0.0), rfid(0.3)  # +38 of 255 levels
    assert brighter > 0.1 and abs(perfect) < 1e-4 * brighter  # (float32 eigenvalues: ~1e-5, not 0)
    # A weights file holding pickled objects is refused before torch-fidelity unpickles it.
    torch.save({"net": argparse.Namespace()}, tmp_path / "evil.pth")
    fid, note = evaluate.build_fid("auto", tmp_path / "evil.pth")
    assert fid is None and "weights_only=True" in note


# ---- latent statistics --------------------------------------------------------------


def test_latent_statistics_match_a_direct_computation_and_write_a_config(tmp_path, vae_dir):
    photos = write_photos(tmp_path / "photos", n=5, size=(20, 28))
    stats = latent_statistics(vae_dir, tmp_path / "photos", resolution=RES, batch_size=2, num_workers=0, seed=3,
                              progress=False)
    vae = load_vae(vae_dir)
    x = torch.stack([to_pm1(centre_crop_pil(p, RES))[0] for p in photos])
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # same batches, same generator: the same posterior samples
        z = torch.cat([vae.encode(x[i : i + 2]).latent_dist.sample(generator=generator) for i in range(0, 5, 2)])
    z = z.double()
    assert stats["num_images"] == 5 and stats["elements_per_channel"] == 5 * (RES // 2) ** 2
    assert stats["per_channel"]["mean"] == pytest.approx(z.mean((0, 2, 3)).tolist(), abs=1e-5)
    assert stats["std"] == pytest.approx(float(z.std(unbiased=False)), rel=1e-5)
    assert stats["scaling_factor"] == pytest.approx(1 / float(z.std(unbiased=False)), rel=1e-5)
    assert stats["shift_factor"] == pytest.approx(float(z.mean()), abs=1e-5)

    path = write_config_with_latent_stats(vae, stats, tmp_path / "measured", shift=True)
    assert path == tmp_path / "measured" / "config.json"
    config = json.loads(path.read_text())
    assert config["scaling_factor"] == stats["scaling_factor"] and config["shift_factor"] == stats["shift_factor"]
    assert config["norm_num_groups"] == 4 and config["_class_name"] == "AutoencoderKL"
    with pytest.raises(FileExistsError):
        write_config_with_latent_stats(vae, stats, path)
    assert load_vae(vae_dir).config.scaling_factor == 0.5  # the VAE's own config is untouched


def test_latent_stats_command_writes_stats_and_config(tmp_path, vae_dir, capsys):
    write_photos(tmp_path / "photos", n=2, size=(20, 28))
    script = runpy.run_path(str(REPO / "scripts" / "eval_vae.py"), run_name="eval_vae")
    script["main"](["--vae", str(vae_dir), "--data", str(tmp_path / "photos"), "--resolution", str(RES), "--quiet",
                    "--num-workers", "0", "--latent-stats", "--out", str(tmp_path / "stats.json"),
                    "--write-config", str(tmp_path / "config.json")])
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert json.loads((tmp_path / "config.json").read_text())["scaling_factor"] == stats["scaling_factor"]
    assert "scaling_factor" in capsys.readouterr().out


def test_lpips_is_reported_per_image_when_a_network_is_there(tmp_path, vae_dir):
    write_photos(tmp_path / "photos", n=3, size=(20, 28))
    report = evaluate_vae(vae_dir, tmp_path / "photos", out=tmp_path / "report.json", resolution=RES, num_workers=0,
                          lpips="random", fid="off", progress=False)
    values = [float(r["lpips"]) for r in csv.DictReader((tmp_path / "report_per_image.csv").open())]
    assert len(values) == 3 and all(v > 0 for v in values)
    assert report["lpips"]["mean"] == pytest.approx(np.mean(values))
    assert "RANDOM" in report["notes"]["lpips"]


def test_tiling_reconstructs_large_crops_tile_by_tile(vae_dir, tmp_path, monkeypatch):
    """--tiling: a crop 3x the VAE's sample_size goes through in tiles; figures stay close."""
    write_photos(tmp_path / "photos", n=2, size=(52, 60))
    from diffusers.models.autoencoders.vae import Encoder

    tiles = []  # the input shape of every encoder forward
    original = Encoder.forward
    monkeypatch.setattr(Encoder, "forward", lambda self, x: tiles.append(tuple(x.shape)) or original(self, x))
    kw = dict(resolution=3 * RES, num_workers=0, lpips="off", fid="off", progress=False)
    plain = evaluate_vae(vae_dir, tmp_path / "photos", out=tmp_path / "plain.json", **kw)
    seen_plain, tiles[:] = list(tiles), []
    tiled = evaluate_vae(vae_dir, tmp_path / "photos", out=tmp_path / "tiled.json", tiling=True, **kw)
    assert seen_plain == [(2, 3, 48, 48)]
    # 4 x 4 tiles of at most 16 px, starting every 12 px (a quarter overlap)
    assert len(tiles) == 16 and all(t[:2] == (2, 3) and max(t[2:]) <= RES for t in tiles)
    assert tiled["run"]["tiling"] == {"tile_px": RES, "overlap": 0.25}
    assert plain["run"]["tiling"] is None
    assert tiled["psnr"]["mean"] != plain["psnr"]["mean"]  # blended seams: not the same numbers ...
    assert tiled["psnr"]["mean"] == pytest.approx(plain["psnr"]["mean"], abs=1.5)  # ... but close
    tiles[:] = []
    big = evaluate_vae(vae_dir, tmp_path / "photos", out=tmp_path / "big.json", tiling=True, tile_size=32, **kw)
    assert len(tiles) == 4 and big["run"]["tiling"]["tile_px"] == 32  # 32 px tiles every 24 px
    with pytest.raises(ValueError, match="multiple of the VAE's downsampling factor 2"):
        evaluate_vae(vae_dir, tmp_path / "photos", out=tmp_path / "bad.json", tiling=True, tile_size=15, **kw)
