"""Stage 2 end to end on a tiny cache: forward process, training, resume, pipeline, samplers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel
from PIL import Image
from safetensors.torch import load_file

from conftest import reset_accelerate_state, write_photos
from latent_diffusion.config import NoiseConfig, default_sampler, load_config
from latent_diffusion.encode import encode_latents
from latent_diffusion.latents import load_index
from latent_diffusion.model import build_noise_scheduler, build_sampler, build_unet
from latent_diffusion.export import load_pipeline, save_pipeline
from latent_diffusion.pipeline import LatentDiffusionPipeline
from latent_diffusion.sample import sample
from latent_diffusion.train import diffusion_loss, main

REPO = Path(__file__).resolve().parents[1]

# diffusers' DPM-Solver and Euler schedulers build sigmas with np.array(tensor, copy=False).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

# A two-level U-Net of ~0.2M parameters for (4, 8, 8) latents.
TINY_UNET = {
    "model.block_out_channels": "[16,32]",
    "model.down_block_types": "[DownBlock2D,AttnDownBlock2D]",
    "model.up_block_types": "[AttnUpBlock2D,UpBlock2D]",
    "model.layers_per_block": 1,
    "model.attention_head_dim": 8,
    "model.norm_num_groups": 8,
}


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """f = 2, 4 latent channels: 16 px images -> (4, 8, 8) latents."""
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                         latent_channels=4, sample_size=16).eval()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> dict:
    """A labelled cache: 3 class folders x 3 photos, encoded at 16 px by a tiny VAE."""
    root = tmp_path_factory.mktemp("ldm")
    for c in range(3):
        write_photos(root / "photos" / f"class{c}", n=3, seed=c)
    tiny_vae().save_pretrained(root / "vae")
    encode_latents(root / "vae", root / "photos", root / "latents", resolution=16, batch_size=4, num_workers=0)
    reset_accelerate_state()
    return {"root": root, "latents": root / "latents", "vae": root / "vae", "index": load_index(root / "latents")}


def overrides(cache: dict, **extra) -> list[str]:
    values = {
        **TINY_UNET,
        "data.latents": str(cache["latents"]),
        "data.vae": str(cache["vae"]),
        "data.batch_size": 4,
        "optim.lr": 2e-3,
        "optim.lr_warmup_steps": 0,
        "train.max_steps": 4,
        "train.checkpointing_steps": 2,
        "train.validation_steps": 2,
        "train.log_steps": 1,
        "train.num_validation_samples": 3,
        "train.validation_inference_steps": 2,
        "train.ema_decay": 0.9,
        "train.cpu_threads": 1,  # a 0.2M-parameter model only waits on a second thread
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def run(cache: dict, out: Path, resume=None, **extra) -> dict:
    return main(load_config(None, overrides(cache, **extra)), out, resume=resume)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory) -> dict:
    """A 40-step run on the labelled cache (shared by the tests that read its outputs)."""
    reset_accelerate_state()
    out = tmp_path_factory.mktemp("trained") / "run"
    summary = run(cache, out, **{"train.max_steps": 40, "train.validation_steps": 20, "train.checkpointing_steps": 20,
                                 "train.log_steps": 5})
    return {"out": out, "summary": summary}


def tiny_pipeline(num_classes: int | None = 3, prediction_type: str = "epsilon") -> LatentDiffusionPipeline:
    """A randomly initialised pipeline (U-Net ~0.2M parameters), in eval mode."""
    torch.manual_seed(0)
    cfg = load_config(None, [f"{k}={v}" for k, v in TINY_UNET.items()])
    unet = build_unet(cfg.model, (4, 8, 8), num_classes).eval()
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=0.7, shift_factor=0.1)
    noise = NoiseConfig(prediction_type=prediction_type)
    scheduler = build_sampler(default_sampler(prediction_type), build_noise_scheduler(noise).config)
    pipe = LatentDiffusionPipeline(unet, scheduler, vae, class_names=[f"c{i}" for i in range(num_classes or 0)] or None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- config ----------------------------------------------------------------------


def test_config_errors_name_the_key_and_list_the_valid_ones(tmp_path):
    with pytest.raises(ValueError) as err:
        load_config(None, ["model.block_out_channel=[8]"])
    msg = str(err.value)
    assert "unknown config key 'model.block_out_channel'" in msg and "did you mean model.block_out_channels" in msg
    assert msg.endswith("did you mean model.block_out_channels?")  # the hint last, no list of keys after it
    with pytest.raises(ValueError, match=r"bad value for config key 'train.max_steps'.*'many'"):
        load_config(None, ["train.max_steps=many"])
    with pytest.raises(ValueError, match=r"'noise.prediction_type' must be one of \['epsilon', 'v_prediction', 'flow'\]"):
        load_config(None, ["noise.prediction_type=sample"])
    with pytest.raises(ValueError, match="must have the same length"):
        load_config(None, ["model.block_out_channels=[32,64]"])
    with pytest.raises(ValueError, match=r"unknown block type\(s\) \['CrossAttnDownBlock2D'\]"):
        load_config(None, ["model.down_block_types=[DownBlock2D,CrossAttnDownBlock2D,AttnDownBlock2D]"])
    with pytest.raises(ValueError, match="model.label_dropout must lie in"):
        load_config(None, ["model.label_dropout=1.5"])
    with pytest.raises(ValueError, match="give --latents"):
        main(load_config(None, []), tmp_path / "run")
    for yaml in sorted((REPO / "configs" / "latent_diffusion").glob("*.yaml")):
        load_config(yaml)  # the shipped configs are valid


def test_cli_reports_a_typo_before_any_work():
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_ldm.py"), "--config", str(REPO / "configs/latent_diffusion/demo.yaml"),
         "--latents", "nowhere", "train.max_step=3"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "unknown config key 'train.max_step'" in proc.stderr and "did you mean train.max_steps" in proc.stderr


# ---- the forward process and the loss ----------------------------------------------


class Recorder(torch.nn.Module):
    """Stands in for the U-Net: records its input, predicts zero."""

    def forward(self, sample, timesteps, class_labels=None):
        self.sample, self.timesteps, self.class_labels = sample, timesteps, class_labels
        return type("Out", (), {"sample": torch.zeros_like(sample)})


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_noise_follows_the_ldm_forward_process(prediction_type):
    """c_t = sqrt(ab_t) c_0 + sqrt(1 - ab_t) eps with LDM's scaled_linear betas; the target; Min-SNR."""
    scheduler = build_noise_scheduler(NoiseConfig(prediction_type=prediction_type))
    # LDM's schedule, computed here independently: betas = linspace(sqrt(b0), sqrt(b1), T) ** 2.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), alpha_bar, rtol=1e-6, atol=0)

    g = torch.Generator().manual_seed(0)
    c0, eps = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    unet = Recorder()
    loss = diffusion_loss(unet, scheduler, c0, None, noise=eps, timesteps=t)
    a = alpha_bar[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(unet.sample, a.sqrt() * c0 + (1 - a).sqrt() * eps, rtol=1e-5, atol=1e-6)
    assert torch.equal(unet.timesteps, t)
    # With a zero prediction the loss is the mean squared target: eps, or v = sqrt(ab) eps - sqrt(1 - ab) c0.
    target = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * c0
    per_sample = target.pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, per_sample.mean(), rtol=1e-5, atol=1e-6)
    # Min-SNR-5 (Hang et al. 2023): min(SNR, 5) / SNR for eps, min(SNR, 5) / (SNR + 1) for v.
    snr = (alpha_bar[t] / (1 - alpha_bar[t])).float()
    weight = snr.clamp(max=5) / (snr if prediction_type == "epsilon" else snr + 1)
    weighted = diffusion_loss(unet, scheduler, c0, None, snr_gamma=5.0, noise=eps, timesteps=t)
    torch.testing.assert_close(weighted, (weight * per_sample).mean(), rtol=1e-5, atol=1e-6)
    assert weight[0] < 0.01 and weight[-1] == pytest.approx(1.0 if prediction_type == "epsilon" else snr[-1] / (snr[-1] + 1))


