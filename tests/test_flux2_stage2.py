"""A kl_flux2 VAE (FLUX.2's AutoencoderKLFlux2) in stage 2: its batch norm is the latent normalisation.

The cache records the batch norm's statistics beside the VAE's hash; stage 2, the pipeline's
decode, the probe and ``eval-vae --latent-stats`` use them, with no scaling on top.
"""

from __future__ import annotations

import json

import pytest
import torch

from autoencoderkl.evaluate import latent_statistics
from autoencoderkl.model import patchify_latents, unpatchify_latents
from conftest import reset_accelerate_state, write_photos
from latent_diffusion.encode import encode_latents
from latent_diffusion.export import load_pipeline, plain_pipeline
from latent_diffusion.latents import LatentDataset, load_index, map_shard
from latent_diffusion.pipeline import LatentNormalization
from latent_diffusion.probe import probe_latents
from latent_diffusion.sample import sample
from test_flux2 import tiny_flux2
from test_ldm import overrides
from latent_diffusion.config import load_config
from latent_diffusion.train import main

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


@pytest.fixture(scope="module")
def flux2_cache(tmp_path_factory) -> dict:
    """Two class folders of photos encoded at 16 px by a tiny kl_flux2 VAE (f2: (4, 8, 8) latents)."""
    root = tmp_path_factory.mktemp("flux2")
    for c in range(2):
        write_photos(root / "photos" / f"class{c}", n=3, seed=c)
    tiny_flux2().save_pretrained(root / "vae")
    encode_latents(root / "vae", root / "photos", root / "latents", resolution=16, batch_size=4, num_workers=0)
    reset_accelerate_state()
    return {"root": root, "latents": root / "latents", "vae": root / "vae"}


def test_batch_norm_normalisation_is_flux2s_patchify_batch_norm_unpatchify():
    vae = tiny_flux2()
    norm = LatentNormalization.from_vae(vae)
    assert norm.kind == "batch_norm" and norm.patch_size == [2, 2] and len(norm.latents_mean) == 16
    z = torch.randn(3, 4, 8, 6)
    with torch.no_grad():
        expected = unpatchify_latents(vae.bn(patchify_latents(z)))  # eval mode: the running statistics
    assert torch.allclose(norm.normalize(z), expected, atol=1e-6, rtol=0)
    # ... and back (float64: the inverse up to rounding, ~1e-16).
    z64 = z.double()
    assert torch.allclose(norm.denormalize(norm.normalize(z64)), z64, atol=1e-12, rtol=0)
    # It travels as a dict (checkpoints, the cache index) and refuses a second scaling.
    assert LatentNormalization.from_dict(norm.to_dict()) == norm
    with pytest.raises(ValueError, match="no scaling_factor or shift_factor on top"):
        LatentNormalization("batch_norm", 0.5, latents_mean=[0.0] * 4, latents_std=[1.0] * 4, patch_size=[2, 2])
    with pytest.raises(ValueError, match="do not split into the batch norm's 2x2 patches"):
        norm.normalize(torch.zeros(1, 4, 7, 8))


def test_a_flux2_cache_records_the_batch_norm_and_stage_2_uses_it_with_no_scaling_on_top(flux2_cache):
    index = load_index(flux2_cache["latents"])
    own = index["vae"]["latent_normalization"]
    vae = tiny_flux2()
    assert own == LatentNormalization.from_vae(vae).to_dict()
    data = LatentDataset(flux2_cache["latents"], sample_posterior=False)  # default kind global: the batch norm wins
    assert data.normalization.kind == "batch_norm"
    raw = map_shard(flux2_cache["latents"] / index["shards"][0]["file"])["mean"][:1].float()
    with torch.no_grad():
        expected = unpatchify_latents(vae.bn(patchify_latents(raw)))[0]  # FLUX.2's own way, in eval mode
    assert torch.allclose(data[0]["latents"], expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no scaling_factor / shift_factor on top"):
        LatentDataset(flux2_cache["latents"], sample_posterior=False, scaling_factor=0.5)


def test_stage_2_on_a_flux2_cache_trains_samples_and_decodes_through_the_batch_norm(flux2_cache, tmp_path):
    out = tmp_path / "ldm"
    cache = {"latents": flux2_cache["latents"], "vae": flux2_cache["vae"]}
    main(load_config(None, overrides(cache, **{"train.max_steps": 2, "train.num_validation_samples": 2})), out)
    reset_accelerate_state()
    pipeline = load_pipeline(out / "pipeline")
    assert type(pipeline.vae).__name__ == "AutoencoderKLFlux2"
    assert LatentNormalization.from_vae(pipeline.vae).to_dict() == load_index(flux2_cache["latents"])["vae"][
        "latent_normalization"]
    config = json.loads((out / "pipeline" / "vae" / "config.json").read_text())
    assert config.get("latents_mean") is None and config.get("scaling_factor") in (None, 1.0)  # nothing on top
    # The decode undoes the batch norm: the pipeline's "latent" output, denormalised and
    # decoded by hand, is its image output.
    g = lambda: [torch.Generator().manual_seed(0)]  # noqa: E731
    latents = pipeline(batch_size=1, class_labels=[1], num_inference_steps=2, generator=g(), output_type="latent").images
    images = pipeline(batch_size=1, class_labels=[1], num_inference_steps=2, generator=g(), output_type="pt").images
    with torch.no_grad():
        z = unpatchify_latents(patchify_latents(latents) * torch.sqrt(pipeline.vae.bn.running_var + pipeline.vae.bn.eps)
                               [None, :, None, None] + pipeline.vae.bn.running_mean[None, :, None, None])
        by_hand = (pipeline.vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(images, by_hand, atol=1e-5)
    result = sample(out / "pipeline", tmp_path / "samples", 1, steps=2, progress=False)  # lat sample-ldm's path
    assert result["settings"]["vae_scaling_factor"] is None and len(result["paths"]) == 1
    name, reasons = plain_pipeline(pipeline)
    assert name is None or "batch-norm" in " ".join(reasons)


def test_the_probe_and_latent_stats_use_a_flux2_vaes_own_normalisation(flux2_cache, tmp_path):
    result = probe_latents(flux2_cache["latents"], flux2_cache["latents"], flux2_cache["vae"], tmp_path / "probe",
                           overrides=["train.max_steps=2", "train.validation_steps=1", "data.num_val_latents=2",
                                      "model.block_out_channels=[16,32]", "model.norm_num_groups=8",
                                      "model.attention_head_dim=8", "optim.lr_warmup_steps=0"])
    reset_accelerate_state()
    assert result["normalisation"]["kind"] == "batch_norm"
    assert result["probe"]["iid_gaussian_loss"] > 0
    stats = latent_statistics(flux2_cache["vae"], flux2_cache["root"] / "photos" / "class0", resolution=16,
                              num_workers=0, progress=False)
    assert stats["config_scaling_factor"] is None and set(stats["batch_norm"]) >= {"mean", "std"}
