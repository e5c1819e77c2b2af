"""Adapter for plain ``torch.nn.Sequential`` models: MLPs and VGG-style CNNs (the paper's reproductions).

Supported layers: ``Linear``, ``Conv2d`` (groups=1, dilation=1), ``BatchNorm1d/2d``, ``ReLU``, ``Dropout``,
``Identity``, and the segment boundaries ``MaxPool2d``, ``AvgPool2d``, ``AdaptiveAvgPool2d``, ``Flatten``.
Nested ``Sequential`` containers are flattened: the prepared (and fused) model is one flat ``nn.Sequential``.

A *unit* is a weight layer with the element-wise layers that follow it (norm, ReLU, dropout). Hidden layers
are every unit but the last (the classifier, whose output axis is never aligned). Segments are the runs of
hidden layers between boundaries, so a VGG is aligned chunk by chunk between pooling layers, as the paper does.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core import (
    absorb_signed_input,
    identity_batchnorm,
    identity_weight,
    merge_linear,
    relu_diagonal,
    signed_identity_weight,
)
from ..errors import AlignmentError, DataError, SaveError, UnsupportedArchitectureError
from ..spec import AxisRef, Group, LayerSpec, NetworkSpec, RepairPoint, SegmentSpec
from .base import Adapter, copy_sharing_storage, register_adapter
from .files import check_safetensors


FORMAT = "hf_clafusion.sequential"
ARCHITECTURE_FILE = "architecture.json"
WEIGHTS_FILE = "model.safetensors"

_WEIGHT = (nn.Linear, nn.Conv2d)
_FOLLOWER = (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.Dropout, nn.Identity)
_BOUNDARY = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)
SUPPORTED_LAYERS = tuple(c.__name__ for c in _WEIGHT + _FOLLOWER + _BOUNDARY)


def _pair(value) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value, value]


def describe_layer(module: nn.Module) -> dict:
    """A JSON description of one supported layer (hyper-parameters only)."""
    if isinstance(module, nn.Linear):
        return {
            "type": "Linear",
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
        }
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or _pair(module.dilation) != [1, 1] or module.padding_mode != "zeros":
            raise UnsupportedArchitectureError(
                f"Unsupported Conv2d: groups={module.groups}, dilation={module.dilation}, "
                f"padding_mode={module.padding_mode!r}. Only groups=1, dilation=1, zero padding convolutions fuse.",
                layer_type="Conv2d",
                supported=SUPPORTED_LAYERS,
            )
        if isinstance(module.padding, str):
            raise UnsupportedArchitectureError(
                f"Unsupported Conv2d padding {module.padding!r}; give the padding as integers.", layer_type="Conv2d"
            )
        return {
            "type": "Conv2d",
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "kernel_size": _pair(module.kernel_size),
            "stride": _pair(module.stride),
            "padding": _pair(module.padding),
            "bias": module.bias is not None,
        }
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return {
            "type": type(module).__name__,
            "num_features": module.num_features,
            "eps": module.eps,
            "momentum": module.momentum,
            "affine": module.affine,
            "track_running_stats": module.track_running_stats,
        }
    if isinstance(module, nn.ReLU):
        return {"type": "ReLU"}
    if isinstance(module, nn.Dropout):
        return {"type": "Dropout", "p": module.p}
    if isinstance(module, nn.Identity):
        return {"type": "Identity"}
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        return {
            "type": type(module).__name__,
            "kernel_size": module.kernel_size,
            "stride": module.stride,
            "padding": module.padding,
        }
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return {"type": "AdaptiveAvgPool2d", "output_size": module.output_size}
    if isinstance(module, nn.Flatten):
        return {"type": "Flatten", "start_dim": module.start_dim, "end_dim": module.end_dim}
    raise UnsupportedArchitectureError(
        f"Unsupported layer type {type(module).__name__!r} in a Sequential model. Supported: "
        f"{', '.join(SUPPORTED_LAYERS)}. Other activations (GELU, Tanh, ...) have no exact identity layer; "
        "timm and transformers models get their own adapters.",
        layer_type=type(module).__name__,
        supported=SUPPORTED_LAYERS,
    )


def build_layer(desc: dict) -> nn.Module:
    """Instantiate a layer from :func:`describe_layer`'s description."""
    kind = desc["type"]
    args = {k: v for k, v in desc.items() if k != "type"}
    if kind == "Linear":
        return nn.Linear(**args)
    if kind == "Conv2d":
        return nn.Conv2d(**args)
    classes = {c.__name__: c for c in _FOLLOWER + _BOUNDARY}
    if kind not in classes:
        raise SaveError(f"Unknown layer type {kind!r} in an architecture description. Was it written by hf_clafusion?")
    return classes[kind](**args)


