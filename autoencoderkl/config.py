"""Typed run configuration: defaults < YAML file < ``key=value`` overrides.

The dataclasses below are the single source of truth for every option of a stage-1 run,
with units and the reference each default comes from. ``load_config`` merges them with a
YAML file and command-line overrides through OmegaConf (as CompVis ``main.py`` does with
``OmegaConf.from_dotlist``), and fails *before any work* on an unknown key, a wrong type
or a value outside its choices, naming the key (and a close match, or the valid ones).

Latent diffusion (stage 2) reuses the machinery here (``merge_config``, ``save_config``)
with its own dataclasses, so both stages read and fail the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
import io
import json
import os
import re
import textwrap
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .atomic import write_atomic

T = TypeVar("T")


@dataclass
class ModelConfig:
    """The diffusers ``AutoencoderKL`` to build (SD 1.x "kl-f8" shape by default)."""

    # kl: diffusers AutoencoderKL (SD 1.x/2.x/XL, SD3, FLUX.1). kl_flux2: diffusers
    # AutoencoderKLFlux2 (FLUX.2's layout: the same encoder/decoder, plus a non-affine
    # BatchNorm over 2x2-patchified latents whose running statistics, updated while the
    # encoder trains, are its latent normalisation in place of a scaling_factor).
    type: str = "kl"
    # Channels of each resolution level; len(block_out_channels) - 1 downsamplings, so
    # four entries give the 8x spatial factor f = H // h of kl-f8.
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = 2  # ResNet blocks per resolution level (the decoder gets one more)
    latent_channels: int = 4  # c of the (c, h, w) latent: 4 as SD 1.x/2.x/XL, 16 as SD3/FLUX
    norm_num_groups: int = 32  # GroupNorm groups; must divide every block width
    # Self-attention in the mid block at the lowest resolution (as SD's VAE).
    mid_block_add_attention: bool = True
    # The 1x1 convolutions between the encoder and the posterior (quant_conv) and between
    # z and the decoder (post_quant_conv), as SD 1.x/2.x/XL have; SD3's and FLUX's
    # 16-channel VAEs have neither (diffusers' use_quant_conv / use_post_quant_conv).
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    # At export, also measure the latents' mean and write it as shift_factor beside
    # scaling_factor (SD3/FLUX convention: latents = (z - shift_factor) * scaling_factor).
    # false: SD 1.x's latents = z * scaling_factor; config.json keeps shift_factor null.
    measure_shift_factor: bool = False
    # Start from existing weights instead of random ones: a diffusers AutoencoderKL folder,
    # a training output dir (its vae/), or an original single-file SD VAE (.safetensors /
    # .ckpt, e.g. vae-ft-mse-840000-ema-pruned). The model shape options above are then
    # taken from that model's config (see autoencoderkl.model.load_vae).
    pretrained: Optional[str] = None


@dataclass
class LossConfig:
    """``AutoencoderLoss``: LDM's ``LPIPSWithDiscriminator`` (Rombach et al. 2022, App. G)."""

    pixel_loss: str = "l1"  # l1 | l2: per-pixel |x - x_hat| or (x - x_hat)^2, x in [-1, 1]
    perceptual_weight: float = 1.0  # x LPIPS distance (VGG16 backbone), per image
    # true: VGG16 ImageNet weights required (torchvision cache or download), else error.
    # false: random VGG16 backbone -- for tests only, not a perceptual metric.
    # auto: real weights when they can be had, else the perceptual term is switched off
    # with a loud warning, and the saved config records perceptual_weight 0.0.
    perceptual_pretrained: str = "auto"
    kl_weight: float = 1e-6  # x KL summed over (c, h, w), mean over batch
    # Extra weight on colour: chroma_weight x (|dCb| + |dCr|) per pixel (squared for l2), the
    # BT.601 chroma of x - x_hat, added to rec_loss. 0 (default, LDM): RGB alone. A short
    # run spends its latents on luminance first and returns sepia pictures (docs/stage1.md).
    chroma_weight: float = 0.0
    logvar_init: float = 0.0  # initial value of the scalar NLL log-variance
    # In LDM the logvar is an nn.Parameter that no optimizer holds, so it never trains;
    # false keeps that behaviour, true adds it to the autoencoder's optimizer.
    learn_logvar: bool = False
    disc_start: int = 50_001  # optimizer steps before the GAN terms switch on
    disc_weight: float = 0.5  # x adaptive weight ||grad nll|| / ||grad g|| (LDM, App. G)
    disc_factor: float = 1.0  # x both GAN terms once global_step >= disc_start
    disc_loss: str = "hinge"  # hinge | vanilla (non-saturating softplus)
    disc_num_layers: int = 3  # PatchGAN depth (70x70 receptive field at 3)
    disc_ndf: int = 64  # PatchGAN width of the first layer
    # Once the GAN is on: backpropagate LPIPS and the discriminator once per step, sharing
    # their gradients at the reconstruction between the adaptive weight and the update
    # (same gradients, one LPIPS and one PatchGAN backward fewer than LDM's three passes).
    # fp16 runs use LDM's way (the shared gradients would be taken before loss scaling).
    shared_backward: bool = True
    # EQ-VAE's equivariance regularisation as published (Kouzelis et al. 2025; zelaki/eqvae;
    # autoencoderkl.equivariance): off | eqvae. eqvae: on a share equivariance_prob of the
    # optimizer steps, z and x are downscaled by s in {8/32, ..., 31/32} AND rotated by
    # 90/180/270 degrees, and (tau(x), decode(tau(z))) replace the inputs of the whole loss
    # (pixel + LPIPS NLL, KL, GAN terms with the adaptive weight, discriminator); a share
    # equivariance_prior_scale_prob of the other steps reconstructs an image downscaled by
    # such an s ("prior preservation"). Logged as eq_applied and eq_lowres (shares of steps).
    equivariance: str = "off"
    equivariance_prob: float = 0.5  # EQ-VAE's p_prior: share of steps with the transformed pair
    equivariance_prior_scale_prob: float = 0.25  # EQ-VAE's p_prior_s: of the other steps, share at low resolution
    # Alignment of the latents to a frozen vision model (VA-VAE, Yao et al. 2025, "Reconstruction
    # vs. Generation: Taming Optimization Dilemma in Latent Diffusion Models"; hustvl/LightningDiT
    # vavae/): a learned 1x1 projection of the posterior sample z is compared with the teacher's
    # patch features on z's grid by a marginal cosine term and a marginal distance-matrix term
    # (autoencoderkl.alignment). The sum is scaled by the adaptive weight ||grad nll|| /
    # ||grad vf_loss|| at the encoder's last conv times alignment_weight (VA-VAE: 0.1). 0 = off
    # (no teacher is loaded; the run is bit-identical to one without the feature). Logged as
    # vf_loss and vf_weight.
    alignment_weight: float = 0.0
    # A transformers vision model with patch tokens: a Hub id (downloaded once into the HF
    # cache; offline, cache it first), a local folder (save_pretrained), or stand-in:HUB_ID (a
    # RANDOMLY initialised model of that published DINOv2 shape: demos, tests and cost
    # measurements only, it aligns to nothing meaningful). VA-VAE uses DINOv2-large.
    alignment_teacher: str = "facebook/dinov2-large"
    # (cos_margin, distmat_margin): per-position cosine similarities above 1 - cos_margin, and
    # pairwise-similarity differences below distmat_margin, contribute no loss nor gradient.
    # VA-VAE f16d32_vfdinov2.yaml: cos_margin 0.5, distmat_margin 0.25.
    alignment_margins: list[float] = field(default_factory=lambda: [0.5, 0.25])
    # Side in pixels of the images the teacher sees (the crop is resized to it); a multiple of
    # the teacher's patch size. VA-VAE: 224 (DINOv2's 16 x 16 patches of 14 px).
    alignment_resolution: int = 224


