"""model.type: kl_flux2 (diffusers AutoencoderKLFlux2, FLUX.2's layout) in stage 1."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2, AutoModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from autoencoderkl.config import load_config
from autoencoderkl.model import (latent_normalization, load_vae, original_state_dict, patchify_latents,
                                 save_original_checkpoint, unpatchify_latents)
from autoencoderkl.train import main
from conftest import reset_accelerate_state, tiny_overrides

FLUX2 = {"model.type": "kl_flux2"}


def test_patchify_is_flux2_pipelines_and_round_trips_exactly():
    z = torch.randn(2, 3, 6, 8)
    latents = patchify_latents(z)
    assert latents.shape == (2, 12, 3, 4)
    # diffusers' Flux2Pipeline._patchify_latents: channel c * 4 + 2 i + j holds z[:, c, i::2, j::2].
    assert torch.equal(latents[:, 1 * 4 + 2 * 1 + 0], z[:, 1, 1::2, 0::2])
    assert torch.equal(unpatchify_latents(latents), z)


def test_kl_flux2_trains_resumes_bit_exactly_exports_and_reloads_with_plain_diffusers(photo_dir, teacher_dir, tmp_path):
    """4 steps straight == 2 + --resume latest + 2, with EMA and the alignment loss on."""
    extra = {**FLUX2, "train.use_ema": "true", "train.ema_decay": 0.9, "loss.alignment_weight": 0.1,
             "loss.alignment_teacher": str(teacher_dir), "loss.alignment_resolution": 16}
    straight = tmp_path / "straight"
    summary = main(load_config(None, tiny_overrides(photo_dir, **extra)), straight)
    reset_accelerate_state()
    resumed = tmp_path / "resumed"
    main(load_config(None, tiny_overrides(photo_dir, **{**extra, "train.max_steps": 2})), resumed)
    reset_accelerate_state()
    assert main(load_config(None, tiny_overrides(photo_dir, **extra)), resumed, resume="latest")["global_step"] == 4
    a, b = straight / "checkpoints" / "step-0000004", resumed / "checkpoints" / "step-0000004"
    for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    state = load_file(a / "model.safetensors")
    assert int(state["vae.bn.num_batches_tracked"]) == 4  # one update per training step, none in validation
    assert "projection.weight" in state

    # The export loads with plain diffusers, batch-norm statistics included (the EMA copy
    # takes the trained model's buffers: EMAModel averages parameters only).
    exported = AutoencoderKLFlux2.from_pretrained(straight / "vae")
    assert type(AutoModel.from_pretrained(str(straight / "vae"))) is AutoencoderKLFlux2
    assert type(load_vae(straight)) is AutoencoderKLFlux2
    trained = summary["vae"]
    assert torch.equal(exported.bn.running_mean, trained.bn.running_mean)
    assert torch.equal(exported.bn.running_var, trained.bn.running_var)
    assert exported.bn.running_mean.abs().sum() > 0 and not torch.equal(exported.bn.running_var, torch.ones(16))
    assert "scaling_factor" not in exported.config  # the batch norm is the normalisation, nothing on top
    card = (straight / "vae" / "README.md").read_text()
    assert "AutoencoderKLFlux2.from_pretrained" in card and "batch-norm running statistics" in card
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = exported.encode(x).latent_dist.mode()
        assert z.shape == (2, 4, 8, 8) and exported.decode(z).sample.shape == (2, 3, 16, 16)
    assert "batch-norm running statistics of the (2, 2)-patchified latents (16 channels" in latent_normalization(exported)


def tiny_flux2() -> AutoencoderKLFlux2:
    """A FLUX.2-layout VAE whose widths LDM's GroupNorm(32) divides (a single file cannot say otherwise)."""
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, sample_size=16)
    with torch.no_grad():  # statistics as a trained model has them
        vae.bn.running_mean.copy_(torch.randn(16))
        vae.bn.running_var.copy_(torch.rand(16) + 0.5)
    return vae.eval()


