"""End-to-end stage-1 runs on tiny configs: checkpoints, exact resume, export, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from autoencoderkl.config import load_config
from autoencoderkl.equivariance import draw_equivariance_step, equivariance_scales, patchgan_min_size
from autoencoderkl.train import main
from conftest import reset_accelerate_state, tiny_overrides, torchrun

REPO = Path(__file__).resolve().parents[1]


def run(photo_dir: Path, out: Path, resume=None, **overrides):
    cfg = load_config(None, tiny_overrides(photo_dir, **overrides))
    return main(cfg, out, resume=resume)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_checkpoints_metrics_grids_config_and_a_loadable_vae(photo_dir, tmp_path):
    out = tmp_path / "run"
    summary = run(photo_dir, out)
    assert summary["global_step"] == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000000.png", "step-0000002.png", "step-0000004.png"]
    assert (out / "config.yaml").read_text().startswith("# Resolved config")
    assert list((out / "logs").rglob("events.out.tfevents.*")), "TensorBoard logs missing"

    records = read_metrics(out)
    train = {r["step"]: r for r in records if "loss" in r}
    val = [r for r in records if "val/psnr" in r]
    assert sorted(train) == [1, 2, 3, 4] and [r["step"] for r in val] == [0, 2, 4]
    # The GAN is silent before disc_start (global_step 0 and 1 are steps 1 and 2) and on after.
    assert train[1]["g_loss"] == train[2]["g_loss"] == train[2]["d_loss"] == 0.0
    assert train[3]["d_loss"] > 0 and train[3]["d_weight"] > 0 and train[4]["g_loss"] != 0

    # The export is a diffusers folder that reproduces the trained model exactly.
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    exported = AutoencoderKL.from_pretrained(out / "vae")
    assert exported.config.scaling_factor != 1.0  # measured at export, never hard-coded
    trained = summary["vae"].eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        want = trained.decode(trained.encode(x).latent_dist.mode()).sample
        got = exported.decode(exported.encode(x).latent_dist.mode()).sample
    assert torch.equal(want, got)


def test_resume_latest_continues_bit_exactly(photo_dir, tmp_path):
    """4 steps straight == 2 steps, stop, --resume latest, 2 more (weights, EMA, D, logvar).

    With EQ-VAE on at p_prior = 0.5: seed 0 draws an equivariance step, an ordinary one and
    two equivariance steps, so the resumed half replays draws after a step without one.
    """
    extra = {"train.use_ema": "true", "train.ema_decay": 0.9, "loss.learn_logvar": "true",
             "loss.equivariance": "eqvae", "loss.equivariance_prob": 0.5}
    straight = tmp_path / "straight"
    run(photo_dir, straight, **extra)

    resumed = tmp_path / "resumed"
    run(photo_dir, resumed, **{**extra, "train.max_steps": 2})
    summary = run(photo_dir, resumed, resume="latest", **extra)
    assert summary["global_step"] == 4

    a = straight / "checkpoints" / "step-0000004"
    b = resumed / "checkpoints" / "step-0000004"
    for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"{name}:{key} differs after resume"
    sa, sb = (json.loads((p / "state.json").read_text()) for p in (a, b))
    assert sa["logvar"] == sb["logvar"] != 0.0  # learn_logvar: it trained, and it was restored
    # Each step is logged once, even though the first run of `resumed` logged steps 1-2.
    assert [r["step"] for r in read_metrics(resumed) if "loss" in r] == [1, 2, 3, 4]
    applied = [r["eq_applied"] for r in read_metrics(resumed) if "loss" in r]
    scales = equivariance_scales((8, 8), 2, patchgan_min_size(2))  # tiny_overrides: 16 px, f = 2, GAN on
    assert applied == [float(getattr(draw_equivariance_step("eqvae", 0.5, 0.25, 0, s, scales), "kind", None)
                             == "equivariance") for s in range(4)]
    assert applied == [1.0, 0.0, 1.0, 1.0]


def test_bf16_autocast_with_accumulation_keeps_fp32_master_weights(photo_dir, tmp_path):
    out = tmp_path / "bf16"
    summary = run(photo_dir, out, **{"train.mixed_precision": "bf16", "train.gradient_accumulation_steps": 2,
                                     "train.max_steps": 2, "train.validation_steps": 2})
    assert summary["global_step"] == 2  # optimizer steps, not micro-batches
    assert all(p.dtype == torch.float32 for p in summary["vae"].parameters())
    assert all(p.dtype == torch.float32 for p in summary["discriminator"].parameters())
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_existing_run_is_refused_without_resume_or_overwrite(photo_dir, tmp_path):
    out = tmp_path / "run"
    run(photo_dir, out, **{"train.max_steps": 1})
    reset_accelerate_state()
    with pytest.raises(FileExistsError, match="--resume latest.*--overwrite"):
        run(photo_dir, out, **{"train.max_steps": 1})


def test_resume_from_a_path_that_is_not_a_checkpoint_is_an_error(photo_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        run(photo_dir, tmp_path / "run", resume=str(tmp_path / "nowhere"))


DDP_DRIVER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[3])
    from safetensors.torch import save_file
    from autoencoderkl.config import load_config
    from autoencoderkl.train import main
    from conftest import tiny_overrides
    from pathlib import Path

    out, photos = Path(sys.argv[1]), Path(sys.argv[2])
    # The equivariance regulariser on at p = 0.5: steps with and without decode(tau(z)).
    eq = {"loss.equivariance": "eqvae", "loss.equivariance_prob": 0.5}
    summary = main(load_config(None, tiny_overrides(photos, **eq)), out)
    import os
    rank = int(os.environ["RANK"])  # end_training() has already closed the process group
    state = {f"vae.{k}": v for k, v in summary["vae"].state_dict().items()}
    # Discriminator parameters only: with plain BatchNorm (CPU; GPUs use SyncBatchNorm)
    # each process keeps its own running statistics, which the discriminator never uses
    # because it always runs in train mode.
    state.update({f"disc.{k}": v for k, v in summary["discriminator"].named_parameters()})
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / f"rank{rank}.safetensors"))
    """
)


