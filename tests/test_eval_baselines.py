"""The references every reconstruction report carries: bicubic down-and-up, and the colour error."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from PIL import Image

import autoencoderkl.evaluate as evaluate
from autoencoderkl.evaluate import evaluate_vae
from autoencoderkl.metrics import (
    COLOUR_JND,
    bicubic_down_up,
    chroma_gain,
    mean_colour_error,
    psnr_ssim_8bit,
    srgb_to_lab,
)
from conftest import write_photos

RES = 32  # crop side; the stand-in VAEs below have f = 8, so the bicubic thumbnail is 4 x 4


class StandInVAE(AutoencoderKL):
    """An AutoencoderKL whose encode/decode are fixed functions of the image, for known answers.

    ``z`` is the image itself (posterior mean x, log-variance -30); ``decode`` applies ``kind``:
    identity, constant grey, a red tint, a mean-preserving blur, or a sepia toning. Four resolution levels of
    width 8, so the report's factor is f = 8 as for kl-f8.
    """

    def __init__(self, kind: str = "identity"):
        super().__init__(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=3, norm_num_groups=4)
        self.kind = kind

    def encode(self, x, return_dict=True):
        moments = torch.cat([x, torch.full_like(x, -30.0)], 1)
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(moments))

    def decode(self, z, return_dict=True, generator=None):
        if self.kind == "constant":
            out = torch.zeros_like(z)
        elif self.kind == "tint":  # +16 levels of red, -16 of green: a magenta cast
            out = (z + torch.tensor([0.125, -0.125, 0.0]).view(1, 3, 1, 1)).clamp(-1, 1)
        elif self.kind == "blur":  # 4 x 4 block means: detail lost, every block's mean colour kept
            out = F.interpolate(F.avg_pool2d(z, 4), scale_factor=4, mode="nearest")
        elif self.kind == "sepia":  # luminance kept, colour replaced by a brown toning (what short runs return)
            luma = (torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1) * z).sum(1, keepdim=True)
            out = (luma + (luma + 1) * torch.tensor([0.08, 0.0, -0.08]).view(1, 3, 1, 1)).clamp(-1, 1)
        else:
            out = z
        return DecoderOutput(sample=out)


@pytest.fixture
def photos(tmp_path) -> Path:
    write_photos(tmp_path / "photos", n=5, size=(40, 48))
    return tmp_path / "photos"


@pytest.fixture
def no_lpips_weights(monkeypatch):
    def unavailable(choice):
        raise RuntimeError("LPIPS needs torchvision's VGG16 ImageNet weights 'vgg16-397923af.pth' in /nowhere")

    monkeypatch.setattr(evaluate, "build_perceptual", unavailable)


def run(kind: str, photos: Path, out: Path) -> dict:
    return evaluate_vae(StandInVAE(kind), photos, out=out / kind / "report.json", resolution=RES, batch_size=2,
                        num_workers=0, fid="off", progress=False)


def test_bicubic_baseline_is_pillows_bicubic_down_and_up(photos):
    """Independent of our code: Pillow's BICUBIC to the 4 x 4 thumbnail (8-bit) and back to 32 x 32."""
    for path in sorted(photos.iterdir()):
        a = np.asarray(Image.open(path).convert("RGB").crop((8, 4, 8 + RES, 4 + RES)))
        pil = np.asarray(Image.fromarray(a).resize((4, 4), Image.BICUBIC).resize((RES, RES), Image.BICUBIC))
        x = torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        ours = ((bicubic_down_up(x, 8) + 1) * 127.5).round()[0].permute(1, 2, 0).numpy()
        diff = np.abs(ours - pil.astype(np.float64))
        assert diff.max() <= 2 and diff.mean() < 0.5  # Pillow rounds to 8 bits between its two passes
    with pytest.raises(ValueError, match="divisible by factor"):
        bicubic_down_up(torch.zeros(1, 3, 30, 32), 8)


def test_lab_conversion_agrees_with_scikit_image():
    skimage_color = pytest.importorskip("skimage.color")
    x = torch.rand(2, 3, 9, 11, generator=torch.Generator().manual_seed(0)) * 2 - 1
    want = skimage_color.rgb2lab(((x + 1) / 2).permute(0, 2, 3, 1).numpy())
    got = srgb_to_lab(x).permute(0, 2, 3, 1).numpy()
    assert np.abs(got - want).max() < 1e-3
    grey = srgb_to_lab(torch.zeros(1, 3, 2, 2))[0, :, 0, 0]
    assert abs(float(grey[1])) < 0.01 and abs(float(grey[2])) < 0.01  # neutral grey has (almost) no chroma


def test_identity_vae_beats_bicubic_and_a_constant_one_loses(photos, tmp_path, no_lpips_weights):
    ident, const = run("identity", photos, tmp_path), run("constant", photos, tmp_path)
    n = ident["data"]["num_images"]
    assert n == 5
    assert ident["vs_bicubic"]["psnr_wins"] == n and ident["vs_bicubic"]["ssim_wins"] == n
    assert const["vs_bicubic"]["psnr_wins"] == 0 and const["vs_bicubic"]["ssim_wins"] == 0
    assert const["vs_bicubic"]["psnr_margin"]["max"] < 0
    # The baseline is the same for both (it does not depend on the VAE) and matches a direct computation.
    assert ident["bicubic"] == const["bicubic"] and ident["bicubic"]["factor"] == 8
    rows = list(csv.DictReader((tmp_path / "constant" / "report_per_image.csv").open()))
    for row in rows:
        x = evaluate.load_eval_image(row["path"], RES)[0][None]
        psnr_bic = float(psnr_ssim_8bit(x, bicubic_down_up(x, 8))[0][0])
        assert float(row["bicubic_psnr"]) == pytest.approx(psnr_bic, abs=1e-3)
        assert float(row["psnr_margin"]) == pytest.approx(float(row["psnr"]) - psnr_bic, abs=1e-3)
    # The worst-8 grid shows the bicubic reconstruction as a fourth panel.
    grid = Image.open(tmp_path / "constant" / "report_worst8.png")
    assert grid.width == max(4 * RES + 5 * 4, 320) and grid.height == 4 + n * (RES + 16 + 4)


