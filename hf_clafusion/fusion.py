"""The CLAFusion pipeline: ``fuse(models, data, config) -> FusionResult``.

Read top to bottom, :func:`fuse` is the algorithm:

1. prepare the models through their adapter and check that they can be fused;
2. collect activations of every hidden layer on the calibration data (one pass per model);
3. cross-layer alignment per segment (:func:`hf_clafusion.core.align_layers`);
4. depth balancing: identity layers into the shallower model, or merging the deeper one's unmatched layers;
5. activation statistics of every alignment group of the balanced models (one pass per model);
6. a transport plan per group, applied to every axis of the group (:mod:`hf_clafusion.core.transport`);
7. weighted average with the anchor, then statistics repair (:mod:`hf_clafusion.repair`).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import core
from ._data import CalibrationData, move_to, prepare_calibration
from .adapters import get_adapter
from .adapters.base import Adapter, capture_outputs
from .config import FusionConfig
from .errors import (
    AlignmentError,
    CalibrationDataError,
    ClaFusionError,
    ConfigError,
    IncompatibleModelsError,
    InvalidWeightsError,
)
from .repair import repair_fused
from .result import AlignmentPreview, FusionResult, PairAlignment, describe_parent
from .spec import NetworkSpec


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
    config = _resolve_config(config, overrides)
    run = _Run(models, data, config, processor)
    run.prepare()
    run.collect_layer_activations()
    run.align()
    run.balance()
    run.collect_group_statistics()
    aligned = run.transport()
    fused = run.average(aligned)
    run.reset_bn(fused)
    return run.result(fused)


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
    """
    config = _resolve_config(config, overrides)
    run = _Run(models, data, config, processor)
    run.prepare()
    run.collect_layer_activations()
    run.align()
    return AlignmentPreview(pairs=run.pairs, timings=run.timings, config=config)


# --------------------------------------------------------------------------------------------- internals


def _resolve_config(config: FusionConfig | None, overrides: dict[str, Any]) -> FusionConfig:
    if config is None:
        config = FusionConfig()
    if not isinstance(config, FusionConfig):
        raise ConfigError(
            f"`config` must be a FusionConfig, got {type(config).__name__}. Build one with FusionConfig(...)."
        )
    return config.replace(**overrides) if overrides else config


@dataclass
class _Segment:
    """Depth roles of one segment across the K models."""

    depths: list[int]
    reference: int  # the model whose depth the balanced segment takes


