"""Injected faults in stage-1 training: a SIGTERM mid-run, NaN losses once and for good."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from autoencoderkl.config import load_config
from autoencoderkl.losses import AutoencoderLoss
from autoencoderkl.run import TrainingStopped
from autoencoderkl.train import main
from conftest import tiny_overrides


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield


def run(photo_dir: Path, out: Path, resume=None, **overrides):
    cfg = load_config(None, tiny_overrides(photo_dir, **overrides))
    return main(cfg, out, resume=resume)


def inject_into_generator_loss(monkeypatch, fault):
    """Wrap AutoencoderLoss.generator_loss; ``fault(global_step, loss)`` returns the loss to use."""
    original = AutoencoderLoss.generator_loss

    def patched(self, inputs, reconstructions, posterior, global_step, *args, **kwargs):
        loss, logs = original(self, inputs, reconstructions, posterior, global_step, *args, **kwargs)
        return fault(global_step, loss), logs

    monkeypatch.setattr(AutoencoderLoss, "generator_loss", patched)


def weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step-{step:07d}" / "model.safetensors")


def test_sigterm_writes_a_checkpoint_then_stops_and_resume_matches_an_uninterrupted_run(photo_dir, tmp_path, monkeypatch):
    extra = {"train.max_steps": 5, "train.checkpointing_steps": 100}  # no scheduled checkpoint before the end
    straight = tmp_path / "straight"
    run(photo_dir, straight, **extra)

    def sigterm_during_step_3(global_step, loss):
        if global_step == 2:  # the third optimizer step is in flight
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    inject_into_generator_loss(monkeypatch, sigterm_during_step_3)
    stopped = tmp_path / "stopped"
    with pytest.raises(TrainingStopped, match=r"stopped by SIGTERM at step 3; checkpoint saved to .*step-0000003.*--resume latest") as info:
        run(photo_dir, stopped, **extra)
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == ["step-0000003"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed again

    monkeypatch.undo()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    summary = run(photo_dir, stopped, resume="latest", **extra)
    assert summary["global_step"] == 5
    want, got = weights(straight, 5), weights(stopped, 5)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), "resumed weights differ from the uninterrupted run"


def test_one_nan_loss_skips_one_step_and_is_counted(photo_dir, tmp_path, monkeypatch):
    inject_into_generator_loss(monkeypatch, lambda step, loss: loss * math.nan if step == 1 else loss)
    out = tmp_path / "run"
    summary = run(photo_dir, out, **{"train.checkpointing_steps": 1, "train.checkpoints_total_limit": "null"})
    assert summary["global_step"] == 4

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skips = {r["step"]: r["nonfinite_skips"] for r in records if "nonfinite_skips" in r}
    assert skips == {1: 0, 2: 1, 3: 1, 4: 1}
    # Step 2 changed nothing in the autoencoder; the other steps did; no NaN reached the weights.
    before, skipped, after = weights(out, 1), weights(out, 2), weights(out, 3)
    assert all(torch.equal(before[k], skipped[k]) for k in before)
    assert any(not torch.equal(skipped[k], after[k]) for k in before)
    assert all(torch.isfinite(t).all() for t in weights(out, 4).values())


def test_nan_loss_every_step_stops_the_run_with_a_clear_message(photo_dir, tmp_path, monkeypatch):
    inject_into_generator_loss(monkeypatch, lambda step, loss: loss * math.nan if step >= 1 else loss)
    with pytest.raises(TrainingStopped, match=r"3 consecutive optimizer steps of the autoencoder had NaN/inf gradients \(up to step 4\)"):
        run(photo_dir, tmp_path / "run", **{"train.max_consecutive_nonfinite": 3})
