"""Stage 2 with a transformer: DiT / SiT through the same loop, latent normalisation, guidance, exports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from safetensors.torch import load_file

from conftest import reset_accelerate_state
from latent_diffusion.config import NoiseConfig, default_sampler, load_config
from latent_diffusion.export import fit_null_class, load_pipeline, plain_pipeline
from latent_diffusion.latents import LatentDataset, load_index
from latent_diffusion.model import build_denoiser, build_noise_scheduler, build_sampler
from latent_diffusion.pipeline import LatentDiffusionPipeline, LatentNormalization
from latent_diffusion.train import draw_timesteps, drop_labels, main, normal_kl, vlb_terms
from test_faults_ldm import KILLING_DRIVER
from test_ldm import TINY_UNET, cache, overrides, tiny_vae  # noqa: F401  (cache is a fixture)
from test_probe import probe_data  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

# A two-block DiT of ~0.1M parameters for (4, 8, 8) latents: 2x2 patches, 16 tokens of width 32.
TINY_DIT = {"model.type": "dit", "model.patch_size": 2, "model.num_layers": 2, "model.num_attention_heads": 2,
            "model.attention_head_dim": 16}


def dit_overrides(data: dict, **extra) -> list[str]:
    """test_ldm's tiny run settings with the tiny DiT instead of the tiny U-Net."""
    return [o for o in overrides(data, **{**TINY_DIT, **extra}) if o.split("=")[0] not in TINY_UNET]


def run_dit(data: dict, out: Path, resume=None, **extra) -> dict:
    return main(load_config(None, dit_overrides(data, **extra)), out, resume=resume)


def tiny_dit(num_classes: int | None = 3, **extra) -> DiTTransformer2DModel:
    torch.manual_seed(0)
    cfg = load_config(None, [f"{k}={v}" for k, v in {**TINY_DIT, **extra}.items()])
    return build_denoiser(cfg.model, (4, 8, 8), num_classes)


