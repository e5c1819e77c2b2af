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


def fit_layernorm_identity(
    inputs: torch.Tensor, target: torch.Tensor | None = None, *, eps: float = 1e-12
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LayerNorm parameters that make ``LayerNorm(inputs)`` as close as possible to ``target`` (least squares).

    A post-LN transformer block (BERT) has no exact identity: with its output projections zeroed it computes
    ``LN2(LN1(x))``, and a layer norm re-normalises every token. The best per-feature fit is
    ``gamma_i = Cov(t_i, u_i) / Var(u_i)``, ``beta_i = E t_i - gamma_i E u_i`` with ``u`` the normalised
    inputs (fusion_math.md §5.6).

    Args:
        inputs (`Tensor` of shape `(samples, d)`): what the layer norm reads (tokens as samples).
        target (`Tensor` of shape `(samples, d)`, *optional*): what it should output; ``inputs`` when omitted.
        eps (`float`): the layer norm's epsilon.

    Returns:
        ``(gamma, beta, error)``: float64 tensors of shape `(d,)` and the relative error
        ``||LN(inputs) - target|| / ||target - mean(target)||`` on these samples.
    """
    x = inputs.double()
    t = x if target is None else target.double()
    if x.ndim != 2 or t.shape != x.shape:
        raise ValueError(f"Expected two (samples, d) tensors of one shape, got {tuple(x.shape)} and {tuple(t.shape)}.")
    u = (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    u_mean, t_mean = u.mean(0), t.mean(0)
    uc, tc = u - u_mean, t - t_mean
    var_u = (uc * uc).mean(0)
    gamma = torch.where(var_u > 1e-12, (uc * tc).mean(0) / var_u.clamp_min(1e-12), torch.zeros_like(var_u))
    beta = t_mean - gamma * u_mean
    error = float((u * gamma + beta - t).norm() / tc.norm().clamp_min(1e-300))
    return gamma, beta, error


def fit_post_ln_identity(
    inputs: torch.Tensor, *, eps: tuple[float, float] = (1e-12, 1e-12), steps: int = 50
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], float]:
    """Parameters of two stacked layer norms so that ``LN2(LN1(x)) ≈ x``: a post-LN block's approximate identity.

    With its output projections zeroed, a post-LN block (BERT) computes ``LN2(LN1(x))``. Each norm is first fitted
    by least squares (:func:`fit_layernorm_identity`: LN1 on ``x``, LN2 on ``LN1(x)``, both with target ``x``),
    then the four vectors are refined jointly (``steps`` L-BFGS iterations on the squared error), which typically
    halves the error again because the second norm can undo part of the first one's per-token rescaling.

    Args:
        inputs (`Tensor` of shape `(samples, d)`): the stream entering the block (tokens as samples).
        eps (`tuple[float, float]`): the two norms' epsilons.
        steps (`int`): L-BFGS iterations of the joint refinement (0: least squares only).

    Returns:
        ``((gamma1, beta1, gamma2, beta2), error)``: float64 tensors of shape `(d,)` and the relative error
        ``||LN2(LN1(x)) - x|| / ||x - mean(x)||`` on these samples.
    """
    import torch.nn.functional as F

    x = inputs.double()
    d = x.shape[-1]
    gamma1, beta1, _ = fit_layernorm_identity(x, x, eps=eps[0])
    h = F.layer_norm(x, (d,), gamma1, beta1, eps[0])
    gamma2, beta2, _ = fit_layernorm_identity(h, x, eps=eps[1])
    params = [gamma1, beta1, gamma2, beta2]
    spread = ((x - x.mean(0)) ** 2).sum()

    def forward(p: list[torch.Tensor], data: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(F.layer_norm(data, (d,), p[0], p[1], eps[0]), (d,), p[2], p[3], eps[1])

    if steps > 0:
        with torch.enable_grad():
            xs = x.float()
            work = [p.float().clone().requires_grad_(True) for p in params]
            optimizer = torch.optim.LBFGS(work, max_iter=steps, line_search_fn="strong_wolfe")
            scale = float(spread)

            def closure():
                optimizer.zero_grad()
                loss = ((forward(work, xs) - xs) ** 2).sum() / scale
                loss.backward()
                return loss

            optimizer.step(closure)
        refined = [p.detach().double() for p in work]
        if ((forward(refined, x) - x) ** 2).sum() < ((forward(params, x) - x) ** 2).sum():
            params = refined
    error = float(((forward(params, x) - x) ** 2).sum().sqrt() / spread.sqrt().clamp_min(1e-300))
    return (params[0], params[1], params[2], params[3]), error