def test_timesteps_are_drawn_uniformly_over_all_steps():
    scheduler = build_noise_scheduler(NoiseConfig())
    unet = Recorder()
    torch.manual_seed(0)
    diffusion_loss(unet, scheduler, torch.zeros(20000, 1, 1, 1), None)
    t = unet.timesteps
    assert t.min() == 0 and t.max() == 999
    counts = torch.bincount(t // 100, minlength=10).float()
    assert (counts / 2000 - 1).abs().max() < 0.1  # ten bins of 100 steps, ~2000 draws each


# ---- training ----------------------------------------------------------------------


def test_training_lowers_the_loss_and_exports_a_loadable_pipeline(cache, trained):
    out, summary = trained["out"], trained["summary"]
    assert summary["global_step"] == 40
    records = read_metrics(out)
    val = {r["step"]: r["val/loss"] for r in records if "val/loss" in r}
    train_loss = [r["loss"] for r in records if "loss" in r]
    assert sorted(val) == [0, 20, 40]
    assert val[40] < 0.8 * val[0], val  # fixed-noise denoising loss of the EMA weights
    assert np.mean(train_loss[-2:]) < 0.8 * np.mean(train_loss[:2]), train_loss
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000020", "step-0000040"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000000.png", "step-0000020.png", "step-0000040.png"]
    assert list((out / "logs").rglob("events.out.tfevents.*")), "TensorBoard logs missing"
    assert "scaling_factor" in (out / "config.yaml").read_text()

    pipe = LatentDiffusionPipeline.from_pretrained(out / "pipeline", local_files_only=True)
    # The VAE carries the scale the U-Net was trained with: the cache's, not the VAE's own 1.0.
    assert pipe.vae.config.scaling_factor == pytest.approx(cache["index"]["scaling_factor"], rel=1e-12)
    assert pipe.vae.config.shift_factor == 0.0
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.num_classes == 3 and pipe.unet.config.num_class_embeds == 4  # + the null class
    assert pipe.config.class_names == ["class0", "class1", "class2"]
    # pipeline/unet holds the EMA weights, not the raw ones.
    ema = summary["ema"].shadow_params
    params = list(pipe.unet.parameters())
    assert all(torch.equal(p, e.cpu()) for p, e in zip(params, ema))
    assert not all(torch.equal(p, q) for p, q in zip(params, summary["unet"].parameters()))


