"""The adapter protocol and the machinery shared by every adapter (registry, hooks, BatchNorm reset).

An adapter is the only place that knows a model family's internals. It turns a model into a
:class:`~hf_clafusion.spec.NetworkSpec`, builds depth-balanced copies (identity layers or merged layers), and
saves/loads models in the family's own format. Register one with :func:`register_adapter`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError
from ..spec import NetworkSpec


@dataclass(frozen=True)
class UnmatchedBlocks:
    """The blocks a depth-balanced model received by identity insertion, for the closed form of
    ``fusion_math.md`` §6.4 (fused block = the anchor's block, residual writers scaled by the anchor's weight).

    Attributes:
        groups: names of the balanced model's alignment groups inside inserted blocks: no statistics, no plan.
        params: state-dict keys of the balanced model inside inserted blocks: replaced by the anchor's tensors.
        writers: the subset of ``params`` that write the residual stream (zero in an identity block).
        captures: balanced-model capture -> the capture in the model *before* balancing that observes the same
            activations (an inserted block's output is its input stream), so statistics need no forward pass
            through inserted blocks: every group capture outside ``groups``, and every repair point capture
            outside inserted blocks (``repair="repair"`` reads those).
    """

    groups: frozenset[str] = frozenset()
    params: frozenset[str] = frozenset()
    writers: frozenset[str] = frozenset()
    captures: Mapping[str, str] = field(default_factory=dict)


class Adapter(ABC):
    """Base class of model-family adapters.

    Subclasses set ``name`` and implement the abstract methods. Every method that builds a model returns a
    new module; the user's models are never modified.
    """

    name: ClassVar[str]
    #: Whether ``FusionConfig(repair="auto")`` considers REPAIR for this family (its spec has repair points and
    #: the correction was measured to help). ``repair="repair"`` runs it either way.
    auto_repair: ClassVar[bool] = True

    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter handles ``model``."""

    @abstractmethod
    def prepare(self, model: nn.Module) -> nn.Module:
        """A canonical copy of ``model`` (eval mode) whose parameter names the spec refers to.

        The copy may share tensor storage with ``model`` (:func:`copy_sharing_storage`): the pipeline replaces a
        prepared model's tensors but never writes into them, so ``model`` is left as it was.
        """

    @abstractmethod
    def spec(self, model: nn.Module) -> NetworkSpec:
        """The network description of a prepared model."""

    @abstractmethod
    def insert_identity(
        self,
        model: nn.Module,
        layouts: Sequence[Sequence[int | None]],
        template: nn.Module,
        *,
        batches: Sequence[Any] | None = None,
    ) -> tuple[nn.Module, dict[str, float]]:
        """Balance depth: a copy of ``model`` whose segment ``s`` has ``len(layouts[s])`` layers.

        ``layouts[s][p]`` is the index (within the segment) of the model's own layer placed at position ``p``,
        or ``None`` for an inserted identity layer shaped like ``template``'s layer at that position
        (``template`` is the deeper model). The new model computes the same function as ``model``. Families
        without an exact identity (post-LN transformers) fit an approximate one on ``batches`` (the
        calibration batches) and measure it there.

        Returns:
            The new model and its identity errors: ``{"<segment>.<position>": relative error}`` of every
            *approximate* identity block inserted, empty when every inserted block is exact.
        """

    def unmatched_blocks(
        self, model: nn.Module, layouts: Sequence[Sequence[int | None]], balanced: NetworkSpec
    ) -> UnmatchedBlocks | None:
        """Where :meth:`insert_identity` with these ``layouts`` puts identity blocks into ``model``, for the closed
        form of unmatched blocks; ``None`` (the default) when the family has none, and the pipeline then averages
        the explicit identity blocks. Adapters that return a value accept ``insert_identity(..., fit=False)``
        (skip fitting approximate identities: the closed form never reads the inserted blocks' weights).

        Args:
            model: the prepared model before balancing.
            layouts: as for :meth:`insert_identity`.
            balanced: the spec of the balanced model.
        """
        return None

    def check_compatible(self, models: Sequence[nn.Module]) -> None:
        """Refuse (``IncompatibleModelsError``) prepared models of this family that cannot be fused together.

        The pipeline already compares output sizes, input sizes and segment counts; adapters add what only
        they know (vocabularies, label sets, norm types, head layouts).
        """
        return None

    # -- I/O: how data reaches the model. Everything is read from the arguments; nothing is kept on ``self``.

    def prepare_data(self, data: Any, models: Sequence[nn.Module], processor: Any = None, config: Any = None) -> Any:
        """Turn data as users have it (raw images, raw text) into model inputs, before the data layer.

        Called with the models' own data (``hf_clafusion.data`` then reads the result: docs/data.md lists the
        forms). ``processor`` is a tokenizer / image processor / transform given by the user, ``config`` the
        :class:`~hf_clafusion.FusionConfig` (``input_column``, ``max_length``, ``num_samples``, ``seed``) or None.
        The default returns ``data`` unchanged.
        """
        return data

    def features(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        """A captured activation as ``(samples, channels)`` for neuron transport (positions/tokens are samples).

        ``batch`` is the batch the model ran on (a tensor or a dict, e.g. with an ``attention_mask`` that tells
        padding apart).
        """
        from ..core import channels_as_features

        return channels_as_features(output)

    def layer_features(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        """A captured layer output for cross-layer costs: ``(samples, ...)``, flattened per sample by the costs."""
        return output

    @classmethod
    def load_reference(cls, reference: str) -> nn.Module | None:
        """Load a parent named by a family-specific string (``"hf-hub:..."``, a model name), or return None."""
        return None

    @classmethod
    def can_load(cls, directory: Path) -> bool:
        """Whether ``directory`` holds a model in this family's own format (read by :meth:`load`)."""
        return False

    def merge_layers(
        self,
        model: nn.Module,
        keep: Sequence[Sequence[int]],
        preactivations: dict[str, torch.Tensor],
        relu_approx: str,
    ) -> nn.Module:
        """Reduce depth: keep the listed layers of each segment and merge the others into their successor."""
        raise UnsupportedArchitectureError(
            f"balancing='merge' is not supported for {self.name} models. Use balancing='identity'."
        )

    @abstractmethod
    def save(self, model: nn.Module, directory: Path) -> None:
        """Write the model into ``directory`` (which exists and is empty) in the family's own format."""

    @classmethod
    @abstractmethod
    def load(cls, directory: Path, *, allow_pickle: bool = False) -> nn.Module:
        """Load a model written by :meth:`save`; pickle checkpoints only with ``allow_pickle=True``."""

    def model_inputs(self, model: nn.Module, batch: Any) -> tuple[tuple, dict]:
        """Positional and keyword arguments to call ``model`` on one batch of inputs (no labels).

        Args:
            model: the model that will run (what it takes is read from it, never remembered from an earlier
                call; a DDP wrapper is looked through).
            batch: a tensor ``(B, ...)`` or a dict of tensors, as the data layer gives it (docs/data.md).

        Returns:
            ``(args, kwargs)`` for ``model(*args, **kwargs)``. Default: a dict is passed as keyword arguments,
            anything else as the single positional argument.
        """
        if isinstance(batch, dict):
            return (), dict(batch)
        return (batch,), {}

    def predicts(self, model: nn.Module) -> bool:
        """Whether ``model`` (prepared) ends in a prediction head whose outputs mean the same in every parent (class
        or token logits), so that the parents' outputs average into an ensemble's; ``FusionConfig(alignment="auto")``
        compares candidate fused models with that ensemble. Default: True (the output layer is never permuted, so
        its units are the same in every parent). A family with headless models (hidden states, pooled features:
        each parent's in its own neuron basis) returns False for them."""
        return True

    def next_token(self, model: nn.Module) -> bool:
        """Whether ``model`` predicts the *next* token at each position (a causal language model). Its token labels
        (``input_ids``) are then scored shifted by one, as the model's own loss does: position ``t``'s logits
        against the label at ``t + 1``. Default: False (each position's label is scored at that position, as for
        token classification and masked language models)."""
        return False

    def logits(self, output: Any) -> torch.Tensor:
        """The logits tensor ``(B, C)`` (or ``(B, T, C)``) from a model output."""
        if isinstance(output, torch.Tensor):
            return output
        if hasattr(output, "logits"):
            return output.logits
        if isinstance(output, (tuple, list)):
            return output[0]
        raise TypeError(f"Cannot find logits in a model output of type {type(output).__name__}.")


_REGISTRY: dict[str, type[Adapter]] = {}
_PRIORITY: dict[str, int] = {}

#: What :func:`find_loader` returns: call it (``loader(allow_pickle=...)``) to get the model.
Loader = Callable[..., nn.Module]


def register_adapter(name: str, *, priority: int = 0) -> Callable[[type[Adapter]], type[Adapter]]:
    """Class decorator that registers an adapter under ``name``. Names are unique (``KeyError`` otherwise).

    Adapters are tried (by :func:`get_adapter` and :func:`find_loader`) from the highest ``priority`` to the
    lowest, and in name order among equal priorities, whatever order their modules are imported in. The built-in
    adapters (``timm``, ``torch.sequential``, ``transformers``) have priority 0 and accept disjoint models and
    folders; give a third-party adapter a priority above 0 to take precedence over them for the models both
    accept.

    Example:
        ```py
        from hf_clafusion import register_adapter
        from hf_clafusion.adapters import Adapter

        @register_adapter("my_family", priority=10)
        class MyAdapter(Adapter):
            ...
        ```
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"Adapter names must be non-empty strings, got {name!r}.")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"Adapter priorities must be integers, got {priority!r} for {name!r}.")

    def decorator(cls: type[Adapter]) -> type[Adapter]:
        if name in _REGISTRY:
            raise KeyError(f"An adapter named {name!r} is already registered ({_REGISTRY[name].__qualname__}).")
        cls.name = name
        _REGISTRY[name] = cls
        _PRIORITY[name] = priority
        return cls

    return decorator


def _in_precedence_order() -> list[type[Adapter]]:
    return [_REGISTRY[name] for name in sorted(_REGISTRY, key=lambda name: (-_PRIORITY[name], name))]


def list_adapters() -> list[str]:
    """Names of the registered adapters, in the order they are tried (see :func:`register_adapter`)."""
    return [cls.name for cls in _in_precedence_order()]


def get_adapter(model: nn.Module) -> Adapter:
    """The first adapter, in precedence order, whose ``matches(model)`` is true.

    Raises:
        UnsupportedArchitectureError: no adapter handles the model.
    """
    for cls in _in_precedence_order():
        if cls.matches(model):
            return cls()
    names = tuple(list_adapters())
    raise UnsupportedArchitectureError(
        f"No adapter for a model of type {type(model).__name__!r}. Supported: {', '.join(names)} "
        "(plain nn.Sequential MLPs and VGG-style CNNs). See docs/adding_an_architecture.md.",
        layer_type=type(model).__name__,
        supported=names,
    )


def find_loader(path_or_reference: str | os.PathLike) -> Loader | None:
    """What loads a model folder or a family-specific model reference, or None when no adapter knows it.

    Adapters are asked in precedence order (see :func:`register_adapter`):

    - an existing folder: the first adapter whose :meth:`Adapter.can_load` accepts it; the loader is its
      :meth:`Adapter.load` bound to the folder, called as ``loader(allow_pickle=...)``.
    - any other string: the first adapter whose :meth:`Adapter.load_reference` recognises it (timm:
      ``"hf-hub:..."``, ``"local-dir:..."``). ``load_reference`` loads the model as it recognises the
      reference, so the loader returns that model (and ignores ``allow_pickle``).

    A Hub repository id that no adapter recognises gives None: download it first
    (:func:`hf_clafusion.hub.load_pretrained` does).

    Example:
        ```py
        from hf_clafusion.adapters import find_loader

        loader = find_loader("./mlp-deep")
        model = loader() if loader is not None else None
        ```
    """
    if not isinstance(path_or_reference, (str, os.PathLike)):
        raise TypeError(f"find_loader takes a folder path or a reference string, got {type(path_or_reference)}.")
    folder = Path(path_or_reference).expanduser()
    if folder.is_dir():
        for cls in _in_precedence_order():
            if cls.can_load(folder):
                return functools.partial(cls.load, folder)
        return None
    for cls in _in_precedence_order():
        model = cls.load_reference(str(path_or_reference))
        if model is not None:
            return lambda *, allow_pickle=False, _model=model: _model
    return None


def adapter_class(name: str) -> type[Adapter]:
    """The adapter class registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        names = tuple(list_adapters())
        raise UnsupportedArchitectureError(
            f"No adapter named {name!r}. Registered: {', '.join(names)}.", supported=names
        ) from None


_CAPTURE = re.compile(r"^(?P<module>[^:\[]*)(?::(?P<kind>input|output))?(?:\[(?P<start>\d+):(?P<stop>\d+)\])?$")


def copy_sharing_storage(model: nn.Module, *, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are new tensor objects on the same storage.

    The module tree (submodules, config objects, hooks' owners) is copied, so changing the copy's mode, moving
    it with ``.to(device)`` or replacing its tensors never touches ``model``; only writing *into* the copy's
    tensors in place would. Tied parameters stay tied. With ``dtype``, floating-point tensors of another dtype
    are converted (one new tensor each, as ``.to(dtype)`` on a deep copy gives, without the deep copy).

    Args:
        model: the module to copy.
        dtype: the floating-point dtype of the copy's floating tensors; ``None`` keeps every dtype.
    """

    def alias(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            return tensor.to(dtype)
        return tensor

    memo: dict[int, Any] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(alias(param), requires_grad=param.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = alias(buffer)
    return copy.deepcopy(model, memo)


def parse_capture(capture: str) -> tuple[str, str, slice | None]:
    """``"name[:input|:output][[a:b]]"`` -> ``(module name, "input" | "output", channel slice or None)``."""
    match = _CAPTURE.match(capture)
    if match is None:
        raise KeyError(f"Malformed capture {capture!r}; use 'module', 'module:input' or 'module[a:b]'.")
    start, stop = match["start"], match["stop"]
    return match["module"], match["kind"] or "output", None if start is None else slice(int(start), int(stop))


def _first_tensor(value: Any) -> torch.Tensor:
    while isinstance(value, (tuple, list)):
        value = value[0]
    if hasattr(value, "last_hidden_state") and not isinstance(value, torch.Tensor):
        value = value.last_hidden_state
    return value.detach()


def _slice_channels(tensor: torch.Tensor, channels: slice | None) -> torch.Tensor:
    if channels is None:
        return tensor
    return tensor[:, channels] if tensor.ndim == 4 else tensor[..., channels]


@contextlib.contextmanager
def capture_outputs(
    model: nn.Module,
    names: Sequence[str],
    on_capture: Callable[[str, torch.Tensor], None] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Record activations of the named submodules during forward passes inside the ``with`` block.

    Each name is a capture (see :class:`~hf_clafusion.spec.Group`): a module's output (the first tensor of a
    tuple output), ``"module:input"`` for its first positional input, optionally with a ``"[a:b]"`` channel
    slice. The dictionary maps each capture to its latest value (detached). Values are copies taken inside the
    hook, so an in-place operation after the hooked module (``nn.ReLU(inplace=True)``, ``x += shortcut``) cannot
    change what was captured. Hooks are always removed.

    With ``on_capture``, each value is handed to ``on_capture(name, value)`` as soon as it is taken, and the
    dictionary stays empty: a consumer that reduces captures as they come keeps one alive at a time.
    """
    modules = dict(model.named_modules())
    parsed = {name: parse_capture(name) for name in dict.fromkeys(names)}
    missing = [n for n, (module, _, _) in parsed.items() if module not in modules]
    if missing:
        raise KeyError(f"Modules not found in the model: {missing}.")
    store: dict[str, torch.Tensor] = {}
    keep = store.__setitem__ if on_capture is None else on_capture
    handles = []
    for name, (module, kind, channels) in parsed.items():
        if kind == "input":

            def pre_hook(_module, inputs, _name=name, _channels=channels):
                keep(_name, _slice_channels(_first_tensor(inputs), _channels).clone())

            handles.append(modules[module].register_forward_pre_hook(pre_hook))
        else:

            def hook(_module, _inputs, output, _name=name, _channels=channels):
                keep(_name, _slice_channels(_first_tensor(output), _channels).clone())

            handles.append(modules[module].register_forward_hook(hook))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def reset_batchnorm_stats(
    model: nn.Module, batches: Sequence[Any], adapter: Adapter, keep: Sequence[nn.Module] = ()
) -> bool:
    """Recompute every BatchNorm's running statistics on ``batches`` (cumulative average, no momentum).

    Only the BatchNorm modules are put in train mode (dropout stays off); those in ``keep`` stay as they are.
    Returns whether any BatchNorm was recomputed.
    """
    kept = {id(m) for m in keep}
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in kept]
    if not norms:
        return False
    saved = [(m, m.momentum, m.training) for m in norms]
    was_training = model.training
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for batch in batches:
            args, kwargs = adapter.model_inputs(model, batch)
            model(*args, **kwargs)
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)
        model.train(was_training)
    return True


__all__ = [
    "Adapter",
    "Loader",
    "UnmatchedBlocks",
    "adapter_class",
    "capture_outputs",
    "copy_sharing_storage",
    "find_loader",
    "get_adapter",
    "list_adapters",
    "parse_capture",
    "register_adapter",
    "reset_batchnorm_stats",
]