def test_colour_figure_flags_a_tint_and_not_a_blur(photos, tmp_path, no_lpips_weights, capsys, monkeypatch):
    tint, blur = run("tint", photos, tmp_path), run("blur", photos, tmp_path)
    assert tint["colour"]["cast"] and tint["colour"]["error"]["min"] > COLOUR_JND
    assert tint["colour"]["shift_lab"][1] > 5  # a*: towards red/magenta
    assert tint["colour"]["reconstruction_mean_rgb"][0] > tint["colour"]["input_mean_rgb"][0] + 10
    assert not blur["colour"]["cast"] and blur["colour"]["error"]["max"] < 1.0
    assert tint["bicubic"]["colour_error"]["max"] < 1.0  # bicubic keeps the colour too

    # The command prints the baseline and names the cast in one line each.
    from lat.commands import eval_vae

    monkeypatch.setattr(evaluate, "load_vae", lambda path, config=None: StandInVAE("tint"))
    eval_vae.main(["--vae", "stand-in", "--data", str(photos), "--resolution", str(RES), "--num-workers", "0",
                   "--fid", "off", "--quiet", "--out", str(tmp_path / "cli" / "report.json")])
    out = capsys.readouterr().out
    # A tint costs PSNR (it loses to bicubic there) but little SSIM: the colour line is what shows it.
    assert "bicubic x8: PSNR" in out and "VAE wins 0/5 images (PSNR), 5/5 (SSIM)" in out
    assert "COLOUR CAST (> 2.3" in out


def test_mean_colour_error_ignores_zero_mean_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 1.2 - 0.6
    noisy = x + 0.1 * torch.randn(x.shape, generator=g)
    delta_e, _ = mean_colour_error(x, noisy)
    assert float(delta_e.max()) < 1.0
    assert float(psnr_ssim_8bit(x, noisy)[0].mean()) < 27  # yet PSNR sees the noise


def test_chroma_gain_flags_a_sepia_reconstruction_and_not_a_blur(photos, tmp_path, no_lpips_weights, capsys,
                                                                 monkeypatch):
    sepia, blur, ident = run("sepia", photos, tmp_path), run("blur", photos, tmp_path), run("identity", photos, tmp_path)
    assert sepia["colour"]["desaturated"] and abs(sepia["colour"]["chroma_gain"]["max"]) < 0.2
    assert not blur["colour"]["desaturated"] and blur["colour"]["chroma_gain"]["min"] > 0.8
    assert ident["colour"]["chroma_gain"]["min"] == pytest.approx(1.0, abs=1e-6)
    assert sepia["colour"]["num_chroma_images"] == 5 and not sepia["colour"]["oversaturated"]
    assert 0.8 < sepia["bicubic"]["chroma_gain"]["mean"] <= 1.0  # the baseline keeps the colour
    rows = list(csv.DictReader((tmp_path / "sepia" / "report_per_image.csv").open()))
    assert all(abs(float(r["chroma_gain"])) < 0.2 for r in rows)

    from lat.commands import eval_vae

    monkeypatch.setattr(evaluate, "load_vae", lambda path, config=None: StandInVAE("sepia"))
    eval_vae.main(["--vae", "stand-in", "--data", str(photos), "--resolution", str(RES), "--num-workers", "0",
                   "--fid", "off", "--quiet", "--out", str(tmp_path / "cli" / "report.json")])
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("chroma: "))
    assert line.startswith("chroma: colour kept (chroma gain) ") and line.endswith(": DESATURATED")


def test_chroma_gain_is_not_fooled_by_a_toning_and_skips_grey_inputs():
    g = torch.Generator().manual_seed(0)
    x = F.interpolate(torch.rand(2, 3, 4, 4, generator=g) * 1.6 - 0.8, size=16, mode="bilinear")  # smooth colours
    luma = (torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1) * x).sum(1, keepdim=True)
    grey = luma.expand_as(x)
    toned = (grey + (luma + 1) * torch.tensor([0.15, 0.0, -0.15]).view(1, 3, 1, 1)).clamp(-1, 1)  # a brown toning
    assert chroma_gain(x, x).sub(1).abs().max() < 1e-6
    assert chroma_gain(x, grey).abs().max() < 0.05
    # A toning has chroma of its own: a ratio of mean chroma would call it colour; the gain does not follow it.
    assert chroma_gain(x, toned).abs().max() < 0.35
    boosted = (grey + 1.3 * (x - grey)).clamp(-1, 1)
    assert (chroma_gain(x, boosted) > 1.15).all()
    assert chroma_gain(grey, x).isnan().all()  # a grey input has no colour to keep
    tinted = (x + torch.tensor([0.1, -0.1, 0.0]).view(1, 3, 1, 1)).clamp(-1, 1)  # a cast: the mean-colour error's job
    assert chroma_gain(x, tinted).sub(1).abs().max() < 0.15
    assert float(mean_colour_error(x, tinted)[0].min()) > COLOUR_JND
    with pytest.raises(ValueError, match="one shape"):
        chroma_gain(x, x[:, :, :8])
