"""Neuron transport plans between two layers, and the ground metrics that feed them.

Convention (``docs/concepts.md``): a plan ``T`` has shape ``(n_B, n_A)`` -- rows are the neurons of the model
being aligned (B), columns the anchor's (A) -- with uniform marginals ``T 1 = 1/n_B`` and ``T^T 1 = 1/n_A``.
Output axes are transported with ``R = n_A T`` (columns sum to one, a barycentric projection) and input axes
with ``S = n_B T`` (rows sum to one), which keeps a model equal to itself when one copy is widened by neuron
duplication; the official code applies ``R`` on both axes (``normalization="column"``).

References:
    Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020 (OTFusion).
    Flamary et al., "POT: Python Optimal Transport", JMLR 2021.
"""

from __future__ import annotations

import warnings

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment

from ..errors import ClaFusionWarning, ConfigError


class ActivationStats:
    """Streamed sufficient statistics of two layers' activations on the same samples.

    Keeps ``sum a_B^2`` ``(n_B,)``, ``sum a_A^2`` ``(n_A,)`` and ``sum a_B^T a_A`` ``(n_B, n_A)`` in float64, so
    memory is ``O(n_A n_B)`` whatever the number of samples.

    Example:
        ```py
        >>> import torch
        >>> from hf_clafusion.core import ActivationStats
        >>> stats = ActivationStats()
        >>> x = torch.randn(100, 8)
        >>> stats.update(x[:, [1, 0, 2, 3, 4, 5, 6, 7]], x)
        >>> stats.distances().argmin(dim=1)[:3].tolist()
        [1, 0, 2]
        ```
    """

    def __init__(self) -> None:
        self.count = 0
        self.sq_b: torch.Tensor | None = None
        self.sq_a: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None

    def update(self, acts_b: torch.Tensor, acts_a: torch.Tensor) -> None:
        """Add samples: ``acts_b`` ``(S, n_B)`` and ``acts_a`` ``(S, n_A)``, row ``s`` of both from the same input."""
        if acts_b.shape[0] != acts_a.shape[0]:
            raise ValueError(f"Sample counts differ: {acts_b.shape[0]} vs {acts_a.shape[0]}.")
        b, a = acts_b.double(), acts_a.double()
        sq_b, sq_a, cross = b.square().sum(0), a.square().sum(0), b.T @ a
        if self.cross is None:
            self.sq_b, self.sq_a, self.cross = sq_b, sq_a, cross
        else:
            self.sq_b += sq_b
            self.sq_a += sq_a
            self.cross += cross
        self.count += b.shape[0]

    def distances(self) -> torch.Tensor:
        """``(n_B, n_A)`` RMS distances ``sqrt(||b_i - a_j||^2 / S)`` (the official normalised euclidean metric)."""
        if self.cross is None:
            raise ValueError("No activations were accumulated.")
        sq = self.sq_b[:, None] + self.sq_a[None, :] - 2.0 * self.cross
        return (sq.clamp_min(0.0) / self.count).sqrt()