def _leaves(model: nn.Module) -> list[nn.Module]:
    out: list[nn.Module] = []
    for child in model.children():
        if isinstance(child, nn.Sequential):
            out.extend(_leaves(child))
        else:
            out.append(child)
    return out


@dataclass
class _Unit:
    index: int  # position of the weight layer in the flat Sequential
    followers: list[int] = field(default_factory=list)

    def modules(self, layers: Sequence[nn.Module]) -> list[nn.Module]:
        return [layers[self.index]] + [layers[i] for i in self.followers]


@dataclass
class _Segment:
    units: list[_Unit]
    boundaries: list[int]  # boundary layers (pooling, flatten) after the segment's units


@dataclass
class _Layout:
    """A flat Sequential cut into ``prefix boundaries -> segments (units, boundaries) -> classifier``."""

    prefix: list[int]
    segments: list[_Segment]
    classifier: _Unit


def _layout(layers: Sequence[nn.Module]) -> _Layout:
    prefix: list[int] = []
    segments: list[_Segment] = []
    for i, layer in enumerate(layers):
        describe_layer(layer)  # raises on unsupported layers
        if isinstance(layer, _WEIGHT):
            if not segments or segments[-1].boundaries:
                segments.append(_Segment([], []))
            segments[-1].units.append(_Unit(i))
        elif isinstance(layer, _FOLLOWER):
            if not segments or segments[-1].boundaries:
                raise UnsupportedArchitectureError(
                    f"Layer {i} ({type(layer).__name__}) must follow a Linear or Conv2d layer in a fusable Sequential.",
                    layer_type=type(layer).__name__,
                )
            segments[-1].units[-1].followers.append(i)
        elif segments:
            segments[-1].boundaries.append(i)
        else:
            prefix.append(i)
    num_units = sum(len(s.units) for s in segments)
    if num_units < 2:
        raise UnsupportedArchitectureError(
            f"A fusable Sequential needs at least one hidden layer and a classifier; found {num_units} weight layer(s)."
        )
    if segments[-1].boundaries:
        raise UnsupportedArchitectureError(
            f"The last layer of a fusable Sequential must be the classifier (Linear/Conv2d and its activation), got "
            f"{type(layers[segments[-1].boundaries[-1]]).__name__}."
        )
    classifier = segments[-1].units.pop()
    if not segments[-1].units:
        segments.pop()
    return _Layout(prefix, segments, classifier)


