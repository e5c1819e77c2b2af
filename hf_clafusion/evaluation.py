"""``evaluate``: accuracy and loss of any set of models, plus their prediction ensemble, in one table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .adapters import get_adapter
from .data import check_input_dtype, check_labels, labelled_batches, move_to, scored, wrong_inputs_error
from .errors import IncompatibleModelsError


@dataclass
class EvaluationRow:
    name: str
    accuracy: float
    loss: float
    num_samples: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "accuracy": self.accuracy, "loss": self.loss, "num_samples": self.num_samples}


class EvaluationReport(list):
    """A list of :class:`EvaluationRow`; ``str()`` renders a table and ``[name]`` looks a row up."""

    def __getitem__(self, key):
        if isinstance(key, str):
            for row in self:
                if row.name == key:
                    return row
            raise KeyError(f"No row named {key!r}; rows: {[r.name for r in self]}.")
        return super().__getitem__(key)

    def __str__(self) -> str:
        width = max(len(r.name) for r in self) if self else 5
        lines = [f"{'model':<{width}}  accuracy    loss", f"{'-' * width}  --------  ------"]
        lines += [f"{r.name:<{width}}  {100 * r.accuracy:7.2f}%  {r.loss:6.4f}" for r in self]
        return "\n".join(lines)

    def to_dicts(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self]


@torch.no_grad()
def evaluate(
    models: Sequence[nn.Module] | nn.Module,
    data: Any,
    *,
    names: Sequence[str] | None = None,
    ensemble: bool = True,
    label_column: str | None = None,
    input_column: str | None = None,
    batch_size: int = 256,
    processor: Any = None,
) -> EvaluationReport:
    """Accuracy and cross-entropy of each model, and of their prediction ensemble (mean of softmax outputs).

    With token labels shaped like ``input_ids`` (language models) both are per scored position: next-token accuracy
    and mean cross-entropy (``exp(loss)`` is the perplexity) for a causal LM, whose labels are scored shifted by one
    as its own loss does; positions labelled ``-100`` or outside the ``attention_mask`` are not scored, and
    ``num_samples`` counts the scored positions.

    Args:
        models: one model or a list (parents, the fused model...). Models are evaluated in eval mode, on their
            own device.
        data: labelled data in any form of the table in docs/data.md: ``(inputs, labels)`` (inputs a tensor or a
            dict of tensors, labels a tensor or a list of ints), a dict with a label key, a DataLoader (or any
            iterable) of pairs or of labelled dicts, or a ``datasets`` split with a label column.
        names: a display name per model (default ``model 0``, ``model 1``...).
        ensemble: add a row for the prediction ensemble of all models (when there are 2 or more).
        label_column: the label column / key (default: ``label`` / ``labels`` / ``y`` / ``target`` / ``targets``).
        input_column: the input column of a dataset or dict (default: every non-label column).
        batch_size: batch size when ``data`` is held in memory (a pair, a dict, a dataset).
        processor: a tokenizer / image processor for raw inputs (``(texts, labels)``, ``(images, labels)``), read
            by the first model's adapter (``Adapter.prepare_data``); with ``None`` the parents' own is looked up.

    Returns:
        `EvaluationReport`: one row per model (+ ``ensemble``); ``print()`` it for a table.

    Example:
        ```py
        report = evaluate([parent_a, parent_b, result.model], (x_test, y_test), names=["A", "B", "fused"])
        print(report)
        ```
    """
    if isinstance(models, nn.Module):
        models = [models]
    models = list(models)
    names = list(names) if names is not None else [f"model {i}" for i in range(len(models))]
    if len(names) != len(models):
        raise IncompatibleModelsError(f"Got {len(names)} names for {len(models)} models; give one name per model.")
    adapters = [get_adapter(m) for m in models]
    data = _prepare_raw(data, adapters[0], models, processor)
    batches = labelled_batches(
        data, batch_size=batch_size, label_column=label_column, input_column=input_column, what="evaluation"
    )
    for model in models:
        check_input_dtype(batches[0][0], model, "evaluation")
    correct = [0] * (len(models) + 1)
    loss = [0.0] * (len(models) + 1)
    total = 0
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        for inputs, labels in batches:
            probs = []
            targets = labels
            for i, (model, adapter) in enumerate(zip(models, adapters)):
                device = next(model.parameters()).device
                args, kwargs = adapter.model_inputs(model, move_to(inputs, device))
                try:
                    logits = adapter.logits(model(*args, **kwargs)).float().cpu()
                except (RuntimeError, TypeError, ValueError) as error:
                    explained = wrong_inputs_error(error, inputs, "evaluation", f"Model {i} ({names[i]})")
                    if total or explained is None:  # a later batch failed: not a matter of the inputs' shape
                        raise
                    raise explained from error
                check_labels(labels, logits.shape[-1], "evaluation")
                # per sample, or per scored position with token labels (the same positions for every model)
                logits, targets, _ = scored(logits, labels, inputs, shift=adapter.next_token(model))
                loss[i] += float(F.cross_entropy(logits, targets.long(), reduction="sum"))
                correct[i] += int((logits.argmax(-1) == targets).sum())
                probs.append(logits.softmax(-1))
            mean = torch.stack(probs).mean(0)
            loss[-1] += float(F.nll_loss(mean.clamp_min(1e-12).log(), targets.long(), reduction="sum"))
            correct[-1] += int((mean.argmax(-1) == targets).sum())
            total += targets.shape[0]
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    report = EvaluationReport(
        EvaluationRow(n, correct[i] / total, loss[i] / total, total) for i, n in enumerate(names)
    )
    if ensemble and len(models) > 1:
        report.append(EvaluationRow("ensemble", correct[-1] / total, loss[-1] / total, total))
    return report


def _prepare_raw(data: Any, adapter, models: list[nn.Module], processor: Any) -> Any:
    """Raw inputs of an ``(inputs, labels)`` pair (texts, images) through the adapter's ``prepare_data``."""
    raw = data[0] if isinstance(data, tuple) and len(data) == 2 else None
    first = raw[0] if isinstance(raw, list) and raw else raw
    if isinstance(first, str) or type(first).__module__.startswith("PIL"):
        inputs = adapter.prepare_data(data[0], models, processor, None)
        if inputs is not data[0]:
            return inputs, data[1]
    return data


__all__ = ["EvaluationReport", "EvaluationRow", "evaluate"]