@dataclass
class DataConfig:
    """Where images come from and how they become (B, 3, H, W) tensors in [-1, 1]."""

    # folder | demo (the RGB photos scikit-image ships) | hf (Hugging Face datasets: the
    # Hub, parquet, WebDataset tar shards; the keys from data.dataset to data.shuffle_buffer)
    source: str = "folder"
    train_dir: Optional[str] = None  # image folder, searched recursively
    # Held-out validation folder. num_val_images images, evenly spaced in sorted order
    # (a fixed split), are taken from it -- or, when it is null, out of train_dir.
    # data.source=demo has its own fixed held-out photos.
    val_dir: Optional[str] = None
    num_val_images: int = 8  # held-out images for val/psnr, val/ssim and the grids
    # Training images (evenly spaced over the training list, cropped as the validation
    # images are) also reconstructed at each validation: val/train_psnr, val/train_ssim
    # beside val/psnr, so overfitting shows in the curves. 0 = off; data.source=hf: off.
    num_train_val_images: int = 8
    resolution: int = 256  # square crop side in pixels; divisible by 8
    # Shorter side in pixels after resizing, before cropping; null = resolution
    # (the whole image, as SD trains). Larger values train on crops at higher detail.
    resize: Optional[int] = None
    val_grid: int = 1  # g: each validation image gives g x g fixed crops (1 = centre crop)
    batch_size: int = 8  # per process
    num_workers: int = 2  # DataLoader worker processes decoding images
    # Keep decoded, resized images in memory (per worker) after first use: for datasets
    # that fit in RAM; each later sample is only a crop.
    cache_images: bool = False
    # Lossless training augmentations beyond the flip, for tiny datasets: a random
    # quarter-turn, and a random order of the R, G, B planes.
    rotate: bool = False  # also a random quarter-turn of each crop
    permute_channels: bool = False  # also a random one of the 6 orders of the R, G, B planes of each crop
    # Colour jitter of strength s in [0, 1): brightness, contrast and saturation x U(1-s, 1+s),
    # hue shifted by U(-s/2, s/2) of a turn (torchvision's ColorJitter operations).
    color_jitter: float = 0.0
    # ---- data.source=hf (see docs/data-at-scale.md) ----
    # A Hub name (user/name), a local folder, or a builder: imagefolder | parquet | webdataset.
    # null with data.data_files: the builder from their extension (.tar, .parquet, else images).
    dataset: Optional[str] = None
    # Files to read: a glob or brace pattern (train-{000000..000099}.tar), a list of them, or
    # {split: patterns}; local paths or fsspec URLs (s3://, gs://, hf://). null: the dataset's own.
    data_files: Any = None
    split: str = "train"  # the split to train on
    # Validation images: data.val_dir (a folder), or the first num_val_images of this split.
    val_split: Optional[str] = None
    image_column: Optional[str] = None  # null: the dataset's one Image column
    label_column: Optional[str] = None  # class labels (encode_latents; stage 1 ignores labels)
    # true: read as a stream (nothing is copied first; resumable through the stream's state).
    # false: datasets converts the split into its local Arrow cache first, then samples as
    # the folder source does (exact resume with any shuffle).
    streaming: bool = True
    # Streams: examples drawn at random from a buffer of this many (datasets' shuffle buffer;
    # its content is not saved, so a resume skips up to buffer - 1 samples per worker and rank).
    # 0: the shard order alone is shuffled, each epoch, and a resume is exact.
    shuffle_buffer: int = 1000


