"""Injected faults in stage-2 training: SIGTERM, SIGKILL mid-checkpoint, NaN losses."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import latent_diffusion.train as ldm_train
from autoencoderkl.faults import TrainingStopped
from conftest import reset_accelerate_state, torchrun, write_photos
from latent_diffusion.config import load_config
from latent_diffusion.encode import encode_latents
from test_ldm import overrides, tiny_vae

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> dict:
    """An unlabelled cache of 6 tiny photos at 16 px (a tiny VAE, f = 2)."""
    root = tmp_path_factory.mktemp("faults-ldm")
    write_photos(root / "photos", n=6)
    tiny_vae().save_pretrained(root / "vae")
    encode_latents(root / "vae", root / "photos", root / "latents", resolution=16, batch_size=4, num_workers=0)
    reset_accelerate_state()
    return {"latents": root / "latents", "vae": root / "vae"}


def run(cache, out, resume=None, **extra):
    return ldm_train.main(load_config(None, overrides(cache, **extra)), out, resume=resume)


def unet_weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step-{step:07d}" / "model.safetensors")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def inject_into_loss(monkeypatch, fault):
    """Wrap diffusion_loss; ``fault(i, loss)`` returns the loss training step i + 1 uses.

    Calls from validation (U-Net in eval mode) pass through untouched and uncounted.
    """
    original, calls = ldm_train.diffusion_loss, []

    def patched(unet, *args, **kwargs):
        loss = original(unet, *args, **kwargs)
        if not unet.training:
            return loss
        calls.append(None)
        return fault(len(calls) - 1, loss)

    monkeypatch.setattr(ldm_train, "diffusion_loss", patched)


def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run(cache, tmp_path, monkeypatch):
    extra = {"train.max_steps": 5, "train.checkpointing_steps": 100, "train.validation_steps": 100}
    straight = tmp_path / "straight"
    run(cache, straight, **extra)
    reset_accelerate_state()

    def sigterm_in_step_3(i, loss):
        if i == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    inject_into_loss(monkeypatch, sigterm_in_step_3)
    stopped = tmp_path / "stopped"
    with pytest.raises(TrainingStopped, match=r"stopped by SIGTERM at step 3; .*--resume latest") as info:
        run(cache, stopped, **extra)
    assert info.value.exit_code == 143
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == ["step-0000003"]
    monkeypatch.undo()
    reset_accelerate_state()
    assert run(cache, stopped, resume="latest", **extra)["global_step"] == 5
    assert same(unet_weights(straight, 5), unet_weights(stopped, 5))


def test_nan_once_is_skipped_and_nan_always_stops(cache, tmp_path, monkeypatch):
    inject_into_loss(monkeypatch, lambda i, loss: loss * math.nan if i == 1 else loss)
    out = tmp_path / "once"
    run(cache, out, **{"train.checkpointing_steps": 1, "train.checkpoints_total_limit": "null"})
    assert same(unet_weights(out, 1), unet_weights(out, 2))  # step 2 changed nothing
    assert not same(unet_weights(out, 2), unet_weights(out, 3))
    assert all(torch.isfinite(t).all() for t in unet_weights(out, 4).values())
    assert '"nonfinite_skips": 1' in (out / "metrics.jsonl").read_text()

    monkeypatch.undo()
    reset_accelerate_state()
    inject_into_loss(monkeypatch, lambda i, loss: loss * math.nan)
    with pytest.raises(TrainingStopped, match=r"2 consecutive optimizer steps had NaN/inf gradients \(up to step \d+, the last in the UNet2DModel"):
        run(cache, tmp_path / "always", **{"train.max_consecutive_nonfinite": 2})


def test_rollback_after_nans_in_a_row_finishes_the_run_with_the_counts(cache, tmp_path, monkeypatch):
    inject_into_loss(monkeypatch, lambda i, loss: loss * math.nan if i in (3, 4) else loss)  # steps 4 and 5
    out = tmp_path / "run"
    summary = run(cache, out, **{"train.max_steps": 6, "train.nonfinite_action": "rollback",
                                 "train.max_consecutive_nonfinite": 2, "train.checkpointing_steps": 2,
                                 "optim.lr_scheduler": "constant", "train.validation_steps": 100})
    assert summary["global_step"] == 6 and summary["nonfinite_skips"] == 2
    assert summary["rollbacks"] == [{"from_step": 5, "to_step": 4, "lr_scale": 0.5}]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r.get("event") == "rollback"] == [4]
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert lrs[6] == pytest.approx(0.5 * lrs[3])
    assert all(torch.isfinite(t).all() for t in unet_weights(out, 6).values())


# Runs scripts/train_ldm.py, SIGKILLing itself while writing the step-KILL_AT_CHECKPOINT
# checkpoint (model weights on disk; optimizer state and state.json not yet).
KILLING_DRIVER = """
import os, runpy, signal, sys
from accelerate import Accelerator
kill_at = os.environ.get("KILL_AT_CHECKPOINT")
save_state = Accelerator.save_state
def dying_save_state(self, output_dir=None, **kwargs):
    if kill_at and output_dir.endswith(f"step-{int(kill_at):07d}"):
        self.save_model(self._models[0], output_dir)
        os.kill(os.getpid(), signal.SIGKILL)
    return save_state(self, output_dir, **kwargs)
