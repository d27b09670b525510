"""Build, load, run and export the diffusers ``AutoencoderKL`` (and ``AutoencoderKLFlux2``).

The model *is* ``diffusers.AutoencoderKL`` (no subclass), so every weight a run writes
loads with ``AutoencoderKL.from_pretrained(DIR)`` and its ``config.json`` is readable.
``model.type: kl_flux2`` builds diffusers' ``AutoencoderKLFlux2`` instead (FLUX.2's
layout, ``VAE_CLASSES``): the same encoder and decoder, plus a non-affine ``bn``
(BatchNorm2d over the 2x2-patchified latent, ``patchify_latents``) whose running
statistics are its latent normalisation; it loads with
``AutoencoderKLFlux2.from_pretrained(DIR)``.
``AutoencoderWithPosterior`` is only a thin ``nn.Module`` around it whose ``forward``
does encode -> sample -> decode in one call: under DDP, only a call through the wrapped
module's ``forward`` all-reduces gradients, and ``AutoencoderKL.forward`` does not return
the posterior that the KL term needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2
from diffusers.loaders.single_file_utils import LDM_VAE_DEFAULT_SCALING_FACTOR, convert_ldm_vae_checkpoint
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .atomic import atomic_dir, atomic_path
from .config import ModelConfig
from .hub import is_hub_id, load_vae_from_hub, write_model_card


# model.type -> the diffusers class it builds; the one place that maps names to classes.
VAE_CLASSES: dict[str, type] = {"kl": AutoencoderKL, "kl_flux2": AutoencoderKLFlux2}


def vae_type(vae: nn.Module) -> str:
    """The ``model.type`` of a built or loaded VAE (``kl`` or ``kl_flux2``).

    Raises:
        ValueError: for a model of another class.
    """
    for name, cls in VAE_CLASSES.items():
        if type(vae) is cls:
            return name
    raise ValueError(f"{type(vae).__name__} is not one of the VAE classes this toolkit trains "
                     f"({', '.join(c.__name__ for c in VAE_CLASSES.values())})")


def patchify_latents(z: Tensor, patch_size: tuple[int, int] = (2, 2)) -> Tensor:
    """FLUX.2's patchify: (B, c, h, w) -> (B, c * p * q, h / p, w / q).

    Channel ``c * p * q + i * q + j`` holds ``z[:, c, i::p, j::q]``: the layout of
    diffusers' ``Flux2Pipeline._patchify_latents`` and BFL's ``rearrange(z, "... c (i pi)
    (j pj) -> ... (c pi pj) i j")``, which ``AutoencoderKLFlux2.bn`` normalises.

    Args:
        z: (B, c, h, w) latents, any float dtype; h, w divisible by the patch.
        patch_size: (p, q), ``vae.config.patch_size``.
    Returns:
        (B, c * p * q, h / p, w / q), same dtype (a view-free reshape copy).
    """
    p, q = patch_size
    B, c, h, w = z.shape
    return z.reshape(B, c, h // p, p, w // q, q).permute(0, 1, 3, 5, 2, 4).reshape(B, c * p * q, h // p, w // q)


def unpatchify_latents(latents: Tensor, patch_size: tuple[int, int] = (2, 2)) -> Tensor:
    """The inverse of ``patchify_latents``: (B, c * p * q, h', w') -> (B, c, h' p, w' q), exactly."""
    p, q = patch_size
    B, C, h, w = latents.shape
    return latents.reshape(B, C // (p * q), p, q, h, w).permute(0, 1, 4, 2, 5, 3).reshape(B, C // (p * q), h * p, w * q)


def build_vae(cfg: ModelConfig, resolution: int) -> AutoencoderKL:
    """A randomly initialised ``AutoencoderKL`` (or ``AutoencoderKLFlux2``) with the configured shape.

    Args:
        cfg: ``model.*`` options; ``len(block_out_channels) - 1`` downsamplings give
            f = 2 ** (len - 1) (8 for the four levels of SD's kl-f8); ``cfg.type`` picks the
            class (``VAE_CLASSES``).
        resolution: training image side in pixels, stored as ``sample_size``.
    Returns:
        The model in train mode, float32, on the CPU. An ``AutoencoderKL``'s
        ``scaling_factor`` is 1.0 until the run measures the latents at export
        (``estimate_latent_factors``); an ``AutoencoderKLFlux2``'s ``bn`` starts at mean 0,
        variance 1 and tracks the patchified latents while the encoder trains
        (``AutoencoderWithPosterior``), with diffusers' defaults ``patch_size`` (2, 2),
        ``batch_norm_eps`` 1e-4, ``batch_norm_momentum`` 0.1 (BFL's FLUX.2 values).
    Raises:
        ValueError: if a block width is not divisible by ``norm_num_groups``, or
            ``measure_shift_factor`` is asked of a ``kl_flux2`` model (its batch norm
            centres the latents).
    """
    bad = [c for c in cfg.block_out_channels if c % cfg.norm_num_groups]
    if bad:
        raise ValueError(
            f"model.block_out_channels {cfg.block_out_channels} must be divisible by "
            f"model.norm_num_groups={cfg.norm_num_groups} (GroupNorm); {bad} are not"
        )
    n = len(cfg.block_out_channels)
    shape = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=resolution,
        mid_block_add_attention=cfg.mid_block_add_attention,
        use_quant_conv=cfg.use_quant_conv,
        use_post_quant_conv=cfg.use_post_quant_conv,
    )
    if cfg.type == "kl_flux2":
        if cfg.measure_shift_factor:
            raise ValueError("model.measure_shift_factor is for model.type=kl: kl_flux2's batch norm already centres "
                             "the latents (its running mean); set model.measure_shift_factor=false")
        return AutoencoderKLFlux2(**shape)
    return AutoencoderKL(**shape, scaling_factor=1.0)


def load_vae(path: str | os.PathLike, config: str | os.PathLike | None = None) -> AutoencoderKL:
    """Load an ``AutoencoderKL`` (or ``AutoencoderKLFlux2``) from any of the places a user keeps one.

    Accepted ``path``:

    * a diffusers-format folder (``config.json`` + ``diffusion_pytorch_model.safetensors``,
      what ``save_pretrained`` and ``export_vae`` write); its ``_class_name`` picks the
      class (``VAE_CLASSES``);
    * a training output dir, or a diffusers pipeline folder, whose ``vae/`` is such a folder;
    * an original single-file checkpoint in the CompVis/Stable Diffusion key layout
      (``encoder.down.0.block.0.conv1.weight``, ...): ``.safetensors``, or a ``.ckpt`` /
      ``.pt`` / ``.pth`` read with ``torch.load(weights_only=True)``. A VAE-only file (as
      Stability's ``vae-ft-mse-840000-ema-pruned``) or a whole SD checkpoint (the VAE keys
      under ``first_stage_model.``) both work. The keys are converted by diffusers'
      single-file loader (``AutoencoderKL.from_single_file``) against a LOCAL config, so no
      hub access happens. A FLUX.2 file (BFL's ``ae.safetensors`` layout: the same keys plus
      ``encoder.quant_conv``, ``decoder.post_quant_conv`` and ``bn.running_mean`` /
      ``bn.running_var``) gives an ``AutoencoderKLFlux2`` (``_load_flux2_file``);
    * a Hugging Face Hub id (``stabilityai/sd-vae-ft-mse``, or ``owner/name/vae`` for a
      pipeline's VAE) that is not a local path: loaded through the HF cache, downloaded
      when online (``autoencoderkl.hub.load_vae_from_hub``; offline, the error says how to
      download it first). Nothing else is ever downloaded.

    The config of a single file comes from, in order: ``config``; the diffusers config that
    ``save_original_checkpoint`` stores in the file; or it is inferred from the tensor
    shapes (block widths, layers per block, latent channels, mid-block attention), with
    LDM's ``GroupNorm(32)`` and diffusers' default ``scaling_factor`` for original LDM
    checkpoints (0.18215, SD 1.x/2.x; SDXL's VAE uses 0.13025) -- a warning says so;
    measure the right one with ``lat eval-vae --latent-stats``.

    Args:
        path: one of the above.
        config: only for a single file: a diffusers folder holding ``config.json``, or a
            ``config.json`` file, describing the model (e.g. SDXL's ``vae/config.json``).
    Returns:
        The model in eval mode, float32 (an fp16 file is upcast), on the CPU.
    Raises:
        FileNotFoundError: if ``path`` does not exist, or is a folder with neither
            ``config.json`` nor ``vae/config.json``.
        ValueError: if a file has another suffix, cannot be read (corrupt, or a ``.ckpt``
            holding pickled objects besides tensors), holds no VAE weights in the original
            layout, or misses weights the config needs; if a folder holds another class
            than ``VAE_CLASSES``.
    """
    root = Path(path)
    if is_hub_id(str(path)):
        vae = load_vae_from_hub(str(path))
        vae_type(vae)  # another class (a VQ model, a tiny VAE) is an error here, not later
        return vae
    if root.is_file():
        return _load_single_file(root, config)
    if root.is_dir():
        for candidate in (root, root / "vae"):
            if (candidate / "config.json").is_file():
                name = _read_config(candidate).get("_class_name", "AutoencoderKL")
                classes = {cls.__name__: cls for cls in VAE_CLASSES.values()}
                if name not in classes:
                    raise ValueError(f"{candidate / 'config.json'} describes a {name}; this toolkit loads "
                                     f"{' and '.join(classes)}")
                return classes[name].from_pretrained(candidate, local_files_only=True).eval()
    what = "is a folder without config.json or vae/config.json" if root.is_dir() else "does not exist"
    raise FileNotFoundError(
        f"no AutoencoderKL at {root} ({what}): expected a diffusers folder with config.json and "
        f"diffusion_pytorch_model.safetensors (AutoencoderKL.save_pretrained), a training output "
        f"dir or pipeline folder holding one as vae/, or a single-file checkpoint "
        f"({', '.join(SINGLE_FILE_SUFFIXES)})"
    )


# ---- single-file checkpoints in the original (CompVis / Stable Diffusion) layout --------

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
# Where save_original_checkpoint keeps the diffusers config: safetensors metadata, or a
# top-level string entry beside "state_dict" in a .ckpt. Other readers ignore it.
CONFIG_METADATA_KEY = "diffusers_config"
# Prefixes under which whole-model checkpoints keep the VAE (diffusers' LDM_VAE_KEYS).
ORIGINAL_VAE_PREFIXES = ("first_stage_model.", "vae.", "")
# Every parameter name of an original-layout VAE (what _diffusers_to_original_key must give).
ORIGINAL_KEY_RE = re.compile(
    r"^(encoder\.(conv_in|conv_out|norm_out|down\.\d+\.(block\.\d+|downsample))"
    r"|decoder\.(conv_in|conv_out|norm_out|up\.\d+\.(block\.\d+|upsample))"
    r"|(encoder|decoder)\.mid\.(block_[12]|attn_1\.(norm|q|k|v|proj_out))"
    r"|(post_)?quant_conv)\.(conv\.)?(norm1\.|norm2\.|conv1\.|conv2\.|nin_shortcut\.)?(weight|bias)$"
)
LDM_NORM_NUM_GROUPS = 32  # ldm.modules.diffusionmodules.model.Normalize: GroupNorm(32)
# (scaling_factor, shift_factor) of the VAEs without quant_conv that single files hold
# (diffusers' vae/config.json of each): the weights cannot tell them apart.
NO_QUANT_CONV_FACTORS = {"SD3": (1.5305, 0.0609), "FLUX.1": (0.3611, 0.1159)}


def _read_single_file(path: Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """(tensors by name, the diffusers config stored in the file or None)."""
    suffix = path.suffix.lower()
    if suffix not in SINGLE_FILE_SUFFIXES:
        raise ValueError(
            f"{path}: unknown checkpoint suffix {path.suffix!r}; a single-file VAE must end in "
            f"{', '.join(SINGLE_FILE_SUFFIXES)} (or pass its diffusers folder)"
        )
    stored = None
    try:
        if suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                stored = (f.metadata() or {}).get(CONFIG_METADATA_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(obj, dict):
                raise ValueError(f"it holds a {type(obj).__name__}, not a dict of tensors")
            stored = obj.get(CONFIG_METADATA_KEY)
            while isinstance(obj.get("state_dict"), dict):  # Lightning: {"state_dict": {...}, ...}
                obj = obj["state_dict"]
            tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"cannot read {path} with torch.load(weights_only=True): it holds pickled objects "
            f"besides tensors, which we do not unpickle ({str(exc).splitlines()[0]}). Convert it "
            f"to .safetensors on a machine you trust."
        ) from None
    except (OSError, RuntimeError, ValueError, SafetensorError, EOFError) as exc:
        raise ValueError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    return tensors, (json.loads(stored) if isinstance(stored, str) else None)


def _original_vae_prefix(keys: set[str]) -> str | None:
    """The prefix under which ``keys`` hold an original-layout VAE, else None."""
    for prefix in ORIGINAL_VAE_PREFIXES:
        if f"{prefix}encoder.down.0.block.0.conv1.weight" in keys and f"{prefix}decoder.conv_out.weight" in keys:
            return prefix
    return None


def infer_original_config(state_dict: dict[str, Tensor]) -> dict[str, Any]:
    """A diffusers ``AutoencoderKL`` config from the tensor shapes of an original-layout VAE.

    What the weights cannot tell is filled with LDM's values: ``norm_num_groups`` 32 (its
    ``Normalize`` is ``GroupNorm(32)``) and diffusers' ``LDM_VAE_DEFAULT_SCALING_FACTOR``.
    A VAE without ``quant_conv`` / ``post_quant_conv`` (the SD3 and FLUX.1 layout: 16
    latent channels, the encoder's ``conv_out`` gives the moments) gets ``scaling_factor``
    1.0 and no ``shift_factor`` instead: those two models share the architecture but not
    the factors (``NO_QUANT_CONV_FACTORS``), so none is guessed.

    Args:
        state_dict: original-layout VAE tensors without prefix (``encoder.down.0...``).
    Returns:
        A config dict for ``AutoencoderKL.from_config``.
    Raises:
        ValueError: if a block width is not divisible by 32 (then only an explicit config
            can say what GroupNorm it used).
    """
    levels = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down\.(\d+)\.block\.0\.conv1\.weight$", k))})
    block_out_channels = [int(state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in levels]
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    moments = state_dict.get("quant_conv.weight", state_dict["encoder.conv_out.weight"])  # (2c, 2c or C, 1|3, 1|3)
    bad = [c for c in block_out_channels if c % LDM_NORM_NUM_GROUPS]
    if bad:
        raise ValueError(
            f"block widths {block_out_channels} are not all divisible by LDM's GroupNorm({LDM_NORM_NUM_GROUPS}), "
            f"so the checkpoint's norm_num_groups cannot be inferred; pass its diffusers config "
            f"(load_vae(path, config=...), lat eval-vae --vae-config)"
        )
    n = len(block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": int(state_dict["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(state_dict["decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": block_out_channels,
        "layers_per_block": len(layers),
        "latent_channels": int(moments.shape[0]) // 2,
        "norm_num_groups": LDM_NORM_NUM_GROUPS,
        "sample_size": 512,  # only sets the tile size of enable_tiling()
        "scaling_factor": LDM_VAE_DEFAULT_SCALING_FACTOR if "quant_conv.weight" in state_dict else 1.0,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in state_dict,
        "use_quant_conv": "quant_conv.weight" in state_dict,
        "use_post_quant_conv": "post_quant_conv.weight" in state_dict,
    }


def _read_config(config: str | os.PathLike) -> dict[str, Any]:
    p = Path(config)
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(f"VAE config {config}: expected a config.json file or a folder holding one")
    return json.loads(file.read_text())


def _load_single_file(path: Path, config: str | os.PathLike | None) -> AutoencoderKL:
    """``load_vae`` for one file: read it ourselves, let diffusers convert the keys."""
    tensors, stored = _read_single_file(path)
    prefix = _original_vae_prefix(set(tensors))
    if prefix is None:
        if "encoder.down_blocks.0.resnets.0.conv1.weight" in tensors:
            hint = "its keys are in diffusers' layout: pass the folder that holds it and its config.json"
        else:
            hint = (f"no encoder.down.0.block.0.conv1.weight / decoder.conv_out.weight under any of the prefixes "
                    f"{list(ORIGINAL_VAE_PREFIXES)}")
        raise ValueError(f"{path} is not an original-layout (CompVis/SD) VAE checkpoint: {hint}")
    state_dict = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if "bn.running_mean" in state_dict:  # FLUX.2's layout
        cfg = _read_config(config) if config is not None else stored
        return _load_flux2_file(path, state_dict, cfg)
    if config is not None:
        cfg = _read_config(config)
    elif stored is not None:
        cfg = stored
    else:
        cfg = infer_original_config(state_dict)
        if cfg["use_quant_conv"]:
            factors = (f"took diffusers' default scaling_factor for LDM checkpoints, {cfg['scaling_factor']} "
                       f"(SD 1.x/2.x; SDXL's VAE uses 0.13025)")
        else:
            factors = ("found no quant_conv (the SD3 / FLUX.1 layout) and set scaling_factor 1.0 and no shift_factor: "
                       + ", ".join(f"{name} uses {s} and shift {m}" for name, (s, m) in NO_QUANT_CONV_FACTORS.items()))
        warnings.warn(
            f"{path} stores no diffusers config: inferred the architecture from its weights "
            f"({cfg['block_out_channels']}, {cfg['layers_per_block']} layers per block, "
            f"{cfg['latent_channels']} latent channels, GroupNorm(32)) and {factors}. Pass config=... "
            f"(--vae-config) or measure them with lat eval-vae --latent-stats.",
            UserWarning,
            stacklevel=3,
        )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **cfg}))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*low_cpu_mem_usage.*")
            vae = AutoencoderKL.from_single_file(state_dict, config=tmp, local_files_only=True)
    missing = [name for name, p in vae.state_dict().items() if p.is_meta]
    if missing:
        raise ValueError(
            f"{path} lacks {len(missing)} weight(s) that its config needs, e.g. {missing[:3]}; "
            f"is the config right for this checkpoint?"
        )
    if any(p.dtype != torch.float32 for p in vae.parameters()):  # an fp16/bf16 file
        vae = vae.to(torch.float32)
    return vae.eval()


# BFL's FLUX.2 autoencoder (black-forest-labs/flux2 src/flux2/autoencoder.py) keeps the 1x1
# quant convs inside its Encoder / Decoder and the latent BatchNorm at the top level;
# diffusers' AutoencoderKLFlux2 names them as AutoencoderKL does. (diffusers name, BFL name).
FLUX2_RENAMES = (("quant_conv.", "encoder.quant_conv."), ("post_quant_conv.", "decoder.post_quant_conv."))
FLUX2_KEY_RE = re.compile(r"^((encoder\.quant_conv|decoder\.post_quant_conv)\.(weight|bias)|bn\.running_(mean|var))$")
FLUX2_BN_EPS = 1e-4  # BFL's AutoEncoder.bn_eps (= diffusers' default batch_norm_eps)
FLUX2_BN_MOMENTUM = 0.1  # BFL's AutoEncoder.bn_momentum


def infer_flux2_config(state_dict: dict[str, Tensor]) -> dict[str, Any]:
    """An ``AutoencoderKLFlux2`` config from the tensor shapes of a FLUX.2 single file.

    The encoder/decoder are LDM's (``infer_original_config`` reads them, after the quant
    convs are renamed to diffusers' places); the patch comes from the batch norm's width,
    ``bn.running_mean`` having ``latent_channels * p * p`` entries; eps and momentum are
    BFL's constants (a file does not store them).

    Args:
        state_dict: FLUX.2-layout tensors without prefix, quant convs already renamed
            (``quant_conv.*``, ``post_quant_conv.*``).
    Raises:
        ValueError: if the batch norm's width is not latent_channels times a square.
    """
    cfg = infer_original_config(state_dict)
    del cfg["scaling_factor"]
    width, c = int(state_dict["bn.running_mean"].numel()), cfg["latent_channels"]
    p = int(round((width / c) ** 0.5))
    if p * p * c != width:
        raise ValueError(f"bn.running_mean has {width} entries, not latent_channels ({c}) x a square patch")
    return {**cfg, "_class_name": "AutoencoderKLFlux2", "patch_size": [p, p], "sample_size": 1024,
            "batch_norm_eps": FLUX2_BN_EPS, "batch_norm_momentum": FLUX2_BN_MOMENTUM}


def _load_flux2_file(path: Path, state_dict: dict[str, Tensor], cfg: dict[str, Any] | None) -> AutoencoderKLFlux2:
    """``load_vae`` for a FLUX.2 single file: rename BFL's keys, convert the LDM rest with diffusers.

    Args:
        path: the file (for messages).
        state_dict: its tensors without prefix, BFL names.
        cfg: a diffusers config (given, or stored by ``save_original_checkpoint``), or None
            to infer it (``infer_flux2_config``; nothing is guessed that changes the outputs:
            BFL's GroupNorm(32), eps and momentum are constants of its code).
    Raises:
        ValueError: if the file lacks weights the config needs or holds ones it does not.
    """
    renamed = {}
    for key, tensor in state_dict.items():
        for ours, theirs in FLUX2_RENAMES:
            if key.startswith(theirs):
                key = ours + key[len(theirs):]
        renamed[key] = tensor
    if cfg is None:
        cfg = infer_flux2_config(renamed)
    converted = convert_ldm_vae_checkpoint({k: v for k, v in renamed.items() if not k.startswith("bn.")}, cfg)
    converted.update({k: v for k, v in renamed.items() if k.startswith("bn.")})
    with torch.random.fork_rng(devices=[]):  # the random init that load_state_dict overwrites draws no run RNG
        vae = AutoencoderKLFlux2.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    missing, unexpected = vae.load_state_dict(converted, strict=False)
    missing = [k for k in missing if k != "bn.num_batches_tracked"]  # BFL's file has none; it counts nothing we use
    if missing or unexpected:
        raise ValueError(f"{path} does not fit its FLUX.2 config: lacks {missing[:3]} ({len(missing)}), "
                         f"has unexpected {unexpected[:3]} ({len(unexpected)}); is the config right for this file?")
    return vae.to(torch.float32).eval()


def _diffusers_to_original_key(key: str, num_levels: int) -> str:
    """One diffusers ``AutoencoderKL`` parameter name -> its CompVis/SD name.

    The inverse of ``diffusers.loaders.single_file_utils.convert_ldm_vae_checkpoint``.
    """
    rules = (
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
    )
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)$", key)
    if m:  # diffusers counts up blocks from the lowest resolution, LDM from the highest
        level = num_levels - 1 - int(m.group(1))
        inner = f"block.{m.group(3)}" if m.group(3) is not None else "upsample"
        key = f"decoder.up.{level}.{inner}.{m.group(4)}"
    m = re.match(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)$", key)
    if m:
        key = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3)}"
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    key = key.replace(".conv_shortcut.", ".nin_shortcut.")
    if ".mid.attn_1." in key:
        for new, old in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")):
            key = key.replace(f".attn_1.{new}", f".attn_1.{old}")
    return key


def original_state_dict(vae: AutoencoderKL, prefix: str = "") -> dict[str, Tensor]:
    """The VAE's weights under CompVis/Stable Diffusion names (the reverse of diffusers' conversion).

    Attention projections become 1x1 convolutions, (C, C) -> (C, C, 1, 1), as LDM's
    ``AttnBlock`` holds them; every other tensor is shared unchanged. An
    ``AutoencoderKLFlux2`` gets BFL's FLUX.2 names (``FLUX2_RENAMES``: the quant convs under
    ``encoder.`` / ``decoder.``; ``bn.running_mean`` / ``bn.running_var``; its
    ``num_batches_tracked`` counter is left out, as BFL's files do).

    Args:
        vae: any ``AutoencoderKL`` or ``AutoencoderKLFlux2`` built from
            ``DownEncoderBlock2D``/``UpDecoderBlock2D``.
        prefix: put before every key, e.g. ``"first_stage_model."`` as in a whole SD checkpoint.
    Returns:
        name -> tensor (contiguous, on the CPU, in the model's dtype).
    Raises:
        ValueError: if a parameter has no counterpart in the original layout.
    """
    num_levels = len(vae.config.block_out_channels)
    flux2 = isinstance(vae, AutoencoderKLFlux2)
    out: dict[str, Tensor] = {}
    for name, tensor in vae.state_dict().items():
        if flux2 and name == "bn.num_batches_tracked":
            continue
        key = _diffusers_to_original_key(name, num_levels)
        for ours, theirs in FLUX2_RENAMES if flux2 else ():
            if key.startswith(ours):
                key = theirs + key[len(ours):]
        if not (ORIGINAL_KEY_RE.match(key) or (flux2 and FLUX2_KEY_RE.match(key))):
            raise ValueError(f"parameter {name} has no counterpart in the original VAE layout (got {key})")
        if re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", key) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[prefix + key] = tensor.detach().cpu().contiguous()
    return out


def save_original_checkpoint(vae: AutoencoderKL, path: str | os.PathLike, prefix: str = "") -> Path:
    """Write the VAE as one file in the original CompVis/Stable Diffusion key layout.

    The format of Stability's ``vae-ft-mse-840000-ema-pruned.safetensors``: what A1111,
    ComfyUI and CompVis code load as a VAE, and what ``load_vae`` (diffusers'
    ``from_single_file``) reads back to bit-identical weights. The diffusers config is stored
    alongside (safetensors metadata / a string entry of the ``.ckpt`` dict) under
    ``CONFIG_METADATA_KEY``, so ``scaling_factor`` and ``norm_num_groups`` survive the trip;
    other readers ignore it. Written to a temporary name and renamed into place.

    Args:
        vae: the model to write.
        path: ``*.safetensors`` (preferred), or ``*.ckpt`` / ``*.pt`` / ``*.pth``: a
            ``torch.save`` of ``{"state_dict": ..., "diffusers_config": str}`` that loads with
            ``weights_only=True``, for tools that only read ``.ckpt``.
        prefix: key prefix, e.g. ``"first_stage_model."``; none for a VAE-only file.
    Returns:
        ``path`` as a Path.
    Raises:
        ValueError: on another suffix, or a parameter without an original counterpart.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SINGLE_FILE_SUFFIXES:
        raise ValueError(f"{path}: a single-file checkpoint must end in {', '.join(SINGLE_FILE_SUFFIXES)}")
    tensors = original_state_dict(vae, prefix)
    config = {k: v for k, v in json.loads(vae.to_json_string()).items() if not k.startswith("_")}
    config_json = json.dumps(config, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if suffix == ".safetensors":
            save_file(tensors, str(tmp), metadata={"format": "pt", CONFIG_METADATA_KEY: config_json})
        else:
            torch.save({"state_dict": tensors, CONFIG_METADATA_KEY: config_json}, tmp)
    return path


def vae_weights_sha256(vae: nn.Module) -> str:
    """SHA-256 of a VAE's weights, independent of the file format they came from.

    Hashes, for every entry of ``vae.state_dict()`` in sorted key order, the key, the dtype,
    the shape and the raw bytes (little-endian, C order). A diffusers folder and an original
    single file of the same weights give the same hash once loaded (``load_vae`` gives
    float32); any changed weight, an fp16 copy, or another architecture gives another.
    Evaluation reports and latent caches both record it, so they can be matched to one model.

    Returns:
        64 lowercase hex digits.
    """
    digest = hashlib.sha256()
    state = vae.state_dict()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def freeze_encoder(vae: AutoencoderKL) -> None:
    """Freeze the encoder and ``quant_conv`` so only the decoder trains.

    The latent space (what stage 2 and any cache depend on) is kept exactly, as in
    diffusers' VAE fine-tuning example and Stability's sd-vae-ft-* releases. An
    ``AutoencoderKLFlux2``'s batch-norm statistics are part of that latent space: with
    the encoder frozen, ``AutoencoderWithPosterior`` no longer updates them.
    """
    for module in (vae.encoder, vae.quant_conv):
        if module is not None:
            module.requires_grad_(False)


class AutoencoderWithPosterior(nn.Module):
    """One forward: images -> (reconstructions, posterior moments), for DDP and the loss.

    ``accelerator.prepare`` wraps *this* module, so encode and decode both run inside
    DDP's forward and their gradients are all-reduced. (diffusers' research VAE example
    calls the unwrapped model and trains each GPU alone.) The alignment loss's learned
    projection (``autoencoderkl.alignment``) lives here too, for the same reason, and is
    checkpointed with the model.

    A VAE with a latent batch norm (``AutoencoderKLFlux2.bn``) has its running statistics
    updated in every training-mode forward while its encoder trains: the detached
    posterior sample, patchified, passes through ``bn`` (BatchNorm2d's momentum update; the
    output is unused). Under DDP the buffers are broadcast from rank 0 at each forward, so
    rank 0's batches set them.

    Args:
        vae: the ``AutoencoderKL`` / ``AutoencoderKLFlux2``.
        projection: the alignment's ``nn.Conv2d(c, D, 1)`` from latents to teacher
            features, or None (alignment off).
    """

    def __init__(self, vae: AutoencoderKL, projection: nn.Module | None = None):
        super().__init__()
        self.vae = vae
        if projection is not None:  # (absent, not None: the state dict is unchanged when off)
            self.projection = projection

    def forward(
        self, images: Tensor, sample_posterior: bool = True, latent_transform: Callable[[Tensor], Tensor] | None = None
    ) -> tuple[Tensor, ...]:
        """Encode, draw z from the posterior, decode it (or a transformed z), project z.

        Args:
            images: (B, 3, H, W) float in [-1, 1]; H and W divisible by f.
            sample_posterior: z ~ N(mean, std^2) (training) or z = mean.
            latent_transform: tau of EQ-VAE's equivariance step
                (``autoencoderkl.equivariance.EquivarianceStep``), or None. Given, the
                decoder reconstructs tau(z) instead of z (EQ-VAE's ``forward``), inside
                this forward, so under DDP its gradients are all-reduced as usual.
        Returns:
            reconstructions: (B, 3, H, W) decode(z), or decode(tau(z)) (B, 3, H', W')
                with tau's output grid times f; unclamped, in the autocast dtype.
            moments: (B, 2c, H/f, W/f) posterior mean and logvar (of the untransformed
                images) concatenated on the channel axis;
                ``DiagonalGaussianDistribution(moments)`` rebuilds it.
            projected latents: last, only with a ``projection``: projection(z) of the
                untransformed z, (B, D, h, w), with its graph through the encoder.
        """
        encoder_frozen = not any(p.requires_grad for p in self.vae.encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not encoder_frozen):
            posterior = self.vae.encode(images).latent_dist
        z = posterior.sample() if sample_posterior else posterior.mode()
        bn = latent_batch_norm(self.vae)
        if bn is not None and self.training and not encoder_frozen:
            with torch.no_grad():
                bn.train()(patchify_latents(z.detach().float(), tuple(self.vae.config.patch_size)))
        decoded = z if latent_transform is None else latent_transform(z)
        outputs = [self.vae.decode(decoded).sample, posterior.parameters]
        if hasattr(self, "projection"):
            outputs.append(self.projection(z))
        return tuple(outputs)


@torch.no_grad()
def estimate_latent_factors(vae: AutoencoderKL, images: Tensor, batch_size: int = 16) -> tuple[float, float]:
    """``scaling_factor`` = 1 / std and ``shift_factor`` = mean of posterior samples z.

    Rombach et al. 2022, sec. 4.3.2 (the scale; SD 1.x's 0.18215); SD3 and FLUX also
    centre the latents, ``latents = (z - shift_factor) * scaling_factor`` (Esser et al.
    2024), with the same std (it is taken about the mean either way).

    Args:
        images: (N, 3, H, W) float in [-1, 1], on the VAE's device.
    Returns:
        ``(scaling_factor, shift_factor)``: give the latents unit variance (and zero mean).
        A small image set gives rough values; the latent cache re-measures both over the
        whole dataset.
    """
    z = torch.cat([vae.encode(images[i : i + batch_size]).latent_dist.sample() for i in range(0, len(images), batch_size)])
    return float(1.0 / z.float().std()), float(z.float().mean())


def latent_normalization(vae: nn.Module) -> str:
    """One line saying how this VAE's latents are normalised for diffusion (logs, model card)."""
    c, bn = vae.config, latent_batch_norm(vae)
    if bn is not None:
        return (f"batch-norm running statistics of the {tuple(c.patch_size)}-patchified latents "
                f"({bn.num_features} channels, mean abs running_mean {bn.running_mean.abs().mean():.4g}, "
                f"mean running_var {bn.running_var.mean():.4g}, {int(bn.num_batches_tracked)} updates): "
                f"latents = (patchify(z) - running_mean) / sqrt(running_var + {c.batch_norm_eps:g})")
    shift = f", `shift_factor` {c.shift_factor:.6g}" if c.shift_factor else ""
    return f"`scaling_factor` {c.scaling_factor:.6g}{shift}: SD-style latents are `(z - shift_factor) * scaling_factor`"


def latent_batch_norm(vae: nn.Module) -> nn.BatchNorm2d | None:
    """The VAE's latent batch norm (``AutoencoderKLFlux2.bn``), or None for a ``scaling_factor`` VAE.

    Where it exists, its running statistics are the latent normalisation: nothing is
    measured at export on top of them.
    """
    bn = getattr(vae, "bn", None)
    return bn if isinstance(bn, nn.BatchNorm2d) else None


def export_vae(vae: AutoencoderKL, out_dir: str | os.PathLike, card: dict[str, Any] | None = None) -> Path:
    """``save_pretrained`` in safetensors (+ a model card) into ``out_dir``, atomically.

    Writes a hidden temporary folder and renames it into place
    (``autoencoderkl.atomic.atomic_dir``), so a reader never sees a half-written folder;
    an existing ``out_dir`` is replaced.

    Args:
        card: keyword arguments of ``write_vae_card`` (without folder and vae); None
            writes no card.
    Returns:
        ``out_dir`` as a Path, loadable with ``AutoencoderKL.from_pretrained``.
    """
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        if card is not None:
            write_vae_card(tmp, vae, **card)
    return out


def write_vae_card(folder: str | os.PathLike, vae: AutoencoderKL, steps: int, data: str, val: dict[str, float] | None,
                   config: dict[str, Any]) -> Path:
    """The VAE's ``README.md``: Hub metadata, shape, training recipe, measured figures, how to load.

    Args:
        folder: the exported folder.
        vae: the exported model.
        steps: optimizer steps trained.
        data: what it was trained on (a folder, ``demo``, a dataset name).
        val: the last validation metrics (``val/psnr`` dB, ``val/ssim``), or None.
        config: the run's resolved config as a plain dict.
    """
    c = vae.config
    cls = type(vae).__name__
    f = 2 ** (len(c.block_out_channels) - 1)
    n_params = sum(p.numel() for p in vae.parameters()) / 1e6
    loss = config["loss"]
    figures = (f"{val['val/psnr']:.2f} dB PSNR, SSIM {val['val/ssim']:.3f} (8-bit, posterior mode, "
               f"{config['data']['resolution']} px crops of held-out images)") if val else "not measured"
    aligned = (f"\nIts latents were aligned to `{loss['alignment_teacher']}` (VA-VAE's loss, weight "
               f"{loss['alignment_weight']:g}).") if loss.get("alignment_weight") else ""
    body = f"""A {n_params:.1f}M-parameter `{cls}` (diffusers): {f}x spatial downsampling, {c.latent_channels}
latent channels (block widths {list(c.block_out_channels)}), trained with latent-autoencoders for {steps}
optimizer steps on `{data}` with LDM's recipe: {loss['pixel_loss'].upper()} + {loss['perceptual_weight']:g} x LPIPS,
KL x {loss['kl_weight']:g}, PatchGAN (hinge, adaptive weight x {loss['disc_weight']:g}) from step {loss['disc_start']}.{aligned}

| | |
|---|---|
| validation | {figures} |
| latent scale | {latent_normalization(vae)} |
| resolution | trained on {config['data']['resolution']} px crops |

## Use

```python
from diffusers import {cls}

vae = {cls}.from_pretrained("THIS_FOLDER_OR_REPO")
z = vae.encode(images).latent_dist.sample()       # images: (B, 3, H, W) in [-1, 1]
reconstructions = vae.decode(z).sample
```

Measure it on your held-out images with `lat eval-vae --vae THIS_FOLDER --data FOLDER`.
"""
    return write_model_card(folder, cls, body, tags=["diffusers", "autoencoder", "vae", "latent-diffusion"],
                            metrics={"psnr": val["val/psnr"], "ssim": val["val/ssim"]} if val else None,
                            datasets=[data] if data and "/" not in data else None)
