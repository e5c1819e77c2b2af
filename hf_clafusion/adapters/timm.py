"""Adapter for timm models: ResNet (BasicBlock, Bottleneck), ViT / DeiT (pre-LN), ConvNeXt and stock VGGs.

A family is *data*: one :class:`Family` entry in :data:`FAMILIES` holds what the adapter needs to know about it
(how to build its spec, where its blocks live, which tensors make a block an identity, where timm records its
depth); the adapter looks the entry up once per call and never branches on the family name.

The blocks are found from timm's own structure (``model.layer1..4``, ``model.blocks``,
``model.stages[s].blocks``, VGG ``features`` cut at its max-pools) and captured with the generic forward-hook
helper. One segment per ResNet / ConvNeXt stage and per VGG chunk, one segment for a ViT. Alignment groups
(``docs/timm.md``, ``fusion_math.md`` §5.3-5.5):

* ResNet: one residual group per stage (every block's last conv + BN, the downsample branch, the readers of the
  stream; the stem joins stage 1 when ``layer1.0`` has no downsample), one inner group per conv-BN pair inside a
  block. BatchNorm statistics are recomputed after fusion.
* ViT / DeiT: one residual group for the whole network (patch embedding, class/distillation/register tokens,
  position embedding, every norm, every block's writes and reads, the head's input), per block one attention
  group (heads move whole; the fused ``[q|k|v]`` rows follow one head plan) and one MLP hidden group.
* ConvNeXt: one residual group per stage (stem or downsample conv, depthwise convs, norms, layer-scale gammas,
  ``fc2``, readers), one MLP hidden group per block.
* VGG: one group per convolution and per hidden classifier layer.

Identity blocks are exact: ResNet: a block whose last BatchNorm has weight and bias zero (the stream is
post-ReLU, so ``relu(x + 0) = x``); ViT: ``attn.proj`` and ``mlp.fc2`` zeroed; ConvNeXt: ``gamma = 0`` (or
``fc2`` zeroed); VGG: a 3x3 identity convolution (with an identity BatchNorm). Fused models are ordinary timm
models whose ``_model_args`` record the new depth, so :meth:`TimmAdapter.save` writes timm's own format and
``timm.create_model("local-dir:" + folder, pretrained=True)`` rebuilds them.
"""

from __future__ import annotations

import copy
import importlib
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..download import download_snapshot
from ..errors import (
    AlignmentError,
    CalibrationDataError,
    ClaFusionWarning,
    IncompatibleModelsError,
    LoadError,
    SaveError,
    UnsupportedArchitectureError,
)
from ..spec import AxisRef, Group, LayerSpec, NetworkSpec, RepairPoint, SegmentSpec
from .base import Adapter, UnmatchedBlocks, copy_sharing_storage, register_adapter
from .files import check_weight_files


SUPPORTED = (
    "ResNet (BasicBlock, Bottleneck)",
    "VisionTransformer (ViT, DeiT)",
    "ConvNeXt",
    "VGG (stock vgg11-19[_bn])",
)
#: Keys of timm's data config that must agree between parents for raw-image calibration.
DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
#: Files fetched for a ``hf-hub:`` parent: timm's config.json and safetensors weights (never pickles).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.md"]


def _timm():
    try:
        import timm
    except ImportError:  # pragma: no cover - exercised only without timm
        raise ImportError("The timm adapter needs timm: pip install -e '.[timm]' from the checkout.") from None
    return timm


def _unsupported(what: str, where: str, fix: str = "") -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"Unsupported {what} at {where!r}.{(' ' + fix) if fix else ''}", layer_type=what, supported=SUPPORTED
    )


# --------------------------------------------------------------------------------------------- group building


def _norm_axes(name: str, module: nn.Module) -> list[AxisRef]:
    """Per-channel parameters (and BatchNorm statistics) of a norm layer, as ``out`` axes."""
    axes = []
    for param in ("weight", "bias", "running_mean", "running_var"):
        if getattr(module, param, None) is not None:
            axes.append(AxisRef(f"{name}.{param}", 0, "out"))
    return axes


def _writer_axes(name: str, module: nn.Module) -> list[AxisRef]:
    axes = [AxisRef(f"{name}.weight", 0, "out")]
    if getattr(module, "bias", None) is not None:
        axes.append(AxisRef(f"{name}.bias", 0, "out"))
    return axes


def _norm_repair(name: str, module: nn.Module, group: str) -> list[RepairPoint]:
    """A repair point at an affine norm's output (corrections folded into its weight and bias)."""
    if getattr(module, "weight", None) is None or getattr(module, "bias", None) is None:
        return []
    return [RepairPoint(name, group, f"{name}.weight", f"{name}.bias")]


