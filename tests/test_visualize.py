"""inspect_vae's pictures: interpolation, prior samples, latent channels, training curves."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from autoencoderkl.evaluate import load_eval_image
from autoencoderkl.model import export_vae
from autoencoderkl.visualize import interpolate, latent_channel_panel, plot_curves, prior_samples, read_metrics
from conftest import write_photos

REPO = Path(__file__).resolve().parents[1]
RES = 16


@pytest.fixture
def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=RES,
                         scaling_factor=0.5).eval()


def write_metrics(path: Path) -> None:
    lines = [{"step": 0, "val/psnr": 10.0, "val/ssim": 0.1}]
    lines += [{"step": s, "loss": 100.0 / s, "kl_loss": 5.0 + s, "g_loss": 0.0} for s in range(1, 11)]
    lines += [{"step": 10, "val/psnr": 15.0, "val/ssim": 0.3}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 11, "loss"')  # a killed run's last line


def test_interpolation_starts_and_ends_at_the_reconstructions(vae):
    a, b = torch.rand(2, 3, RES, RES) * 2 - 1
    frames = interpolate(vae, a, b, steps=5)
    assert frames.shape == (5, 3, RES, RES)
    with torch.no_grad():
        rec = vae.decode(vae.encode(torch.stack([a, b])).latent_dist.mode()).sample
    torch.testing.assert_close(frames[0], rec[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(frames[-1], rec[1], atol=1e-5, rtol=0)
    assert not torch.allclose(frames[2], frames[0], atol=1e-3)
    with pytest.raises(ValueError, match="steps"):
        interpolate(vae, a, b, steps=1)


def test_prior_samples_are_seeded_and_scaled_by_the_scaling_factor(vae):
    unit, scaled = prior_samples(vae, 3, (RES // 2, RES // 2), seed=1)
    assert unit.shape == scaled.shape == (3, 3, RES, RES)
    again, _ = prior_samples(vae, 3, (RES // 2, RES // 2), seed=1)
    assert torch.equal(unit, again)
    eps = torch.randn(3, 4, RES // 2, RES // 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(scaled, vae.decode(eps / 0.5).sample)


def test_latent_channel_panel_shows_input_channels_and_reconstruction(vae):
    panel = latent_channel_panel(vae, torch.rand(3, RES, RES) * 2 - 1)
    # 6 panels (input, 4 channels at f = 2 x nearest, reconstruction) of >= RES px, 4 px apart, under a caption.
    assert panel.height == RES + 16 and panel.width >= 6 * RES + 5 * 4


def test_curves_skip_constant_series_and_a_truncated_line(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl")
    series = read_metrics(tmp_path / "metrics.jsonl")
    assert series["val/psnr"] == ([0, 10], [10.0, 15.0]) and len(series["loss"][0]) == 10
    img = plot_curves(tmp_path / "metrics.jsonl", columns=3)
    # val/psnr, val/ssim, loss, kl_loss (g_loss is constant): two rows of 360 x 220 panels.
    assert img.size == (3 * 360 + 2 * 6, 2 * 220 + 6)
    with pytest.raises(FileNotFoundError, match="metrics"):
        plot_curves(tmp_path / "nothing.jsonl")


def test_inspect_vae_command_writes_every_picture(tmp_path, vae):
    run = tmp_path / "run"
    export_vae(vae, run / "vae")
    write_metrics(run / "metrics.jsonl")
    a, b = write_photos(tmp_path / "photos", n=2, size=(20, 28))
    script = runpy.run_path(str(REPO / "scripts" / "inspect_vae.py"), run_name="inspect_vae")
    script["main"](["--vae", str(run), "--images", str(a), str(b), "--resolution", str(RES), "--steps", "4",
                    "--num-prior", "3", "--out", str(tmp_path / "out")])
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "curves.png", "interpolation.gif", "interpolation.png", "latent_channels_photo_00.png",
        "latent_channels_photo_01.png", "prior_samples.png"]
    gif = Image.open(out / "interpolation.gif")
    assert gif.n_frames == 4 + 2  # forth (4) and back without repeating the ends (2)
    strip = Image.open(out / "interpolation.png")
    assert strip.height == RES + 16 and strip.width >= 6 * RES + 5 * 2  # a | 4 decodes | b, captioned
    # The strip's first panel is the same crop eval_vae evaluates.
    crop = ((load_eval_image(a, RES)[0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(strip.crop((0, 16, RES, 16 + RES))), crop)
    with pytest.raises(SystemExit, match="does not exist"):
        script["main"](["--vae", str(run), "--images", str(tmp_path / "nope.png"), "--out", str(out)])