def test_two_process_run_ends_with_identical_weights_on_both_ranks(photo_dir, tmp_path):
    """torchrun + gloo: gradients (VAE and discriminator) are all-reduced through DDP.

    The ranks draw disjoint crops, so without the all-reduce their weights would differ.
    EQ-VAE is on: its decode of tau(z) runs inside the DDP forward
    (``AutoencoderWithPosterior``), so its gradients are all-reduced too.
    """
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [*torchrun(2),
         str(driver), str(out), str(photo_dir), str(Path(__file__).parent)],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr, "the ranks did not form one process group"
    r0, r1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert r0.keys() == r1.keys()
    for key in r0:
        assert torch.equal(r0[key], r1[key]), f"{key} differs between ranks"
    initial = AutoencoderKL.from_config(AutoencoderKL.load_config(out / "vae"))  # any untrained weights
    assert not torch.equal(r0["vae.decoder.conv_out.weight"], initial.decoder.conv_out.weight)
    assert (out / "vae" / "config.json").is_file()
    assert [r["eq_applied"] for r in read_metrics(out) if "loss" in r] == [1.0, 0.0, 1.0, 1.0]


def test_channels_last_and_gradient_checkpointing_train_the_same_model(photo_dir, tmp_path):
    """The speed switches change memory layout and recomputation, not the maths."""
    steps = {"train.max_steps": 2, "train.validation_steps": 100, "train.checkpointing_steps": 100}
    plain = run(photo_dir, tmp_path / "plain", **steps)["vae"]
    reset_accelerate_state()
    fast = run(photo_dir, tmp_path / "fast", **steps, **{"train.channels_last": "true",
                                                          "train.gradient_checkpointing": "true"})["vae"]
    assert fast.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    for (name, a), (_, b) in zip(plain.state_dict().items(), fast.state_dict().items()):
        if name.endswith("to_k.bias"):
            # Softmax ignores a key bias: its true gradient is 0, so Adam turns rounding
            # noise into full-size steps of either sign. Any layout change moves it.
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} differs: {m}")


def fp16_loss_scaling(monkeypatch, scale: float) -> None:
    """Make the next run's Accelerator behave as fp16 on a GPU, minus the fp16 arithmetic.

    CPUs get no GradScaler from accelerate, so one is put in: accelerate's fp16 mode (which
    unscales in clip_grad_norm_ and unscale_gradients), a GradScaler with ``scale``, and
    autocast disabled, so that a power-of-two scale changes no value (x 2^k is exact).
    """
    import autoencoderkl.launch as run_module
    from accelerate.utils import AutocastKwargs

    build = run_module.build_accelerator

    def with_scaler(output_dir, **settings):
        accelerator = build(output_dir, **{**settings, "mixed_precision": "fp16"})
        accelerator.native_amp = True
        accelerator.autocast_handler = AutocastKwargs(enabled=False)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10**6)
        return accelerator

    monkeypatch.setattr(run_module, "build_accelerator", with_scaler)


def test_fp16_gradient_accumulation_trains_both_models_on_every_micro_batch(photo_dir, tmp_path, monkeypatch):
    """Loss scaling must not change what is learnt: scale 2^10 == scale 1, with A = 2 and the GAN on.

    accelerate's clip_grad_norm_ unscales every prepared optimizer, so clipping the
    autoencoder's gradients also unscaled the discriminator's half-accumulated ones, which
    were unscaled again at its own step: its first micro-batch weighed 2^-10 here.
    """
    extra = {"train.gradient_accumulation_steps": 2, "loss.disc_start": 0, "loss.shared_backward": "false",
             "train.max_steps": 2, "train.validation_steps": 100, "train.checkpointing_steps": 100}
    finals = {}
    for scale in (1.0, 2.0**10):
        reset_accelerate_state()
        fp16_loss_scaling(monkeypatch, scale)
        summary = run(photo_dir, tmp_path / f"scale{scale:g}", **extra)
        finals[scale] = {"vae": summary["vae"].state_dict(), "discriminator": summary["discriminator"].state_dict()}
    for model in ("vae", "discriminator"):
        want, got = finals[1.0][model], finals[2.0**10][model]
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7, msg=f"{model}.{key} depends on the loss scale")


def test_logged_losses_are_means_over_every_micro_batch_of_the_window(photo_dir, tmp_path, monkeypatch):
    from autoencoderkl.losses import AutoencoderLoss

    seen, original = [], AutoencoderLoss.generator_loss

    def recording(self, *args, **kwargs):
        loss, logs = original(self, *args, **kwargs)
        seen.append(logs["rec_loss"])
        return loss, logs

    monkeypatch.setattr(AutoencoderLoss, "generator_loss", recording)
    out = tmp_path / "run"
    run(photo_dir, out, **{"train.gradient_accumulation_steps": 2, "train.log_steps": 2, "train.max_steps": 4})
    logged = [r["rec_loss"] for r in read_metrics(out) if "rec_loss" in r]
    assert len(seen) == 8 and len(logged) == 2  # 4 steps x 2 micro-batches; a line every 2 steps
    assert logged == pytest.approx([sum(seen[:4]) / 4, sum(seen[4:]) / 4], rel=1e-6)
    assert logged[1] != pytest.approx(seen[-1], rel=1e-6)  # not the last micro-batch alone