def _out_channels(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


@dataclass
class _Stream:
    """A residual (or plain) group being assembled: writers, readers and capture points."""

    name: str
    width: int
    axes: list[AxisRef] = field(default_factory=list)
    captures: list[str] = field(default_factory=list)

    def group(self) -> Group:
        return Group(self.name, self.width, tuple(self.axes), capture=tuple(self.captures))


def _check_conv(name: str, conv: nn.Module) -> None:
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        raise _unsupported(
            f"layer {type(conv).__name__}(groups={getattr(conv, 'groups', '?')})",
            name,
            "Grouped convolutions (ResNeXt, cardinality > 1) cannot be permuted freely.",
        )


def _is_identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def _weight_and_bias(module: nn.Module) -> list[torch.Tensor]:
    """The weight and (when present) bias of a layer: what an identity block zeroes in its residual writers."""
    return [module.weight] + ([module.bias] if getattr(module, "bias", None) is not None else [])


# --------------------------------------------------------------------------------------------- ResNet


def _resnet_stages(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_children() if name.startswith("layer") and name[5:].isdigit()]


def _resnet_block_kind(name: str, block: nn.Module) -> str:
    from timm.models.resnet import BasicBlock, Bottleneck

    kind = "basic" if type(block) is BasicBlock else "bottleneck" if type(block) is Bottleneck else None
    if kind is None:
        raise _unsupported(f"ResNet block type {type(block).__name__}", name, "Supported: BasicBlock, Bottleneck.")
    if getattr(block, "se", None) is not None:
        raise _unsupported("squeeze-excitation / attention layer in a ResNet block", f"{name}.se")
    if not _is_identity(getattr(block, "aa", None)):
        raise _unsupported("anti-aliasing layer in a ResNet block", f"{name}.aa")
    for conv in ("conv1", "conv2", "conv3") if kind == "bottleneck" else ("conv1", "conv2"):
        _check_conv(f"{name}.{conv}", getattr(block, conv))
    return kind


def _resnet_downsample(name: str, block: nn.Module) -> tuple[str, str] | None:
    """(conv, norm) names of a block's downsample branch (plain or average-pool variant)."""
    ds = block.downsample
    if ds is None or isinstance(ds, nn.Identity):
        return None
    convs = [(n, m) for n, m in ds.named_children() if isinstance(m, nn.Conv2d)]
    norms = [(n, m) for n, m in ds.named_children() if _is_batchnorm(m)]
    if len(convs) != 1 or len(norms) != 1:
        raise _unsupported("downsample branch", f"{name}.downsample", "Expected one convolution and one BatchNorm.")
    _check_conv(f"{name}.downsample.{convs[0][0]}", convs[0][1])
    return f"{name}.downsample.{convs[0][0]}", f"{name}.downsample.{norms[0][0]}"


def _resnet_spec(model: nn.Module) -> tuple[list[SegmentSpec], list[Group], list[RepairPoint]]:
    groups: list[Group] = []
    points: list[RepairPoint] = []  # every BatchNorm output: conv pre-activations and residual branch outputs
    modules = dict(model.named_modules())
    # stem: a single conv, or a deep stem Sequential(conv, bn, act, conv, bn, act, conv); then bn1
    if isinstance(model.conv1, nn.Conv2d):
        convs = ["conv1"]
    else:
        convs = [f"conv1.{n}" for n, m in model.conv1.named_children() if isinstance(m, nn.Conv2d)]
    for c in convs:
        _check_conv(c, modules[c])
    for i, c in enumerate(convs[:-1]):  # deep-stem inner groups
        stem_children = list(model.conv1.named_children())
        idx = [n for n, _ in stem_children].index(c.split(".")[1])
        norm = next(n for n, m in stem_children[idx + 1 :] if _is_batchnorm(m))
        axes = _writer_axes(c, modules[c]) + _norm_axes(f"conv1.{norm}", modules[f"conv1.{norm}"])
        axes.append(AxisRef(f"{convs[i + 1]}.weight", 1, "in"))
        groups.append(Group(f"stem.{i}", modules[c].out_channels, tuple(axes), capture=f"{convs[i + 1]}:input"))
        points += _norm_repair(f"conv1.{norm}", modules[f"conv1.{norm}"], f"stem.{i}")
    stream = _Stream("stem", modules[convs[-1]].out_channels, captures=["maxpool"])
    points += _norm_repair("bn1", model.bn1, "stem")
    stream.axes += _writer_axes(convs[-1], modules[convs[-1]]) + _norm_axes("bn1", model.bn1)
    segments = []
    for stage in _resnet_stages(model):
        layers = []
        for j, block in enumerate(getattr(model, stage)):
            name = f"{stage}.{j}"
            kind = _resnet_block_kind(name, block)
            ds = _resnet_downsample(name, block)
            stream.axes.append(AxisRef(f"{name}.conv1.weight", 1, "in"))
            if ds is not None:
                if j != 0:
                    raise _unsupported("downsample branch after the first block of a stage", name)
                stream.axes.append(AxisRef(f"{ds[0]}.weight", 1, "in"))
                groups.append(stream.group())
                stream = _Stream(f"{stage}.residual", modules[ds[0]].out_channels)
                stream.axes += _writer_axes(ds[0], modules[ds[0]]) + _norm_axes(ds[1], modules[ds[1]])
                points += _norm_repair(ds[1], modules[ds[1]], stream.name)
            pairs = [("conv1", "bn1", "conv2")] + ([("conv2", "bn2", "conv3")] if kind == "bottleneck" else [])
            for conv, norm, nxt in pairs:
                axes = _writer_axes(f"{name}.{conv}", getattr(block, conv)) + _norm_axes(
                    f"{name}.{norm}", getattr(block, norm)
                )
                axes.append(AxisRef(f"{name}.{nxt}.weight", 1, "in"))
                groups.append(
                    Group(f"{name}.{conv}", getattr(block, conv).out_channels, tuple(axes), f"{name}.{nxt}:input")
                )
                points += _norm_repair(f"{name}.{norm}", getattr(block, norm), f"{name}.{conv}")
            last_conv, last_norm = ("conv3", "bn3") if kind == "bottleneck" else ("conv2", "bn2")
            stream.axes += _writer_axes(f"{name}.{last_conv}", getattr(block, last_conv))
            stream.axes += _norm_axes(f"{name}.{last_norm}", getattr(block, last_norm))
            points += _norm_repair(f"{name}.{last_norm}", getattr(block, last_norm), stream.name)
            stream.captures.append(name)
            layers.append(LayerSpec(name, name, getattr(block, last_conv).out_channels))
        segments.append(SegmentSpec(stage, tuple(layers), first_pinned=True))
    fc = model.get_classifier()
    if not isinstance(fc, nn.Linear):
        raise _unsupported(f"classifier {type(fc).__name__}", "fc", "Expected one nn.Linear classifier.")
    stream.axes.append(AxisRef("fc.weight", 1, "in"))
    groups.append(stream.group())
    return segments, groups, points


def _resnet_writers(block: nn.Module) -> list[torch.Tensor]:
    """The last BatchNorm's weight and bias: zeroed, the block adds nothing to its (post-ReLU) input."""
    norm = block.bn3 if hasattr(block, "bn3") else block.bn2
    return [norm.weight, norm.bias]


def _plain_resnet_block(model: nn.Module, stage: nn.Sequential) -> nn.Module:
    """A fresh non-downsampling block shaped like the stage's blocks 1.. (for a stage that has only block 0)."""
    first = stage[0]
    width = first.conv1.out_channels
    out = first.conv3.out_channels if hasattr(first, "conv3") else first.conv2.out_channels
    kwargs: dict[str, Any] = dict(act_layer=type(first.act1), norm_layer=type(first.bn1))
    if hasattr(first, "conv3"):
        planes = out // type(first).expansion
        kwargs["base_width"] = 64 * width // planes
    else:
        planes = out
    return type(first)(out, planes, **kwargs)


def _resnet_reference(model: nn.Module, container: str) -> nn.Module:
    """A non-downsampling block of the stage: block 1, or a fresh one when the stage has only block 0."""
    stage = model.get_submodule(container)
    return stage[1] if len(stage) > 1 else _plain_resnet_block(model, stage)


def _resnet_in_chans(model: nn.Module) -> int:
    conv = model.conv1 if isinstance(model.conv1, nn.Conv2d) else next(iter(model.conv1))
    return conv.in_channels


def _resnet_layout(model: nn.Module) -> dict[str, Any]:
    stages = _resnet_stages(model)
    return {
        "number of stages": len(stages),
        "block type": sorted({type(b).__name__ for st in stages for b in getattr(model, st)}),
        "stem": "deep" if not isinstance(model.conv1, nn.Conv2d) else "single conv",
        "downsample in layer1.0": getattr(model, stages[0])[0].downsample is not None,
        "stem pooling": type(model.maxpool).__name__,
        "global pooling": getattr(model.global_pool, "pool_type", None),
    }


# --------------------------------------------------------------------------------------------- ViT / DeiT


def _vit_check_block(name: str, block: nn.Module) -> None:
    from timm.layers import LayerScale, Mlp
    from timm.models.vision_transformer import Attention, Block

    if type(block) is not Block:
        raise _unsupported(
            f"ViT block type {type(block).__name__}", name, "Supported: timm's pre-LN Block (ViT, DeiT)."
        )
    attn = block.attn
    if type(attn) is not Attention:
        raise _unsupported(f"attention type {type(attn).__name__}", f"{name}.attn")
    if not (_is_identity(attn.q_norm) and _is_identity(attn.k_norm) and _is_identity(getattr(attn, "norm", None))):
        raise _unsupported("qk-norm / attention-output norm", f"{name}.attn", "Build the models with qk_norm=False.")
    if type(block.mlp) is not Mlp or not _is_identity(getattr(block.mlp, "norm", None)):
        raise _unsupported(
            f"MLP type {type(block.mlp).__name__}", f"{name}.mlp", "Supported: timm Mlp (fc1, act, fc2)."
        )
    for ls in ("ls1", "ls2"):
        if not isinstance(getattr(block, ls), (nn.Identity, LayerScale)):
            raise _unsupported(f"layer scale {type(getattr(block, ls)).__name__}", f"{name}.{ls}")


def _vit_spec(model: nn.Module) -> tuple[list[SegmentSpec], list[Group], list[RepairPoint]]:
    if getattr(model, "attn_pool", None) is not None:
        raise _unsupported("attention-pooling head (global_pool='map')", "attn_pool", "Use 'token' or 'avg' pooling.")
    if not _is_identity(getattr(model, "pre_logits", None)):
        raise _unsupported("pre-logits layer (representation_size)", "pre_logits")
    proj = model.patch_embed.proj
    if not isinstance(proj, nn.Conv2d):
        raise _unsupported(f"patch embedding {type(proj).__name__}", "patch_embed.proj")
    dim = model.embed_dim
    res = _Stream("residual", dim, captures=["norm_pre"])
    res.axes += _writer_axes("patch_embed.proj", proj)
    if not _is_identity(getattr(model.patch_embed, "norm", None)):
        res.axes += _norm_axes("patch_embed.norm", model.patch_embed.norm)
    for token in ("cls_token", "reg_token", "dist_token", "pos_embed"):
        if getattr(model, token, None) is not None:
            res.axes.append(AxisRef(token, 2, "out"))
    if not _is_identity(model.norm_pre):
        res.axes += _norm_axes("norm_pre", model.norm_pre)
    groups: list[Group] = []
    layers = []
    for i, block in enumerate(model.blocks):
        name = f"blocks.{i}"
        _vit_check_block(name, block)
        attn = block.attn
        heads = attn.num_heads
        width = attn.proj.in_features
        res.axes += _norm_axes(f"{name}.norm1", block.norm1)
        res.axes.append(AxisRef(f"{name}.attn.qkv.weight", 1, "in"))
        res.axes += _writer_axes(f"{name}.attn.proj", attn.proj)
        if not _is_identity(block.ls1):
            res.axes.append(AxisRef(f"{name}.ls1.gamma", 0, "out"))
        res.axes += _norm_axes(f"{name}.norm2", block.norm2)
        res.axes.append(AxisRef(f"{name}.mlp.fc1.weight", 1, "in"))
        res.axes += _writer_axes(f"{name}.mlp.fc2", block.mlp.fc2)
        if not _is_identity(block.ls2):
            res.axes.append(AxisRef(f"{name}.ls2.gamma", 0, "out"))
        res.captures.append(name)
        # attention: heads move whole; q, k and v rows of the fused projection follow one head plan
        axes = [AxisRef(f"{name}.attn.qkv.weight", 0, "out", outer=3)]
        if attn.qkv.bias is not None:
            axes.append(AxisRef(f"{name}.attn.qkv.bias", 0, "out", outer=3))
        axes.append(AxisRef(f"{name}.attn.proj.weight", 1, "in"))
        captures = (f"{name}.attn.qkv[0:{width}]", f"{name}.attn.qkv[{width}:{2 * width}]", f"{name}.attn.proj:input")
        groups.append(Group(f"{name}.attn", width, tuple(axes), capture=captures, heads=heads))
        fc1 = block.mlp.fc1
        axes = _writer_axes(f"{name}.mlp.fc1", fc1) + [AxisRef(f"{name}.mlp.fc2.weight", 1, "in")]
        groups.append(Group(f"{name}.mlp", fc1.out_features, tuple(axes), capture=f"{name}.mlp.fc2:input"))
        layers.append(LayerSpec(name, name, dim))
    for norm in ("norm", "fc_norm"):
        if not _is_identity(getattr(model, norm, None)):
            res.axes += _norm_axes(norm, getattr(model, norm))
    for head in ("head", "head_dist"):
        module = getattr(model, head, None)
        if module is None or isinstance(module, nn.Identity):
            continue
        if not isinstance(module, nn.Linear):
            raise _unsupported(f"classifier {type(module).__name__}", head)
        res.axes.append(AxisRef(f"{head}.weight", 1, "in"))
    groups.insert(0, res.group())
    return [SegmentSpec("blocks", tuple(layers))], groups, []  # no repair points yet


def _vit_writers(block: nn.Module) -> list[torch.Tensor]:
    return _weight_and_bias(block.attn.proj) + _weight_and_bias(block.mlp.fc2)


def _vit_layout(model: nn.Module) -> dict[str, Any]:
    attn = model.blocks[0].attn if len(model.blocks) else None
    return {
        "number of heads": None if attn is None else attn.num_heads,
        "head size": None if attn is None else attn.head_dim,
        "patch embedding": (tuple(model.patch_embed.patch_size), tuple(model.patch_embed.img_size or ())),
        "prefix tokens": model.num_prefix_tokens,
        "position embedding": None if model.pos_embed is None else tuple(model.pos_embed.shape[:2]),
        "global pooling": model.global_pool,
        "layer scale": sorted({type(b.ls1).__name__ for b in model.blocks}),
        "distillation head": getattr(model, "head_dist", None) is not None,
    }


# --------------------------------------------------------------------------------------------- ConvNeXt


def _convnext_spec(model: nn.Module) -> tuple[list[SegmentSpec], list[Group], list[RepairPoint]]:
    from timm.layers import LayerNorm2d
    from timm.models.convnext import ConvNeXtBlock

    stem = list(model.stem.children())
    if len(stem) != 2 or not isinstance(stem[0], nn.Conv2d) or not isinstance(stem[1], LayerNorm2d):
        raise _unsupported("ConvNeXt stem", "stem", "Supported: the 'patch' stem (Conv2d + LayerNorm2d).")
    stream = _Stream("stem", stem[0].out_channels, captures=["stem"])
    stream.axes += _writer_axes("stem.0", stem[0]) + _norm_axes("stem.1", stem[1])
    groups: list[Group] = []
    segments = []
    for s, stage in enumerate(model.stages):
        prefix = f"stages.{s}"
        if not _is_identity(stage.downsample):
            parts = list(stage.downsample.children())
            if len(parts) != 2 or not isinstance(parts[1], nn.Conv2d):
                raise _unsupported("ConvNeXt downsample", f"{prefix}.downsample")
            _check_conv(f"{prefix}.downsample.1", parts[1])
            stream.axes += _norm_axes(f"{prefix}.downsample.0", parts[0])
            stream.axes.append(AxisRef(f"{prefix}.downsample.1.weight", 1, "in"))
            groups.append(stream.group())
            stream = _Stream(f"{prefix}.residual", parts[1].out_channels, captures=[f"{prefix}.downsample"])
            stream.axes += _writer_axes(f"{prefix}.downsample.1", parts[1])
        layers = []
        for j, block in enumerate(stage.blocks):
            name = f"{prefix}.blocks.{j}"
            if type(block) is not ConvNeXtBlock:
                raise _unsupported(f"ConvNeXt block type {type(block).__name__}", name)
            if not _is_identity(block.shortcut):
                raise _unsupported("projection shortcut in a ConvNeXt block", f"{name}.shortcut")
            if block.conv_dw.groups != block.conv_dw.in_channels:
                raise _unsupported("non-depthwise conv_dw", f"{name}.conv_dw")
            if not _is_identity(getattr(block.mlp, "norm", None)) or not hasattr(block.mlp, "fc2"):
                raise _unsupported(f"ConvNeXt MLP {type(block.mlp).__name__}", f"{name}.mlp")
            stream.axes += _writer_axes(f"{name}.conv_dw", block.conv_dw) + _norm_axes(f"{name}.norm", block.norm)
            stream.axes.append(AxisRef(f"{name}.mlp.fc1.weight", 1, "in"))
            stream.axes += _writer_axes(f"{name}.mlp.fc2", block.mlp.fc2)
            if block.gamma is not None:
                stream.axes.append(AxisRef(f"{name}.gamma", 0, "out"))
            stream.captures.append(name)
            fc1 = block.mlp.fc1
            hidden = _out_channels(fc1)
            axes = _writer_axes(f"{name}.mlp.fc1", fc1) + [AxisRef(f"{name}.mlp.fc2.weight", 1, "in")]
            groups.append(Group(f"{name}.mlp", hidden, tuple(axes), capture=f"{name}.mlp.fc2:input"))
            layers.append(LayerSpec(name, name, stream.width))
        segments.append(SegmentSpec(prefix, tuple(layers), first_pinned=True))
    if not _is_identity(model.norm_pre):
        stream.axes += _norm_axes("norm_pre", model.norm_pre)
    head = model.head
    if not _is_identity(getattr(head, "pre_logits", None)) or not isinstance(getattr(head, "fc", None), nn.Linear):
        raise _unsupported("ConvNeXt head", "head", "Supported: norm + pooling + one Linear (no head_hidden_size).")
    if not _is_identity(getattr(head, "norm", None)):
        stream.axes += _norm_axes("head.norm", head.norm)
    stream.axes.append(AxisRef("head.fc.weight", 1, "in"))
    groups.append(stream.group())
    return segments, groups, []  # no repair points yet


def _convnext_writers(block: nn.Module) -> list[torch.Tensor]:
    return [block.gamma] if block.gamma is not None else _weight_and_bias(block.mlp.fc2)


def _convnext_layout(model: nn.Module) -> dict[str, Any]:
    return {
        "number of stages": len(model.stages),
        "MLP layout (conv_mlp)": sorted({b.use_conv_mlp for st in model.stages for b in st.blocks}),
        "layer scale": sorted({b.gamma is not None for st in model.stages for b in st.blocks}),
        "head norm position": (type(model.norm_pre).__name__, type(model.head.norm).__name__),
    }


# --------------------------------------------------------------------------------------------- VGG


def _vgg_chunks(model: nn.Module) -> list[list[tuple[int, int | None, int]]]:
    """``features`` cut at its max-pools: per chunk, ``(conv, norm or None, activation)`` indices of each unit."""
    layers = list(model.features)
    chunks: list[list[tuple[int, int | None, int]]] = [[]]
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, nn.MaxPool2d):
            chunks.append([])
            i += 1
            continue
        if not isinstance(layer, nn.Conv2d):
            raise _unsupported(f"layer {type(layer).__name__}", f"features.{i}")
        _check_conv(f"features.{i}", layer)
        norm = i + 1 if _is_batchnorm(layers[i + 1]) else None
        act = (norm or i) + 1
        if not isinstance(layers[act], nn.ReLU):
            raise _unsupported(f"activation {type(layers[act]).__name__}", f"features.{act}", "VGGs need ReLU.")
        chunks[-1].append((i, norm, act))
        i = act + 1
    return [c for c in chunks if c]


