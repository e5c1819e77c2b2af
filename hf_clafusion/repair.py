"""Statistics repair of a fused model: BatchNorm recomputation (``"bn"``) or REPAIR (``"repair"``).

Averaged networks suffer variance collapse: the fused model's channels are less spread than the parents'
(Jordan et al., "REPAIR: REnormalizing Permuted Activations for Interpolation Repair", ICLR 2023).

- ``"bn"`` recomputes every BatchNorm's running statistics on the data. BatchNorms that compute the identity in
  every parent (converted BatchNorm-free networks, inserted identity layers only) are left as they are: recomputing
  them would turn an identity into a normalisation.
- ``"repair"`` measures, on the same data, each parent's per-channel mean and std at every repair point of the
  adapter's spec (Linear/Conv pre-activations, residual branch outputs), carries them to the anchor's channels
  through the transport plans, and corrects the fused model so its statistics match ``mu* = sum_k w_k mu_k``,
  ``sigma* = sum_k w_k sigma_k``; each correction is folded exactly into the layer's weight and bias (scale-only
  where the layer has no bias). The fused model is measured in two forward passes over the data however many
  points it has (:func:`repair_statistics`): one that corrects every point on the fly with each batch's
  statistics (REPAIR's own scheme), one that refines the corrections.
- ``"auto"``: the candidates are tried and the first is kept unless another's predictions on the data agree with
  the parents' ensemble (weighted mean of logits) clearly more often (:func:`clearly_better`, a paired sign
  test): ``("bn", "repair")`` where the fused
  model has a BatchNorm that is not an identity in every parent, ``(None, "repair")`` without one (a scale-only
  correction, on layers without a bias, cannot move the means and can hurt), ``"bn"`` or None for families
  whose adapter sets ``auto_repair = False`` or has no repair points (a warning says so).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import core
from .adapters.base import Adapter, UnmatchedBlocks, capture_outputs, reset_batchnorm_stats
from .data import num_rows, take_rows
from .errors import AlignmentError, ClaFusionWarning, UnsupportedArchitectureError
from .spec import NetworkSpec, RepairPoint


#: An output whose every channel has |mean| and std below this is an inserted identity block's zero branch.
ZERO_OUTPUT = 1e-12


@dataclass(frozen=True)
class RepairOutcome:
    """What :func:`repair_fused` did.

    Attributes:
        mode: the resolved mode (``"bn"``, ``"repair"`` or None; never ``"auto"``).
        bn_reset: whether BatchNorm running statistics were recomputed.
        corrected: number of repair points corrected (``"repair"`` mode).
        tried: the candidates ``"auto"`` ran on copies before keeping ``mode`` (empty when no trial ran).
    """

    mode: str | None
    bn_reset: bool = False
    corrected: int = 0
    tried: tuple[str | None, ...] = ()


def identity_batchnorms(models: Sequence[nn.Module]) -> set[str]:
    """Names of the BatchNorm modules that compute the identity (eval mode) in every one of ``models``.

    The models share one structure (depth-balanced parents); a name missing from a model does not count.
    """
    names: set[str] | None = None
    for model in models:
        found = {
            name
            for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and core.is_identity_batchnorm(m.weight, m.bias, m.running_mean, m.running_var, m.eps)
        }
        names = found if names is None else names & found
    return names or set()


def resolve_mode(
    mode: str | None, fused: nn.Module, parents: Sequence[nn.Module], spec: NetworkSpec, *, auto_repair: bool = True
) -> str | tuple[str, ...] | None:
    """The repair mode to run, others checked against the family; ``"auto"`` resolved for this model.

    ``"auto"`` gives ``("bn", "repair")`` for a model with a real BatchNorm and repair points, and
    ``(None, "repair")`` for a model with repair points and no real BatchNorm: each candidate is tried and the one
    whose predictions agree with the parents' ensemble on the data clearly more often than the first's replaces
    it (:func:`repair_fused`, :func:`clearly_better`); otherwise the first is kept. Without BatchNorm the comparison with no repair matters: where layers have no bias the
    correction is scale-only and cannot move the means, and on the paper's bias-free MLP pair it costs about 2.6
    points (``docs/benchmarks.md``). Families whose adapter sets ``auto_repair = False`` resolve to ``"bn"`` or
    None.

    Raises:
        UnsupportedArchitectureError: ``"repair"`` for a model whose adapter gives no repair points.
    """
    if mode == "repair" and not spec.repair_points:
        raise UnsupportedArchitectureError(
            f"repair='repair' is not supported for {spec.family} models of this architecture (the adapter gives no "
            "repair points). Use repair='bn' (models with BatchNorm) or repair=None.",
            layer_type=spec.description.get("class") if isinstance(spec.description, dict) else None,
        )
    if mode != "auto":
        return mode
    keep = identity_batchnorms(parents)
    real_bn = any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and name not in keep for name, m in fused.named_modules()
    )
    points = bool(spec.repair_points) and auto_repair
    if real_bn:
        return ("bn", "repair") if points else "bn"
    if points:
        return (None, "repair")
    if spec.repair_points:  # the family opted out of automatic REPAIR
        return None
    warnings.warn(
        f"repair='auto': {spec.family} models of this architecture ({spec.description.get('class', '?') if isinstance(spec.description, dict) else '?'}) "
        "have no BatchNorm to recompute and their adapter gives no repair points (NetworkSpec.repair_points), so "
        "the fused model's statistics are not repaired. Pass repair=None to silence this, or finetune the fused "
        "model.",
        ClaFusionWarning,
        stacklevel=3,
    )
    return None


def repair_fused(
    fused: nn.Module,
    mode: str | None,
    *,
    parents: Sequence[nn.Module],
    specs: Sequence[NetworkSpec],
    anchor: int,
    plans: Mapping[int, Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    adapter: Adapter,
    batches: Sequence[Any],
    plan_normalization: str = "two_sided",
    closed_form: Mapping[int, tuple[nn.Module, UnmatchedBlocks]] | None = None,
) -> RepairOutcome:
    """Repair the statistics of ``fused`` in place.

    Args:
        fused: the averaged model, built like ``parents[anchor]``.
        mode: ``"auto"``, ``"bn"``, ``"repair"`` or None.
        parents: the depth-balanced parents (before transport), one per model.
        specs: their network specs.
        anchor: index of the anchor model (whose channel basis ``fused`` uses).
        plans: ``plans[k][group name]``: the ``(n_k, n_anchor)`` transport plan of model ``k`` (k != anchor).
        weights: averaging weight per model.
        adapter: the family's adapter (model inputs, features).
        batches: the data the statistics are measured on.
        plan_normalization: how plans were turned into maps (``FusionConfig.plan_normalization``).
        closed_form: model index -> (that parent before balancing, its inserted blocks) for the parents balanced
            for the closed form of ``fusion_math.md`` §6.4 (``Balanced.unmatched``). Their inserted blocks in
            ``parents`` are placeholders (post-LN ones are not identities), so these parents are run at their own
            depth, and contribute no statistics at repair points inside inserted blocks: the targets there come
            from the models with a real block (the anchor).

    Returns:
        `RepairOutcome`: the resolved mode and what was done.
    """
    closed_form = dict(closed_form or {})

    def apply(model: nn.Module, resolved: str | None) -> RepairOutcome:
        if resolved is None:
            return RepairOutcome(None)
        if resolved == "bn":
            keep = _modules(model, identity_batchnorms(parents))
            return RepairOutcome("bn", bn_reset=reset_batchnorm_stats(model, batches, adapter, keep=keep))
        corrected = repair_statistics(
            model,
            parents=parents,
            specs=specs,
            anchor=anchor,
            plans=plans,
            weights=weights,
            adapter=adapter,
            batches=batches,
            plan_normalization=plan_normalization,
            closed_form=closed_form,
        )
        return RepairOutcome("repair", corrected=corrected)

    resolved = resolve_mode(mode, fused, parents, specs[anchor], auto_repair=type(adapter).auto_repair)
    if not isinstance(resolved, tuple):
        return apply(fused, resolved)
    # "auto": the first candidate unless another agrees with the parents' ensemble clearly more often
    with torch.no_grad():
        runners = [closed_form[k][0] if k in closed_form else m for k, m in enumerate(parents)]
        ensemble = predictions(runners, batches, adapter, weights)
        best: tuple[torch.Tensor, RepairOutcome, nn.Module] | None = None
        for candidate in resolved:
            trial = copy.deepcopy(fused)
            outcome = apply(trial, candidate)
            hits = predictions([trial], batches, adapter, [1.0]) == ensemble
            if best is None or clearly_better(hits, best[0]):
                best = (hits, outcome, trial)
        _, outcome, kept = best
        fused.load_state_dict(kept.state_dict())
    return dataclasses.replace(outcome, tried=tuple(resolved))


def clearly_better(hits: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether ``hits`` beats ``reference`` by more than the noise of a paired sign test.

    Both are ``(samples,)`` booleans (a candidate's prediction agrees with the parents' ensemble). With ``wins``
    the samples only ``hits`` gets right and ``losses`` those only ``reference`` gets right, the challenger wins
    when ``wins - losses > sqrt(wins + losses)`` (one standard deviation of the difference under the hypothesis
    that both are equally good): a difference of one or two samples in 200 does not replace the first candidate.

    Example:
        ```py
        >>> import torch
        >>> from hf_clafusion.repair import clearly_better
        >>> reference = torch.tensor([True] * 10 + [False] * 10)
        >>> clearly_better(torch.tensor([True] * 11 + [False] * 9), reference)  # one more sample: noise
        False
        >>> clearly_better(torch.tensor([True] * 14 + [False] * 6), reference)
        True
        ```
    """
    wins = int((hits & ~reference).sum())
    losses = int((~hits & reference).sum())
    return wins - losses > math.sqrt(wins + losses)


