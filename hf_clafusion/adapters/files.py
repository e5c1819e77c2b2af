"""Checks on weight files before a library reads them, so a damaged file gives a clear error.

Every load path reads ``*.safetensors`` files through its family's own loader (``safetensors.torch.load_file``,
``timm.create_model``, ``from_pretrained``), which reports a truncated file as a raw ``SafetensorError``.
:func:`check_safetensors` reads only the file's header and compares the sizes it declares with the file's size.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LoadError


def _damaged(path: Path, reason: str) -> LoadError:
    return LoadError(
        f"The weights file {str(path)!r} is damaged ({reason}): it was cut short or is not a safetensors file. "
        "Download it again, or save the model again."
    )


def check_safetensors(path: str | Path) -> None:
    """Raise :class:`LoadError` when a safetensors file is shorter than its header says, or has no valid header.

    Reads the 8-byte header length and the JSON header only (not the tensors).

    Raises:
        LoadError: the file is truncated, empty, or its header is not valid safetensors JSON.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise _damaged(path, f"{size} bytes, shorter than the 8-byte header length")
        header_size = int.from_bytes(head, "little")
        if header_size > size - 8:
            raise _damaged(path, f"its header needs {header_size:,} bytes but the file holds {size:,}")
        try:
            header = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, ValueError):
            raise _damaged(path, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _damaged(path, "its header is not a JSON object")
    ends = [
        entry["data_offsets"][1]
        for key, entry in header.items()
        if key != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2
    ]
    expected = 8 + header_size + max(ends, default=0)
    if size < expected:
        raise _damaged(path, f"{size:,} bytes where its header describes {expected:,}")


def check_weight_files(directory: str | Path) -> None:
    """:func:`check_safetensors` on every ``*.safetensors`` file of a folder."""
    for path in sorted(Path(directory).glob("*.safetensors")):
        check_safetensors(path)


__all__ = ["check_safetensors", "check_weight_files"]