def _vgg_name(model: nn.Module, depths: Sequence[int] | None = None) -> str:
    """The stock timm name of a VGG with these chunk depths (``vgg13_bn``...); refuses custom configurations."""
    from timm.models.vgg import cfgs

    chunks = _vgg_chunks(model)
    layers = list(model.features)
    widths = [layers[chunk[0][0]].out_channels for chunk in chunks]
    depths = list(depths) if depths is not None else [len(c) for c in chunks]
    cfg = [item for w, d in zip(widths, depths) for item in [w] * d + ["M"]]
    for name, stock in cfgs.items():
        if stock == cfg:
            return name + ("_bn" if chunks[0][0][1] is not None else "")
    raise UnsupportedArchitectureError(
        f"Unsupported VGG configuration {cfg}: the timm adapter fuses only the stock timm VGGs (vgg11/13/16/19, "
        "with or without _bn), which timm can rebuild by name. Custom VGGs go through the plain-PyTorch adapter: "
        "write them as an nn.Sequential.",
        layer_type="VGG",
        supported=SUPPORTED,
    )


def _vgg_spec(model: nn.Module) -> tuple[list[SegmentSpec], list[Group], list[RepairPoint]]:
    _vgg_name(model)
    chunks = _vgg_chunks(model)
    layers = list(model.features)
    units = [u for chunk in chunks for u in chunk]
    groups = []
    for k, (conv, norm, act) in enumerate(units):
        axes = _writer_axes(f"features.{conv}", layers[conv])
        if norm is not None:
            axes += _norm_axes(f"features.{norm}", layers[norm])
        reader = f"features.{units[k + 1][0]}" if k + 1 < len(units) else "pre_logits.fc1"
        axes.append(AxisRef(f"{reader}.weight", 1, "in"))
        groups.append(Group(f"features.{conv}", layers[conv].out_channels, tuple(axes), capture=f"features.{act}"))
    head = model.pre_logits
    if not isinstance(getattr(model.head, "fc", None), nn.Linear):
        raise _unsupported("VGG classifier head", "head.fc", "Expected a Linear classifier (no conv head).")
    axes = _writer_axes("pre_logits.fc1", head.fc1) + [AxisRef("pre_logits.fc2.weight", 1, "in")]
    groups.append(Group("pre_logits.fc1", head.fc1.out_channels, tuple(axes), capture="pre_logits.fc2:input"))
    axes = _writer_axes("pre_logits.fc2", head.fc2) + [AxisRef("head.fc.weight", 1, "in")]
    groups.append(Group("pre_logits.fc2", head.fc2.out_channels, tuple(axes), capture="head.fc:input"))
    segments = [
        SegmentSpec(
            f"chunk.{s}",
            tuple(LayerSpec(f"features.{c}", f"features.{a}", layers[c].out_channels) for c, _, a in chunk),
            first_pinned=True,  # each chunk's first conv changes width (and chunk 0 reads the raw, signed image)
        )
        for s, chunk in enumerate(chunks)
    ]
    return segments, groups, []  # no repair points yet


