"""Layer dissimilarities between two sets of activations, computed for all layer pairs at once.

Shapes: an activation set is a list of tensors ``(N, D_i)`` (N samples, features flattened per sample:
``D = C*H*W`` for a conv layer). Cost matrices are ``(m, n)`` for ``m`` layers of one model (rows) and ``n``
of the other (columns). Everything runs in float64 on the tensors' device.

References:
    Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML 2019 (linear CKA).
    Nguyen et al., "Do Wide and Deep Networks Learn the Same Things?", ICLR 2021 (minibatch CKA with
    unbiased HSIC).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import ot
import torch

from ..errors import CalibrationDataError, ClaFusionWarning


def _flat(acts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for a in acts:
        if a.ndim < 2:
            raise CalibrationDataError(f"Activations must be (N, ...) with N samples, got shape {tuple(a.shape)}.")
        out.append(a.reshape(a.shape[0], -1).double())
    num = {a.shape[0] for a in out}
    if len(num) > 1:
        raise CalibrationDataError(f"All activation sets must have the same number of samples, got {sorted(num)}.")
    return out


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA (biased HSIC, Gram form) between ``x`` ``(N, p)`` and ``y`` ``(N, q)``; a 0-d tensor in [0, 1]."""
    return 1.0 - cka_cost_matrix([x], [y])[0, 0]


def cka_cost_matrix(acts_a: Sequence[torch.Tensor], acts_b: Sequence[torch.Tensor]) -> torch.Tensor:
    """``1 - linear CKA`` (biased HSIC) for every layer pair, the official code's estimator.

    ``CKA = <HKH, HLH> / (||HKH|| ||HLH||)`` with ``K = X X^T``, ``L = Y Y^T``. Computed in whichever of the two
    equal forms is cheaper per layer: the Gram form (``N x N`` matrices) for layers wider than the number of
    samples, the feature form ``||Y_c^T X_c||^2 / (||X_c^T X_c|| ||Y_c^T Y_c||)`` otherwise, so that memory does
    not grow as ``N^2`` for narrow layers.

    Args:
        acts_a (`list[Tensor]`): ``m`` tensors ``(N, ...)``.
        acts_b (`list[Tensor]`): ``n`` tensors ``(N, ...)``, same samples.

    Returns:
        `Tensor` of shape `(m, n)`, float64, values in [0, 1].
    """
    a, b = _flat(acts_a), _flat(acts_b)
    _check_same_n(a, b)
    num = a[0].shape[0]
    a = [t - t.mean(0, keepdim=True) for t in a]
    b = [t - t.mean(0, keepdim=True) for t in b]
    grams: dict[tuple[str, int], torch.Tensor] = {}

    def gram(side: str, i: int, t: torch.Tensor) -> torch.Tensor:  # centred Gram matrix H K H
        if (side, i) not in grams:
            grams[(side, i)] = t @ t.T
        return grams[(side, i)]

    def self_norm(side: str, i: int, t: torch.Tensor) -> torch.Tensor:
        return gram(side, i, t).norm() if t.shape[1] > num else (t.T @ t).norm()

    norms_a = [self_norm("a", i, t) for i, t in enumerate(a)]
    norms_b = [self_norm("b", j, t) for j, t in enumerate(b)]
    cost = torch.empty(len(a), len(b), dtype=torch.float64, device=a[0].device)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            if x.shape[1] > num and y.shape[1] > num:
                hsic = (gram("a", i, x) * gram("b", j, y)).sum()
            else:
                hsic = (y.T @ x).square().sum()
            cost[i, j] = 1.0 - hsic / (norms_a[i] * norms_b[j]).clamp_min(1e-300)
    return cost.clamp(0.0, 1.0)


