"""What the probe and the sample metrics measure: DCT spectrum, i.i.d. reference, split by
source photo, sliced Wasserstein distance, KID spread, the interpolation check."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from scipy.stats import wasserstein_distance

from latent_diffusion.config import load_config
from latent_diffusion.encode import SourceImages, list_sources
from latent_diffusion.evaluate import inception_metrics
from latent_diffusion.model import build_noise_scheduler
from latent_diffusion.probe import PROBE_CONFIG, iid_gaussian_loss, interpolation_check, prepare_probe_images, slerp
from latent_diffusion.spectrum import latent_spectrum
from latent_diffusion.swd import laplacian_pyramid, pyr_up, sliced_wasserstein, swd
from latent_diffusion.train import validation_timesteps

# ---- the DCT spectrum -----------------------------------------------------------------


def power_law_crops(n: int, exponent: float = 2.0, size: int = 64, crop: int = 8, seed: int = 0) -> torch.Tensor:
    """8 x 8 crops of periodic Gaussian fields with power ~ 1/f^exponent: (n * 64, 4, 8, 8)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.sqrt(torch.fft.fftfreq(size)[:, None] ** 2 + torch.fft.fftfreq(size)[None, :] ** 2)
    amplitude = torch.where(k > 0, k.clamp_min(1e-12) ** (-exponent / 2), torch.zeros(()))
    field = torch.fft.ifft2(torch.fft.fft2(torch.randn(n, 4, size, size, generator=g)) * amplitude).real
    tiles = field.unfold(2, crop, crop).unfold(3, crop, crop)  # (n, 4, 8, 8, crop, crop)
    return tiles.permute(0, 2, 3, 1, 4, 5).reshape(-1, 4, crop, crop)


def test_dct_spectrum_reads_a_ramp_as_smooth_and_white_noise_at_its_reference():
    y, x = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    ramp = latent_spectrum([(x + 0.5 * y)[None, None].expand(2, 4, 8, 8)])
    assert ramp["high_frequency_fraction"] < 0.002  # the FFT's wrap-around edge read 0.16 here
    assert ramp["transform"] == "dct-ii-ortho"
    field = latent_spectrum([power_law_crops(16)])["high_frequency_fraction"]
    assert 0.25 < field < 0.35  # 0.30 measured; the FFT read 0.41 on the same crops
    white = latent_spectrum([torch.randn(2000, 4, 8, 8, generator=torch.Generator().manual_seed(0))])
    assert white["white_noise_fraction"] == pytest.approx(47 / 63)  # the orthonormal DCT of white noise is white
    assert white["high_frequency_fraction"] == pytest.approx(white["white_noise_fraction"], abs=0.01)
    assert latent_spectrum([torch.randn(50, 4, 64, 64)])["white_noise_fraction"] == pytest.approx(1 - math.pi / 16,
                                                                                                 abs=0.01)


# ---- the i.i.d. reference -------------------------------------------------------------


def probe_alphas() -> torch.Tensor:
    """alpha_bar at the probe's validation timesteps (its noise schedule, its val/loss timesteps)."""
    cfg = load_config(PROBE_CONFIG)
    return build_noise_scheduler(cfg.noise).alphas_cumprod[validation_timesteps(cfg.noise.num_train_timesteps)]


def test_iid_reference_is_the_mse_of_the_best_predictor_knowing_channel_means_and_variances():
    a = probe_alphas().double()
    # Channel means (0, 0, 2, -2), unit within-channel variance, normalised globally as the
    # probe does: global variance 1 + mean(mu^2) = 3, so each v_c = 1/3 and mu_c / sqrt(3).
    mu = torch.tensor([0.0, 0.0, 2.0, -2.0], dtype=torch.float64) / math.sqrt(3)
    var = torch.full((4,), 1 / 3, dtype=torch.float64)
    assert iid_gaussian_loss([1.0] * 4, a) == pytest.approx(0.373, abs=5e-4)  # the figures
    assert iid_gaussian_loss(var.tolist(), a) == pytest.approx(0.245, abs=5e-4)
    g = torch.Generator().manual_seed(0)
    x0 = mu[:, None] + var.sqrt()[:, None] * torch.randn(4, 200_000, generator=g, dtype=torch.float64)
    mse = []
    for at in a:
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        xt = at.sqrt() * x0 + (1 - at).sqrt() * eps
        eps_hat = (1 - at).sqrt() * (xt - at.sqrt() * mu[:, None]) / (at * var[:, None] + 1 - at)
        mse.append(((eps - eps_hat) ** 2).mean())
    assert iid_gaussian_loss(var.tolist(), a) == pytest.approx(float(torch.stack(mse).mean()), rel=5e-3)
    # No predictor that knows only the moments does better: shrinking by another factor costs.
    at = a[4]
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    xt = at.sqrt() * x0 + (1 - at).sqrt() * eps
    best = (1 - at).sqrt() * (xt - at.sqrt() * mu[:, None]) / (at * var[:, None] + 1 - at)
    assert ((eps - best) ** 2).mean() < ((eps - 0.9 * best) ** 2).mean()
    assert ((eps - best) ** 2).mean() < ((eps - 1.1 * best) ** 2).mean()