def _vgg_rebuild(model: nn.Module, layouts: Sequence[Sequence[int | None]]) -> nn.Module:
    """A copy of a VGG whose chunk ``s`` holds ``layouts[s]`` (own unit indices, or None for an identity conv)."""
    from ..core import identity_batchnorm, identity_weight

    chunks = _vgg_chunks(model)
    layers = list(model.features)
    pools = [i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)]
    new_layers: list[nn.Module] = []
    for s, (chunk, layout) in enumerate(zip(chunks, layouts)):
        if layout and layout[0] is None:
            raise AlignmentError(
                f"VGG chunk {s} would get an identity convolution at its first position, where the stock "
                "configuration changes width. Keep first_fixed >= 1 (the default)."
            )
        width = layers[chunk[0][0]].out_channels
        for choice in layout:
            if choice is not None:
                conv, norm, act = chunk[choice]
                new_layers += [copy_sharing_storage(layers[i]) for i in (conv, norm, act) if i is not None]
                continue
            conv = nn.Conv2d(width, width, 3, padding=1)
            with torch.no_grad():
                conv.weight.copy_(identity_weight(width, [3, 3]))
                conv.bias.zero_()
            new_layers.append(conv)
            if chunk[0][1] is not None:
                norm = copy.deepcopy(layers[chunk[0][1]])
                norm.load_state_dict(identity_batchnorm(width, norm.eps))
                new_layers.append(norm)
            new_layers.append(nn.ReLU(inplace=True))
        new_layers.append(copy_sharing_storage(layers[pools[s]]))
    new = copy_sharing_storage(model)
    new.features = nn.Sequential(*new_layers)
    name = _vgg_name(new)
    if isinstance(getattr(new, "pretrained_cfg", None), dict) and new.pretrained_cfg.get("architecture"):
        new.pretrained_cfg = {**new.pretrained_cfg, "architecture": name}
    ends = [i - 1 for i, m in enumerate(new_layers) if isinstance(m, nn.MaxPool2d)]
    new.feature_ends = ends[:-1] + [len(new_layers) - 1]
    for info, end in zip(new.feature_info, new.feature_ends):
        info["module"] = f"features.{end}"
    return new.eval()


