"""``fuse_pretrained``: load parents by Hub id, local folder or object, then :func:`~hf_clafusion.fuse` them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .adapters import find_loader
from .config import FusionConfig
from .errors import ClaFusionError
from .fusion import resolve_config, run_fusion
from .hub import download_snapshot, folder_license, load_pretrained
from .result import FusionResult


def resolve_parent(item: nn.Module | str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """One parent and what the card records about it: a model object (as is), a saved folder, or a Hub id."""
    if isinstance(item, nn.Module):
        return item, {}
    if not isinstance(item, (str, os.PathLike)):
        raise ClaFusionError(
            f"Cannot load a parent from a {type(item).__name__}; pass a model, a folder path or a Hub id."
        )
    meta: dict[str, Any] = {"name_or_path": str(item)}
    folder = Path(item).expanduser()
    if not folder.is_dir():
        loader = find_loader(str(item))  # family-specific names: "hf-hub:...", "local-dir:..."
        if loader is not None:
            return loader(), meta
        folder = download_snapshot(str(item))
        meta["revision"] = folder.name  # the snapshot folder is named by the commit hash
    meta["license"] = folder_license(folder)
    return load_pretrained(folder), meta


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
    return fuse_resolved(resolved, data, resolve_config(config, overrides), processor)


def fuse_resolved(
    resolved: list[tuple[nn.Module, dict[str, Any]]], data: Any, config: FusionConfig, processor: Any = None
) -> FusionResult:
    """:func:`fuse_pretrained` on parents already resolved by :func:`resolve_parent` (the CLI checks them between
    loading and fusing). The list is handed over and emptied: a parent loaded from a folder or the Hub is freed once
    prepared, not held beside its float32 copy."""
    metas = [meta for _, meta in resolved]
    parents = [model for model, _ in resolved]
    resolved.clear()
    result = run_fusion(parents, data, config, processor, release=True)
    for parent, meta in zip(result.parents, metas):
        parent.update(meta)
    return result


__all__ = ["fuse_pretrained", "fuse_resolved", "load_parent"]
