"""Injected faults in stage-1 training: a SIGTERM mid-run, NaN losses once and for good."""

from __future__ import annotations

import ast
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from autoencoderkl.config import load_config
from autoencoderkl.losses import AutoencoderLoss
from autoencoderkl.faults import TrainingStopped
from autoencoderkl.train import main
from conftest import reset_accelerate_state, tiny_overrides


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
    reset_accelerate_state()
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
    with pytest.raises(TrainingStopped, match=r"3 consecutive optimizer steps had NaN/inf gradients \(up to step 4, the last in the autoencoder \(nan\)\)"):
        run(photo_dir, tmp_path / "run", **{"train.max_consecutive_nonfinite": 3})


def transient_nans(bad_calls: set[int]):
    """A generator-loss fault: NaN on the given calls (1-based), whatever the step."""
    calls = []

    def fault(global_step, loss):
        calls.append(global_step)
        return loss * math.nan if len(calls) in bad_calls else loss

    return fault


ROLLBACK = {"train.max_steps": 6, "train.nonfinite_action": "rollback", "train.max_consecutive_nonfinite": 2,
            "train.checkpointing_steps": 2, "train.checkpoints_total_limit": "null"}


def test_rollback_after_nans_in_a_row_reloads_lowers_the_lr_skips_the_batches_and_finishes(photo_dir, tmp_path, monkeypatch):
    inject_into_generator_loss(monkeypatch, transient_nans({4, 5}))  # steps 4 and 5 go NaN
    out = tmp_path / "run"
    summary = run(photo_dir, out, **ROLLBACK)
    assert summary["global_step"] == 6
    assert summary["rollbacks"] == [{"from_step": 5, "to_step": 4, "lr_scale": 0.5}]
    assert summary["nonfinite_skips"] == 2

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]  # each step once
    [event] = [r for r in records if r.get("event") == "rollback"]
    assert event["step"] == 4 and event["skipped_samples_per_process"] == 2  # step 5's batch is not drawn again
    last = next(r for r in records if r["step"] == 6 and "loss" in r)
    assert last["lr"] == pytest.approx(0.5 * 1e-3) and last["rollbacks"] == 1
    state = json.loads((out / "checkpoints" / "step-0000006" / "state.json").read_text())
    assert state["lr_scale"] == 0.5 and state["data_offset"] == 2 and len(state["rollbacks"]) == 1
    assert all(torch.isfinite(t).all() for t in weights(out, 6).values())


def test_a_run_resumed_after_a_rollback_matches_one_that_was_not_interrupted(photo_dir, tmp_path, monkeypatch):
    """The lowered learning rate and the skipped batches survive a checkpoint and resume."""
    inject_into_generator_loss(monkeypatch, transient_nans({4, 5}))
    straight = tmp_path / "straight"
    run(photo_dir, straight, **ROLLBACK)
    reset_accelerate_state()

    nans, calls = transient_nans({4, 5}), []

    def nans_then_sigterm(global_step, loss):
        calls.append(global_step)
        if len(calls) == 6:  # step 5 again, after the rollback
            os.kill(os.getpid(), signal.SIGTERM)
        return nans(global_step, loss)

    inject_into_generator_loss(monkeypatch, nans_then_sigterm)
    stopped = tmp_path / "stopped"
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM at step 5"):
        run(photo_dir, stopped, **ROLLBACK)
    monkeypatch.undo()
    reset_accelerate_state()
    assert run(photo_dir, stopped, resume="latest", **ROLLBACK)["global_step"] == 6
    want, got = weights(straight, 6), weights(stopped, 6)
    assert all(torch.equal(want[k], got[k]) for k in want), "the resumed run forgot the rollback's LR or data offset"


def test_rollback_gives_up_after_max_rollbacks(photo_dir, tmp_path, monkeypatch):
    inject_into_generator_loss(monkeypatch, lambda step, loss: loss * math.nan if step >= 2 else loss)
    with pytest.raises(TrainingStopped, match=r"after 1 rollback\(s\) \(train.max_rollbacks=1\)"):
        run(photo_dir, tmp_path / "run", **{**ROLLBACK, "train.max_rollbacks": 1})


# --- SIGKILL: a process that dies without warning loses at most the steps since its
# --- last complete checkpoint, and never resumes from a half-written one.

REPO = Path(__file__).resolve().parents[1]