def _vgg_layout(model: nn.Module) -> dict[str, Any]:
    chunks = _vgg_chunks(model)
    return {
        "BatchNorm": chunks[0][0][1] is not None,
        "chunk widths": [model.features[c[0][0]].out_channels for c in chunks],
        "head width": model.pre_logits.fc1.out_channels,
    }


# --------------------------------------------------------------------------------------------- the families


def _first_block(model: nn.Module, container: str) -> nn.Module:
    return model.get_submodule(container)[0]


@dataclass(frozen=True)
class Family:
    """What the timm adapter knows about one model family. Functions take the (prepared) timm model.

    Attributes:
        name: short name (``"resnet"``), recorded in the spec's description.
        model_class: ``"module:Class"`` of the timm model class; its instances belong to the family.
        spec: the segments and alignment groups of a model (refuses unsupported layers).
        in_chans: number of input channels the model reads.
        layout: what must agree between parents besides depths and widths (``{what: value}``).
        containers: module names of the ``nn.Sequential`` holding each segment's blocks; None for families
            balanced by rebuilding the whole model (``rebuild``).
        identity_writers: the tensors of a block that, zeroed, make it an exact identity block.
        reference_block: ``(model, container)`` -> a block shaped like an identity block inserted there (used
            when the template has no block of the same shapes at that position).
        first_pinned: a segment's first block changes width or resolution, so it has no identity and is never
            dropped.
        depth_arg: key of timm's ``_model_args`` holding the depths (a list per segment, or one int with
            ``scalar_depth``).
        scalar_depth: the family has one segment and timm records its depth as one int.
        block_feature_info: ``feature_info`` names one entry per block with this pattern (``"blocks.{i}"``);
            None when it names stages, which depth balancing leaves unchanged.
        rebuild: ``(model, layouts)`` -> the balanced model, for families that are not balanced block by block.
        no_merge: why ``balancing='merge'`` is refused for this family; None when it is supported.
    """

    name: str
    model_class: str
    spec: Callable[[nn.Module], tuple[list[SegmentSpec], list[Group], list[RepairPoint]]]
    in_chans: Callable[[nn.Module], int]
    layout: Callable[[nn.Module], dict[str, Any]]
    containers: Callable[[nn.Module], list[str]] | None = None
    identity_writers: Callable[[nn.Module], list[torch.Tensor]] | None = None
    reference_block: Callable[[nn.Module, str], nn.Module] = _first_block
    first_pinned: bool = True
    depth_arg: str | None = None
    scalar_depth: bool = False
    block_feature_info: str | None = None
    rebuild: Callable[[nn.Module, Sequence[Sequence[int | None]]], nn.Module] | None = None
    no_merge: str | None = None