def pipeline_of(denoiser, prediction_type: str = "epsilon", class_names=("c0", "c1", "c2"), sampler=None,
                normalization: LatentNormalization | None = None) -> LatentDiffusionPipeline:
    vae = tiny_vae()
    vae.register_to_config(**(normalization or LatentNormalization("global", 0.7)).vae_config())
    noise = NoiseConfig(prediction_type=prediction_type)
    scheduler = build_sampler(sampler or default_sampler(prediction_type), build_noise_scheduler(noise).config)
    pipe = LatentDiffusionPipeline(denoiser.eval(), scheduler, vae, class_names=list(class_names) or None,
                                   prediction_type=prediction_type)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """The model with every zero-initialised (adaLN-Zero) weight randomised, so labels and t matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


# ---- config ------------------------------------------------------------------------------


def test_model_type_takes_its_own_keys_and_refuses_the_others_by_name():
    unet = load_config(None, [])
    assert (unet.model.type, unet.model.block_out_channels, unet.model.attention_head_dim) == ("unet", [128, 256, 256], 32)
    assert unet.model.patch_size is None and unet.model.num_layers is None  # the DiT keys stay unset
    dit = load_config(None, ["model.type=dit"])
    assert (dit.model.patch_size, dit.model.num_layers, dit.model.num_attention_heads, dit.model.attention_head_dim) \
        == (2, 12, 6, 64)  # DiT-S/2
    assert dit.model.block_out_channels is None and dit.model.norm_num_groups is None
    with pytest.raises(ValueError) as err:
        load_config(None, ["model.type=dit", "model.block_out_channels=[32,64]", "model.layers_per_block=1"])
    assert ("model.type=dit does not use model.block_out_channels, model.layers_per_block (keys of model.type=unet)"
            in str(err.value)) and "model.patch_size" in str(err.value)
    with pytest.raises(ValueError, match=r"model.type=unet does not use model.patch_size \(keys of model.type=dit\)"):
        load_config(None, ["model.patch_size=1"])
    with pytest.raises(ValueError, match=r"'model.type' must be one of \['unet', 'dit'\]"):
        load_config(None, ["model.type=vit"])
    with pytest.raises(ValueError, match="must be divisible by 4"):
        load_config(None, ["model.type=dit", "model.num_attention_heads=1", "model.attention_head_dim=6"])
    with pytest.raises(ValueError, match="model.learn_sigma=true: a learned variance"):
        load_config(None, ["model.type=dit", "model.learn_sigma=true", "noise.prediction_type=flow", "noise.snr_gamma=null"])
    with pytest.raises(ValueError, match="data.shift_factor=0.1 applies to data.latent_normalization=global only"):
        load_config(None, ["data.latent_normalization=per_channel", "data.shift_factor=0.1"])
    for name in ("dit-s2", "dit-b2", "dit-xl2", "dit-demo", "probe-dit"):
        assert load_config(REPO / "configs" / "latent_diffusion" / f"{name}.yaml").model.type == "dit"


# ---- the DiT as built ------------------------------------------------------------------------


def test_dit_starts_as_adaln_zero_and_drops_no_label_itself():
    """DiT's init (zero output, identity blocks); diffusers' own train-mode label dropout is off, in every block."""
    model = tiny_dit(num_classes=3).train()
    x, t, y = torch.randn(64, 4, 8, 8), torch.randint(0, 1000, (64,)), torch.randint(0, 3, (64,))
    assert not model(x, t, class_labels=y).sample.any()  # adaLN-Zero: the final layer starts at 0
    assert all(not b.norm1.linear.weight.any() for b in model.transformer_blocks)
    perturbed(model)
    # Record the rows each block's label table looks up: exactly the labels we pass, never the null row.
    looked_up = []
    hooks = [b.norm1.emb.class_embedder.embedding_table.register_forward_hook(lambda m, i, o: looked_up.append(i[0]))
             for b in model.transformer_blocks]
    labels = drop_labels(y, 3, 0.1)  # our one drop, at our rate, from our RNG
    torch.manual_seed(1)
    a = model(x, t, class_labels=labels).sample
    torch.manual_seed(2)
    b = model(x, t, class_labels=labels).sample
    for h in hooks:
        h.remove()
    assert len(looked_up) == 2 * (len(model.transformer_blocks) + 1)  # every block, and the final layer's
    assert all(torch.equal(rows, labels) for rows in looked_up)
    assert torch.equal(a, b)  # no randomness inside the model in train mode
    torch.testing.assert_close(a, model.eval()(x, t, class_labels=labels).sample)


def test_unconditional_dit_has_only_the_null_row_and_samples():
    model = tiny_dit(num_classes=None)
    assert model.config.num_embeds_ada_norm == 0
    assert model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight.shape[0] == 1
    pipe = pipeline_of(perturbed(model), class_names=())
    assert pipe.num_classes is None
    with pytest.raises(ValueError, match="unconditional"):
        pipe(batch_size=1, num_inference_steps=2, class_labels=[0])
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


# ---- guidance ---------------------------------------------------------------------------------


def recording(pipe: LatentDiffusionPipeline, channels_out: int = 4) -> list[dict]:
    """Replace the denoiser by cond = 1 / null = 0 on every output channel and record what each step gets."""
    seen = []
    null = pipe.denoiser.config.num_embeds_ada_norm

    def forward(sample, timestep, class_labels=None, **kw):
        out = (class_labels != null).float().view(-1, 1, 1, 1).expand(len(sample), channels_out, *sample.shape[2:])
        return Transformer2DModelOutput(sample=out.clone())

    def step(model_output, t, sample, **kw):
        seen.append({"t": int(t), "output": model_output.clone(), "batch": None})
        return type("Out", (), {"prev_sample": sample})()

    pipe.denoiser.forward = forward
    pipe.scheduler.step = step
    return seen


def test_guidance_reaches_every_latent_channel_and_keeps_the_conditional_variance():
    """DiT #41 / LightningDiT #21: the original code guided channels 0..2 only."""
    pipe = pipeline_of(tiny_dit())
    seen = recording(pipe)
    pipe(batch_size=2, num_inference_steps=3, class_labels=[0, 2], guidance_scale=4.0, output_type="latent")
    assert len(seen) == 3
    for s in seen:
        assert s["output"].shape == (2, 4, 8, 8) and torch.all(s["output"] == 4.0)  # 0 + 4 x (1 - 0), all 4 channels
    learned = pipeline_of(tiny_dit(**{"model.learn_sigma": "true"}), sampler="ddpm")
    learned.scheduler = build_sampler("ddpm", learned.scheduler.config, learned_variance=True)
    seen = recording(learned, channels_out=8)
    learned(batch_size=2, num_inference_steps=2, class_labels=[0, 1], guidance_scale=3.0, output_type="latent")
    for s in seen:  # the mean guided on its 4 channels, the variance channels the conditional ones
        assert torch.all(s["output"][:, :4] == 3.0) and torch.all(s["output"][:, 4:] == 1.0)


