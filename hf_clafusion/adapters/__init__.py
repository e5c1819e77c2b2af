"""Model-family adapters. ``torch.sequential`` is always available.

Importing this package registers the built-in adapters (``timm``, ``torch.sequential``, ``transformers``; timm
and transformers are imported lazily, when a model of theirs is handled). Which adapter handles a model or a
folder does not depend on this import order: see :func:`register_adapter` for the precedence rule.
"""

from . import timm, torch, transformers  # noqa: F401  (each module registers its adapter)
from .base import (
    Adapter,
    Loader,
    capture_outputs,
    find_loader,
    get_adapter,
    list_adapters,
    register_adapter,
    reset_batchnorm_stats,
)


__all__ = [
    "Adapter",
    "Loader",
    "capture_outputs",
    "find_loader",
    "get_adapter",
    "list_adapters",
    "register_adapter",
    "reset_batchnorm_stats",
]
