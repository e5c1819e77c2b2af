"""Model-family adapters. ``torch.sequential`` is always available."""

from . import timm as _timm  # noqa: F401  (registers the timm adapter; imports timm lazily)
from . import torch as _torch  # noqa: F401  (registers the Sequential adapter)
from . import transformers as _transformers  # noqa: F401  (registers the transformers adapter; lazy imports)
from .base import Adapter, capture_outputs, get_adapter, list_adapters, register_adapter, reset_batchnorm_stats


__all__ = ["Adapter", "capture_outputs", "get_adapter", "list_adapters", "register_adapter", "reset_batchnorm_stats"]
