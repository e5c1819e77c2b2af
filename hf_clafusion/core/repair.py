"""Statistics repair (REPAIR) on tensors: per-channel statistics, their targets, and exact weight folding.

Averaging aligned neurons shrinks their variance (two neurons with correlation rho average to a variance of
``(1 + rho) / 2`` of theirs), and the collapse compounds with depth. REPAIR (Jordan et al., ICLR 2023) corrects
each channel of the fused network so its mean and std match ``mu* = sum_k w_k mu_k`` and
``sigma* = sum_k w_k sigma_k`` of the parents' aligned channels, and folds the correction into the layer that
produced the channel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ChannelStats:
    """Streaming per-channel mean and (population) standard deviation, accumulated in float64.

    Example:
        ```py
        >>> stats = ChannelStats()
        >>> stats.update(torch.tensor([[0.0, 1.0], [2.0, 1.0]]))
        >>> stats.mean.tolist(), stats.std.tolist()
        ([1.0, 1.0], [1.0, 0.0])
        ```
    """

    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None

    def update(self, features: torch.Tensor) -> None:
        """Add samples ``(samples, channels)``."""
        x = features.detach().to(torch.float64)
        total, squares = x.sum(0), (x * x).sum(0)
        if self.total is None:
            self.total, self.squares = total, squares
        else:
            self.total, self.squares = self.total + total, self.squares + squares
        self.count += x.shape[0]

    def _check(self) -> None:
        if self.total is None or self.count == 0:
            raise ValueError("ChannelStats has no samples; call update() first.")

    @property
    def mean(self) -> torch.Tensor:
        """``(channels,)`` float64."""
        self._check()
        return self.total / self.count

    @property
    def std(self) -> torch.Tensor:
        """``(channels,)`` float64, population standard deviation."""
        self._check()
        return (self.squares / self.count - self.mean**2).clamp_min(0).sqrt()


def carry_statistics(values: torch.Tensor, r_map: torch.Tensor) -> torch.Tensor:
    """Per-channel statistics of a parent carried to the anchor's channels: ``R^T v``.

    Args:
        values: ``(n_B,)`` per-channel statistics (means or stds) in the parent's basis.
        r_map: ``(n_B, n_A)`` output-side plan map (columns sum to 1; a permutation for equal widths).

    Returns:
        ``(n_A,)``: for each anchor channel, the plan-weighted average of the parent channels matched to it.
    """
    return r_map.to(values.dtype).T @ values


def repair_targets(
    means: Sequence[torch.Tensor], stds: Sequence[torch.Tensor], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mu* = sum_k w_k mu_k`` and ``sigma* = sum_k w_k sigma_k`` (weights renormalised to sum to 1).

    Args:
        means: one ``(n,)`` channel-mean tensor per contributing parent, already in the anchor's channel basis.
        stds: one ``(n,)`` channel-std tensor per contributing parent, in the same basis.
        weights: the parents' averaging weights (those of non-contributing parents left out).

    Returns:
        ``(mu*, sigma*)``, each ``(n,)`` float64.
    """
    if not means or len(means) != len(stds) or len(means) != len(weights):
        raise ValueError(f"Need one mean, std and weight per parent; got {len(means)}, {len(stds)}, {len(weights)}.")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"The contributing weights sum to {total}; at least one must be positive.")
    w = [float(x) / total for x in weights]
    mean = sum(wk * m.to(torch.float64) for wk, m in zip(w, means))
    std = sum(wk * s.to(torch.float64) for wk, s in zip(w, stds))
    return mean, std


def affine_correction(
    mean: torch.Tensor,
    std: torch.Tensor,
    target_mean: torch.Tensor,
    target_std: torch.Tensor,
    *,
    shift: bool = True,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The per-channel ``y -> scale * y + shift`` that gives channels of statistics ``(mean, std)`` the targets.

    ``scale = target_std / std`` and ``shift = target_mean - scale * mean``. Channels whose std is below ``eps``
    (constant, e.g. dead ReLU inputs) keep ``scale = 1``. With ``shift=False`` (a layer without a bias) the
    correction is scale-only and the second value is None.

    Args:
        mean: ``(n,)`` measured channel means of the fused model.
        std: ``(n,)`` measured channel standard deviations of the fused model.
        target_mean: ``(n,)`` target means (:func:`repair_targets`).
        target_std: ``(n,)`` target standard deviations.

    Returns:
        ``(scale, shift)``, each ``(n,)`` float64 (``shift`` None when ``shift=False``).
    """
    mean, std = mean.to(torch.float64), std.to(torch.float64)
    target_mean, target_std = target_mean.to(torch.float64), target_std.to(torch.float64)
    live = std > eps
    scale = torch.where(live, target_std / std.clamp_min(eps), torch.ones_like(std))
    if not shift:
        return scale, None
    return scale, target_mean - scale * mean


def fold_affine(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor | None,
    axis: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold ``y -> scale * y + shift`` into the layer ``y = W x + b`` that writes the channels on ``axis`` of ``W``.

    ``W' = scale * W`` along ``axis`` (broadcast over the other axes: Linear ``(out, in)``, Conv
    ``(out, in, kh, kw)``, norm ``(out,)``, a transposed ``Conv1D`` ``(in, out)`` with ``axis=1``) and
    ``b' = scale * b + shift``. Exact: the new layer's output equals the corrected old one.

    Args:
        weight: the layer's weight, output channels on ``axis``.
        bias: ``(out,)`` or None.
        scale: ``(out,)``.
        shift: ``(out,)`` or None (scale-only).
        axis: the output-channel axis of ``weight``.

    Returns:
        ``(W', b')`` in the dtype of the inputs.

    Raises:
        ValueError: a shift for a layer without a bias (a bias is never added silently).
    """
    if bias is None and shift is not None:
        raise ValueError("Cannot fold a shift into a layer without a bias; use a scale-only correction (shift=None).")
    view = [1] * weight.ndim
    view[axis] = -1
    new_weight = (weight.to(torch.float64) * scale.view(view)).to(weight.dtype)
    if bias is None:
        return new_weight, None
    new_bias = bias.to(torch.float64) * scale
    if shift is not None:
        new_bias = new_bias + shift
    return new_weight, new_bias.to(bias.dtype)


def is_identity_batchnorm(
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    eps: float,
    tol: float = 1e-4,
) -> bool:
    """Whether an eval-mode BatchNorm computes the identity: ``|g / sqrt(v + eps) - 1|`` and
    ``|b - g * m / sqrt(v + eps)|`` below ``tol`` on every channel (missing tensors: ``g = 1, b = 0, m = 0, v = 1``).
    """
    present = [t for t in (weight, bias, running_mean, running_var) if t is not None]
    n = present[0].shape[0] if present else 1
    one, zero = torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    g = one if weight is None else weight.detach().double().cpu()
    b = zero if bias is None else bias.detach().double().cpu()
    m = zero if running_mean is None else running_mean.detach().double().cpu()
    v = one if running_var is None else running_var.detach().double().cpu()
    factor = g / (v + eps).sqrt()
    return bool(((factor - 1).abs() < tol).all() and ((b - factor * m).abs() < tol).all())


__all__ = [
    "ChannelStats",
    "affine_correction",
    "carry_statistics",
    "fold_affine",
    "is_identity_batchnorm",
    "repair_targets",
]
