"""Result objects: :class:`FusionResult` (from :func:`~hf_clafusion.fuse`) and :class:`AlignmentPreview`."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import FusionConfig
from .errors import ClaFusionError


if TYPE_CHECKING:
    from matplotlib.figure import Figure


class TransportPlans(MutableMapping[str, torch.Tensor]):
    """One model's transport plans by anchor group name: reading one gives its dense ``(n_model, n_anchor)``
    float32 plan on CPU, as a ``dict`` of tensors would.

    An exact plan is a vertex of the transport polytope: at most ``n_model + n_anchor - 1`` of its entries are
    non-zero (a permutation has ``n``). Such a plan is kept as a sparse COO tensor and made dense again each time it
    is read, so the plans of a fusion take memory proportional to the widths instead of their product (the MLP
    plans of a BERT-base 12 + 6 pair: 216 MiB dense, 0.4 MiB kept; a 1 B-parameter Llama pair: about 1 GB). Plans
    with many non-zero entries (Sinkhorn's) are kept dense.

    Example:
        ```py
        >>> import torch
        >>> from hf_clafusion.result import TransportPlans
        >>> plans = TransportPlans({"fc1": torch.eye(3)[[2, 0, 1]] / 3})
        >>> plans["fc1"].argmax(1).tolist(), plans.is_compact("fc1")
        ([2, 0, 1], True)
        ```
    """

    def __init__(self, plans: Mapping[str, torch.Tensor] | None = None) -> None:
        self._plans: dict[str, torch.Tensor] = {}
        for name, plan in (plans or {}).items():
            self[name] = plan

    def __setitem__(self, name: str, plan: torch.Tensor) -> None:
        plan = plan.detach().to(device="cpu", dtype=torch.float32)
        # COO keeps 2 int64 indices and a float32 value per non-zero entry: 5x a dense entry
        if plan.dim() == 2 and 5 * int(torch.count_nonzero(plan)) < plan.numel():
            plan = plan.to_sparse_coo().coalesce()
        self._plans[name] = plan

    def __getitem__(self, name: str) -> torch.Tensor:
        plan = self._plans[name]
        return plan.to_dense() if plan.is_sparse else plan

    def __delitem__(self, name: str) -> None:
        del self._plans[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._plans)

    def __len__(self) -> int:
        return len(self._plans)

    def is_compact(self, name: str) -> bool:
        """Whether group ``name``'s plan is kept sparse (made dense when read)."""
        return self._plans[name].is_sparse

    def nbytes(self) -> int:
        """Bytes the kept plans take."""
        total = 0
        for plan in self._plans.values():
            parts = (plan.indices(), plan.values()) if plan.is_sparse else (plan,)
            total += sum(part.numel() * part.element_size() for part in parts)
        return total

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name!r}: {tuple(plan.shape)}" for name, plan in self._plans.items())
        return f"TransportPlans({{{shapes}}})"


@dataclass
class PairAlignment:
    """The cross-layer alignment between one model and the depth reference of each segment.

    Attributes:
        model: index of the aligned model.
        reference: index of the model it is aligned to (the deeper one with ``balancing="identity"``).
        deeper: per segment, which of the two is the deeper model there (the one the indices refer to).
        alignment: per segment, the 0-indexed hidden-layer indices of the deeper model (counted over the whole
            network), one per hidden layer of the shallower model in that segment.
        costs: per segment, the ``(deep, shallow)`` layer cost matrix.
        offsets: per segment, the network-wide index of the deeper model's first layer in that segment.
    """

    model: int
    reference: int
    deeper: list[int]
    alignment: list[list[int]]
    costs: list[torch.Tensor]
    offsets: list[int] = field(default_factory=list)

    def local(self, segment: int) -> list[int]:
        """The alignment of one segment with indices counted from the segment's first layer."""
        return [a - self.offsets[segment] for a in self.alignment[segment]]


def describe_parent(model: nn.Module, index: int) -> dict[str, Any]:
    """Identity card of a parent model: class, name or path when known, size, and a content hash."""
    config = getattr(model, "config", None)
    name = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or None
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        if tensor.device.type != "meta":
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {
        "index": index,
        "class": type(model).__name__,
        "name_or_path": name,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "sha256": digest.hexdigest(),
    }


