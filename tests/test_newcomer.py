"""The first hour of a new user: paths, messages, output folders, progress and help text (issue 22).

Each test guards a stumble found by running every command as a newcomer would; none
touches the network (the Hub calls are replaced, and offline is what a failed DNS lookup
looks like).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from autoencoderkl.hub import is_hub_id
from conftest import tiny_overrides, write_photos

REPO = Path(__file__).resolve().parents[1]


def lat(*args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python -m lat ARGS`` in a fresh process (as a user types it), with this checkout's packages."""
    return subprocess.run([sys.executable, "-m", "lat", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


# --- 1. A local path with a typo never goes to the Hub; offline is found at once ----------

@pytest.fixture
def no_hub(monkeypatch):
    """``AutoModel.from_pretrained`` (what Hub ids load through) that records its calls: the HF cache is empty,
    the network is never used."""
    from diffusers import AutoModel

    calls = []

    def from_pretrained(name, subfolder=None, local_files_only=False, **kwargs):
        calls.append((str(name), subfolder, local_files_only))
        raise OSError(f"{name} is not in the cache" if local_files_only else "network used in a test")

    monkeypatch.setattr(AutoModel, "from_pretrained", from_pretrained)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    return calls


def test_a_missing_folder_under_an_existing_one_is_a_local_path_not_a_hub_id(tmp_path, monkeypatch, no_hub):
    from autoencoderkl.model import load_vae

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "vae-demo").mkdir(parents=True)
    assert not is_hub_id("runs/nosuch") and not is_hub_id("runs/vae-demo")
    assert is_hub_id("stabilityai/sd-vae-ft-mse") and is_hub_id("owner/name/vae")
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"no AutoencoderKL at runs/nosuch \(does not exist\)"):
        load_vae("runs/nosuch")
    assert time.perf_counter() - start < 2 and no_hub == []


def test_a_hub_id_when_the_hub_does_not_resolve_says_offline_at_once_without_a_download(monkeypatch, no_hub):
    from autoencoderkl.model import load_vae

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # what this machine's missing network looks like
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        load_vae("stabilityai/sd-vae-ft-mse")
    assert time.perf_counter() - start < 2
    message = str(err.value)
    assert "this machine is offline (huggingface.co does not resolve (Name or service not known))" in message
    assert "hf download stabilityai/sd-vae-ft-mse --local-dir DIR" in message
    assert all(local for _, _, local in no_hub), "the Hub was asked although it cannot be reached"
    assert [sub for _, sub, _ in no_hub] == [None, "vae"]  # the HF cache was looked at first


# --- 2. An unreadable validation image is skipped and counted; none left is one clear line --

