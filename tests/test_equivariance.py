"""EQ-VAE's equivariance regularisation as published, and the 16-channel (SD3/FLUX-shaped) VAE."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import reset_accelerate_state, tiny_overrides
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from autoencoderkl.config import load_config
from autoencoderkl.discriminator import NLayerDiscriminator
from autoencoderkl.equivariance import (
    EquivarianceStep,
    draw_equivariance_step,
    equivariance_scales,
    patchgan_min_size,
)
from autoencoderkl.losses import AutoencoderLoss
from autoencoderkl.model import AutoencoderWithPosterior, load_vae, original_state_dict
from autoencoderkl.train import main


def tiny_vae(levels: int = 3) -> AutoencoderKL:
    """f = 2 ** (levels - 1), 4 latent channels."""
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8,) * levels, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1, norm_num_groups=4,
                         latent_channels=4)


def test_equivariance_step_is_the_reference_transform_at_256_px():
    """zelaki/eqvae autoencoder.py l. 100-104 (z) and 135-138 (x), at its 256 px / 32 x 32 latents."""
    torch.manual_seed(0)
    z, x = torch.randn(2, 4, 32, 32), torch.rand(2, 3, 256, 256) * 2 - 1
    for step, k in ((8, 1), (19, 2), (31, 3)):
        tau, s = EquivarianceStep("equivariance", step, k), step / 32
        ref_z = torch.rot90(F.interpolate(z, scale_factor=s, mode="bilinear", align_corners=False), k=k, dims=[-1, -2])
        ref_x = torch.rot90(F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False), k=k, dims=[-1, -2])
        assert torch.equal(tau(z), ref_z) and torch.equal(tau(x, 8), ref_x)
        assert tau(x, 8).shape[-2:] == (8 * step, 8 * step) and tau(z).shape[-2:] == (step, step)
    low = EquivarianceStep("prior_lowres", 12)  # l. 146-147: downscaled only, no rotation
    assert torch.equal(low(x, 8), F.interpolate(x, scale_factor=12 / 32, mode="bilinear", align_corners=False))


def test_equivariance_step_keeps_image_and_latent_grids_aligned_off_256_px():
    vae = tiny_vae()  # f = 4
    x = torch.rand(2, 3, 32, 48) * 2 - 1  # latents 8 x 12; rotations must swap both grids
    tau = EquivarianceStep("equivariance", 20, 1)  # s = 5/8: 8 x 12 -> 5 x 7 cells, then rotated
    with torch.no_grad():
        rec_tau, moments = AutoencoderWithPosterior(vae)(x, latent_transform=tau)
    assert moments.shape == (2, 8, 8, 12)  # the posterior is of x itself
    assert tau(moments[:, :4]).shape == (2, 4, 7, 5)
    assert rec_tau.shape == tau(x, 4).shape == (2, 3, 28, 20)


def test_draws_are_a_seeded_function_of_the_step_with_the_papers_proportions():
    scales = equivariance_scales((8, 8), 8, 8)
    draw = lambda step, seed=0, mode="eqvae": draw_equivariance_step(mode, 0.5, 0.25, seed, step, scales)  # noqa: E731
    steps = [draw(s) for s in range(4000)]
    assert steps == [draw(s) for s in range(4000)]  # no hidden state: resume replays it
    assert steps != [draw(s, seed=1) for s in range(4000)]
    kinds = Counter(getattr(e, "kind", None) for e in steps)
    assert 0.47 < kinds["equivariance"] / 4000 < 0.53  # p_prior
    assert 0.10 < kinds["prior_lowres"] / 4000 < 0.15  # (1 - p_prior) * p_prior_s = 0.125
    eq = [e for e in steps if e is not None and e.kind == "equivariance"]
    assert Counter(e.quarter_turns for e in eq).keys() == {1, 2, 3}  # always rotated AND scaled
    assert {e.scale_step for e in eq} == set(range(8, 32))
    assert all(e.quarter_turns == 0 for e in steps if e is not None and e.kind == "prior_lowres")
    assert all(draw(s, mode="off") is None for s in range(50))
    with pytest.raises(ValueError, match=r"loss.equivariance must be one of \['off', 'eqvae'\], got 'eq'"):
        draw(0, mode="eq")


def test_scales_leave_out_images_the_patchgan_cannot_score():
    assert patchgan_min_size(3) == 24 and patchgan_min_size(2) == 12
    assert equivariance_scales((32, 32), 8, 24) == [s / 32 for s in range(8, 32)]  # the reference's 256 px: all
    assert equivariance_scales((8, 8), 8, 24) == [s / 32 for s in range(12, 32)]  # 64 px: >= 3 cells
    assert equivariance_scales((8, 8), 2, 12) == [s / 32 for s in range(24, 32)]  # the tiny test run
    for n in (3, 2):  # the smallest admitted image gives a logit, one pixel less does not
        disc, side = NLayerDiscriminator(3, 8, n), patchgan_min_size(n)
        assert disc(torch.zeros(2, 3, side, side)).shape[-1] == 1
        with pytest.raises(RuntimeError):
            disc(torch.zeros(2, 3, side - 1, side - 1))


def test_equivariance_gradient_reaches_decoder_and_encoder():
    vae = tiny_vae().train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    tau = EquivarianceStep("equivariance", 16, 3)
    rec_tau, _ = AutoencoderWithPosterior(vae)(x, latent_transform=tau)
    (tau(x, 4) - rec_tau).abs().mean().backward()
    for part in (vae.decoder, vae.post_quant_conv, vae.quant_conv, vae.encoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), part.__class__.__name__


def test_transformed_pair_replaces_the_inputs_of_every_loss_term(photo_dir, tmp_path, monkeypatch):
    """On equivariance steps the generator loss (GAN and adaptive weight on) and the
    discriminator get (tau(x), decode(tau(z))), not (x, decode(z)); on low-res prior steps
    the encoder sees the downscaled image."""
    seen = {"g": [], "d": [], "enc": []}
    g_loss, d_loss = AutoencoderLoss.generator_loss, AutoencoderLoss.discriminator_loss
    encode = AutoencoderKL.encode

    def spy_g(self, inputs, reconstructions, *args, **kwargs):
        seen["g"].append((tuple(inputs.shape), tuple(reconstructions.shape)))
        loss, logs = g_loss(self, inputs, reconstructions, *args, **kwargs)
        seen["g"][-1] += (logs["d_weight"],)
        return loss, logs

    def spy_d(self, inputs, reconstructions, *args, **kwargs):
        seen["d"].append((tuple(inputs.shape), tuple(reconstructions.shape)))
        return d_loss(self, inputs, reconstructions, *args, **kwargs)

    def spy_encode(self, x, *args, **kwargs):
        if torch.is_grad_enabled():  # training steps (validation and export run under no_grad)
            seen["enc"].append(tuple(x.shape))
        return encode(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderLoss, "generator_loss", spy_g)
    monkeypatch.setattr(AutoencoderLoss, "discriminator_loss", spy_d)
    monkeypatch.setattr(AutoencoderKL, "encode", spy_encode)
    steps, seed = 6, 3
    eq = {"loss.equivariance": "eqvae", "loss.equivariance_prob": 0.5, "loss.equivariance_prior_scale_prob": 0.5,
          "loss.disc_start": 0, "train.max_steps": steps, "train.validation_steps": steps, "train.seed": seed}
    main(load_config(None, tiny_overrides(photo_dir, **eq)), tmp_path / "run")
    draws = [draw_equivariance_step("eqvae", 0.5, 0.5, seed, s, equivariance_scales((8, 8), 2, 12)) for s in range(steps)]
    kinds = [getattr(e, "kind", None) for e in draws]
    assert {"equivariance", "prior_lowres", None} <= set(kinds), kinds  # the seed covers all three
    assert len(seen["g"]) == len(seen["d"]) == len(seen["enc"]) == steps
    for e, (inputs, rec, d_weight), d_pair, enc in zip(draws, seen["g"], seen["d"], seen["enc"]):
        assert d_pair == (inputs, rec) and inputs == rec  # D judges the very pair the generator was scored on
        assert d_weight > 0  # the GAN term and its adaptive weight run on every kind of step
        if e is None:
            assert inputs == enc == (2, 3, 16, 16)
        elif e.kind == "equivariance":
            side = 2 * (8 * e.scale_step // 32)
            assert enc == (2, 3, 16, 16) and inputs == (2, 3, side, side)  # x encoded, tau(x) scored
        else:
            side = 2 * (8 * e.scale_step // 32)
            assert enc == inputs == (2, 3, side, side)  # the encoder sees the downscaled image
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    applied = [r["eq_applied"] for r in logs if "loss" in r]
    assert applied == [float(k == "equivariance") for k in kinds]
    assert [r["eq_lowres"] for r in logs if "loss" in r] == [float(k == "prior_lowres") for k in kinds]


def test_config_refuses_an_unknown_mode_or_a_probability_outside_0_1(photo_dir):
    with pytest.raises(ValueError, match="loss.equivariance.*'off', 'eqvae'"):
        load_config(None, tiny_overrides(photo_dir, **{"loss.equivariance": "additive"}))
    with pytest.raises(ValueError, match=r"loss.equivariance_prob must lie in \[0, 1\]"):
        load_config(None, tiny_overrides(photo_dir, **{"loss.equivariance_prob": 1.5}))
    with pytest.raises(ValueError, match=r"loss.equivariance_prior_scale_prob must lie in \[0, 1\]"):
        load_config(None, tiny_overrides(photo_dir, **{"loss.equivariance_prior_scale_prob": -0.1}))


def checkpoint_tensors(out):
    return load_file(out / "checkpoints" / "step-0000002" / "model.safetensors")


def test_off_is_bit_identical_to_a_run_without_the_regulariser(photo_dir, tmp_path):
    fast = {"train.max_steps": 2, "train.validation_steps": 2, "loss.disc_start": 10}
    main(load_config(None, tiny_overrides(photo_dir, **fast)), tmp_path / "plain")
    reset_accelerate_state()
    off = {**fast, "loss.equivariance": "off", "loss.equivariance_prob": 1.0}
    main(load_config(None, tiny_overrides(photo_dir, **off)), tmp_path / "off")
    a, b = checkpoint_tensors(tmp_path / "plain"), checkpoint_tensors(tmp_path / "off")
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(line) for line in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    assert not any("eq_applied" in line for line in lines)


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
