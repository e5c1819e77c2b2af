"""Data as users have it, turned into batches for fusion (inputs only), evaluation and finetuning (inputs + labels).

One module reads every accepted form (the table in ``docs/data.md``): a tensor, a dict of tensors, an ``(inputs,
labels)`` pair, an iterable (a DataLoader) of any of those, a ``datasets`` split; raw text and images go through the
adapter's :meth:`~hf_clafusion.adapters.base.Adapter.prepare_data` first. Every refusal is a :class:`DataError`
(a :class:`CalibrationDataError` for calibration data) naming the data ("calibration", "training",
"evaluation"), showing the value and saying how to fix it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import CalibrationDataError, DataError


#: Columns / dict keys read as labels (and never as model inputs) when no label column is named.
LABEL_COLUMNS = ("label", "labels", "y", "target", "targets")
#: The default label column of :class:`~hf_clafusion.FinetuneConfig`; when it is absent the other
#: :data:`LABEL_COLUMNS` are tried.
DEFAULT_LABEL_COLUMN = "label"
MIN_SAMPLES = 4
#: Token labels equal to this are not scored (padding, prompts): the convention of PyTorch's cross-entropy and of
#: ``transformers``' data collators.
IGNORE_INDEX = -100
DOCS = "See docs/data.md for the accepted forms."


def _error(what: str, message: str) -> DataError:
    """A CalibrationDataError for calibration data, a plain DataError for training/evaluation data."""
    return (CalibrationDataError if what == "calibration" else DataError)(message)


def _show(value: Any) -> str:
    """A short description of a value for error messages: type, and shape/dtype of tensors."""
    if isinstance(value, torch.Tensor):
        return f"Tensor of shape {tuple(value.shape)} and dtype {str(value.dtype).replace('torch.', '')}"
    if isinstance(value, Mapping):
        return "dict {" + ", ".join(f"{k!r}: {_show(v)}" for k, v in list(value.items())[:6]) + "}"
    if isinstance(value, (list, tuple)):
        head = ", ".join(_show(v) for v in value[:2])
        return f"{type(value).__name__} of {len(value)} items ({head}{', ...' if len(value) > 2 else ''})"
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


# ------------------------------------------------------------------------------------------------- rows


def is_dataset(obj: Any) -> bool:
    """Whether ``obj`` is a Hugging Face ``datasets.Dataset`` (a split)."""
    return type(obj).__module__.startswith("datasets.") and hasattr(obj, "column_names")


def num_rows(batch: Any, what: str = "calibration") -> int:
    """The number of samples in a batch (a tensor or a dict of tensors with one first dimension)."""
    if isinstance(batch, torch.Tensor):
        if batch.ndim == 0:
            raise _error(what, f"A {what} batch is a 0-d tensor ({_show(batch)}). Pass inputs shaped (N, ...).")
        return batch.shape[0]
    if isinstance(batch, Mapping):
        sizes = {v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim}
        if len(sizes) != 1:
            raise _error(
                what,
                f"Every tensor in a {what} dict batch must have the same first (batch) dimension, got sizes "
                f"{sorted(sizes)} in {_show(batch)}. Pass tensors of one batch size (pad text to one length).",
            )
        return sizes.pop()
    raise _error(
        what,
        f"Unsupported {what} batch: {_show(batch)}. Pass a tensor, a dict of tensors (as a tokenizer returns), or "
        f"(inputs, labels) pairs of them. {DOCS}",
    )


def take_rows(batch: Any, index: torch.Tensor | slice) -> Any:
    """Rows ``index`` of a tensor or of every tensor in a dict batch."""
    if isinstance(batch, torch.Tensor):
        return batch[index]
    return {k: v[index] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def densest_row(batch: Any) -> int:
    """The row of a batch with the most attended positions (the largest ``attention_mask`` sum); 0 without a mask."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if not isinstance(mask, torch.Tensor) or mask.ndim < 2:
        return 0
    return int(mask.flatten(1).sum(1).argmax())