@pytest.mark.parametrize("prediction_type", ["epsilon", "flow"])
def test_resume_continues_at_the_right_step_bit_exactly(cache, tmp_path, prediction_type):
    """4 steps straight == 2 steps, stop, --resume latest, 2 more (U-Net, optimizer, EMA, RNG, data)."""
    objective = {"noise.prediction_type": prediction_type}  # flow: its t draws come from the checkpointed RNG too
    straight = tmp_path / "straight"
    run(cache, straight, **objective)
    resumed = tmp_path / "resumed"
    run(cache, resumed, **objective, **{"train.max_steps": 2})
    reset_accelerate_state()
    summary = run(cache, resumed, resume="latest", **objective)
    assert summary["global_step"] == 4 and summary["first_val_loss"] is None  # no step-0 validation on resume

    a, b = straight / "checkpoints" / "step-0000004", resumed / "checkpoints" / "step-0000004"
    for name in ("model.safetensors", "ema.safetensors"):
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"{name}:{key} differs after resume"
    la = [r["loss"] for r in read_metrics(straight) if "loss" in r]
    lb = [r["loss"] for r in read_metrics(resumed) if "loss" in r]
    assert [r["step"] for r in read_metrics(resumed) if "loss" in r] == [1, 2, 3, 4]  # each step once
    assert la == lb
    assert (straight / "samples" / "step-0000004.png").read_bytes() == (resumed / "samples" / "step-0000004.png").read_bytes()