def test_guidance_interval_guides_only_inside_and_calls_once_outside():
    pipe = pipeline_of(tiny_dit())
    seen = recording(pipe)
    calls = []
    forward = pipe.denoiser.forward
    pipe.denoiser.forward = lambda sample, timestep, class_labels=None, **kw: (calls.append(len(sample)),
                                                                              forward(sample, timestep, class_labels))[1]
    pipe(batch_size=2, num_inference_steps=4, class_labels=[0, 1], guidance_scale=4.0, output_type="latent",
         guidance_interval=(0.0, 0.5))
    steps = [s["t"] for s in seen]
    assert steps == [999, 749, 499, 249]  # DDIM, trailing spacing
    inside = [t / 1000 <= 0.5 for t in steps]
    assert [bool(torch.all(s["output"] == (4.0 if i else 1.0))) for s, i in zip(seen, inside)] == [True] * 4
    assert calls == [2 if not i else 4 for i in inside]  # outside: the conditional batch alone
    with pytest.raises(ValueError, match="guidance_interval must be"):
        pipe(batch_size=1, num_inference_steps=2, class_labels=[0], guidance_scale=2.0, guidance_interval=(0.6, 0.2))


# ---- latent normalisation -----------------------------------------------------------------------


def test_normalisation_round_trips_through_the_vae_config_and_decodes_as_the_raw_latents():
    vae = tiny_vae()
    z = vae.encode(torch.rand(2, 3, 16, 16) * 2 - 1).latent_dist.mean.detach()  # (2, 4, 8, 8)
    for norm in (LatentNormalization("global", 0.7, 0.1),
                 LatentNormalization("per_channel", 1.5, latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.5, 2.0, 1.0, 0.8])):
        vae.register_to_config(**norm.vae_config())
        again = LatentNormalization.from_vae_config(json.loads(json.dumps(dict(vae.config))))  # as saved and read back
        assert again == norm
        latents = norm.normalize(z)
        if norm.kind == "per_channel":
            expect = (z - torch.tensor([0.1, -0.2, 0.3, 0.0]).view(-1, 1, 1)) * 1.5 / torch.tensor([0.5, 2.0, 1.0, 0.8]).view(-1, 1, 1)
            torch.testing.assert_close(latents, expect)
        # Exact up to float32 rounding: the latents come back to within 2 ulp, the 8-bit images are the same.
        back = again.denormalize(latents)
        assert ((back - z).abs() <= 2 * torch.finfo(torch.float32).eps * z.abs().clamp_min(1)).all()
        with torch.no_grad():
            decoded, want = vae.decode(back).sample, vae.decode(z).sample
        torch.testing.assert_close(decoded, want, rtol=0, atol=1e-5)
        assert torch.equal(((decoded + 1) * 127.5).round(), ((want + 1) * 127.5).round())
    with pytest.raises(ValueError, match="latents_std must be > 0"):
        LatentNormalization("per_channel", latents_mean=[0.0], latents_std=[0.0])


