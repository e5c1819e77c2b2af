"""The model-agnostic description of a network that the fusion pipeline works on.

A network is ``stem -> segments of layers -> head``. Cross-layer alignment runs inside each segment (layers
of different segments never match: resolution or stage changes between them). Every parameter axis that
holds neurons names its *alignment group*: the set of axes that must share one neuron correspondence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class AxisRef:
    """One axis of one parameter (or buffer) that belongs to an alignment group.

    Attributes:
        param: state-dict key, e.g. ``"3.weight"``.
        axis: the tensor axis holding the group's neurons.
        role: ``"out"`` when the tensor writes the neurons (weight rows, biases, norm parameters: transported
            with ``R``), ``"in"`` when it reads them (the next layer's input axis: transported with ``S``).
        inner: positions per channel when the axis is a flattened ``(channels, positions)`` pair (a Linear
            after ``Flatten``); 1 otherwise.
        repeat: for head-structured groups, how many consecutive heads of this axis share one head of the
            group: the axis is ``(group heads, repeat, head_dim)`` and the head plan acts identically on every
            repeat (query heads of grouped-query attention follow their key/value head). 1 otherwise.
        outer: when the axis holds several blocks of the group one after the other (a fused ``[q|k|v]``
            projection: ``(outer, width)``), the number of blocks; the map acts identically on each. 1 otherwise.
    """

    param: str
    axis: int
    role: Literal["out", "in"]
    inner: int = 1
    repeat: int = 1
    outer: int = 1


@dataclass(frozen=True)
class Group:
    """An alignment group: one neuron basis shared by several parameter axes.

    Attributes:
        name: stable name, equal in every (balanced) model of the same structure, e.g. ``"layer.3"``.
        width: number of neurons.
        axes: the parameter axes; the first ``"out"`` axis is the group's primary weight (used by the weight
            ground metric).
        capture: where the group's activations are read, one capture or a tuple of them whose samples are
            pooled (every block output of a residual stream). A capture is a module name (its output),
            ``"name:input"`` (its first positional input), optionally followed by ``"[a:b]"`` to keep channels
            ``a..b-1`` (dim 1 of conv maps, the last dim otherwise), e.g. ``"blocks.0.attn.qkv[0:64]"``.
        heads: number of attention heads the width is split into (``width = heads * head_dim``). With
            ``heads > 1`` the plan is a hard head-structured permutation: heads move as wholes.
        head_dims_free: whether dimensions may also be permuted inside a head (False under rotary embeddings).
    """

    name: str
    width: int
    axes: tuple[AxisRef, ...]
    capture: str | tuple[str, ...]
    heads: int = 1
    head_dims_free: bool = True

    @property
    def captures(self) -> tuple[str, ...]:
        """The capture points as a tuple."""
        return (self.capture,) if isinstance(self.capture, str) else tuple(self.capture)


@dataclass(frozen=True)
class RepairPoint:
    """A place where statistics repair corrects the fused model's per-channel statistics.

    The corrected activation is ``capture``'s output: a Linear/Conv pre-activation (after its BatchNorm, when
    one follows) or a residual branch output (before the addition). The correction ``y -> scale * y + shift`` is
    folded into ``weight`` (scaled along ``axis``) and ``bias`` (scaled, then shifted); without a bias the
    correction is scale-only. A model whose output there is exactly 0 (a residual branch of an inserted identity
    block) gives no target.

    Attributes:
        capture: module whose output is corrected (a capture as in :class:`Group`, without channel slice).
        group: name of the alignment group of the corrected channels (its plan carries each parent's
            per-channel statistics to the anchor's channels).
        weight: state-dict key of the parameter scaled along ``axis`` (Linear/Conv weight, norm weight).
        bias: state-dict key of the parameter shifted, or None (scale-only correction).
        axis: the axis of ``weight`` that holds the output channels (0; 1 for a transposed ``Conv1D``).
    """

    capture: str
    group: str
    weight: str
    bias: str | None
    axis: int = 0


@dataclass(frozen=True)
class LayerSpec:
    """One hidden layer (or block) that cross-layer alignment can match.

    Attributes:
        name: module name of the layer.
        capture: module whose output represents the layer for layer costs.
        width: number of neurons / channels.
    """

    name: str
    capture: str
    width: int


@dataclass(frozen=True)
class SegmentSpec:
    """A run of hidden layers between two resolution changes (pooling layers, stages).

    ``first_pinned``: the first layer changes resolution or width (a ResNet/ConvNeXt stage's downsampling
    block), so no identity exists in its place: it stays matched even where a one-layer segment would otherwise
    have its first/last constraints relaxed.
    """

    name: str
    layers: tuple[LayerSpec, ...]
    first_pinned: bool = False

    @property
    def depth(self) -> int:
        return len(self.layers)


@dataclass(frozen=True)
class NetworkSpec:
    """Everything the pipeline needs to know about a model, produced by its adapter.

    Attributes:
        family: adapter family, e.g. ``"torch.sequential"``.
        segments: hidden layers grouped into segments, in forward order.
        groups: alignment groups of every hidden neuron set, in forward order.
        output_size: number of outputs (classes); the output axis is never aligned.
        input_size: number of input features / channels the first layer reads (None if not applicable).
        description: a JSON-serialisable architecture description the adapter can rebuild the model from.
        repair_points: where ``repair="repair"`` corrects statistics, in forward order; empty when the adapter
            does not support REPAIR for this model.
    """

    family: str
    segments: tuple[SegmentSpec, ...]
    groups: tuple[Group, ...]
    output_size: int
    input_size: int | None = None
    description: dict = field(default_factory=dict, compare=False)
    repair_points: tuple[RepairPoint, ...] = ()

    @property
    def depth(self) -> int:
        """Number of hidden layers over all segments."""
        return sum(s.depth for s in self.segments)

    @property
    def segment_depths(self) -> tuple[int, ...]:
        return tuple(s.depth for s in self.segments)


__all__ = ["AxisRef", "Group", "LayerSpec", "NetworkSpec", "RepairPoint", "SegmentSpec"]