def concat(parts: Sequence[Any]) -> Any:
    """Concatenate batches (tensors, or dicts of tensors with the same keys) along the first dimension."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(list(parts))
    return {
        k: torch.cat([p[k] for p in parts]) if isinstance(parts[0][k], torch.Tensor) else parts[0][k] for k in parts[0]
    }


def move_to(batch: Any, device: torch.device) -> Any:
    """A tensor or a dict batch on ``device`` (other values unchanged)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def subset_indices(total: int, num_samples: int, seed: int) -> list[int]:
    """Sorted indices of a seeded random subset of ``num_samples`` out of ``total`` (all when fewer)."""
    if total <= num_samples:
        return list(range(total))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(total, generator=generator)[:num_samples].tolist())


# ------------------------------------------------------------------------------------------------- values


def _is_tensor_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, torch.Tensor) for v in value)


def _stack(values: Sequence[torch.Tensor], what: str) -> torch.Tensor:
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) != 1:
        raise _error(
            what,
            f"The {what} inputs are a list of {len(values)} tensors of different shapes {sorted(shapes)[:4]}. Pass "
            "one tensor (N, ...) or samples of one shape (pad or resize them first).",
        )
    return torch.stack(list(values))


def as_inputs(value: Any, what: str = "calibration") -> Any:
    """One batch of model inputs as a tensor or a dict of tensors.

    A list of per-sample tensors of one shape is stacked into ``(N, ...)``; a numpy array becomes a tensor; a
    dict's values become tensors.
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        return {k: _maybe_tensor(v) for k, v in value.items()}
    if _is_tensor_list(value):
        return _stack(value, what)
    if hasattr(value, "__array__") and not isinstance(value, (list, tuple)):
        return torch.as_tensor(value)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (int, float, list)):
        try:
            return torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise _error(
        what,
        f"Unsupported {what} inputs: {_show(value)}. Pass a tensor (N, ...), a dict of tensors, or a list of "
        f"per-sample tensors of one shape; raw text or images need the model's processor. {DOCS}",
    )


def _maybe_tensor(value: Any) -> Any:
    """A dict value as a tensor when it is one (or an array, or numbers); other values are kept as they are."""
    if isinstance(value, torch.Tensor):
        return value
    if _is_tensor_list(value) and len({tuple(v.shape) for v in value}) == 1:
        return torch.stack(list(value))
    try:
        return torch.as_tensor(value) if hasattr(value, "__array__") or isinstance(value, (list, tuple)) else value
    except (TypeError, ValueError, RuntimeError):
        return value


def _labels_like(value: Any) -> bool:
    """Whether ``value`` looks like class labels: a 1-d integer tensor or a list of ints."""
    if isinstance(value, torch.Tensor):
        return value.ndim == 1 and not value.is_floating_point() and not value.is_complex()
    if isinstance(value, (list, tuple)):
        return bool(value) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return False


def as_labels(value: Any, rows: int | None = None, what: str = "evaluation") -> torch.Tensor:
    """Labels as a ``long`` tensor of ``rows`` entries (a tensor, a numpy array or a list of ints): class indices
    ``(N,)``, or token labels ``(N, T)`` of integers for models that predict per token (language models; positions
    holding :data:`IGNORE_INDEX` are not scored)."""
    try:
        labels = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise _error(
            what, f"The {what} labels are {_show(value)}, not class indices. Pass a tensor or a list of ints."
        ) from None
    if labels.ndim == 0:
        labels = labels.reshape(1)
    tokens = labels.ndim == 2 and not labels.is_floating_point() and not labels.is_complex()
    if labels.ndim != 1 and not tokens:
        raise _error(
            what,
            f"The {what} labels must be class indices shaped (N,) (or integer token labels shaped (N, T) for a "
            f"language model), got shape {tuple(labels.shape)} of {str(labels.dtype).replace('torch.', '')}. For "
            "one-hot or probability labels pass labels.argmax(-1).",
        )
    if labels.is_floating_point() and labels.numel() and not bool((labels == labels.round()).all()):
        raise _error(what, f"The {what} labels are fractional ({labels[:4].tolist()}...). Pass integer class indices.")
    if rows is not None and labels.shape[0] != rows:
        raise _error(
            what, f"The {what} data has {rows} inputs but {labels.shape[0]} labels. Pass one label per input."
        )
    return labels.long()


def check_labels(labels: torch.Tensor, num_classes: int, what: str = "evaluation") -> None:
    """Refuse labels outside ``[0, num_classes - 1]`` (token labels may also hold :data:`IGNORE_INDEX`)."""
    labels = _scored_labels(labels)
    if labels.numel() and (int(labels.max()) >= num_classes or int(labels.min()) < 0):
        raise _error(
            what,
            f"The {what} labels lie in [{int(labels.min())}, {int(labels.max())}] but the model has {num_classes} "
            f"outputs (classes 0-{num_classes - 1}). Check the label column or the model's classifier.",
        )


def _scored_labels(labels: torch.Tensor) -> torch.Tensor:
    """The labels that are scored: class labels ``(N,)`` as they are, token labels ``(N, T)`` without the positions
    holding :data:`IGNORE_INDEX` (flattened)."""
    return labels[labels != IGNORE_INDEX] if labels.ndim == 2 else labels


def scored(
    logits: torch.Tensor, labels: torch.Tensor, inputs: Any, *, shift: bool, what: str = "evaluation"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The predictions a loss or an accuracy scores: ``(logits (M, C), labels (M,), sample of each (M,))``.

    Class labels ``(N,)`` with logits ``(N, C)``: every sample, as given. Token labels ``(N, T)`` with logits
    ``(N, T, C)``: every position whose label is not :data:`IGNORE_INDEX` and whose ``attention_mask`` (when the
    inputs have one) is 1; with ``shift`` (a causal language model, as its own loss does) position ``t``'s logits
    score the label at ``t + 1``.

    Raises:
        DataError: the labels are per sample and the logits per token, or the other way round, or their lengths
            differ.
    """
    if labels.ndim == 1:
        if logits.ndim != 2:
            raise _error(
                what,
                f"The model predicts per position (logits shaped {tuple(logits.shape)}) but the {what} labels are one "
                f"class per sample ({tuple(labels.shape)}). For a language model pass token labels shaped like "
                "`input_ids` (the `input_ids` themselves for a causal LM, which predicts each next token; "
                f"{IGNORE_INDEX} where nothing is scored).",
            )
        return logits, labels, torch.arange(labels.shape[0], device=labels.device)
    if logits.ndim != 3 or logits.shape[:2] != labels.shape:
        raise _error(
            what,
            f"The {what} labels are per token ({tuple(labels.shape)}) but the model's logits are shaped "
            f"{tuple(logits.shape)}; token labels need one logit vector per position, (N, T, C). One-hot class labels? "
            "Pass labels.argmax(-1).",
        )
    keep = labels != IGNORE_INDEX
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if isinstance(mask, torch.Tensor) and mask.shape == labels.shape:
        keep &= mask.to(keep.device).bool()
    if shift:
        logits, labels, keep = logits[:, :-1], labels[:, 1:], keep[:, 1:]
    samples = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
    return logits[keep], labels[keep], samples[keep]


