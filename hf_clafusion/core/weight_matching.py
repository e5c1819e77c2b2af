"""Git Re-Basin weight matching: every group's plan chosen to maximise the weights' agreement, by coordinate ascent.

Model B's parameters are carried into the anchor A's neuron basis by one transport plan per alignment group; a
parameter may be read or written by several groups, one per axis (a Linear weight: its rows by the layer's group,
its columns by the previous layer's). Weight matching maximises the total inner product

    F(T_1, ..., T_G) = sum over parameters p of < A_p, B_p transported along every axis of p >

one group at a time: with every other group's plan fixed, ``F`` is linear in ``T_g`` (when ``g`` indexes at most
one axis of each parameter), ``F = <T_g, G_g> + const``, and the best ``T_g`` is a linear assignment (equal widths:
a permutation) or, for different widths, the exact transport plan with the library's uniform marginals. Groups are
visited in a seeded random order until a sweep changes no plan.

Conventions are those of :mod:`hf_clafusion.core.transport`: a plan ``T`` is ``(n_B, n_A)`` with uniform
marginals; an axis that writes the neurons (``role="out"``) is transported with ``R = T / colsum(T)`` (``n_A T``),
one that reads them (``role="in"``) with ``S = T / rowsum(T)`` (``n_B T``, ``normalization="two_sided"``) or with
``R`` (``"column"``).

Reference:
    Ainsworth, Hayase & Srinivasa, "Git Re-Basin: Merging Models modulo Permutation Symmetries", ICLR 2023
    (Algorithm 1, weight matching).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import ConfigError
from .averaging import apply_plan, neuron_rows
from .transport import expand_head_plan, head_plan, plan_maps, solve_transport


class MatchAxis(Protocol):
    """One parameter axis of a group, as :class:`hf_clafusion.spec.AxisRef` describes it (any object with these
    attributes): ``param`` (key in the parameter dicts), ``axis``, ``role`` (``"out"`` or ``"in"``), ``inner``,
    ``outer`` and ``repeat`` (see :func:`~hf_clafusion.core.apply_plan` and
    :func:`~hf_clafusion.core.expand_head_plan`)."""

    @property
    def param(self) -> str: ...
    @property
    def axis(self) -> int: ...
    @property
    def role(self) -> str: ...
    @property
    def inner(self) -> int: ...
    @property
    def outer(self) -> int: ...
    @property
    def repeat(self) -> int: ...


@dataclass(frozen=True)
class MatchGroup:
    """An alignment group for weight matching: the axes its plan acts on and the plan's structure.

    Attributes:
        axes: the parameter axes the group's neurons index (:class:`MatchAxis`, e.g. a ``Group``'s ``axes``);
            parameters not found in both parameter dicts are ignored (a group left with none keeps its initial
            plan).
        heads: with ``heads > 1`` the plan is a hard head-structured permutation (:func:`head_plan`: heads move
            as wholes) and axes with ``repeat > 1`` hold each head ``repeat`` times; 1 for a free plan.
        head_dims_free: with heads, whether dimensions may also move inside a head.
    """

    axes: tuple[MatchAxis, ...]
    heads: int = 1
    head_dims_free: bool = True


@dataclass(frozen=True)
class WeightMatching:
    """The result of :func:`weight_matching`.

    Attributes:
        plans: one ``(n_B, n_A)`` float64 plan per group (uniform marginals), in group order.
        solvers: the solver of each group's last accepted plan (``"permutation"``, ``"emd"``, ``"heads"``, or
            ``"init"`` when the initial plan was kept).
        objective: ``F`` (the module docstring) for the initial plans, then after every sweep; non-decreasing
            when no group indexes two axes of one parameter.
        sweeps: sweeps run over all groups.
        converged: whether the last sweep changed no plan (False: ``max_sweeps`` was reached first).
    """

    plans: list[torch.Tensor]
    solvers: list[str]
    objective: list[float]
    sweeps: int
    converged: bool


#: Exact solvers weight matching accepts (a soft plan has no assignment to converge to).
EXACT_SOLVERS = ("auto", "emd", "permutation")


def group_similarity(
    params_b: Mapping[str, torch.Tensor],
    params_a: Mapping[str, torch.Tensor],
    groups: Sequence[MatchGroup],
    plans: Sequence[torch.Tensor | None],
    g: int,
    *,
    normalization: str = "column",
) -> torch.Tensor:
    """The coefficients ``G_g`` of ``F`` in group ``g``'s plan: ``F = <T_g, G_g> + terms without T_g``.

    For each axis of group ``g`` on parameter ``p``: ``B_p`` transported along every *other* axis of ``p`` by the
    current plans (an axis of a group whose plan is ``None`` contributes nothing: the term is dropped), and the
    inner products of its neuron slices with ``A_p``'s, ``C[i, j] = <B_p[.., i, ..], A_p[.., j, ..]>``. Output axes
    weigh ``C`` by ``n_A`` (``R = n_A T``), input axes by ``n_B`` (``S = n_B T``, ``"two_sided"``) or ``n_A``
    (``"column"``); with ``repeat > 1`` the repeated heads' blocks are summed.

    Args:
        params_b: parameter name -> tensor of model B (the model aligned).
        params_a: parameter name -> tensor of the anchor A.
        groups: the alignment groups.
        plans: the current ``(n_B, n_A)`` plan of each group, or ``None`` for a group without one yet.
        g: the group whose coefficients are wanted.
        normalization: ``"column"`` or ``"two_sided"`` (:func:`~hf_clafusion.core.plan_maps`).

    Returns:
        `Tensor` of shape `(n_B, n_A)`, float64.
    """
    maps = _maps(plans, normalization)
    return _similarity(params_b, params_a, groups, maps, _owners(groups, params_b, params_a), g, normalization)


def weight_matching_objective(
    params_b: Mapping[str, torch.Tensor],
    params_a: Mapping[str, torch.Tensor],
    groups: Sequence[MatchGroup],
    plans: Sequence[torch.Tensor],
    *,
    normalization: str = "column",
) -> float:
    """``F``: the sum over the parameters the groups touch of ``<A_p, B_p transported along all its axes>``.

    Args:
        params_b: parameter name -> tensor of model B (the model aligned).
        params_a: parameter name -> tensor of the anchor A.
        groups: the alignment groups.
        plans: one ``(n_B, n_A)`` plan per group.
        normalization: ``"column"`` or ``"two_sided"``.

    Returns:
        `float`: the objective, accumulated in float64.
    """
    maps = _maps(plans, normalization)
    total = 0.0
    for param, refs in _owners(groups, params_b, params_a).items():
        moved = _transported(params_b[param], refs, maps, groups, skip=None)
        total += float((moved.double() * params_a[param].double().to(moved.device)).sum())
    return total


def weight_matching(
    params_b: Mapping[str, torch.Tensor],
    params_a: Mapping[str, torch.Tensor],
    groups: Sequence[MatchGroup],
    *,
    init: Sequence[torch.Tensor | None] | None = None,
    solver: str = "auto",
    normalization: str = "column",
    max_sweeps: int = 100,
    seed: int = 0,
) -> WeightMatching:
    """Git Re-Basin weight matching (Algorithm 1) between model B and the anchor A, for any widths.

    Groups without an initial plan are solved first, in the given (forward) order, each from the plans found
    before it (later groups contribute nothing yet): from ``init=None`` this first pass is a one-pass forward
    matching, as OTFusion's weight metric. Then sweeps visit every group in a random order (seeded), replacing
    its plan by the maximiser of ``<T, G_g>`` (:func:`group_similarity`): a linear assignment for equal widths,
    the exact transport plan with uniform marginals otherwise, a head-structured permutation for head groups. A
    new plan is kept only when it raises the group's objective, so ``F`` never decreases (when no group indexes
    two axes of one parameter); the loop stops after a sweep that changes nothing, or after ``max_sweeps``.

    Args:
        params_b: parameter name -> tensor of model B (the model aligned); each axis of a group holds ``n_B``
            neurons (times ``inner``, ``outer`` and ``repeat``).
        params_a: parameter name -> tensor of the anchor A, the same shapes but ``n_A`` neurons on group axes.
        groups: the alignment groups (:class:`MatchGroup`), in forward order.
        init: an initial ``(n_B, n_A)`` plan (or ``None``) per group; ``None`` for none at all.
        solver: ``"auto"`` (:func:`~hf_clafusion.core.auto_solver`), ``"emd"`` or ``"permutation"``.
        normalization: ``"column"`` or ``"two_sided"`` (:func:`~hf_clafusion.core.plan_maps`), as the plans will
            be applied.
        max_sweeps: the most sweeps over all groups.
        seed: seed of the visiting order.

    Returns:
        `WeightMatching`: the plans, their solvers, the objective per sweep and whether the loop converged.

    Raises:
        ConfigError: a soft or unknown ``solver``, or ``init`` of the wrong length.

    Example:
        ```py
        >>> import torch
        >>> from hf_clafusion.core import MatchGroup, weight_matching
        >>> from hf_clafusion.spec import AxisRef
        >>> _ = torch.manual_seed(0)
        >>> a = {"0.weight": torch.randn(5, 3), "1.weight": torch.randn(2, 5)}
        >>> order = torch.tensor([3, 0, 4, 1, 2])
        >>> b = {"0.weight": a["0.weight"][order], "1.weight": a["1.weight"][:, order]}
        >>> group = MatchGroup((AxisRef("0.weight", 0, "out"), AxisRef("1.weight", 1, "in")))
        >>> found = weight_matching(b, a, [group])
        >>> (found.plans[0] * 5).argmax(dim=1).tolist()  # neuron i of B is neuron order[i] of A
        [3, 0, 4, 1, 2]
        ```
    """
    if solver not in EXACT_SOLVERS:
        raise ConfigError(
            f"Weight matching needs an exact solver, got solver={solver!r}. Use one of "
            f"{', '.join(map(repr, EXACT_SOLVERS))}.",
            field="solver",
        )
    if init is not None and len(init) != len(groups):
        raise ConfigError(f"`init` has {len(init)} plans for {len(groups)} groups; give one (or None) per group.")
    plans: list[torch.Tensor | None] = [
        None if p is None else p.double().cpu() for p in (init or [None] * len(groups))
    ]
    solvers = ["init"] * len(groups)
    maps, owners = _maps(plans, normalization), _owners(groups, params_b, params_a)
    usable = [any(axis.param in owners for axis in group.axes) for group in groups]
    for g in range(len(groups)):
        if plans[g] is None:
            if not usable[g]:
                raise ValueError(f"Group {g} indexes no parameter present in both models and has no initial plan.")
            similarity = _similarity(params_b, params_a, groups, maps, owners, g, normalization)
            plans[g], solvers[g] = _maximiser(similarity, groups[g], solver)
            maps[g] = plan_maps(plans[g], normalization)
    objective = [weight_matching_objective(params_b, params_a, groups, plans, normalization=normalization)]
    order = torch.Generator().manual_seed(seed)
    sweeps, converged = 0, False
    while sweeps < max_sweeps and not converged:
        sweeps += 1
        converged = True
        for g in torch.randperm(len(groups), generator=order).tolist():
            if not usable[g]:  # no parameter to compare: its initial plan stays
                continue
            similarity = _similarity(params_b, params_a, groups, maps, owners, g, normalization)
            plan, ran = _maximiser(similarity, groups[g], solver)
            old, new = float((plans[g] * similarity).sum()), float((plan * similarity).sum())
            if new > old + 1e-12 * max(1.0, abs(old)) and not torch.equal(plan, plans[g]):
                plans[g], solvers[g], converged = plan, ran, False
                maps[g] = plan_maps(plan, normalization)
        objective.append(weight_matching_objective(params_b, params_a, groups, plans, normalization=normalization))
    return WeightMatching(plans=plans, solvers=solvers, objective=objective, sweeps=sweeps, converged=converged)


# --------------------------------------------------------------------------------------------- internals


def _similarity(params_b, params_a, groups, maps, owners, g, normalization) -> torch.Tensor:
    """:func:`group_similarity` from the plans' maps (:func:`_maps`) and the parameters' owners (:func:`_owners`)."""
    group = groups[g]
    n_b, n_a = _widths(group, params_b, params_a)
    total = torch.zeros(n_b, n_a, dtype=torch.float64)
    for axis in group.axes:
        if axis.param not in owners:
            continue
        moved = _transported(params_b[axis.param], owners[axis.param], maps, groups, skip=(g, axis))
        if moved is None:
            continue
        rows_b = neuron_rows(moved, axis).double()
        rows_a = neuron_rows(params_a[axis.param], axis).to(rows_b)
        products = (rows_b @ rows_a.T).cpu()
        if axis.repeat > 1:  # (heads, repeat, dim) on both sides: the map acts identically on each repeat
            heads = max(group.heads, 1)
            blocks = products.reshape(heads, axis.repeat, n_b // heads, heads, axis.repeat, n_a // heads)
            products = blocks.diagonal(dim1=1, dim2=4).sum(-1).reshape(n_b, n_a)
        scale = n_a if axis.role == "out" or normalization == "column" else n_b
        total += scale * products
    return total


def _maximiser(similarity: torch.Tensor, group: MatchGroup, solver: str) -> tuple[torch.Tensor, str]:
    """The plan maximising ``<T, similarity>`` over uniform-marginal plans (head-structured with heads)."""
    spread = float(similarity.max() - similarity.min())
    cost = (similarity.max() - similarity) / (spread if spread > 0 else 1.0)  # non-negative, max-normalised
    if group.heads > 1:
        return head_plan(cost, group.heads, within=group.head_dims_free).double(), "heads"
    solution = solve_transport(cost, solver=solver)
    return torch.as_tensor(solution.plan, dtype=torch.float64).cpu(), solution.solver


def _widths(group: MatchGroup, params_b, params_a) -> tuple[int, int]:
    for axis in group.axes:
        if axis.param in params_b and axis.param in params_a:
            per = axis.inner * axis.outer * axis.repeat
            return params_b[axis.param].shape[axis.axis] // per, params_a[axis.param].shape[axis.axis] // per
    raise ValueError("A group has no axis on a parameter present in both models.")


def _owners(groups: Sequence[MatchGroup], params_b, params_a) -> dict[str, list[tuple[int, MatchAxis]]]:
    """Parameter name -> every (group, axis) that transports one of its axes."""
    owners: dict[str, list[tuple[int, MatchAxis]]] = {}
    for g, group in enumerate(groups):
        for axis in group.axes:
            if axis.param in params_b and axis.param in params_a:
                owners.setdefault(axis.param, []).append((g, axis))
    return owners


def _maps(plans, normalization) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    return [None if plan is None else plan_maps(plan.double(), normalization) for plan in plans]


def _transported(tensor, refs, maps, groups, skip) -> torch.Tensor | None:
    """``tensor`` transported along each of its group axes but ``skip``; ``None`` when an axis has no plan yet."""
    out = tensor.double()
    for g, axis in refs:
        if skip is not None and (g, axis) == skip:
            continue
        if maps[g] is None:
            return None
        r_map, s_map = maps[g]
        matrix = (r_map if axis.role == "out" else s_map).to(out.device)
        if axis.repeat > 1:
            matrix = expand_head_plan(matrix, max(groups[g].heads, 1), axis.repeat)
        out = apply_plan(out, axis.axis, matrix, inner=axis.inner, outer=axis.outer)
    return out


__all__ = [
    "EXACT_SOLVERS",
    "MatchAxis",
    "MatchGroup",
    "WeightMatching",
    "group_similarity",
    "weight_matching",
    "weight_matching_objective",
]
