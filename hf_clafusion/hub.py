"""Saving and loading fused models: safetensors weights, the family's architecture file, ``fusion_config.json``.

Writes are atomic (a temporary sibling folder renamed into place), so an interrupted save never leaves a
half-written model at the target path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .adapters.base import adapter_class
from .errors import SaveError


if TYPE_CHECKING:
    from torch import nn

    from .result import FusionResult

FUSION_CONFIG_FILE = "fusion_config.json"
PLOT_FILE = "alignment.png"


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise SaveError(f"Cannot save into {str(target)!r}: it exists and is not a folder. Choose another path.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise SaveError(
            f"The folder {str(target)!r} already exists and is not empty. Pass overwrite=True to replace it, or "
            "choose another path."
        )


def atomic_directory_write(target: str | Path, write, *, overwrite: bool = False) -> Path:
    """Run ``write(tmp_dir)`` in a temporary sibling of ``target`` and rename it into place when it succeeds."""
    target = Path(target).expanduser().resolve()
    _check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def fusion_record(result: FusionResult) -> dict[str, Any]:
    """The content of ``fusion_config.json``."""
    return {
        "library": "hf_clafusion",
        "library_version": __version__,
        "adapter": result.adapter,
        "config": result.config.to_dict(),
        "anchor": result.anchor,
        "parents": result.parents,
        "layer_alignments": [
            {
                "model": p.model,
                "reference": p.reference,
                "deeper": p.deeper,
                "alignment": p.alignment,
                "costs": [c.tolist() for c in p.costs],
            }
            for p in result.pairs
        ],
        "calibration": result.calibration,
        "timings": result.timings,
        "bn_reset": result.bn_reset,
        "evaluation": result.evaluation,
    }


def save_fusion_result(result: FusionResult, save_directory: str | Path, *, overwrite: bool = False) -> Path:
    """Implementation of :meth:`FusionResult.save_pretrained`."""
    adapter = adapter_class(result.adapter)()

    def write(tmp: Path) -> None:
        adapter.save(result.model, tmp)
        (tmp / FUSION_CONFIG_FILE).write_text(json.dumps(fusion_record(result), indent=2) + "\n")
        result.plot_alignment(tmp / PLOT_FILE)

    return atomic_directory_write(save_directory, write, overwrite=overwrite)


def save_model(model: nn.Module, save_directory: str | Path, *, overwrite: bool = False) -> Path:
    """Save any supported model (a parent, a finetuned model) in its family's format, atomically."""
    from .adapters import get_adapter

    adapter = get_adapter(model)
    return atomic_directory_write(
        save_directory, lambda tmp: adapter.save(adapter.prepare(model), tmp), overwrite=overwrite
    )


def load_pretrained(path: str | Path) -> nn.Module:
    """Load a model saved by hf_clafusion (:meth:`FusionResult.save_pretrained` or :func:`save_model`).

    Raises:
        SaveError: the folder does not exist or was not written by hf_clafusion.
    """
    from .adapters.torch import ARCHITECTURE_FILE, SequentialAdapter

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise SaveError(f"No such folder: {str(path)!r}. Pass the directory written by save_pretrained().")
    name = None
    if (folder / FUSION_CONFIG_FILE).is_file():
        name = json.loads((folder / FUSION_CONFIG_FILE).read_text()).get("adapter")
    if name is None and (folder / ARCHITECTURE_FILE).is_file():
        name = SequentialAdapter.name
    if name is None:
        raise SaveError(
            f"{str(path)!r} holds neither {FUSION_CONFIG_FILE} nor {ARCHITECTURE_FILE}; it was not saved by hf_clafusion."
        )
    return adapter_class(name).load(folder)


__all__ = ["load_pretrained", "save_model"]
