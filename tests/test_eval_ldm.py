"""eval_ldm: the Frechet distance, the memorisation check, the optional feature networks, the command."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from conftest import reset_accelerate_state, write_photos
from lat.commands.eval_ldm import main as eval_ldm_main
from latent_diffusion.encode import encode_latents
from latent_diffusion.evaluate import evaluate_ldm, frechet_distance, load_reference, memorisation
from latent_diffusion.export import save_pipeline
from test_ldm import tiny_pipeline, tiny_vae

REPO = Path(__file__).resolve().parents[1]
RES = 16  # the tiny pipeline's image size


def scipy_fd(a: np.ndarray, b: np.ndarray) -> float:
    """FID's formula, directly: scipy's matrix square root of S_a S_b."""
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def test_frechet_distance_matches_a_direct_scipy_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))  # correlated features
    b = rng.normal(size=(300, 16)) * 1.5 + 0.3
    assert frechet_distance(a, b) == pytest.approx(scipy_fd(a, b), rel=1e-9)
    assert frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float()) == pytest.approx(
        scipy_fd(a, b), rel=1e-5)
    # Fewer samples than dimensions (the nuclear-norm route): scipy agrees on the singular case too.
    c, d = rng.normal(size=(10, 32)) @ rng.normal(size=(32, 32)), rng.normal(size=(12, 32)) + 0.5
    assert frechet_distance(c, d) == pytest.approx(scipy_fd(c, d), rel=1e-6)
    with pytest.raises(ValueError, match="feature dimensions differ: 16 vs 8"):
        frechet_distance(a, b[:, :8])
    with pytest.raises(ValueError, match=r"need \(N >= 2, D\) features"):
        frechet_distance(a[:1], b)


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_noise():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))
    assert abs(frechet_distance(a, a)) < 1e-9
    fds = [frechet_distance(a, a + rng.normal(size=a.shape) * s) for s in (0.1, 0.3, 1.0, 3.0)]
    assert 0 < fds[0] < fds[1] < fds[2] < fds[3], fds
    # Fewer samples than dimensions: singular covariances work; the square roots of their
    # zero eigenvalues (round-off ~1e-16) leave ~1e-7 of the trace (~30) behind.
    few = rng.normal(size=(12, 32))
    assert abs(frechet_distance(few, few)) < 1e-5 and frechet_distance(few, few + 1) == pytest.approx(32, rel=1e-6)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """10 training photos, 4 held-out ones (16 px centre crops) and a tiny random flow pipeline."""
    root = tmp_path_factory.mktemp("eval_ldm")
    write_photos(root / "train", n=10, size=(20, 24), seed=3)
    write_photos(root / "heldout", n=4, size=(20, 24), seed=4)
    save_pipeline(tiny_pipeline(prediction_type="flow"), root / "pipe")
    return root


def test_memorisation_finds_a_planted_copy_of_a_training_image(setup, tmp_path):
    train = load_reference(setup / "train", RES, progress=False)
    samples = tmp_path / "samples"
    samples.mkdir()
    board = (np.indices((RES, RES)).sum(0) % 2 * 255).astype(np.uint8)  # far from every smooth photo
    for i in range(5):
        Image.fromarray(np.stack([board, np.roll(board, i, 0), 255 - board], -1)).save(samples / f"{i:06d}.png")
    Image.fromarray(train["images"][6].permute(1, 2, 0).numpy()).save(samples / "000005.png")  # training image 6
    report = evaluate_ldm(setup / "pipe", setup / "train", out=tmp_path / "r.json", samples=samples, fid="off",
                          dinov2="off", batch_size=4, progress=False)

    mem = report["memorisation"]
    top = mem["closest"][0]
    assert top["sample"] == "000005.png" and top["train_index"] == 6 and top["pixel_rms"] == 0
    assert top["latent_rms"] < 1e-5 and top["latent_nn_is_same_image"]
    for space in ("pixel", "latent"):  # (the yardsticks of a random VAE mean nothing: see the next test)
        assert mem[space]["samples_to_train"]["min"] < 1e-5 < mem[space]["samples_to_train"]["p05"]
        assert set(mem[space]) == {"samples_to_train", "baseline_to_train", "copy_floor", "median_ratio",
                                   "fraction_below_baseline_p05", "copy_cutoff", "near_copies"}
    rows = list(csv.DictReader(open(tmp_path / "r_nearest.csv")))
    assert [r["sample"] for r in rows] == [f"{i:06d}.png" for i in range(6)]
    assert rows[5]["pixel_nearest"] == train["names"][6] and float(rows[5]["pixel_rms"]) == 0
    assert report["samples"]["num_images"] == 6 and report["reference"]["num_images"] == 10
    assert report["reference"]["kind"] == "folder" and "leave-one-out" in report["notes"]["memorisation"]
    assert report["fid"] == "unavailable" and report["notes"]["inception"] == "not computed (fid=off)"
    assert report["latent_fd"] > 0 and report["model"]["prediction_type"] == "flow"
    assert json.loads((tmp_path / "r.json").read_text())["latent_fd"] == report["latent_fd"]
    sheet = Image.open(tmp_path / "r_closest8.png")
    assert sheet.height > 6 * RES  # one row per sample (6 < 8)


def test_near_copies_are_counted_where_copies_and_new_images_are_apart():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(50, 64, generator=g)
    trips = train + 0.05 * torch.randn(50, 64, generator=g)  # a good VAE's round trips
    floor = (trips - train).pow(2).mean(1).sqrt()
    samples = torch.cat([train[[3, 7]] + 0.05 * torch.randn(2, 64, generator=g), torch.randn(8, 64, generator=g)])
    m = memorisation(samples, train, trips, floor, leave_one_out=True)
    assert m["near_copies"] == 2 and m["nn_index"][:2] == [3, 7]
    assert 0.2 <= m["fraction_below_baseline_p05"] <= 0.4  # the copies, and about 5% of 8 new vectors
    assert m["baseline_to_train"]["p05"] > 1 > 0.1 > m["copy_floor"]["max"]  # leave-one-out: the nearest OTHER image
    assert m["median_ratio"] == pytest.approx(1, abs=0.1)  # 8 of 10 samples are new images
    blurry = memorisation(samples, train, trips, floor + 2, leave_one_out=True)  # a VAE that moves images far
    assert blurry["near_copies"] is None


HUBCONF = '''
import torch


def dinov2_vitl14(**kwargs):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 8))
'''


def test_inception_and_dinov2_metrics_come_from_local_weights(setup, tmp_path, random_inception_weights, monkeypatch):
    hub = tmp_path / "torch-home" / "hub"  # a stand-in DINOv2 in torch.hub's cache layout
    (hub / "facebookresearch_dinov2_main").mkdir(parents=True)
    (hub / "facebookresearch_dinov2_main" / "hubconf.py").write_text(HUBCONF)
    (hub / "checkpoints").mkdir()
    torch.save({"weight": torch.zeros(1)}, hub / "checkpoints" / "dinov2_vitl14_pretrain.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    report = evaluate_ldm(setup / "pipe", setup / "train", out=tmp_path / "r.json", num_images=4, max_reference=4,
                          steps=2, inception_weights=random_inception_weights, batch_size=8, progress=False)
    assert isinstance(report["fid"], float) and report["fid"] >= 0
    assert isinstance(report["kid"]["mean"], float) and report["kid"]["subset_size"] == 2  # 4 images: half-size subsets
    assert "half the set" in report["notes"]["kid"]
    assert 0 <= report["precision"] <= 1 and 0 <= report["recall"] <= 1
    assert "biased upward" in report["notes"]["inception"]
    assert isinstance(report["fd_dinov2"], float) and report["fd_dinov2"] > 0
    assert "facebookresearch_dinov2_main" in report["notes"]["dinov2"]


def test_inception_metrics_see_identical_shifted_and_swapped_sets(tmp_path, scaled_inception_weights, setup,
                                                                   monkeypatch):
    """Identical sets: FID ~ 0, KID ~ 0, precision = recall = 1; a set 40 levels brighter scores worse;
    swapping samples and reference swaps precision and recall (Kynkaanniemi et al. 2019)."""
    import latent_diffusion.evaluate as ev

    photos = write_photos(tmp_path / "a", n=6, size=(RES, RES), seed=3)  # the sample size: no resampling
    (tmp_path / "b").mkdir()
    for p in photos:
        brighter = np.asarray(Image.open(p)).astype(int) + 40
        Image.fromarray(brighter.clip(0, 255).astype(np.uint8)).save(tmp_path / "b" / p.name)
    seen, extract = {}, ev.extract_features

    def once(net, images, *args):  # each set's features are computed once (InceptionV3 on CPU is slow)
        key = (type(net).__name__, images.numpy().tobytes())
        if key not in seen:
            seen[key] = extract(net, images, *args)
        return seen[key]

    monkeypatch.setattr(ev, "extract_features", once)

    def metrics(samples, reference):
        return evaluate_ldm(setup / "pipe", tmp_path / reference, out=tmp_path / f"{samples}-{reference}.json",
                            samples=tmp_path / samples, dinov2="off", inception_weights=scaled_inception_weights,
                            batch_size=8, progress=False)

    same, shifted, swapped = metrics("a", "a"), metrics("b", "a"), metrics("a", "b")
    assert len(seen) == 2  # the features of a and of b
    assert shifted["fid"] > 1 and abs(same["fid"]) < 1e-9 * shifted["fid"]
    # KID (Binkowski et al. 2018): the unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, averaged over
    # random subsets (the report's count, size and seed; drawn as the reference code draws them).
    # Its cross term keeps the pairs i = j, so identical sets score slightly below 0, not 0.
    fa, fb = (f.double().numpy() for f in seen.values())

    def kid(x, y, settings):
        rng, mmds = np.random.RandomState(settings["seed"]), []
        for _ in range(settings["subsets"]):
            u = x[rng.choice(len(x), settings["subset_size"], replace=False)]
            v = y[rng.choice(len(y), settings["subset_size"], replace=False)]
            kxx, kyy, kxy = ((p @ q.T / p.shape[1] + 1) ** 3 for p, q in ((u, u), (v, v), (u, v)))
            m = len(u)
            mmds.append((kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * (m - 1)) - 2 * kxy.sum() / m**2)
        return np.mean(mmds)

    assert same["kid"]["mean"] == pytest.approx(kid(fa, fa, same["kid"]), rel=1e-4, abs=1e-7)
    assert shifted["kid"]["mean"] == pytest.approx(kid(fb, fa, shifted["kid"]), rel=1e-4)
    assert abs(same["kid"]["mean"]) < 0.2 * shifted["kid"]["mean"]  # ~0 next to a set 40 levels brighter
    assert same["precision"] == same["recall"] == 1.0
    assert shifted["precision"] < 1.0  # some brighter images lie outside the originals' k-NN balls
    assert (swapped["precision"], swapped["recall"]) == (shifted["recall"], shifted["precision"])
    assert swapped["fid"] == pytest.approx(shifted["fid"], rel=1e-9)  # FID is symmetric


def test_eval_ldm_command_generates_samples_against_a_latent_cache(setup, tmp_path, monkeypatch):
    tiny_vae().save_pretrained(tmp_path / "vae")
    encode_latents(tmp_path / "vae", setup / "train", tmp_path / "latents", resolution=RES, batch_size=4, num_workers=0)
    reset_accelerate_state()
    cache, folder = load_reference(tmp_path / "latents", RES, progress=False), load_reference(setup / "train", RES,
                                                                                             progress=False)
    assert cache["kind"] == "latent_cache" and torch.equal(cache["images"], folder["images"])  # the crops it encoded
    with pytest.raises(SystemExit, match="error: scheduler 'ddim' does not fit a model trained with prediction_type"):
        eval_ldm_main(["--model", str(setup / "pipe"), "--reference", str(tmp_path / "latents"), "--scheduler", "ddim"])

    out = tmp_path / "eval" / "report.json"
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch-home")}  # no weights there: nothing is downloaded
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "eval_ldm.py"), "--model", str(setup / "pipe"), "--reference",
         str(tmp_path / "latents"), "--heldout", str(setup / "heldout"), "--num-images", "4", "--steps", "2",
         "--scheduler", "flow_heun", "--guidance-scale", "2", "--seed", "3", "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.json", "report_closest8.png", "report_nearest.csv",
                                                            "report_samples"]
    assert report["samples"]["num_images"] == 4 and report["samples"]["seed"] == 3
    assert report["samples"]["scheduler"] == "FlowMatchHeunDiscreteScheduler" and report["samples"]["guidance_scale"] == 2
    assert report["reference"] == {**report["reference"], "kind": "latent_cache", "num_images": 10}
    assert report["heldout"]["num_images"] == 4 and "held-out images" in report["notes"]["memorisation"]
    assert "weights-inception-2015-12-05-6726825d.pth" in report["notes"]["inception"] and report["fid"] == "unavailable"
    assert "dinov2_vitl14_pretrain.pth" in report["notes"]["dinov2"] and report["fd_dinov2"] == "unavailable"
    assert report["run"]["versions"]["torch"] and report["run"]["versions"]["diffusers"]
    assert "latent FD" in proc.stdout and "inception metrics unavailable" in proc.stdout
    # Always, without any weights: SWD of the samples against the held-out images, and its floor.
    assert report["swd"]["num_reference"] == report["swd_floor"]["num_reference"] == 4 and report["swd"]["average"] > 0
    assert set(report["swd"]["levels"]) == {str(RES)} and "held-out images" in report["notes"]["swd"]
    assert "SWD x1e3" in proc.stdout and "floor (held-out vs reference)" in proc.stdout