Accelerator.save_state = dying_save_state
sys.argv = ["train_ldm.py"] + sys.argv[1:]
runpy.run_path(os.path.join(os.environ["REPO"], "scripts", "train_ldm.py"), run_name="__main__")
"""


def test_sigkill_while_writing_a_checkpoint_then_resume_matches(cache, tmp_path):
    args = ["--config", str(REPO / "configs" / "latent_diffusion" / "demo.yaml"), "--latents", str(cache["latents"]),
            *overrides(cache, **{"train.max_steps": 4, "train.validation_steps": 100})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "REPO": str(REPO)}

    def cli(out, *more, kill=None):
        return subprocess.run([sys.executable, "-c", KILLING_DRIVER, *args, "--output-dir", str(out), *more],
                              env={**env, **({"KILL_AT_CHECKPOINT": str(kill)} if kill else {})},
                              capture_output=True, text=True, timeout=300)

    assert cli(tmp_path / "straight").returncode == 0
    killed = tmp_path / "killed"
    proc = cli(killed, kill=4)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == [".tmp-step-0000004", "step-0000002"]
    proc = cli(killed, "--resume", "latest")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from " + str(killed / "checkpoints" / "step-0000002") in proc.stderr
    assert same(unet_weights(tmp_path / "straight", 4), unet_weights(killed, 4))


# Runs scripts/encode_latents.py, SIGKILLing itself half-way through writing the file of
# shard KILL_AT_SHARD (the bytes so far land under the temporary name, as a real kill leaves).
ENCODE_DRIVER = """
import os, runpy, signal, sys
import latent_diffusion.encode as encode
kill_at = int(os.environ.get("KILL_AT_SHARD", "-1"))
save_file = encode.save_file
def dying_save_file(tensors, path, metadata=None):
    if f"shard-{kill_at:05d}" in path:
        save_file(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    return save_file(tensors, path, metadata=metadata)
encode.save_file = dying_save_file
sys.argv = ["encode_latents.py"] + sys.argv[1:]
runpy.run_path(os.path.join(os.environ["REPO"], "scripts", "encode_latents.py"), run_name="__main__")
"""


def test_sigkill_while_writing_a_shard_then_rerun_gives_the_same_cache(cache, tmp_path):
    photos = Path(cache["vae"]).parent / "photos"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "REPO": str(REPO)}

    def cli(out, kill=None):
        args = ["--vae", str(cache["vae"]), "--data", str(photos), "--out", str(out), "--resolution", "16",
                "--batch-size", "2", "--shard-size", "2", "--num-workers", "0"]
        return subprocess.run([sys.executable, "-c", ENCODE_DRIVER, *args], capture_output=True, text=True,
                              timeout=300, env={**env, **({"KILL_AT_SHARD": str(kill)} if kill is not None else {})})

    assert cli(tmp_path / "straight").returncode == 0
    out = tmp_path / "killed"
    proc = cli(out, kill=1)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    names = sorted(p.name for p in out.glob("*shard-*"))
    assert len(names) == 2 and names[1] == "shard-00000.safetensors", names
    assert re.fullmatch(r"\.shard-00001\.safetensors\.tmp-\d+\.safetensors", names[0]), names  # atomic_path's name
    first = (out / "shard-00000.safetensors").stat().st_mtime_ns
    proc = cli(out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == first, "a finished shard was re-encoded"
    assert not list(out.glob(".*.tmp*"))
    for name in ("shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"):
        want, got = load_file(tmp_path / "straight" / name), load_file(out / name)
        assert same(want, got), name


# --- Two processes (torchrun + gloo): identical weights on both ranks, exact resume ---

LDM_DDP_DRIVER = """
import os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from safetensors.torch import save_file
from latent_diffusion.config import load_config
from latent_diffusion.train import main
from test_ldm import overrides

out, latents, vae = Path(sys.argv[2]), sys.argv[3], sys.argv[4]
resume = sys.argv[5] if len(sys.argv) > 5 else None
cfg = load_config(None, overrides({"latents": latents, "vae": vae},
                                  **{"train.max_steps": 4, "train.validation_steps": 100, "train.checkpointing_steps": 2}))
summary = main(cfg, out, resume=resume)
rank = int(os.environ["RANK"])  # end_training() has closed the process group
save_file({k: v.detach().contiguous() for k, v in summary["unet"].state_dict().items()}, str(out / f"rank{rank}.safetensors"))
"""


def test_two_processes_agree_and_resume_exactly(cache, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(LDM_DDP_DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def launch(out, *resume):
        proc = subprocess.run(
            [*torchrun(2),
             str(driver), str(Path(__file__).parent), str(out), str(cache["latents"]), str(cache["vae"]), *resume],
            capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "over 2 process(es)" in proc.stderr, "the ranks did not form one process group"
        r0, r1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
        assert same(r0, r1), "the ranks' U-Nets differ"
        return r0

    straight = launch(tmp_path / "straight")
    resumed = launch(tmp_path / "resumed", str(tmp_path / "straight" / "checkpoints" / "step-0000002"))
    assert same(straight, resumed), "a 2-process resume from step 2 ended elsewhere than the straight run"
