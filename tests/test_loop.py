"""The training-loop features both stages share, each checked against its definition.

Checkpoint pruning, learning-rate warm-up and schedules, gradient clipping, EMA export,
the held-out split, the measured latent factors, classifier-free-guidance label dropout,
the VAE recorded in a latent cache, and gradient accumulation. Two short runs per stage
(module fixtures, a few seconds each) carry the end-to-end checks; the rest call the
functions directly.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from diffusers import AutoencoderKL
from safetensors.torch import load_file

import autoencoderkl.train as vae_train
import latent_diffusion.train as ldm_train
from autoencoderkl.checkpoints import list_checkpoints, save_checkpoint
from autoencoderkl.config import load_config
from autoencoderkl.faults import NonFiniteGuard
from autoencoderkl.loop import optimizer_step
from autoencoderkl.model import estimate_latent_factors
from conftest import reset_accelerate_state, tiny_overrides, write_photos
from latent_diffusion.config import load_config as load_ldm_config
from test_ldm import cache, overrides  # noqa: F401  (cache is a fixture)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def logged(out: Path, key: str) -> dict[int, float]:
    """step -> the value of ``key`` on the training lines of metrics.jsonl."""
    return {r["step"]: r[key] for r in read_metrics(out) if key in r}


# ---- stage 1: one 5-step run with warm-up + cosine, clipping, EMA, the default pruning ----


STAGE1_LR = 1e-3


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> dict:
    """5 steps, a checkpoint every step (default limit: 3 kept), cosine after 2 warm-up steps,
    clipping at 0.5, EMA, a measured shift; spies record what the loop hands its helpers."""
    root = tmp_path_factory.mktemp("stage1")
    photos = write_photos(root / "photos", n=6)
    seen: dict = {"folders": [], "factors": [], "clip": set()}
    real_folder, real_estimate = vae_train.ImageFolder, vae_train.estimate_latent_factors
    real_step = vae_train.optimizer_step

    def folder(paths, *args, **kwargs):
        seen["folders"].append((list(paths), kwargs.get("train", True)))
        return real_folder(paths, *args, **kwargs)

    def estimate(vae, images, *args, **kwargs):
        rng = torch.get_rng_state()  # the draws of the posterior samples start here
        result = real_estimate(vae, images, *args, **kwargs)
        seen["factors"].append({"rng": rng, "images": images.detach().clone(), "result": result})
        return result

    def step(accelerator, optimizer, parameters, max_grad_norm, guard, name):
        seen["clip"].add((name, max_grad_norm))
        return real_step(accelerator, optimizer, parameters, max_grad_norm, guard, name)

    cfg = load_config(None, tiny_overrides(root / "photos", **{
        "train.max_steps": 5, "train.checkpointing_steps": 1, "train.validation_steps": 100,
        "optim.lr": STAGE1_LR, "optim.lr_scheduler": "cosine", "optim.lr_warmup_steps": 2, "optim.max_grad_norm": 0.5,
        "train.use_ema": "true", "train.ema_decay": 0.5, "model.measure_shift_factor": "true"}))
    assert cfg.train.checkpoints_total_limit == 3  # the default, not set above
    reset_accelerate_state()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(vae_train, "ImageFolder", folder)
        m.setattr(vae_train, "estimate_latent_factors", estimate)
        m.setattr(vae_train, "optimizer_step", step)
        summary = vae_train.main(cfg, root / "run")
    reset_accelerate_state()
    return {"out": root / "run", "summary": summary, "seen": seen, "photos": photos}


def test_stage1_keeps_the_newest_three_checkpoints_by_default(stage1):
    checkpoints = stage1["out"] / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000003", "step-0000004", "step-0000005"]


def test_stage1_learning_rate_warms_up_linearly_then_follows_the_cosine(stage1):
    """lr(s) = lr s / W for s < W, then lr (1 + cos(pi (s - W) / (S - W))) / 2; W = 2, S = 5.

    Logged after the scheduler's step s: the rate of optimizer step s + 1. The
    discriminator's scheduler follows the same global steps (its state in the checkpoint).
    """
    warmup, total = 2, 5

    def want(s: int) -> float:
        if s < warmup:
            return STAGE1_LR * s / warmup
        return STAGE1_LR * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))

    lr = logged(stage1["out"], "lr")
    assert sorted(lr) == [1, 2, 3, 4, 5]
    for s, value in lr.items():
        assert value == pytest.approx(want(s), rel=1e-12, abs=1e-18), f"step {s}"
    for name in ("scheduler.bin", "scheduler_1.bin"):  # autoencoder, discriminator
        state = torch.load(stage1["out"] / "checkpoints" / "step-0000004" / name, weights_only=True)
        assert state["last_epoch"] == 4 and state["_last_lr"] == [pytest.approx(want(4), rel=1e-12)], name


def test_stage1_clips_both_models_at_the_configured_norm(stage1):
    assert stage1["seen"]["clip"] == {("autoencoder", 0.5), ("discriminator", 0.5)}


def test_stage1_with_ema_exports_the_ema_weights(stage1):
    exported = AutoencoderKL.from_pretrained(stage1["out"] / "vae")
    shadow = load_file(stage1["out"] / "checkpoints" / "step-0000005" / "ema.safetensors")
    params = list(exported.parameters())
    assert len(shadow) == len(params)
    for i, p in enumerate(params):
        assert torch.equal(p, shadow[f"shadow.{i:05d}"]), f"parameter {i} is not the EMA's"
    trained = list(stage1["summary"]["vae"].parameters())
    assert not all(torch.equal(p, q) for p, q in zip(params, trained))  # decay 0.5: the EMA lags the raw weights


def test_stage1_holds_out_evenly_spaced_images_that_never_train(stage1):
    (train, is_train), (val, is_val), (measured, is_measured) = stage1["seen"]["folders"]
    assert is_train and not is_val and not is_measured
    assert set(measured) <= set(train)  # val/train_psnr: training photos, measured like the held-out ones
    photos = stage1["photos"]
    assert val == [photos[0], photos[5]]  # data.num_val_images=2 of 6, evenly spaced
    assert not set(train) & set(val) and sorted(train + val) == sorted(photos)


def test_stage1_exports_scaling_and_shift_measured_on_its_validation_latents(stage1):
    """scaling_factor = 1 / std and shift_factor = mean of the posterior samples z drawn at export."""
    [measured] = stage1["seen"]["factors"]
    exported = AutoencoderKL.from_pretrained(stage1["out"] / "vae").eval()
    assert (exported.config.scaling_factor, exported.config.shift_factor) == measured["result"]
    images = measured["images"]
    assert images.shape == (2, 3, 16, 16)  # the 2 held-out centre crops
    torch.set_rng_state(measured["rng"])  # the same posterior draws, from the exported weights
    with torch.no_grad():
        z = exported.encode(images).latent_dist.sample().double()
    assert exported.config.scaling_factor == pytest.approx(1 / z.std().item(), rel=1e-5)
    assert exported.config.shift_factor == pytest.approx(z.mean().item(), rel=1e-5, abs=1e-7)


# ---- stage 1: the helpers, directly -------------------------------------------------------


def tiny_accelerator() -> tuple[Accelerator, torch.nn.Module]:
    reset_accelerate_state()
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    model, _ = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    return accelerator, model


def test_save_checkpoint_keeps_the_newest_by_step_number_and_only_checkpoints(tmp_path):
    accelerator, _ = tiny_accelerator()
    (tmp_path / "checkpoints" / "notes").mkdir(parents=True)  # not a checkpoint: never pruned
    for step in (9_999_998, 9_999_999, 10_000_000):  # 7 then 8 digits: not in name order
        save_checkpoint(accelerator, tmp_path, step, {}, total_limit=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["notes", "step-10000000", "step-9999999"]
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-9999999", "step-10000000"]
    for step in (1, 2, 3):
        save_checkpoint(accelerator, tmp_path / "all", step, {}, total_limit=None)
    assert len(list_checkpoints(tmp_path / "all" / "checkpoints")) == 3


def test_optimizer_step_clips_the_global_norm_and_returns_it_unclipped():
    """SGD with lr 1 moves each weight by minus its (clipped) gradient: the clip is visible."""
    accelerator, _ = tiny_accelerator()
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = accelerator.prepare(torch.optim.SGD([a, b], lr=1.0))
    guard = NonFiniteGuard(max_consecutive=3)

    def step(max_grad_norm):
        with torch.no_grad():
            a.zero_(), b.zero_()
        a.grad, b.grad = torch.tensor([300.0, 0.0]), torch.tensor([0.0, 400.0])  # global norm 500
        return optimizer_step(accelerator, optimizer, [a, b], max_grad_norm, guard, "test")

    assert step(1.0).item() == pytest.approx(500.0)
    # The global norm is scaled to 1 (per-tensor clipping would give [-1, 0], [0, -1]).
    torch.testing.assert_close(torch.cat([a, b]).detach(), torch.tensor([-0.6, 0.0, 0.0, -0.8]))
    assert a.grad is None and b.grad is None  # zeroed after the step
    step(1000.0)  # above the norm: the gradient as it is
    torch.testing.assert_close(torch.cat([a, b]).detach(), torch.tensor([-300.0, 0.0, 0.0, -400.0]))
    assert step(None).item() == pytest.approx(500.0)  # None: measured, not clipped
    torch.testing.assert_close(torch.cat([a, b]).detach(), torch.tensor([-300.0, 0.0, 0.0, -400.0]))


def test_split_paths_holds_out_evenly_spaced_images_and_trains_on_the_rest(tmp_path):
    photos = write_photos(tmp_path / "photos", n=7)
    cfg = load_config(None, tiny_overrides(tmp_path / "photos", **{"data.num_val_images": 3}))
    train, val = vae_train.split_paths(cfg)
    assert val == [photos[0], photos[3], photos[6]]
    assert train == [photos[1], photos[2], photos[4], photos[5]]

    other = write_photos(tmp_path / "val", n=5, seed=1)
    cfg = load_config(None, tiny_overrides(tmp_path / "photos", **{"data.num_val_images": 3,
                                                                   "data.val_dir": str(tmp_path / "val")}))
    train, val = vae_train.split_paths(cfg)
    assert train == photos and val == [other[0], other[2], other[4]]  # a val_dir: every train_dir image trains


def test_split_paths_refuses_to_hold_out_every_image(tmp_path):
    write_photos(tmp_path / "photos", n=2)
    cfg = load_config(None, tiny_overrides(tmp_path / "photos", **{"data.num_val_images": 2}))
    folder = re.escape(str(tmp_path / "photos"))
    with pytest.raises(ValueError, match=rf"^{folder} has 2 images; holding out data.num_val_images=2 for validation "
                                         r"would leave none to train on\. Give data.val_dir or lower "
                                         r"data.num_val_images\.$"):
        vae_train.split_paths(cfg)


def test_estimate_latent_factors_are_one_over_std_and_mean_of_posterior_samples():
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                        latent_channels=4, sample_size=16).eval()
    images = torch.rand(5, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(1)
        scale, shift = estimate_latent_factors(vae, images, batch_size=2)
        torch.manual_seed(1)  # the same draws, batch by batch
        z = torch.cat([vae.encode(images[i : i + 2]).latent_dist.sample() for i in (0, 2, 4)]).double()
        mean = vae.encode(images).latent_dist.mean
    assert scale == pytest.approx(1 / z.std().item(), rel=1e-5) and shift == pytest.approx(z.mean().item(), rel=1e-5)
    # Samples, not the posterior mean: the means alone spread less.
    assert 1 / mean.std().item() != pytest.approx(scale, rel=1e-3)


# ---- stage 2: one 4-step run with linear warm-up/decay, label dropout 0.5, the cache's VAE ----


STAGE2_LR = 2e-3


@pytest.fixture(scope="module")
def stage2(cache, tmp_path_factory) -> dict:  # noqa: F811
    seen: dict = {"drops": []}
    real_drop = ldm_train.drop_labels

    def drop(labels, null_index, p):
        out = real_drop(labels, null_index, p)
        seen["drops"].append((labels.clone(), null_index, p, out.clone()))
        return out

    out = tmp_path_factory.mktemp("stage2") / "run"
    cfg = load_ldm_config(None, overrides(cache, **{
        "data.vae": "null", "optim.lr": STAGE2_LR, "optim.lr_scheduler": "linear", "optim.lr_warmup_steps": 2,
        "model.label_dropout": 0.5, "train.max_steps": 4, "train.validation_steps": 100,
        "train.checkpointing_steps": 100, "train.num_validation_samples": 0}))
    reset_accelerate_state()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ldm_train, "drop_labels", drop)
        summary = ldm_train.main(cfg, out)
    reset_accelerate_state()
    return {"out": out, "summary": summary, "seen": seen}


def test_stage2_learning_rate_warms_up_then_decays_linearly_to_zero(stage2):
    """lr(s) = lr s / W for s < W, then lr (S - s) / (S - W); W = 2, S = 4."""
    lr = logged(stage2["out"], "lr")
    assert lr == {1: pytest.approx(STAGE2_LR / 2), 2: pytest.approx(STAGE2_LR), 3: pytest.approx(STAGE2_LR / 2), 4: 0.0}


def test_stage2_drops_labels_to_the_null_class_at_the_configured_rate(stage2):
    drops = stage2["seen"]["drops"]
    assert len(drops) == 4  # one batch per step
    for labels, null_index, p, out in drops:
        assert (null_index, p) == (3, 0.5)  # 3 classes: the null class is index 3
        assert labels.max() < 3 and torch.equal(out[out != 3], labels[out != 3])
    dropped = torch.cat([out for *_, out in drops]) == 3
    assert 0 < dropped.sum() < len(dropped)  # 16 draws at p = 0.5


def test_stage2_decodes_with_the_vae_its_cache_records(cache, stage2):  # noqa: F811
    saved = yaml.safe_load((stage2["out"] / "config.yaml").read_text())
    assert saved["data"]["vae"] == str(cache["vae"]) == cache["index"]["vae"]["path"]
    pipe_vae = load_file(stage2["out"] / "pipeline" / "vae" / "diffusion_pytorch_model.safetensors")
    cache_vae = load_file(cache["vae"] / "diffusion_pytorch_model.safetensors")
    assert pipe_vae.keys() == cache_vae.keys() and all(torch.equal(pipe_vae[k], cache_vae[k]) for k in cache_vae)


# ---- stage 2: the helpers, directly -------------------------------------------------------


def test_drop_labels_replaces_a_share_p_by_the_null_index_and_keeps_the_rest():
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (200_000,))
    out = ldm_train.drop_labels(labels, 5, 0.1)
    dropped = out == 5
    assert out.dtype == torch.int64 and out.shape == labels.shape
    assert abs(dropped.double().mean().item() - 0.1) < 0.004  # 6 standard errors (0.00067)
    for c in range(5):  # the same rate whatever the class
        assert abs(dropped[labels == c].double().mean().item() - 0.1) < 0.01
    assert torch.equal(out[~dropped], labels[~dropped])
    assert ldm_train.drop_labels(labels, 5, 0.0) is labels
    assert (ldm_train.drop_labels(labels, 5, 1.0) == 5).all()


def test_resolve_vae_path_prefers_data_vae_then_the_cache_index(tmp_path):
    vae = tmp_path / "vae"
    vae.mkdir()
    given = load_ldm_config(None, [f"data.latents={tmp_path / 'latents'}", "data.vae=/given/vae"])
    recorded = load_ldm_config(None, [f"data.latents={tmp_path / 'latents'}"])
    assert ldm_train.resolve_vae_path(given, {"vae": {"path": str(vae)}}) == "/given/vae"
    assert ldm_train.resolve_vae_path(recorded, {"vae": {"path": str(vae)}}) == str(vae)
    gone = tmp_path / "gone"
    latents = re.escape(str(tmp_path / "latents"))
    with pytest.raises(ValueError, match=rf"^which VAE made {latents}\? Give --vae DIR \(the diffusers AutoencoderKL "
                                         rf"folder given to encode_latents.py\) \(the cache records "
                                         rf"'{re.escape(str(gone))}', which does not exist here\)$"):
        ldm_train.resolve_vae_path(recorded, {"vae": {"path": str(gone)}})
    with pytest.raises(ValueError, match=r"Give --vae DIR \(the diffusers AutoencoderKL folder given to "
                                         r"encode_latents.py\)$"):
        ldm_train.resolve_vae_path(recorded, {})


# ---- stage 2: gradient accumulation ------------------------------------------------------


def per_sample_draws(real):
    """``diffusion_loss`` with each sample's noise and t drawn from a generator seeded by its
    own values, so that they do not depend on how the samples are grouped into batches."""

    def loss(unet, noise_scheduler, latents, class_labels, snr_gamma=None, noise=None, timesteps=None, noise_cfg=None,
             **kwargs):
        noise, timesteps = [], []
        for x in latents:
            seed = int.from_bytes(hashlib.sha256(x.detach().cpu().numpy().tobytes()).digest()[:8], "little")
            g = torch.Generator().manual_seed(seed)
            noise.append(torch.randn(x.shape, generator=g))
            timesteps.append(torch.randint(0, noise_scheduler.config.num_train_timesteps, (), generator=g))
        return real(unet, noise_scheduler, latents, class_labels, snr_gamma, torch.stack(noise).to(latents),
                    torch.stack(timesteps).to(latents.device), noise_cfg, **kwargs)

    return loss


def test_stage2_accumulating_two_micro_batches_equals_one_batch_twice_the_size(cache, tmp_path, monkeypatch):  # noqa: F811
    """A = 2 micro-batches of 2 latents == 1 batch of 4: the gradient the optimizer steps on, its norm, the loss."""
    monkeypatch.setattr(ldm_train, "diffusion_loss", per_sample_draws(ldm_train.diffusion_loss))
    real_step, grads = ldm_train.optimizer_step, []

    def step(accelerator, optimizer, parameters, *args):
        if accelerator.sync_gradients:
            grads.append([p.grad.clone() for p in parameters])
        return real_step(accelerator, optimizer, parameters, *args)

    monkeypatch.setattr(ldm_train, "optimizer_step", step)
    common = {"train.max_steps": 1, "train.use_ema": "false", "train.num_validation_samples": 0,
              "data.sample_posterior": "false", "model.label_dropout": 0.0}
    outs = {}
    for name, batch, accumulate in (("big", 4, 1), ("accumulated", 2, 2)):
        reset_accelerate_state()
        cfg = load_ldm_config(None, overrides(cache, **common, **{"data.batch_size": batch,
                                                                   "train.gradient_accumulation_steps": accumulate}))
        assert ldm_train.main(cfg, tmp_path / name)["global_step"] == 1
        outs[name] = tmp_path / name
    big, accumulated = grads  # one synchronising micro-batch in each run
    assert len(big) == len(accumulated)
    for i, (a, b) in enumerate(zip(big, accumulated)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7, msg=lambda m: f"parameter {i}: {m}")
    for key in ("loss", "grad_norm"):
        assert logged(outs["accumulated"], key) == {1: pytest.approx(logged(outs["big"], key)[1], rel=1e-5)}, key
