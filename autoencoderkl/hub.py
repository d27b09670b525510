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
import warnings
from pathlib import Path
from typing import Any, Union

PathLike = Union[str, os.PathLike]

# owner/name, optionally /subfolder (e.g. stabilityai/stable-diffusion-2-1/vae).
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)*$")


def is_hub_id(text: str) -> bool:
    """True if ``text`` reads as a Hub repository id and not as a local path.

    ``owner/name`` (optionally ``/subfolder``) that does not exist here. A path whose
    first part is a folder here (``runs/nosuch`` beside an existing ``runs/``) is a local
    path with a typo, not a Hub id: it never reaches the network.
    """
    text = str(text)
    if not HUB_ID_RE.match(text) or Path(text).exists():
        return False
    return not Path(text.split("/")[0]).is_dir()


def _offline_reason() -> str | None:
    """Why the Hub cannot be reached from here, found at once; None when it may be reachable.

    ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set, or the Hub endpoint's host not
    resolving or refusing a TCP connection within 5 s. A machine that reaches the Hub only
    through a proxy (``HTTPS_PROXY``, ``ALL_PROXY``) is not probed: the download decides.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except socket.gaierror as exc:
        return f"{host} does not resolve ({exc.strerror or exc})"
    except OSError as exc:
        return f"{host}:{port} cannot be reached ({exc.strerror or exc})"
    return None


def load_vae_from_hub(repo_id: str) -> Any:
    """``diffusers.AutoModel.from_pretrained`` of a Hub id: from the HF cache, else downloaded once into it.

    ``owner/name`` is tried at the repository's root, then in its ``vae/`` subfolder (a
    whole diffusers pipeline); ``owner/name/sub`` names the subfolder. The HF cache is
    read first; only when it does not hold the model is the Hub asked, and only after a
    quick check that it can be reached (``_offline_reason``): offline, this fails at once
    instead of after huggingface_hub's retries.

    Args:
        repo_id: ``owner/name`` or ``owner/name/subfolder``.
    Returns:
        The model its ``config.json`` names (``AutoencoderKL``, ``AutoencoderKLFlux2``) in
        eval mode, float32, on the CPU.
    Raises:
        FileNotFoundError: when it cannot be had: the message says whether the machine is
            offline (``HF_HUB_OFFLINE``, or the Hub's host unreachable) and how to download
            it first.
    """
    from diffusers import AutoModel

    parts = repo_id.split("/")
    repo, subfolders = "/".join(parts[:2]), (["/".join(parts[2:])] if len(parts) > 2 else [None, "vae"])
    for subfolder in subfolders:  # the HF cache first: no network
        try:
            with warnings.catch_warnings():  # huggingface_hub's deprecation notice for an argument diffusers passes
                warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*", category=UserWarning)
                return AutoModel.from_pretrained(repo, subfolder=subfolder, local_files_only=True).eval()
        except (OSError, ValueError):
            pass
    download = (f"Download it first on a machine with network: hf download {repo} --local-dir DIR, then pass DIR "
                f"(or set HF_HOME to a cache that holds it)")
    offline = _offline_reason()
    if offline is not None:
        raise FileNotFoundError(f"{repo_id} is not a local path and not in the Hugging Face cache, and this machine is "
                                f"offline ({offline}), so the Hub cannot be asked. If it is a local folder, check the path (it "
                                f"does not exist here); if it is a Hub model, {download[0].lower()}{download[1:]}")
    errors = []
    for subfolder in subfolders:
        try:
            return AutoModel.from_pretrained(repo, subfolder=subfolder).eval()
        except (OSError, ValueError) as exc:  # huggingface_hub's not-found/offline errors derive from these
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    raise FileNotFoundError(
        f"{repo_id} is not a local path, and as a Hugging Face Hub id it could not be loaded: it is not on the Hub "
        f"or not readable with your token ({errors[-1]}). If it is a local folder, check the path; if it is a Hub "
        f"model, check the name (and hf auth login for a private one). {download}"
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
        huggingface_hub errors: no token (``hf auth login`` / ``HF_TOKEN``), no
            network, or no write access, as huggingface_hub raises them.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                      commit_message=f"Upload {Path(folder).name} trained with latent-autoencoders")
    return str(url)
