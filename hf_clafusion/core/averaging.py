"""Applying transport maps to parameter tensors, and averaging aligned parameters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def apply_plan(
    tensor: torch.Tensor,
    axis: int,
    matrix: torch.Tensor,
    *,
    inner: int = 1,
    outer: int = 1,
    permutation: torch.Tensor | None = None,
) -> torch.Tensor:
    """Re-express one axis of ``tensor`` in another neuron basis: ``out[.., j, ..] = sum_i matrix[i, j] t[.., i, ..]``.

    Use ``R`` for an axis that *writes* the neurons (rows of a weight, biases, norm parameters, conv output
    channels) and ``S`` for an axis that *reads* them (columns of the next weight, conv input channels, the
    same map at every kernel tap).

    Args:
        tensor (`Tensor`): any shape; ``tensor.shape[axis] == n_B * inner``.
        axis (`int`): the axis to transform.
        matrix (`Tensor` of shape `(n_B, n_A)`): ``R`` or ``S``.
        inner (`int`, defaults to 1): when the axis is a flattened ``(channels, positions)`` pair in
            channel-major order (a Linear reading a flattened conv map), the number of positions per channel;
            the map acts on channels, identically at every position.
        outer (`int`, defaults to 1): when the axis holds ``outer`` blocks of ``n_B * inner`` entries one after
            the other (a fused ``[q|k|v]`` projection), the map acts identically on each block.
        permutation (`Tensor`, *optional*): ``permutation_of(matrix)`` when the caller already has it (a plan
            applied to many tensors); found here otherwise.

    Returns:
        `Tensor` with ``shape[axis] == n_A * inner``, in ``tensor``'s dtype.
    """
    axis = axis % tensor.ndim
    n_b, n_a = matrix.shape
    if outer > 1:
        if tensor.shape[axis] % outer:
            raise ValueError(f"Axis {axis} of a tensor of shape {tuple(tensor.shape)} is not {outer} blocks.")
        moved = tensor.movedim(axis, 0)
        blocks = moved.reshape(outer, moved.shape[0] // outer, *moved.shape[1:])
        out = apply_plan(blocks, 1, matrix, inner=inner, permutation=permutation)
        return out.reshape(-1, *moved.shape[1:]).movedim(0, axis)
    if tensor.shape[axis] != n_b * inner:
        raise ValueError(
            f"Axis {axis} of a tensor of shape {tuple(tensor.shape)} does not have {n_b} x {inner} entries."
        )
    source = permutation if permutation is not None else permutation_of(matrix)
    if source is not None:  # a hard plan between equal widths: a gather, bit-identical to the product
        index = (source[:, None] * inner + torch.arange(inner, device=source.device)).reshape(-1)
        return tensor.index_select(axis, index.to(tensor.device))
    moved = tensor.movedim(axis, -1)
    lead = moved.shape[:-1]
    # (n_B, rest) layout so that the map is one matrix product; exact plans are sparse (at most n_A + n_B - 1
    # non-zeros, a permutation for equal widths), so a sparse product avoids the dense O(n_A n_B rest) cost.
    work = moved.reshape(-1, n_b, inner).permute(1, 0, 2).reshape(n_b, -1).to(matrix.dtype)
    nonzero = int(torch.count_nonzero(matrix))
    if nonzero <= 4 * (n_a + n_b) and n_a * n_b > 4096:
        out = torch.sparse.mm(matrix.T.to_sparse(), work)
    else:
        out = matrix.T @ work
    out = out.reshape(n_a, -1, inner).permute(1, 0, 2).reshape(*lead, n_a * inner)
    return out.movedim(-1, axis).to(tensor.dtype)


def neuron_rows(tensor: torch.Tensor, axis: Any) -> torch.Tensor:
    """``tensor`` as ``(neurons, features)`` along ``axis`` (an object with ``axis``, ``inner`` and ``outer``, as
    :class:`hf_clafusion.spec.AxisRef`): blocks of ``outer`` and ``inner`` positions are folded into the features,
    the convention of :func:`apply_plan`; e.g. a ``(vocab, hidden)`` embedding read along axis 1 gives one row per
    hidden unit."""
    moved = tensor.movedim(axis.axis, 0)
    rows = moved.reshape(axis.outer, -1, axis.inner, *moved.shape[1:]).movedim(1, 0)
    return rows.reshape(rows.shape[0], -1)


def permutation_of(matrix: torch.Tensor) -> torch.Tensor | None:
    """For a square 0/1 matrix with one 1 per row and column (a hard plan between equal widths), the row of the
    1 in each column, ``(n,)`` long; ``None`` for any other matrix."""
    n_b, n_a = matrix.shape
    if n_b != n_a or matrix.is_sparse:
        return None
    nonzero = matrix.nonzero()  # one pass over the matrix; (number of non-zeros, 2), row-major order
    if nonzero.shape[0] != n_a:
        return None
    rows, cols = nonzero[:, 0], nonzero[:, 1]
    if not bool((matrix[rows, cols] == 1).all()):
        return None
    if not (
        bool((torch.bincount(rows, minlength=n_b) == 1).all())
        and bool((torch.bincount(cols, minlength=n_a) == 1).all())
    ):
        return None
    permutation = torch.empty(n_a, dtype=torch.long, device=matrix.device)
    permutation[cols] = rows
    return permutation


#: Elements averaged at a time by :func:`weighted_average`: its float64 temporaries stay at a few MiB, whatever
#: the size of the tensor (a vocabulary embedding would otherwise need three float64 copies of itself).
AVERAGE_CHUNK = 1 << 20


def weighted_average(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_k weights[k] * tensors[k]`` (same shapes), accumulated in float64, returned in the first dtype.

    Element-wise, so the tensors are averaged :data:`AVERAGE_CHUNK` elements at a time through two reused float64
    buffers, with the same result as the whole tensor at once (each product, then each sum, rounded in float64).
    """
    if len(tensors) != len(weights):
        raise ValueError(f"{len(tensors)} tensors but {len(weights)} weights.")
    if not tensors[0].is_floating_point():
        return tensors[0].clone()
    out = torch.empty_like(tensors[0], memory_format=torch.contiguous_format)
    flat_out, flat = out.view(-1), [t.reshape(-1) for t in tensors]  # a copy only for non-contiguous tensors
    size = flat_out.numel()
    acc = torch.empty(min(size, AVERAGE_CHUNK), dtype=torch.float64, device=out.device)
    term = torch.empty_like(acc)
    for start in range(0, size, AVERAGE_CHUNK):
        end = min(start + AVERAGE_CHUNK, size)
        a, b = acc[: end - start].zero_(), term[: end - start]
        for t, w in zip(flat, weights):
            a.add_(b.copy_(t[start:end]).mul_(float(w)))
        flat_out[start:end].copy_(a)
    return out


__all__ = ["apply_plan", "neuron_rows", "permutation_of", "weighted_average"]