def test_bf16_autocast_with_accumulation_keeps_fp32_master_weights(cache, tmp_path, monkeypatch):
    import latent_diffusion.train as ldm_train

    dtypes, build = [], ldm_train.build_denoiser  # what the U-Net's last layer computes in, per training forward

    def recorded(*args, **kwargs):
        unet = build(*args, **kwargs)  # (accelerate hands the U-Net's own output back in fp32)
        unet.conv_out.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype) if m.training else None)
        return unet

    monkeypatch.setattr(ldm_train, "build_denoiser", recorded)
    out = tmp_path / "bf16"
    summary = run(cache, out, **{"train.mixed_precision": "bf16", "train.gradient_accumulation_steps": 2,
                                 "train.max_steps": 2})
    assert summary["global_step"] == 2  # optimizer steps, not micro-batches
    assert dtypes == [torch.bfloat16] * 4  # 2 steps x 2 micro-batches, each under bf16 autocast
    assert all(p.dtype == torch.float32 for p in summary["unet"].parameters())
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 2 and np.isfinite(losses).all()
    assert all(p.dtype == torch.float32 for p in load_pipeline(out).unet.parameters())


def test_channels_last_and_checkpointing_train_the_same_unet_and_export_it(cache, tmp_path):
    """channels_last and recomputation change layout and work, not the maths; the export loads."""
    steps = {"train.max_steps": 2, "train.use_ema": "false"}
    plain = run(cache, tmp_path / "plain", **steps)["unet"]
    reset_accelerate_state()
    fast = run(cache, tmp_path / "fast", **steps, **{"train.channels_last": "true",
                                                     "train.gradient_checkpointing": "true"})["unet"]
    assert fast.conv_in.weight.is_contiguous(memory_format=torch.channels_last) and fast.is_gradient_checkpointing
    for (name, a), (_, b) in zip(plain.state_dict().items(), fast.state_dict().items()):
        if name.endswith("to_k.bias"):  # softmax ignores it: Adam turns its rounding noise into steps
            continue
        # Adam's first steps (lr 2e-3) magnify rounding differences of tiny gradients
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name} differs: {m}")
    exported = UNet2DModel.from_pretrained(tmp_path / "fast" / "pipeline" / "unet")
    torch.testing.assert_close(exported.conv_in.weight, fast.conv_in.weight.contiguous())


def test_cache_from_another_vae_is_refused(cache, tmp_path):
    tiny_vae(seed=1).save_pretrained(tmp_path / "other-vae")
    with pytest.raises(ValueError, match="sha256"):
        run(cache, tmp_path / "run", **{"data.vae": str(tmp_path / "other-vae")})


def test_unconditional_v_prediction_run_exports_what_it_trained(cache, tmp_path):
    out = tmp_path / "run"
    run(cache, out, **{"model.class_conditional": "false", "noise.prediction_type": "v_prediction",
                       "noise.snr_gamma": 5.0, "noise.pipeline_scheduler": "ddpm", "data.scaling_factor": 0.5,
                       "train.max_steps": 2, "train.use_ema": "false"})
    pipe = load_pipeline(out)  # the run dir works too
    assert pipe.unet.config.num_class_embeds is None and pipe.num_classes is None
    assert type(pipe.scheduler).__name__ == "DDPMScheduler" and pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.vae.config.scaling_factor == 0.5  # the override the run trained with
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


# ---- pipeline and sampling -------------------------------------------------------------