#: Logits of at most about this many bytes per model are alive at once in :func:`predictions`: a language model's
#: ``(rows, tokens, vocabulary)`` logits would otherwise be the largest tensor of the whole fusion.
PREDICTION_BYTES = 64 * 2**20


def predictions(
    models: Sequence[nn.Module], batches: Sequence[Any], adapter: Adapter, weights: Sequence[float]
) -> torch.Tensor:
    """Argmax of the weighted mean of the models' logits over ``batches``, flattened (what ``"auto"`` trials compare).

    A batch whose logits would exceed :data:`PREDICTION_BYTES` runs in chunks of rows (the bytes per row are measured
    on one row first); a classifier's batch runs whole. The weighted sum is formed in place, in the models' order.
    """
    if not batches:
        return torch.zeros(0, dtype=torch.long)
    with torch.no_grad():
        first = take_rows(batches[0], slice(0, 1))
        row_bytes = max(_logits(adapter, m, first).nbytes for m in models)
        step = max(1, PREDICTION_BYTES // max(1, row_bytes))
        out = []
        for batch in batches:
            rows = num_rows(batch)
            for start in range(0, rows, step):
                part = batch if step >= rows else take_rows(batch, slice(start, start + step))
                total = None
                for w, m in zip(weights, models):
                    logits = _logits(adapter, m, part).mul_(w)
                    total = logits if total is None else total.add_(logits)
                    del logits
                out.append(total.argmax(-1).flatten())
                del total
    return torch.cat(out)


def _logits(adapter: Adapter, model: nn.Module, batch: Any) -> torch.Tensor:
    args, kwargs = adapter.model_inputs(model, batch)
    return adapter.logits(model(*args, **kwargs)).float()


def _modules(model: nn.Module, names: set[str]) -> list[nn.Module]:
    return [m for name, m in model.named_modules() if name in names]


@torch.no_grad()
def measure(
    model: nn.Module, captures: Sequence[str], batches: Sequence[Any], adapter: Adapter
) -> list[core.ChannelStats]:
    """Per-channel statistics of ``model`` at each capture over ``batches`` (one pass)."""
    stats = [core.ChannelStats() for _ in captures]
    names = list(dict.fromkeys(captures))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            args, kwargs = adapter.model_inputs(model, batch)
            with capture_outputs(model, names) as out:
                model(*args, **kwargs)
            for s, name in zip(stats, captures):
                s.update(adapter.features(out[name], batch))
    finally:
        model.train(was_training)
    return stats


def repair_targets(
    points: Sequence[Sequence[RepairPoint]],
    stats: Sequence[Sequence[core.ChannelStats | None]],
    anchor: int,
    plans: Mapping[int, Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    plan_normalization: str = "two_sided",
) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """``(mu*, sigma*)`` per repair point of the anchor, from every model's statistics carried by its plans.

    ``points[k][i]`` and ``stats[k][i]`` are model ``k``'s i-th repair point and its statistics. Where a model's
    output is exactly 0 (the residual branch of an inserted identity block), that model does not contribute: the
    targets come from the models with a real layer there; so does a point whose statistics are None (a closed-form
    model's inserted block, see :func:`repair_fused`). A point with no contributor gets None.
    """
    maps: dict[tuple[int, str], torch.Tensor] = {}
    targets: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for i, point in enumerate(points[anchor]):
        means, stds, ws = [], [], []
        own = stats[anchor][i]
        for k in range(len(points)):
            if stats[k][i] is None:
                continue  # a closed-form model's inserted block: no real layer here
            mean, std = stats[k][i].mean, stats[k][i].std
            if float(mean.abs().max()) <= ZERO_OUTPUT and float(std.max()) <= ZERO_OUTPUT:
                continue  # an inserted identity block's branch: the model has no real layer here
            if k != anchor:
                key = (k, point.group)
                if key not in maps:
                    maps[key] = core.plan_maps(plans[k][point.group].to(torch.float64), plan_normalization)[0]
                r_map = maps[key].to(mean.device)
                mean, std = core.carry_statistics(mean, r_map), core.carry_statistics(std, r_map)
                alone = r_map.sum(0) == 0
                if own is not None and bool(alone.any()):
                    # a partial assignment (FusionConfig.width_matching) keeps the anchor's neurons without a partner
                    # whole: this model's weight there is the anchor's, in the fused weights and in the targets
                    mean = torch.where(alone, own.mean.to(mean.device, mean.dtype), mean)
                    std = torch.where(alone, own.std.to(std.device, std.dtype), std)
            means.append(mean)
            stds.append(std)
            ws.append(weights[k])
        targets.append(core.repair_targets(means, stds, ws) if means and sum(ws) > 0 else None)
    return targets


@torch.no_grad()
def repair_statistics(
    fused: nn.Module,
    *,
    parents: Sequence[nn.Module],
    specs: Sequence[NetworkSpec],
    anchor: int,
    plans: Mapping[int, Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    adapter: Adapter,
    batches: Sequence[Any],
    plan_normalization: str = "two_sided",
    closed_form: Mapping[int, tuple[nn.Module, UnmatchedBlocks]] | None = None,
    passes: int = 2,
) -> int:
    """REPAIR: correct every repair point of ``fused`` towards its target and fold the corrections into the layers.

    The fused model is measured in ``passes`` forward passes over ``batches``, however many points it has:

    1. On the fly (REPAIR's own scheme, a BatchNorm in train mode with ``weight = sigma*``, ``bias = mu*``): a
       hook at every point accumulates the point's population statistics and corrects each batch with that
       batch's statistics, so the points downstream see corrected inputs. The population statistics give a
       first correction, folded into the weights.
    2. Each further pass measures every point of the corrected model at once and folds a second correction on
       top. A point's measurement is exact given the corrections upstream of it, which moved only by the
       previous pass's refinement; after pass ``p`` the first ``p`` points (in forward order) are exactly the
       sequential result (every point measured after the ones before it are folded, one pass per point), so
       ``passes = len(points)`` reproduces it.

    With the default two passes, on the test models, the folded weights are within a few percent of the
    sequential ones and the statistics within 1-4 % (relative L2) of their targets, about the sampling error of
    the targets themselves; with a single batch the first pass alone is exact.

    Returns the number of points corrected. Arguments as in :func:`repair_fused`; ``passes`` >= 1.
    """
    if passes < 1:
        raise ValueError(f"passes must be at least 1, got {passes}.")
    points = [spec.repair_points for spec in specs]
    if any(len(p) != len(points[anchor]) for p in points):
        raise AlignmentError(
            f"The balanced models have different numbers of repair points {[len(p) for p in points]}; this is a "
            "bug, please report it."
        )
    closed_form = closed_form or {}
    stats = [
        _measure_own_depth(*closed_form[k], points[k], batches, adapter)
        if k in closed_form
        else measure(model, [p.capture for p in points[k]], batches, adapter)
        for k, model in enumerate(parents)
    ]
    targets = repair_targets(points, stats, anchor, plans, weights, plan_normalization)
    active = [(point, target) for point, target in zip(points[anchor], targets) if target is not None]
    if not active:
        return 0
    _fold_corrections(fused, active, measure_corrected_on_the_fly(fused, active, batches, adapter))
    for _ in range(passes - 1):
        _fold_corrections(fused, active, measure(fused, [p.capture for p, _ in active], batches, adapter))
    return len(active)


@torch.no_grad()
def measure_corrected_on_the_fly(
    model: nn.Module,
    points: Sequence[tuple[RepairPoint, tuple[torch.Tensor, torch.Tensor]]],
    batches: Sequence[Any],
    adapter: Adapter,
) -> list[core.ChannelStats]:
    """Statistics at every point in one pass, each batch corrected on the fly towards the point's target.

    At each point's capture a hook adds the batch to the point's statistics, then replaces the output by
    ``scale * y + shift`` with the correction that gives this batch the target ``(mu*, sigma*)``
    (:func:`~hf_clafusion.core.affine_correction`; scale-only where the point has no bias), so downstream points
    are measured on corrected inputs. ``model``'s weights are not changed.

    Args:
        model: the fused model.
        points: ``(point, (mu*, sigma*))`` pairs, each target ``(channels,)``.
        batches: the data.
        adapter: the family's adapter (model inputs, features).

    Returns:
        One `ChannelStats` per point: the statistics of its uncorrected output, with the points upstream corrected
        batch by batch.
    """
    modules = dict(model.named_modules())
    captures = [point.capture for point, _ in points]
    duplicated = sorted({c for c in captures if captures.count(c) > 1})
    unknown = [c for c in captures if c not in modules]
    if duplicated or unknown:
        raise AlignmentError(
            f"Repair points must capture distinct module outputs; duplicated {duplicated[:4]}, not a module "
            f"{unknown[:4]}. This is a bug in the adapter's spec, please report it."
        )
    stats = [core.ChannelStats() for _ in points]
    current: list[Any] = [None]  # the batch being run (the hooks' features need it)
    axes: dict[tuple[str, tuple[int, ...]], int] = {}

    def make_hook(index: int):
        point, (target_mean, target_std) = points[index]

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            y = _first_item(output)
            features = adapter.features(y, current[0])
            if features.shape[0] == 0:
                return None
            stats[index].update(features)
            batch = core.ChannelStats()
            batch.update(features)
            scale, shift = core.affine_correction(
                batch.mean, batch.std, target_mean, target_std, shift=point.bias is not None
            )
            key = (point.capture, tuple(y.shape))
            if key not in axes:
                axes[key] = _channel_axis(adapter, y, current[0], features.shape[1], point.capture)
            view = [1] * y.ndim
            if features.shape[1] > 1:
                view[axes[key]] = -1
            corrected = y * scale.to(y.dtype).view(view)
            if shift is not None:
                corrected = corrected + shift.to(y.dtype).view(view)
            return _replace_first_tensor(output, corrected)

        return hook

    handles = [modules[capture].register_forward_hook(make_hook(i)) for i, capture in enumerate(captures)]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            current[0] = batch
            args, kwargs = adapter.model_inputs(model, batch)
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return stats


def _fold_corrections(
    model: nn.Module,
    points: Sequence[tuple[RepairPoint, tuple[torch.Tensor, torch.Tensor]]],
    stats: Sequence[core.ChannelStats],
) -> None:
    """Fold into each point's layer the correction that gives channels of ``stats`` their target."""
    params = dict(model.named_parameters())
    for (point, (target_mean, target_std)), current in zip(points, stats):
        scale, shift = core.affine_correction(
            current.mean, current.std, target_mean, target_std, shift=point.bias is not None
        )
        weight = params[point.weight]
        bias = params[point.bias] if point.bias is not None else None
        new_weight, new_bias = core.fold_affine(
            weight.data,
            None if bias is None else bias.data,
            scale.to(weight.device),
            _to(shift, weight.device),
            axis=point.axis,
        )
        weight.copy_(new_weight)
        if bias is not None:
            bias.copy_(new_bias)


def _channel_axis(adapter: Adapter, output: torch.Tensor, batch: Any, channels: int, capture: str) -> int:
    """The axis of ``output`` that the adapter's features read as channels (found by running them on indices)."""
    probe = torch.arange(output.numel(), dtype=torch.float64, device=output.device).reshape(output.shape)
    index = adapter.features(probe, batch).long()
    if channels == 1:
        return 0
    stride = int(index[0, 1] - index[0, 0])
    for axis in range(output.ndim):
        if output.shape[axis] == channels and probe.stride(axis) == stride:
            if torch.equal((index // stride) % channels, torch.arange(channels, device=index.device).expand_as(index)):
                return axis
    raise AlignmentError(
        f"The channels of the output of {capture!r} (shape {tuple(output.shape)}) are not one axis of it; this is "
        "a bug in the adapter's features(), please report it."
    )


def _first_item(value: Any) -> torch.Tensor:
    """The tensor a repair point corrects in a module output: the output, or the first item of a tuple/list."""
    while isinstance(value, (tuple, list)):
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise AlignmentError(
            f"REPAIR can only correct module outputs that are tensors or tuples of tensors, got "
            f"{type(value).__name__}; this is a bug in the adapter's repair points, please report it."
        )
    return value


def _replace_first_tensor(value: Any, tensor: torch.Tensor) -> Any:
    """``value`` (a module output: a tensor, or a tuple/list whose first item is one) with its first tensor replaced."""
    if isinstance(value, (tuple, list)):
        return type(value)([_replace_first_tensor(value[0], tensor), *value[1:]])
    return tensor


def _measure_own_depth(
    model: nn.Module,
    unmatched: UnmatchedBlocks,
    points: Sequence[RepairPoint],
    batches: Sequence[Any],
    adapter: Adapter,
) -> list[core.ChannelStats | None]:
    """Statistics of a closed-form parent at its repair points, measured on the parent before balancing.

    A point inside an inserted block (its weight is one of ``unmatched.params``) gets None: the parent has no
    real layer there. The others are read at the capture of the unbalanced parent that sees the same
    activations (``unmatched.captures``).
    """
    inside = [p.weight in unmatched.params for p in points]
    missing = sorted(
        {p.capture for p, skip in zip(points, inside) if not skip and p.capture not in unmatched.captures}
    )
    if missing:
        raise AlignmentError(
            f"The adapter maps no capture of the unbalanced model to the repair points {missing[:4]}; this is a "
            "bug, please report it."
        )
    captures = [unmatched.captures[p.capture] for p, skip in zip(points, inside) if not skip]
    measured = iter(measure(model, captures, batches, adapter))
    return [None if skip else next(measured) for skip in inside]


def _to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


__all__ = [
    "RepairOutcome",
    "clearly_better",
    "identity_batchnorms",
    "measure",
    "measure_corrected_on_the_fly",
    "repair_fused",
    "repair_statistics",
    "repair_targets",
    "resolve_mode",
]
