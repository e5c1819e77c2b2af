"""Depth balancing on tensors: identity layers to insert, and merging consecutive layers.

Identity layers are exact when their input is non-negative (it follows a ReLU): ``ReLU(I x) = x``. Where
the input may be negative (in front of a network's first layer) the official code inserts a plain identity
anyway and changes the function; :func:`signed_identity_weight` gives an exact construction instead, of twice
the width: ``ReLU([x; -x])`` carries ``x`` as ``ReLU(x) - ReLU(-x)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError


def _center_taps(channels_out: int, channels_in: int, kernel_size: Sequence[int] | None) -> torch.Tensor:
    if kernel_size is None:
        return torch.zeros(channels_out, channels_in)
    if any(k % 2 == 0 for k in kernel_size):
        raise ConfigError(f"An identity convolution needs odd kernel sizes (a centre tap), got {tuple(kernel_size)}.")
    return torch.zeros(channels_out, channels_in, *kernel_size)


def _set(weight: torch.Tensor, row: int, col: int, value: float) -> None:
    if weight.ndim == 2:
        weight[row, col] = value
    else:
        center = tuple(k // 2 for k in weight.shape[2:])
        weight[(row, col, *center)] = value


def identity_weight(channels: int, kernel_size: Sequence[int] | None = None) -> torch.Tensor:
    """Identity Linear ``(d, d)`` or convolution ``(d, d, kh, kw)`` weight (centre tap 1; stride 1, 'same' padding).

    Example:
        ```py
        >>> from hf_clafusion.core import identity_weight
        >>> identity_weight(2).tolist()
        [[1.0, 0.0], [0.0, 1.0]]
        ```
    """
    weight = _center_taps(channels, channels, kernel_size)
    for c in range(channels):
        _set(weight, c, c, 1.0)
    return weight


def signed_identity_weight(channels: int, kernel_size: Sequence[int] | None = None, *, first: bool) -> torch.Tensor:
    """Exact identity for possibly negative inputs, carried as ``[ReLU(x); ReLU(-x)]`` (width ``2 d``).

    ``first=True``: the layer that splits ``x`` (``d`` inputs -> ``2d`` outputs, ``[I; -I]``). ``first=False``: a
    further layer on the split representation (``2d -> 2d``, ``[[I, -I], [-I, I]]``). The next real layer reads
    the split form through :func:`absorb_signed_input`.
    """
    d = channels
    weight = _center_taps(2 * d, d if first else 2 * d, kernel_size)
    for c in range(d):
        _set(weight, c, c, 1.0)
        _set(weight, d + c, c, -1.0)
        if not first:
            _set(weight, c, d + c, -1.0)
            _set(weight, d + c, d + c, 1.0)
    return weight


def absorb_signed_input(weight: torch.Tensor, *, inner: int = 1) -> torch.Tensor:
    """A layer reading ``[ReLU(x); ReLU(-x)]`` instead of ``x``: ``W -> [W, -W]`` on the input axis (axis 1).

    ``inner`` handles a Linear that reads a flattened ``(channels, positions)`` map, channel-major.
    """
    out, cols = weight.shape[:2]
    view = weight.reshape(out, cols // inner, inner, *weight.shape[2:])
    return torch.cat([view, -view], dim=1).reshape(out, 2 * cols, *weight.shape[2:])


def identity_batchnorm(num_features: int, eps: float) -> dict[str, torch.Tensor]:
    """BatchNorm parameters and buffers that make it the identity in eval mode.

    ``running_mean = 0``, ``running_var = 1``, ``weight = sqrt(1 + eps)``, ``bias = 0``.
    """
    return {
        "weight": torch.full((num_features,), (1.0 + eps) ** 0.5),
        "bias": torch.zeros(num_features),
        "running_mean": torch.zeros(num_features),
        "running_var": torch.ones(num_features),
        "num_batches_tracked": torch.tensor(0, dtype=torch.long),
    }


def relu_diagonal(preactivations: torch.Tensor, method: str = "avg") -> torch.Tensor:
    """The diagonal that replaces a ReLU when its layer is merged away (official ``--relu-approx-method``).

    Args:
        preactivations (`Tensor` of shape `(N, d)`): the layer's inputs to the ReLU on calibration samples.
        method (`str`): ``"sum"``: ``1[sum_n z >= 0]``; ``"majority"``: ``1[P(z > 0) >= 0.5]``;
            ``"avg"``: ``P(z > 0)`` (soft).

    Returns:
        `Tensor` of shape `(d,)`.
    """
    z = preactivations.reshape(preactivations.shape[0], -1).double()
    if method == "sum":
        return (z.sum(0) >= 0).double()
    positive = (z > 0).double().mean(0)
    if method == "majority":
        return (positive >= 0.5).double()
    if method == "avg":
        return positive
    raise ConfigError(f"Unknown relu_approx {method!r}. Choose one of: 'sum', 'majority', 'avg'.", field="relu_approx")


def merge_linear(
    first_weight: torch.Tensor,
    first_bias: torch.Tensor | None,
    diagonal: torch.Tensor,
    second_weight: torch.Tensor,
    second_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Compose ``x -> W2 diag(d) (W1 x + b1) + b2`` into one Linear layer ``(W2 diag(d) W1, W2 diag(d) b1 + b2)``.

    Shapes: ``W1`` ``(h, i)``, ``b1`` ``(h,)``, ``d`` ``(h,)``, ``W2`` ``(o, h)``, ``b2`` ``(o,)``; returns ``(o, i)`` and ``(o,)``
    (``None`` when neither layer has a bias).
    """
    scaled = second_weight.double() * diagonal.double()[None, :]
    weight = (scaled @ first_weight.double()).to(first_weight.dtype)
    if first_bias is None and second_bias is None:
        return weight, None
    bias = torch.zeros(second_weight.shape[0], dtype=torch.float64)
    if first_bias is not None:
        bias += scaled @ first_bias.double()
    if second_bias is not None:
        bias += second_bias.double()
    return weight, bias.to(first_weight.dtype)


__all__ = [
    "absorb_signed_input",
    "identity_batchnorm",
    "identity_weight",
    "merge_linear",
    "relu_diagonal",
    "signed_identity_weight",
]
