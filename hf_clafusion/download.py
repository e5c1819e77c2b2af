"""Hub downloads that fail fast offline: the one place that fetches a model snapshot.

Used by the sharing layer (:mod:`hf_clafusion.hub`) for parents given as Hub ids, and by adapters whose family has
its own Hub reference (timm's ``hf-hub:``), so that both give the same error when the Hub cannot be reached.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from .errors import LoadError


#: Files fetched for a Hub model: configs, safetensors weights, the card, tokenizer / processor files.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.txt", "*.model", "*.tiktoken"]


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint (``HF_ENDPOINT``) accepts a TCP connection within ``timeout`` seconds."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def download_snapshot(repo_id: str, allow_patterns: list[str] | None = None) -> Path:
    """The local folder of a Hub model (only ``allow_patterns`` files, :data:`ALLOW_PATTERNS` by default),
    downloaded or from the local cache.

    With ``HF_HUB_OFFLINE`` set, or when the Hub cannot be reached within 3 seconds, only the local cache is
    looked in, so a missing model fails at once instead of after network timeouts.

    Raises:
        LoadError: ``repo_id`` is not a valid Hub id, or the model is neither downloadable nor in the cache.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise LoadError(
            f"{repo_id!r} is neither an existing folder nor a valid Hub id ('namespace/name'). Check the path."
        ) from None
    offline = os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE") or not hub_reachable()
    try:
        path = snapshot_download(repo_id, local_files_only=offline, allow_patterns=allow_patterns or ALLOW_PATTERNS)
    except Exception as error:  # huggingface_hub raises several types for the same situation
        where = "the local cache (the Hub is unreachable or HF_HUB_OFFLINE is set)" if offline else "the Hub"
        raise LoadError(
            f"Could not get {repo_id!r} from {where}: {type(error).__name__}; there is no local folder of that name "
            "either. Check the path, or download the model where the Hub is reachable and pass the local folder path "
            "instead."
        ) from error
    return Path(path)


__all__ = ["ALLOW_PATTERNS", "download_snapshot", "hub_reachable"]