def test_pipeline_saves_loads_and_reproduces_samples_for_a_seed(tmp_path):
    pipe = tiny_pipeline()
    save_pipeline(pipe, tmp_path / "pipe")
    loaded = LatentDiffusionPipeline.from_pretrained(tmp_path / "pipe", local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.vae.config.scaling_factor == 0.7 and loaded.vae.config.shift_factor == 0.1
    assert loaded.config.class_names == ["c0", "c1", "c2"]

    def draw(p):
        return p(batch_size=2, num_inference_steps=4, class_labels=[0, 2], guidance_scale=2.0,
                 generator=torch.Generator().manual_seed(7), output_type="np").images

    first = draw(pipe)
    assert np.array_equal(first, draw(loaded))
    assert np.array_equal(first, draw(pipe))  # the same seed again
    other = pipe(batch_size=2, num_inference_steps=4, class_labels=[0, 2], guidance_scale=2.0,
                 generator=torch.Generator().manual_seed(8), output_type="np").images
    assert not np.array_equal(first, other)


def test_decoding_undoes_the_pipelines_own_scale_and_shift():
    pipe = tiny_pipeline()
    latents = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images
    images = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    with torch.no_grad():
        want = (pipe.vae.decode(latents / 0.7 + 0.1).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, want)


def test_guidance_runs_with_and_without_a_class_label():
    pipe = tiny_pipeline()
    seen = []
    pipe.unet.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["class_labels"].tolist()), with_kwargs=True)

    def draw(**kw):
        seen.clear()
        return pipe(batch_size=2, num_inference_steps=3, generator=[torch.Generator().manual_seed(i) for i in range(2)],
                    output_type="pt", **kw).images

    uncond = draw()  # no label: the null class, one U-Net call per step
    assert seen[0] == [3, 3] and uncond.shape == (2, 3, 16, 16) and torch.isfinite(uncond).all()
    cond = draw(class_labels=[0, 1])  # guidance 1: conditional only
    assert seen[0] == [0, 1]
    guided = draw(class_labels=[0, 1], guidance_scale=3.0)  # [y, null] in one batch of 2B
    assert seen[0] == [0, 1, 3, 3] and torch.isfinite(guided).all()
    assert not torch.allclose(cond, guided) and not torch.allclose(cond, uncond)
    # Guidance 0 keeps only the null-class prediction: the unconditional samples.
    torch.testing.assert_close(draw(class_labels=[0, 1], guidance_scale=0.0), uncond, atol=1e-5, rtol=0)
    assert draw(class_labels=2).shape == (2, 3, 16, 16)  # one label for the whole batch

    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 2\]"):
        draw(class_labels=[0, 3])
    with pytest.raises(ValueError, match="unconditional"):
        tiny_pipeline(num_classes=None)(batch_size=1, num_inference_steps=1, class_labels=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_each_scheduler_gives_finite_images_of_the_right_shape(tmp_path, prediction_type):
    pipe = tiny_pipeline(prediction_type=prediction_type)
    for name in ("ddim", "ddpm", "dpm", "euler"):
        result = sample(pipe, tmp_path / name, num_images=3, steps=4, scheduler=name, guidance_scale=2.0,
                        batch_size=2, progress=False)
        assert type(pipe.scheduler).__name__ == {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler",
                                                 "dpm": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler"}[name]
        assert pipe.scheduler.config.prediction_type == prediction_type  # carried over from the saved config
        assert [p.name for p in result["paths"]] == ["000000.png", "000001.png", "000002.png"]
        arrays = np.stack([np.asarray(Image.open(p)) for p in result["paths"]])
        assert arrays.shape == (3, 16, 16, 3) and arrays.std() > 0
        assert Image.open(result["grid"]).size[0] > 16
        images = pipe(batch_size=2, num_inference_steps=4, class_labels=[0, 1], guidance_scale=2.0,
                      generator=torch.Generator().manual_seed(0), output_type="np").images
        assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()

        def latents(steps, guidance_scale=2.0):
            return pipe(batch_size=2, num_inference_steps=steps, class_labels=[0, 1], guidance_scale=guidance_scale,
                        generator=torch.Generator().manual_seed(0), output_type="latent").images

        x4, x8, x16 = latents(4), latents(8), latents(16)
        assert not torch.allclose(latents(4, guidance_scale=1.0), x4, atol=1e-3), f"{name}: guidance changed nothing"
        if name != "ddpm":  # ancestral sampling draws fresh noise at every step: no single path to converge to
            coarse, fine = (x8 - x4).abs().mean().item(), (x16 - x8).abs().mean().item()
            assert 0 < fine < 0.9 * coarse, f"{name}: 4 -> 8 steps moved the sample {coarse}, 8 -> 16 steps {fine}"
    if prediction_type == "epsilon":
        dpm = pipe.scheduler = build_sampler("dpm", pipe.scheduler.config)
        assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2


def test_same_seed_same_images_whatever_the_batch_size(tmp_path):
    pipe = tiny_pipeline()

    def pngs(folder, **kw):
        result = sample(pipe, tmp_path / folder, steps=3, scheduler="euler", progress=False, **kw)
        return [np.asarray(Image.open(p)).astype(int) for p in result["paths"]]

    whole = pngs("a", num_images=5, batch_size=5, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(whole, pngs("b", num_images=5, batch_size=5, seed=3)))
    split = pngs("c", num_images=5, batch_size=2, seed=3)
    fewer = pngs("d", num_images=3, batch_size=3, seed=3)
    for x, y in zip(whole, split + fewer):
        assert np.abs(x - y).max() <= 1  # batched kernels may round differently in the last bit
    assert not np.array_equal(whole[0], pngs("e", num_images=1, seed=4)[0])


def test_sample_rejects_a_label_the_model_does_not_have(tmp_path):
    with pytest.raises(ValueError, match="out of range; this model has 3 classes: 0=c0, 1=c1, 2=c2"):
        sample(tiny_pipeline(), tmp_path / "s", num_images=1, class_label=5, progress=False)


def test_sample_ldm_cli_writes_pngs_a_grid_and_settings(trained, tmp_path):
    out = tmp_path / "samples"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "sample_ldm.py"), "--model", str(trained["out"] / "pipeline"),
         "--num-images", "3", "--steps", "2", "--scheduler", "dpm", "--class-label", "1", "--guidance-scale", "2",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "000002.png", "grid.png", "sampling.json"]
    settings = json.loads((out / "sampling.json").read_text())
    assert settings["scheduler"] == "DPMSolverMultistepScheduler" and settings["class_label"] == 1


