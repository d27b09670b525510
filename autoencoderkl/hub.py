"""The Hugging Face Hub: model cards for exports, ``--push-to-hub``, and Hub ids as inputs.

Everything here goes through ``huggingface_hub`` (``ModelCard``/``ModelCardData`` for the
card's YAML metadata, ``HfApi.create_repo``/``upload_folder`` for uploads,
``diffusers``' ``from_pretrained`` for downloads into the usual HF cache), so tokens,
endpoints (``HF_ENDPOINT``), offline mode (``HF_HUB_OFFLINE=1``) and caches behave as in
every other diffusers tool.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Union

PathLike = Union[str, os.PathLike]

# owner/name, optionally /subfolder (e.g. stabilityai/stable-diffusion-2-1/vae).
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)*$")


def is_hub_id(text: str) -> bool:
    """True if ``text`` reads as a Hub repository id and is not a local path."""
    return bool(HUB_ID_RE.match(str(text))) and not Path(text).exists()


def load_vae_from_hub(repo_id: str) -> Any:
    """``diffusers.AutoModel.from_pretrained`` of a Hub id (downloaded once into the HF cache).

    ``owner/name`` is tried at the repository's root, then in its ``vae/`` subfolder (a
    whole diffusers pipeline); ``owner/name/sub`` names the subfolder.

    Args:
        repo_id: ``owner/name`` or ``owner/name/subfolder``.
    Returns:
        The model its ``config.json`` names (``AutoencoderKL``, ``AutoencoderKLFlux2``) in
        eval mode, float32, on the CPU.
    Raises:
        FileNotFoundError: when it cannot be had: the message says whether the machine is
            offline (``HF_HUB_OFFLINE``, or no connection) and how to download it first.
    """
    from diffusers import AutoModel

    parts = repo_id.split("/")
    repo, subfolders = "/".join(parts[:2]), (["/".join(parts[2:])] if len(parts) > 2 else [None, "vae"])
    errors = []
    for subfolder in subfolders:
        try:
            return AutoModel.from_pretrained(repo, subfolder=subfolder).eval()
        except (OSError, ValueError) as exc:  # huggingface_hub's not-found/offline errors derive from these
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or any(
        "connect" in e.lower() or "offline" in e.lower() for e in errors)
    why = "this machine is offline" if offline else "it is not on the Hub or not readable with your token"
    raise FileNotFoundError(
        f"{repo_id} is not a local path, and as a Hugging Face Hub id it could not be loaded: {why} ({errors[-1]}). "
        f"Download it first on a machine with network: huggingface-cli download {repo} --local-dir DIR, "
        f"then pass DIR (or set HF_HOME to a cache that holds it)"
    )


def write_model_card(folder: PathLike, title: str, body: str, tags: list[str], metrics: dict[str, Any] | None = None,
                     datasets: list[str] | None = None, license: str = "apache-2.0") -> Path:
    """Write ``folder/README.md``: YAML metadata the Hub reads, then ``body`` (Markdown).

    Args:
        folder: an exported diffusers folder (``vae/`` or ``pipeline/``).
        title: the card's heading.
        body: Markdown: what the model is, how it was trained, how to load it.
        tags: Hub tags (``diffusers`` and the task are typical).
        metrics: measured figures, stored under ``model-index``-free ``metrics`` metadata
            (a flat name -> value map) and shown in the body by the caller.
        datasets: dataset names or paths the model was trained on.
        license: an SPDX-style Hub license id.
    Returns:
        The README.md path.
    """
    from huggingface_hub import ModelCard, ModelCardData

    from .atomic import write_atomic

    data = ModelCardData(library_name="diffusers", license=license, tags=tags,
                         datasets=[d for d in (datasets or []) if d], metrics=sorted(metrics) if metrics else None)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {title}\n\n{body.strip()}\n")
    return write_atomic(Path(folder) / "README.md", str(card))


def push_folder(folder: PathLike, repo_id: str, private: bool = False) -> str:
    """Upload an exported folder to a Hub model repository (created if missing).

    Args:
        folder: what to upload (``vae/`` or ``pipeline/``, card included).
        repo_id: ``owner/name``.
        private: create the repository as private.
    Returns:
        The repository's URL.
    Raises:
        huggingface_hub errors: no token (``huggingface-cli login`` / ``HF_TOKEN``), no
            network, or no write access, as huggingface_hub raises them.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                      commit_message=f"Upload {Path(folder).name} trained with latent-autoencoders")
    return str(url)
