"""``fuse_pretrained``: load parents by Hub id, local folder or object, then :func:`~hf_clafusion.fuse` them."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from torch import nn

from .config import FusionConfig
from .errors import ClaFusionError, SaveError
from .fusion import fuse
from .hub import load_pretrained
from .result import FusionResult


#: Files fetched for a Hub parent: configs, safetensors weights, the card, tokenizer / processor files.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.txt", "*.model", "*.tiktoken"]


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _load_folder(folder: Path) -> nn.Module:
    return load_pretrained(folder)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise SaveError(
            f"{repo_id!r} is neither an existing folder nor a valid Hub id ('namespace/name'). Check the path."
        ) from None
    offline = os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE") or not _hub_reachable()
    try:
        path = snapshot_download(repo_id, local_files_only=offline, allow_patterns=ALLOW_PATTERNS)
    except Exception as error:  # huggingface_hub raises several types for the same situation
        where = "the local cache (the Hub is unreachable or HF_HUB_OFFLINE is set)" if offline else "the Hub"
        raise ClaFusionError(
            f"Could not get {repo_id!r} from {where}: {type(error).__name__}. Download it where the Hub is reachable "
            "and pass the local folder path instead."
        ) from error
    return Path(path)


def _folder_license(folder: Path) -> str | None:
    card = folder / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(card).data.license
    except Exception:  # a README without card metadata
        return None


def resolve_parent(item: nn.Module | str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """One parent and what the card records about it: a model object (as is), a saved folder, or a Hub id."""
    if isinstance(item, nn.Module):
        return item, {}
    if not isinstance(item, (str, os.PathLike)):
        raise ClaFusionError(
            f"Cannot load a parent from a {type(item).__name__}; pass a model, a folder path or a Hub id."
        )
    from .adapters.base import _REGISTRY

    for cls in _REGISTRY.values():  # family-specific names: "hf-hub:...", "local-dir:..."
        model = cls.load_reference(str(item))
        if model is not None:
            return model, {"name_or_path": str(item)}
    folder = Path(item).expanduser()
    meta: dict[str, Any] = {"name_or_path": str(item)}
    if not folder.is_dir():
        folder = _download(str(item))
        meta["revision"] = folder.name  # the snapshot folder is named by the commit hash
    meta["license"] = _folder_license(folder)
    return _load_folder(folder), meta


def load_parent(item: nn.Module | str | os.PathLike) -> nn.Module:
    """One parent: a model object (returned as is), a folder saved by hf_clafusion, or a Hub id."""
    return resolve_parent(item)[0]


def fuse_pretrained(
    models_or_paths: Sequence[nn.Module | str | os.PathLike],
    data: Any,
    config: FusionConfig | None = None,
    *,
    processor: Any = None,
    **overrides: Any,
) -> FusionResult:
    """Load two or more parents and fuse them: the library's main entry point.

    Args:
        models_or_paths: for each parent, a loaded ``nn.Module``, a local folder saved by hf_clafusion
            (:meth:`FusionResult.save_pretrained` or :func:`~hf_clafusion.save_model`), or a Hub repo id. Without
            network access a Hub id is looked up in the local cache only and fails at once with a clear error.
        data: calibration data, as for :func:`~hf_clafusion.fuse`.
        config: a :class:`FusionConfig`; ``overrides`` replace some of its fields.
        processor: a tokenizer / image processor / transform for raw calibration data (as for
            :func:`~hf_clafusion.fuse`).

    Returns:
        `FusionResult`; its ``parents`` record each parent's path or id and content hash.

    Example:
        ```py
        from hf_clafusion import fuse_pretrained

        result = fuse_pretrained(["./mlp-deep", "./mlp-shallow"], data=x_calibration)
        result.save_pretrained("./mlp-fused")
        ```
    """
    resolved = [resolve_parent(item) for item in models_or_paths]
    result = fuse([model for model, _ in resolved], data, config, processor=processor, **overrides)
    for parent, (_, meta) in zip(result.parents, resolved):
        parent.update(meta)
    return result


__all__ = ["fuse_pretrained", "load_parent"]