def _out_width(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _in_width(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _has_relu(unit: _Unit, layers: Sequence[nn.Module]) -> bool:
    return any(isinstance(layers[i], nn.ReLU) for i in unit.followers)


def _repair_point(unit: _Unit, layers: Sequence[nn.Module], group: str) -> RepairPoint | None:
    """The unit's pre-activation: its BatchNorm's output (folded into the affine BatchNorm) or its weight layer's."""
    norms = [i for i in unit.followers if isinstance(layers[i], nn.modules.batchnorm._BatchNorm)]
    if norms:
        i = norms[-1]
        return RepairPoint(str(i), group, f"{i}.weight", f"{i}.bias") if layers[i].affine else None
    bias = f"{unit.index}.bias" if layers[unit.index].bias is not None else None
    return RepairPoint(str(unit.index), group, f"{unit.index}.weight", bias)


@register_adapter("torch.sequential")
class SequentialAdapter(Adapter):
    """Plain ``nn.Sequential`` MLPs and VGG-style CNNs."""

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, nn.Sequential)

    def prepare(self, model: nn.Module) -> nn.Sequential:
        # no weights are copied: the pipeline replaces a prepared model's tensors, never writes into them
        layers = [copy_sharing_storage(m) for m in _leaves(model)]
        _layout(layers)
        return nn.Sequential(*layers).eval()

    def model_inputs(self, model: nn.Module, batch: Any) -> tuple[tuple, dict]:
        """A Sequential takes one tensor; a dict batch with exactly one tensor (e.g. ``pixel_values``) is unwrapped."""
        if isinstance(batch, dict):
            tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
            if len(tensors) != 1:
                raise DataError(
                    f"A Sequential model takes one input tensor, but the batch has keys {sorted(batch)}. Pass the "
                    "input tensor itself (or a dataset with one input column)."
                )
            return (tensors[0],), {}
        return (batch,), {}

    def description(self, model: nn.Sequential) -> dict:
        return {"format": FORMAT, "version": 1, "layers": [describe_layer(m) for m in model]}

    @staticmethod
    def from_description(description: dict) -> nn.Sequential:
        if description.get("format") != FORMAT:
            raise SaveError(
                f"Not an hf_clafusion Sequential description: format={description.get('format')!r}, expected {FORMAT!r}."
            )
        return nn.Sequential(*[build_layer(d) for d in description["layers"]])

    def spec(self, model: nn.Module) -> NetworkSpec:
        layers = list(model)
        layout = _layout(layers)
        segments = [seg.units for seg in layout.segments]
        units = [u for seg in segments for u in seg] + [layout.classifier]
        groups, repair_points = [], []
        for pos, unit in enumerate(units[:-1]):
            weight, nxt = layers[unit.index], layers[units[pos + 1].index]
            width = _out_width(weight)
            axes = [AxisRef(f"{unit.index}.weight", 0, "out")]
            if weight.bias is not None:
                axes.append(AxisRef(f"{unit.index}.bias", 0, "out"))
            for i in unit.followers:
                if isinstance(layers[i], nn.modules.batchnorm._BatchNorm):
                    names = (["weight", "bias"] if layers[i].affine else []) + (
                        ["running_mean", "running_var"] if layers[i].track_running_stats else []
                    )
                    axes.extend(AxisRef(f"{i}.{n}", 0, "out") for n in names)
            reads = _in_width(nxt)
            if reads % width:
                raise UnsupportedArchitectureError(
                    f"Layer {units[pos + 1].index} reads {reads} features but layer {unit.index} writes {width} "
                    "channels; only flattening reshapes are supported between layers."
                )
            axes.append(AxisRef(f"{units[pos + 1].index}.weight", 1, "in", inner=reads // width))
            groups.append(Group(f"layer.{unit.index}", width, tuple(axes), capture=str(unit.index)))
            point = _repair_point(unit, layers, f"layer.{unit.index}")
            if point is not None:
                repair_points.append(point)
        seg_specs = tuple(
            SegmentSpec(
                f"segment.{s}",
                tuple(LayerSpec(str(u.index), str(u.index), _out_width(layers[u.index])) for u in seg),
            )
            for s, seg in enumerate(segments)
        )
        return NetworkSpec(
            family=self.name,
            segments=seg_specs,
            groups=tuple(groups),
            output_size=_out_width(layers[units[-1].index]),
            input_size=_in_width(layers[units[0].index]),
            description=self.description(model),
            repair_points=tuple(repair_points),
        )

    def insert_identity(self, model, layouts, template, *, batches=None):
        layers, t_layers = list(model), list(template)
        layout, t_layout = _layout(layers), _layout(t_layers)
        if len(layouts) != len(layout.segments):
            raise AlignmentError(
                f"Got {len(layouts)} segment layouts for a model with {len(layout.segments)} segments."
            )
        new_layers: list[nn.Module] = [copy.deepcopy(layers[i]) for i in layout.prefix]
        units = [u for seg in layout.segments for u in seg.units] + [layout.classifier]
        state = {"width": _in_width(layers[units[0].index]), "nonneg": False, "signed": False}

        def emit_own(unit: _Unit) -> None:
            modules = [copy.deepcopy(m) for m in unit.modules(layers)]
            if state["signed"]:  # the stream is [ReLU(x); ReLU(-x)]: read it as x
                old = modules[0]
                weight = absorb_signed_input(old.weight.data)
                key = "in_features" if isinstance(old, nn.Linear) else "in_channels"
                modules[0] = build_layer({**describe_layer(old), key: weight.shape[1]})
                modules[0].load_state_dict({**old.state_dict(), "weight": weight})
                state["signed"] = False
            new_layers.extend(modules)
            state["width"] = _out_width(layers[unit.index])
            state["nonneg"] = _has_relu(unit, layers)

        def emit_identity(t_unit: _Unit) -> None:
            t_weight, width = t_layers[t_unit.index], state["width"]
            kernel = None
            if isinstance(t_weight, nn.Conv2d):
                if _pair(t_weight.stride) != [1, 1]:
                    raise AlignmentError(
                        f"Cannot insert an identity for the strided convolution at layer {t_unit.index} (stride "
                        f"{tuple(t_weight.stride)}): it changes resolution. Keep it matched with first_fixed/last_fixed."
                    )
                kernel = _pair(t_weight.kernel_size)
            if _has_relu(t_unit, t_layers) and not state["nonneg"]:
                # ReLU(I x) != x for negative inputs: carry x exactly as [ReLU(x); ReLU(-x)].
                weight = signed_identity_weight(width, kernel, first=not state["signed"])
                state["signed"] = True
            else:
                weight = identity_weight(width, kernel)
            out_w, in_w = weight.shape[:2]
            if kernel is None:
                desc = {
                    "type": "Linear",
                    "in_features": in_w,
                    "out_features": out_w,
                    "bias": t_weight.bias is not None,
                }
            else:
                desc = {
                    "type": "Conv2d",
                    "in_channels": in_w,
                    "out_channels": out_w,
                    "kernel_size": kernel,
                    "stride": [1, 1],
                    "padding": [k // 2 for k in kernel],
                    "bias": t_weight.bias is not None,
                }
            module = build_layer(desc)
            with torch.no_grad():
                module.weight.copy_(weight)
                if module.bias is not None:
                    module.bias.zero_()
            new_layers.append(module)
            for i in t_unit.followers:
                d = describe_layer(t_layers[i])
                if "num_features" in d:
                    bn = build_layer({**d, "num_features": out_w})
                    bn.load_state_dict(identity_batchnorm(out_w, bn.eps), strict=False)
                    new_layers.append(bn)
                else:
                    new_layers.append(build_layer(d))

        for s, seg in enumerate(layout.segments):
            needs_template = any(choice is None for choice in layouts[s])
            if needs_template and (s >= len(t_layout.segments) or len(layouts[s]) != len(t_layout.segments[s].units)):
                raise AlignmentError(
                    f"Segment {s}: the layout does not match the template's depth; this is a bug, please report it."
                )
            for p, choice in enumerate(layouts[s]):
                if choice is None:
                    emit_identity(t_layout.segments[s].units[p])
                else:
                    emit_own(seg.units[choice])
            for i in seg.boundaries:
                if state["signed"]:
                    raise AlignmentError(
                        f"Cannot insert an exact identity at the end of segment {s}: its input may be negative and a "
                        f"{type(layers[i]).__name__} follows. Set first_fixed >= 1 so the segment's first layer stays "
                        "matched."
                    )
                new_layers.append(copy.deepcopy(layers[i]))
                if isinstance(layers[i], nn.Flatten):
                    later = [u for later_seg in layout.segments[s + 1 :] for u in later_seg.units] + [
                        layout.classifier
                    ]
                    state["width"] = _in_width(layers[later[0].index])
        emit_own(layout.classifier)
        return nn.Sequential(*new_layers).eval(), {}  # every identity is exact

    def merge_layers(self, model, keep, preactivations, relu_approx):
        layers = list(model)
        if any(not isinstance(m, (nn.Linear, nn.ReLU, nn.Dropout, nn.Identity, nn.Flatten)) for m in layers):
            raise UnsupportedArchitectureError(
                "balancing='merge' composes Linear layers and only supports MLPs (Linear, ReLU, Dropout, Flatten); "
                "this model has convolution or normalisation layers. Use balancing='identity'.",
                layer_type="Conv2d/BatchNorm",
            )
        layout = _layout(layers)
        kept = {seg.units[k].index for seg, ks in zip(layout.segments, keep) for k in ks}
        new_layers: list[nn.Module] = [copy.deepcopy(layers[i]) for i in layout.prefix]
        carry = None  # (W, b) of the merged layers since the last kept one, ReLU replaced by a diagonal
        for unit in [u for seg in layout.segments for u in seg.units] + [layout.classifier]:
            lin = layers[unit.index]
            weight, bias = lin.weight.data, None if lin.bias is None else lin.bias.data
            if carry is not None:
                weight, bias = merge_linear(carry[0], carry[1], torch.ones(carry[0].shape[0]), weight, bias)
            if unit.index in kept or unit is layout.classifier:
                merged = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
                merged.load_state_dict({"weight": weight} | ({} if bias is None else {"bias": bias}))
                new_layers.append(merged)
                new_layers.extend(copy.deepcopy(layers[i]) for i in unit.followers)
                carry = None
            else:
                if _has_relu(unit, layers):
                    diag = relu_diagonal(preactivations[str(unit.index)], relu_approx).to(weight.dtype)
                    weight = diag[:, None] * weight
                    bias = None if bias is None else diag * bias
                carry = (weight, bias)
        return nn.Sequential(*new_layers).eval()

    def save(self, model, directory: Path) -> None:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        (directory / ARCHITECTURE_FILE).write_text(json.dumps(self.description(model), indent=2) + "\n")

    @classmethod
    def can_load(cls, directory: Path) -> bool:
        """Whether ``directory`` holds an architecture description written by :meth:`save`."""
        return (Path(directory) / ARCHITECTURE_FILE).is_file()

    @classmethod
    def load(cls, directory: Path, *, allow_pickle: bool = False) -> nn.Module:
        directory = Path(directory)
        try:
            description = json.loads((directory / ARCHITECTURE_FILE).read_text())
        except FileNotFoundError:
            raise SaveError(
                f"No {ARCHITECTURE_FILE} in {str(directory)!r}; it is not an hf_clafusion Sequential model."
            ) from None
        model = cls.from_description(description)
        model.load_state_dict(load_weights(directory, allow_pickle=allow_pickle))
        return model.eval()


PICKLE_FILES = ("pytorch_model.bin", "model.pt", "model.pth")
SHARD_INDEX_FILE = "model.safetensors.index.json"


def load_weights(directory: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a saved folder: ``model.safetensors``, or an opted-in pickle read with ``weights_only``."""
    if (directory / WEIGHTS_FILE).is_file():
        check_safetensors(directory / WEIGHTS_FILE)
        return load_file(str(directory / WEIGHTS_FILE))
    if (directory / SHARD_INDEX_FILE).is_file():  # sharded: save_pretrained(max_shard_size=...)
        shards = json.loads((directory / SHARD_INDEX_FILE).read_text())["weight_map"].values()
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(shards)):
            check_safetensors(directory / shard)
            state.update(load_file(str(directory / shard)))
        return state
    pickles = [directory / name for name in PICKLE_FILES if (directory / name).is_file()]
    if not pickles:
        raise SaveError(f"No {WEIGHTS_FILE} in {str(directory)!r}. Save the model with save_pretrained().")
    if not allow_pickle:
        raise SaveError(
            f"{str(pickles[0])!r} is a pickle checkpoint, which can run arbitrary code when loaded; only safetensors "
            "are loaded by default. Convert it to safetensors, or pass allow_pickle=True if you trust its source "
            "(it is then loaded with torch.load(weights_only=True))."
        )
    return torch.load(pickles[0], map_location="cpu", weights_only=True)


__all__ = ["SUPPORTED_LAYERS", "SequentialAdapter", "build_layer", "describe_layer"]