def bad_images(folder: Path) -> tuple[Path, Path]:
    """bad.png (a text file) and truncated.png (its header passes, its pixels do not decode)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bad.png").write_text("not a png")
    [photo] = write_photos(folder / "tmp", n=1, size=(32, 32))
    data = photo.read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    photo.unlink(), photo.parent.rmdir()
    return folder / "bad.png", folder / "truncated.png"


def test_a_validation_image_that_fails_to_decode_is_skipped_and_counted_not_replaced(tmp_path):
    from autoencoderkl.data import ImageFolder, UnreadableImageWarning

    bad, truncated = bad_images(tmp_path / "val")
    good = write_photos(tmp_path / "good", n=2, size=(32, 32))
    with pytest.warns(UnreadableImageWarning) as record:
        val = ImageFolder([good[0], bad, truncated, good[1]], resolution=16, train=False, grid=2)
        crops = val.all_crops()
    assert crops.shape == (2 * 4, 3, 16, 16)  # two readable images x 4 crops; no neighbour counted twice
    assert torch.equal(crops[4:], ImageFolder([good[1]], resolution=16, train=False, grid=2).all_crops())
    assert val.paths == good and val.num_skipped() == 2
    assert {p.name for p in val.skipped_paths()} == {"bad.png", "truncated.png"}
    assert any("truncated.png: OSError" in str(w.message) for w in record)


def test_training_with_no_readable_validation_image_prints_one_line_naming_the_files(photo_dir, tmp_path):
    bad_images(tmp_path / "val")
    proc = lat("train-vae", "--config", "demo", "--output-dir", str(tmp_path / "run"),
               *tiny_overrides(photo_dir, **{"data.val_dir": str(tmp_path / "val")}))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    [error] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith("error: none of the 2 validation images in ") and "bad.png: " in error
    assert "truncated.png: OSError: " in error and "image file is truncated" in error
    assert not (tmp_path / "run").exists()


# --- 3 and 6. The run says where it writes, how to watch it and how to resume; config.yaml's line runs ----

def test_launch_command_is_the_line_a_user_types_with_the_launcher_when_there_is_one(monkeypatch):
    from autoencoderkl.launch import launch_command, resume_command

    for name in ("ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", ["lat train-vae", "--config", "demo", "--resume", "latest", "data.train_dir=my photos"])
    assert launch_command() == "lat train-vae --config demo --resume latest 'data.train_dir=my photos'"
    assert resume_command() == "lat train-vae --config demo 'data.train_dir=my photos'"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # set by every accelerate launch
    assert resume_command() == "accelerate launch -m lat train-vae --config demo 'data.train_dir=my photos'"
    monkeypatch.setattr(sys, "argv", ["scripts/train_vae.py", "--config", "demo"])
    assert launch_command() == "accelerate launch scripts/train_vae.py --config demo"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert launch_command() == "python scripts/train_vae.py --config demo"


def test_a_run_prints_its_folder_curves_and_resume_line_once_and_config_yaml_lines_run_as_printed(
        photo_dir, tmp_path, monkeypatch, capsys):
    import shlex

    from autoencoderkl.config import load_config
    from autoencoderkl.train import main as train_vae

    for name in ("ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "run"
    overrides = tiny_overrides(photo_dir, **{"train.max_steps": 1})
    monkeypatch.setattr(sys, "argv", ["lat train-vae", "--config", "demo", "--output-dir", str(out), *overrides])
    train_vae(load_config(None, overrides), out)
    printed = capsys.readouterr().out
    assert printed.count(f"run folder: {out}/") == 1
    assert f"curves: tensorboard --logdir {out}/logs | lat inspect-vae --run {out} --out {out}/inspect" in printed
    resume = f"lat train-vae --config demo --output-dir {out} {shlex.join(overrides)} --resume latest"
    assert f"resume: {resume}" in printed
    header = (out / "config.yaml").read_text().splitlines()
    launched = header[header.index("# Launched with:") + 1].removeprefix("#   ")
    assert shlex.split(launched)[:4] == ["lat", "train-vae", "--config", "demo"]  # not 'lat train-vae' as one word
    assert header[header.index("# Resume it with:") + 1] == f"#   {resume}"


def test_dry_run_shows_the_output_dir():
    proc = lat("train-vae", "--config", "demo", "--dry-run")
    assert proc.returncode == 0 and proc.stdout.startswith("# output dir: runs/vae-demo\n")
    proc = lat("train-ldm", "--config", "demo", "--latents", "x", "--output-dir", "runs/mine", "--dry-run")
    assert proc.returncode == 0 and proc.stdout.startswith("# output dir: runs/mine\n")


def test_inspect_vae_draws_the_curves_of_a_stage2_run_without_a_vae(tmp_path, capsys):
    from PIL import Image

    from lat.commands.inspect_vae import main as inspect_vae

    run = tmp_path / "ldm-run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(
        f'{{"step": {s}, "time": {s}, "loss": {1 / (s + 1)}, "lr": 0.001, "val/loss": {2 / (s + 1)}}}\n'
        for s in range(0, 50, 10)))
    inspect_vae(["--run", str(run), "--out", str(run / "inspect")])
    assert capsys.readouterr().out == f"wrote {run / 'inspect' / 'curves.png'}\n"
    with Image.open(run / "inspect" / "curves.png") as img:
        assert img.size[0] > 300 and img.size[1] > 200
    with pytest.raises(SystemExit, match="holds no numeric series|no metrics file"):
        inspect_vae(["--run", str(tmp_path), "--out", str(tmp_path / "x")])


# --- 4. encode-latents --data hf:... logs its plan without a logging traceback -------------

def test_encoding_a_stream_logs_its_shards_without_a_logging_error(tmp_path, caplog):
    import logging

    from autoencoderkl.shards import make_shards
    from latent_diffusion.encode import encode_latents
    from test_latents import tiny_vae

    tiny_vae().save_pretrained(tmp_path / "vae")
    write_photos(tmp_path / "photos", n=3)
    make_shards(tmp_path / "photos", tmp_path / "shards", shard_size=2)
    # pytest's log handler raises where logging would print "--- Logging error ---" and a traceback.
    with caplog.at_level(logging.INFO, logger="latent_diffusion.encode"):
        encode_latents(tmp_path / "vae", "hf:webdataset", tmp_path / "latents", resolution=16, num_workers=0,
                       data_files=[str(tmp_path / "shards" / "train-*.tar")])
    assert "latents: 2 input shards, one cache shard each; 0 finished" in caplog.text


# --- 5. Output folders: earlier samples, another command's files, no empty folder after a failure ----

def test_sample_refuses_earlier_samples_of_other_settings_unless_overwrite(tmp_path):
    from latent_diffusion.sample import sample
    from test_ldm import tiny_pipeline

    pipe, out = tiny_pipeline(), tmp_path / "samples"
    kw = dict(steps=2, progress=False)
    sample(pipe, out, num_images=3, **kw)
    with pytest.raises(FileExistsError, match=r"already holds 3 images of an earlier run \(3 images, seed 0, 2 steps\); "
                                              r"pass --overwrite"):
        sample(pipe, out, num_images=1, **kw)
    assert len(list(out.glob("*.png"))) == 4  # untouched: 3 samples and the grid
    sample(pipe, out, num_images=3, **kw)  # the same command again: allowed, the same files
    result = sample(pipe, out, num_images=1, overwrite=True, **kw)
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "grid.png", "sampling.json"]
    assert result["settings"]["num_images"] == 1
    (out / "checkpoints").mkdir()
    with pytest.raises(FileExistsError, match=r"holds files that lat sample-ldm does not write \(checkpoints\)"):
        sample(pipe, out, num_images=1, overwrite=True, **kw)  # --overwrite never removes other files
    assert (out / "000000.png").is_file()


def test_encode_latents_refuses_a_folder_of_other_files_before_any_work_and_overwrite_replaces_a_cache(
        tmp_path, monkeypatch, capsys):
    from latent_diffusion import encode
    from latent_diffusion.latents import load_index
    from lat.commands.encode_latents import main as encode_command
    from test_latents import tiny_vae

    tiny_vae().save_pretrained(tmp_path / "vae")
    write_photos(tmp_path / "photos", n=3)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("train: {}\n")
    load_vae = encode.load_vae
    monkeypatch.setattr(encode, "load_vae", lambda *a, **k: pytest.fail("the VAE was loaded before the folder check"))
    with pytest.raises(SystemExit) as exit_:
        encode_command(["--vae", str(tmp_path / "vae"), "--data", str(tmp_path / "photos"), "--out", str(run),
                        "--resolution", "16", "--num-workers", "0"])
    assert str(exit_.value) == (f"error: --out {run} is not empty and holds files that are not a latent cache's "
                                "(checkpoints, config.yaml); choose another --out (--overwrite removes only a cache's "
                                "own files)")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]
    monkeypatch.setattr(encode, "load_vae", load_vae)
    common = dict(num_workers=0, batch_size=4)
    encode.encode_latents(tmp_path / "vae", tmp_path / "photos", tmp_path / "latents", resolution=16, **common)
    with pytest.raises(ValueError, match="other settings .* pass --overwrite to encode it afresh"):
        encode.encode_latents(tmp_path / "vae", tmp_path / "photos", tmp_path / "latents", resolution=8, **common)
    encode.encode_latents(tmp_path / "vae", tmp_path / "photos", tmp_path / "latents", resolution=8, overwrite=True,
                          **common)
    assert load_index(tmp_path / "latents")["resolution"] == 8


def test_a_failed_command_leaves_no_empty_folder(tmp_path):
    from test_latents import tiny_vae

    tiny_vae().save_pretrained(tmp_path / "vae")
    write_photos(tmp_path / "one", n=1)
    inspect = lat("inspect-vae", "--vae", "vae", "--images", "nosuch.png", "--out", "pictures/a", cwd=tmp_path)
    probe = lat("eval-vae", "--vae", "vae", "--data", "one", "--resolution", "16", "--diffusability",
                "--out", "reports/report.json", cwd=tmp_path)
    assert inspect.stderr.splitlines()[-1] == "error: image nosuch.png does not exist"
    assert probe.returncode == 1 and probe.stderr.splitlines()[-1].startswith(
        "error: one: all 1 images come from one source photo; the probe needs at least two")
    assert not (tmp_path / "pictures").exists() and not (tmp_path / "reports").exists()


# --- 7. Errors that stay on screen: the hint last, one line; a bad --device is one line too ---

def test_a_config_typo_is_one_line_ending_with_the_hint_and_a_bad_type_lists_no_keys():
    typo = lat("train-vae", "--config", "demo", "train.max_step=3", "--dry-run")
    assert typo.returncode == 2 and typo.stderr.splitlines() == [
        "error: unknown config key 'train.max_step' (command line); did you mean train.max_steps or train.log_steps?"]
    bad = lat("train-ldm", "--config", "demo", "--latents", "x", "train.max_steps=many", "--dry-run")
    assert bad.returncode == 2 and bad.stderr.splitlines() == [
        "error: bad value for config key 'train.max_steps' (command line): Value 'many' of type 'str' could not be "
        "converted to Integer"]


@pytest.mark.parametrize("device, message", [
    ("gpu", "error: --device gpu: not a device name; use cpu, cuda, cuda:N or mps"),
    ("cuda", "error: --device cuda: no CUDA device on this machine (torch.cuda.is_available() is False); "
             "use --device cpu"),
])
def test_a_device_this_machine_lacks_is_one_line_before_any_work(device, message, tmp_path):
    from lat.commands.eval_vae import main as eval_vae
    from lat.commands.sample_ldm import main as sample_ldm

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    for main, args in ((sample_ldm, ["--model", "nosuch", "--num-images", "1", "--out", str(tmp_path / "s")]),
                       (eval_vae, ["--vae", "nosuch", "--data", "nosuch"])):
        with pytest.raises(SystemExit) as exit_:
            main([*args, "--device", device])
        assert str(exit_.value) == message


# --- 8. Every --help names the command as typed and only things that exist ---------------

def test_every_help_names_its_lat_command_and_only_functions_that_exist(monkeypatch, capsys):
    import importlib
    import re

    from lat.cli import COMMANDS, main

    monkeypatch.setattr(sys, "argv", list(sys.argv))  # lat.cli.main sets sys.argv[0] to the subcommand
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("lat: one command for the whole toolkit")
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        text = capsys.readouterr().out
        assert exit_.value.code == 0 and text.startswith(f"usage: lat {name} "), name
        # Script names only as the checkout's scripts/x.py, never as what to type.
        assert "python scripts/" not in text, name
        assert [m.group(0) for m in re.finditer(r"(?<![\w/])\w+\.py\b", text)] == [], name
        assert "see above" not in text, name  # --help shows each key's comment alone
        for dotted in set(re.findall(r"\b(?:autoencoderkl|latent_diffusion|lat)(?:\.\w+)+", text)):
            module, attr = dotted.rsplit(".", 1)
            try:
                importlib.import_module(dotted)
            except ImportError:
                assert hasattr(importlib.import_module(module), attr), f"lat {name} --help names {dotted}"


# --- 10. make-shards checks each image as it packs it, with a progress bar -----------------

@pytest.mark.parametrize("image_format", ["keep", "png"])
def test_make_shards_skips_and_counts_unreadable_images_with_a_progress_bar(image_format, tmp_path, monkeypatch):
    import tarfile

    import autoencoderkl.shards as shards
    from autoencoderkl.data import UnreadableImageWarning

    write_photos(tmp_path / "photos", n=4)
    bad_images(tmp_path / "photos")  # bad.png (text) and truncated.png sort first
    bars = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def set_postfix(self, refresh=True, **kwargs):
            self.postfix = kwargs

        def close(self):
            pass

    monkeypatch.setattr(shards, "tqdm", Bar)
    with pytest.warns(UnreadableImageWarning) as record:
        index = shards.make_shards(tmp_path / "photos", tmp_path / "shards", shard_size=3, val_fraction=0.2,
                                   image_format=image_format)
    assert [(b.total, b.n, b.postfix) for b in bars] == [(6, 6, {"skipped": 2})]
    assert index["num_skipped"] == 2 and [p for p, _ in index["skipped"]] == ["truncated.png", "bad.png"]
    assert any("truncated.png: OSError" in str(w.message) for w in record)
    # Sorted: bad.png, photo_00..03, truncated.png; bad.png is the one held out (evenly spaced), so
    # validation has no readable image: no split, no empty tar. Train keeps the 4 photos: shards of 3 and 1.
    assert list(index["splits"]) == ["train"] and index["num_samples"] == 4
    assert [s["num_samples"] for s in index["splits"]["train"]["shards"]] == [3, 1]
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    with tarfile.open(tmp_path / "shards" / "train-000001.tar") as tar:
        assert tar.extractfile("00000004.path.txt").read() == b"photo_03.png"


# --- 11. sample-ldm's bar moves with every denoising step ---------------------------------

def test_sample_progress_counts_denoising_steps_of_every_batch(tmp_path, monkeypatch):
    import latent_diffusion.sample as sampling
    from diffusers import DiffusionPipeline
    from test_ldm import tiny_pipeline

    bars = []

    class Bar:
        def __init__(self, total, unit, **kwargs):
            self.total, self.unit, self.updates, self.postfix = total, unit, [], []
            bars.append(self)

        def update(self, n):
            self.updates.append(n)

        def set_postfix(self, **kwargs):
            self.postfix.append(kwargs["images"])

        def close(self):
            pass

    monkeypatch.setattr(sampling, "tqdm", Bar)
    pipe = tiny_pipeline()
    sampling.sample(pipe, tmp_path / "s", num_images=3, batch_size=2, steps=4, scheduler="ddim")
    [bar] = bars
    assert (bar.total, bar.unit, bar.updates) == (2 * 4, "step", [1] * 8)  # 2 batches x 4 U-Net steps, one tick each
    assert bar.postfix == ["2/3", "3/3"]
    assert type(pipe).progress_bar is DiffusionPipeline.progress_bar and "progress_bar" not in vars(pipe)


# --- 12. scripts/gpu_check.sh: --help, and the project's interpreter rather than any python --

def test_gpu_check_help_and_it_finds_the_projects_python_not_the_first_on_path(tmp_path):
    import shutil

    script = REPO / "scripts" / "gpu_check.sh"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    help_ = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=60,
                           env={**env, "OUT": str(tmp_path / "out")})
    assert help_.returncode == 0 and "bash scripts/gpu_check.sh --cpu-smoke DIR" in help_.stdout
    assert "The Python it runs: $PYTHON if set" in help_.stdout and not (tmp_path / "out").exists()

    bin_dir = Path(sys.executable).parent
    lat_command = shutil.which("lat", path=str(bin_dir))
    if lat_command is None or torch.cuda.is_available():
        pytest.skip("needs the lat command beside this interpreter, and a machine without CUDA")
    interpreter = Path(lat_command).read_text().splitlines()[0].removeprefix("#!").split()[0]
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "python").write_text("#!/bin/sh\necho 'a python without torch' >&2\nexit 1\n")
    (stub / "python").chmod(0o755)
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120,
                          env={**env, "OUT": str(tmp_path / "out"), "PATH": f"{stub}:{bin_dir}:/usr/bin:/bin"})
    assert proc.returncode == 2
    assert proc.stdout.strip() == f"gpu_check: python {interpreter} (from the #! line of {lat_command})"
    assert proc.stderr.strip().startswith(f"gpu_check: no CUDA device: {interpreter}: torch ")
    assert "sees no CUDA device" in proc.stderr and not (tmp_path / "out").exists()
