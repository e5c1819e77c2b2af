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
from dataclasses import dataclass

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment

from ..errors import ClaFusionWarning, ConfigError


class ActivationStats:
    """Streamed sufficient statistics of two layers' activations on the same samples.

    Per batch, the products are computed in ``product_dtype`` (float32 by default: fast matrix products, half
    the memory traffic of float64) and added into float64 buffers, so rounding does not grow with the number of
    batches. Activations are shifted by a per-neuron reference (the first batch's mean) before any product, and
    distances are formed from central moments, which avoids the cancellation of
    ``||a||^2 + ||b||^2 - 2 <a, b>`` when neurons have large means (ReLU outputs, residual streams).

    Buffers: ``sum`` ``(n_B,)``/``(n_A,)``, ``sum of squares`` ``(n_B,)``/``(n_A,)`` and ``cross`` ``(n_B, n_A)``,
    all float64 on the activations' device; memory is ``O(n_A n_B)`` whatever the number of samples.

    Args:
        product_dtype (`torch.dtype`): dtype of the per-batch products; ``torch.float64`` for a reference.

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

    def __init__(self, product_dtype: torch.dtype = torch.float32) -> None:
        self.product_dtype = product_dtype
        self.count = 0
        self.shift_b: torch.Tensor | None = None
        self.shift_a: torch.Tensor | None = None
        self.sum_b: torch.Tensor | None = None
        self.sum_a: torch.Tensor | None = None
        self.sq_b: torch.Tensor | None = None
        self.sq_a: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None

    def update(self, acts_b: torch.Tensor, acts_a: torch.Tensor) -> None:
        """Add samples: ``acts_b`` ``(S, n_B)`` and ``acts_a`` ``(S, n_A)``, row ``s`` of both from the same input."""
        if acts_b.shape[0] != acts_a.shape[0]:
            raise ValueError(f"Sample counts differ: {acts_b.shape[0]} vs {acts_a.shape[0]}.")
        b, a = acts_b.detach().to(self.product_dtype), acts_a.detach().to(self.product_dtype)
        if self.shift_b is None:
            self.shift_b, self.shift_a = b.mean(0), a.mean(0)
        b, a = b - self.shift_b, a - self.shift_a
        f64 = torch.float64
        if self.cross is None:
            zeros = lambda *shape: torch.zeros(*shape, dtype=f64, device=b.device)  # noqa: E731
            n_b, n_a = b.shape[1], a.shape[1]
            self.sum_b, self.sum_a, self.sq_b, self.sq_a = zeros(n_b), zeros(n_a), zeros(n_b), zeros(n_a)
            self.cross = zeros(n_b, n_a)
        # each batch's sums and products in product_dtype, added in place into the float64 buffers
        self.sum_b.add_(b.sum(0))
        self.sum_a.add_(a.sum(0))
        self.sq_b.add_(b.square().sum(0))
        self.sq_a.add_(a.square().sum(0))
        self.cross.add_(b.T @ a)
        self.count += b.shape[0]

    def moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Means ``(n_B,)``, ``(n_A,)``, population standard deviations ``(n_B,)``, ``(n_A,)`` and covariance
        ``(n_B, n_A)``, float64."""
        if self.cross is None:
            raise ValueError("No activations were accumulated.")
        n = self.count
        dev_b, dev_a = self.sum_b / n, self.sum_a / n  # mean minus shift: small, so no cancellation below
        var_b = (self.sq_b / n - dev_b.square()).clamp_min(0.0)
        var_a = (self.sq_a / n - dev_a.square()).clamp_min(0.0)
        cov = self.cross / n
        for rows in _row_blocks(cov):  # in place, a block of rows at a time: no (n_B, n_A) temporaries
            cov[rows] -= dev_b[rows, None] * dev_a[None, :]
        mean_b, mean_a = self.shift_b.double() + dev_b, self.shift_a.double() + dev_a
        return mean_b, mean_a, var_b.sqrt(), var_a.sqrt(), cov

    def distances(self) -> torch.Tensor:
        """``(n_B, n_A)`` RMS distances ``sqrt(||b_i - a_j||^2 / S)`` (the official normalised euclidean metric).

        Formed as ``(mu_i - mu_j)^2 + (sigma_i - sigma_j)^2 + 2 (sigma_i sigma_j - cov_ij)``, every term
        non-negative.
        """
        mean_b, mean_a, std_b, std_a, out = self.moments()
        for rows in _row_blocks(out):  # the covariance is overwritten block by block with the distances
            prod = std_b[rows, None] * std_a[None, :]
            sq = (mean_b[rows, None] - mean_a[None, :]).square() + (std_b[rows, None] - std_a[None, :]).square()
            out[rows] = (sq + 2.0 * (prod - out[rows]).clamp_min(0.0)).sqrt()
        return out

    def live(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean masks ``(n_B,)``, ``(n_A,)`` of the neurons that vary on the samples.

        A neuron is constant when its standard deviation is 0 or below the rounding of its mean in
        ``product_dtype`` (``8 eps |mean|``).
        """
        mean_b, mean_a, std_b, std_a, _ = self.moments()
        eps = 8.0 * torch.finfo(self.product_dtype).eps
        return (std_b > eps * mean_b.abs()) & (std_b > 0), (std_a > eps * mean_a.abs()) & (std_a > 0)

    def correlations(self) -> torch.Tensor:
        """``(n_B, n_A)`` Pearson correlations, in [-1, 1]; 0 where a neuron is constant (see :meth:`live`)."""
        _, _, std_b, std_a, cov = self.moments()
        live_b, live_a = self.live()
        both = live_b[:, None] & live_a[None, :]
        rho = cov / (std_b[:, None] * std_a[None, :]).clamp_min(1e-300)
        return torch.where(both, rho, torch.zeros_like(rho)).clamp(-1.0, 1.0)

    def correlation_distances(self) -> torch.Tensor:
        """``(n_B, n_A)`` RMS distances between z-scored activations, ``sqrt(2 (1 - rho))`` (``fusion_math.md`` §3).

        The cost of REPAIR and ZipIt!: invariant to a positive rescaling and a shift of any neuron. A constant
        neuron z-scores to 0 (distance 1 to every live neuron, 0 to another constant one).
        """
        live_b, live_a = (mask.double() for mask in self.live())
        sq = live_b[:, None] + live_a[None, :] - 2.0 * self.correlations()
        return sq.clamp_min(0.0).sqrt()


def _row_blocks(matrix: torch.Tensor, elements: int = 1 << 18) -> list[slice]:
    """Slices of rows of ``matrix`` holding about ``elements`` entries each (element-wise work done per block
    gives the same values as on the whole matrix, with temporaries of one block)."""
    step = max(1, elements // max(1, matrix.shape[1]))
    return [slice(start, start + step) for start in range(0, matrix.shape[0], step)]


def weight_distances(weight_b: torch.Tensor, weight_a: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between neuron weight rows: ``(n_B, ...)`` x ``(n_A, ...)`` -> ``(n_B, n_A)``.

    Trailing axes (inputs, kernel taps) are flattened; both tensors must already share their input basis.
    """
    b = weight_b.reshape(weight_b.shape[0], -1).double()
    a = weight_a.reshape(weight_a.shape[0], -1).double()
    return torch.cdist(b, a)


SOLVERS = ("auto", "emd", "sinkhorn", "permutation")


@dataclass(frozen=True)
class TransportSolution:
    """A transport plan and the solver that computed it.

    Attributes:
        plan (`Tensor` or `np.ndarray` of shape `(n_B, n_A)`): the plan, as :func:`transport_plan` returns it.
        solver (`str`): the solver that ran: ``"emd"``, ``"permutation"`` (a linear assignment) or
            ``"sinkhorn"``; with ``solver="auto"`` this says which exact solver was chosen.
    """

    plan: torch.Tensor | np.ndarray
    solver: str


#: ``solver="auto"`` runs the linear assignment only when at least this share of the rows' cheapest columns are
#: distinct (the costs nearly pick a permutation by themselves).
ASSIGNMENT_DISTINCT_MINIMA = 0.9


def auto_solver(n_b: int, n_a: int, cost: torch.Tensor | np.ndarray | None = None) -> str:
    """The exact solver ``solver="auto"`` runs for uniform marginals on ``n_B`` and ``n_A`` neurons.

    Both are exact: with uniform marginals of equal size every vertex of the transport polytope is a permutation
    divided by ``n`` (Birkhoff), so a linear assignment is an optimal plan of the problem EMD solves. Which one is
    faster depends on the costs, not only on the size. Measured (``benchmarks/bench_scale.py``, 2 cores):

    - costs with a clear correspondence (each neuron's cheapest partner mostly distinct, as between a model and
      a permuted copy, or well-aligned trained layers): the assignment (``scipy.optimize.linear_sum_assignment``)
      is 2-5x faster than EMD at 256-8192 neurons;
    - unstructured costs (random weights: 2816 neurons, 5.5 s against 1.7 s) and costs with many exact ties
      (dead neurons: 4096 neurons, 46 s against 3.1 s) send the assignment into its cubic worst case, where
      EMD's network simplex stays fast.

    So equal widths run ``"permutation"`` when at least :data:`ASSIGNMENT_DISTINCT_MINIMA` of the rows' argmin
    columns are distinct (an O(n^2) check; without ``cost``, always), and ``"emd"`` otherwise; different widths
    run ``"emd"`` (an assignment on replicated costs is exact too, but measured 4-6x slower). POT 0.9.7 ignores
    ``ot.emd``'s ``numThreads`` (its network simplex is single-threaded), so no thread count is passed; the
    fusion pipeline solves independent groups' plans on several threads instead (both solvers release the GIL).
    """
    if n_b != n_a:
        return "emd"
    if cost is None or n_b < 2:
        return "permutation"
    argmins = torch.as_tensor(cost).argmin(dim=1)
    distinct = torch.unique(argmins).numel() / n_b
    return "permutation" if distinct >= ASSIGNMENT_DISTINCT_MINIMA else "emd"


def solve_transport(cost, *, solver: str = "emd", reg: float = 0.05, max_iter: int = 10_000) -> TransportSolution:
    """Like :func:`transport_plan`, and says which solver ran (the choice of ``solver="auto"``).

    Returns:
        `TransportSolution`: the plan and the name of the solver that computed it.
    """
    n_b, n_a = cost.shape if hasattr(cost, "shape") else np.shape(cost)
    ran = auto_solver(n_b, n_a, cost) if solver == "auto" else solver
    return TransportSolution(transport_plan(cost, solver=ran, reg=reg, max_iter=max_iter), ran)


def transport_plan(
    cost, *, solver: str = "emd", reg: float = 0.05, max_iter: int = 10_000
) -> torch.Tensor | np.ndarray:
    """Optimal transport plan between uniform measures on B's neurons (rows) and A's neurons (columns).

    Args:
        cost (`np.ndarray` or `torch.Tensor` of shape `(n_B, n_A)`): ground cost, non-negative.
        solver (`str`): ``"auto"`` (an exact solver chosen by :func:`auto_solver`: a linear assignment for equal
            widths whose costs nearly pick a permutation, EMD otherwise), ``"emd"`` (exact network simplex, ``ot.emd``), ``"sinkhorn"`` (entropic,
            ``ot.sinkhorn`` on the cost divided by its maximum; runs on the tensor's device through POT's torch
            backend), or ``"permutation"`` (a hard assignment by ``scipy.optimize.linear_sum_assignment``; needs
            ``n_A == n_B``). :func:`solve_transport` also returns which one ran.
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
    if solver == "auto":
        solver = auto_solver(n_b, n_a, cost_t)
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
            f"Unknown solver {solver!r}. Choose one of: {', '.join(map(repr, SOLVERS))}.", field="solver"
        )
    return plan if is_torch else plan.cpu().numpy()


def partial_assignment(cost: torch.Tensor) -> torch.Tensor:
    """A plan that matches each of B's ``n_B`` neurons with one of A's ``n_A >= n_B`` neurons, each A neuron at
    most once, at the least total cost (a rectangular linear assignment, ``scipy.optimize.linear_sum_assignment``).

    The ``n_A - n_B`` neurons of A left without a partner get no mass: their columns are zero, so
    :func:`plan_maps` gives ``R = S`` = the 0/1 matching (each of B's neurons moved to its partner, nothing
    spread over several columns), and the fusion keeps A's own weights there (``FusionConfig.width_matching``).

    Args:
        cost (`Tensor` of shape `(n_B, n_A)`): ground cost, ``n_B <= n_A``.

    Returns:
        `Tensor` of shape `(n_B, n_A)`: float64 on ``cost``'s device, ``1 / n_B`` at each matched pair, so that
            ``T.sum() == 1`` and each row sums to ``1 / n_B`` (B's uniform marginal).
    """
    n_b, n_a = cost.shape
    if n_b > n_a:
        raise ValueError(f"A partial assignment needs n_B <= n_A, got {n_b} and {n_a} neurons.")
    rows, cols = linear_sum_assignment(cost.detach().double().cpu().numpy())
    plan = torch.zeros(n_b, n_a, dtype=torch.float64, device=cost.device)
    plan[torch.as_tensor(rows, device=cost.device), torch.as_tensor(cols, device=cost.device)] = 1.0 / n_b
    return plan


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
    "SOLVERS",
    "ActivationStats",
    "TransportSolution",
    "auto_solver",
    "expand_head_plan",
    "head_plan",
    "partial_assignment",
    "plan_maps",
    "solve_transport",
    "transport_plan",
    "weight_distances",
]
