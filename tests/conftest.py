"""Shared fixtures: tiny images on disk and a tiny stage-1 config (seconds on CPU)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

# Keep each test process from oversubscribing the CI machine's two cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def write_photos(folder: Path, n: int = 6, size: tuple[int, int] = (40, 48), seed: int = 0) -> list[Path]:
    """n smooth random RGB images (gradients plus blobs), PNG, like tiny photos."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    paths = []
    for i in range(n):
        img = np.zeros((h, w, 3))
        for c in range(3):
            a, b, f = rng.uniform(-1, 1, 3)
            img[..., c] = 0.5 + 0.3 * np.sin(6 * f * (a * xx + b * yy) + c)
        cy, cx = rng.uniform(0.2, 0.8, 2)
        img += 0.3 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)[..., None] * rng.uniform(-1, 1, 3)
        path = folder / f"photo_{i:02d}.png"
        Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    """A folder of 6 tiny photos (40 x 48 px)."""
    write_photos(tmp_path / "photos")
    return tmp_path / "photos"


def tiny_overrides(photo_dir: Path, **extra) -> list[str]:
    """key=value overrides for a seconds-long stage-1 run on ``photo_dir``.

    Two resolution levels (f = 2), 8/16 channels, a random-backbone LPIPS (no weights
    are on CI machines), 16 px crops, the GAN on from step 2.
    """
    values = {
        "model.block_out_channels": "[8,16]",
        "model.layers_per_block": 1,
        "model.norm_num_groups": 4,
        "loss.perceptual_pretrained": "false",
        "loss.disc_start": 2,
        "loss.disc_ndf": 8,
        "loss.disc_num_layers": 2,
        "data.source": "folder",
        "data.train_dir": str(photo_dir),
        "data.num_val_images": 2,
        "data.resolution": 16,
        "data.resize": 24,
        "data.batch_size": 2,
        "data.num_workers": 0,
        "optim.lr": 1e-3,
        "train.max_steps": 4,
        "train.checkpointing_steps": 2,
        "train.validation_steps": 2,
        "train.log_steps": 1,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def torchrun(nproc: int = 2) -> list[str]:
    """The command prefix that starts ``nproc`` local processes (gloo on CPU) on a free port.

    A fixed ``--master_port`` collides when two test runs share a machine.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port)]


def reset_accelerate_state() -> None:
    """Forget the previous Accelerator's process-wide singletons (each run builds its own)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Every test starts without a previous test's Accelerator state."""
    reset_accelerate_state()
    yield


@pytest.fixture
def random_inception_weights(tmp_path, monkeypatch) -> Path:
    """torch-fidelity's InceptionV3 with random weights, saved as its weights file would be."""
    import torch

    fi = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    from autoencoderkl.evaluate import INCEPTION_FILE

    with monkeypatch.context() as m:
        m.setattr(fi, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = fi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path / INCEPTION_FILE
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny random DINOv2 (patch 4, width 16) saved with save_pretrained: the alignment's stand-in teacher."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("teacher")
    config = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, patch_size=4,
                          image_size=16)
    Dinov2Model(config).save_pretrained(folder)
    return folder


@pytest.fixture
def scaled_inception_weights(random_inception_weights) -> Path:
    """``random_inception_weights`` with every convolution redrawn at He (Kaiming) scale.

    torch-fidelity's own random initialisation shrinks the 2048-d features to ~1e-8 (an
    FID of ~1e-13, a KID of 0 for any two sets); at He scale they stay ~0.1 and differ
    between images, so FID, KID, precision and recall can tell sets apart.
    """
    import math

    import torch

    state = torch.load(random_inception_weights, weights_only=True)
    g = torch.Generator().manual_seed(0)
    for key, w in state.items():
        if key.endswith("conv.weight"):  # (out, in, kh, kw); BatchNorm and the logits layer stay
            state[key] = torch.randn(w.shape, generator=g) * math.sqrt(2 / w[0].numel())
    path = random_inception_weights.with_name("scaled-" + random_inception_weights.name)
    torch.save(state, path)
    return path
