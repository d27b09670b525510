"""Stage 1 validates on a held-out folder and measures its training photos the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from autoencoderkl.config import load_config
from autoencoderkl.data import ImageFolder, evenly_spaced, list_images
from autoencoderkl.metrics import psnr_ssim_8bit
from autoencoderkl.train import main
from conftest import tiny_overrides, write_photos


def direct_psnr_ssim(vae: AutoencoderKL, paths: list[Path]) -> tuple[float, float]:
    """Mean 8-bit PSNR/SSIM of the centre crops (16 px of the image resized to 24) through the posterior mode."""
    crops = ImageFolder(paths, 16, 24, train=False)
    x = torch.stack([crops[i] for i in range(len(crops))])
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    psnr, ssim = psnr_ssim_8bit(x, rec)
    return float(psnr.mean()), float(ssim.mean())


def test_val_dir_and_training_photos_are_logged_side_by_side(photo_dir, tmp_path):
    val_dir = tmp_path / "heldout"
    write_photos(val_dir, n=3, size=(40, 48), seed=7)  # other images than the training photos
    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(photo_dir, **{"data.val_dir": str(val_dir), "data.num_val_images": 3,
                                                         "data.num_train_val_images": 2}))
    main(cfg, out)

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val/psnr" in r]
    assert [r["step"] for r in val] == [0, 2, 4]
    assert all({"val/train_psnr", "val/train_ssim"} <= r.keys() for r in val)

    # The last validation is the exported model's: val/psnr on the held-out folder's 3 images,
    # val/train_psnr on 2 training photos spread over the folder (the first and the last).
    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    heldout = direct_psnr_ssim(vae, list_images(val_dir))
    seen_paths = evenly_spaced(list_images(photo_dir), 2)
    assert [p.name for p in seen_paths] == ["photo_00.png", "photo_05.png"]
    seen = direct_psnr_ssim(vae, seen_paths)
    assert val[-1]["val/psnr"] == pytest.approx(heldout[0], abs=1e-3)
    assert val[-1]["val/ssim"] == pytest.approx(heldout[1], abs=1e-4)
    assert val[-1]["val/train_psnr"] == pytest.approx(seen[0], abs=1e-3)
    assert val[-1]["val/train_ssim"] == pytest.approx(seen[1], abs=1e-4)
    assert abs(heldout[0] - seen[0]) > 1e-3  # two different sets, not one measured twice


def test_num_train_val_images_must_not_be_negative(photo_dir):
    with pytest.raises(ValueError, match="data.num_train_val_images must be >= 0"):
        load_config(None, tiny_overrides(photo_dir, **{"data.num_train_val_images": -1}))
