"""Calibration and evaluation data as users have it: tensors, dicts of tensors, batches, ``datasets`` splits."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import CalibrationDataError


LABEL_COLUMNS = ("label", "labels", "y", "target", "targets")
MIN_SAMPLES = 4


@dataclass
class CalibrationData:
    """Calibration batches plus where they came from (recorded in ``fusion_config.json``)."""

    batches: list[Any]
    num_samples: int
    provenance: dict[str, Any] = field(default_factory=dict)


def _is_dataset(obj: Any) -> bool:
    return type(obj).__module__.startswith("datasets.") and hasattr(obj, "column_names")


def _num_rows(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        sizes = {v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor)}
        if len(sizes) != 1:
            raise CalibrationDataError(
                f"Every tensor in a dict batch must have the same first (batch) dimension, got sizes {sorted(sizes)}."
            )
        return sizes.pop()
    raise CalibrationDataError(
        f"Unsupported calibration batch of type {type(batch).__name__}. Pass a tensor, a dict of tensors (as a "
        "tokenizer returns), an iterable of such batches (or of (inputs, labels) pairs), or a datasets.Dataset."
    )


def _take(batch: Any, index: torch.Tensor | slice) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[index]
    return {k: v[index] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _inputs_of(item: Any) -> Any:
    """An (inputs, labels) pair from a DataLoader gives its inputs."""
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], (torch.Tensor, Mapping)):
        return item[0]
    return item


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        return torch.stack(list(value))
    return torch.as_tensor(value)


def _dataset_batch(dataset: Any, input_columns: Iterable[str] | None, exclude: Iterable[str] = LABEL_COLUMNS) -> Any:
    """All rows of a ``datasets`` split as model inputs: its own format/transform if set, else torch format."""
    formatted = dataset if dataset.format["type"] is not None else dataset.with_format("torch")
    rows = formatted[:]
    if input_columns is not None:
        names = list(input_columns)
        missing = [c for c in names if c not in rows]
        if missing:
            raise CalibrationDataError(f"Columns {missing} not in the dataset; it has {sorted(rows)}.")
    else:
        names = [c for c in rows if c not in set(exclude)]
        if not names:
            raise CalibrationDataError(
                f"The dataset has no input column (columns: {sorted(rows)}). Name them with `input_columns`."
            )
    tensors = {c: _as_tensor(rows[c]) for c in names}
    return tensors[names[0]] if len(names) == 1 else tensors


def prepare_calibration(
    data: Any, *, num_samples: int, batch_size: int, seed: int, input_columns: Iterable[str] | None = None
) -> CalibrationData:
    """Select ``num_samples`` samples and cut them into batches.

    A tensor, dict or ``datasets.Dataset`` with more rows than ``num_samples`` gives a seeded random subset
    (the indices are recorded); an iterable of batches gives its first ``num_samples`` samples, in order.
    """
    if data is None:
        raise CalibrationDataError(
            "No calibration data was given. Pass a tensor, a dict of tensors, batches or a dataset."
        )
    provenance: dict[str, Any] = {"seed": seed}
    if _is_dataset(data):
        total = len(data)
        provenance.update(source="datasets.Dataset", fingerprint=getattr(data, "_fingerprint", None), total=total)
        indices = _subset(total, num_samples, seed)
        provenance["indices"] = indices
        full = _dataset_batch(data.select(indices), input_columns) if total else None
    elif isinstance(data, (torch.Tensor, Mapping)):
        total = _num_rows(data)
        provenance.update(source=type(data).__name__, total=total)
        indices = _subset(total, num_samples, seed)
        provenance["indices"] = indices
        full = _take(data, torch.as_tensor(indices, dtype=torch.long)) if total else None
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        provenance.update(source="iterable", indices=None)
        parts, count = [], 0
        for item in data:
            batch = _inputs_of(item)
            rows = _num_rows(batch)
            if rows == 0:
                continue
            take = min(rows, num_samples - count)
            parts.append(_take(batch, slice(0, take)))
            count += take
            if count >= num_samples:
                break
        provenance["total"] = None
        full = _concat(parts) if parts else None
    else:
        raise CalibrationDataError(
            f"Unsupported calibration data of type {type(data).__name__}. Pass a tensor, a dict of tensors, an "
            "iterable of batches, or a datasets.Dataset formatted as torch."
        )
    used = 0 if full is None else _num_rows(full)
    if used < MIN_SAMPLES:
        raise CalibrationDataError(
            f"Too few calibration samples: got {used}, need at least {MIN_SAMPLES} (the paper uses 200). "
            "Pass more data or check that the dataset/iterable is not empty."
        )
    provenance["num_samples"] = used
    batches = [_take(full, slice(start, start + batch_size)) for start in range(0, used, batch_size)]
    if len(batches) > 1 and _num_rows(batches[-1]) < MIN_SAMPLES:  # keep minibatch statistics well defined
        last = batches.pop()
        batches[-1] = _concat([batches[-1], last])
    return CalibrationData(batches, used, provenance)


def _subset(total: int, num_samples: int, seed: int) -> list[int]:
    if total <= num_samples:
        return list(range(total))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(total, generator=generator)[:num_samples].tolist())


def _concat(parts: list[Any]) -> Any:
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return {
        k: torch.cat([p[k] for p in parts]) if isinstance(parts[0][k], torch.Tensor) else parts[0][k] for k in parts[0]
    }


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def labelled_batches(
    data: Any, *, batch_size: int = 256, label_column: str | None = None
) -> list[tuple[Any, torch.Tensor]]:
    """Evaluation data as a list of ``(inputs, labels)`` batches.

    Accepts an ``(inputs, labels)`` pair of tensors, an iterable of such pairs (a DataLoader), or a
    ``datasets.Dataset`` with a label column.
    """
    if _is_dataset(data):
        label = label_column or next((c for c in LABEL_COLUMNS if c in data.column_names), None)
        if label is None or label not in data.column_names:
            raise CalibrationDataError(
                f"The dataset has no label column (columns: {data.column_names}). Pass `label_column=`."
            )
        if len(data) == 0:
            raise CalibrationDataError("The evaluation dataset is empty.")
        inputs = _dataset_batch(data, None, exclude=(label, *LABEL_COLUMNS))
        labels = _as_tensor(data.select_columns([label]).with_format("torch")[:][label])
        data = (inputs, labels)
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[1], torch.Tensor)
        and not isinstance(data[0], (tuple, list))
    ):
        inputs, labels = data
        total = _num_rows(inputs)
        if total == 0:
            raise CalibrationDataError("The evaluation data is empty.")
        if labels.shape[0] != total:
            raise CalibrationDataError(f"{total} inputs but {labels.shape[0]} labels.")
        return [
            (_take(inputs, slice(s, s + batch_size)), labels[s : s + batch_size]) for s in range(0, total, batch_size)
        ]
    if isinstance(data, Iterable):
        out = []
        for item in data:
            if isinstance(item, Mapping) and label_column:
                item = ({k: v for k, v in item.items() if k != label_column}, item[label_column])
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise CalibrationDataError(
                    f"Evaluation batches must be (inputs, labels) pairs, got {type(item).__name__}."
                )
            out.append((item[0], torch.as_tensor(item[1])))
        if not out:
            raise CalibrationDataError("The evaluation data is empty.")
        return out
    raise CalibrationDataError(
        f"Unsupported evaluation data of type {type(data).__name__}. Pass (inputs, labels), a DataLoader of pairs, "
        "or a datasets.Dataset with a label column."
    )
