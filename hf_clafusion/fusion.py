"""The CLAFusion pipeline: ``fuse(models, data, config) -> FusionResult``.

Read top to bottom, :func:`fuse` is the algorithm. Each step is a stage function that takes the values it
needs and returns new ones (small frozen dataclasses); no stage reads anything an earlier stage left behind
elsewhere, and a :class:`Stopwatch` records the seconds of each stage under a fixed name:

1. :func:`prepare` (``prepare``): the models through their adapter, checked for fusability, plus the
   calibration batches, the anchor, the weights and each segment's depth roles;
2. :func:`collect_layer_activations` (``activations_layers``): activations of every hidden layer on the
   calibration data, one pass per model, when the layer cost or ``balancing="merge"`` needs them;
3. :func:`align_segments` (``layer_alignment``): cross-layer alignment per segment
   (:func:`hf_clafusion.core.align_layers`);
4. :func:`balance_depths` (``balancing``): identity layers into the shallower model
   (:func:`balance_identity`) or the deeper one's unmatched layers merged (:func:`balance_merge`);
5. :func:`collect_group_statistics` (``activations_groups``): activation statistics of every alignment group
   of the balanced models, one pass per model, for ``ground_metric="activations"`` or ``"correlation"``;
6. :func:`transport_to_anchor` (``transport``): a transport plan per group, applied to every axis of the
   group (:mod:`hf_clafusion.core.transport`; for ``ground_metric="weight_matching"``, coordinate ascent over all
   groups, :mod:`hf_clafusion.core.weight_matching`);
7. :func:`average` then :func:`load_fused` (``averaging``): the weighted average with the anchor, produced
   tensor by tensor and only then loaded into a copy of the balanced anchor;
8. :func:`repair_statistics` (``bn_reset`` or ``repair``): the statistics step after averaging
   (``FusionConfig.repair``: BatchNorm recomputation or REPAIR corrections folded into the weights,
   :mod:`hf_clafusion.repair`).

With ``alignment="auto"``, steps 4-8 run once for CLA's alignment and once for chain's where the two differ, and
:class:`AlignmentTrial` (``alignment_trial``) keeps one of the two fused models.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import functools
import itertools
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import core
from .adapters import get_adapter
from .adapters.base import Adapter, UnmatchedBlocks, capture_outputs
from .config import FusionConfig
from .data import (
    CalibrationData,
    check_input_dtype,
    densest_row,
    move_to,
    num_rows,
    prepare_calibration,
    take_rows,
)
from .errors import (
    AlignmentError,
    CalibrationDataError,
    ClaFusionError,
    ClaFusionWarning,
    ConfigError,
    IncompatibleModelsError,
    InvalidWeightsError,
)
from .repair import RepairOutcome, predictions, repair_fused
from .result import AlignmentPreview, FusionResult, PairAlignment, TransportPlans, describe_parent
from .spec import AxisRef, Group, NetworkSpec


# --------------------------------------------------------------------------------------------- public API


def fuse(
    models: Sequence[nn.Module],
    data: Any,
    config: FusionConfig | None = None,
    *,
    processor: Any = None,
    **overrides: Any,
) -> FusionResult:
    """Fuse two or more trained models of the same family, possibly of different depths and widths.

    Args:
        models (`Sequence[nn.Module]`): the parents (K >= 2), already loaded. They are not modified.
        data: calibration inputs: a tensor (the model's main input), a dict of model keyword tensors, an
            iterable of such batches (or of ``(inputs, labels)`` pairs), or a ``datasets.Dataset``.
        config (`FusionConfig`, *optional*): the settings; ``FusionConfig()`` when omitted.
        processor (*optional*): a tokenizer, image processor or transform used to preprocess raw calibration
            data (text, images); adapters find the parents' own when it is omitted.
        **overrides: field values replacing those of ``config`` (e.g. ``solver="sinkhorn"``).

    Returns:
        `FusionResult`: the fused model (same family; depth from ``balancing``, widths from ``anchor``), the
        layer alignment, costs, transport plans, timings and calibration provenance.

    Raises:
        IncompatibleModelsError: different output sizes, input sizes, segment structure or devices.
        InvalidWeightsError: a parameter is NaN or infinite.
        UnsupportedArchitectureError: no adapter handles the models, or a layer type is not supported.
        CalibrationDataError: empty or too small calibration data.
        AlignmentError: first/last-fixed constraints that cannot be met.

    Example:
        ```py
        >>> import torch
        >>> from torch import nn
        >>> from hf_clafusion import fuse
        >>> deep = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
        ...                      nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> shallow = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
        >>> result = fuse([deep, shallow], torch.randn(64, 8), progress=False)
        >>> result.layer_alignment
        [[0, 2]]
        ```

    Reference:
        Nguyen et al., "On Cross-Layer Alignment for Model Fusion of Heterogeneous Neural Networks",
        ICASSP 2023 (arXiv 2110.15538); Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020.
    """
    return run_fusion(list(models), data, resolve_config(config, overrides), processor)


def run_fusion(
    models: list[nn.Module], data: Any, config: FusionConfig, processor: Any, *, release: bool = False
) -> FusionResult:
    """:func:`fuse` on a list of parents; with ``release``, the caller hands the list over and :func:`prepare` drops
    each parent from it once prepared (``fuse_pretrained``'s own loads: a bf16 parent is then not held beside its
    float32 copy for the whole fusion)."""
    clock = Stopwatch()
    run = prepare(models, data, config, processor, clock=clock, release=release)
    activations = collect_layer_activations(run, clock=clock)
    candidates, no_trial = candidate_alignments(run, activations, clock=clock)
    with AlignmentTrial(run, clock) if len(candidates) > 1 else contextlib.nullcontext() as trial:
        built = []
        for i, alignment in enumerate(candidates):
            last = i == len(candidates) - 1
            balanced = balance_depths(run, alignment, activations, clock=clock)
            if last:
                activations = None  # read by alignment and balancing only
                return_freed_memory()
            statistics = collect_group_statistics(run, balanced, clock=clock)
            transported = transport_to_anchor(run, balanced, statistics, clock=clock)
            del statistics
            with clock("averaging"):
                tensors = average(transported.states, run.weights, anchor=run.anchor, release=True)
                total = len(transported.states[run.anchor])
                fused = load_fused(
                    balanced.models[run.anchor], _bar(tensors, "averaging", run.config, unit="tensor", total=total)
                )
            repaired = repair_statistics(fused, run, balanced, transported, clock=clock)
            # what the result reads of a candidate; its balanced parents go (they are the largest part)
            built.append(Built(alignment, balanced.identity_errors, transported, fused, repaired))
            del balanced, transported, fused
            if trial is not None:
                trial.measure(built[-1], spill=not last)
            return_freed_memory()
        kept, record = trial.keep(built) if trial is not None else (built[0], {})
    if no_trial is not None:
        record = {"tried": ["cla"], "kept": "cla", "skipped": no_trial}
    return _result(run, kept, record, clock)


def align(
    models: Sequence[nn.Module],
    data: Any,
    config: FusionConfig | None = None,
    *,
    processor: Any = None,
    **overrides: Any,
) -> AlignmentPreview:
    """Cross-layer alignment only: the layer costs, the alignment and its plot, without fusing.

    Takes the same arguments as :func:`fuse`. Use it to preview which layers will be matched.

    With ``alignment="auto"``, the preview is CLA's alignment: which of CLA's and chain's :func:`fuse` keeps is
    only known once both are fused.
    """
    clock = Stopwatch()
    run = prepare(models, data, resolve_config(config, overrides), processor, clock=clock)
    activations = collect_layer_activations(run, clock=clock)
    alignment = align_segments(run, activations, clock=clock)
    return AlignmentPreview(pairs=alignment.pairs, timings=clock.timings, config=run.config)


# --------------------------------------------------------------------------------------------- values


class Stopwatch:
    """Seconds spent in each named stage, summed over repeated entries; ``timings`` is the dict it owns.

    Example:
        ```py
        >>> clock = Stopwatch()
        >>> with clock("prepare"):
        ...     pass
        >>> list(clock.timings)
        ['prepare']
        ```
    """

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start


@dataclass(frozen=True)
class SegmentRoles:
    """Depth roles of one segment across the K models.

    Attributes:
        depths: hidden layers of the segment in each model.
        reference: the model whose depth the balanced segment takes (the anchor when it has that depth).
    """

    depths: tuple[int, ...]
    reference: int


@dataclass(frozen=True)
class Prepared:
    """What every later stage reads, fixed once the models and data are checked (:func:`prepare`).

    Attributes:
        config: the resolved settings.
        adapter: the family's adapter (stateless; one instance for the whole run).
        device: where the fusion runs.
        parents: identity cards of the user's models (:func:`~hf_clafusion.result.describe_parent`).
        models: the adapter's prepared copies of the parents, on ``device``, in eval mode.
        specs: the network description of each prepared model.
        anchor: index of the model whose widths and neuron basis the fused model takes.
        weights: averaging weight of each model (sum to 1 unless the user chose otherwise).
        calibration: the calibration data and its provenance.
        batches: the calibration batches on ``device``.
        segments: depth roles of each segment.
        repair_batches: the batches statistics repair measures on (``config.repair_samples`` samples of the
            same data; the calibration batches when that is None).
    """

    config: FusionConfig
    adapter: Adapter
    device: torch.device
    parents: tuple[dict[str, Any], ...]
    models: tuple[nn.Module, ...]
    specs: tuple[NetworkSpec, ...]
    anchor: int
    weights: tuple[float, ...]
    calibration: CalibrationData
    batches: tuple[Any, ...]
    segments: tuple[SegmentRoles, ...]
    repair_batches: tuple[Any, ...] = ()


@dataclass(frozen=True)
class LayerActivations:
    """Hidden-layer activations of the prepared models on the calibration data (:func:`collect_layer_activations`).

    Attributes:
        full: per model, per hidden layer (network order), the ``(samples, ...)`` float activations; ``None``
            when neither the layer cost nor ``balancing="merge"`` needs them.
        minibatch: ``(segment, model, reference)`` -> streamed CKA accumulator, for ``layer_cost="cka_minibatch"``.
    """

    full: list[list[torch.Tensor]] | None = None
    minibatch: dict[tuple[int, int, int], core.MinibatchCKA] = field(default_factory=dict)


@dataclass(frozen=True)
class Alignment:
    """The cross-layer alignment (:func:`align_segments`).

    Attributes:
        pairs: one :class:`~hf_clafusion.result.PairAlignment` per aligned model, as reported to users.
        local: ``(segment, model)`` -> for each layer of the shallower model of the pair in that segment, its
            position (counted from the segment's first layer) in the deeper one.
    """

    pairs: list[PairAlignment]
    local: dict[tuple[int, int], list[int]]


@dataclass(frozen=True)
class Balanced:
    """The depth-balanced models (:func:`balance_depths`): equal segment depths and alignment groups.

    Attributes:
        models: one balanced copy per parent, on the run's device, in eval mode.
        specs: their network descriptions.
        identity_errors: ``"model <k>, <segment>.<position>"`` -> relative error of every approximate identity
            block inserted; empty when every inserted block is exact.
        unmatched: non-anchor model index -> its inserted blocks, fused in closed form (``fusion_math.md``
            §6.4: no statistics, no plan, no forward pass through them); empty on the explicit route. The
            inserted blocks of such a model are placeholders (post-LN ones are not fitted, so they are not
            identities): a stage that needs that parent's function runs ``Prepared.models[k]`` and reads its
            activations through ``unmatched[k].captures``.
    """

    models: tuple[nn.Module, ...]
    specs: tuple[NetworkSpec, ...]
    identity_errors: dict[str, float]
    unmatched: dict[int, UnmatchedBlocks] = field(default_factory=dict)


@dataclass(frozen=True)
class Transported:
    """Every model expressed in the anchor's neuron basis (:func:`transport_to_anchor`).

    Attributes:
        states: model index -> its aligned state dict (the anchor's own state dict for the anchor).
        plans: non-anchor model index -> anchor group name -> its ``(n_model, n_anchor)`` float plan on CPU (a
            :class:`~hf_clafusion.result.TransportPlans`: exact plans are kept sparse, dense when read).
        solvers: non-anchor model index -> anchor group name -> the solver that computed its plan (``"heads"``
            for head-structured plans; what ``solver="auto"`` chose otherwise).
    """

    states: dict[int, dict[str, torch.Tensor]]
    plans: dict[int, TransportPlans]
    solvers: dict[int, dict[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Built:
    """One fused model and what the result reports of it (one per candidate alignment, :func:`run_fusion`).

    Attributes:
        alignment: the layer alignment it was fused with.
        identity_errors: ``Balanced.identity_errors`` of its depth balancing.
        transported: its plans and solvers (averaging empties the non-anchor states; the anchor's are the parent's).
        fused: the fused model, repaired.
        repaired: what the statistics step did.
    """

    alignment: Alignment
    identity_errors: dict[str, float]
    transported: Transported
    fused: nn.Module
    repaired: RepairOutcome


# --------------------------------------------------------------------------------------------- stages


def prepare(
    models: Sequence[nn.Module],
    data: Any,
    config: FusionConfig,
    processor: Any = None,
    *,
    clock: Stopwatch,
    release: bool = False,
) -> Prepared:
    """Check the models and the settings, prepare the models through their adapter and the calibration data.

    With ``release``, ``models`` must be a list the caller hands over: each entry is set to ``None`` as soon as its
    prepared copy exists, so a parent the caller loaded itself is freed where the prepared copy does not share its
    tensors (a bf16 parent converted to float32).

    Raises:
        IncompatibleModelsError: fewer than 2 models, different families, devices, input/output sizes or
            segment counts, or what the adapter refuses.
        ConfigError: ``weights`` or ``anchor`` do not fit the number of models.
        InvalidWeightsError: a parameter or buffer is NaN or infinite.
    """
    if not release:
        models = list(models)
    if len(models) < 2:
        raise IncompatibleModelsError(f"Fusion needs at least 2 models, got {len(models)}. Pass a list of models.")
    if config.weights is not None and len(config.weights) != len(models):
        raise ConfigError(
            f"`weights` has {len(config.weights)} entries but {len(models)} models were given; give one per model.",
            field="weights",
        )
    with clock("prepare"):
        adapters = [get_adapter(m) for m in models]
        names = {a.name for a in adapters}
        if len(names) > 1:
            raise IncompatibleModelsError(
                f"The models belong to different families: {sorted(names)}. Only models of one family can be fused."
            )
        adapter = adapters[0]
        device = _device(models, config)
        parents = tuple(describe_parent(m, i) for i, m in enumerate(models))
        for i, model in enumerate(models):
            _check_finite(model, i)
        prepared = []
        for i, model in enumerate(models):
            prepared.append(adapter.prepare(model).to(device))
            if release:
                models[i] = model = None
        prepared = tuple(prepared)
        specs = tuple(adapter.spec(m) for m in prepared)
        adapter.check_compatible(prepared)  # the family's own checks first: their messages are the specific ones
        _check_compatible(specs)
        anchor = _anchor_index(config, specs)
        weights = tuple(config.weights or [1.0 / len(models)] * len(models))
        calibration = prepare_calibration(
            adapter.prepare_data(data, prepared, processor, config),
            num_samples=config.num_samples,
            batch_size=config.batch_size,
            seed=config.seed,
        )
        batches = tuple(move_to(b, device) for b in calibration.batches)
        check_input_dtype(batches[0], prepared[0], "calibration")
        repair_batches = batches
        if config.repair_samples is not None and config.repair is not None:
            repair_batches = tuple(
                move_to(b, device)
                for b in prepare_calibration(
                    adapter.prepare_data(data, prepared, processor, config),
                    num_samples=config.repair_samples,
                    batch_size=config.batch_size,
                    seed=config.seed,
                ).batches
            )
        return Prepared(
            config=config,
            adapter=adapter,
            device=device,
            parents=parents,
            models=prepared,
            specs=specs,
            anchor=anchor,
            weights=weights,
            calibration=calibration,
            batches=batches,
            repair_batches=repair_batches,
            segments=_segment_roles(specs, anchor, config.balancing),
        )


def collect_layer_activations(run: Prepared, *, clock: Stopwatch) -> LayerActivations:
    """Activations of every hidden layer of the prepared models, one pass over the calibration data per model.

    Kept whole for ``layer_cost`` in ``("cka", "cca", "wasserstein")`` and for ``balancing="merge"`` (its
    pre-activations), streamed into CKA accumulators for ``"cka_minibatch"``; nothing for the other costs.
    """
    cost = run.config.layer_cost
    needs_full = cost in ("cka", "cca", "wasserstein") or run.config.balancing == "merge"
    needs_stream = cost == "cka_minibatch"
    if not (needs_full or needs_stream):
        return LayerActivations()
    minibatch: dict[tuple[int, int, int], core.MinibatchCKA] = {}
    with clock("activations_layers"), torch.no_grad():
        captures = [[layer.capture for seg in spec.segments for layer in seg.layers] for spec in run.specs]
        stored: list[list[list[torch.Tensor]]] = [[[] for _ in c] for c in captures]
        for batch in _bar(run.batches, "layer activations", run.config, unit="batch"):
            per_model = []
            for k, model in enumerate(run.models):
                with capture_outputs(model, captures[k]) as out:
                    _forward(run.adapter, model, batch, k)
                acts = [run.adapter.layer_features(out[name], batch) for name in captures[k]]
                per_model.append(acts)
                if needs_full:
                    for i, a in enumerate(acts):
                        stored[k][i].append(a.float())
            if needs_stream:
                _update_minibatch(minibatch, run, per_model)
        full = [[torch.cat(chunks) for chunks in model_chunks] for model_chunks in stored] if needs_full else None
    return LayerActivations(full=full, minibatch=minibatch)


def candidate_alignments(
    run: Prepared, activations: LayerActivations, *, clock: Stopwatch
) -> tuple[list[Alignment], str | None]:
    """The alignments to fuse with: ``config.alignment``'s; for ``"auto"``, CLA's and, where it differs, chain's.

    Returns:
        The alignments, and why ``"auto"`` fuses with CLA's alone although chain's differs (None otherwise): its
        trial compares predictions with the parents' ensemble, which needs a prediction head.
    """
    alignment = align_segments(run, activations, clock=clock)
    if run.config.alignment != "auto":
        return [alignment], None
    chain = align_segments(run, activations, clock=clock, method="chain")
    if chain.local == alignment.local:
        return [alignment], None
    if not run.adapter.predicts(run.models[run.anchor]):
        name = type(run.models[run.anchor]).__name__
        return [alignment], f"{name} has no prediction head: its outputs cannot be compared with an ensemble's"
    return [alignment, chain], None


def align_segments(
    run: Prepared, activations: LayerActivations, *, clock: Stopwatch, method: str | None = None
) -> Alignment:
    """Cross-layer alignment of every non-reference model to each segment's reference, segment by segment.

    ``method`` replaces ``config.alignment`` (``"auto"`` aligns as ``"cla"``).
    """
    method = method or run.config.alignment
    with clock("layer_alignment"):
        num_segments = len(run.segments)
        by_pair: dict[tuple[int, int], PairAlignment] = {}
        local: dict[tuple[int, int], list[int]] = {}
        for s, k, ref in _pairs_to_align(run):
            deep, shallow = _roles(run.segments[s], k, ref)
            m, n = run.segments[s].depths[deep], run.segments[s].depths[shallow]
            cost = _segment_cost(run, activations, s, k, ref, deep, shallow)
            mapping = _segment_alignment(run, cost, m, n, s, method)
            if method in ("cla", "auto"):  # where the costs choose
                _warn_if_costs_tie(run.config, cost, m, n, s, k, ref)
            local[(s, k)] = mapping
            pair = by_pair.get((k, ref)) or by_pair.get((ref, k))
            if pair is None:  # reported as (aligned model, the anchor or the other model)
                model, other = (ref, k) if k == run.anchor else (k, ref)
                pair = by_pair[(model, other)] = PairAlignment(
                    model=model,
                    reference=other,
                    deeper=[other] * num_segments,
                    alignment=[[] for _ in range(num_segments)],
                    costs=[torch.zeros(0, 0, dtype=torch.float64) for _ in range(num_segments)],
                    offsets=[0] * num_segments,
                )
            offset = _segment_slice(run.specs[deep], s).start
            pair.deeper[s] = deep
            pair.alignment[s] = [offset + a for a in mapping]
            pair.costs[s] = cost
            pair.offsets[s] = offset
        return Alignment(pairs=[by_pair[key] for key in sorted(by_pair)], local=local)


def balance_depths(
    run: Prepared, alignment: Alignment, activations: LayerActivations, *, clock: Stopwatch
) -> Balanced:
    """Give every model the reference's segment depths, by ``config.balancing``, and check that they line up.

    Raises:
        AlignmentError: the balanced models' segment depths or group counts differ (a bug).
    """
    with clock("balancing"):
        unmatched: dict[int, UnmatchedBlocks] = {}
        if run.config.balancing == "identity":
            models, identity_errors, unmatched = balance_identity(run, alignment)
        else:
            models, identity_errors = balance_merge(run, alignment, activations), {}
        models = tuple(m.to(run.device).eval() for m in models)
        specs = tuple(run.adapter.spec(m) for m in models)
        _check_balanced(specs, run.anchor)
    return Balanced(models=models, specs=specs, identity_errors=identity_errors, unmatched=unmatched)


def balance_identity(
    run: Prepared, alignment: Alignment
) -> tuple[list[nn.Module], dict[str, float], dict[int, UnmatchedBlocks]]:
    """Insert identity layers into every model shallower than a segment's reference, where alignment leaves gaps.

    Where the closed form of ``fusion_math.md`` §6.4 applies (``config.unmatched`` is ``"average"`` or
    ``"transplant"``, the model is not the anchor, the anchor is the template of the inserted blocks and the
    adapter gives :meth:`~hf_clafusion.adapters.Adapter.unmatched_blocks` for the layout), the inserted blocks are placeholders
    that later stages skip: nothing is fitted for them and no statistics are collected through them.

    Returns:
        The balanced models (the prepared model itself where nothing is inserted), the relative error of every
        approximate identity block, keyed ``"model <k>, <segment>.<position>"``, and the inserted blocks of the
        models balanced for the closed form (model index -> :class:`~hf_clafusion.adapters.base.UnmatchedBlocks`).
    """
    balanced = list(run.models)
    identity_errors: dict[str, float] = {}
    closed: dict[int, UnmatchedBlocks] = {}
    for k in range(len(run.models)):
        layouts = []
        for s, seg in enumerate(run.segments):
            depth, target = seg.depths[k], seg.depths[seg.reference]
            if depth == target:
                layouts.append(list(range(depth)))
                continue
            layout: list[int | None] = [None] * target
            for own, position in enumerate(alignment.local[(s, k)]):
                layout[position] = own
            layouts.append(layout)
        if any(None in layout for layout in layouts):
            t = _template_for(run.segments, k)
            if _has_closed_form(run, k, t):
                candidate, _ = run.adapter.insert_identity(run.models[k], layouts, run.models[t], fit=False)
                blocks = run.adapter.unmatched_blocks(run.models[k], layouts, run.adapter.spec(candidate))
                if blocks is not None:
                    balanced[k], closed[k] = candidate, blocks
                    continue
            balanced[k], errors = run.adapter.insert_identity(
                run.models[k], layouts, run.models[t], batches=run.batches
            )
            identity_errors.update({f"model {k}, {key}": err for key, err in errors.items()})
    return balanced, identity_errors, closed


def _has_closed_form(run: Prepared, k: int, template: int) -> bool:
    """Whether model ``k``'s inserted blocks can be fused in closed form (§6.4): the anchor is their template."""
    overrides = type(run.adapter).unmatched_blocks is not Adapter.unmatched_blocks
    return run.config.unmatched != "identity" and k != run.anchor and template == run.anchor and overrides


def balance_merge(run: Prepared, alignment: Alignment, activations: LayerActivations) -> list[nn.Module]:
    """Merge the layers of every model deeper than a segment's reference that the alignment leaves unmatched."""
    balanced = list(run.models)
    for k in range(len(run.models)):
        keeps = []
        for s, seg in enumerate(run.segments):
            if seg.depths[k] == seg.depths[seg.reference]:
                keeps.append(list(range(seg.depths[k])))
            else:
                keeps.append(alignment.local[(s, k)])
        if any(len(keep) < seg.depths[k] for keep, seg in zip(keeps, run.segments)):
            captures = [layer.capture for seg in run.specs[k].segments for layer in seg.layers]
            preacts = dict(zip(captures, activations.full[k]))
            balanced[k] = run.adapter.merge_layers(run.models[k], keeps, preacts, run.config.relu_approx)
    return balanced


def collect_group_statistics(
    run: Prepared, balanced: Balanced, *, clock: Stopwatch
) -> dict[int, list[core.ActivationStats | None]]:
    """Activation statistics of every alignment group, non-anchor model against the anchor, for
    ``ground_metric="activations"`` (one pass over the calibration data per model); ``{}`` otherwise.

    A model balanced for the closed form (``balanced.unmatched``) runs at its own depth, before balancing:
    its inserted blocks would only pass their input through, so their output is read where the stream leaves the
    last own block before them, and the groups inside them get no statistics (``None``).

    Returns:
        Non-anchor model index -> one :class:`~hf_clafusion.core.ActivationStats` (or ``None``) per group, in
        group order.
    """
    if run.config.ground_metric not in ("activations", "correlation"):
        return {}
    others = [k for k in range(len(run.models)) if k != run.anchor]
    groups = {k: balanced.specs[k].groups for k in range(len(run.models))}
    skip = {k: balanced.unmatched[k].groups if k in balanced.unmatched else frozenset() for k in others}
    statistics: dict[int, list[core.ActivationStats | None]] = {
        k: [None if g.name in skip[k] else core.ActivationStats() for g in groups[k]] for k in others
    }
    # what each model runs, and which of its captures stands for each balanced capture
    runner = {k: run.models[k] if k in balanced.unmatched else m for k, m in enumerate(balanced.models)}
    rename: dict[int, dict[str, str]] = {}
    used = [g for g in range(len(groups[run.anchor])) if any(statistics[k][g] is not None for k in others)]
    for k in range(len(run.models)):
        needed = [c for g in used if k == run.anchor or statistics[k][g] is not None for c in groups[k][g].captures]
        mapping = balanced.unmatched[k].captures if k in balanced.unmatched else {}
        rename[k] = {c: mapping.get(c, c) for c in dict.fromkeys(needed)}
    with clock("activations_groups"), torch.no_grad():
        for k in others:
            for group_b, group_a in zip(groups[k], groups[run.anchor]):
                if len(group_b.captures) != len(group_a.captures):
                    raise AlignmentError(
                        f"Group {group_a.name!r} is captured at {len(group_b.captures)} points in model {k} but "
                        f"{len(group_a.captures)} in the anchor after balancing; this is a bug, please report it."
                    )
        # each group's (model capture, anchor capture) pairs, in the order they are added into its statistics
        pairs = {
            (k, g): [
                ((k, rename[k][name_b]), (run.anchor, rename[run.anchor][name_a]))
                for name_b, name_a in zip(groups[k][g].captures, groups[run.anchor][g].captures)
            ]
            for k in others
            for g, stats in enumerate(statistics[k])
            if stats is not None
        }
        order = _statistics_order(run, groups, pairs)
        chunk = _statistics_chunk_rows(run, runner[order[0]], list(dict.fromkeys(rename[order[0]].values())), order[0])
        for batch in _bar(run.batches, "group activations", run.config, unit="batch"):
            rows = num_rows(batch)
            for begin in range(0, rows, chunk or rows):
                part = batch if chunk is None else take_rows(batch, slice(begin, begin + chunk))
                _stream_statistics(run, runner, rename, pairs, statistics, part, order)
                return_freed_memory()  # the captures just freed, or the next chunk's land on new pages
    return statistics


#: The statistics pass keeps the captures of the first model it runs until the other model's forward pass has read
#: them. A batch whose kept captures would take more than a third of the float32 bytes of the parents and the fused
#: model (the memory target's unit), or more than this many bytes if that is larger, runs in equal chunks of rows
#: that fit: the same statistics up to float rounding, and memory bounded whatever the batch size and sequence
#: length. A third leaves room for the float64 statistics and the forward pass within 1.25x those bytes (BERT-base
#: at 256 tokens: 3 x 11 rows, peak 1.21x; 2 x 16 rows, 1.40x; MiniLM at 128 tokens: 2 x 16 rows, 0.91-1.09x, whole
#: batches 1.13-1.30x); it is not lower because smaller forward passes are slower on CPU (6 rows per pass: about
#: 30 %). The floor of 64 MiB keeps small models' batches whole.
STATISTICS_CAPTURE_BYTES = 2**26


def _statistics_chunk_rows(run: Prepared, model: nn.Module, captures: list[str], k: int) -> int | None:
    """Rows per forward pass of the statistics pass, or None for whole batches (when a batch's kept captures fit
    the budget of :data:`STATISTICS_CAPTURE_BYTES`), from the captures of a one-row forward pass of ``model``
    (model ``k``, whose captures are kept) on the row of the first batch with the most attended positions."""
    rows = max(num_rows(b) for b in run.batches)
    if rows < 2:
        return None
    row = densest_row(run.batches[0])
    probe = take_rows(run.batches[0], slice(row, row + 1))
    per_sample = run.config.positions_per_sample
    size = 0

    def measure(name: str, value: torch.Tensor) -> None:
        nonlocal size
        features = core.evenly_spaced_rows(run.adapter.features(value, probe), per_sample)
        size += features.numel() * features.element_size()

    with capture_outputs(model, captures, on_capture=measure):
        _forward(run.adapter, model, probe, k)
    weights = sum(4 * p.numel() for m in [*run.models, run.models[run.anchor]] for p in m.parameters())
    fit = max(1, max(STATISTICS_CAPTURE_BYTES, weights // 3) // max(size, 1))
    if fit >= rows:
        return None
    chunks = -(-rows // fit)
    return -(-rows // chunks)  # equal chunks: 2 x 16 rows rather than 30 + 2


def _stream_statistics(
    run: Prepared,
    runner: dict[int, nn.Module],
    rename: dict[int, dict[str, str]],
    pairs: dict[tuple[int, int], list[tuple[tuple[int, str], tuple[int, str]]]],
    statistics: dict[int, list[core.ActivationStats | None]],
    batch: Any,
    order: list[int],
) -> None:
    """One batch into the group statistics, each capture freed once every pair that reads it is added.

    The first model runs keeping its captures (as features); the others' captures are added as their forward
    pass produces them, so at most one model's captures are alive at a time instead of every model's. Each
    group's pairs are added in their own order, as a whole-batch pass would add them: the statistics are the same.
    """
    per_sample = run.config.positions_per_sample
    rows = None if per_sample is None else per_sample * num_rows(batch)
    uses: dict[tuple[int, str], int] = {}
    for group_pairs in pairs.values():
        for pair in group_pairs:
            for key in pair:
                uses[key] = uses.get(key, 0) + 1
    features: dict[tuple[int, str], torch.Tensor] = {}
    cursor = dict.fromkeys(pairs, 0)

    def add_ready() -> None:
        for (k, g), group_pairs in pairs.items():
            while cursor[(k, g)] < len(group_pairs):
                key_b, key_a = group_pairs[cursor[(k, g)]]
                if key_b not in features or key_a not in features:
                    break
                statistics[k][g].update(features[key_b], features[key_a])
                cursor[(k, g)] += 1
                for key in (key_b, key_a):
                    uses[key] -= 1
                    if not uses[key]:
                        del features[key]

    for k in order:
        seen: set[str] = set()

        def keep(name: str, value: torch.Tensor, k: int = k, seen: set[str] = seen) -> None:
            if name in seen:
                raise AlignmentError(
                    f"Capture {name!r} of model {k} ran twice in one forward pass; statistics need one value per "
                    "capture. Capture a module that runs once."
                )
            seen.add(name)
            features[(k, name)] = core.evenly_spaced_rows(run.adapter.features(value, batch), rows)
            add_ready()

        with capture_outputs(runner[k], list(dict.fromkeys(rename[k].values())), on_capture=keep):
            _forward(run.adapter, runner[k], batch, k)
    missing = sorted({pairs[key][at] for key, at in cursor.items() if at < len(pairs[key])})
    if missing:
        raise AlignmentError(
            f"No activations were captured at {missing[:4]} ((model, capture) pairs) during a forward pass; this is "
            "a bug, please report it."
        )


def _statistics_order(
    run: Prepared, groups: dict[int, tuple[Group, ...]], pairs: dict[tuple[int, int], list[tuple[Any, Any]]]
) -> list[int]:
    """The models in the order the statistics pass runs them: the anchor first when several models read its
    captures; of two models, the one whose captures to keep are smaller (estimated from their groups' widths)."""
    if len(groups) > 2:
        return [run.anchor] + [k for k in groups if k != run.anchor]
    widths: dict[tuple[int, str], int] = {}
    for (k, g), group_pairs in pairs.items():
        for key_b, key_a in group_pairs:
            widths[key_b] = max(widths.get(key_b, 0), groups[k][g].width)
            widths[key_a] = max(widths.get(key_a, 0), groups[run.anchor][g].width)
    kept = {k: sum(w for (model, _), w in widths.items() if model == k) for k in groups}
    return sorted(groups, key=lambda k: (kept[k], k != run.anchor))


def transport_to_anchor(
    run: Prepared,
    balanced: Balanced,
    statistics: dict[int, list[core.ActivationStats | None]],
    *,
    clock: Stopwatch,
) -> Transported:
    """Transport every non-anchor balanced model into the anchor's neuron basis, group by group.

    Each group's plan comes from its activation statistics (``ground_metric="activations"`` or
    ``"correlation"``) or from the distances between the groups' primary weights, and is applied to every axis of
    the group. With ``ground_metric="weight_matching"`` these one-pass weight plans are the start of Git Re-Basin
    weight matching (:func:`hf_clafusion.core.weight_matching`), whose plans replace them. The statistics
    are consumed: each is turned into its float32 cost (:func:`_group_costs`) before any plan is solved, and
    each cost is dropped once its plan is computed, to free the ``(n_model, n_anchor)`` matrices early.
    """
    anchor_state = balanced.models[run.anchor].state_dict()
    plans: dict[int, TransportPlans] = {}
    solvers: dict[int, dict[str, str]] = {}
    states: dict[int, dict[str, torch.Tensor]] = {run.anchor: anchor_state}
    with clock("transport"):
        costs = _group_costs(run, statistics)
        return_freed_memory()  # the statistics pass's captures and the float64 moments
        for k in range(len(run.models)):
            if k == run.anchor:
                continue
            # apply_plan returns new tensors: the balanced model's own tensors are never written to
            work = dict(balanced.models[k].state_dict())
            unmatched = balanced.unmatched.get(k, UnmatchedBlocks())
            groups_b, groups_a = balanced.specs[k].groups, balanced.specs[run.anchor].groups
            plans[k], solvers[k] = TransportPlans(), {}
            exact: dict[str, torch.Tensor] = {}  # float64 plans: the start of weight matching
            jobs = [g for g, group_b in enumerate(groups_b) if group_b.name not in unmatched.groups]

            # Activation costs are independent per group, so their plans are solved concurrently (EMD and the
            # assignment release the GIL); weight costs read the tensors earlier plans moved, so they run in order.
            independent = run.config.ground_metric in ("activations", "correlation")
            solve = functools.partial(_group_plan, run, k, groups_b, groups_a, costs, work, anchor_state)
            alone: list[tuple[Group, torch.Tensor]] = []  # anchor neurons a partial assignment left without a partner
            solved = _in_order(
                solve,
                jobs,
                _transport_workers(run.config, [groups_b[g].width * groups_a[g].width for g in jobs])
                if independent
                else 1,
            )
            for g, (plan, solver, heads) in zip(
                jobs, _bar(solved, f"transport model {k}", run.config, unit="group", total=len(jobs))
            ):
                group_b, group_a = groups_b[g], groups_a[g]
                solvers[k][group_a.name] = solver
                _apply_group_plan(work, group_b, plan, heads, unmatched, run.config.plan_normalization)
                if solver == "partial":  # kept as indices: the dense plan is not held until every plan has run
                    alone.append((group_b, (plan.sum(0) == 0).nonzero().squeeze(1)))
                plans[k][group_a.name] = plan
                if run.config.ground_metric == "weight_matching":
                    exact[group_a.name] = plan.double().cpu()
                del plan
            for group_b, neurons in alone:  # after every plan: a filled slice is in the anchor's basis on all axes
                _keep_anchor_neurons(work, anchor_state, group_b, neurons, unmatched)
            if run.config.ground_metric == "weight_matching":
                work, plans[k], solvers[k] = _weight_matching(run, balanced, k, exact, solvers[k], unmatched)
            _closed_form_blocks(work, anchor_state, unmatched, run.config.unmatched)
            states[k] = work
    return Transported(states=states, plans=plans, solvers=solvers)


def _group_costs(
    run: Prepared, statistics: dict[int, list[core.ActivationStats | None]]
) -> dict[int, list[torch.Tensor | None]]:
    """Each group's ``(n_model, n_anchor)`` activation cost from its statistics, stored in float32; the statistics
    are consumed (each entry set to ``None`` as soon as its cost exists).

    The distances are formed in float64 from the central moments, so nothing cancels, and only then rounded: a
    relative error of 6e-8 per entry, below that of the float32 activations they summarise. Every group waits for
    its plan as a float32 cost instead of float64 cross moments, half the memory (BERT-base 12 + 6: 232 MiB instead
    of 464 MiB when the plans start).
    """
    correlation = run.config.ground_metric == "correlation"
    costs: dict[int, list[torch.Tensor | None]] = {}
    for k, per_group in statistics.items():
        costs[k] = []
        for g, stats in enumerate(per_group):
            per_group[g] = None
            if stats is None:
                costs[k].append(None)
                continue
            cost = stats.correlation_distances() if correlation else stats.distances()
            del stats
            costs[k].append(cost.float())
            del cost
    return costs


def _group_plan(
    run: Prepared,
    k: int,
    groups_b: Sequence[Group],
    groups_a: Sequence[Group],
    costs: dict[int, list[torch.Tensor | None]],
    work: dict[str, torch.Tensor],
    anchor_state: dict[str, torch.Tensor],
    g: int,
) -> tuple[torch.Tensor, str, int]:
    """Group ``g``'s plan from model ``k`` to the anchor, the solver that computed it and the heads kept whole.

    The cost is the group's activation cost from :func:`_group_costs` (consumed: ``costs[k][g]`` is set to
    ``None``) or the distance between its primary weights in ``work``, which must already hold every earlier
    group's plan.
    """
    group_b, group_a = groups_b[g], groups_a[g]
    if run.config.ground_metric in ("activations", "correlation"):
        cost, costs[k][g] = costs[k][g].double(), None  # free the float32 cost once used
    else:
        primary_b, primary_a = _primary_axis(group_b, work), _primary_axis(group_a, anchor_state)
        cost = core.weight_distances(
            core.neuron_rows(work[primary_b.param], primary_b),
            core.neuron_rows(anchor_state[primary_a.param], primary_a),
        )
    heads = _heads(run.config, group_b, group_a, k)
    if heads > 1:
        return core.head_plan(cost, heads, within=group_a.head_dims_free), "heads", heads
    if _partial(run.config, group_b, cost):
        return core.partial_assignment(cost), "partial", heads
    solution = core.solve_transport(cost, solver=run.config.solver, reg=run.config.reg)
    return solution.plan, solution.solver, heads


def _partial(config: FusionConfig, group: Group, cost: torch.Tensor) -> bool:
    """Whether ``group``'s plan is a partial assignment (``width_matching="partial"``): the model is narrower than
    the anchor there, the solver is exact and no axis repeats the plan per head."""
    n_b, n_a = cost.shape
    return (
        config.width_matching == "partial"
        and n_b < n_a
        and config.solver in ("auto", "emd")
        and config.ground_metric != "weight_matching"
        and all(axis.repeat == 1 for axis in group.axes)
    )


def _keep_anchor_neurons(
    work: dict[str, torch.Tensor],
    anchor_state: dict[str, torch.Tensor],
    group: Group,
    alone: torch.Tensor,
    unmatched: UnmatchedBlocks,
) -> None:
    """At the anchor neurons ``alone`` (indices) that a partial assignment left without a partner, give model
    ``k``'s aligned tensors the anchor's values along every output axis of ``group``, in place (new tensors): the
    weighted average then keeps the anchor's neurons there whole, whatever the weights."""
    if alone.numel() == 0:
        return
    for axis in group.axes:
        if axis.role != "out" or axis.param in unmatched.params:
            continue
        # the transported axis holds `outer` blocks of `n_A * inner` entries (apply_plan's layout)
        n_a = work[axis.param].shape[axis.axis] // (axis.outer * axis.inner)
        offsets = torch.arange(axis.outer, device=alone.device)[:, None, None] * (n_a * axis.inner)
        index = offsets + alone[None, :, None] * axis.inner + torch.arange(axis.inner, device=alone.device)
        index = index.reshape(-1).to(work[axis.param].device)
        source = anchor_state[axis.param].to(work[axis.param].device, work[axis.param].dtype)
        work[axis.param] = work[axis.param].index_copy(axis.axis, index, source.index_select(axis.axis, index))


#: With ``transport_threads=None``, plans are solved on several threads only when some group has at least this
#: many ``n_B x n_A`` neuron pairs: below it an exact solve takes well under a second, and a second solver running
#: at once would only add its working set to the peak memory (measured: ``docs/transformers.md``).
CONCURRENT_TRANSPORT_PAIRS = 2048 * 2048


def _transport_workers(config: FusionConfig, sizes: Sequence[int]) -> int:
    """Threads that solve independent transport plans at once, for groups of ``sizes`` neuron pairs:
    ``config.transport_threads``, or one per thread torch may use where a group is wide
    (:data:`CONCURRENT_TRANSPORT_PAIRS`), else one; at most one per group."""
    wide = max(sizes, default=0) >= CONCURRENT_TRANSPORT_PAIRS
    threads = config.transport_threads or (torch.get_num_threads() if wide else 1)
    return max(1, min(threads, len(sizes)))


def _in_order(function: Callable[[Any], Any], items: Sequence[Any], workers: int) -> Iterator[Any]:
    """``function(item)`` for every item, yielded in order, computed by up to ``workers`` threads.

    At most ``2 * workers`` results are computed ahead of the one being consumed, so memory stays bounded
    (a transport plan and its cost matrix per job in flight). ``workers=1`` runs everything in the caller's
    thread. An exception raised by ``function`` is raised here, for the item it belongs to.
    """
    if workers <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="hf_clafusion") as pool:
        pending: deque[Future] = deque()
        upcoming = iter(items)
        for item in itertools.islice(upcoming, 2 * workers):
            pending.append(pool.submit(function, item))
        try:
            while pending:
                result = pending.popleft().result()
                for item in itertools.islice(upcoming, 1):
                    pending.append(pool.submit(function, item))
                yield result
        finally:
            for future in pending:
                future.cancel()


def _apply_group_plan(
    work: dict[str, torch.Tensor],
    group: Group,
    plan: torch.Tensor,
    heads: int,
    unmatched: UnmatchedBlocks,
    normalization: str,
) -> None:
    """Transport every axis of ``group`` in ``work`` by ``plan`` ``(n_model, n_anchor)``, in place (new tensors)."""
    r_map, s_map = core.plan_maps(plan, normalization)
    found = {"out": core.permutation_of(r_map)}  # a hard plan is a permutation: tensors are gathered
    found["in"] = found["out"] if s_map is r_map or torch.equal(s_map, r_map) else core.permutation_of(s_map)
    for axis in group.axes:
        if axis.param in unmatched.params:
            continue
        matrix = r_map if axis.role == "out" else s_map
        permutation = found[axis.role]
        if axis.repeat > 1:
            matrix, permutation = core.expand_head_plan(matrix, max(heads, 1), axis.repeat), None
        work[axis.param] = core.apply_plan(
            work[axis.param], axis.axis, matrix, inner=axis.inner, outer=axis.outer, permutation=permutation
        )


#: Sweeps over all groups after which ``ground_metric="weight_matching"`` stops even if plans still change.
WEIGHT_MATCHING_SWEEPS = 100


def _weight_matching(
    run: Prepared,
    balanced: Balanced,
    k: int,
    one_pass: dict[str, torch.Tensor],
    one_pass_solvers: dict[str, str],
    unmatched: UnmatchedBlocks,
) -> tuple[dict[str, torch.Tensor], TransportPlans, dict[str, str]]:
    """Git Re-Basin weight matching of model ``k`` to the anchor, from the one-pass weight plans
    (:func:`hf_clafusion.core.weight_matching`), then the final plans applied to ``k``'s balanced state.

    The objective sums over the models' parameters (not their buffers). Groups inside inserted blocks
    (``unmatched``) take no part, nor do their parameters: they are replaced in closed form. Returns ``k``'s
    aligned state, its plans and solvers, by anchor group name.
    """
    # parameters only, as Git Re-Basin: buffers (BatchNorm running statistics, whose variances dwarf the weights'
    # inner products) follow the plans but do not choose them
    learned = {name for name, _ in balanced.models[k].named_parameters()}
    state = balanced.models[k].state_dict()
    state_b = {n: t for n, t in state.items() if n in learned and n not in unmatched.params}
    state_a = balanced.models[run.anchor].state_dict()
    pairs = [
        (b, a)
        for b, a in zip(balanced.specs[k].groups, balanced.specs[run.anchor].groups)
        if b.name not in unmatched.groups
    ]
    heads = [_heads(run.config, b, a, k) for b, a in pairs]
    groups = [core.MatchGroup(b.axes, heads=h, head_dims_free=a.head_dims_free) for (b, a), h in zip(pairs, heads)]
    solver = run.config.solver  # sinkhorn is refused by FusionConfig for weight matching
    found = core.weight_matching(
        state_b,
        state_a,
        groups,
        init=[one_pass[a.name] for _, a in pairs],
        solver=solver,
        normalization=run.config.plan_normalization,
        max_sweeps=WEIGHT_MATCHING_SWEEPS,
        seed=run.config.seed,
    )
    work = dict(balanced.models[k].state_dict())
    plans, solvers = TransportPlans(), {}
    for (b, a), h, plan, ran in zip(pairs, heads, found.plans, found.solvers):
        _apply_group_plan(work, b, plan.to(run.device), h, unmatched, run.config.plan_normalization)
        plans[a.name] = plan
        solvers[a.name] = ran if ran != "init" else one_pass_solvers[a.name]  # the one-pass plan was kept
    return work, plans, solvers


def _closed_form_blocks(
    work: dict[str, torch.Tensor], anchor_state: dict[str, torch.Tensor], unmatched: UnmatchedBlocks, mode: str
) -> None:
    """Model ``k``'s inserted blocks expressed exactly in the anchor's basis (``fusion_math.md`` §6.4), in place.

    An identity block whose inner weights are the anchor's block has the anchor's tensors everywhere but its
    residual writers, which are zero. Averaged with the anchor this gives the anchor's block with its writers
    scaled by the anchor's weight (``mode="average"``); ``"transplant"`` contributes the anchor's writers too,
    so the fused block is the anchor's, whole.
    """
    for name in unmatched.params:
        if mode == "average" and name in unmatched.writers:
            work[name] = torch.zeros_like(anchor_state[name])
        else:
            work[name] = anchor_state[name]


def average(
    states: dict[int, dict[str, torch.Tensor]], weights: Sequence[float], *, anchor: int, release: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """The fused parameters and buffers, one ``(name, tensor)`` at a time, in the anchor's state-dict order.

    Each tensor is the weighted average of the aligned models' tensors of that name (``num_batches_tracked``
    is the anchor's). Nothing holds the whole fused state: a consumer may load, save or shard each tensor as
    it comes (:func:`load_fused` collects them into a module).

    Args:
        states: model index -> aligned state dict (:attr:`Transported.states`), every model in the anchor's basis.
        weights: averaging weight of each model, by index.
        anchor: index of the anchor, whose state-dict order and ``num_batches_tracked`` are kept.
        release: drop each non-anchor model's tensor from ``states`` once averaged, so the transported tensors
            are freed while the fused ones are produced (:func:`fuse` does; the states are then emptied).

    Raises:
        IncompatibleModelsError: the models have different parameter names, or shapes after alignment.
    """
    for k, params in states.items():
        differ = sorted(set(params) ^ set(states[anchor]))
        if differ:
            raise IncompatibleModelsError(
                f"Model {k} and the anchor (model {anchor}) are built from different layer types: "
                f"parameters {differ[:6]} exist in only one of them. Fusion needs the same kinds of layers "
                "in the same order (e.g. both with or both without BatchNorm and biases); only widths and "
                "depths may differ."
            )
    for name, tensor in states[anchor].items():
        shapes = {k: tuple(states[k][name].shape) for k in states}
        if len(set(shapes.values())) > 1:
            raise IncompatibleModelsError(
                f"Parameter {name!r} has different shapes after alignment: {shapes}. The models' inputs or "
                "outputs probably differ; only hidden widths may differ."
            )
        if name.endswith("num_batches_tracked"):
            fused = tensor.clone()
        else:
            fused = core.weighted_average([states[k][name] for k in range(len(states))], weights)
        if release:
            for k in states:
                if k != anchor:
                    del states[k][name]
        yield name, fused


def load_fused(template: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> nn.Module:
    """A copy of ``template`` (the balanced anchor) holding ``tensors`` (from :func:`average`), in eval mode."""
    fused = copy.deepcopy(template)
    targets = fused.state_dict()
    seen = set()
    with torch.no_grad():
        for name, tensor in tensors:  # one averaged tensor alive at a time, copied into place
            if name not in targets:
                raise IncompatibleModelsError(f"The fused tensor {name!r} has no place in the anchor; this is a bug.")
            targets[name].copy_(tensor)
            seen.add(name)
    missing = sorted(set(targets) - seen)
    if missing:
        raise IncompatibleModelsError(
            f"No fused value for {missing[:6]} of the anchor; this is a bug, please report it."
        )
    return fused.eval()


def repair_statistics(
    fused: nn.Module, run: Prepared, balanced: Balanced, transported: Transported, *, clock: Stopwatch
) -> RepairOutcome:
    """The statistics step after averaging: correct the fused model's activation statistics, in place.

    Averaging aligned weights shrinks and shifts the activations of the fused model ("variance collapse").
    ``config.repair`` chooses the correction (:mod:`hf_clafusion.repair`): ``"bn"`` recomputes every
    BatchNorm's running statistics on the calibration data (BatchNorms that are identities in every parent
    stay identities); ``"repair"`` (Jordan et al., "REPAIR", ICLR 2023) matches each repair point's per-channel
    mean and standard deviation to the parents' (carried to the anchor's channels by the transport plans,
    weighted by ``weights``) and folds the correction into the weights; ``"auto"`` resolves to the better of
    the two for the model; ``None`` leaves the averaged model as it is.

    Returns:
        `RepairOutcome`: the resolved mode (recorded in the result's config) and whether BatchNorm statistics
        were recomputed.

    Raises:
        CalibrationDataError: the fused model cannot run on the calibration batches.
        UnsupportedArchitectureError: ``repair="repair"`` for a family without repair points.
    """
    if run.config.repair is None:
        return RepairOutcome(mode=None, bn_reset=False)
    start = time.perf_counter()
    try:
        outcome = repair_fused(
            fused,
            run.config.repair,
            parents=balanced.models,
            specs=balanced.specs,
            anchor=run.anchor,
            plans=transported.plans,
            weights=run.weights,
            adapter=run.adapter,
            batches=run.repair_batches,
            plan_normalization=run.config.plan_normalization,
            closed_form={k: (run.models[k], blocks) for k, blocks in balanced.unmatched.items()},
        )
    except ClaFusionError:
        raise
    except (RuntimeError, TypeError, ValueError) as error:
        raise CalibrationDataError(
            f"The fused model cannot run on the calibration data to recompute BatchNorm statistics or repair its "
            f"statistics (repair={run.config.repair!r}): {str(error).splitlines()[0]}. Pass inputs shaped as the "
            "models expect."
        ) from error
    if outcome.mode is not None or outcome.tried:  # "auto"'s trial is timed even when it keeps no repair
        clock.timings["bn_reset" if outcome.mode == "bn" and not outcome.tried else "repair"] = (
            time.perf_counter() - start
        )
    return outcome


#: Fused models of at least this many bytes wait on disk while ``alignment="auto"`` fuses the next candidate.
TRIAL_SPILL_BYTES = 64 * 2**20


class AlignmentTrial:
    """Keep one of the models fused with the candidate alignments (``alignment="auto"``); a context manager.

    The kept one is the one whose predictions on the statistics-repair data (the calibration data unless
    ``repair_samples`` is set) agree most often with the parents' ensemble (weighted mean of logits, each parent at
    its own depth); a tie keeps the first (CLA's alignment). Unlike ``repair="auto"``'s sign test, no candidate is
    favoured beyond ties: neither alignment is better across families. On residual networks whose segments have
    two shallow blocks CLA has no choice to make (the first and the last are fixed) and chain's alignment fuses
    better on the benchmark pairs; on plain MLPs, and where a shallow model is a subset of the deep one's layers,
    CLA's does (``docs/benchmarks.md``).

    A candidate is measured as soon as it is fused. One that is not the last, of at least
    :data:`TRIAL_SPILL_BYTES`, then waits in a temporary file while the next is
    fused, its tensors emptied, so the trial does not hold two fused models in memory; leaving the context deletes
    the files.
    """

    def __init__(self, run: Prepared, clock: Stopwatch) -> None:
        self.run, self.clock = run, clock
        self.batches = run.repair_batches or run.batches
        self.agreement: list[int] = []
        self.spilled: dict[int, Path] = {}
        self._folder: tempfile.TemporaryDirectory | None = None
        with clock("alignment_trial"), torch.no_grad():
            self.ensemble = predictions(run.models, self.batches, run.adapter, run.weights)

    def __enter__(self) -> AlignmentTrial:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._folder is not None:
            self._folder.cleanup()

    def measure(self, built: Built, *, spill: bool) -> None:
        """Count the samples where ``built``'s prediction agrees with the ensemble; spill it to disk if asked."""
        with self.clock("alignment_trial"), torch.no_grad():
            hits = predictions([built.fused], self.batches, self.run.adapter, [1.0]) == self.ensemble
            self.agreement.append(int(hits.sum()))
            if spill and _module_bytes(built.fused) >= TRIAL_SPILL_BYTES:
                if self._folder is None:
                    self._folder = tempfile.TemporaryDirectory(prefix="hf_clafusion_trial_")
                path = Path(self._folder.name) / f"candidate-{len(self.agreement) - 1}.pt"
                spill_module(built.fused, path)
                self.spilled[len(self.agreement) - 1] = path

    def keep(self, built: Sequence[Built]) -> tuple[Built, dict[str, Any]]:
        """The candidate with the most agreement (the first on ties), back in memory, and the trial's record: the
        methods tried, the one kept, each one's agreement with the ensemble (a fraction) and the number of samples."""
        methods = ["cla", "chain"][: len(built)]
        best = self.agreement.index(max(self.agreement))
        for i, candidate in enumerate(built):
            if i != best:
                release_tensors(candidate.fused)  # before the kept one is read back
        if best in self.spilled:
            with self.clock("alignment_trial"):
                restore_module(built[best].fused, self.spilled[best], self.run.device)
        samples = int(self.ensemble.numel())
        record = {
            "tried": methods,
            "kept": methods[best],
            "agreement": {m: a / samples for m, a in zip(methods, self.agreement)},
            "samples": samples,
        }
        return built[best], record


def _module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in itertools.chain(module.parameters(), module.buffers()))


def spill_module(module: nn.Module, path: Path) -> None:
    """Write every parameter and buffer of ``module`` (non-persistent buffers too) to ``path`` and free their memory.

    Each tensor keeps its object and gets an empty ``data``, so tied parameters stay tied; :func:`restore_module`
    fills them again.
    """
    torch.save({name: t.detach() for name, t in _named_tensors(module).items()}, path)
    release_tensors(module)


def release_tensors(module: nn.Module) -> None:
    """Free the memory of every parameter and buffer of ``module``: each keeps its object, with empty ``data``."""
    for tensor in _named_tensors(module).values():
        tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)


def restore_module(module: nn.Module, path: Path, device: torch.device) -> None:
    """Undo :func:`spill_module`: every tensor of ``module`` filled from ``path``, on ``device``."""
    saved = torch.load(path, map_location=device, weights_only=True)
    for name, tensor in _named_tensors(module).items():
        tensor.data = saved.pop(name)


def _named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` once (a tied one under its first name)."""
    tensors: dict[str, torch.Tensor] = {f"parameter:{n}": t for n, t in module.named_parameters()}
    tensors.update({f"buffer:{n}": t for n, t in module.named_buffers()})
    return tensors


# --------------------------------------------------------------------------------------------- internals


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to call
        return None


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the operating system (glibc's ``malloc_trim``; nothing elsewhere).

    glibc serves allocations below its mmap threshold (which grows to 32 MiB as large buffers are freed) from the
    heap and keeps their pages when they are freed: after a stage drops its activations, the process would still
    hold them until exit. Called between stages, where a stage's captures have just been dropped: on a BERT-base
    12 + 6 pair the statistics pass's freed captures were 240 MiB of resident memory that the transport stage,
    where the peak is, would otherwise have added its solvers' memory to.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def resolve_config(config: FusionConfig | None, overrides: dict[str, Any]) -> FusionConfig:
    """``config`` (``FusionConfig()`` when None) with ``overrides`` applied, as :func:`fuse` takes them."""
    if config is None:
        config = FusionConfig()
    if not isinstance(config, FusionConfig):
        raise ConfigError(
            f"`config` must be a FusionConfig, got {type(config).__name__}. Build one with FusionConfig(...)."
        )
    return config.replace(**overrides) if overrides else config


def _result(run: Prepared, kept: Built, trial: dict[str, Any], clock: Stopwatch) -> FusionResult:
    config = run.config.replace(repair=kept.repaired.mode)  # the resolved values, as saved in fusion_config.json
    if trial:
        config = config.replace(alignment=trial["kept"])
    elif config.alignment == "auto":
        config = config.replace(alignment="cla")  # CLA's alignment is chain's: nothing to try
    return FusionResult(
        model=kept.fused,
        pairs=kept.alignment.pairs,
        transport_plans=kept.transported.plans,
        transport_solvers=kept.transported.solvers,
        timings=dict(clock.timings),
        calibration=run.calibration.provenance,
        config=config,
        adapter=run.adapter.name,
        anchor=run.anchor,
        parents=list(run.parents),
        bn_reset=kept.repaired.bn_reset,
        identity_errors=kept.identity_errors,
        alignment_trial=trial,
    )


def _primary_axis(group: Group, state: dict[str, torch.Tensor]) -> AxisRef:
    """The group's primary weight axis for the weight ground metric: its first ``"out"`` axis holding exactly the
    group's neurons (not a repeated or head-expanded one, e.g. grouped-query attention's query rows)."""
    for axis in group.axes:
        if axis.role == "out" and axis.repeat == 1:
            if state[axis.param].shape[axis.axis] == group.width * axis.inner * axis.outer:
                return axis
    raise AlignmentError(
        f"Group {group.name!r} has no output axis of width {group.width} to compare weights on; use "
        "ground_metric='activations' for this model."
    )


def _bar(
    iterable: Iterable[Any], desc: str, config: FusionConfig, *, unit: str = "it", total: int | None = None
) -> Iterable[Any]:
    """A progress bar with its total (so tqdm shows an ETA): ``total``, or the length of ``iterable``."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not config.progress, leave=False)


def _device(models: Sequence[nn.Module], config: FusionConfig) -> torch.device:
    if config.device is not None:
        return torch.device(config.device)
    devices = []
    for model in models:
        tensors = list(model.parameters()) + list(model.buffers())
        devices.append({str(t.device) for t in tensors} or {"cpu"})
    flat = sorted(set().union(*devices))
    if len(flat) > 1:
        per_model = ", ".join(f"model {i}: {'/'.join(sorted(d))}" for i, d in enumerate(devices))
        raise IncompatibleModelsError(
            f"The models are on different devices ({per_model}). Move them to one device with `.to(device)`, "
            "or pass `device=` to run the fusion there."
        )
    return torch.device(flat[0])


def _anchor_index(config: FusionConfig, specs: Sequence[NetworkSpec]) -> int:
    anchor = config.anchor
    depths = [s.depth for s in specs]
    if anchor == "deepest":
        return max(range(len(depths)), key=lambda i: (depths[i], -i))
    if anchor == "shallowest":
        return min(range(len(depths)), key=lambda i: (depths[i], i))
    if anchor >= len(specs):
        raise ConfigError(
            f"Invalid `anchor`: {anchor}, but only {len(specs)} models were given (indices 0-{len(specs) - 1}). "
            f"Pass an index from 0 to {len(specs) - 1} (the position in the list of models), 'deepest' or "
            "'shallowest'.",
            field="anchor",
        )
    return anchor


def _segment_roles(specs: Sequence[NetworkSpec], anchor: int, balancing: str) -> tuple[SegmentRoles, ...]:
    out = []
    for s in range(len(specs[0].segments)):
        depths = tuple(spec.segments[s].depth for spec in specs)
        target = (max if balancing == "identity" else min)(depths)
        # prefer the anchor as the reference when it has the target depth
        reference = anchor if depths[anchor] == target else depths.index(target)
        out.append(SegmentRoles(depths, reference))
    return tuple(out)


def _forward(adapter: Adapter, model: nn.Module, batch: Any, index: int) -> None:
    args, kwargs = adapter.model_inputs(model, batch)
    try:
        model(*args, **kwargs)
    except ClaFusionError:
        raise  # from a capture hook: already says what is wrong
    except (RuntimeError, TypeError, ValueError) as error:
        shapes = {k: tuple(v.shape) for k, v in batch.items()} if isinstance(batch, dict) else tuple(batch.shape)
        raise CalibrationDataError(
            f"Model {index} cannot run on the calibration data (batch shape {shapes}): "
            f"{str(error).splitlines()[0]}. Pass inputs shaped as the models expect."
        ) from error


def _pairs_to_align(run: Prepared) -> list[tuple[int, int, int]]:
    """(segment, model, reference) for every model that must be aligned to a segment's reference."""
    return [
        (s, k, seg.reference)
        for s, seg in enumerate(run.segments)
        for k in range(len(run.models))
        if k != seg.reference
    ]


def _segment_slice(spec: NetworkSpec, segment: int) -> slice:
    """The network-wide hidden-layer indices of one segment of a model."""
    depths = spec.segment_depths
    start = sum(depths[:segment])
    return slice(start, start + depths[segment])


def _roles(segment: SegmentRoles, k: int, ref: int) -> tuple[int, int]:
    """(deeper, shallower) model of a pair in a segment (the reference on ties)."""
    return (ref, k) if segment.depths[ref] >= segment.depths[k] else (k, ref)


def _update_minibatch(
    minibatch: dict[tuple[int, int, int], core.MinibatchCKA], run: Prepared, per_model: list[list[torch.Tensor]]
) -> None:
    for s, k, ref in _pairs_to_align(run):
        deep, shallow = _roles(run.segments[s], k, ref)
        a = per_model[deep][_segment_slice(run.specs[deep], s)]
        b = per_model[shallow][_segment_slice(run.specs[shallow], s)]
        if a and b:
            minibatch.setdefault((s, k, ref), core.MinibatchCKA()).update(a, b)


def _segment_cost(
    run: Prepared, activations: LayerActivations, s: int, k: int, ref: int, deep: int, shallow: int
) -> torch.Tensor:
    m, n = run.segments[s].depths[deep], run.segments[s].depths[shallow]
    kind = run.config.layer_cost
    if m == 0 or n == 0:
        return torch.zeros(m, n, dtype=torch.float64)
    if kind == "index":
        return core.index_cost_matrix(m, n)
    if kind == "neuron_count":
        widths = [[layer.width for layer in run.specs[i].segments[s].layers] for i in (deep, shallow)]
        return core.neuron_count_cost_matrix(*widths)
    if kind == "cka_minibatch":
        return activations.minibatch[(s, k, ref)].compute().cpu()
    acts_deep = activations.full[deep][_segment_slice(run.specs[deep], s)]
    acts_shallow = activations.full[shallow][_segment_slice(run.specs[shallow], s)]
    fn = {"cka": core.cka_cost_matrix, "cca": core.cca_cost_matrix, "wasserstein": core.wasserstein_cost_matrix}[kind]
    return fn(acts_deep, acts_shallow).cpu()


def _segment_alignment(run: Prepared, cost: torch.Tensor, m: int, n: int, segment: int, method: str) -> list[int]:
    config = run.config
    if m == n:
        return list(range(n))
    first, last = core.relax_constraints(n, config.first_fixed, config.last_fixed)
    if first < config.first_fixed and any(spec.segments[segment].first_pinned for spec in run.specs):
        first, last = 1, min(last, n - 1)  # relaxed, but the segment's first layer has no identity
    if first + last > n:
        raise AlignmentError(
            f"Segment {segment} of the shallower model has {n} layer(s), fewer than first_fixed="
            f"{config.first_fixed} + last_fixed={config.last_fixed}. Lower them (values up to 1 are "
            "relaxed automatically on short segments)."
        )
    if method == "chain":
        return core.chain_alignment(m, n)
    if method == "random":
        return core.random_alignment(m, n, first_fixed=first, last_fixed=last, seed=config.seed + segment)
    return core.align_layers(cost, first_fixed=first, last_fixed=last)


def _warn_if_costs_tie(config: FusionConfig, cost: torch.Tensor, m: int, n: int, s: int, k: int, ref: int) -> None:
    """Warn when every layer cost of a segment that needs an alignment choice is the same: the choice is arbitrary."""
    if m == n or config.layer_cost in ("index", "neuron_count") or cost.numel() < 2:
        return
    spread = float(cost.max() - cost.min())
    if spread <= 1e-6 * max(1.0, float(cost.abs().max())):
        warnings.warn(
            f"All layer costs of segment {s} (model {k} vs model {ref}) are equal ({float(cost.flatten()[0]):.4g} "
            f"over a {m}x{n} matrix), so every alignment costs the same and the one chosen is arbitrary. Check that "
            "the parents are trained (freshly initialised networks, e.g. timm ResNets whose last BatchNorm in each "
            "block starts at zero, give the same activations after every block) and that the calibration data "
            "varies; or choose layer_cost='index'.",
            ClaFusionWarning,
            stacklevel=4,
        )


def _template_for(segments: Sequence[SegmentRoles], k: int) -> int:
    """Index of the model with the target depth in every segment where ``k`` needs identity layers."""
    refs = {seg.reference for seg in segments if seg.depths[k] < seg.depths[seg.reference]}
    if len(refs) == 1:
        return refs.pop()
    raise AlignmentError(
        f"Model {k} needs identity layers in segments whose deepest models differ ({sorted(refs)}); balancing "
        "against several templates at once is not supported. Fuse the models pairwise."
    )


def _heads(config: FusionConfig, group_b: Group, group_a: Group, k: int) -> int:
    """Heads to keep whole in a group's plan: 1 for ordinary groups and in ``attention='cross_head'`` mode."""
    if group_a.heads <= 1 or config.attention == "cross_head":
        if any(axis.repeat > 1 for axis in group_b.axes) and group_b.width != group_a.width:
            raise IncompatibleModelsError(
                f"Group {group_a.name!r} feeds grouped-query attention, whose query heads must follow their "
                f"key/value head; widths {group_b.width} (model {k}) and {group_a.width} (anchor) differ. Fuse "
                "models with the same attention layout."
            )
        return group_a.heads if any(axis.repeat > 1 for axis in group_b.axes) else 1
    if (group_b.width, group_b.heads) != (group_a.width, group_a.heads):
        raise IncompatibleModelsError(
            f"Attention group {group_a.name!r} has {group_b.heads} heads of {group_b.width // group_b.heads} dims "
            f"in model {k} but {group_a.heads} heads of {group_a.width // group_a.heads} in the anchor. Heads "
            "can only be kept whole between equal layouts; pass attention='cross_head' to align every "
            "dimension freely (approximate)."
        )
    return group_a.heads


def _check_finite(model: nn.Module, index: int) -> None:
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not tensor.is_floating_point() or tensor.device.type == "meta" or torch.isfinite(tensor.sum()):
            continue  # a finite sum has no NaN or inf terms; an overflowing one is checked element by element
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise InvalidWeightsError(
                f"Model {index} has non-finite values in {name!r} ({bad} of {tensor.numel()} entries are NaN/inf). "
                "Fix or retrain that model before fusing."
            )


def _check_compatible(specs: list[NetworkSpec]) -> None:
    outputs = [s.output_size for s in specs]
    if len(set(outputs)) > 1:
        raise IncompatibleModelsError(
            f"The models have different output sizes: {outputs}. Fused models must share one label set; "
            "retrain or replace the classifier so all have the same number of outputs."
        )
    inputs = [s.input_size for s in specs]
    if len(set(inputs)) > 1:
        raise IncompatibleModelsError(
            f"The models read inputs of different sizes: {inputs} features/channels. Fusion needs the same input."
        )
    counts = [len(s.segments) for s in specs]
    if len(set(counts)) > 1:
        raise IncompatibleModelsError(
            f"The models have different numbers of segments (runs of layers between pooling layers): {counts}. "
            "CLAFusion aligns layers segment by segment, so both need the same pooling structure."
        )


def _check_balanced(specs: list[NetworkSpec], anchor: int) -> None:
    depths = [s.segment_depths for s in specs]
    if len(set(depths)) > 1:
        raise AlignmentError(
            f"Depth balancing produced different segment depths {depths}; this is a bug, please report it."
        )
    names = [[g.name for g in s.groups] for s in specs]
    for k, n in enumerate(names):
        if len(n) != len(names[anchor]):
            raise AlignmentError(
                f"Model {k} has {len(n)} alignment groups after balancing, the anchor {len(names[anchor])}."
            )