def test_per_channel_dataset_standardises_every_channel_and_the_pipeline_undoes_it(cache, tmp_path):  # noqa: F811
    ds = LatentDataset(cache["latents"], sample_posterior=False, latent_normalization="per_channel")
    x = torch.stack([ds[i]["latents"] for i in range(len(ds))]).double()  # (N, 4, 8, 8)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(4, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(4, dtype=torch.float64), atol=1e-5, rtol=0)
    assert ds.normalization.latents_mean == load_index(cache["latents"])["stats"]["posterior_mean"]["mean"]

    out = tmp_path / "run"
    summary = main(load_config(None, overrides(cache, **{"data.latent_normalization": "per_channel", "train.max_steps": 2,
                                                         "train.use_ema": "false"})), out)
    pipe = load_pipeline(out)
    assert pipe.vae.config.latents_std == load_index(cache["latents"])["stats"]["std"]  # of posterior samples
    assert pipe.vae.config.scaling_factor == 1.0 and pipe.vae.config.shift_factor is None
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    latents = pipe(batch_size=1, num_inference_steps=2, generator=gen(), output_type="latent").images
    images = pipe(batch_size=1, num_inference_steps=2, generator=gen(), output_type="pt").images
    mean, std = (torch.tensor(pipe.vae.config[k]).view(1, -1, 1, 1) for k in ("latents_mean", "latents_std"))
    with torch.no_grad():
        torch.testing.assert_close(images, (pipe.vae.decode(latents * std + mean).sample / 2 + 0.5).clamp(0, 1))
    assert "per channel: `(z - latents_mean) * scaling_factor / latents_std`" in (out / "pipeline" / "README.md").read_text()

    # A resume under another normalisation is refused, as a changed scaling_factor is.
    reset_accelerate_state()
    with pytest.raises(ValueError, match=r"was trained on latents normalised as per_channel normalisation .* but this run "
                                         r"gives global normalisation .*resume with data.latent_normalization=per_channel"):
        main(load_config(None, overrides(cache, **{"train.max_steps": 4, "train.use_ema": "false"})), out, resume="latest")
    assert summary["global_step"] == 2


# ---- training: DiT and SiT through the one loop ---------------------------------------------------


def test_flow_shift_in_training_maps_each_drawn_t_as_the_samplers_do():
    noise = build_noise_scheduler(NoiseConfig(prediction_type="flow", flow_shift=3.0))
    torch.manual_seed(0)
    plain = draw_timesteps(noise, 4096, torch.device("cpu"), NoiseConfig(prediction_type="flow", flow_shift=3.0))
    torch.manual_seed(0)
    shifted = draw_timesteps(noise, 4096, torch.device("cpu"),
                             NoiseConfig(prediction_type="flow", flow_shift=3.0, flow_shift_in_training=True))
    t = plain / 1000
    torch.testing.assert_close(shifted / 1000, 3 * t / (1 + 2 * t))
    assert float((shifted / 1000).median()) > 0.7 > float(t.median())  # logit-normal median 0.5 -> 0.75
    # For logit-normal t the shift is a shift of the logit's mean by log s (LightningDiT's shifted lognorm).
    torch.manual_seed(0)
    moved = draw_timesteps(noise, 4096, torch.device("cpu"), NoiseConfig(prediction_type="flow", logit_mean=float(np.log(3.0))))
    torch.testing.assert_close(moved, shifted, rtol=1e-5, atol=1e-3)