def best_epoch(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The finetuning record with the highest ``eval_accuracy`` (the earliest among ties), or None without any."""
    evaluated = [r for r in history if "eval_accuracy" in r]
    return max(evaluated, key=lambda r: r["eval_accuracy"]) if evaluated else None


class _AlignmentMixin:
    pairs: list[PairAlignment]

    @property
    def layer_alignment(self) -> list[list[int]]:
        """Per segment, the deeper model's 0-indexed hidden layer matched to each shallower-model layer (K = 2)."""
        if len(self.pairs) != 1:
            raise ClaFusionError(
                f"{len(self.pairs) + 1} models were fused, so there is one alignment per non-reference model: use "
                "`layer_alignments` instead of `layer_alignment`."
            )
        return self.pairs[0].alignment

    @property
    def layer_alignments(self) -> list[list[list[int]]]:
        """One :attr:`layer_alignment` per aligned (non-reference) model, in model order."""
        return [p.alignment for p in self.pairs]

    @property
    def layer_costs(self) -> list[torch.Tensor] | list[list[torch.Tensor]]:
        """Per segment, the ``(deep, shallow)`` layer cost matrix (K = 2); one such list per pair when K > 2."""
        if len(self.pairs) == 1:
            return self.pairs[0].costs
        return [p.costs for p in self.pairs]

    def plot_alignment(self, path: str | Path | None = None) -> Figure:
        """Heatmaps of the layer cost matrices with the chosen alignment drawn on them; saved when ``path`` is given.

        One panel per (pair, segment) with at least one layer to align: rows are the deeper model's layers of the
        segment, columns the shallower model's. Layers are numbered over the whole network (0-indexed hidden
        layers), as in :attr:`layer_alignment`, :meth:`summary` and the model card; the colour bar gives the layer
        cost (``config.layer_cost``; lower means more similar).
        """
        from .plotting import plot_alignment

        costs, alignments, row_labels, column_labels, titles, row_starts, column_starts = [], [], [], [], [], [], []
        for pair in self.pairs:
            for s in range(len(pair.alignment)):
                if pair.costs[s].numel() == 0:
                    continue
                deep = pair.deeper[s]
                shallow = pair.reference if deep == pair.model else pair.model
                costs.append(pair.costs[s].detach().cpu().double().numpy())
                alignments.append(pair.local(s))
                row_starts.append(pair.offsets[s] if s < len(pair.offsets) else 0)
                column_starts.append(sum(len(pair.alignment[t]) for t in range(s)))  # one entry per shallow layer
                row_labels.append(f"model {deep} layer")
                column_labels.append(f"model {shallow} layer")
                titles.append(f"segment {s}: cost and alignment")
        layer_cost = getattr(getattr(self, "config", None), "layer_cost", "layer cost")
        return plot_alignment(
            costs,
            alignments,
            row_labels=row_labels,
            column_labels=column_labels,
            titles=titles,
            row_starts=row_starts,
            column_starts=column_starts,
            colorbar_label=f"{layer_cost} cost (lower: more similar)",
            path=path,
        )


@dataclass
class AlignmentPreview(_AlignmentMixin):
    """What :func:`~hf_clafusion.align` returns: layer costs and alignments, no fused model."""

    pairs: list[PairAlignment]
    timings: dict[str, float]
    config: FusionConfig


@dataclass
class FusionResult(_AlignmentMixin):
    """What :func:`~hf_clafusion.fuse` returns.

    Attributes:
        model: the fused model, same family and class as the parents.
        pairs: the cross-layer alignments (see :attr:`layer_alignment`, :attr:`layer_alignments`).
        transport_plans: per non-anchor model index, the plan ``(n_model, n_anchor)`` of every alignment group
            (a :class:`TransportPlans` mapping: each plan is dense when read, kept sparse where it is exact).
        transport_solvers: per non-anchor model index, the solver that computed each group's plan (``"emd"``,
            ``"permutation"``, ``"sinkhorn"``, ``"heads"`` for head-structured plans, or ``"partial"`` for a
            partial assignment where the model is narrower than the anchor, see ``FusionConfig.width_matching``);
            with ``solver="auto"`` this is the exact solver it chose.
        timings: seconds per pipeline stage.
        calibration: where the calibration samples came from (source, size, indices, seed).
        config: the :class:`FusionConfig` used.
        adapter: the adapter (model family) name.
        anchor: index of the model whose widths and neuron basis the fused model has.
        parents: identity cards of the parents (class, name or path, parameter count, content hash).
        bn_reset: whether BatchNorm statistics were recomputed on the calibration data.
        identity_errors: relative output error of every *approximate* identity block inserted for depth
            balancing, measured on the calibration data (post-LN transformers); empty when all are exact.
        evaluation: evaluation rows attached by the user (e.g. from :func:`~hf_clafusion.evaluate`), recorded
            in ``fusion_config.json``.
        evaluation_dataset: the evaluation data set's name (the card's ``model-index``).
        evaluation_task: the ``model-index`` task type of the evaluation.
        finetune_history: per-epoch records of :func:`~hf_clafusion.finetune`, once :meth:`record_finetune` ran.
        finetune_kept_epoch: the finetuning epoch whose weights :attr:`model` holds (0: before finetuning; with
            ``FinetuneConfig.keep_best``, the best evaluated one); None before finetuning or in older records
            (the last epoch).
        alignment_trial: with ``alignment="auto"`` where CLA's and chain's alignments differ: ``tried`` (the
            methods), ``kept`` (also in :attr:`config`), ``agreement`` (per method, the fraction of samples on which
            its fused model's prediction agrees with the parents' ensemble) and ``samples``; for models without a
            prediction head, ``tried`` and ``kept`` are ``"cla"`` and ``skipped`` says why. Empty otherwise.
    """

    model: nn.Module
    pairs: list[PairAlignment]
    transport_plans: dict[int, Mapping[str, torch.Tensor]]
    timings: dict[str, float]
    calibration: dict[str, Any]
    config: FusionConfig
    adapter: str
    anchor: int
    parents: list[dict[str, Any]]
    bn_reset: bool = False
    identity_errors: dict[str, float] = field(default_factory=dict)
    transport_solvers: dict[int, dict[str, str]] = field(default_factory=dict)
    evaluation: list[dict[str, Any]] = field(default_factory=list)
    evaluation_dataset: str | None = None
    evaluation_task: str = "image-classification"
    finetune_history: list[dict[str, Any]] = field(default_factory=list)
    finetune_kept_epoch: int | None = None
    alignment_trial: dict[str, Any] = field(default_factory=dict)

    def record_evaluation(
        self, report: Any, *, dataset: str | None = None, fused: str | None = None, task: str = "image-classification"
    ) -> None:
        """Keep an :func:`~hf_clafusion.evaluate` report for ``fusion_config.json`` and the model card.

        Args:
            report: the :class:`~hf_clafusion.EvaluationReport` (or its ``to_dicts()``).
            dataset: the evaluation data set's name (goes into the card's ``model-index``).
            fused: the row that is this fused model (default: the last row that is not ``ensemble``).
            task: the ``model-index`` task type.
        """
        rows = [dict(r) for r in (report.to_dicts() if hasattr(report, "to_dicts") else report)]
        names = [r["name"] for r in rows if r["name"] != "ensemble"]
        fused = fused if fused is not None else (names[-1] if names else None)
        for row in rows:
            row["fused"] = row["name"] == fused
        self.evaluation = rows
        self.evaluation_dataset = dataset
        self.evaluation_task = task

    def record_finetune(self, finetune_result) -> None:
        """Adopt a :func:`~hf_clafusion.finetune` result: its model becomes :attr:`model`, its history goes into the card.

        An evaluation recorded before describes the model before finetuning: its rows stay in the card's table,
        but none of them is the fused model any more (so the card's ``model-index`` is dropped until
        :meth:`record_evaluation` is called again).
        """
        self.model = finetune_result.model
        self.finetune_history = list(finetune_result.history)
        self.finetune_kept_epoch = finetune_result.kept_epoch
        for row in self.evaluation:
            row["fused"] = False

    def to_record(self) -> dict[str, Any]:
        """Everything but the model and the transport plans, as JSON-serialisable data (``fusion_config.json``).

        :meth:`from_record` rebuilds the result from it and the model.
        """
        from . import __version__

        return {
            "library": "hf_clafusion",
            "library_version": __version__,
            "adapter": self.adapter,
            "config": self.config.to_dict(),
            "anchor": self.anchor,
            "parents": self.parents,
            "layer_alignments": [
                {
                    "model": p.model,
                    "reference": p.reference,
                    "deeper": p.deeper,
                    "alignment": p.alignment,
                    "offsets": p.offsets,
                    "costs": [c.tolist() for c in p.costs],
                }
                for p in self.pairs
            ],
            "calibration": self.calibration,
            "timings": self.timings,
            "transport_solvers": {str(k): dict(v) for k, v in self.transport_solvers.items()},
            "bn_reset": self.bn_reset,
            "identity_errors": dict(self.identity_errors),
            "evaluation": self.evaluation,
            "evaluation_dataset": self.evaluation_dataset,
            "evaluation_task": self.evaluation_task,
            "finetune": self.finetune_history,
            "finetune_kept_epoch": self.finetune_kept_epoch,
            "alignment_trial": dict(self.alignment_trial),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], model: nn.Module) -> FusionResult:
        """The result described by a :meth:`to_record` dictionary, around ``model`` (``transport_plans`` empty).

        Records written by earlier versions load too: fields they lack get their defaults.
        """
        pairs = [
            PairAlignment(
                model=p["model"],
                reference=p["reference"],
                deeper=p["deeper"],
                alignment=p["alignment"],
                costs=[
                    torch.tensor(c, dtype=torch.float64) if c else torch.zeros(0, 0, dtype=torch.float64)
                    for c in p["costs"]
                ],
                offsets=p.get("offsets", [0] * len(p["alignment"])),
            )
            for p in record["layer_alignments"]
        ]
        return cls(
            model=model,
            pairs=pairs,
            transport_plans={},
            timings=record.get("timings", {}),
            transport_solvers={int(k): dict(v) for k, v in record.get("transport_solvers", {}).items()},
            calibration=record.get("calibration", {}),
            config=FusionConfig.from_dict(record["config"]),
            adapter=record["adapter"],
            anchor=record["anchor"],
            parents=record["parents"],
            bn_reset=record.get("bn_reset", False),
            identity_errors=record.get("identity_errors", {}),
            evaluation=record.get("evaluation", []),
            evaluation_dataset=record.get("evaluation_dataset"),
            evaluation_task=record.get("evaluation_task", "image-classification"),
            finetune_history=record.get("finetune", []),
            finetune_kept_epoch=record.get("finetune_kept_epoch"),
            alignment_trial=record.get("alignment_trial", {}),
        )

    @property
    def kept_earlier_epoch(self) -> int | None:
        """The finetuning epoch whose weights :attr:`model` holds when ``keep_best`` kept one before the last
        (0: the weights before finetuning); None when the model holds the last epoch's weights or was not
        finetuned. The summary and the model card both read it."""
        if not self.finetune_history or self.finetune_kept_epoch is None:
            return None
        return None if self.finetune_kept_epoch == self.finetune_history[-1].get("epoch") else self.finetune_kept_epoch

    def summary(self) -> str:
        """A human-readable report: parents, fused depth and widths, alignment per segment, timings."""
        lines = [f"CLAFusion of {len(self.parents)} {self.adapter} models (anchor: model {self.anchor})"]
        for p in self.parents:
            name = p["name_or_path"] or "(in memory)"
            lines.append(f"  model {p['index']}: {p['class']} {name}, {p['num_parameters']:,} parameters")
        fused_params = sum(t.numel() for t in self.model.parameters())
        lines.append(f"  fused: {type(self.model).__name__}, {fused_params:,} parameters")
        cfg = self.config
        lines.append(
            f"  layer cost {cfg.layer_cost}, alignment {cfg.alignment}, balancing {cfg.balancing}, solver {cfg.solver}, "
            f"ground metric {cfg.ground_metric}, {self.calibration.get('num_samples')} calibration samples"
        )
        trial = self.alignment_trial
        if trial.get("skipped"):
            lines.append(f"  alignment auto: cla without a trial ({trial['skipped']})")
        elif trial:
            tried = ", ".join(f"{m} {100 * trial['agreement'][m]:.1f} %" for m in trial["tried"])
            lines.append(
                f"  alignment auto: agreement with the parents' ensemble on {trial['samples']} samples: {tried}; "
                f"kept {trial['kept']}"
            )
        ran = Counter(name for groups in self.transport_solvers.values() for name in groups.values())
        if ran:
            counts = ", ".join(f"{name} ({n} group{'s' if n > 1 else ''})" for name, n in sorted(ran.items()))
            lines.append(f"  transport: {cfg.solver} -> {counts}")
        for pair in self.pairs:
            for s, (deep, mapping) in enumerate(zip(pair.deeper, pair.alignment)):
                shallow = pair.reference if deep == pair.model else pair.model
                lines.append(f"  segment {s}: model {shallow} layers -> model {deep} layers {mapping}")
        if self.bn_reset:
            lines.append("  BatchNorm statistics recomputed on the calibration data")
        for where, error in self.identity_errors.items():
            lines.append(f"  approximate identity block ({where}): relative error {error:.2%} on the calibration data")
        if self.finetune_history:
            kept = self.kept_earlier_epoch
            if kept is None:
                weights = "after the last one"
            else:
                weights = "before finetuning" if kept == 0 else f"after epoch {kept}"
                weights += " (the best evaluation accuracy, keep_best)"
            lines.append(f"  finetuned for {len(self.finetune_history)} epoch(s); saved weights: {weights}")
            for record in self.finetune_history:
                line = f"    epoch {record.get('epoch')}: train loss {record.get('train_loss', float('nan')):.4f}"
                if "eval_accuracy" in record:
                    line += f", eval accuracy {100 * record['eval_accuracy']:.2f}%"
                lines.append(line)
            best = best_epoch(self.finetune_history)
            if best is not None:
                lines.append(f"    best eval accuracy {100 * best['eval_accuracy']:.2f}% at epoch {best.get('epoch')}")
        total = sum(self.timings.values())
        stages = ", ".join(f"{k} {v:.3f}s" for k, v in self.timings.items())
        lines.append(f"  time {total:.3f}s ({stages})")
        return "\n".join(lines)

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        overwrite: bool = False,
        license: str | None = None,  # noqa: A002
        datasets: list[str] | None = None,
        model_name: str | None = None,
        processor: Any = None,
        max_shard_size: int | str | None = None,
    ) -> Path:
        """Write the fused model, ``fusion_config.json``, the alignment plot and a ``README.md`` model card.

        The write is atomic: files go to a temporary sibling folder that is renamed into place, so an
        interrupted save leaves nothing at the target. An existing non-empty target is refused unless
        ``overwrite=True``.

        Args:
            save_directory: the folder to create.
            overwrite: replace an existing non-empty folder.
            license: the card's license (default: the parents' license when they all agree).
            datasets: data set ids for the card's metadata.
            model_name: the card's title and ``model-index`` name.
            processor: the tokenizer / image processor saved beside the model (``save_pretrained``) so
                ``AutoTokenizer.from_pretrained(save_directory)`` works. ``None`` (the default) uses the anchor
                parent's (or another parent's) for a transformers text or vision model, found in the folder or
                Hub cache it was loaded from, and raises :class:`~hf_clafusion.SaveError` when there is none;
                ``False`` saves the model without one.
            max_shard_size: split the weights into safetensors shards of at most this size (bytes, or e.g.
                ``"2GB"``) with a ``model.safetensors.index.json``, as ``transformers``' ``save_pretrained`` does;
                ``None`` writes one file.
        """
        from .hub import save_fusion_result

        return save_fusion_result(
            self,
            save_directory,
            overwrite=overwrite,
            license=license,
            datasets=datasets,
            model_name=model_name,
            processor=processor,
            max_shard_size=max_shard_size,
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        commit_message: str | None = None,
        license: str | None = None,  # noqa: A002
        datasets: list[str] | None = None,
        processor: Any = None,
    ) -> str:
        """Save into a temporary folder and upload it to ``repo_id`` in one commit; returns the commit URL.

        See :func:`hf_clafusion.hub.push_folder_to_hub` for the arguments and errors; ``processor`` (a tokenizer /
        image processor) is uploaded beside the model.
        """
        import tempfile

        from .hub import push_folder_to_hub, save_fusion_result

        with tempfile.TemporaryDirectory() as tmp:
            folder = save_fusion_result(
                self,
                Path(tmp) / "model",
                license=license,
                datasets=datasets,
                model_name=repo_id,
                load_path=repo_id,
                processor=processor,
            )
            return push_folder_to_hub(
                folder,
                repo_id,
                private=private,
                token=token,
                revision=revision,
                create_pr=create_pr,
                commit_message=commit_message,
            )


__all__ = ["AlignmentPreview", "FusionResult", "PairAlignment", "TransportPlans", "best_epoch"]