def check_input_dtype(batch: Any, model: nn.Module, what: str = "calibration") -> None:
    """Refuse float64 inputs to a model whose parameters are not float64 (the usual numpy pitfall).

    Inputs are not converted silently: the caller decides the precision. The fix is ``x.float()``.
    """
    tensors = (
        [batch] if isinstance(batch, torch.Tensor) else list(batch.values()) if isinstance(batch, Mapping) else []
    )
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float64 and torch.float64 not in dtypes:
            model_dtype = str(next(iter(dtypes), torch.float32)).replace("torch.", "")
            raise _error(
                what,
                f"The {what} inputs are float64 ({_show(tensor)}) but the model computes in {model_dtype}. Call "
                "`.float()` on them (e.g. `torch.from_numpy(x).float()`).",
            )


def wrong_inputs_error(error: Exception, batch: Any, what: str, model_name: str = "The model") -> DataError | None:
    """The :class:`DataError` to raise when a model's forward pass on the first ``what`` batch failed with
    ``error`` (inputs of the wrong shape), naming the batch's shape; None for an out-of-memory error, which must
    surface unchanged."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return None
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return _error(
        what,
        f"{model_name} cannot run on the {what} data (a batch: {_show(batch)}): {first}. Pass inputs shaped as "
        "the model expects (the data it was trained on).",
    )


def label_key(keys: Iterable[str], label_column: str | None) -> str | None:
    """The label key among ``keys``: ``label_column`` if present; else (unnamed or the default ``label``) the
    first of :data:`LABEL_COLUMNS` present; else None."""
    keys = list(keys)
    if label_column is not None and label_column in keys:
        return label_column
    if label_column is None or label_column == DEFAULT_LABEL_COLUMN:
        return next((c for c in LABEL_COLUMNS if c in keys), None)
    return None


def _no_label(what: str, named: str, columns: Sequence[str]) -> DataError:
    return _error(
        what,
        f"The {what} data has no label column {named!r} (columns: {list(columns)}). Name it with `label_column=` "
        f"(evaluate(..., label_column=...), FinetuneConfig(label_column=...)); without one, {list(LABEL_COLUMNS)} "
        "are tried.",
    )


def split_row(
    row: Mapping, *, label_column: str | None = None, input_column: str | None = None, what: str = "training"
) -> tuple[Any, torch.Tensor]:
    """``{inputs..., label}`` -> ``(inputs, labels)``: one input key gives its tensor, several a dict."""
    label = label_key(row, label_column)
    if label is None:
        named = label_column or DEFAULT_LABEL_COLUMN
        raise _no_label(what, named, sorted(row))
    if input_column is not None:
        names = [input_column]
    else:
        names = [k for k in row if k != label and k not in LABEL_COLUMNS]
    missing = [n for n in names if n not in row]
    if missing or not names:
        raise _error(
            what,
            f"Input column(s) {missing or names} not found in the {what} data (columns: {sorted(row)}). Name the "
            "input column with `input_column=`.",
        )
    values = {n: as_inputs(row[n], what) for n in names}
    return (values[names[0]] if len(names) == 1 else values), as_labels(row[label], what=what)


def split_batch(
    batch: Any, *, label_column: str | None = None, input_column: str | None = None, what: str = "training"
) -> tuple[Any, torch.Tensor]:
    """One labelled batch as ``(inputs, labels)``: an ``(inputs, labels)`` pair, or a dict with a label key."""
    if isinstance(batch, Mapping):
        inputs, labels = split_row(batch, label_column=label_column, input_column=input_column, what=what)
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs = as_inputs(batch[0], what)
        labels = as_labels(batch[1], what=what)
    else:
        raise _error(
            what,
            f"A {what} batch must be an (inputs, labels) pair or a dict with a label key, got {_show(batch)}. {DOCS}",
        )
    rows = num_rows(inputs, what)
    if labels.shape[0] != rows:
        raise _error(what, f"A {what} batch has {rows} inputs but {labels.shape[0]} labels. Pass one label per input.")
    return inputs, labels


def as_pair(data: Any, what: str) -> tuple[Any, torch.Tensor] | None:
    """``data`` as one ``(inputs, labels)`` pair, or None when it is not one.

    A 2-sequence is a pair when its second item is labels (a tensor, or a list of ints) rather than another
    batch or pair; calibration data also needs the labels to be integer and as many as the inputs.
    """
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        return None
    inputs, labels = data
    if isinstance(inputs, (tuple, list)) and not _is_tensor_list(inputs):
        return None  # a list of two pairs
    if what == "calibration":
        if not _labels_like(labels) or not isinstance(inputs, (torch.Tensor, Mapping, list, tuple)):
            return None
        inputs = as_inputs(inputs, what)
        return (inputs, as_labels(labels, what=what)) if num_rows(inputs, what) == len(labels) else None
    if isinstance(labels, torch.Tensor) or _labels_like(labels):
        inputs = as_inputs(inputs, what)
        return inputs, as_labels(labels, num_rows(inputs, what), what)
    return None


def _dataset_columns(dataset: Any, input_columns: Iterable[str] | None, exclude: Iterable[str], what: str) -> Any:
    """All rows of a ``datasets`` split as model inputs: its own format/transform if set, else torch format."""
    formatted = dataset if dataset.format["type"] is not None else dataset.with_format("torch")
    rows = formatted[:]
    if input_columns is not None:
        names = list(input_columns)
        missing = [c for c in names if c not in rows]
        if missing:
            raise _error(what, f"Columns {missing} are not in the {what} dataset; it has {sorted(rows)}.")
    else:
        names = [c for c in rows if c not in set(exclude)]
        if not names:
            raise _error(
                what,
                f"The {what} dataset has no input column (columns: {sorted(rows)}). Name it with `input_column=`.",
            )
    tensors = {c: as_inputs(rows[c], what) for c in names}
    return tensors[names[0]] if len(names) == 1 else tensors


# ------------------------------------------------------------------------------------------------- calibration


@dataclass
class CalibrationData:
    """Calibration batches plus where they came from (recorded in ``fusion_config.json``)."""

    batches: list[Any]
    num_samples: int
    provenance: dict[str, Any] = field(default_factory=dict)


def _calibration_inputs(item: Any) -> Any:
    """The inputs of one calibration item: pairs give their inputs, label keys of dicts are dropped."""
    if isinstance(item, (tuple, list)) and item:
        pair = as_pair(item, "calibration")
        if pair is not None:
            return pair[0]
        if isinstance(item[0], (torch.Tensor, Mapping)):  # (inputs, ...) from a DataLoader: its first item
            return _calibration_inputs(item[0])
    if isinstance(item, Mapping):
        return as_inputs({k: v for k, v in item.items() if k not in LABEL_COLUMNS})
    return as_inputs(item)


def prepare_calibration(
    data: Any, *, num_samples: int, batch_size: int, seed: int, input_columns: Iterable[str] | None = None
) -> CalibrationData:
    """Select ``num_samples`` samples and cut them into batches (labels, if any, are dropped).

    A tensor, dict, ``(inputs, labels)`` pair or ``datasets.Dataset`` with more rows than ``num_samples`` gives a
    seeded random subset (the indices are recorded); an iterable of batches gives its first ``num_samples``
    samples, in order. A list of 1-d tensors (one sample each) is stacked into one tensor. See docs/data.md.
    """
    if data is None:
        raise CalibrationDataError(
            "No calibration data was given. Pass a tensor, a dict of tensors, batches or a dataset."
        )
    provenance: dict[str, Any] = {"seed": seed}
    pair = as_pair(data, "calibration")
    if pair is not None:
        data = pair[0]
    elif _is_tensor_list(data) and all(t.ndim == 1 for t in data):
        data = _stack(data, "calibration")  # one sample per item: a batch has at least 2 dimensions
    if is_dataset(data):
        total = len(data)
        provenance.update(source="datasets.Dataset", fingerprint=getattr(data, "_fingerprint", None), total=total)
        indices = subset_indices(total, num_samples, seed)
        provenance["indices"] = indices
        full = _dataset_columns(data.select(indices), input_columns, LABEL_COLUMNS, "calibration") if total else None
    elif isinstance(data, (torch.Tensor, Mapping)):
        source = type(data).__name__
        data = _calibration_inputs(data)
        total = num_rows(data)
        provenance.update(source=source, total=total)
        indices = subset_indices(total, num_samples, seed)
        provenance["indices"] = indices
        full = take_rows(data, torch.as_tensor(indices, dtype=torch.long)) if total else None
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        provenance.update(source="iterable", indices=None)
        parts, count = [], 0
        for item in data:
            batch = _calibration_inputs(item)
            rows = num_rows(batch)
            if rows == 0:
                continue
            take = min(rows, num_samples - count)
            parts.append(take_rows(batch, slice(0, take)))
            count += take
            if count >= num_samples:
                break
        provenance["total"] = None
        full = concat(parts) if parts else None
    else:
        raise CalibrationDataError(
            f"Unsupported calibration data of type {type(data).__name__} ({_show(data)}). Pass a tensor, a dict of "
            f"tensors, an iterable of batches, or a datasets.Dataset. {DOCS}"
        )
    used = 0 if full is None else num_rows(full)
    if used < MIN_SAMPLES:
        raise CalibrationDataError(
            f"Too few calibration samples: got {used}, need at least {MIN_SAMPLES} (the paper uses 200). "
            "Pass more data or check that the dataset/iterable is not empty."
        )
    provenance["num_samples"] = used
    batches = [take_rows(full, slice(start, start + batch_size)) for start in range(0, used, batch_size)]
    if len(batches) > 1 and num_rows(batches[-1]) < MIN_SAMPLES:  # keep minibatch statistics well defined
        last = batches.pop()
        batches[-1] = concat([batches[-1], last])
    return CalibrationData(batches, used, provenance)


# ------------------------------------------------------------------------------------------------- labelled data


def _labelled_whole(
    data: Any, *, label_column: str | None, input_column: str | None, what: str
) -> tuple[Any, torch.Tensor] | None:
    """Data held in memory as one ``(inputs, labels)`` pair (a pair, a labelled dict, a split), else None."""
    if is_dataset(data):
        label = label_key(data.column_names, label_column)
        if label is None:
            named = label_column or DEFAULT_LABEL_COLUMN
            raise _no_label(what, named, data.column_names)
        if len(data) == 0:
            raise _error(what, f"The {what} data is empty: the split has no rows. Pass a split with rows.")
        inputs = _dataset_columns(
            data, None if input_column is None else [input_column], (label, *LABEL_COLUMNS), what
        )
        labels = as_labels(data.select_columns([label]).with_format("torch")[:][label], what=what)
        return inputs, labels
    if isinstance(data, Mapping):
        return split_row(data, label_column=label_column, input_column=input_column, what=what)
    if isinstance(data, torch.Tensor):
        raise _error(
            what,
            f"The {what} data needs labels, got only inputs ({_show(data)}). Pass (inputs, labels), e.g. (x, y).",
        )
    return as_pair(data, what)


def labelled_batches(
    data: Any,
    *,
    batch_size: int = 256,
    label_column: str | None = None,
    input_column: str | None = None,
    what: str = "evaluation",
) -> list[tuple[Any, torch.Tensor]]:
    """Labelled data as a list of ``(inputs, labels)`` batches (every form of docs/data.md).

    Args:
        data: ``(inputs, labels)`` (inputs a tensor, a dict of tensors or a list of per-sample tensors; labels a
            tensor or a list of ints), a dict of tensors with a label key, a ``datasets`` split with a label
            column, a torch ``Dataset`` of such items, or an iterable (a DataLoader) of pairs or labelled dicts.
        batch_size: batch size when ``data`` is held in memory (a pair, a dict, a split, a torch Dataset).
        label_column: the label column / key (default: the first of :data:`LABEL_COLUMNS` present).
        input_column: the input column (default: every non-label column; one gives a tensor, several a dict).
        what: ``"evaluation"`` or ``"training"``, for error messages.

    Returns:
        ``[(inputs, labels), ...]``: inputs a tensor ``(B, ...)`` or a dict of them, labels ``long`` ``(B,)``.
    """
    if data is None:
        raise _error(what, f"No {what} data was given. Pass (inputs, labels), a DataLoader or a datasets split.")
    whole = _labelled_whole(data, label_column=label_column, input_column=input_column, what=what)
    if whole is not None:
        inputs, labels = whole
        total = num_rows(inputs, what)
        if total == 0:
            raise _error(what, f"The {what} data is empty: {_show(inputs)}. Pass at least one sample.")
        if labels.shape[0] != total:
            raise _error(what, f"The {what} data has {total} inputs but {labels.shape[0]} labels.")
        return [
            (take_rows(inputs, slice(s, s + batch_size)), labels[s : s + batch_size])
            for s in range(0, total, batch_size)
        ]
    if isinstance(data, Dataset) and not isinstance(data, Iterable):
        data = DataLoader(data, batch_size=batch_size)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        out = [split_batch(item, label_column=label_column, input_column=input_column, what=what) for item in data]
        out = [(inputs, labels) for inputs, labels in out if labels.numel()]
        if not out:
            raise _error(what, f"The {what} data is empty: the iterable gave no samples. Pass at least one sample.")
        return out
    raise _error(
        what,
        f"Unsupported {what} data of type {type(data).__name__} ({_show(data)}). Pass (inputs, labels), a DataLoader "
        f"of pairs or labelled dicts, or a datasets split with a label column. {DOCS}",
    )


class RowDataset(Dataset):
    """In-memory ``(inputs, labels)`` as a torch ``Dataset`` of ``(inputs[i], labels[i])`` items (dict inputs too)."""

    def __init__(self, inputs: Any, labels: torch.Tensor):
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        return take_rows(self.inputs, int(index)), self.labels[int(index)]


class SplitDataset(Dataset):
    """A ``datasets`` split as ``(inputs, label)`` items; the split's own transform does the preprocessing."""

    def __init__(self, split: Any, *, label_column: str | None, input_column: str | None, what: str):
        self.label = label_key(split.column_names, label_column)
        if self.label is None:
            named = label_column or DEFAULT_LABEL_COLUMN
            raise _no_label(what, named, split.column_names)
        self.split, self.input_column, self.what = split, input_column, what

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        row = self.split[int(index)]
        inputs, label = split_row(row, label_column=self.label, input_column=self.input_column, what=self.what)
        raw = row[self.label]
        sequence = isinstance(raw, (list, tuple)) or getattr(raw, "ndim", 0) > 0  # a row's token labels
        return inputs, label if sequence else label.reshape(())

    def raw_labels(self) -> torch.Tensor | None:
        """The label column without the split's transform, or None when it cannot be read that way."""
        try:
            raw = self.split.select_columns([self.label]).with_format(None)
            return torch.as_tensor(raw[:][self.label])
        except Exception:
            return None