@dataclass
class OptimConfig:
    """Adam for the autoencoder (+ logvar) and for the discriminator, as LDM."""

    # Learning rate per optimizer step, for both optimizers. No hidden scaling: LDM's
    # kl-f8 recipe is 4.5e-6 x images per optimizer step (its "scale_lr"); write the
    # product here for your global batch.
    lr: float = 4.5e-6
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # Adam (beta1, beta2), LDM's GAN setting
    weight_decay: float = 0.0  # L2 penalty of torch.optim.Adam (0 in LDM)
    max_grad_norm: Optional[float] = None  # clip the global gradient norm; null = off
    # Learning-rate schedule over train.max_steps, from diffusers.optimization, applied to
    # both optimizers: constant (LDM) | constant_with_warmup | linear | cosine.
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0  # optimizer steps of linear warm-up from 0
    fused: bool = True  # the fused (single-kernel) Adam on CUDA; ignored on CPU


@dataclass
class LoopConfig:
    """What both stages' training loops share: steps, precision, checkpoints, faults, speed.

    Each stage's ``TrainConfig`` extends it (stage 2: ``latent_diffusion.config``), so a
    key such as ``train.max_steps`` means the same in both and is documented once.
    """

    max_steps: int = 100_000  # optimizer steps (global_step counts these)
    # The next three are also `accelerate launch` / `accelerate config` settings. null (the
    # default) lets the launcher decide (--gradient_accumulation_steps, --mixed_precision,
    # --dynamo_backend; else 1, no, no); a value here wins, with a warning if the launcher
    # says otherwise. config.yaml records the value used.
    gradient_accumulation_steps: Optional[int] = None  # micro-batches per optimizer step
    mixed_precision: Optional[str] = None  # no | fp16 | bf16 (autocast; master weights stay fp32)
    compile: Optional[bool] = None  # torch.compile (inductor) the trained models: slow first steps
    seed: int = 0  # weights, data order, crops and noise all follow from it
    checkpointing_steps: int = 5000  # every N steps: checkpoints/step-NNNNNNN (and at the end)
    checkpoints_total_limit: Optional[int] = 3  # keep the newest K; null keeps all
    validation_steps: int = 1000  # every N steps: validation metrics and a PNG grid in samples/
    log_steps: int = 10  # every N steps: a line in metrics.jsonl and the tracker (means over the N steps)
    # Where logs and sample grids go besides metrics.jsonl: tensorboard (OUTPUT_DIR/logs) |
    # wandb (Weights & Biases; pip install -e ".[wandb]") | all (both) | none.
    report_to: str = "tensorboard"
    use_ema: bool = False  # exponential moving average of the trained model's weights
    ema_decay: float = 0.999  # the EMA's decay per optimizer step
    # Intra-op threads on CPU. null: this process's share of the cores. (accelerate
    # launch sets OMP_NUM_THREADS=1 for CPU runs unless given --cpu, halving a 2-core
    # machine's speed; an explicit number here wins over both.)
    cpu_threads: Optional[int] = None
    # NaN/inf gradients skip that optimizer step (counted as nonfinite_skips in
    # metrics.jsonl). After this many in a row, train.nonfinite_action decides. fp16 runs
    # leave overflow handling to the GradScaler.
    max_consecutive_nonfinite: int = 5
    # stop: end the run with an error and advice. rollback: reload the newest checkpoint,
    # multiply the learning rates by rollback_lr_factor, move past the batches that failed
    # and go on (at most max_rollbacks times; each one is a line in metrics.jsonl).
    nonfinite_action: str = "stop"
    rollback_lr_factor: float = 0.5  # learning rates x this at each rollback, in (0, 1]
    max_rollbacks: int = 3  # rollbacks allowed in one run; one more failure stops it
    # Speed switches (`lat benchmark` measures each; see the README's Performance).
    channels_last: bool = False  # NHWC models and inputs: faster convolutions on CUDA tensor cores
    allow_tf32: bool = True  # TF32 for fp32 matmuls/convolutions on Ampere+ GPUs; no effect on CPU
    # Recompute activations in the backward pass: less memory, ~30% more compute; for
    # resolutions or models that do not fit otherwise.
    gradient_checkpointing: bool = False