# Runs scripts/train_vae.py after patching it to SIGKILL itself at a chosen point:
# KILL_AT_CHECKPOINT=N while writing the step-N checkpoint (model weights on disk,
# optimizer state and state.json not yet); KILL_IN_STEP=N in the middle of step N.
KILLING_DRIVER = """
import os, signal, runpy, sys
from accelerate import Accelerator
from autoencoderkl.losses import AutoencoderLoss

kill_at_checkpoint = os.environ.get("KILL_AT_CHECKPOINT")
save_state = Accelerator.save_state
def dying_save_state(self, output_dir=None, **kwargs):
    if kill_at_checkpoint and output_dir.endswith(f"step-{int(kill_at_checkpoint):07d}"):
        self.save_model(self._models[0], output_dir)  # some files, then death
        os.kill(os.getpid(), signal.SIGKILL)
    return save_state(self, output_dir, **kwargs)
Accelerator.save_state = dying_save_state

kill_in_step = os.environ.get("KILL_IN_STEP")
generator_loss = AutoencoderLoss.generator_loss
def dying_generator_loss(self, inputs, reconstructions, posterior, global_step, *args, **kwargs):
    if kill_in_step and global_step + 1 == int(kill_in_step):  # forward done, no update yet
        os.kill(os.getpid(), signal.SIGKILL)
    return generator_loss(self, inputs, reconstructions, posterior, global_step, *args, **kwargs)
AutoencoderLoss.generator_loss = dying_generator_loss

sys.argv = ["train_vae.py"] + sys.argv[1:]
runpy.run_path(os.path.join(os.environ["REPO"], "scripts", "train_vae.py"), run_name="__main__")
"""


