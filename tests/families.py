"""One tiny-model factory per model family, for the conformance suite (tests/test_conformance.py).

A family gets the whole suite (fuse, align, evaluate and finetune with every data form, save/load, identity
insertion, permuted copies) by adding one :class:`Factory` to :data:`FACTORIES`. Models are tiny (hidden <= 32,
two layers against one in the aligned stage; the timm VGG has the stock widths, the only ones its adapter takes)
and random: the checks are invariants, not accuracies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._models import cnn, mlp


NUM_SAMPLES = 16
VOCAB = 96


@dataclass(frozen=True)
class Factory:
    """How to build a deep and a shallow model of one family, and data for them.

    Attributes:
        name: the family's name in test ids.
        adapter: the registered adapter name (``hf_clafusion.list_adapters()``) that handles the models.
        build: ``build(deep, seed)`` -> a model; ``deep=True`` gives the deeper of the pair.
        inputs: ``inputs(n, seed)`` -> the model's keyword inputs, ``{name: (n, ...) tensor}``; the first entry is
            the main input (what a bare tensor means).
        num_classes: the number of outputs (labels lie in ``[0, num_classes)``).
        exact_identity: whether inserted identity layers are exact (False: post-LN transformers fit one).
        module: the module whose import the family needs (the test is skipped without it).
    """

    name: str
    adapter: str
    build: Callable[[bool, int], nn.Module]
    inputs: Callable[[int, int], dict[str, torch.Tensor]]
    num_classes: int
    exact_identity: bool = True
    module: str | None = None

    def deep(self, seed: int = 0) -> nn.Module:
        return self.build(True, seed).eval()

    def shallow(self, seed: int = 1) -> nn.Module:
        return self.build(False, seed).eval()

    def batch(self, n: int = NUM_SAMPLES, seed: int = 0) -> dict[str, torch.Tensor]:
        """Calibration inputs as keyword tensors (always a dict, so every family is called the same way)."""
        return self.inputs(n, seed)

    def labels(self, n: int = NUM_SAMPLES, seed: int = 0) -> torch.Tensor:
        return torch.randint(0, self.num_classes, (n,), generator=torch.Generator().manual_seed(seed + 50))


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits on keyword inputs, without going through the library."""
    with torch.no_grad():
        out = model(**batch)
    return out if isinstance(out, torch.Tensor) else out.logits


def labelled_forms(factory: Factory, n: int = NUM_SAMPLES, batch_size: int = 8) -> dict[str, Any]:
    """The same ``n`` labelled samples in every data form that ``evaluate`` and ``finetune`` accept.

    ``tensors``: ``(main input, labels)``; ``dict``: ``({name: tensor}, labels)``; ``pairs_loader``: a DataLoader
    of ``(main input, labels)`` batches; ``dicts_loader``: a DataLoader of dicts with a ``labels`` key;
    ``dataset``: a ``datasets.Dataset`` with the input columns and ``label``.
    """
    from torch.utils.data import DataLoader, TensorDataset

    batch, labels = factory.batch(n), factory.labels(n)
    main = next(iter(batch.values()))
    rows = [{**{k: v[i] for k, v in batch.items()}, "labels": labels[i]} for i in range(n)]
    forms: dict[str, Any] = {
        "tensors": (main, labels),
        "dict": (batch, labels),
        "pairs_loader": DataLoader(TensorDataset(main, labels), batch_size=batch_size),
        "dicts_loader": DataLoader(rows, batch_size=batch_size),
    }
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a test dependency
        return forms
    forms["dataset"] = datasets.Dataset.from_dict(
        {**{k: v.numpy() for k, v in batch.items()}, "label": labels.numpy()}
    ).with_format("torch")
    return forms


FORMS = ("tensors", "dict", "pairs_loader", "dicts_loader", "dataset")


# --------------------------------------------------------------------------------------------- plain torch


def _mlp(deep: bool, seed: int) -> nn.Module:
    return mlp(8, [16, 16] if deep else [16], 4, seed=seed)


def _cnn(deep: bool, seed: int) -> nn.Module:
    return cnn([8, 8, "M", 8, "M"] if deep else [8, "M", 8, "M"], 4, seed=seed)


def _vector(n: int, seed: int) -> dict[str, torch.Tensor]:
    return {"input": torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))}


def _gray_image(size: int, name: str = "input") -> Callable[[int, int], dict[str, torch.Tensor]]:
    def inputs(n: int, seed: int) -> dict[str, torch.Tensor]:
        return {name: torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))}

    return inputs


# --------------------------------------------------------------------------------------------- timm


def _timm_resnet(deep: bool, seed: int) -> nn.Module:
    from .test_timm import resnet

    return resnet([2 if deep else 1, 1, 1, 1], channels=(8, 16, 16, 16), seed=seed, num_classes=4)


def _timm_vit(deep: bool, seed: int) -> nn.Module:
    from .test_timm import vit

    return vit(2 if deep else 1, seed=seed, num_classes=4)


def _timm_convnext(deep: bool, seed: int) -> nn.Module:
    from .test_timm import convnext

    return convnext((2 if deep else 1, 1, 1, 1), seed=seed, num_classes=4)


def _timm_vgg(deep: bool, seed: int) -> nn.Module:
    """A stock timm VGG (the adapter fuses only those: widths 64-512) with an 8-unit pre-logits MLP.

    BatchNorm statistics are those of the input distribution (random ones make the logits input-independent in
    so deep a random network), with random affine parameters.
    """
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(
        "vgg13_bn" if deep else "vgg11_bn", pretrained=False, num_classes=4, in_chans=1, mlp_ratio=8 / 4096
    )
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a cumulative average: one batch sets the statistics
            m.weight.data.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))
    with torch.no_grad():
        model.train()(torch.rand(32, 1, 32, 32, generator=g))
    return model.eval()


# --------------------------------------------------------------------------------------------- transformers


def _transformers(family: str, cls: str, **kw) -> Callable[[bool, int], nn.Module]:
    def build(deep: bool, seed: int) -> nn.Module:
        from .test_transformers import make

        return make(family, 2 if deep else 1, seed=seed, cls=cls, num_labels=4, **kw)

    return build


def _tokens(n: int, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (n, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _pixels(n: int, seed: int) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))}


FACTORIES: tuple[Factory, ...] = (
    Factory("mlp", "torch.sequential", _mlp, _vector, 4),
    Factory("vgg-cnn", "torch.sequential", _cnn, _gray_image(8), 4),
    Factory("timm-resnet", "timm", _timm_resnet, _gray_image(16, "x"), 4, module="timm"),
    Factory("timm-vit", "timm", _timm_vit, _gray_image(16, "x"), 4, module="timm"),
    Factory("timm-convnext", "timm", _timm_convnext, _gray_image(32, "x"), 4, module="timm"),
    Factory("timm-vgg", "timm", _timm_vgg, _gray_image(32, "x"), 4, module="timm"),
    Factory(
        "bert",
        "transformers",
        _transformers("bert", "BertForSequenceClassification"),
        _tokens,
        4,
        exact_identity=False,
        module="transformers",
    ),
    Factory(
        "gpt2",
        "transformers",
        _transformers("gpt2", "GPT2ForSequenceClassification", pad_token_id=0),
        _tokens,
        4,
        module="transformers",
    ),
    Factory(
        "llama-gqa",
        "transformers",
        _transformers("llama", "LlamaForSequenceClassification"),
        _tokens,
        4,
        module="transformers",
    ),
    Factory(
        "hf-vit",
        "transformers",
        _transformers("vit", "ViTForImageClassification"),
        _pixels,
        4,
        module="transformers",
    ),
)