def weight_distances(weight_b: torch.Tensor, weight_a: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between neuron weight rows: ``(n_B, ...)`` x ``(n_A, ...)`` -> ``(n_B, n_A)``.

    Trailing axes (inputs, kernel taps) are flattened; both tensors must already share their input basis.
    """
    b = weight_b.reshape(weight_b.shape[0], -1).double()
    a = weight_a.reshape(weight_a.shape[0], -1).double()
    return torch.cdist(b, a)


def transport_plan(
    cost, *, solver: str = "emd", reg: float = 0.05, max_iter: int = 10_000
) -> torch.Tensor | np.ndarray:
    """Optimal transport plan between uniform measures on B's neurons (rows) and A's neurons (columns).

    Args:
        cost (`np.ndarray` or `torch.Tensor` of shape `(n_B, n_A)`): ground cost, non-negative.
        solver (`str`): ``"emd"`` (exact network simplex, ``ot.emd``), ``"sinkhorn"`` (entropic,
            ``ot.sinkhorn`` on the cost divided by its maximum; runs on the tensor's device through POT's torch
            backend), or ``"permutation"`` (a hard assignment by ``scipy.optimize.linear_sum_assignment``; needs
            ``n_A == n_B``).
        reg (`float`): Sinkhorn regularisation relative to the max-normalised cost.
        max_iter (`int`): Sinkhorn iteration cap.

    Returns:
        `Tensor` or `np.ndarray` of shape `(n_B, n_A)`: the plan ``T``, same array type, device and float64
            precision as the input; ``T.sum() == 1``.

    Raises:
        ConfigError: unknown solver, or ``"permutation"`` with different widths.
    """
    is_torch = isinstance(cost, torch.Tensor)
    if is_torch:
        device = cost.device
        cost_t = cost.detach().double()
    else:
        cost_t = torch.as_tensor(np.asarray(cost, dtype=np.float64))
        device = cost_t.device
    n_b, n_a = cost_t.shape
    if solver == "emd":
        plan_np = ot.emd(np.full(n_b, 1.0 / n_b), np.full(n_a, 1.0 / n_a), cost_t.cpu().numpy(), numItermax=1_000_000)
        plan = torch.as_tensor(plan_np, dtype=torch.float64, device=device)
    elif solver == "permutation":
        if n_a != n_b:
            raise ConfigError(
                f"solver='permutation' needs layers of equal width, got {n_b} and {n_a} neurons. Use solver='emd' "
                "or 'sinkhorn' for models of different widths.",
                field="solver",
            )
        rows, cols = linear_sum_assignment(cost_t.cpu().numpy())
        plan = torch.zeros(n_b, n_a, dtype=torch.float64, device=device)
        plan[torch.as_tensor(rows), torch.as_tensor(cols)] = 1.0 / n_b
    elif solver == "sinkhorn":
        # Runs on the input's own backend (numpy, or torch on the tensor's device) through POT.
        native = cost.detach().double() if is_torch else cost_t.numpy()
        nx = ot.backend.get_backend(native)
        scaled = native / max(float(nx.max(native)), 1e-12)
        mu = nx.full((n_b,), 1.0 / n_b, type_as=native)
        nu = nx.full((n_a,), 1.0 / n_a, type_as=native)
        with warnings.catch_warnings():  # POT's own non-convergence warning is replaced by ours below
            warnings.simplefilter("ignore", UserWarning)
            plan = ot.sinkhorn(mu, nu, scaled, reg, method="sinkhorn_log", numItermax=max_iter, stopThr=1e-9)
        columns = nx.sum(plan, 0)
        error = float(nx.max(nx.abs(columns - nu))) * n_a
        if not np.isfinite(nx.to_numpy(plan)).all() or error > 1e-3:
            warnings.warn(
                f"Sinkhorn did not reach its marginals (relative error {error:.2e}). Raise `reg` (now {reg}) or "
                "use solver='emd'.",
                ClaFusionWarning,
                stacklevel=2,
            )
        # Project onto the exact column marginals so that R's columns sum to one.
        return plan / nx.clip(columns, 1e-300, None)[None, :] / n_a
    else:
        raise ConfigError(
            f"Unknown solver {solver!r}. Choose one of: 'emd', 'sinkhorn', 'permutation'.", field="solver"
        )
    return plan if is_torch else plan.cpu().numpy()


def head_plan(cost, heads: int, *, within: bool = True) -> torch.Tensor:
    """A hard plan that keeps attention heads whole: heads move as units, dimensions only inside a head.

    The cost between head ``h_B`` of B and head ``h_A`` of A is the cost of the best assignment of their
    dimensions (``within=True``) or of the dimensions in place (``within=False``, for rotary embeddings, where a
    dimension's position inside a head fixes its frequency); a second assignment matches the heads.

    Args:
        cost (`Tensor` of shape `(n, n)`): neuron costs, ``n = heads * head_dim`` on both sides.
        heads (`int`): number of heads.
        within (`bool`): whether dimensions may be permuted inside a head.

    Returns:
        `Tensor` of shape `(n, n)`, float64: a permutation matrix divided by ``n`` (uniform marginals, as
        :func:`transport_plan`).

    Raises:
        ValueError: the cost is not square or its size is not a multiple of ``heads``.
    """
    cost_t = torch.as_tensor(cost).detach().double().cpu()
    n_b, n_a = cost_t.shape
    if n_b != n_a or n_b % heads:
        raise ValueError(f"A head-structured plan needs a square cost divisible by {heads} heads, got {n_b}x{n_a}.")
    dim = n_b // heads
    blocks = cost_t.reshape(heads, dim, heads, dim).permute(0, 2, 1, 3).numpy()  # (H_B, H_A, d, d)
    inner: dict[tuple[int, int], np.ndarray] = {}
    head_cost = np.zeros((heads, heads))
    for hb in range(heads):
        for ha in range(heads):
            if within:
                rows, cols = linear_sum_assignment(blocks[hb, ha])
                inner[(hb, ha)] = cols[np.argsort(rows)]
                head_cost[hb, ha] = blocks[hb, ha][rows, cols].sum()
            else:
                head_cost[hb, ha] = np.trace(blocks[hb, ha])
    rows, cols = linear_sum_assignment(head_cost)
    plan = torch.zeros(n_b, n_a, dtype=torch.float64)
    for hb, ha in zip(rows.tolist(), cols.tolist()):
        targets = inner[(hb, ha)] if within else np.arange(dim)
        plan[hb * dim + np.arange(dim), ha * dim + targets] = 1.0 / n_b
    return plan.to(cost.device if isinstance(cost, torch.Tensor) else "cpu")


def expand_head_plan(matrix: torch.Tensor, heads: int, repeat: int) -> torch.Tensor:
    """The map of a head-structured group for an axis that holds every head ``repeat`` times in a row.

    With grouped-query attention a key/value head serves ``repeat`` consecutive query heads; the query
    projection's rows ``(kv_head, repeat, head_dim)`` must follow the key/value heads' plan identically.
    """
    if repeat == 1:
        return matrix
    n_b, n_a = matrix.shape
    blocks = matrix.reshape(heads, n_b // heads, heads, n_a // heads)
    eye = torch.eye(repeat, dtype=matrix.dtype, device=matrix.device)
    out = torch.einsum("aebf,rs->arebsf", blocks, eye)
    return out.reshape(n_b * repeat, n_a * repeat)


def plan_maps(plan: torch.Tensor, normalization: str = "two_sided") -> tuple[torch.Tensor, torch.Tensor]:
    """The two rescalings of a plan ``(n_B, n_A)``: ``R`` for output axes and ``S`` for input axes.

    ``"two_sided"``: ``R = T / colsum(T)`` (= ``n_A T``) and ``S = T / rowsum(T)`` (= ``n_B T``).
    ``"column"``: the official code's ``R`` on both axes (exact only for equal widths).
    """
    r = plan / plan.sum(0, keepdim=True).clamp_min(1e-300)
    if normalization == "column":
        return r, r
    if normalization != "two_sided":
        raise ConfigError(f"Unknown plan normalization {normalization!r}. Use 'two_sided' or 'column'.")
    return r, plan / plan.sum(1, keepdim=True).clamp_min(1e-300)


__all__ = [
    "ActivationStats",
    "expand_head_plan",
    "head_plan",
    "plan_maps",
    "transport_plan",
    "weight_distances",
]