def train_vae_cli(args: list[str], **kill) -> subprocess.CompletedProcess:
    """``train_vae.py ARGS`` in a child process; ``kill``: KILL_AT_CHECKPOINT / KILL_IN_STEP."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "REPO": str(REPO)}
    env.update({k: str(v) for k, v in kill.items()})
    return subprocess.run([sys.executable, "-c", KILLING_DRIVER, *args], env=env, text=True,
                          capture_output=True, timeout=300)


def test_sigkill_mid_step_and_mid_checkpoint_then_resume_matches_an_uninterrupted_run(photo_dir, tmp_path):
    overrides = tiny_overrides(photo_dir, **{"train.max_steps": 6, "train.checkpointing_steps": 2,
                                             "train.checkpoints_total_limit": "null", "train.cpu_threads": 1})
    common = ["--config", str(REPO / "configs" / "autoencoderkl" / "demo.yaml"), *overrides]

    straight = tmp_path / "straight"
    proc = train_vae_cli([*common, "--output-dir", str(straight)])
    assert proc.returncode == 0, proc.stderr[-2000:]

    # 1. Killed while writing the step-4 checkpoint: step-2 is the newest complete one.
    run_dir = tmp_path / "killed"
    proc = train_vae_cli([*common, "--output-dir", str(run_dir)], KILL_AT_CHECKPOINT=4)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".tmp-step-0000004", "step-0000002"]

    # 2. Resumed, then killed in the middle of step 5.
    proc = train_vae_cli([*common, "--output-dir", str(run_dir), "--resume", "latest"], KILL_IN_STEP=5)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000002", "step-0000004"]  # .tmp cleared, 4 whole

    # 3. Resumed again: it goes on from step 4 and ends where the uninterrupted run ended.
    proc = train_vae_cli([*common, "--output-dir", str(run_dir), "--resume", "latest"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from " + str(checkpoints / "step-0000004") in proc.stderr
    metrics = run_dir / "metrics.jsonl"
    want, got = weights(straight, 6), weights(run_dir, 6)
    assert all(torch.equal(want[k], got[k]) for k in want), "weights after two kills differ from the uninterrupted run"
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert steps == [1, 2, 3, 4, 5, 6], "each step must be logged exactly once"


# --- No pickle on data a user might receive -------------------------------------------

UNSAFE = {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "_pickle.Unpickler",
          "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load"}
TORCH_LOAD = {"torch.load", "torch.serialization.load"}


def unpickling_uses(source: str, where: str) -> list[str]:
    """Every use in ``source`` of a function that unpickles, its imports resolved.

    ``import pickle as p; p.loads(...)``, ``from torch import load``, ``from pickle import
    loads as l``, ``import torch.serialization`` are all seen; a ``torch.load`` passes only
    when called with ``weights_only=True`` (a literal). Not seen: a name built at run time
    (``getattr(torch, "load")``, ``importlib.import_module``), which grep would not find either.
    """
    tree = ast.parse(source)
    names: dict[str, str] = {}  # local name -> the dotted name it stands for (file-wide; scopes ignored)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:  # "import a.b" binds a; "import a.b as c" binds c to a.b
                top = alias.name.split(".")[0]
                names[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def dotted(expr: ast.expr) -> str | None:
        if isinstance(expr, ast.Name):
            return names.get(expr.id, expr.id)
        if isinstance(expr, ast.Attribute):
            base = dotted(expr.value)
            return base and f"{base}.{expr.attr}"
        return None

    checked = set()  # torch.load callees with weights_only=True
    violations = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            keywords = {k.arg: k.value for k in node.keywords}
            weights_only = keywords.get("weights_only")
            safe = isinstance(weights_only, ast.Constant) and weights_only.value is True
            if safe and dotted(node.func) in TORCH_LOAD:
                checked.add(id(node.func))
            allow = keywords.get("allow_pickle")
            if isinstance(allow, ast.Constant) and allow.value is True:
                violations.append(f"{where}:{node.lineno}: allow_pickle=True")
    for node in ast.walk(tree):
        if isinstance(node, (ast.Name, ast.Attribute)) and isinstance(node.ctx, ast.Load):
            name = dotted(node)
            if name in UNSAFE:
                violations.append(f"{where}:{node.lineno}: {name}")
            elif name in TORCH_LOAD and id(node) not in checked:
                violations.append(f"{where}:{node.lineno}: {name} without weights_only=True")
    return violations


# Uses that read no outside data: file -> (what, why).
ALLOWED = {"lat/benchmark/startup.py": ("pickle.loads", "times a round trip of the bytes pickle.dumps made just "
                                                       "before, as a DataLoader worker receives the path list")}


def test_package_and_scripts_never_unpickle():
    """Every torch.load passes weights_only=True; no pickle/dill/joblib load; no allow_pickle."""
    folders = ("autoencoderkl", "latent_diffusion", "lat", "scripts")
    files = [p for d in folders for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 40 and any(p.parts[-2] == "commands" for p in files)
    violations = []
    for path in files:
        where = str(path.relative_to(REPO))
        found = unpickling_uses(path.read_text(), where)
        if where in ALLOWED:
            allowed = [v for v in found if v.endswith(f": {ALLOWED[where][0]}")]
            assert len(allowed) == 1, f"{where}: expected one {ALLOWED[where][0]}, found {found}"
            found.remove(allowed[0])
        violations += found
    assert not violations, "\n".join(violations)


@pytest.mark.parametrize("source", [
    "import torch\ntorch.load(f)",
    "import torch\ntorch.load(f, weights_only=False)",
    "import torch as t\nt.load(f)",
    "from torch import load\nload(f)",
    "from torch import load as read\nread(f, map_location='cpu')",
    "import torch.serialization\ntorch.serialization.load(f)",
    "from torch.serialization import load\nload(f)",
    "import torch\nread = torch.load\nread(f, weights_only=True)",  # a reference: its calls are not checked
    "import pickle\npickle.loads(b)",
    "import pickle as p\np.load(f)",
    "from pickle import loads\nloads(b)",
    "from pickle import Unpickler as U\nclass Mine(U): pass",
    "import numpy as np\nnp.load(f, allow_pickle=True)",
    "import joblib\njoblib.load(f)",
])
def test_the_unpickling_scan_sees_aliased_imports(source):
    assert unpickling_uses(source, "planted"), source


def test_the_unpickling_scan_passes_safe_uses():
    safe = ("import torch\nfrom torch import Tensor\nimport pickle\n"
            "torch.load(f, map_location='cpu', weights_only=True)\npickle.dumps(x)\n"
            "except_type = pickle.UnpicklingError\ndef load(f): return f\nload(1)\n")
    assert unpickling_uses(safe, "safe") == []


def test_resume_reads_every_file_without_unpickling_objects(photo_dir, tmp_path, monkeypatch):
    """Accelerate's optimizer/scheduler/RNG files are read with weights_only=True too."""
    out = tmp_path / "run"
    run(photo_dir, out, **{"train.max_steps": 2, "train.use_ema": "true"})
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    reset_accelerate_state()
    run(photo_dir, out, resume="latest", **{"train.use_ema": "true"})
    assert len(calls) >= 3 and all(c is True for c in calls), calls


def test_resume_with_another_model_config_is_refused_before_loading(photo_dir, tmp_path):
    out = tmp_path / "run"
    run(photo_dir, out, **{"train.max_steps": 2})
    reset_accelerate_state()
    with pytest.raises(ValueError, match=r"another model config \(model.block_out_channels: checkpoint \[8, 16\] vs this run \[8, 8\]\)"):
        run(photo_dir, out, resume="latest", **{"model.block_out_channels": "[8,8]"})