@dataclass
class TrainConfig(LoopConfig):
    """The stage-1 loop: ``LoopConfig`` plus decoder-only fine-tuning."""

    # Freeze the encoder (and quant_conv): train only the decoder, keeping the latent
    # space, as diffusers' example and the sd-vae-ft-* releases do.
    decoder_only: bool = False


@dataclass
class VAEConfig:
    """A whole stage-1 run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# Values that must come from a fixed set, checked after merging.
# Choices of the keys both stages have (LoopConfig and the optimizer schedule).
LOOP_CHOICES: dict[str, tuple[str, ...]] = {
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.nonfinite_action": ("stop", "rollback"),
    "train.report_to": ("tensorboard", "wandb", "all", "none"),
    "optim.lr_scheduler": ("constant", "constant_with_warmup", "linear", "cosine"),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "model.type": ("kl", "kl_flux2"),
    "loss.pixel_loss": ("l1", "l2"),
    "loss.perceptual_pretrained": ("true", "false", "auto"),
    "loss.disc_loss": ("hinge", "vanilla"),
    "loss.equivariance": ("off", "eqvae"),
    "data.source": ("folder", "demo", "hf"),
    **LOOP_CHOICES,
}


# The bundled run configs: the repository's configs/ in a checkout, shipped as lat/configs
# (package data) in an installed wheel.
CONFIG_ROOTS = (Path(__file__).resolve().parents[1] / "configs", Path(__file__).resolve().parents[1] / "lat" / "configs")


def find_config(name_or_path: str | os.PathLike, stage: str) -> Path:
    """A config path, or the name of a bundled config -> the YAML file to read.

    Args:
        name_or_path: ``configs/autoencoderkl/demo.yaml`` (any path), or just ``demo``,
            ``kl-f8``, ``probe``, ...
        stage: ``autoencoderkl`` or ``latent_diffusion`` (the bundled configs' folder).
    Returns:
        ``name_or_path`` itself when it is a file or names a YAML file, else the bundled one.
    Raises:
        FileNotFoundError: naming the bundled configs when neither exists.
    """
    text = str(name_or_path)
    if Path(text).is_file() or text.endswith((".yaml", ".yml")):
        return Path(text)
    for root in CONFIG_ROOTS:
        candidate = root / stage / f"{text}.yaml"
        if candidate.is_file():
            return candidate
    bundled = sorted({p.stem for root in CONFIG_ROOTS for p in (root / stage).glob("*.yaml")})
    raise FileNotFoundError(f"--config {text}: no such file, and no bundled {stage} config of that name "
                            f"(bundled: {', '.join(bundled) or 'none found'})")


def valid_keys(schema: Any) -> list[str]:
    """Dotted names of every option of a config dataclass (instance or type), in order."""

    def flatten(tree: dict, prefix: str) -> list[str]:
        return [key for name, value in tree.items()
                for key in (flatten(value, f"{prefix}{name}.") if isinstance(value, dict) else [f"{prefix}{name}"])]

    return flatten(OmegaConf.to_container(OmegaConf.structured(schema)), "")


def _field_comments(cls: type) -> dict[str, str]:
    """``{field: its comment}`` for a config dataclass and its bases, read from the source.

    A field's comment is the one at the end of its line, else the comment lines right
    above it (joined). The dataclasses' comments are the one place options are explained;
    ``--help`` shows them from here rather than from a second copy.
    """
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):  # bases first; a subclass's comment wins
        try:
            lines, _ = inspect.getsourcelines(klass)
        except (OSError, TypeError):
            continue
        above: list[str] = []
        for line in lines:
            text = line.strip()
            if text.startswith("#"):
                above.append(text.lstrip("# ").rstrip())
                continue
            match = re.match(r"^([A-Za-z_]\w*)\s*:", text)
            if match and not text.startswith(("def ", "class ")):
                inline = ""
                for tok in tokenize.generate_tokens(io.StringIO(text).readline):
                    if tok.type == tokenize.COMMENT:
                        inline = tok.string.lstrip("# ").rstrip()
                comment = inline or " ".join(above)
                if comment:
                    comments[match.group(1)] = comment
            above = []
    return comments


def describe_keys(schema: Any) -> list[tuple[str, Any, str]]:
    """``(dotted key, default, meaning)`` of every option of a config dataclass, in order.

    Args:
        schema: a config dataclass (``VAEConfig``, ``LDMConfig``) or an instance.
    Returns:
        One tuple per key of ``valid_keys(schema)``; the meaning is the field's source
        comment (empty where it has none).
    """
    cls = schema if isinstance(schema, type) else type(schema)
    out = []
    for section in dataclasses.fields(cls):
        section_cls = section.type if isinstance(section.type, type) else type(getattr(cls(), section.name))
        comments = _field_comments(section_cls)
        defaults = OmegaConf.to_container(OmegaConf.structured(section_cls))
        for name, default in defaults.items():
            out.append((f"{section.name}.{name}", default, comments.get(name, "")))
    return out


def keys_help(schema: Any, width: int = 100) -> str:
    """The ``--help`` epilog: every config key with its default and what it means."""
    lines = ["config keys (override with key=value; null = unset):"]
    for key, default, meaning in describe_keys(schema):
        lines.append(f"  {key} = {json.dumps(default)}")
        if meaning:
            lines += textwrap.wrap(meaning, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def _config_error(exc: OmegaConfBaseException, schema: Any, where: str) -> ValueError:
    """One short message for a bad key or value, with the hint (a close match) last.

    No list of every key: 70 lines pushed the hint off the screen. An unknown key with no
    close match gets the keys of its section (or the section names) on one line;
    ``--help`` explains every key.
    """
    key = str(getattr(exc, "full_key", None) or "?")
    keys = valid_keys(schema)
    if isinstance(exc, ConfigKeyError):
        close = difflib.get_close_matches(key, keys, n=2, cutoff=0.7)
        if close:
            return ValueError(f"unknown config key '{key}' ({where}); did you mean {' or '.join(close)}?")
        section = key.split(".")[0]
        names = [k.split(".", 1)[1] for k in keys if k.startswith(f"{section}.")]
        sections = list(dict.fromkeys(k.split(".")[0] for k in keys))
        known = (f"the {section} keys are {', '.join(names)}" if names
                 else f"the sections are {', '.join(sections)}")
        return ValueError(f"unknown config key '{key}' ({where}); {known} (--help explains each)")
    msg = str(exc).splitlines()[0]
    return ValueError(f"bad value for config key '{key}' ({where}): {msg}")


_YAML_BOOL_SPELLINGS = {"False": ("false", "no", "off", "n"), "True": ("true", "yes", "on", "y")}


def merge_config(
    schema: type[T],
    yaml_path: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    choices: dict[str, tuple[str, ...]] | None = None,
) -> T:
    """Merge defaults < YAML < ``key=value`` overrides into a typed dataclass instance.

    Args:
        schema: the config dataclass (``VAEConfig`` here; stage 2 passes its own).
        yaml_path: a YAML file with any subset of the schema's keys, nested.
        overrides: dotted ``section.key=value`` strings, e.g. ``train.max_steps=200``.
        choices: dotted key -> allowed string values, checked after merging.
    Returns:
        An instance of ``schema`` with every value typed (ints are ints, lists are lists).
    Raises:
        FileNotFoundError: if ``yaml_path`` does not exist.
        ValueError: on an unknown key (the message gives a close match, or its section's keys),
            a value of the wrong type, a malformed override, a value outside ``choices``, or
            a value the YAML marks as required (``???``) that no override gives.
    """
    base = OmegaConf.structured(schema)
    layers: list[tuple[Any, str]] = []
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        layers.append((OmegaConf.load(path), str(path)))
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ValueError(f"overrides must look like section.key=value, got {bad}")
    if overrides:
        try:
            layers.append((OmegaConf.from_dotlist(list(overrides)), "command line"))
        except OmegaConfBaseException as exc:
            raise ValueError(f"cannot parse overrides {list(overrides)}: {exc}") from None
    merged: DictConfig = base
    for layer, where in layers:
        try:
            merged = OmegaConf.merge(merged, layer)  # type: ignore[assignment]
        except OmegaConfBaseException as exc:
            raise _config_error(exc, schema, where) from None
    # "???" (OmegaConf's MISSING) in a YAML marks a value the user must give; merging it
    # would silently keep the default, so it must come from a later layer.
    missing = set(OmegaConf.missing_keys(layers[0][0])) if yaml_path is not None else set()
    missing = sorted(k for k in missing if all(OmegaConf.select(layer, k, default="???") == "???" for layer, _ in layers[1:]))
    if missing:
        raise ValueError(f"config key(s) {missing} must be set: {yaml_path} leaves them '???'; give them on the "
                         f"command line, e.g. {missing[0]}=...")
    cfg = OmegaConf.to_object(merged)
    for key, allowed in (choices or {}).items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None:  # unset: someone else decides (the launcher, a cache's statistics)
            continue
        # YAML 1.1 reads an unquoted no/off/false (yes/on/true) as a boolean, which a str
        # field receives as "False" ("True"): map it back to the spelling that is allowed.
        spellings = _YAML_BOOL_SPELLINGS.get(str(value), (str(value).lower(),))
        allowed_spelling = next((v for v in spellings if v in allowed), None)
        if allowed_spelling is not None:
            value = allowed_spelling
            setattr(getattr(cfg, section), name, value)
        if value not in allowed:
            raise ValueError(f"config key '{key}' must be one of {list(allowed)}, got {value!r}")
    return cfg  # type: ignore[return-value]


def load_config(yaml_path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> VAEConfig:
    """Stage-1 config: ``merge_config(VAEConfig, ...)`` plus cross-field checks.

    Raises:
        FileNotFoundError, ValueError: as ``merge_config``; also ValueError when
            ``data.resolution`` is not a positive multiple of 8, ``data.resize`` is smaller
            than the crop, ``data.source=folder`` has no ``data.train_dir``,
            ``data.source=hf`` misses a key (``check_hf_data``), an equivariance
            probability lies outside [0, 1], or an alignment setting is out of range or
            combined with ``train.decoder_only``.
    """
    cfg = merge_config(VAEConfig, yaml_path, overrides, CHOICES)
    d = cfg.data
    if d.resolution <= 0 or d.resolution % 8:
        raise ValueError(f"data.resolution must be a positive multiple of 8, got {d.resolution}")
    if d.resize is not None and d.resize < d.resolution:
        raise ValueError(f"data.resize ({d.resize}) must be >= data.resolution ({d.resolution}) or null")
    if d.source == "folder" and not d.train_dir:
        raise ValueError("data.source=folder needs data.train_dir=PATH (or use data.source=demo or hf)")
    if d.source == "hf":
        check_hf_data(d)
    check_loop_config(cfg, extra_positive=("data.val_grid", "data.num_val_images"))
    for key in ("equivariance_prob", "equivariance_prior_scale_prob"):
        if not 0.0 <= getattr(cfg.loss, key) <= 1.0:
            raise ValueError(f"loss.{key} must lie in [0, 1], got {getattr(cfg.loss, key)}")
    check_alignment(cfg)
    if d.num_train_val_images < 0:
        raise ValueError(f"data.num_train_val_images must be >= 0 (0 = off), got {d.num_train_val_images}")
    return cfg


def check_alignment(cfg: VAEConfig) -> None:
    """The alignment keys' ranges, before any work.

    Raises:
        ValueError: naming the key: a negative ``loss.alignment_weight``, margins that are
            not two numbers in [0, 2], a non-positive ``loss.alignment_resolution``, or
            alignment on without the transformers package or with ``train.decoder_only``
            (the loss trains the encoder).
    """
    loss = cfg.loss
    if loss.alignment_weight < 0:
        raise ValueError(f"loss.alignment_weight must be >= 0 (0 = off), got {loss.alignment_weight}")
    if len(loss.alignment_margins) != 2 or not all(0.0 <= m <= 2.0 for m in loss.alignment_margins):
        raise ValueError(f"loss.alignment_margins must be two numbers in [0, 2], (cos_margin, distmat_margin), "
                         f"got {loss.alignment_margins}")
    if loss.alignment_resolution < 1:
        raise ValueError(f"loss.alignment_resolution must be >= 1 pixel, got {loss.alignment_resolution}")
    if loss.alignment_weight > 0 and importlib.util.find_spec("transformers") is None:
        raise ValueError('loss.alignment_weight > 0 loads its teacher with transformers: pip install -e ".[align]" '
                         "(or pip install transformers), or set loss.alignment_weight=0")
    if loss.alignment_weight > 0 and cfg.train.decoder_only:
        raise ValueError("loss.alignment_weight > 0 trains the encoder, but train.decoder_only=true freezes it: "
                         "set loss.alignment_weight=0 or train.decoder_only=false")


def check_hf_data(d: DataConfig) -> None:
    """The cross-field checks of ``data.source=hf``, before any work.

    Raises:
        ValueError: no ``data.dataset`` nor ``data.data_files``; no validation source
            (``data.val_dir`` or ``data.val_split``); a negative ``data.shuffle_buffer``.
        FileNotFoundError: ``data.val_dir``, a local ``data.dataset`` path or a local
            ``data.data_files`` pattern that does not exist (``expand_data_files``).
    """
    if not d.dataset and not d.data_files:
        raise ValueError("data.source=hf needs data.dataset (a Hub name, a folder, or imagefolder | parquet | "
                         "webdataset) and/or data.data_files (e.g. '/data/shards/train-{000000..000099}.tar')")
    if not d.val_dir and not d.val_split:
        raise ValueError("data.source=hf needs validation images: data.val_split (a split of the same dataset, "
                         "e.g. validation) or data.val_dir (an image folder)")
    if d.shuffle_buffer < 0:
        raise ValueError(f"data.shuffle_buffer must be >= 0 (0: shard order only), got {d.shuffle_buffer}")
    if d.val_dir and not Path(d.val_dir).is_dir():
        raise FileNotFoundError(f"data.val_dir {d.val_dir} is not a folder")
    if d.dataset and d.dataset.startswith(("/", ".", "~")) and not Path(d.dataset).expanduser().exists():
        raise FileNotFoundError(f"data.dataset {d.dataset} does not exist")
    from .hf_data import expand_data_files  # light: no datasets import

    expand_data_files(d.data_files)


def check_loop_config(cfg: Any, extra_positive: tuple[str, ...] = ()) -> None:
    """The checks both stages make on ``train`` (a ``LoopConfig``), ``optim`` and ``data``.

    Args:
        cfg: a stage's whole config (``VAEConfig`` or ``LDMConfig``).
        extra_positive: more dotted keys whose values must be >= 1.
    Raises:
        ValueError: naming the key, when a count is < 1, ``optim.betas`` is not two
            numbers, or a rollback setting is out of range.
    """
    for key in ("data.batch_size", "train.max_steps", "train.gradient_accumulation_steps",
                "train.checkpointing_steps", "train.validation_steps", "train.log_steps",
                "train.max_consecutive_nonfinite", *extra_positive):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    if len(cfg.optim.betas) != 2:
        raise ValueError(f"optim.betas must hold two numbers, got {cfg.optim.betas}")
    if not 0.0 < cfg.train.rollback_lr_factor <= 1.0:
        raise ValueError(f"train.rollback_lr_factor must lie in (0, 1], got {cfg.train.rollback_lr_factor}")
    if cfg.train.max_rollbacks < 0:
        raise ValueError(f"train.max_rollbacks must be >= 0, got {cfg.train.max_rollbacks}")
    if cfg.train.report_to in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        raise ValueError(f"train.report_to={cfg.train.report_to} needs the wandb package: "
                         f'pip install -e ".[wandb]" (or pip install wandb), or set train.report_to=tensorboard')


def save_config(cfg: Any, path: str | os.PathLike, notes: list[str] = (), command: str | None = None,
                resume: str | None = None) -> None:
    """Write the resolved config as YAML, atomically, headed by the launch command.

    Args:
        cfg: a config dataclass instance.
        path: destination file; written atomically (``autoencoderkl.atomic``).
        notes: extra lines for the header (e.g. what ``perceptual_pretrained=auto`` chose).
        command: the command line that launched the run, as it runs when pasted
            (``autoencoderkl.launch.launch_command``).
        resume: the command that resumes it (``autoencoderkl.launch.resume_command``);
            the header gives it with ``--resume latest``.
    """
    path = Path(path)
    header = ["# Resolved config of this run."]
    header += ["# Launched with:", f"#   {command}"] if command else []
    header += ["# Resume it with:", f"#   {resume} --resume latest"] if resume else []
    header += [f"# {n}" for n in notes]
    text = "\n".join(header) + "\n" + OmegaConf.to_yaml(OmegaConf.structured(cfg))
    write_atomic(path, text)
