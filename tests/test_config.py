"""Config errors must read well and arrive before any work."""

import subprocess
import sys
from pathlib import Path

import pytest

from autoencoderkl.config import VAEConfig, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_yaml_and_overrides_merge_in_order(tmp_path):
    yaml = tmp_path / "run.yaml"
    yaml.write_text("data:\n  source: demo\n  resolution: 64\ntrain:\n  max_steps: 10\n")
    cfg = load_config(yaml, ["train.max_steps=20", "optim.betas=[0.9,0.99]"])
    assert isinstance(cfg, VAEConfig)
    assert cfg.data.resolution == 64  # from YAML
    assert cfg.train.max_steps == 20  # override beats YAML
    assert cfg.optim.betas == [0.9, 0.99]
    assert cfg.loss.kl_weight == 1e-6  # default


def test_unknown_key_lists_valid_keys_and_suggests_the_close_one():
    with pytest.raises(ValueError) as err:
        load_config(None, ["data.source=demo", "train.max_step=3"])
    msg = str(err.value)
    assert "unknown config key 'train.max_step'" in msg
    assert "did you mean train.max_steps" in msg
    assert msg.endswith("did you mean train.max_steps or train.log_steps?")  # the hint last: no list of keys after it


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    yaml = tmp_path / "typo.yaml"
    yaml.write_text("loss:\n  kl_wieght: 1.0e-6\n")
    with pytest.raises(ValueError, match=r"unknown config key 'loss.kl_wieght' \(.*typo.yaml\)"):
        load_config(yaml)


def test_wrong_type_names_key_and_value():
    with pytest.raises(ValueError, match=r"bad value for config key 'train.max_steps'.*'many'"):
        load_config(None, ["data.source=demo", "train.max_steps=many"])


def test_value_outside_choices_lists_the_choices():
    with pytest.raises(ValueError, match=r"train.mixed_precision' must be one of \['no', 'fp16', 'bf16'\]"):
        load_config(None, ["data.source=demo", "train.mixed_precision=fp8"])


def test_cross_field_checks():
    with pytest.raises(ValueError, match="multiple of 8"):
        load_config(None, ["data.source=demo", "data.resolution=60"])
    with pytest.raises(ValueError, match="needs data.train_dir"):
        load_config(None, [])
    with pytest.raises(FileNotFoundError, match="no_such.yaml"):
        load_config("no_such.yaml")


def test_yaml_true_is_accepted_for_a_string_choice(tmp_path):
    yaml = tmp_path / "p.yaml"
    yaml.write_text("loss:\n  perceptual_pretrained: true\ndata:\n  source: demo\n")
    assert load_config(yaml).loss.perceptual_pretrained == "true"


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["data.source=demo", "loss.disc_start=7", "model.block_out_channels=[8,16]"])
    save_config(cfg, tmp_path / "config.yaml", notes=["perceptual: test"])
    text = (tmp_path / "config.yaml").read_text()
    assert text.startswith("# Resolved config") and "# perceptual: test" in text
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


@pytest.mark.parametrize("name", ["demo", "kl-f8", "kl-f8-c16", "eq-finetune", "cpu-reference"])
def test_shipped_configs_load(name):
    overrides = ["data.train_dir=/data"] if name != "demo" else []
    if name == "eq-finetune":  # model.pretrained is '???': required
        with pytest.raises(ValueError, match=r"\['model.pretrained'\] must be set"):
            load_config(REPO / "configs" / "autoencoderkl" / f"{name}.yaml", overrides)
        overrides.append("model.pretrained=sd-vae.safetensors")
    if name == "cpu-reference":  # the photos are the user's to give
        with pytest.raises(ValueError, match=r"\['data.train_dir'\] must be set"):
            load_config(REPO / "configs" / "autoencoderkl" / f"{name}.yaml", [])
    cfg = load_config(REPO / "configs" / "autoencoderkl" / f"{name}.yaml", overrides)
    if name == "eq-finetune":
        assert cfg.loss.equivariance == "eqvae" and cfg.optim.lr == pytest.approx(4.5e-6 * cfg.data.batch_size)
    if name == "kl-f8-c16":  # SD3 / FLUX.1's latent shape
        assert (cfg.model.latent_channels, cfg.model.use_quant_conv, cfg.model.measure_shift_factor) == (16, False, True)
    if name == "kl-f8":  # SD 1.x's autoencoder and LDM's loss, exactly
        assert cfg.model.block_out_channels == [128, 256, 512, 512]
        assert (cfg.model.layers_per_block, cfg.model.latent_channels, cfg.model.norm_num_groups) == (2, 4, 32)
        assert (cfg.loss.kl_weight, cfg.loss.disc_start, cfg.loss.disc_weight) == (1e-6, 50001, 0.5)
        assert cfg.optim.betas == [0.5, 0.9] and cfg.data.resolution == 256
        assert cfg.optim.lr == pytest.approx(4.5e-6 * cfg.data.batch_size)


def test_cli_reports_a_typo_before_any_work():
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_vae.py"), "--config",
         str(REPO / "configs" / "autoencoderkl" / "demo.yaml"), "optim.lrr=1e-4"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert "unknown config key 'optim.lrr'" in proc.stderr and "did you mean optim.lr" in proc.stderr


def test_cli_dry_run_takes_overrides_before_and_after_flags():
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_vae.py"), "train.max_steps=3", "--config",
         str(REPO / "configs" / "autoencoderkl" / "demo.yaml"), "--dry-run", "data.batch_size=5"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "max_steps: 3" in proc.stdout and "batch_size: 5" in proc.stdout


def test_unquoted_no_on_the_command_line_is_the_mixed_precision_choice():
    """YAML 1.1 reads `no` as False; `train.mixed_precision=no` must still mean "no"."""
    cfg = load_config(None, ["train.mixed_precision=no", "data.source=demo"])
    assert cfg.train.mixed_precision == "no"