def _check_same_n(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    if a and b and a[0].shape[0] != b[0].shape[0]:
        raise CalibrationDataError(
            f"Both activation sets must come from the same samples, got {a[0].shape[0]} and {b[0].shape[0]}."
        )


class MinibatchCKA:
    """Streaming ``1 - CKA`` for all layer pairs from unbiased HSIC accumulated over minibatches.

    Memory is ``O((m + n) B^2 + m n)`` for batch size ``B``, independent of the number of samples.
    Each batch must have at least 4 samples (the unbiased estimator divides by ``B - 3``).

    Example:
        ```py
        >>> import torch
        >>> from hf_clafusion.core import MinibatchCKA
        >>> acc = MinibatchCKA()
        >>> for _ in range(5):
        ...     x = torch.randn(32, 10)
        ...     acc.update([x], [x @ torch.randn(10, 6)])
        >>> acc.compute().shape
        torch.Size([1, 1])
        ```
    """

    def __init__(self) -> None:
        self._xy: torch.Tensor | None = None
        self._xx: torch.Tensor | None = None
        self._yy: torch.Tensor | None = None
        self.num_batches = 0

    @staticmethod
    def _grams(acts: list[torch.Tensor]) -> torch.Tensor:
        grams = torch.stack([a @ a.T for a in acts])
        grams.diagonal(dim1=1, dim2=2).zero_()
        return grams

    @staticmethod
    def _hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741
        b = k.shape[-1]
        trace = torch.einsum("aij,bij->ab", k, l)
        sum_k, sum_l = k.sum(dim=(1, 2)), l.sum(dim=(1, 2))
        rows_k, rows_l = k.sum(dim=2), l.sum(dim=2)
        return (trace + sum_k[:, None] * sum_l[None, :] / ((b - 1) * (b - 2)) - 2.0 / (b - 2) * rows_k @ rows_l.T) / (
            b * (b - 3)
        )

    def update(self, acts_a: Sequence[torch.Tensor], acts_b: Sequence[torch.Tensor]) -> None:
        """Add one minibatch: ``m`` tensors ``(B, ...)`` and ``n`` tensors ``(B, ...)`` on the same samples."""
        a, b = _flat(acts_a), _flat(acts_b)
        _check_same_n(a, b)
        if a[0].shape[0] < 4:
            raise CalibrationDataError(
                f"Minibatch CKA needs at least 4 samples per batch, got {a[0].shape[0]}. Increase `batch_size`."
            )
        ka, kb = self._grams(a), self._grams(b)
        xy = self._hsic(ka, kb)
        xx = torch.diagonal(self._hsic(ka, ka))
        yy = torch.diagonal(self._hsic(kb, kb))
        if self._xy is None:
            self._xy, self._xx, self._yy = xy, xx, yy
        else:
            self._xy += xy
            self._xx += xx
            self._yy += yy
        self.num_batches += 1

    def compute(self) -> torch.Tensor:
        """The ``(m, n)`` cost matrix ``1 - CKA`` over all batches seen so far."""
        if self._xy is None:
            raise CalibrationDataError("MinibatchCKA.compute() called before any update(); pass calibration data.")
        denom = (self._xx.clamp_min(0)[:, None] * self._yy.clamp_min(0)[None, :]).sqrt().clamp_min(1e-300)
        return (1.0 - self._xy / denom).clamp(0.0, 1.0)


def cca_cost_matrix(acts_a: Sequence[torch.Tensor], acts_b: Sequence[torch.Tensor]) -> torch.Tensor:
    """``1 - mean squared canonical correlation`` for every layer pair, ``(m, n)``.

    With ``Q_X, Q_Y`` orthonormal bases of the centred activations, the similarity is
    ``||Q_X^T Q_Y||_F^2 / min(rank_X, rank_Y)``. CCA degenerates when a layer is at least as wide as the
    number of samples (every such pair looks perfectly correlated): a :class:`ClaFusionWarning` says so.
    """
    a, b = _flat(acts_a), _flat(acts_b)
    _check_same_n(a, b)
    num = a[0].shape[0]
    widest = max(t.shape[1] for t in a + b)
    if widest >= num:
        warnings.warn(
            f"CCA is degenerate when a layer has at least as many features as samples: widest layer {widest} "
            f">= {num} samples, so those costs are ~0 and the alignment is left to tie-breaking. Increase "
            "`num_samples` or use layer_cost='cka'.",
            ClaFusionWarning,
            stacklevel=2,
        )

    def basis(t: torch.Tensor) -> torch.Tensor:
        t = t - t.mean(dim=0, keepdim=True)
        u, s, _ = torch.linalg.svd(t, full_matrices=False)
        tol = s.max().clamp_min(1e-300) * max(t.shape) * torch.finfo(t.dtype).eps
        return u[:, s > tol]

    qa, qb = [basis(t) for t in a], [basis(t) for t in b]
    cost = torch.empty(len(a), len(b), dtype=torch.float64, device=a[0].device)
    for i, x in enumerate(qa):
        for j, y in enumerate(qb):
            rank = min(x.shape[1], y.shape[1])
            cost[i, j] = 1.0 - (x.T @ y).square().sum() / max(rank, 1)
    return cost.clamp(0.0, 1.0)


def neuron_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """RMS distance between the neurons (columns) of ``x`` ``(N, p)`` and ``y`` ``(N, q)``: ``(p, q)``.

    ``M_ab = sqrt(||x_a - y_b||^2 / N)``, the official ground metric with ``--dist-normalize``.
    """
    x, y = x.double(), y.double()
    sq = x.square().sum(0)[:, None] + y.square().sum(0)[None, :] - 2.0 * x.T @ y
    return (sq.clamp_min(0.0) / x.shape[0]).sqrt()


def wasserstein_cost_matrix(acts_a: Sequence[torch.Tensor], acts_b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Exact optimal-transport cost between the neuron clouds of every layer pair, ``(m, n)``.

    A layer with ``C`` channels is a uniform measure over ``C`` points (each neuron's activations over all
    samples and positions); the ground metric is :func:`neuron_distances`; the cost is ``ot.emd2``.
    """
    a = [_neuron_matrix(t) for t in acts_a]
    b = [_neuron_matrix(t) for t in acts_b]
    cost = torch.empty(len(a), len(b), dtype=torch.float64)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            if x.shape[0] != y.shape[0]:
                raise CalibrationDataError("Both activation sets must come from the same samples and resolution.")
            m = neuron_distances(x, y).cpu().numpy()
            cost[i, j] = float(
                ot.emd2(np.full(m.shape[0], 1.0 / m.shape[0]), np.full(m.shape[1], 1.0 / m.shape[1]), m)
            )
    return cost


def channels_as_features(t: torch.Tensor) -> torch.Tensor:
    """``(N, C, *spatial)`` -> ``(N * positions, C)``: positions are extra samples of each channel; ``(N, C)`` as is."""
    if t.ndim > 2:
        return t.movedim(1, -1).reshape(-1, t.shape[1])
    return t


def evenly_spaced_rows(features: torch.Tensor, rows: int | None) -> torch.Tensor:
    """At most ``rows`` rows of ``features`` ``(samples, channels)``, evenly spaced; all of them for None.

    The rows kept depend only on the number of rows, so features of several layers or models computed on one batch
    keep the same samples (tokens, positions).
    """
    if rows is None or features.shape[0] <= rows:
        return features
    keep = torch.linspace(0, features.shape[0] - 1, rows, device=features.device).round().long()
    return features.index_select(0, keep)


def _neuron_matrix(t: torch.Tensor) -> torch.Tensor:
    return channels_as_features(t).double()


def neuron_count_cost_matrix(widths_a: Sequence[int], widths_b: Sequence[int]) -> torch.Tensor:
    """The official 'neuron' measure: ``(width_a - width_b)^2``, ``(m, n)``."""
    a = torch.tensor(widths_a, dtype=torch.float64)
    b = torch.tensor(widths_b, dtype=torch.float64)
    return (a[:, None] - b[None, :]).square()


def index_cost_matrix(num_a: int, num_b: int) -> torch.Tensor:
    """The official 'index' measure: ``(i - j)^2`` on 1-indexed layer numbers, ``(m, n)``."""
    return neuron_count_cost_matrix(range(1, num_a + 1), range(1, num_b + 1))


__all__ = [
    "MinibatchCKA",
    "cca_cost_matrix",
    "channels_as_features",
    "cka_cost_matrix",
    "evenly_spaced_rows",
    "index_cost_matrix",
    "linear_cka",
    "neuron_count_cost_matrix",
    "neuron_distances",
    "wasserstein_cost_matrix",
]