# ---- flow matching -----------------------------------------------------------------


def test_flow_path_target_and_timesteps_match_a_hand_computation():
    """c_t = (1 - t) c_0 + t eps, target eps - c_0, the U-Net given t * T; SD3's logit-normal t."""
    scheduler = build_noise_scheduler(NoiseConfig(prediction_type="flow"))
    g = torch.Generator().manual_seed(0)
    c0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    unet = Recorder()
    loss = diffusion_loss(unet, scheduler, c0, None, noise=eps, timesteps=t * 1000)
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(unet.sample[i], (1 - ti) * c0[i] + ti * eps[i])
    assert torch.equal(unet.timesteps, t * 1000) and unet.timesteps.dtype == torch.float32
    torch.testing.assert_close(loss, (eps - c0).pow(2).mean())  # zero prediction: the mean squared velocity
    # The same path as diffusers' own flow forward process, at the timesteps its sampler feeds the U-Net.
    scheduler.set_timesteps(10)
    ts = scheduler.timesteps[[0, 4]]  # sigma * 1000 (floats)
    diffusion_loss(unet, scheduler, c0[:2], None, noise=eps[:2], timesteps=ts)
    torch.testing.assert_close(unet.sample, scheduler.scale_noise(c0[:2], ts, eps[:2]))

    torch.manual_seed(0)
    zeros = torch.zeros(20000, 1, 1, 1)
    diffusion_loss(unet, scheduler, zeros, None)  # default: logit-normal(0, 1)
    u = unet.timesteps.double() / 1000
    logit = torch.log(u / (1 - u))
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03
    diffusion_loss(unet, scheduler, zeros, None, noise_cfg=NoiseConfig(prediction_type="flow", logit_mean=1.0,
                                                                       logit_std=0.5))
    u = unet.timesteps.double() / 1000
    assert abs(torch.log(u / (1 - u)).mean() - 1) < 0.03
    diffusion_loss(unet, scheduler, zeros, None, noise_cfg=NoiseConfig(prediction_type="flow", timestep_sampling="uniform"))
    counts = torch.bincount((unet.timesteps / 100).long(), minlength=10).float()
    assert unet.timesteps.min() >= 0 and unet.timesteps.max() < 1000 and (counts / 2000 - 1).abs().max() < 0.1