#: Family name -> description, in the order models are matched. Adding a family is one entry.
FAMILIES: dict[str, Family] = {
    "resnet": Family(
        name="resnet",
        model_class="timm.models.resnet:ResNet",
        spec=_resnet_spec,
        in_chans=_resnet_in_chans,
        layout=_resnet_layout,
        containers=_resnet_stages,
        identity_writers=_resnet_writers,
        reference_block=_resnet_reference,
        depth_arg="layers",
    ),
    "vit": Family(
        name="vit",
        model_class="timm.models.vision_transformer:VisionTransformer",
        spec=_vit_spec,
        in_chans=lambda model: model.patch_embed.proj.in_channels,
        layout=_vit_layout,
        containers=lambda model: ["blocks"],
        identity_writers=_vit_writers,
        first_pinned=False,
        depth_arg="depth",
        scalar_depth=True,
        block_feature_info="blocks.{i}",
    ),
    "convnext": Family(
        name="convnext",
        model_class="timm.models.convnext:ConvNeXt",
        spec=_convnext_spec,
        in_chans=lambda model: model.stem[0].in_channels,
        layout=_convnext_layout,
        containers=lambda model: [f"stages.{s}.blocks" for s in range(len(model.stages))],
        identity_writers=_convnext_writers,
        depth_arg="depths",
    ),
    "vgg": Family(
        name="vgg",
        model_class="timm.models.vgg:VGG",
        spec=_vgg_spec,
        in_chans=lambda model: model.features[0].in_channels,
        layout=_vgg_layout,
        rebuild=_vgg_rebuild,
        no_merge="balancing='merge' is not supported for VGGs (timm rebuilds only the stock depths). Use "
        "balancing='identity'.",
    ),
}


def _family(model: nn.Module) -> Family:
    """The family of a timm model; raises for timm models of other classes."""
    _timm()
    for family in FAMILIES.values():
        module, _, cls = family.model_class.partition(":")
        if isinstance(model, getattr(importlib.import_module(module), cls)):
            return family
    raise UnsupportedArchitectureError(
        f"Unsupported timm model class {type(model).__name__!r}. The timm adapter fuses: {', '.join(SUPPORTED)}.",
        layer_type=type(model).__name__,
        supported=SUPPORTED,
    )


# --------------------------------------------------------------------------------------------- depth balancing


def _identity_block(family: Family, model: nn.Module, container: str, candidate: nn.Module | None) -> nn.Module:
    """An exact identity block for ``container``: a copy of the template's ``candidate`` block when its shapes
    fit (its inner weights are meaningful), else of the family's reference block, with the residual writers
    zeroed."""
    reference = family.reference_block(model, container)
    block = copy.deepcopy(
        candidate if candidate is not None and _shapes(candidate) == _shapes(reference) else reference
    )
    with torch.no_grad():
        for tensor in family.identity_writers(block):
            tensor.zero_()
    return block.eval()


def _with_blocks(family: Family, model: nn.Module, blocks: Sequence[Sequence[nn.Module]]) -> nn.Module:
    """A copy of ``model`` whose segment ``s`` holds ``blocks[s]``, with the new depths recorded where timm
    rebuilds the architecture from (``_model_args``) and in ``feature_info``. Shares the tensors of every
    module it keeps with ``model``."""
    new = copy_sharing_storage(model)
    for name, segment in zip(family.containers(model), blocks):
        _replace(new, name, nn.Sequential(*segment))
    depths = [len(segment) for segment in blocks]
    args = getattr(new, "_model_args", None)
    if isinstance(args, dict):
        args[family.depth_arg] = depths[0] if family.scalar_depth else depths
    info = getattr(new, "feature_info", None)
    if family.block_feature_info is not None and isinstance(info, list) and info:
        new.feature_info = [{**info[0], "module": family.block_feature_info.format(i=i)} for i in range(depths[0])]
    return new.eval()


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------------------------- activations


def _input_size(batch: Any) -> tuple[int, int] | None:
    """``(H, W)`` of the image batch (a tensor, or a dict of model inputs), or None."""
    values = batch.values() if isinstance(batch, dict) else [batch]
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim == 4:
            return value.shape[-2], value.shape[-1]
    return None