class _Run:
    """State of one fusion run; each method is one stage of :func:`fuse` (timed)."""

    def __init__(self, models: Sequence[nn.Module], data: Any, config: FusionConfig, processor: Any = None):
        models = list(models)
        if len(models) < 2:
            raise IncompatibleModelsError(f"Fusion needs at least 2 models, got {len(models)}. Pass a list of models.")
        if config.weights is not None and len(config.weights) != len(models):
            raise ConfigError(
                f"`weights` has {len(config.weights)} entries but {len(models)} models were given; give one per model.",
                field="weights",
            )
        self.models = models
        self.data = data
        self.processor = processor
        self.config = config
        self.timings: dict[str, float] = {}
        self.pairs: list[PairAlignment] = []
        self.bn_reset = False

    # -- helpers
    @contextlib.contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def _bar(self, iterable, desc: str, total: int | None = None):
        return tqdm(iterable, desc=desc, total=total, disable=not self.config.progress, leave=False)

    # -- 1. prepare
    def prepare(self) -> None:
        with self._timed("prepare"):
            adapters = [get_adapter(m) for m in self.models]
            names = {a.name for a in adapters}
            if len(names) > 1:
                raise IncompatibleModelsError(
                    f"The models belong to different families: {sorted(names)}. Only models of one family can be fused."
                )
            self.adapter: Adapter = adapters[0]
            self.device = self._device()
            self.parents = [describe_parent(m, i) for i, m in enumerate(self.models)]
            for i, model in enumerate(self.models):
                _check_finite(model, i)
            self.prepared = [self.adapter.prepare(m).to(self.device) for m in self.models]
            self.specs: list[NetworkSpec] = [self.adapter.spec(m) for m in self.prepared]
            _check_compatible(self.specs)
            self.adapter.check_compatible(self.prepared)
            self.anchor = self._anchor_index()
            self.weights = list(self.config.weights or [1.0 / len(self.models)] * len(self.models))
            data = self.adapter.prepare_data(self.data, self.prepared, self.processor, self.config)
            self.calibration: CalibrationData = prepare_calibration(
                data,
                num_samples=self.config.num_samples,
                batch_size=self.config.batch_size,
                seed=self.config.seed,
            )
            self.batches = [move_to(b, self.device) for b in self.calibration.batches]
            self.segments = self._segment_roles()

    def _device(self) -> torch.device:
        if self.config.device is not None:
            return torch.device(self.config.device)
        devices = []
        for model in self.models:
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

    def _anchor_index(self) -> int:
        anchor = self.config.anchor
        depths = [s.depth for s in self.specs]
        if anchor == "deepest":
            return max(range(len(depths)), key=lambda i: (depths[i], -i))
        if anchor == "shallowest":
            return min(range(len(depths)), key=lambda i: (depths[i], i))
        if anchor >= len(self.models):
            raise ConfigError(
                f"Invalid `anchor`: {anchor}, but only {len(self.models)} models were given (indices 0-{len(self.models) - 1}).",
                field="anchor",
            )
        return anchor

    def _segment_roles(self) -> list[_Segment]:
        out = []
        for s in range(len(self.specs[0].segments)):
            depths = [spec.segments[s].depth for spec in self.specs]
            pick = max if self.config.balancing == "identity" else min
            target = pick(depths)
            # prefer the anchor as the reference when it has the target depth
            reference = self.anchor if depths[self.anchor] == target else depths.index(target)
            out.append(_Segment(depths, reference))
        return out

    # -- 2. activations of every hidden layer (for layer costs and merge)
    def collect_layer_activations(self) -> None:
        cost = self.config.layer_cost
        self.layer_acts: list[list[torch.Tensor]] | None = None
        self.minibatch: dict[tuple[int, int, int], core.MinibatchCKA] = {}
        needs_full = cost in ("cka", "cca", "wasserstein") or self.config.balancing == "merge"
        needs_stream = cost == "cka_minibatch"
        if not (needs_full or needs_stream):
            return
        with self._timed("activations_layers"), torch.no_grad():
            captures = [[layer.capture for seg in spec.segments for layer in seg.layers] for spec in self.specs]
            stored: list[list[list[torch.Tensor]]] = [[[] for _ in c] for c in captures]
            for batch in self._bar(self.batches, "layer activations"):
                per_model = []
                for k, model in enumerate(self.prepared):
                    with capture_outputs(model, captures[k]) as out:
                        self._forward(model, batch, k)
                    acts = [self.adapter.layer_features(out[name], batch) for name in captures[k]]
                    per_model.append(acts)
                    if needs_full:
                        for i, a in enumerate(acts):
                            stored[k][i].append(a.float())
                if needs_stream:
                    self._update_minibatch(per_model)
            if needs_full:
                self.layer_acts = [[torch.cat(chunks) for chunks in model_chunks] for model_chunks in stored]

    def _forward(self, model: nn.Module, batch: Any, index: int) -> None:
        args, kwargs = self.adapter.model_inputs(batch)
        try:
            model(*args, **kwargs)
        except (RuntimeError, TypeError, ValueError) as error:
            shapes = {k: tuple(v.shape) for k, v in batch.items()} if isinstance(batch, dict) else tuple(batch.shape)
            raise CalibrationDataError(
                f"Model {index} cannot run on the calibration data (batch shape {shapes}): "
                f"{str(error).splitlines()[0]}. Pass inputs shaped as the models expect."
            ) from error

    def _pairs_to_align(self) -> list[tuple[int, int, int]]:
        """(segment, model, reference) for every model that must be aligned to a segment's reference."""
        return [
            (s, k, seg.reference)
            for s, seg in enumerate(self.segments)
            for k in range(len(self.models))
            if k != seg.reference
        ]

    def _segment_slice(self, model: int, segment: int) -> slice:
        depths = self.specs[model].segment_depths
        start = sum(depths[:segment])
        return slice(start, start + depths[segment])

    def _update_minibatch(self, per_model: list[list[torch.Tensor]]) -> None:
        for s, k, ref in self._pairs_to_align():
            deep, shallow = self._roles(s, k, ref)
            a = per_model[deep][self._segment_slice(deep, s)]
            b = per_model[shallow][self._segment_slice(shallow, s)]
            if a and b:
                self.minibatch.setdefault((s, k, ref), core.MinibatchCKA()).update(a, b)

    def _roles(self, s: int, k: int, ref: int) -> tuple[int, int]:
        """(deeper, shallower) model of a pair in segment ``s`` (the reference on ties)."""
        depths = self.segments[s].depths
        return (ref, k) if depths[ref] >= depths[k] else (k, ref)

    # -- 3. cross-layer alignment
    def align(self) -> None:
        with self._timed("layer_alignment"):
            num_segments = len(self.segments)
            by_pair: dict[tuple[int, int], PairAlignment] = {}
            self.local: dict[tuple[int, int], list[int]] = {}  # (segment, model) -> positions in the deeper model
            for s, k, ref in self._pairs_to_align():
                deep, shallow = self._roles(s, k, ref)
                m, n = self.segments[s].depths[deep], self.segments[s].depths[shallow]
                cost = self._segment_cost(s, k, ref, deep, shallow)
                mapping = self._segment_alignment(cost, m, n, s)
                self.local[(s, k)] = mapping
                pair = by_pair.get((k, ref)) or by_pair.get((ref, k))
                if pair is None:  # reported as (aligned model, the anchor or the other model)
                    model, other = (ref, k) if k == self.anchor else (k, ref)
                    pair = by_pair[(model, other)] = PairAlignment(
                        model=model,
                        reference=other,
                        deeper=[other] * num_segments,
                        alignment=[[] for _ in range(num_segments)],
                        costs=[torch.zeros(0, 0, dtype=torch.float64) for _ in range(num_segments)],
                        offsets=[0] * num_segments,
                    )
                offset = self._segment_slice(deep, s).start
                pair.deeper[s] = deep
                pair.alignment[s] = [offset + a for a in mapping]
                pair.costs[s] = cost
                pair.offsets[s] = offset
            self.pairs = [by_pair[key] for key in sorted(by_pair)]

    def _segment_cost(self, s: int, k: int, ref: int, deep: int, shallow: int) -> torch.Tensor:
        m, n = self.segments[s].depths[deep], self.segments[s].depths[shallow]
        kind = self.config.layer_cost
        if m == 0 or n == 0:
            return torch.zeros(m, n, dtype=torch.float64)
        if kind == "index":
            return core.index_cost_matrix(m, n)
        if kind == "neuron_count":
            widths = [[layer.width for layer in self.specs[i].segments[s].layers] for i in (deep, shallow)]
            return core.neuron_count_cost_matrix(*widths)
        if kind == "cka_minibatch":
            return self.minibatch[(s, k, ref)].compute().cpu()
        acts_deep = self.layer_acts[deep][self._segment_slice(deep, s)]
        acts_shallow = self.layer_acts[shallow][self._segment_slice(shallow, s)]
        fn = {"cka": core.cka_cost_matrix, "cca": core.cca_cost_matrix, "wasserstein": core.wasserstein_cost_matrix}[
            kind
        ]
        return fn(acts_deep, acts_shallow).cpu()

    def _segment_alignment(self, cost: torch.Tensor, m: int, n: int, segment: int) -> list[int]:
        if m == n:
            return list(range(n))
        first, last = core.relax_constraints(n, self.config.first_fixed, self.config.last_fixed)
        if first < self.config.first_fixed and any(spec.segments[segment].first_pinned for spec in self.specs):
            first, last = 1, min(last, n - 1)  # relaxed, but the segment's first layer has no identity
        if first + last > n:
            raise AlignmentError(
                f"Segment {segment} of the shallower model has {n} layer(s), fewer than first_fixed="
                f"{self.config.first_fixed} + last_fixed={self.config.last_fixed}. Lower them (values up to 1 are "
                "relaxed automatically on short segments)."
            )
        if self.config.alignment == "chain":
            return core.chain_alignment(m, n)
        if self.config.alignment == "random":
            return core.random_alignment(m, n, first_fixed=first, last_fixed=last, seed=self.config.seed + segment)
        return core.align_layers(cost, first_fixed=first, last_fixed=last)

    # -- 4. depth balancing
    def balance(self) -> None:
        self.identity_errors: dict[str, float] = {}
        with self._timed("balancing"):
            balanced = list(self.prepared)
            if self.config.balancing == "identity":
                for k in range(len(self.models)):
                    layouts = []
                    for s, seg in enumerate(self.segments):
                        depth, target = seg.depths[k], seg.depths[seg.reference]
                        if depth == target:
                            layouts.append(list(range(depth)))
                            continue
                        layout: list[int | None] = [None] * target
                        for own, position in enumerate(self.local[(s, k)]):
                            layout[position] = own
                        layouts.append(layout)
                    if any(None in layout for layout in layouts):
                        template = self.prepared[self._template_for(k)]
                        balanced[k] = self.adapter.insert_identity(
                            self.prepared[k], layouts, template, batches=self.batches
                        )
                        self.identity_errors.update(
                            {f"model {k}, {key}": err for key, err in self.adapter.identity_errors.items()}
                        )
            else:
                for k in range(len(self.models)):
                    keeps = []
                    for s, seg in enumerate(self.segments):
                        if seg.depths[k] == seg.depths[seg.reference]:
                            keeps.append(list(range(seg.depths[k])))
                        else:
                            keeps.append(self.local[(s, k)])
                    if any(len(keep) < seg.depths[k] for keep, seg in zip(keeps, self.segments)):
                        captures = [layer.capture for seg in self.specs[k].segments for layer in seg.layers]
                        preacts = dict(zip(captures, self.layer_acts[k]))
                        balanced[k] = self.adapter.merge_layers(
                            self.prepared[k], keeps, preacts, self.config.relu_approx
                        )
            self.balanced = [m.to(self.device).eval() for m in balanced]
            self.balanced_specs = [self.adapter.spec(m) for m in self.balanced]
            _check_balanced(self.balanced_specs, self.anchor)

    def _template_for(self, k: int) -> int:
        """Index of the model with the target depth in every segment where ``k`` needs identity layers."""
        refs = {seg.reference for seg in self.segments if seg.depths[k] < seg.depths[seg.reference]}
        if len(refs) == 1:
            return refs.pop()
        raise AlignmentError(
            f"Model {k} needs identity layers in segments whose deepest models differ ({sorted(refs)}); balancing "
            "against several templates at once is not supported. Fuse the models pairwise."
        )

    # -- 5. activation statistics of every alignment group
    def collect_group_statistics(self) -> None:
        self.group_stats: dict[int, list[core.ActivationStats | None]] = {}
        if self.config.ground_metric != "activations":
            return
        others = [k for k in range(len(self.models)) if k != self.anchor]
        groups = {k: self.balanced_specs[k].groups for k in range(len(self.models))}
        self.group_stats = {k: [core.ActivationStats() for _ in groups[k]] for k in others}
        with self._timed("activations_groups"), torch.no_grad():
            for k in others:
                for group_b, group_a in zip(groups[k], groups[self.anchor]):
                    if len(group_b.captures) != len(group_a.captures):
                        raise AlignmentError(
                            f"Group {group_a.name!r} is captured at {len(group_b.captures)} points in model {k} but "
                            f"{len(group_a.captures)} in the anchor after balancing; this is a bug, please report it."
                        )
            for batch in self._bar(self.batches, "group activations"):
                outputs = {}
                for k, model in enumerate(self.balanced):
                    names = list(dict.fromkeys(c for g in groups[k] for c in g.captures))
                    with capture_outputs(model, names) as out:
                        self._forward(model, batch, k)
                    outputs[k] = {n: self.adapter.features(out[n], batch) for n in names}
                for k in others:
                    for g, stats in enumerate(self.group_stats[k]):
                        for name_b, name_a in zip(groups[k][g].captures, groups[self.anchor][g].captures):
                            stats.update(outputs[k][name_b], outputs[self.anchor][name_a])

    # -- 6. transport every non-anchor model into the anchor's basis
    def transport(self) -> dict[int, dict[str, torch.Tensor]]:
        anchor_state = self.balanced[self.anchor].state_dict()
        self.plans: dict[int, dict[str, torch.Tensor]] = {}
        aligned: dict[int, dict[str, torch.Tensor]] = {self.anchor: anchor_state}
        with self._timed("transport"):
            for k in range(len(self.models)):
                if k == self.anchor:
                    continue
                work = {name: t.clone() for name, t in self.balanced[k].state_dict().items()}
                groups_b, groups_a = self.balanced_specs[k].groups, self.balanced_specs[self.anchor].groups
                self.plans[k] = {}
                for g, (group_b, group_a) in enumerate(
                    self._bar(list(zip(groups_b, groups_a)), f"transport model {k}")
                ):
                    if self.config.ground_metric == "activations":
                        cost = self.group_stats[k][g].distances()
                        self.group_stats[k][g] = None  # free the (n_B, n_A) statistics as soon as they are used
                    else:
                        primary = group_b.axes[0].param
                        cost = core.weight_distances(work[primary], anchor_state[group_a.axes[0].param])
                    heads = self._heads(group_b, group_a, k)
                    if heads > 1:
                        plan = core.head_plan(cost, heads, within=group_a.head_dims_free)
                    else:
                        plan = core.transport_plan(cost, solver=self.config.solver, reg=self.config.reg)
                    r_map, s_map = core.plan_maps(plan, self.config.plan_normalization)
                    for axis in group_b.axes:
                        matrix = r_map if axis.role == "out" else s_map
                        if axis.repeat > 1:
                            matrix = core.expand_head_plan(matrix, max(heads, 1), axis.repeat)
                        work[axis.param] = core.apply_plan(
                            work[axis.param], axis.axis, matrix, inner=axis.inner, outer=axis.outer
                        )
                    self.plans[k][group_a.name] = plan.float().cpu()
                aligned[k] = work
        return aligned

    def _heads(self, group_b, group_a, k: int) -> int:
        """Heads to keep whole in a group's plan: 1 for ordinary groups and in ``attention='cross_head'`` mode."""
        if group_a.heads <= 1 or self.config.attention == "cross_head":
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

    # -- 7. average and recompute BatchNorm statistics
    def average(self, aligned: dict[int, dict[str, torch.Tensor]]) -> nn.Module:
        with self._timed("averaging"):
            fused = copy.deepcopy(self.balanced[self.anchor])
            for k, params in aligned.items():
                differ = sorted(set(params) ^ set(aligned[self.anchor]))
                if differ:
                    raise IncompatibleModelsError(
                        f"Model {k} and the anchor (model {self.anchor}) are built from different layer types: "
                        f"parameters {differ[:6]} exist in only one of them. Fusion needs the same kinds of layers "
                        "in the same order (e.g. both with or both without BatchNorm and biases); only widths and "
                        "depths may differ."
                    )
            state = {}
            for name, tensor in aligned[self.anchor].items():
                shapes = {k: tuple(aligned[k][name].shape) for k in aligned}
                if len(set(shapes.values())) > 1:
                    raise IncompatibleModelsError(
                        f"Parameter {name!r} has different shapes after alignment: {shapes}. The models' inputs or "
                        "outputs probably differ; only hidden widths may differ."
                    )
                if name.endswith("num_batches_tracked"):
                    state[name] = tensor.clone()
                    continue
                state[name] = core.weighted_average([aligned[k][name] for k in range(len(self.models))], self.weights)
            fused.load_state_dict(state)
        return fused.eval()

    def reset_bn(self, fused: nn.Module) -> None:
        """Statistics repair (``config.repair``, see :mod:`hf_clafusion.repair`); records the resolved mode."""
        start = time.perf_counter()
        try:
            outcome = repair_fused(
                fused,
                self.config.repair,
                parents=self.balanced,
                specs=self.balanced_specs,
                anchor=self.anchor,
                plans=self.plans,
                weights=self.weights,
                adapter=self.adapter,
                batches=self._repair_batches(),
                plan_normalization=self.config.plan_normalization,
            )
        except (RuntimeError, TypeError, ValueError) as error:
            if isinstance(error, ClaFusionError):
                raise
            raise CalibrationDataError(
                f"The fused model cannot run on the calibration data to recompute BatchNorm statistics or repair "
                f"its statistics (repair={self.config.repair!r}): {str(error).splitlines()[0]}. Pass inputs shaped "
                "as the models expect."
            ) from error
        self.bn_reset = outcome.bn_reset
        self.config = self.config.replace(repair=outcome.mode)
        if outcome.mode is not None:
            stage = "bn_reset" if outcome.mode == "bn" else "repair"
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def _repair_batches(self) -> list:
        if self.config.repair_samples is None or self.config.repair is None:
            return self.batches
        data = self.adapter.prepare_data(self.data, self.prepared, self.processor, self.config)
        calibration = prepare_calibration(
            data, num_samples=self.config.repair_samples, batch_size=self.config.batch_size, seed=self.config.seed
        )
        return [move_to(b, self.device) for b in calibration.batches]

    def result(self, fused: nn.Module) -> FusionResult:
        return FusionResult(
            model=fused,
            pairs=self.pairs,
            transport_plans=self.plans,
            timings=dict(self.timings),
            calibration=self.calibration.provenance,
            config=self.config,
            adapter=self.adapter.name,
            anchor=self.anchor,
            parents=self.parents,
            bn_reset=self.bn_reset,
            identity_errors=getattr(self, "identity_errors", {}),
        )


def _check_finite(model: nn.Module, index: int) -> None:
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
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