# ---- split by source photo ------------------------------------------------------------


def write_tiles(folder: Path, photos: int = 5, tiles: int = 4) -> None:
    """photo_P_T.png: tiles T of photos P (each photo one random colour field)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for p in range(photos):
        base = rng.integers(0, 255, (24, 24, 3))
        for t in range(tiles):
            Image.fromarray(np.roll(base, 3 * t, axis=1).astype(np.uint8)).save(folder / f"photo{p}_{t}.png")


def photos_of(folder: Path, names: list[str]) -> set[str]:
    return {names[int(p.stem)].split("/")[-1].rsplit("_", 1)[0] for p in folder.glob("*.png")}


def test_no_source_photo_straddles_the_split(tmp_path):
    write_tiles(tmp_path / "tiles")
    info = prepare_probe_images(tmp_path / "tiles", 16, tmp_path / "by-photo", heldout_fraction=0.4,
                                source_pattern=r"(photo\d+)_\d+\.png$")
    train, held = (photos_of(tmp_path / "by-photo" / part, info["sources"]) for part in ("train", "heldout"))
    assert not train & held and len(train | held) == 5
    assert (info["num_train_sources"], info["num_heldout_sources"]) == (3, 2)
    assert (info["num_train"], info["num_heldout"]) == (12, 8)
    # Without the pattern every file is its own photo: tiles of one photo land on both sides.
    info = prepare_probe_images(tmp_path / "tiles", 16, tmp_path / "by-file", heldout_fraction=0.4)
    train, held = (photos_of(tmp_path / "by-file" / part, info["sources"]) for part in ("train", "heldout"))
    assert train & held and info["num_heldout_sources"] == 8
    with pytest.raises(ValueError, match=r"--source-pattern 'cat' matches nothing in 'photo0_0.png'"):
        prepare_probe_images(tmp_path / "tiles", 16, tmp_path / "bad", source_pattern="cat")


def test_demo_holds_out_the_tiles_of_its_validation_photos(tmp_path):
    info = prepare_probe_images("demo", 64, tmp_path / "demo", max_images=60)  # every 5th tile: all 9 photos
    names = info["sources"]
    held = {Path(names[int(p.stem)].split("#")[0]).name for p in (tmp_path / "demo" / "heldout").glob("*.png")}
    train = {Path(names[int(p.stem)].split("#")[0]).name for p in (tmp_path / "demo" / "train").glob("*.png")}
    assert held == {"chelsea.png", "coffee.png"} and not train & held
    assert (info["num_train_sources"], info["num_heldout_sources"]) == (7, 2)
    assert info["num_train"] + info["num_heldout"] == 60


# ---- sliced Wasserstein distance --------------------------------------------------------


@pytest.fixture(scope="module")
def demo_tiles() -> torch.Tensor:
    """The 308 demo tiles at 64 px as 8-bit values (float): natural photos, no download."""
    sources, _, _ = list_sources("demo", 64)
    loader = SourceImages(sources, 64)
    return ((torch.stack([loader[i][1] for i in range(len(sources))]) + 1) * 127.5).round()


FAST = dict(patches_per_image=16, num_directions=128)


def test_sliced_wasserstein_is_the_1d_wasserstein_distance_along_each_direction():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 1, generator=g), 2 + 0.5 * torch.randn(500, 1, generator=g)
    assert sliced_wasserstein(a, b, torch.ones(1, 1)) == pytest.approx(wasserstein_distance(a[:, 0], b[:, 0]), rel=1e-5)
    a3, b3 = torch.randn(400, 3, generator=g), torch.randn(400, 3, generator=g) * 2
    d = torch.nn.functional.normalize(torch.randn(3, 5, generator=g), dim=0)
    want = np.mean([wasserstein_distance((a3 @ d[:, k]).numpy(), (b3 @ d[:, k]).numpy()) for k in range(5)])
    assert sliced_wasserstein(a3, b3, d) == pytest.approx(want, rel=1e-5)


def test_laplacian_pyramid_rebuilds_the_images_exactly(demo_tiles):
    levels = laplacian_pyramid(demo_tiles[:8], 3)
    assert [tuple(level.shape[-2:]) for level in levels] == [(64, 64), (32, 32), (16, 16)]
    rebuilt = levels[-1]
    for level in levels[-2::-1]:
        rebuilt = pyr_up(rebuilt) + level
    assert torch.allclose(rebuilt, demo_tiles[:8], atol=1e-3)


def test_swd_ranks_real_blurred_and_colour_cast_sets(demo_tiles):
    a, b = demo_tiles[0::2], demo_tiles[1::2]  # two halves of the same photos
    assert swd(a, a, **FAST)["average"] == 0.0  # identical sets: same patches, same directions
    real = swd(a, b, **FAST)
    blurred = swd(a, TF.gaussian_blur(b, 9, 1.0), **FAST)
    cast = swd(a, (b + torch.tensor([20.0, 0.0, -20.0])[None, :, None, None]).clamp(0, 255), **FAST)
    assert blurred["average"] > 2 * real["average"] and cast["average"] > 1.5 * real["average"]
    # Each leaves its signature where it belongs: blur in the finest band, a cast in the low-pass level.
    assert blurred["levels"]["64"] > 5 * real["levels"]["64"]
    assert cast["levels"]["16"] > 2 * real["levels"]["16"] and cast["levels"]["64"] < 1.5 * real["levels"]["64"]
    # Built to fool ProGAN's own normalisation (each set by its own statistics): a cast vanishes.
    per_set = swd(a, (b + torch.tensor([20.0, 0.0, -20.0])[None, :, None, None]).clamp(0, 255), normalize="per_set",
                  **FAST)
    assert per_set["average"] < 1.2 * swd(a, b, normalize="per_set", **FAST)["average"]
    with pytest.raises(ValueError, match="at least 16 px"):
        swd(a[:, :, :8, :8], b[:, :, :8, :8])


def test_kid_below_1000_images_reports_a_real_spread():
    g = torch.Generator().manual_seed(0)
    gen, ref = torch.randn(50, 64, generator=g), torch.randn(60, 64, generator=g) + 0.3
    kid = inception_metrics(gen, ref)["kid"]
    assert kid["subset_size"] == 25 and kid["std"] > 0  # subsets of all 50 were one set: std exactly 0
    tiny = inception_metrics(gen[:3], ref[:3])
    assert tiny["kid"] == "unavailable" and "at least 2 images" in tiny["kid_note"]


# ---- the interpolation check ------------------------------------------------------------


def test_slerp_stays_on_the_sphere_and_hits_its_ends():
    z1, z2 = torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1)
    z1[0, 0], z2[0, 1] = 3.0, 3.0  # orthogonal, norm 3
    mid = slerp(z1, z2, 0.5)
    assert mid.norm() == pytest.approx(3.0, rel=1e-5) and (0.5 * (z1 + z2)).norm() < 2.2  # lerp cuts the corner
    assert torch.allclose(mid.flatten(), torch.tensor([3.0, 3.0]) / math.sqrt(2), atol=1e-5)
    assert torch.allclose(slerp(z1, z2, 0.0), z1, atol=1e-5) and torch.allclose(slerp(z1, z2, 1.0), z2, atol=1e-5)
    assert torch.equal(slerp(z1, z1, 0.5), z1)  # same direction: the linear fallback


def test_interpolation_check_decodes_midpoints_to_the_nearest_training_latent(tmp_path, random_inception_weights):
    from test_ldm import tiny_vae

    tiny_vae(0).save_pretrained(tmp_path / "vae")
    write_tiles(tmp_path / "src", photos=6, tiles=1)
    prepare_probe_images(tmp_path / "src", 16, tmp_path / "images", heldout_fraction=0.34)
    out = interpolation_check(tmp_path / "vae", tmp_path / "images", fid="auto", inception_weights=random_inception_weights)
    assert out["num_heldout"] == 2 and out["num_train"] == 4
    assert isinstance(out["fid"], float) and isinstance(out["fid_reconstruction"], float)
    assert "biased upward" in out["fid_note"]
    assert out["swd"]["average"] != out["swd_reconstruction"]["average"]
    # Held-out crops that are also training crops: each is its own nearest neighbour, the
    # midpoint is the latent itself, and the interpolation score is the reconstruction's.
    for p in (tmp_path / "images" / "heldout").glob("*.png"):
        shutil.copy(p, tmp_path / "images" / "train" / f"copy-{p.name}")
    same = interpolation_check(tmp_path / "vae", tmp_path / "images")  # fid="off"
    assert same["fid"] == "unavailable" and same["neighbour_cosine"]["min"] == pytest.approx(1.0, abs=1e-5)
    assert same["swd"]["average"] == pytest.approx(same["swd_reconstruction"]["average"], rel=1e-4)