def bfl_layout(vae: AutoencoderKLFlux2) -> dict[str, torch.Tensor]:
    """The weights as BFL's ae.safetensors names them, built independently of our FLUX.2 writer.

    The encoder/decoder keys are SD's original layout (our writer for AutoencoderKL, which
    diffusers' own converter reads back); BFL's src/flux2/autoencoder.py then differs only in
    Encoder.quant_conv, Decoder.post_quant_conv and AutoEncoder.bn.
    """
    twin = AutoencoderKL(**{k: v for k, v in vae.config.items() if not k.startswith("_") and k not in (
        "batch_norm_eps", "batch_norm_momentum", "patch_size", "decoder_block_out_channels")})
    twin.load_state_dict({k: v for k, v in vae.state_dict().items() if not k.startswith("bn.")})
    sd = original_state_dict(twin)
    out = {("encoder." if k.startswith("quant_conv.") else "decoder." if k.startswith("post_quant_conv.") else "") + k: v
           for k, v in sd.items()}
    return {**out, "bn.running_mean": vae.bn.running_mean.clone(), "bn.running_var": vae.bn.running_var.clone()}


def test_a_flux2_single_file_loads_like_sds_and_writes_back_the_same_layout(tmp_path):
    vae = tiny_flux2()
    bfl = bfl_layout(vae)
    path = tmp_path / "ae.safetensors"
    save_file(bfl, str(path))  # no diffusers config inside, as BFL ships it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is guessed: FLUX.2's constants are BFL's code
        loaded = load_vae(path)
    assert type(loaded) is AutoencoderKLFlux2 and tuple(loaded.config.patch_size) == (2, 2)
    assert loaded.config.latent_channels == 4 and loaded.config.batch_norm_eps == 1e-4
    want, got = vae.state_dict(), loaded.state_dict()
    assert [k for k in want if k != "bn.num_batches_tracked"] == [k for k in got if k != "bn.num_batches_tracked"]
    assert all(torch.equal(want[k], got[k]) for k in want if k != "bn.num_batches_tracked")

    ours = save_original_checkpoint(vae, tmp_path / "ours.safetensors")
    with safe_open(str(ours), framework="pt") as f:
        assert set(f.keys()) == set(bfl) and all(torch.equal(f.get_tensor(k), bfl[k]) for k in bfl)
        stored = json.loads(f.metadata()["diffusers_config"])
    assert stored["patch_size"] == [2, 2]
    again = load_vae(ours).state_dict()
    assert all(torch.equal(again[k], got[k]) for k in got)
    with pytest.raises(ValueError, match="does not fit its FLUX.2 config: lacks"):
        save_file({k: v for k, v in bfl.items() if k != "decoder.post_quant_conv.weight"}, str(tmp_path / "cut.safetensors"))
        load_vae(tmp_path / "cut.safetensors")


def test_decoder_only_finetune_of_a_flux2_file_keeps_its_latent_space(photo_dir, tmp_path):
    start = tiny_flux2()
    path = tmp_path / "ae.safetensors"
    save_file(bfl_layout(start), str(path))
    run = {**FLUX2, "model.pretrained": str(path), "train.decoder_only": "true", "train.max_steps": 2,
           "train.validation_steps": 2}
    main(load_config(None, tiny_overrides(photo_dir, **run)), tmp_path / "run")
    before, after = start.state_dict(), load_vae(tmp_path / "run").state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv.", "bn.running"))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # statistics not updated either
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    reset_accelerate_state()
    with pytest.raises(ValueError, match=r"holds a AutoencoderKLFlux2 \(model.type=kl_flux2\), but this run says "
                                         r"model.type=kl"):
        main(load_config(None, tiny_overrides(photo_dir, **{**run, "model.type": "kl"})), tmp_path / "mismatch")
