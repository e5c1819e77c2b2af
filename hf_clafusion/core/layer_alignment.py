"""Cross-layer alignment (CLA): map every layer of a shallow network to a distinct layer of a deep one.

The dynamic programme of Nguyen et al. (CLAFusion, arXiv 2110.15538, ICASSP 2023), ported from
``hsgser/clafusion: align_layers.py::align`` with 0-indexed integer output, explicit errors on infeasible
constraints, and the same tie-breaking (the leftmost deep layer among equal-cost choices).
"""

from __future__ import annotations

import random as _random
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import AlignmentError


def _as_cost(cost) -> np.ndarray:
    if isinstance(cost, torch.Tensor):
        cost = cost.detach().cpu().double().numpy()
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise AlignmentError(f"The layer cost must be a 2-D (deep x shallow) matrix, got shape {cost.shape}.")
    if not np.all(np.isfinite(cost)):
        raise AlignmentError("The layer cost matrix contains NaN or infinite values; check the activations.")
    return cost


def _check_constraints(m: int, n: int, first_fixed: int, last_fixed: int) -> None:
    if n > m:
        raise AlignmentError(
            f"The cost matrix must be deep x shallow (rows >= columns), got {m} x {n}. Transpose it so that "
            "rows are the deeper model's layers."
        )
    for name, value in (("first_fixed", first_fixed), ("last_fixed", last_fixed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise AlignmentError(f"`{name}` must be an integer >= 0, got {value!r}.")
    if first_fixed + last_fixed > n and m != n:
        raise AlignmentError(
            f"Infeasible constraint: first_fixed={first_fixed} + last_fixed={last_fixed} layers must be matched "
            f"one-to-one, but the shallow model has only {n} layer(s) (deep model: {m}). Lower first_fixed or "
            f"last_fixed so that their sum is at most {n}."
        )


def align_layers(cost, *, first_fixed: int = 1, last_fixed: int = 1) -> list[int]:
    """Minimum-cost monotone map from shallow layers to deep layers.

    Solves ``min sum_k cost[a_k, k]`` over strictly increasing ``a_0 < a_1 < ... < a_{n-1}`` with
    ``a_k = k`` for the first ``first_fixed`` layers and ``a_{n-1-j} = m-1-j`` for the last ``last_fixed``.
    Ties go to the smallest deep index that keeps the optimum, as in the official code, so the result is
    bit-for-bit the official one (``start_layer_idx = first_fixed + 1``, ``free_end_layers = last_fixed``).

    Args:
        cost (`array-like` of shape `(m, n)`): dissimilarity between deep layer ``i`` (rows) and shallow
            layer ``j`` (columns), ``m >= n``. A numpy array, nested list or torch tensor.
        first_fixed (`int`, defaults to 1): leading layers matched one-to-one.
        last_fixed (`int`, defaults to 1): trailing layers matched end-to-end.

    Returns:
        `list[int]`: ``n`` strictly increasing 0-indexed deep-layer indices, one per shallow layer.

    Raises:
        AlignmentError: the matrix is not deep x shallow, contains non-finite values, or the constraints
            cannot be met (``first_fixed + last_fixed > n`` while ``m > n``).

    Example:
        ```py
        >>> from hf_clafusion.core import align_layers
        >>> align_layers([[0, 9, 9], [9, 0, 9], [9, 9, 9], [9, 9, 9], [9, 9, 0]])
        [0, 1, 4]
        ```
    """
    c = _as_cost(cost)
    m, n = c.shape
    _check_constraints(m, n, first_fixed, last_fixed)
    if n == 0:
        return []
    if m == n:
        return list(range(n))
    s = first_fixed + 1  # official 1-indexed start_layer_idx
    f = last_fixed
    # F[k][l]: best cost of matching shallow layers 1..k into deep layers 1..l (1-indexed, as the official code).
    table = np.zeros((n + 1, m + 1), dtype=np.float64)
    for k in range(1, n + 1):
        table[k][k] = table[k - 1][k - 1] + c[k - 1][k - 1]
    if s > 1:
        for col in range(s, m - f + 1):
            table[s - 1][col] = table[s - 1][s - 1]
    for k in range(s, n - f + 1):
        for col in range(k + 1, m - f + 1):
            table[k][col] = min(table[k][col - 1], table[k - 1][col - 1] + c[col - 1][k - 1])
    result = [0] * n
    for k in range(1, s):
        result[k - 1] = k
    for j in range(f):
        result[n - j - 1] = m - j
    col = m - f
    for k in range(n - f, s - 1, -1):
        while col >= k + 1 and table[k][col] == table[k][col - 1]:
            col -= 1
        result[k - 1] = col
        col -= 1
    return [a - 1 for a in result]


def chain_alignment(num_deep: int, num_shallow: int) -> list[int]:
    """The 'chain' baseline: shallow layer ``k`` -> deep layer ``k`` (the official ``mapping_type='chain'``)."""
    if num_shallow > num_deep:
        raise AlignmentError(f"num_shallow ({num_shallow}) cannot exceed num_deep ({num_deep}).")
    return list(range(num_shallow))


def random_alignment(
    num_deep: int, num_shallow: int, *, first_fixed: int = 1, last_fixed: int = 1, seed: int | None = None
) -> list[int]:
    """The 'random' baseline: a uniformly random strictly increasing map honouring the fixed layers."""
    _check_constraints(num_deep, num_shallow, first_fixed, last_fixed)
    if num_deep == num_shallow:
        return list(range(num_shallow))
    rng = _random.Random(seed)
    head = list(range(first_fixed))
    tail = [num_deep - last_fixed + j for j in range(last_fixed)]
    free_pool = range(first_fixed, num_deep - last_fixed)
    middle = sorted(rng.sample(free_pool, num_shallow - first_fixed - last_fixed))
    return head + middle + tail


def alignment_cost(cost, alignment: Sequence[int]) -> float:
    """Total cost ``sum_k cost[alignment[k], k]`` of an alignment."""
    c = _as_cost(cost)
    return float(sum(c[a, k] for k, a in enumerate(alignment)))


def relax_constraints(num_shallow: int, first_fixed: int, last_fixed: int) -> tuple[int, int]:
    """Per-segment constraint clamping used by the fusion pipeline.

    Values up to 1 mean "keep the boundary layers matched"; a segment too short to honour both (a
    one-layer segment) drops them and is aligned by cost alone. Larger values are a user's explicit request
    and are never relaxed (``align_layers`` then raises).
    """
    if first_fixed + last_fixed <= num_shallow:
        return first_fixed, last_fixed
    if first_fixed <= 1 and last_fixed <= 1:
        half = num_shallow // 2
        return min(first_fixed, half), min(last_fixed, half)
    return first_fixed, last_fixed


__all__ = ["align_layers", "alignment_cost", "chain_alignment", "random_alignment", "relax_constraints"]
