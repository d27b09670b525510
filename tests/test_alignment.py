"""VA-VAE's alignment loss: teacher loading, the two marginal terms, the adaptive weight, the loop.

The teacher is a tiny randomly initialised DINOv2 saved with ``save_pretrained`` in a temp
folder and loaded by the real loading code (``transformers.AutoModel.from_pretrained``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from autoencoderkl import alignment
from autoencoderkl.alignment import (adaptive_alignment_weight, alignment_loss, build_projection, load_teacher,
                                     resolve_teacher)
from autoencoderkl.config import load_config
from autoencoderkl.model import AutoencoderWithPosterior
from autoencoderkl.train import main
from conftest import reset_accelerate_state, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
TEACHER_WIDTH = 16  # conftest's teacher_dir


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)


def images(n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_teacher_loads_frozen_in_eval_mode_and_gives_features_on_the_latent_grid(teacher_dir):
    teacher = load_teacher(str(teacher_dir), resolution=16)
    assert type(teacher.model).__name__ == "Dinov2Model" and teacher.hidden_size == TEACHER_WIDTH
    assert not teacher.train().training and not teacher.model.training  # .train() keeps it frozen
    assert not any(p.requires_grad for p in teacher.parameters())
    x = images()
    same = teacher(x, (4, 4))  # 16 px -> 4 x 4 patches of 4 px: the grid itself, no resize
    assert same.shape == (2, TEACHER_WIDTH, 4, 4) and same.dtype == torch.float32 and not same.requires_grad
    tokens = teacher.model(pixel_values=((x + 1) / 2 - teacher.mean) / teacher.std).last_hidden_state
    assert torch.allclose(same, tokens[:, 1:].transpose(1, 2).reshape(2, TEACHER_WIDTH, 4, 4), atol=1e-6)  # CLS dropped
    assert teacher(x, (8, 8)).shape == (2, TEACHER_WIDTH, 8, 8)  # resized to a finer latent grid
    half = load_teacher(str(teacher_dir), resolution=16, dtype=torch.bfloat16)  # the run's precision
    assert next(half.model.parameters()).dtype == torch.bfloat16 and half(x, (4, 4)).dtype == torch.float32
    with pytest.raises(ValueError, match="loss.alignment_resolution=18 must be a positive multiple of the teacher's "
                                         "patch size 4"):
        load_teacher(str(teacher_dir), resolution=18)


def test_an_uncached_hub_teacher_offline_fails_before_any_model_is_built(photo_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-home" / "hub"))
    with pytest.raises(FileNotFoundError, match=r"loss.alignment_teacher=facebook/dinov2-large: this machine is "
                                                r"offline .* huggingface-cli download facebook/dinov2-large"):
        resolve_teacher("facebook/dinov2-large")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the teacher was found")

    monkeypatch.setattr("autoencoderkl.train.build_vae", no_model)
    monkeypatch.setattr("autoencoderkl.train.build_perceptual", no_model)
    cfg = load_config(None, tiny_overrides(photo_dir, **{"loss.alignment_weight": 0.1}))  # the default teacher
    with pytest.raises(FileNotFoundError, match="huggingface-cli download facebook/dinov2-large"):
        main(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="stand-in copies one of the shapes"):
        resolve_teacher("stand-in:facebook/dinov2-huge")


def test_alignment_loss_falls_when_only_it_is_trained(teacher_dir):
    vae = tiny_vae()
    teacher = load_teacher(str(teacher_dir), resolution=16)
    projection = build_projection(4, TEACHER_WIDTH)
    x = images(4)
    features = teacher(x, (8, 8))  # (4, 16, 8, 8), fixed
    params = list(vae.encoder.parameters()) + list(vae.quant_conv.parameters()) + list(projection.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(20):  # encoder + projection only: the decoder plays no part in this loss
        loss, mdms, mcos = alignment_loss(projection(vae.encode(x).latent_dist.mode()), features, (0.0, 0.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append((loss.item(), mdms.item(), mcos.item()))
    (first, *_), (last, *_) = losses[0], losses[-1]
    assert last < 0.6 * first, losses  # seen: 1.76 -> 0.87
    assert losses[-1][1] < losses[0][1] and losses[-1][2] < losses[0][2], losses  # each term falls


def test_gradient_reaches_encoder_and_projection_not_decoder_nor_teacher(teacher_dir):
    vae = tiny_vae()
    teacher = load_teacher(str(teacher_dir), resolution=16)
    projection = build_projection(4, TEACHER_WIDTH)
    x = images()
    reconstructions, moments, projected = AutoencoderWithPosterior(vae, projection)(x)
    assert projected.shape == (2, TEACHER_WIDTH, 8, 8)
    vf_loss, _, _ = alignment_loss(projected, teacher(x, projected.shape[-2:]), (0.5, 0.25))
    assert vf_loss > 0
    vf_loss.backward()
    assert vae.encoder.conv_out.weight.grad.abs().sum() > 0 and vae.quant_conv.weight.grad.abs().sum() > 0
    assert projection.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters()))
    assert all(p.grad is None for p in teacher.parameters())


def test_inside_the_margins_the_loss_gives_no_gradient():
    torch.manual_seed(0)
    features = torch.randn(2, 16, 4, 4)
    projected = (features + 0.05 * torch.randn_like(features)).requires_grad_()
    # cos(z', f) ~ 0.999 > 1 - 0.5 and |cos(z'_i, z'_j) - cos(f_i, f_j)| < 0.25 everywhere:
    inside, mdms, mcos = alignment_loss(projected, features, (0.5, 0.25))
    assert inside.item() == mdms.item() == mcos.item() == 0.0
    (grad,) = torch.autograd.grad(inside, projected)
    assert torch.count_nonzero(grad) == 0
    outside, _, _ = alignment_loss(projected, features, (0.0, 0.0))  # no margins: the same pair is pulled
    (grad,) = torch.autograd.grad(outside, projected)
    assert outside > 0 and torch.count_nonzero(grad) > 0
    # Each term by the paper's definition: per-position cosine; N x N similarity differences.
    z, f = torch.nn.functional.normalize(projected.flatten(2), dim=1), torch.nn.functional.normalize(features.flatten(2), dim=1)
    _, mdms, mcos = alignment_loss(projected, features, (0.1, 0.01))
    assert torch.allclose(mcos, torch.relu(0.9 - torch.cosine_similarity(projected, features, dim=1)).mean(), atol=1e-6)
    want = torch.relu((z.transpose(1, 2) @ z - f.transpose(1, 2) @ f).abs() - 0.01).mean()
    assert torch.allclose(mdms, want, atol=1e-6)


def test_adaptive_weight_is_the_reference_ratio_and_finite_when_the_encoder_gradient_is_zero():
    layer = torch.nn.Parameter(torch.randn(4, 3))
    x = torch.randn(5, 4)
    nll_loss = (x @ layer).pow(2).sum()
    vf_loss = (x @ layer).sin().mean()
    w = adaptive_alignment_weight(nll_loss, vf_loss, layer, 0.1)
    gn = torch.autograd.grad(nll_loss, layer, retain_graph=True)[0].norm()
    gv = torch.autograd.grad(vf_loss, layer, retain_graph=True)[0].norm()
    assert torch.allclose(w, (gn / (gv + 1e-4)) * 0.1) and not w.requires_grad
    # The alignment's gradient at the encoder is zero (every position inside the margins):
    # the ratio is ||nll|| / 1e-4, clamped to 1e8, and vf_loss itself is 0.
    inside = torch.relu((x @ layer).abs().sum() * 0 - 1.0)
    w = adaptive_alignment_weight(nll_loss, inside, layer, 0.1)
    assert torch.isfinite(w) and w.item() == pytest.approx(gn.item() / 1e-4 * 0.1, rel=1e-5)
    assert adaptive_alignment_weight(nll_loss * 1e6, inside, layer, 0.1).item() == pytest.approx(1e8 * 0.1)  # clamped
    # The reconstruction's gradient at the encoder is zero (a frozen-in-effect encoder): 0, not NaN.
    w = adaptive_alignment_weight((x @ layer).sum() * 0.0, vf_loss, layer, 0.1)
    assert torch.isfinite(w) and w.item() == 0.0
    # Both zero: still finite.
    assert adaptive_alignment_weight((x @ layer).sum() * 0.0, inside, layer, 0.1).item() == 0.0


def checkpoint(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / "step-0000002" / "model.safetensors")


def test_weight_zero_is_bit_identical_to_a_run_without_the_feature(photo_dir, tmp_path, monkeypatch):
    fast = {"train.max_steps": 2, "train.validation_steps": 2, "loss.disc_start": 10}
    main(load_config(None, tiny_overrides(photo_dir, **fast)), tmp_path / "plain")
    reset_accelerate_state()

    def no_teacher(*args, **kwargs):
        raise AssertionError("weight 0 must not load a teacher")

    monkeypatch.setattr("autoencoderkl.train.load_teacher", no_teacher)
    off = {**fast, "loss.alignment_weight": 0.0, "loss.alignment_teacher": "/no/such/teacher",
           "loss.alignment_margins": "[0.0,0.0]", "loss.alignment_resolution": 7}
    main(load_config(None, tiny_overrides(photo_dir, **off)), tmp_path / "off")
    a, b = checkpoint(tmp_path / "plain"), checkpoint(tmp_path / "off")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.startswith("vae.") for k in b)  # no projection: the checkpoint of a run without the feature
    lines = (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()
    assert not any("vf_loss" in line for line in lines)


def test_alignment_runs_in_the_loop_logs_its_terms_and_checkpoints_the_projection(photo_dir, teacher_dir, tmp_path):
    on = {"train.max_steps": 2, "train.validation_steps": 2, "loss.alignment_weight": 0.1,
          "loss.alignment_teacher": str(teacher_dir), "loss.alignment_resolution": 16}
    summary = main(load_config(None, tiny_overrides(photo_dir, **on)), tmp_path / "run")
    assert summary["global_step"] == 2
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logs if "loss" in r]
    assert all(r["vf_loss"] > 0 and r["vf_weight"] > 0 for r in train)
    assert all(r["vf_loss"] == pytest.approx(r["vf_mdms_loss"] + r["vf_mcos_loss"]) for r in train)
    state = checkpoint(tmp_path / "run")
    assert state["projection.weight"].shape == (TEACHER_WIDTH, 4, 1, 1)  # trained with the model, checkpointed
    assert not any(k.startswith("projection") for k in load_file(tmp_path / "run" / "vae" /
                                                                  "diffusion_pytorch_model.safetensors"))
    assert "alignment teacher: Dinov2Model from" in (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(ValueError, match="train.decoder_only=true freezes it"):
        load_config(None, tiny_overrides(photo_dir, **{**on, "train.decoder_only": "true"}))
    with pytest.raises(ValueError, match=r"loss.alignment_margins must be two numbers in \[0, 2\]"):
        load_config(None, tiny_overrides(photo_dir, **{"loss.alignment_margins": "[0.5]"}))


@pytest.mark.parametrize("name", ["kl-f16-c32-vf", "demo-vf", "flux2-decoder-finetune"])
def test_shipped_alignment_and_flux2_configs_load(name):
    path = REPO / "configs" / "autoencoderkl" / f"{name}.yaml"
    overrides = {"kl-f16-c32-vf": ["data.train_dir=/data"], "demo-vf": [],
                 "flux2-decoder-finetune": ["data.train_dir=/data", "model.pretrained=ae.safetensors"]}[name]
    cfg = load_config(path, overrides)
    if name == "kl-f16-c32-vf":  # VA-VAE f16d32_vfdinov2.yaml
        assert cfg.model.block_out_channels == [128, 128, 256, 256, 512] and cfg.model.latent_channels == 32
        assert (cfg.loss.alignment_weight, cfg.loss.alignment_margins, cfg.loss.alignment_teacher) == (
            0.1, [0.5, 0.25], "facebook/dinov2-large")
        assert (cfg.loss.disc_start, cfg.loss.kl_weight, cfg.optim.lr) == (5001, 1e-6, 1e-4)
    if name == "demo-vf":
        assert cfg.loss.alignment_teacher.startswith(alignment.STAND_IN)
        resolve_teacher(cfg.loss.alignment_teacher)
    if name == "flux2-decoder-finetune":
        assert cfg.model.type == "kl_flux2" and cfg.train.decoder_only
