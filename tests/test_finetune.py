"""Fine-tuning from an original single-file VAE: model.pretrained + train.decoder_only."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from autoencoderkl.config import load_config
from autoencoderkl.model import load_vae, save_original_checkpoint
from autoencoderkl.train import main
from conftest import tiny_overrides


def test_decoder_only_finetuning_from_an_sd_single_file_keeps_the_encoder_bit_identical(photo_dir, tmp_path):
    torch.manual_seed(0)
    # The shape tiny_overrides describes, saved as Stable Diffusion ships its VAEs.
    start = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16,
                          scaling_factor=0.3)
    ckpt = save_original_checkpoint(start, tmp_path / "sd-vae.safetensors")
    cfg = load_config(None, tiny_overrides(photo_dir, **{"model.pretrained": str(ckpt), "train.decoder_only": "true"}))
    summary = main(cfg, tmp_path / "run")
    assert summary["global_step"] == 4

    before, after = start.state_dict(), load_vae(tmp_path / "run").state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)  # the decoder did learn
    # The latent space is kept, so is its scaling_factor (not re-measured).
    assert AutoencoderKL.from_pretrained(tmp_path / "run" / "vae").config.scaling_factor == 0.3