def test_vlb_term_is_zero_for_the_true_posterior_and_matches_the_gaussian_kl():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(1000, generator=g, dtype=torch.float64) for _ in range(4))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref)
    noise = build_noise_scheduler(NoiseConfig())
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 999])
    xt = noise.add_noise(x0, eps, t)
    # The true eps and v = -1 (log variance = the clipped posterior's): the KL vanishes.
    vb = vlb_terms(noise, x0, xt, t, eps, -torch.ones_like(eps))
    assert vb.shape == (3,) and vb.abs().max() < 1e-4
    # v = +1 (variance beta_t) with the true mean: KL = (r - 1 - ln r) / 2 nats, r = posterior variance / beta_t.
    beta = noise.betas[t].double()
    a, a_prev = noise.alphas_cumprod[t].double(), noise.alphas_cumprod[t - 1].double()
    r = (1 - a_prev) / (1 - a)
    want = (r - 1 - r.log()) / 2 / np.log(2)
    got = vlb_terms(noise, x0, xt, t, eps, torch.ones_like(eps))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-9)
    assert got[0] > 1e-3 and beta[0] > 0  # the variance matters most at small t (Nichol & Dhariwal 2021, fig. 2)
    # In the loss, the variance channels get gradient from it and the mean channels only from the MSE.
    model = tiny_dit(None, **{"model.learn_sigma": "true"}).train()
    perturbed(model)
    out = model(xt, t, class_labels=torch.zeros(3, dtype=torch.long)).sample
    assert out.shape == (3, 8, 8, 8)
    mean_out = out[:, :4].detach().requires_grad_()
    var_out = out[:, 4:].detach().requires_grad_()
    vlb_terms(noise, x0, xt, t, mean_out.detach(), var_out).sum().backward()
    assert var_out.grad.abs().sum() > 0