def _is_grid(h: int, w: int, size: tuple[int, int] | None) -> bool:
    """Whether ``(h, w)`` is the image's spatial grid at some power-of-two stride (floor or ceil rounding);
    with the image size unknown, whether the grid is square."""
    if size is None:
        return h == w
    height, width = size
    stride = 1
    while stride <= max(height, width):
        if (h, w) in ((height // stride, width // stride), (-(-height // stride), -(-width // stride))):
            return True
        stride *= 2
    return False


def _channels_last(output: torch.Tensor, size: tuple[int, int] | None) -> bool:
    """Whether a 4-D activation is ``(N, H, W, C)`` (ConvNeXt Linear-MLP hidden units) rather than ``(N, C, H, W)``:
    read from its shape alone, so no earlier call has to have seen the model. Ambiguous shapes (``C`` equal to
    the grid) count as channels-first."""
    return _is_grid(output.shape[1], output.shape[2], size) and not _is_grid(output.shape[2], output.shape[3], size)


# --------------------------------------------------------------------------------------------- the adapter


@register_adapter("timm")
class TimmAdapter(Adapter):
    """timm ResNet (BasicBlock / Bottleneck), ViT / DeiT, ConvNeXt and stock VGG models (see :data:`FAMILIES`).

    Stateless: every method reads what it needs from the models it is given.
    """

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__module__.startswith("timm.")

    def prepare(self, model: nn.Module) -> nn.Module:
        # no weights are copied: the pipeline replaces a prepared model's tensors, never writes into them
        out = copy_sharing_storage(model).eval()
        self.spec(out)  # refuse unsupported models and layers early
        return out

    def predicts(self, model: nn.Module) -> bool:
        return getattr(model, "num_classes", 1) > 0  # num_classes=0: pooled features, no classifier

    def spec(self, model: nn.Module) -> NetworkSpec:
        family = _family(model)
        segments, groups, points = family.spec(model)
        return NetworkSpec(
            family=self.name,
            segments=tuple(segments),
            groups=tuple(groups),
            output_size=model.num_classes,
            input_size=family.in_chans(model),
            description={"family": family.name, "class": type(model).__name__, "depths": [s.depth for s in segments]},
            repair_points=tuple(points),
        )

    # -- activations
    def features(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        if output.ndim == 3:  # ViT tokens: (N, L, D) -> every token is a sample
            return output.reshape(-1, output.shape[-1])
        if output.ndim == 4 and _channels_last(output, _input_size(batch)):
            # ConvNeXt Linear-MLP hidden units are channels-last (N, H, W, hidden); stream maps are (N, C, H, W)
            return output.reshape(-1, output.shape[-1])
        return super().features(output, batch)

    # -- compatibility
    def check_compatible(self, models: Sequence[nn.Module]) -> None:
        families = [_family(m) for m in models]
        classes = [type(m).__name__ for m in models]
        if len({f.name for f in families}) > 1:
            raise IncompatibleModelsError(
                f"The models belong to different timm families: {classes}. Fuse models of one architecture family "
                "(ResNet with ResNet, ViT with ViT, ConvNeXt with ConvNeXt)."
            )
        layouts = [families[0].layout(m) for m in models]
        for key in layouts[0]:
            values = [layout[key] for layout in layouts]
            if any(v != values[0] for v in values):
                raise IncompatibleModelsError(
                    f"The models differ in {key}: {values}. Fusion needs the same {key}; only depths and widths may "
                    "differ."
                )

    # -- raw images
    def prepare_data(self, data: Any, models: Sequence[nn.Module], processor: Any = None, config: Any = None) -> Any:
        images = _raw_images(data, getattr(config, "input_column", None))
        if images is None:
            return data
        if processor is None:
            from timm.data import create_transform, resolve_data_config

            configs = [resolve_data_config({}, model=m) for m in models]
            keyed = [{k: c.get(k) for k in DATA_KEYS} for c in configs]
            if any(c != keyed[0] for c in keyed):
                diff = {k: [c[k] for c in keyed] for k in DATA_KEYS if len({str(c[k]) for c in keyed}) > 1}
                raise CalibrationDataError(
                    f"The parents preprocess images differently (timm data configs differ in {diff}). Preprocess the "
                    "calibration images yourself and pass tensors, or pass `processor=` (a transform) to use one."
                )
            processor = create_transform(**configs[0], is_training=False)
        channels = _family(models[0]).in_chans(models[0])
        mode = "L" if channels == 1 else "RGB"
        if config is not None and len(images) > config.num_samples:
            from ..data import subset_indices

            images = [images[i] for i in subset_indices(len(images), config.num_samples, config.seed)]
        try:
            return torch.stack([processor(img.convert(mode) if hasattr(img, "convert") else img) for img in images])
        except (TypeError, ValueError, RuntimeError) as error:
            raise CalibrationDataError(
                f"Could not preprocess the calibration images: {error}. Pass tensors shaped as the models expect."
            ) from error

    # -- depth balancing
    def insert_identity(self, model, layouts, template, *, batches=None, fit=True):
        """The balanced copy and its identity errors: ``(model, {})``, since every timm identity block is exact
        (``fit`` is accepted for the closed form of unmatched blocks; nothing here is fitted)."""
        family = _family(model)
        if family.rebuild is not None:
            return family.rebuild(model, layouts), {}
        names = family.containers(model)
        t_names = family.containers(template)
        if len(layouts) != len(names):
            raise AlignmentError(f"Got {len(layouts)} segment layouts for a model with {len(names)} segments.")
        blocks = []
        for s, (name, layout) in enumerate(zip(names, layouts)):
            if family.first_pinned and layout and layout[0] is None:
                raise AlignmentError(
                    f"Segment {s} ({name}) would get an identity block at position 0, where the stage's first block "
                    "changes resolution and width; no identity exists there. Keep first_fixed >= 1 (the default) so "
                    "each stage's first block stays matched."
                )
            own = list(model.get_submodule(name))
            template_blocks = list(template.get_submodule(t_names[s]))
            blocks.append(
                [
                    copy_sharing_storage(own[choice])
                    if choice is not None
                    else _identity_block(family, model, name, template_blocks[p] if p < len(template_blocks) else None)
                    for p, choice in enumerate(layout)
                ]
            )
        return _with_blocks(family, model, blocks), {}

    def unmatched_blocks(self, model, layouts, balanced):
        """Identity blocks of ResNet, ViT and ConvNeXt in closed form (``fusion_math.md`` §6.4); None for VGGs,
        whose inserted layers are not residual blocks. The residual writers are those that
        :meth:`insert_identity` zeroes: the last BatchNorm (ResNet), the attention and MLP output projections
        (ViT), the layer scale or the MLP output (ConvNeXt)."""
        family = _family(model)
        if family.containers is None or family.identity_writers is None:
            return None
        inserted: dict[str, str] = {}  # inserted block prefix -> capture of the stream entering it
        own: dict[str, str] = {}  # balanced block prefix -> the model's own block prefix
        params, writers = set(), set()
        for container, layout in zip(family.containers(model), layouts):
            # the stream entering the segment: the capture before its first block in the stream group, if any
            stream = next((g.captures for g in balanced.groups if f"{container}.0" in g.captures), ())
            at = stream.index(f"{container}.0") if stream else 0
            entering = stream[at - 1] if at > 0 else None
            if None in layout:  # the names of an identity block's tensors, and which of them it zeroes
                block = family.reference_block(model, container)
                zeroed = {id(t) for t in family.identity_writers(block)}
                keys = {name: id(t) in zeroed for name, t in block.state_dict(keep_vars=True).items()}
            for p, choice in enumerate(layout):
                prefix = f"{container}.{p}"
                if choice is not None:
                    own[prefix] = entering = f"{container}.{choice}"
                    continue
                if entering is None:
                    return None  # nothing observes the stream entering this block: no closed form
                inserted[prefix] = entering  # an inserted block's output is its input
                params.update(f"{prefix}.{name}" for name in keys)
                writers.update(f"{prefix}.{name}" for name, zero in keys.items() if zero)

        def block_of(key: str) -> str | None:
            return next(
                (b for b in (*inserted, *own) if key == b or key.startswith((f"{b}.", f"{b}:", f"{b}["))), None
            )

        def before_balancing(capture: str) -> str:
            block = block_of(capture)
            if block is None:
                return capture
            return inserted[block] if block in inserted else own[block] + capture[len(block) :]

        groups, captures = set(), {}
        for group in balanced.groups:
            if all(block_of(axis.param) in inserted for axis in group.axes):
                groups.add(group.name)  # inside an inserted block: no statistics, no plan
                continue
            captures.update({c: before_balancing(c) for c in group.captures})
        for point in balanced.repair_points:  # those inside inserted blocks have no counterpart: not mapped
            if block_of(point.capture) not in inserted:
                captures[point.capture] = before_balancing(point.capture)
        return UnmatchedBlocks(frozenset(groups), frozenset(params), frozenset(writers), captures)

    def merge_layers(self, model, keep, preactivations, relu_approx):
        """Experimental depth reduction: drop the blocks that cross-layer alignment left unmatched (not exact)."""
        family = _family(model)
        if family.no_merge is not None:
            raise UnsupportedArchitectureError(family.no_merge)
        warnings.warn(
            "balancing='merge' on timm models drops the residual blocks left unmatched by the alignment. This is "
            "experimental: residual blocks have no exact merge, so the fused model needs finetuning.",
            ClaFusionWarning,
            stacklevel=3,
        )
        blocks = []
        for s, (name, kept) in enumerate(zip(family.containers(model), keep)):
            if family.first_pinned and 0 not in kept:
                raise AlignmentError(
                    f"Segment {s} ({name}) would drop its first block, which changes resolution and width. Keep "
                    "first_fixed >= 1 (the default)."
                )
            own = list(model.get_submodule(name))
            blocks.append([copy_sharing_storage(own[i]) for i in kept])
        return _with_blocks(family, model, blocks)

    # -- saving and loading in timm's own format
    def save(self, model: nn.Module, directory: Path) -> None:
        _timm()
        from timm.models import save_for_hf

        cfg = getattr(model, "pretrained_cfg", None)
        if not cfg or not cfg.get("architecture") or not isinstance(getattr(model, "_model_args", None), dict):
            raise SaveError(
                f"This {type(model).__name__} was not built by timm.create_model (it has no pretrained_cfg / recorded "
                "model arguments), so timm's config.json cannot describe it. Build the parents with "
                "timm.create_model(name, num_classes=..., layers=/depth=/depths=...) instead of the class constructor."
            )
        try:
            save_for_hf(model, str(directory), safe_serialization=True, model_config={"pretrained_cfg": {"tag": None}})
        except (ValueError, TypeError) as error:
            raise SaveError(f"timm could not write the model's config.json: {error}") from error

    @classmethod
    def can_load(cls, directory: Path) -> bool:
        config = Path(directory) / "config.json"
        if not config.is_file():
            return False
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and "architecture" in data and "model_type" not in data

    @classmethod
    def load(cls, directory: Path, *, allow_pickle: bool = False) -> nn.Module:
        timm = _timm()
        directory = Path(directory)
        if not cls.can_load(directory):
            raise LoadError(f"{str(directory)!r} has no timm config.json (with an 'architecture' key).")
        if (directory / "model.safetensors.index.json").is_file() and not (directory / "model.safetensors").is_file():
            check_weight_files(directory)
            return cls._load_shards(timm, directory)
        _refuse_pickle(directory, allow_pickle)
        check_weight_files(directory)
        try:
            model = timm.create_model(f"local-dir:{directory}", pretrained=True)
        except (RuntimeError, OSError, ValueError, KeyError) as error:
            raise SaveError(f"timm could not load {str(directory)!r}: {str(error).splitlines()[0]}") from error
        return model.eval()

    @staticmethod
    def _load_shards(timm: Any, directory: Path) -> nn.Module:
        """A folder whose weights are safetensors shards with an index (``save_pretrained(max_shard_size=...)``)."""
        from huggingface_hub import load_torch_model

        try:
            model = timm.create_model(f"local-dir:{directory}", pretrained=False)
            load_torch_model(model, directory, strict=True)
        except (RuntimeError, OSError, ValueError, KeyError) as error:
            raise SaveError(f"timm could not load {str(directory)!r}: {str(error).splitlines()[0]}") from error
        return model.eval()

    @classmethod
    def load_reference(cls, reference: str) -> nn.Module | None:
        """``"hf-hub:<repo id>"`` (downloaded, failing fast offline) or ``"local-dir:<folder>"``."""
        if reference.startswith("hf-hub:"):
            return cls.load(download_snapshot(reference[len("hf-hub:") :].split("@")[0], HUB_PATTERNS))
        if reference.startswith("local-dir:"):
            folder = Path(reference[len("local-dir:") :]).expanduser()
            if not folder.is_dir():
                raise SaveError(f"{reference!r}: {str(folder)!r} is not a folder. Check the path.")
            return cls.load(folder)
        return None


# --------------------------------------------------------------------------------------------- loading


def _refuse_pickle(directory: Path, allow_pickle: bool) -> None:
    """Refuse (``LoadError``) a folder without ``model.safetensors``, unless it holds an opted-in pickle."""
    if (directory / "model.safetensors").is_file():
        return
    pickle = directory / "pytorch_model.bin"
    if not pickle.is_file():
        raise LoadError(f"No model.safetensors in {str(directory)!r}.")
    if not allow_pickle:
        raise LoadError(
            f"{str(pickle)!r} is a pickle checkpoint; only safetensors are loaded by default. Pass allow_pickle=True "
            "if you trust its source."
        )


def _raw_images(data: Any, column: str | None) -> list | None:
    """A list of raw images (PIL) from a PIL image, a list of them, or a datasets split with an image column."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return None
    if isinstance(data, Image.Image):
        return [data]
    if isinstance(data, (list, tuple)) and data and all(isinstance(x, Image.Image) for x in data):
        return list(data)
    if type(data).__module__.startswith("datasets.") and hasattr(data, "column_names"):
        features = getattr(data, "features", {}) or {}
        if column is None:
            image_columns = [c for c, f in features.items() if type(f).__name__ == "Image"]
            if not image_columns:
                return None
            column = image_columns[0]
        elif column not in data.column_names:
            raise CalibrationDataError(f"Column {column!r} not in the dataset; it has {data.column_names}.")
        elif type(features.get(column)).__name__ != "Image":
            return None
        return list(data.with_format(None)[column])
    return None


__all__ = ["TimmAdapter"]
