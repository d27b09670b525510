"""The equivariance regulariser (EQ-VAE) and the 16-channel (SD3/FLUX-shaped) VAE."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from conftest import reset_accelerate_state, tiny_overrides
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from autoencoderkl.config import LossConfig, load_config
from autoencoderkl.losses import (
    EQUIVARIANCE_TRANSFORMS,
    AutoencoderLoss,
    SpatialTransform,
    draw_equivariance_transform,
    equivariance_transforms,
)
from autoencoderkl.model import AutoencoderWithPosterior, load_vae, original_state_dict
from autoencoderkl.train import main


def tiny_vae(levels: int = 3) -> AutoencoderKL:
    """f = 2 ** (levels - 1), 4 latent channels."""
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8,) * levels, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1, norm_num_groups=4,
                         latent_channels=4)


@pytest.mark.parametrize("name", list(EQUIVARIANCE_TRANSFORMS))
def test_each_transform_keeps_image_and_latent_grids_aligned(name):
    vae = tiny_vae()  # f = 4
    x = torch.rand(2, 3, 32, 48) * 2 - 1  # a non-square image: rotations must swap both grids
    tau = SpatialTransform(name)
    with torch.no_grad():
        rec, moments, rec_tau = AutoencoderWithPosterior(vae)(x, latent_transform=tau)
    z_tau = tau(moments[:, :4])
    assert rec.shape == x.shape
    assert rec_tau.shape == tau(x).shape == (2, 3, z_tau.shape[2] * 4, z_tau.shape[3] * 4)
    want = {"down2": (16, 24), "down4/3": (24, 36), "rot90": (48, 32), "rot180": (32, 48), "rot270": (48, 32)}[name]
    assert tuple(tau(x).shape[-2:]) == want
    if name.startswith("rot"):  # an exact permutation of the cells: rotating back restores them
        back = SpatialTransform(f"rot{360 - int(name[3:])}")
        assert torch.equal(back(tau(x)), x)


def test_draws_are_a_seeded_function_of_the_step_and_respect_the_grid():
    draw = lambda step, hw=(8, 8), seed=0, prob=0.5: draw_equivariance_transform(1.0, prob, seed, step, hw)  # noqa: E731
    names = [getattr(draw(s), "name", None) for s in range(2000)]
    assert names == [getattr(draw(s), "name", None) for s in range(2000)]  # no hidden state: resume replays it
    assert names != [getattr(draw(s, seed=1), "name", None) for s in range(2000)]
    counts = Counter(names)
    assert 0.45 < counts[None] / 2000 < 0.55 and set(counts) == {None, *EQUIVARIANCE_TRANSFORMS}
    assert all(draw(s, prob=1.0) is not None for s in range(50)) and all(draw(s, prob=0.0) is None for s in range(50))
    assert equivariance_transforms((6, 6)) == ["down2", "rot90", "rot180", "rot270"]  # 6 * 3/4 is no whole grid
    assert equivariance_transforms((5, 8)) == ["rot90", "rot180", "rot270"]
    assert all(draw_equivariance_transform(0.0, 1.0, 0, s, (8, 8)) is None for s in range(50))  # off: no draw


def test_regulariser_gradient_reaches_decoder_and_encoder():
    vae = tiny_vae().train()
    loss_fn = AutoencoderLoss(LossConfig(equivariance_weight=1.0, perceptual_weight=0.0), None)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    tau = SpatialTransform("down2")
    _, _, rec_tau = AutoencoderWithPosterior(vae)(x, latent_transform=tau)
    loss_fn.equivariance_loss(tau(x), rec_tau).backward()  # the term alone
    for part in (vae.decoder, vae.post_quant_conv, vae.quant_conv, vae.encoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), part.__class__.__name__


def test_generator_loss_adds_the_weighted_term_and_logs_it(monkeypatch):
    torch.manual_seed(0)
    x, rec, rec_tau = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16), torch.rand(2, 3, 8, 8)
    mean, logvar = torch.randn(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1))
    pair = (x[:, :, ::2, ::2], rec_tau)
    base = AutoencoderLoss(LossConfig(perceptual_weight=0.0), None)
    off = AutoencoderLoss(LossConfig(perceptual_weight=0.0, equivariance_weight=0.0), None)
    on = AutoencoderLoss(LossConfig(perceptual_weight=0.0, equivariance_weight=0.5, pixel_loss="l2"), None)
    loss0, logs0 = base.generator_loss(x, rec, posterior, 0, None, None)
    loss_off, logs_off = off.generator_loss(x, rec, posterior, 0, None, None, equivariance=pair)
    assert torch.equal(loss0, loss_off) and logs0 == logs_off  # weight 0: ignored, same logs
    on_l2 = AutoencoderLoss(LossConfig(perceptual_weight=0.0, pixel_loss="l2"), None)
    loss_l2, _ = on_l2.generator_loss(x, rec, posterior, 0, None, None)
    loss_on, logs_on = on.generator_loss(x, rec, posterior, 0, None, None, equivariance=pair)
    eq = ((pair[0] - rec_tau) ** 2).sum() / 2  # summed over pixels, mean over the batch, as nll_loss
    assert logs_on["eq_loss"] == pytest.approx(eq.item(), rel=1e-6) and logs_on["eq_applied"] == 1.0
    assert loss_on.item() == pytest.approx(loss_l2.item() + 0.5 * eq.item(), rel=1e-6)
    _, logs_none = on.generator_loss(x, rec, posterior, 0, None, None, equivariance=None)
    assert logs_none["eq_loss"] == 0.0 and logs_none["eq_applied"] == 0.0


def test_config_refuses_a_negative_weight_or_a_probability_outside_0_1(photo_dir):
    with pytest.raises(ValueError, match="loss.equivariance_weight must be >= 0"):
        load_config(None, tiny_overrides(photo_dir, **{"loss.equivariance_weight": -1}))
    with pytest.raises(ValueError, match=r"loss.equivariance_prob must lie in \[0, 1\]"):
        load_config(None, tiny_overrides(photo_dir, **{"loss.equivariance_prob": 1.5}))


def checkpoint_tensors(out):
    return load_file(out / "checkpoints" / "step-0000002" / "model.safetensors")


def test_weight_zero_is_bit_identical_to_a_run_without_the_regulariser(photo_dir, tmp_path):
    fast = {"train.max_steps": 2, "train.validation_steps": 2, "loss.disc_start": 10}
    main(load_config(None, tiny_overrides(photo_dir, **fast)), tmp_path / "plain")
    reset_accelerate_state()
    off = {**fast, "loss.equivariance_weight": 0.0, "loss.equivariance_prob": 1.0}
    main(load_config(None, tiny_overrides(photo_dir, **off)), tmp_path / "off")
    a, b = checkpoint_tensors(tmp_path / "plain"), checkpoint_tensors(tmp_path / "off")
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(line) for line in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    assert not any("eq_loss" in line for line in lines)


# ---- 16 latent channels, the SD3 / FLUX.1 layout ----------------------------------------


def test_sixteen_channel_model_trains_exports_with_shift_factor_and_reloads(photo_dir, tmp_path):
    c16 = {"model.block_out_channels": "[32,32]", "model.norm_num_groups": 32, "model.latent_channels": 16,
           "model.use_quant_conv": "false", "model.use_post_quant_conv": "false",
           "model.measure_shift_factor": "true", "train.max_steps": 2, "train.validation_steps": 2}
    summary = main(load_config(None, tiny_overrides(photo_dir, **c16)), tmp_path / "run")
    exported = load_vae(tmp_path / "run")
    cfg = exported.config
    assert cfg.latent_channels == 16 and exported.quant_conv is None and exported.post_quant_conv is None
    assert isinstance(cfg.shift_factor, float) and cfg.shift_factor != 0.0 and cfg.scaling_factor != 1.0
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = exported.encode(x).latent_dist.mode()
        assert z.shape == (2, 16, 8, 8)
        assert torch.equal(exported.decode(z).sample, summary["vae"].eval().decode(z).sample)

    # An original single file as SD3 (under first_stage_model.) and FLUX.1's ae.safetensors
    # (no prefix) ship them: LDM key names, no quant convs, no diffusers config inside.
    for prefix in ("first_stage_model.", ""):
        path = tmp_path / f"original{prefix[:5]}.safetensors"
        save_file(original_state_dict(exported, prefix), str(path))
        with pytest.warns(UserWarning, match="no quant_conv.*SD3 uses 1.5305 and shift 0.0609"):
            loaded = load_vae(path, config=None)
        assert loaded.config.latent_channels == 16 and loaded.quant_conv is None
        assert loaded.config.scaling_factor == 1.0 and loaded.config.shift_factor is None
        state, want = loaded.state_dict(), exported.state_dict()
        assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