def test_dit_trains_through_the_loop_and_exports_for_plain_dit_pipeline(cache, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    summary = run_dit(cache, out, **{"train.max_steps": 30, "train.validation_steps": 30, "train.checkpointing_steps": 30,
                                     "optim.lr": 3e-3})
    val = {r["step"]: r["val/loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
           if "val/loss" in r}
    assert val[30] < 0.8 * val[0], val
    assert type(summary["denoiser"]).__name__ == "DiTTransformer2DModel"
    index = json.loads((out / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and index["id2label"] == {"0": "class0", "1": "class1", "2": "class2"}
    assert "unet" not in index and index["transformer"] == ["diffusers", "DiTTransformer2DModel"]
    config = json.loads((out / "pipeline" / "transformer" / "config.json").read_text())
    assert config["num_embeds_ada_norm"] == 1000  # DiTPipeline's null class
    pipe = load_pipeline(out)
    assert pipe.num_classes == 3 and pipe.config.class_names == ["class0", "class1", "class2"]
    # pipeline/ holds the EMA weights, its label tables refitted: the classes, then the null row at 1000.
    ema = dict(zip([n for n, _ in summary["denoiser"].named_parameters()], summary["ema"].shadow_params))
    table = pipe.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    key = "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"
    assert torch.equal(table[:3], ema[key][:3]) and torch.equal(table[1000], ema[key][3]) and torch.equal(table[500], ema[key][3])
    card = (out / "pipeline" / "README.md").read_text()
    assert "DiTPipeline.from_pretrained" in card and "label 1000 as the null class" in card


def test_fitting_the_null_class_to_1000_keeps_every_output():
    model = perturbed(tiny_dit(num_classes=3)).eval()
    fitted = fit_null_class(model)
    x, t = torch.randn(4, 4, 8, 8), torch.tensor([1, 200, 600, 999])
    with torch.no_grad():
        assert torch.equal(model(x, t, class_labels=torch.tensor([0, 1, 2, 3])).sample,
                           fitted(x, t, class_labels=torch.tensor([0, 1, 2, 1000])).sample)


# Loads the exported folder with plain diffusers, in a process where importing this project fails.
PLAIN_DIT = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("autoencoderkl", "latent_diffusion", "lat"):
                raise ImportError("this project is not importable here: " + name)
    sys.meta_path.insert(0, Block())
    import torch
    from diffusers import DiffusionPipeline, DiTPipeline
    torch.set_num_threads(int(sys.argv[3]))
    pipe = DiTPipeline.from_pretrained(sys.argv[1])
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    images = pipe(class_labels=[0, 2], guidance_scale=2.0, generator=gens, num_inference_steps=4, output_type="pt").images
    torch.save(images, sys.argv[2])
    print(type(DiffusionPipeline.from_pretrained(sys.argv[1])).__name__, pipe.get_label_ids(["class2"]))
""")


def test_exported_dit_samples_the_same_in_plain_dit_pipeline_without_this_package(cache, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    run_dit(cache, out, **{"train.max_steps": 2})
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_DIT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(script), str(out / "pipeline"), str(tmp_path / "plain.pt"),
                           str(torch.get_num_threads())], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          env={**env, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["DiTPipeline", "[2]"]
    assert "not expected" not in proc.stderr  # no config key DiTPipeline would ignore
    ours = load_pipeline(out / "pipeline")
    want = ours(batch_size=2, num_inference_steps=4, class_labels=[0, 2], guidance_scale=2.0,
                generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="pt").images
    assert torch.equal(torch.load(tmp_path / "plain.pt", weights_only=True), want)


def test_what_dit_pipeline_cannot_express_goes_through_our_pipeline_file():
    dit = perturbed(tiny_dit())
    assert plain_pipeline(pipeline_of(dit)) == ("DiTPipeline", [])
    flow = pipeline_of(dit, prediction_type="flow")
    shifted = pipeline_of(dit, normalization=LatentNormalization("global", 0.7, 0.1))
    per_channel = pipeline_of(dit, normalization=LatentNormalization("per_channel", latents_mean=[0.0] * 4,
                                                                     latents_std=[1.0] * 4))
    unconditional = pipeline_of(perturbed(tiny_dit(None)), class_names=())
    for pipe, why in ((flow, "flow matching"), (shifted, "shift_factor 0.1"), (per_channel, "per_channel latent"),
                      (unconditional, "unconditional")):
        name, reasons = plain_pipeline(pipe)
        assert name is None and any(why in r for r in reasons), reasons
    assert plain_pipeline(pipeline_of(tiny_dit(**{"model.learn_sigma": "true"}), sampler="ddpm"))[0] == "DiTPipeline"


def test_learned_sigma_dit_samples_with_ddpm_and_dpm_refuses_a_learned_variance():
    pipe = pipeline_of(perturbed(tiny_dit(**{"model.learn_sigma": "true"})))
    pipe.scheduler = build_sampler("ddpm", pipe.scheduler.config, learned_variance=True)
    assert pipe.scheduler.config.variance_type == "learned_range"
    images = pipe(batch_size=2, num_inference_steps=3, class_labels=[0, 1], guidance_scale=2.0,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.isfinite(images).all()
    assert plain_pipeline(pipe)[0] is None  # DiTPipeline would give DDPM the mean channels only
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, variance_type="learned_range")
    with pytest.raises(ValueError, match="would use only the first 3 channels"):
        pipe(batch_size=1, num_inference_steps=2)
    assert build_sampler("dpm", {**pipe.scheduler.config}).config.variance_type is None


def test_sit_resumes_bit_exactly_after_a_sigkill_mid_checkpoint(cache, tmp_path):  # noqa: F811
    """SiT = DiT + flow matching: killed while writing step 4's checkpoint, resumed from step 2."""
    args = ["--config", "dit-demo", "--latents", str(cache["latents"]),
            *dit_overrides(cache, **{"noise.prediction_type": "flow", "noise.snr_gamma": "null", "train.max_steps": 4,
                                     "train.validation_steps": 100, "noise.flow_shift": 2.0,
                                     "noise.flow_shift_in_training": "true"})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "REPO": str(REPO)}

    def cli(out, *more, kill=None):
        return subprocess.run([sys.executable, "-c", KILLING_DRIVER, *args, "--output-dir", str(out), *more],
                              env={**env, **({"KILL_AT_CHECKPOINT": str(kill)} if kill else {})},
                              capture_output=True, text=True, timeout=300)

    assert cli(tmp_path / "straight").returncode == 0
    killed = tmp_path / "killed"
    assert cli(killed, kill=4).returncode == -signal.SIGKILL
    proc = cli(killed, "--resume", "latest")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from " + str(killed / "checkpoints" / "step-0000002") in proc.stderr
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "straight" / "checkpoints" / "step-0000004" / name)
        b = load_file(killed / "checkpoints" / "step-0000004" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((killed / "pipeline" / "model_index.json").read_text())["_class_name"] == ["pipeline",
                                                                                                  "LatentDiffusionPipeline"]
    sampled = load_pipeline(killed)(batch_size=2, num_inference_steps=3, class_labels=[0, 1], guidance_scale=2.0,
                                    generator=torch.Generator().manual_seed(0), output_type="np").images
    assert type(load_pipeline(killed).scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert np.isfinite(sampled).all()


# ---- the diffusability probe on the DiT ----------------------------------------------------------


def test_eval_vae_probes_with_the_dit_backbone_end_to_end(probe_data, tmp_path, capsys):  # noqa: F811
    from lat.commands import eval_vae

    root, out = probe_data["root"], tmp_path / "report.json"
    eval_vae.main(["--vae", str(root / "vae0"), "--data", str(root / "photos"), "--resolution", "16", "--diffusability",
                   "--probe-backbone", "dit", "--probe-steps", "4", "--probe-work-dir", str(tmp_path / "work"),
                   "--lpips", "off", "--fid", "off", "--num-workers", "0", "--quiet", "--out", str(out)])
    reset_accelerate_state()
    report = json.loads(out.read_text())
    assert Path(report["probe"]["config_file"]).name == "probe-dit.yaml"
    run = load_config(tmp_path / "work" / "probe-0" / "run" / "config.yaml")
    assert run.model.type == "dit" and run.model.class_conditional is False and run.train.max_steps == 4
    probe = report["vaes"][0]["probe"]
    assert probe["steps"] == [0, 4] and all(np.isfinite(probe["loss"]))
    assert "probe final" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        eval_vae.parse_args(["--vae", "a", "--data", "b", "--diffusability", "--probe-backbone", "dit",
                             "--probe-config", "x.yaml"])


# ---- the benchmark: models side by side ------------------------------------------------------------


def test_benchmark_runs_a_unet_and_a_dit_side_by_side_on_one_cache(cache, tmp_path, capsys):  # noqa: F811
    import yaml

    from lat.benchmark import cli

    def nested(flat: dict) -> dict:
        out: dict = {}
        for key, value in flat.items():
            section, name = key.split(".")
            out.setdefault(section, {})[name] = yaml.safe_load(str(value))
        return out

    (tmp_path / "unet.yaml").write_text(yaml.safe_dump(nested(TINY_UNET)))
    (tmp_path / "dit.yaml").write_text(yaml.safe_dump(nested(TINY_DIT)))
    out = tmp_path / "bench.json"
    cli.main(["--what", "train_ldm", "--config", str(tmp_path / "unet.yaml"), "--compare", str(tmp_path / "dit.yaml"),
              "--latents", str(cache["latents"]), "--vae", str(cache["vae"]), "--steps", "1", "--repeats", "1",
              "--rounds", "1", "--batch-size", "4", "--out", str(out)])
    report = json.loads(out.read_text())
    cases = report["cases"]
    assert set(cases) == {"optimized", "dit (optimized)"} and "cached_vs_encoded" not in report
    assert cases["optimized"]["model"]["class"] == "UNet2DModel"
    assert cases["dit (optimized)"]["model"]["class"] == "DiTTransformer2DModel"
    for case in cases.values():
        assert case["flops_per_item"] > 0 and case["items_per_s"] > 0 and case["peak_memory_mib"] > 0
    assert cases["dit (optimized)"]["flops_per_item"] != cases["optimized"]["flops_per_item"]
    printed = capsys.readouterr().out
    assert "dit (optimized): DiTTransformer2DModel" in printed and "optimized: UNet2DModel" in printed
