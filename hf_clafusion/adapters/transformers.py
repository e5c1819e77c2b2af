"""Adapter for Hugging Face ``transformers`` models, keyed by ``config.model_type``.

Supported families (``FAMILIES``): BERT, RoBERTa, DistilBERT (post-LN), GPT-2, Llama, Mistral, Qwen2 (RMSNorm,
SwiGLU, rotary embeddings, grouped-query attention) and ViT; base models and the task heads
``*ForSequenceClassification``, ``*ForCausalLM`` / ``GPT2LMHeadModel``, ``*ForMaskedLM``,
``*ForImageClassification``, ``*ForTokenClassification``.

A family is *data*: one :class:`Family` entry names the modules (embeddings, layer list, norms, attention
projections, MLP projections, final norm, heads) relative to the base model; the adapter derives the alignment
groups from it (fusion_math.md §5.5/§5.6):

* ``residual``: ONE group for the whole network: embeddings, every norm, every block's reads (q/k/v, MLP input)
  and writes (attention output, MLP output), the final norm and the heads' inputs (a tied LM head is transformed
  with the embedding, so it stays tied). Observed at the embedding output and at every block output (pooled).
* ``attention.{i}``: per block, heads move as wholes (``Group.heads``); with rotary embeddings dimensions inside a
  head are never permuted; with grouped-query attention the group's heads are the key/value heads and every
  query head follows its key/value head (``AxisRef.repeat``). Observed at the key and value projections.
* ``mlp.{i}``: the MLP hidden units of block ``i`` (SwiGLU gate and up share one map), observed at the input of
  the down projection.
* head groups (BERT pooler, RoBERTa classifier.dense, DistilBERT pre_classifier).

Depth balancing builds a model of the same class from a config with the new ``num_hidden_layers`` (and
``layer_types``); layer indices are renumbered by construction. An inserted block is a copy of the template's
block at that position with its residual-writing projections zeroed: exact for pre-LN blocks. Post-LN blocks
(BERT family) have no exact identity: both layer norms are fitted on the calibration hidden states
(:func:`hf_clafusion.core.fit_post_ln_identity`) and the relative error is reported.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import (
    AlignmentError,
    CalibrationDataError,
    IncompatibleModelsError,
    SaveError,
    UnsupportedArchitectureError,
)
from ..spec import AxisRef, Group, LayerSpec, NetworkSpec, RepairPoint, SegmentSpec
from .base import Adapter, UnmatchedBlocks, capture_outputs, copy_sharing_storage, register_adapter
from .files import check_weight_files


# --------------------------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class HeadLinear:
    """A Linear of a task head (name relative to the task model; ``{base}`` = the base model's prefix).

    ``reads``: the groups its input axis may belong to, first one present wins (``"residual"`` or the name of a
    head group). ``writes``: ``"residual"``, a new head group's name, or None for the class / vocabulary axis.
    """

    name: str
    reads: tuple[str, ...] = ("residual",)
    writes: str | None = None


@dataclass(frozen=True)
class HeadNorm:
    """A norm inside a head whose parameters live in ``group`` (an MLM transform's LayerNorm)."""

    name: str
    group: str = "residual"


@dataclass(frozen=True)
class Family:
    """Where a transformers family keeps its weights, and how its blocks behave. Module names are relative to
    the base model (``model.base_model``) unless said otherwise; per-layer names are relative to one layer.

    Attributes:
        layers: the ``ModuleList`` of blocks.
        depth_field: config field holding the number of blocks.
        embeddings: ``(parameter, axis)`` of every embedding tensor writing the residual stream.
        embed_capture: module whose output is the stream entering the first block.
        norms: per-layer norms in forward order (post-LN: the one after attention, then the one after the MLP).
        q, k, v: per-layer query/key/value projections (None with a fused ``qkv``).
        qkv: a fused ``[q|k|v]`` projection (GPT-2 ``c_attn``).
        o: the attention output projection (writes the stream).
        mlp_in: MLP input projections (SwiGLU: gate and up, sharing one map).
        mlp_out: the MLP output projection (writes the stream).
        final_norm: the norm after the last block (pre-LN).
        heads: task-head layers (names relative to the task model, ``{base}`` for the base model's prefix).
        post_ln: layer norms after the residual additions (no exact identity block).
        rope: rotary position embeddings (no permutation inside a head for q/k).
        conv1d: projections are GPT-2 ``Conv1D`` (weights stored ``(in, out)``).
        eps_fields: config fields holding the norm epsilon (compared between parents).
        same_fields: further config fields that must be equal between parents.
        image: inputs are images (``pixel_values``) rather than tokens.
    """

    layers: str
    depth_field: str
    embeddings: tuple[tuple[str, int], ...]
    embed_capture: str
    norms: tuple[str, ...]
    o: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    final_norm: str | None = None
    heads: tuple[HeadLinear | HeadNorm, ...] = ()
    post_ln: bool = False
    rope: bool = False
    conv1d: bool = False
    eps_fields: tuple[str, ...] = ("layer_norm_eps",)
    same_fields: tuple[str, ...] = ()
    image: bool = False
    norm_type: str = "LayerNorm"


_BERT_HEADS = (
    HeadLinear("{base}pooler.dense", writes="pooler"),
    HeadLinear("classifier", reads=("pooler", "residual")),
    HeadLinear("cls.predictions.transform.dense", writes="residual"),
    HeadNorm("cls.predictions.transform.LayerNorm"),
    HeadLinear("cls.predictions.decoder"),
)
_BERT = Family(
    layers="encoder.layer",
    depth_field="num_hidden_layers",
    embeddings=(
        ("embeddings.word_embeddings.weight", 1),
        ("embeddings.position_embeddings.weight", 1),
        ("embeddings.token_type_embeddings.weight", 1),
        ("embeddings.LayerNorm.weight", 0),
        ("embeddings.LayerNorm.bias", 0),
    ),
    embed_capture="embeddings",
    norms=("attention.output.LayerNorm", "output.LayerNorm"),
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    o="attention.output.dense",
    mlp_in=("intermediate.dense",),
    mlp_out="output.dense",
    heads=_BERT_HEADS,
    post_ln=True,
    same_fields=("hidden_act", "max_position_embeddings", "type_vocab_size", "position_embedding_type"),
)
_LLAMA = Family(
    layers="layers",
    depth_field="num_hidden_layers",
    embeddings=(("embed_tokens.weight", 1),),
    embed_capture="embed_tokens",
    norms=("input_layernorm", "post_attention_layernorm"),
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    final_norm="norm",
    heads=(HeadLinear("lm_head"), HeadLinear("score")),
    rope=True,
    eps_fields=("rms_norm_eps",),
    same_fields=("hidden_act", "rope_parameters", "rope_theta", "rope_scaling", "sliding_window"),
    norm_type="RMSNorm",
)

#: ``config.model_type`` -> family description. Adding a family is one entry (see docs/adding_an_architecture.md).
FAMILIES: dict[str, Family] = {
    "bert": _BERT,
    "roberta": replace(
        _BERT,
        heads=(
            HeadLinear("{base}pooler.dense", writes="pooler"),
            HeadLinear("classifier.dense", writes="classifier.dense"),
            HeadLinear("classifier.out_proj", reads=("classifier.dense",)),
            HeadLinear("classifier", reads=("residual",)),
            HeadLinear("lm_head.dense", writes="residual"),
            HeadNorm("lm_head.layer_norm"),
            HeadLinear("lm_head.decoder"),
        ),
    ),
    "distilbert": Family(
        layers="transformer.layer",
        depth_field="n_layers",
        embeddings=(
            ("embeddings.word_embeddings.weight", 1),
            ("embeddings.position_embeddings.weight", 1),
            ("embeddings.LayerNorm.weight", 0),
            ("embeddings.LayerNorm.bias", 0),
        ),
        embed_capture="embeddings",
        norms=("sa_layer_norm", "output_layer_norm"),
        q="attention.q_lin",
        k="attention.k_lin",
        v="attention.v_lin",
        o="attention.out_lin",
        mlp_in=("ffn.lin1",),
        mlp_out="ffn.lin2",
        heads=(
            HeadLinear("pre_classifier", writes="pre_classifier"),
            HeadLinear("classifier", reads=("pre_classifier", "residual")),
            HeadLinear("vocab_transform", writes="residual"),
            HeadNorm("vocab_layer_norm"),
            HeadLinear("vocab_projector"),
        ),
        post_ln=True,
        eps_fields=(),
        same_fields=("activation", "max_position_embeddings", "sinusoidal_pos_embds"),
    ),
    "gpt2": Family(
        layers="h",
        depth_field="n_layer",
        embeddings=(("wte.weight", 1), ("wpe.weight", 1)),
        embed_capture="drop",
        norms=("ln_1", "ln_2"),
        qkv="attn.c_attn",
        o="attn.c_proj",
        mlp_in=("mlp.c_fc",),
        mlp_out="mlp.c_proj",
        final_norm="ln_f",
        heads=(HeadLinear("lm_head"), HeadLinear("score")),
        conv1d=True,
        eps_fields=("layer_norm_epsilon",),
        same_fields=("activation_function", "n_positions", "scale_attn_weights"),
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "vit": Family(
        layers="layers",
        depth_field="num_hidden_layers",
        embeddings=(
            ("embeddings.cls_token", 2),
            ("embeddings.mask_token", 2),
            ("embeddings.position_embeddings", 2),
            ("embeddings.patch_embeddings.projection.weight", 0),
            ("embeddings.patch_embeddings.projection.bias", 0),
        ),
        embed_capture="embeddings",
        norms=("layernorm_before", "layernorm_after"),
        q="attention.q_proj",
        k="attention.k_proj",
        v="attention.v_proj",
        o="attention.o_proj",
        mlp_in=("mlp.fc1",),
        mlp_out="mlp.fc2",
        final_norm="layernorm",
        heads=(HeadLinear("{base}pooler.dense", writes="pooler"), HeadLinear("classifier")),
        same_fields=("hidden_act", "image_size", "patch_size", "num_channels", "qkv_bias"),
        image=True,
    ),
}

#: Cross-layer costs keep at most this many (evenly spaced, non-padding) tokens per calibration sequence: CKA needs
#: a few thousand samples, and every layer's activations are held for the cost matrix.
LAYER_TOKENS_PER_SEQUENCE = 16

#: Cap on the calibration tokens used to fit an approximate (post-LN) identity block (the fit and the measurement
#: of its error read the first batches up to twice as many tokens), and L-BFGS iterations.
FIT_TOKENS = 4096
FIT_STEPS = 30


def _family(model: nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"No transformers family for model_type {model_type!r}. Supported: {', '.join(sorted(FAMILIES))}. "
            "Adding one is one registry entry; see docs/adding_an_architecture.md.",
            layer_type=str(model_type),
            supported=tuple(sorted(FAMILIES)),
        ) from None


def _base_prefix(model: nn.Module) -> str:
    """``"bert."`` for a task model wrapping its base model as ``model.bert``, ``""`` for a base model."""
    prefix = getattr(model, "base_model_prefix", "")
    return f"{prefix}." if prefix and isinstance(getattr(model, prefix, None), nn.Module) else ""


def _depth(model: nn.Module) -> int:
    return len(model.get_submodule(_base_prefix(model) + _family(model).layers))


def _head_sizes(config: Any) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim)."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------------------------- tokenizers


_TOKENIZERS: dict[str, Any] = {}


def find_tokenizer(model: nn.Module) -> Any:
    """The tokenizer saved beside a model (its ``name_or_path`` folder or Hub cache), or None when there is none."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not name:
        return None
    if name not in _TOKENIZERS:
        tokenizer = None
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=False)
        except Exception:  # no tokenizer files there: nothing to compare or use
            tokenizer = None
        _TOKENIZERS[name] = tokenizer
    return _TOKENIZERS[name]


def _vocab_difference(a: Any, b: Any) -> str | None:
    """A description of the first difference between two tokenizers' vocabularies and special tokens, or None."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        only_a = sorted(set(va) - set(vb))[:3]
        only_b = sorted(set(vb) - set(va))[:3]
        moved = sorted(t for t in set(va) & set(vb) if va[t] != vb[t])[:3]
        parts = [f"{len(va)} vs {len(vb)} tokens"]
        if only_a or only_b:
            parts.append(f"only in one: {only_a} / {only_b}")
        if moved:
            parts.append(f"different ids for {moved}")
        return "; ".join(parts)
    sa, sb = dict(a.special_tokens_map), dict(b.special_tokens_map)
    if sa != sb:
        return f"special tokens {sa} vs {sb}"
    return None


def _main_input(model: nn.Module) -> str:
    """The name of the model's main input (``input_ids`` for text, ``pixel_values`` for images)."""
    return getattr(model, "main_input_name", None) or "input_ids"


@functools.cache
def _forward_parameters(cls: type) -> frozenset[str]:
    """Names of the keyword arguments of ``cls.forward`` (a property of the class, so cached per class)."""
    return frozenset(inspect.signature(cls.forward).parameters)


# --------------------------------------------------------------------------------------------- the adapter


@register_adapter("transformers")
class TransformersAdapter(Adapter):
    """Hugging Face ``PreTrainedModel``s of the families in :data:`FAMILIES`."""

    # REPAIR costs two passes of the fused model and one of the parents, and "auto"'s choice one more pass of the
    # parents and of each candidate: about 3 floors on a BERT-base pair (81 s of 162 s), where it added 1.7
    # points one-shot on the text benchmark pair. "auto" leaves it to an explicit repair="repair".
    auto_repair = False

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        return (
            type(model).__module__.startswith("transformers.")
            and getattr(config, "model_type", None) in FAMILIES
            and hasattr(model, "base_model_prefix")
        )

    # -- prepare / spec
    def prepare(self, model: nn.Module) -> nn.Module:
        _family(model)
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        convert = bool(dtypes) and dtypes != {torch.float32}
        # float32 weights are not copied: the pipeline replaces a prepared model's tensors, never writes into them
        prepared = copy_sharing_storage(model, dtype=torch.float32 if convert else None).eval()
        if convert:
            # align in float32; the original dtype is kept in the config and restored by save()
            original = next(iter(dtypes)) if len(dtypes) == 1 else getattr(model.config, "dtype", None)
            prepared.config.dtype = original
        return prepared

    def spec(self, model: nn.Module) -> NetworkSpec:
        fam = _family(model)
        config = model.config
        state = model.state_dict()
        base = _base_prefix(model)
        depth = _depth(model)
        layers = f"{base}{fam.layers}"
        hidden = config.hidden_size
        heads, kv_heads, head_dim = _head_sizes(config)
        repeat = heads // kv_heads
        w_out, w_in = (1, 0) if fam.conv1d else (0, 1)

        def linear(name: str, role: str, *, out_axis: bool, **kw) -> list[AxisRef]:
            """Weight (and bias, when writing) axes of a Linear / Conv1D named ``name``."""
            axes = [AxisRef(f"{name}.weight", w_out if out_axis else w_in, role, **kw)]
            if out_axis and f"{name}.bias" in state:
                axes.append(AxisRef(f"{name}.bias", 0, role, **kw))
            return axes

        def norm(name: str) -> list[AxisRef]:
            return [AxisRef(f"{name}.{p}", 0, "out") for p in ("weight", "bias") if f"{name}.{p}" in state]

        embedding_ptrs = {state[f"{base}{p}"].data_ptr() for p, _ in fam.embeddings if f"{base}{p}" in state}
        residual: list[AxisRef] = [
            AxisRef(f"{base}{p}", axis, "out") for p, axis in fam.embeddings if f"{base}{p}" in state
        ]
        blocks: list[Group] = []
        points: list[RepairPoint] = []  # MLP hidden pre-activations and the two residual branch outputs per block

        def point(name: str, group: str) -> RepairPoint:
            return RepairPoint(
                name, group, f"{name}.weight", f"{name}.bias" if f"{name}.bias" in state else None, w_out
            )

        for i in range(depth):
            layer = f"{layers}.{i}"
            for n in fam.norms:
                residual += norm(f"{layer}.{n}")
            projections = [fam.qkv] if fam.qkv else [fam.q, fam.k, fam.v]
            for p in projections + list(fam.mlp_in):
                residual += linear(f"{layer}.{p}", "in", out_axis=False)
            for p in (fam.o, fam.mlp_out):
                residual += linear(f"{layer}.{p}", "out", out_axis=True)
            # attention: heads move whole (key/value heads under GQA; query heads follow theirs)
            if fam.qkv:
                attn_axes = linear(f"{layer}.{fam.qkv}", "out", out_axis=True, outer=3)
                captures = (
                    f"{layer}.{fam.qkv}[{hidden}:{2 * hidden}]",
                    f"{layer}.{fam.qkv}[{2 * hidden}:{3 * hidden}]",
                )
            else:
                attn_axes = linear(f"{layer}.{fam.q}", "out", out_axis=True, repeat=repeat)
                attn_axes += linear(f"{layer}.{fam.k}", "out", out_axis=True)
                attn_axes += linear(f"{layer}.{fam.v}", "out", out_axis=True)
                captures = (f"{layer}.{fam.k}", f"{layer}.{fam.v}")
            attn_axes += linear(f"{layer}.{fam.o}", "in", out_axis=False, repeat=repeat)
            blocks.append(
                Group(
                    f"attention.{i}",
                    kv_heads * head_dim,
                    tuple(attn_axes),
                    capture=captures,
                    heads=kv_heads,
                    head_dims_free=not fam.rope,
                )
            )
            mlp_axes: list[AxisRef] = []
            for p in fam.mlp_in:
                mlp_axes += linear(f"{layer}.{p}", "out", out_axis=True)
            mlp_axes += linear(f"{layer}.{fam.mlp_out}", "in", out_axis=False)
            width = state[f"{layer}.{fam.mlp_out}.weight"].shape[w_in]
            blocks.append(Group(f"mlp.{i}", width, tuple(mlp_axes), capture=f"{layer}.{fam.mlp_out}:input"))
            # a gated MLP's gate feeds a nonlinearity: its up projection is corrected (scale-only without a bias)
            points += [
                point(f"{layer}.{fam.o}", "residual"),
                point(f"{layer}.{fam.mlp_in[-1]}", f"mlp.{i}"),
                point(f"{layer}.{fam.mlp_out}", "residual"),
            ]
        if fam.final_norm:
            residual += norm(f"{base}{fam.final_norm}")

        # task heads
        head_groups: dict[str, list[AxisRef]] = {}
        head_widths: dict[str, int] = {}
        output_size = 0
        for rule in fam.heads:
            name = rule.name.format(base=base)
            if isinstance(rule, HeadNorm):
                if f"{name}.weight" in state:
                    residual += norm(name)
                continue
            if f"{name}.weight" not in state:
                continue
            weight = state[f"{name}.weight"]
            reads = next((g for g in rule.reads if g == "residual" or g in head_groups), None)
            if reads == "residual":
                role = "out" if weight.data_ptr() in embedding_ptrs else "in"  # tied to the embedding
                residual.append(AxisRef(f"{name}.weight", 1, role))
            elif reads is not None:
                head_groups[reads].append(AxisRef(f"{name}.weight", 1, "in"))
            if rule.writes == "residual":
                residual += linear(name, "out", out_axis=True)
            elif rule.writes is not None:
                head_groups[rule.writes] = linear(name, "out", out_axis=True)
                head_widths[rule.writes] = weight.shape[0]
            else:
                output_size = weight.shape[0]

        res_captures = (f"{base}{fam.embed_capture}",) + tuple(f"{layers}.{i}" for i in range(depth))
        groups = [Group("residual", hidden, tuple(residual), capture=res_captures)] + blocks
        for name, axes in head_groups.items():
            module = next(r.name.format(base=base) for r in fam.heads if getattr(r, "writes", None) == name)
            groups.append(Group(f"head.{name}", head_widths[name], tuple(axes), capture=module))
        segment = SegmentSpec(
            "layers", tuple(LayerSpec(f"{layers}.{i}", f"{layers}.{i}", hidden) for i in range(depth))
        )
        return NetworkSpec(
            family=self.name,
            segments=(segment,),
            groups=tuple(groups),
            output_size=int(output_size),
            input_size=int(config.num_channels if fam.image else config.vocab_size),
            description={
                "model_type": config.model_type,
                "class": type(model).__name__,
                "depth": depth,
                "hidden_size": hidden,
                "heads": [heads, kv_heads, head_dim],
            },
            repair_points=tuple(points),
        )

    # -- data
    def model_inputs(self, model: nn.Module, batch: Any) -> tuple[tuple, dict]:
        """Keyword arguments: a tensor is the model's ``main_input_name`` (``input_ids``, ``pixel_values``);
        ``input_ids`` without an ``attention_mask`` get an all-ones mask when the model takes one (every token
        is attended, as the model's own default); ``use_cache=False`` when ``forward`` takes it."""
        model = getattr(model, "module", model)  # through a DDP wrapper
        kwargs = dict(batch) if isinstance(batch, Mapping) else {_main_input(model): batch}
        params = _forward_parameters(type(model))
        ids = kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor) and "attention_mask" in params and kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = torch.ones_like(ids)
        if "use_cache" in params:
            kwargs.setdefault("use_cache", False)
        return (), kwargs

    def next_token(self, model: nn.Module) -> bool:
        # *ForCausalLM, GPT2LMHeadModel: transformers shifts their labels by one inside the model's own loss
        return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))

    def predicts(self, model: nn.Module) -> bool:
        # a model with a head (ForSequenceClassification, ForCausalLM, ...) holds its base model under
        # ``base_model_prefix``; a base model (BertModel) is its own base and outputs hidden states
        return getattr(model, "base_model", model) is not model

    def logits(self, output: Any) -> torch.Tensor:
        if hasattr(output, "logits") and output.logits is not None:
            return output.logits
        if hasattr(output, "last_hidden_state"):
            return output.last_hidden_state
        return super().logits(output)

    @staticmethod
    def _tokens(output: torch.Tensor, batch: Any) -> torch.Tensor:
        """``(samples, channels)``: tokens of a ``(batch, tokens, channels)`` output, padding removed."""
        if output.ndim == 2:
            return output
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        if output.ndim == 3 and mask is not None and tuple(mask.shape) == tuple(output.shape[:2]):
            return output[mask.bool()]
        return output.reshape(-1, output.shape[-1])

    def features(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        return self._tokens(output, batch)

    def layer_features(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        """Non-padding tokens as samples for the layer costs, at most :data:`LAYER_TOKENS_PER_SEQUENCE` per
        sequence on average (evenly spaced, so every layer of every model keeps the same tokens)."""
        from ..core import evenly_spaced_rows

        tokens = self._tokens(output, batch)
        if output.ndim == 3:
            return evenly_spaced_rows(tokens, LAYER_TOKENS_PER_SEQUENCE * output.shape[0])
        return tokens

    def prepare_data(self, data: Any, models: Sequence[nn.Module], processor: Any = None, config: Any = None) -> Any:
        fam = _family(models[0])
        column = getattr(config, "input_column", None)
        max_length = getattr(config, "max_length", 128)
        raw = None
        if isinstance(data, str):
            raw = [data]
        elif isinstance(data, (list, tuple)) and data and all(isinstance(x, str) for x in data):
            raw = list(data)
        elif fam.image and isinstance(data, (list, tuple)) and data and type(data[0]).__module__.startswith("PIL"):
            raw = list(data)
        elif type(data).__module__.startswith("datasets.") and hasattr(data, "column_names"):
            if column is None:
                names = [c for c in ("text", "sentence", "content", "image", "img") if c in data.column_names]
                has_inputs = any(c in data.column_names for c in ("input_ids", "pixel_values"))
                column = names[0] if names and not has_inputs else None
            if column is not None:
                if column not in data.column_names:
                    raise CalibrationDataError(
                        f"input_column={column!r} is not a column of the dataset; it has {data.column_names}."
                    )
                raw = list(data[column])
        if raw is None:
            return data
        if not raw:
            raise CalibrationDataError("The calibration data is an empty list. Pass some texts or images.")
        if fam.image:
            processor = processor or self._parent_processor(models, image=True)
            return {"pixel_values": processor(images=raw, return_tensors="pt")["pixel_values"]}
        if not isinstance(raw[0], str):
            raise CalibrationDataError(
                f"Column {column!r} holds {type(raw[0]).__name__} values, not text. Name the text column with "
                "FusionConfig(input_column=...)."
            )
        tokenizer = processor or self._parent_processor(models, image=False)
        parents = [t for t in (find_tokenizer(m) for m in models) if t is not None]
        for t in parents[:1]:
            if processor is not None and (diff := _vocab_difference(processor, t)):
                raise IncompatibleModelsError(
                    f"The given tokenizer differs from the parents' tokenizer ({diff}). Tokenize the calibration "
                    "text with the tokenizer the parents were trained with."
                )
        if getattr(tokenizer, "pad_token", None) is None:
            tokenizer = copy.copy(tokenizer)
            tokenizer.pad_token = tokenizer.eos_token
        encoded = tokenizer(raw, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        keep = ("input_ids", "attention_mask", "token_type_ids")
        forward = inspect.signature(models[0].forward).parameters
        return {k: v for k, v in encoded.items() if k in keep and k in forward}

    @staticmethod
    def _parent_processor(models: Sequence[nn.Module], *, image: bool) -> Any:
        if image:
            name = getattr(models[0].config, "_name_or_path", None)
            try:
                from transformers import AutoImageProcessor

                return AutoImageProcessor.from_pretrained(name, local_files_only=True)
            except Exception:
                raise CalibrationDataError(
                    "Raw images need the parents' image processor and none was found beside the models. Pass "
                    "processor=AutoImageProcessor.from_pretrained(...)."
                ) from None
        for model in models:
            tokenizer = find_tokenizer(model)
            if tokenizer is not None:
                return tokenizer
        raise CalibrationDataError(
            "Raw text needs the parents' tokenizer and none was found beside the models. Pass "
            "processor=AutoTokenizer.from_pretrained(...) (the tokenizer the parents were trained with)."
        )

    # -- compatibility
    def check_compatible(self, models: Sequence[nn.Module]) -> None:
        types = [m.config.model_type for m in models]
        if len(set(types)) > 1:
            raise IncompatibleModelsError(
                f"The models have different model_types: {types} (different norm types, layouts or position "
                "encodings). Only models of one family can be fused."
            )
        classes = [type(m).__name__ for m in models]
        if len(set(classes)) > 1:
            raise IncompatibleModelsError(
                f"The models have different classes: {classes}. Fuse models with the same task head (load every "
                "parent with the same AutoModel* class)."
            )
        fam = _family(models[0])
        configs = [m.config for m in models]

        def compare(name: str, values: list, fix: str) -> None:
            if any(v != values[0] for v in values):
                raise IncompatibleModelsError(f"The models have different {name}: {values}. {fix}")

        for f in fam.eps_fields:
            compare(
                f"{fam.norm_type} epsilons ({f})",
                [getattr(c, f, None) for c in configs],
                "Fused norms need one epsilon; set the same value in every parent's config if they were trained so.",
            )
        for f in fam.same_fields:
            compare(f"`{f}`", [getattr(c, f, None) for c in configs], "These must be equal for the models to fuse.")
        layouts = [_head_sizes(c) for c in configs]
        ratios = [h // kv for h, kv, _ in layouts]
        compare(
            "grouped-query attention layouts (query heads per key/value head)",
            ratios,
            "Query heads must follow their key/value head, so the grouping must be the same.",
        )
        if fam.rope:
            compare(
                "rotary head dims",
                [hd for _, _, hd in layouts],
                "Rotary embeddings fix each dimension's frequency inside a head; head sizes must be equal.",
            )
        # vocabulary: sizes and special ids from the configs, the full token->id map from the tokenizers
        if not fam.image:
            for f in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id"):
                compare(
                    f"`{f}` (vocabularies)",
                    [getattr(c, f, None) for c in configs],
                    "Fusion never permutes vocabulary rows, so the parents need the same tokenizer.",
                )
            tokenizers = [(i, find_tokenizer(m)) for i, m in enumerate(models)]
            tokenizers = [(i, t) for i, t in tokenizers if t is not None]
            for i, t in tokenizers[1:]:
                diff = _vocab_difference(tokenizers[0][1], t)
                if diff:
                    raise IncompatibleModelsError(
                        f"The tokenizers of model {tokenizers[0][0]} and model {i} differ ({diff}). Fusion never "
                        "permutes vocabulary rows, so the parents need the same tokenizer; retrain one on the "
                        "other's tokenizer."
                    )
        # label sets of classification heads
        if any(s in classes[0] for s in ("Classification",)):
            compare(
                "numbers of labels",
                [c.num_labels for c in configs],
                "Fused classifiers need one label set; give the models the same labels.",
            )
            labels = [dict(sorted((int(k), v) for k, v in c.id2label.items())) for c in configs]
            if any(lab != labels[0] for lab in labels):
                diff = {
                    k: [lab.get(k) for lab in labels]
                    for k in labels[0]
                    if any(lab.get(k) != labels[0][k] for lab in labels)
                }
                raise IncompatibleModelsError(
                    f"The models have different label sets (id2label differs at {diff}). Fused classifiers need the "
                    "same labels in the same order; reorder one model's classifier rows and id2label to match."
                )

    # -- depth balancing
    def _build(self, model: nn.Module, config: Any) -> nn.Module:
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # older transformers
            from transformers.modeling_utils import no_init_weights
        kwargs = {}
        if "add_pooling_layer" in inspect.signature(type(model).__init__).parameters:  # BertModel(add_pooling_layer=)
            kwargs["add_pooling_layer"] = getattr(model.base_model, "pooler", None) is not None
        with no_init_weights():
            new = type(model)(config, **kwargs)
        return new

    def insert_identity(self, model, layouts, template, *, batches=None, fit=True):
        fam = _family(model)
        if len(layouts) != 1:
            raise AlignmentError(f"transformers models have one segment; got {len(layouts)} layouts.")
        layout = list(layouts[0])
        if getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
            raise UnsupportedArchitectureError(
                "This GPT-2 scales attention by the inverse layer index (scale_attn_by_inverse_layer_idx=True), so "
                "inserting a block changes every later block's function. Fuse models of equal depth instead.",
                layer_type="GPT2Attention",
            )
        base = _base_prefix(model)
        layers = f"{base}{fam.layers}"
        config = copy.deepcopy(model.config)
        setattr(config, fam.depth_field, len(layout))
        types = getattr(config, "layer_types", None)
        if isinstance(types, list):
            t_types = getattr(template.config, "layer_types", None) or types
            config.layer_types = [
                types[s] if s is not None else t_types[min(p, len(t_types) - 1)] for p, s in enumerate(layout)
            ]
        new = self._build(model, config)
        own, tmpl = model.state_dict(), template.state_dict()
        pattern = re.compile(rf"^{re.escape(layers)}\.(\d+)\.(.*)$")

        def block(state: Mapping[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
            prefix = f"{layers}.{index}."
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

        own_shapes = {k: v.shape for k, v in block(own, 0).items()}
        state: dict[str, torch.Tensor] = {}
        for key in new.state_dict():
            match = pattern.match(key)
            if match is None:
                state[key] = own[key]
        for p, source in enumerate(layout):
            if source is not None:
                params = block(own, source)
            else:
                params = dict(block(tmpl, p))
                if {k: v.shape for k, v in params.items()} != own_shapes:  # other widths: copy a block of its own
                    nearest = next((s for s in reversed(layout[:p]) if s is not None), None)
                    params = dict(block(own, nearest if nearest is not None else 0))
                if fit:  # its norms are fitted in place below: own copies, never the template's tensors
                    params = {k: v.clone() for k, v in params.items()}
                for writer in (fam.o, fam.mlp_out):
                    for suffix in ("weight", "bias"):
                        if f"{writer}.{suffix}" in params:
                            params[f"{writer}.{suffix}"] = torch.zeros_like(params[f"{writer}.{suffix}"])
            state.update({f"{layers}.{p}.{k}": v for k, v in params.items()})
        # the new model takes the tensors themselves (no copy); nothing below writes into the ones it shares
        new.load_state_dict(state, strict=True, assign=True)
        if hasattr(new, "tie_weights"):
            new.tie_weights()  # assigning gave tied weights one Parameter per name: one again, as the model expects
        new = new.to(next(model.parameters()).dtype).eval()
        if fam.post_ln and None in layout and fit:
            return new, self._fit_post_ln(model, new, layout, batches)
        return new, {}  # pre-LN blocks with zeroed writers are exact identities

    def unmatched_blocks(self, model, layouts, balanced):
        fam = _family(model)
        layout = list(layouts[0])
        layers = f"{_base_prefix(model)}{fam.layers}"
        embed = f"{_base_prefix(model)}{fam.embed_capture}"
        inserted = {p for p, s in enumerate(layout) if s is None}
        block = re.compile(rf"^{re.escape(layers)}\.(\d+)(\..*)?$")
        groups, params, writers, captures = set(), set(), set(), {}

        def own(capture: str) -> str:
            found = block.match(capture)
            if found is None:
                return capture
            p, rest = int(found.group(1)), found.group(2) or ""
            if p not in inserted:
                return f"{layers}.{layout[p]}{rest}"
            # an inserted block's output is its input: the output of the last own block before it
            before = [s for s in layout[:p] if s is not None]
            return f"{layers}.{before[-1]}" if before else embed

        for group in balanced.groups:
            match = re.fullmatch(r"(attention|mlp)\.(\d+)", group.name)
            if match and int(match.group(2)) in inserted:
                groups.add(group.name)
                continue
            captures.update({capture: own(capture) for capture in group.captures})
        for point in balanced.repair_points:  # those inside inserted blocks have no counterpart: not mapped
            found = block.match(point.capture)
            if found is None or int(found.group(1)) not in inserted:
                captures[point.capture] = own(point.capture)
        keys = [k[len(f"{layers}.0.") :] for k in model.state_dict() if k.startswith(f"{layers}.0.")]
        written = {f"{w}.{x}" for w in (fam.o, fam.mlp_out) for x in ("weight", "bias")}
        for p in inserted:
            params.update(f"{layers}.{p}.{k}" for k in keys)
            writers.update(f"{layers}.{p}.{k}" for k in keys if k in written)
        return UnmatchedBlocks(frozenset(groups), frozenset(params), frozenset(writers), captures)

    @torch.no_grad()
    def _fit_post_ln(
        self, model: nn.Module, new: nn.Module, layout: list, batches: Sequence[Any] | None
    ) -> dict[str, float]:
        """Fit both layer norms of every inserted post-LN block to pass its incoming stream through, then measure.

        Returns:
            ``{"layers.<position>": relative error}`` of every inserted block, measured in ``new``.
        """
        from ..core import fit_post_ln_identity

        if not batches:
            raise CalibrationDataError(
                "Inserting a block into a post-LN model (BERT family) fits its layer norms on calibration data, but "
                "no batches were given. Pass calibration data to fuse()."
            )
        fam = _family(model)
        base = _base_prefix(model)
        layers = f"{base}{fam.layers}"
        embed = f"{base}{fam.embed_capture}"
        inserted = [p for p, s in enumerate(layout) if s is None]
        # the stream entering position p is (ideally) the output of the last own block before it
        sources = {}
        for p in inserted:
            before = [s for s in layout[:p] if s is not None]
            sources[p] = f"{layers}.{before[-1]}" if before else embed
        streams: dict[str, list[torch.Tensor]] = {name: [] for name in set(sources.values())}
        generator = torch.Generator().manual_seed(0)
        for batch in batches:
            args, kwargs = self.model_inputs(model, batch)
            with capture_outputs(model, list(streams)) as out:
                model(*args, **kwargs)
            for name in streams:
                streams[name].append(self._tokens(out[name], batch).float())
            if sum(c.shape[0] for c in next(iter(streams.values()))) >= 2 * FIT_TOKENS:
                break  # enough tokens: the fit and its measurement cost O(FIT_TOKENS), not O(calibration data)
        for name, chunks in streams.items():
            tokens = torch.cat(chunks)
            if tokens.shape[0] > FIT_TOKENS:
                tokens = tokens[torch.randperm(tokens.shape[0], generator=generator)[:FIT_TOKENS]]
            streams[name] = tokens.double()
        for p in inserted:
            x = streams[sources[p]]
            ln1 = new.get_submodule(f"{layers}.{p}.{fam.norms[0]}")
            ln2 = new.get_submodule(f"{layers}.{p}.{fam.norms[1]}")
            (gamma1, beta1, gamma2, beta2), _ = fit_post_ln_identity(x, eps=(ln1.eps, ln2.eps), steps=FIT_STEPS)
            for ln, gamma, beta in ((ln1, gamma1, beta1), (ln2, gamma2, beta2)):
                ln.weight.copy_(gamma.to(ln.weight.dtype))
                ln.bias.copy_(beta.to(ln.bias.dtype))
        # measured error of every inserted block in the balanced model: ||y - x|| / ||x - mean(x)||
        names = {p: (f"{layers}.{p - 1}" if p else embed, f"{layers}.{p}") for p in inserted}
        sums = {p: torch.zeros(3, dtype=torch.float64) for p in inserted}
        means = {p: [0, 0.0] for p in inserted}
        for batch in batches:
            args, kwargs = self.model_inputs(new, batch)
            with capture_outputs(new, [n for pair in names.values() for n in pair]) as out:
                new(*args, **kwargs)
            for p, (before, after) in names.items():
                x = self._tokens(out[before], batch).double()
                y = self._tokens(out[after], batch).double()
                sums[p][0] += ((y - x) ** 2).sum()
                sums[p][1] += (x**2).sum()
                means[p][0] += x.shape[0]
                means[p][1] = means[p][1] + x.sum(0)
            if means[inserted[0]][0] >= 2 * FIT_TOKENS:
                break
        errors = {}
        for p in inserted:
            count, total = means[p]
            spread = sums[p][1] - (total**2).sum() / max(count, 1)
            errors[f"layers.{p}"] = float((sums[p][0] / spread.clamp_min(1e-300)).sqrt())
        return errors

    # -- saving / loading
    def save(self, model: nn.Module, directory: Path, *, max_shard_size: int | str | None = None) -> None:
        """``save_pretrained`` in the parents' dtype; ``max_shard_size`` splits the weights into shards."""
        dtype = getattr(model.config, "dtype", None)
        name = _dtype_name(dtype)
        if name in ("bfloat16", "float16") and next(model.parameters()).dtype != getattr(torch, name):
            model = copy.deepcopy(model).to(getattr(torch, name))
        if max_shard_size is None:
            model.save_pretrained(directory)
        else:
            model.save_pretrained(directory, max_shard_size=max_shard_size)

    @classmethod
    def can_load(cls, directory: Path) -> bool:
        config = Path(directory) / "config.json"
        if not config.is_file():
            return False
        try:
            return json.loads(config.read_text()).get("model_type") in FAMILIES
        except (json.JSONDecodeError, AttributeError):
            return False

    @classmethod
    def load(cls, directory: Path, *, allow_pickle: bool = False) -> nn.Module:
        import transformers

        directory = Path(directory)
        try:
            raw = json.loads((directory / "config.json").read_text())
        except FileNotFoundError:
            raise SaveError(f"No config.json in {str(directory)!r}; it is not a transformers model folder.") from None
        if raw.get("auto_map"):
            raise SaveError(
                f"{str(directory)!r} needs custom code (auto_map in config.json); hf_clafusion never runs remote code. "
                "If you trust it, load it yourself with trust_remote_code=True and pass the model object."
            )
        safetensors = any(directory.glob("*.safetensors"))
        check_weight_files(directory)
        if not safetensors and not allow_pickle:
            raise SaveError(
                f"{str(directory)!r} holds no safetensors weights; pickle checkpoints can run arbitrary code when "
                "loaded. Convert them to safetensors, or pass allow_pickle=True if you trust the source."
            )
        architectures = raw.get("architectures") or []
        model_cls = getattr(transformers, architectures[0], None) if architectures else None
        if model_cls is None:
            model_cls = transformers.AutoModel
        model = model_cls.from_pretrained(directory, use_safetensors=safetensors, trust_remote_code=False)
        return model.eval()


__all__ = ["FAMILIES", "Family", "HeadLinear", "HeadNorm", "TransformersAdapter", "find_tokenizer"]