def test_flow_refuses_min_snr_and_samplers_of_the_other_objective(tmp_path):
    with pytest.raises(ValueError, match=r"noise.snr_gamma=5.0: Min-SNR .* not for noise.prediction_type=flow.*"
                                         r"set noise.snr_gamma=null"):
        load_config(None, ["noise.prediction_type=flow", "noise.snr_gamma=5"])
    with pytest.raises(ValueError, match=r"noise.pipeline_scheduler 'ddim' does not fit a model trained with "
                                         r"prediction_type 'flow'.*\['flow_euler', 'flow_heun'\]"):
        load_config(None, ["noise.prediction_type=flow", "noise.pipeline_scheduler=ddim"])
    with pytest.raises(ValueError, match=r"'flow_heun' does not fit .*'epsilon'.*\['ddim', 'ddpm', 'dpm', 'euler'\]"):
        load_config(None, ["noise.pipeline_scheduler=flow_heun"])
    flow = tiny_pipeline(prediction_type="flow")
    with pytest.raises(ValueError, match=r"scheduler 'ddim' does not fit a model trained with prediction_type 'flow': "
                                         r"the model predicts the flow velocity"):
        sample(flow, tmp_path / "s", num_images=1, scheduler="ddim", progress=False)
    with pytest.raises(ValueError, match=r"scheduler 'flow_euler' does not fit a model trained with prediction_type 'epsilon'"):
        sample(tiny_pipeline(), tmp_path / "s", num_images=1, scheduler="flow_euler", progress=False)
    with pytest.raises(ValueError, match=r"shift=3.0: a shift > 0 applies to the flow samplers only"):
        sample(tiny_pipeline(), tmp_path / "s", num_images=1, scheduler="ddim", shift=3.0, progress=False)
    flow.scheduler = DDIMScheduler.from_config(flow.scheduler.config)  # swapped in by hand
    with pytest.raises(ValueError, match=r"DDIMScheduler integrates prediction_type 'epsilon', but this U-Net was "
                                         r"trained with 'flow' \(model_index.json\)"):
        flow(batch_size=1, num_inference_steps=2)


class VelocityOracle(torch.nn.Module):
    """Stands in for the U-Net: the exact velocity E[eps - x_0 | x_t] for x_0 ~ N(mu, S).

    With x_t = (1 - t) x_0 + t eps: x_t ~ N((1 - t) mu, C), C = (1 - t)^2 S + t^2 I, so
    E[eps | x_t] = t C^-1 r and E[x_0 | x_t] = mu + (1 - t) S C^-1 r, r = x_t - (1 - t) mu.
    "Latents" are (B, 2, 1, 1); it reads t from the timestep input as t * 1000.
    """

    def __init__(self, mu: torch.Tensor, cov: torch.Tensor):
        super().__init__()
        self.config = type("Config", (), {"sample_size": 1, "in_channels": 2, "num_class_embeds": None})
        self.mu, self.cov, self.seen = mu.double(), cov.double(), []
        self.dtype, self.device = torch.float32, torch.device("cpu")

    def forward(self, sample, timestep, class_labels=None):
        t = float(timestep.reshape(-1)[0]) / 1000  # (B,) timesteps, all equal
        self.seen.append(t)
        x = sample.flatten(1).double()  # (B, 2)
        c = (1 - t) ** 2 * self.cov + t**2 * torch.eye(2, dtype=torch.float64)
        r = torch.linalg.solve(c, (x - (1 - t) * self.mu).T).T  # C^-1 r, (B, 2)
        v = t * r - (self.mu + (1 - t) * r @ self.cov)
        return type("Out", (), {"sample": v.float().view_as(sample)})