@dataclass
class LabelledData:
    """Labelled data ready for a DataLoader, and what is known about its labels up front."""

    #: a torch Dataset of ``(inputs, label)`` items, or the user's DataLoader unchanged
    dataset: Dataset | DataLoader
    #: the largest label, or None when labels are only seen batch by batch (check each batch then)
    max_label: int | None


def labelled_dataset(
    data: Any, *, label_column: str | None = None, input_column: str | None = None, what: str = "training"
) -> LabelledData:
    """Labelled data (every form of docs/data.md) as a torch ``Dataset`` (or the user's DataLoader), for training.

    Nothing is written onto the user's objects. An iterable that is not a DataLoader is read into memory.
    """
    if isinstance(data, DataLoader):
        return LabelledData(data, None)
    if data is None:
        raise _error(what, f"No {what} data was given. Pass (inputs, labels), a DataLoader or a datasets split.")
    labels: torch.Tensor | None
    if is_dataset(data):
        dataset: Dataset = SplitDataset(data, label_column=label_column, input_column=input_column, what=what)
        labels = dataset.raw_labels()
    elif isinstance(data, Dataset):
        dataset, labels = data, None
    elif isinstance(data, (tuple, list, Mapping, torch.Tensor)) or (
        isinstance(data, Iterable) and not isinstance(data, (str, bytes))
    ):
        whole = _labelled_whole(data, label_column=label_column, input_column=input_column, what=what)
        if whole is None:
            parts = labelled_batches(data, label_column=label_column, input_column=input_column, what=what)
            whole = concat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        inputs, labels = whole
        if labels.shape[0] != num_rows(inputs, what):
            raise _error(what, f"The {what} data has {num_rows(inputs, what)} inputs but {labels.shape[0]} labels.")
        dataset = RowDataset(inputs, labels)
    else:
        raise _error(
            what,
            f"Unsupported {what} data of type {type(data).__name__} ({_show(data)}). Pass a datasets split, "
            f"(inputs, labels), a torch Dataset of (inputs, label) items, or a DataLoader. {DOCS}",
        )
    if len(dataset) == 0:
        raise _error(what, f"The {what} data is empty: it has no rows. Pass at least one sample.")
    if labels is not None:
        labels = _scored_labels(labels)
    if labels is not None and labels.numel() and int(labels.min()) < 0:
        raise _error(what, f"The {what} labels must be >= 0, got {int(labels.min())}. Pass class indices.")
    return LabelledData(dataset, None if labels is None or not labels.numel() else int(labels.max()))


__all__ = [
    "DEFAULT_LABEL_COLUMN",
    "IGNORE_INDEX",
    "LABEL_COLUMNS",
    "MIN_SAMPLES",
    "CalibrationData",
    "LabelledData",
    "RowDataset",
    "SplitDataset",
    "as_inputs",
    "as_labels",
    "as_pair",
    "check_input_dtype",
    "check_labels",
    "concat",
    "is_dataset",
    "label_key",
    "labelled_batches",
    "labelled_dataset",
    "move_to",
    "num_rows",
    "prepare_calibration",
    "scored",
    "split_batch",
    "split_row",
    "subset_indices",
    "take_rows",
    "wrong_inputs_error",
]