@pytest.mark.parametrize("name, steps", [("flow_euler", 200), ("flow_heun", 10)])
def test_flow_sampler_with_the_exact_velocity_recovers_a_gaussian(name, steps):
    """The pipeline + FlowMatch scheduler integrate the true velocity field back to N(mu, S)."""
    mu, cov = torch.tensor([1.0, -0.5]), torch.tensor([[1.0, 0.6], [0.6, 0.5]])
    oracle = VelocityOracle(mu, cov)
    scheduler = build_sampler(name, build_noise_scheduler(NoiseConfig(prediction_type="flow")).config)
    pipe = LatentDiffusionPipeline(oracle, scheduler, tiny_vae())
    pipe.set_progress_bar_config(disable=True)
    x = pipe(batch_size=8192, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
             output_type="latent").images.flatten(1).double()  # (8192, 2)
    assert oracle.seen[0] == 1.0 and oracle.seen[-1] == pytest.approx(1e-3)  # from pure noise to sigma_min
    assert len(oracle.seen) == (steps if name == "flow_euler" else 2 * steps - 1)
    # Standard errors with 8192 draws: about 0.011 (mean), 0.016 (covariance).
    torch.testing.assert_close(x.mean(0), mu.double(), atol=0.04, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov.double(), atol=0.05, rtol=0)


def test_flow_pipeline_saves_loads_and_reproduces_a_seeds_samples(tmp_path):
    pipe = tiny_pipeline(prediction_type="flow")
    pipe.scheduler = build_sampler("flow_euler", pipe.scheduler.config, shift=3.0)
    save_pipeline(pipe, tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["prediction_type"] == "flow"
    loaded = load_pipeline(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and loaded.scheduler.config.shift == 3.0

    def draw(p, seed=7):
        return p(batch_size=2, num_inference_steps=4, class_labels=[0, 2], guidance_scale=2.0,
                 generator=torch.Generator().manual_seed(seed), output_type="np").images

    first = draw(pipe)
    assert np.array_equal(first, draw(loaded)) and np.isfinite(first).all()
    assert not np.array_equal(first, draw(pipe, seed=8))
    result = sample(loaded, tmp_path / "heun", num_images=3, steps=3, guidance_scale=2.0, batch_size=2,
                    scheduler="flow_heun", progress=False)
    settings = json.loads((tmp_path / "heun" / "sampling.json").read_text())
    assert settings["scheduler"] == "FlowMatchHeunDiscreteScheduler" and settings["shift"] == 3.0
    assert settings["prediction_type"] == "flow" and len(result["paths"]) == 3
    default = sample(loaded, tmp_path / "default", num_images=1, steps=2, progress=False)  # no --scheduler
    assert default["settings"]["scheduler"] == "FlowMatchEulerDiscreteScheduler"


def test_flow_training_lowers_the_loss_and_exports_a_flow_pipeline(cache, tmp_path):
    out = tmp_path / "flow"
    summary = run(cache, out, **{"noise.prediction_type": "flow", "noise.flow_shift": 2.0, "train.max_steps": 30,
                                 "train.validation_steps": 15, "train.checkpointing_steps": 30, "train.log_steps": 5})
    records = read_metrics(out)
    val = {r["step"]: r["val/loss"] for r in records if "val/loss" in r}
    train_loss = [r["loss"] for r in records if "loss" in r]
    assert summary["global_step"] == 30 and sorted(val) == [0, 15, 30]
    assert val[30] < 0.8 * val[0], val  # fixed-noise velocity MSE of the EMA weights
    # Much of the velocity eps - c_0 cannot be predicted (eps near t = 0, c_0 near t = 1), so
    # the noisy training loss falls little from its start near 2 (unit-variance c_0 and eps).
    assert np.mean(train_loss[-3:]) < np.mean(train_loss[:2]) < 2.1, train_loss
    pipe = load_pipeline(out)
    assert pipe.config.prediction_type == "flow" and pipe.config.class_names == ["class0", "class1", "class2"]
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.shift == 2.0
    assert (out / "samples" / "step-0000030.png").is_file()
