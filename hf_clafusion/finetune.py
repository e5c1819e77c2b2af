"""``finetune``: a short training loop for fused models, driven by Accelerate.

This first version runs one process (CPU or one GPU, chosen by Accelerate from the environment) over
``(inputs, labels)`` tensors or a DataLoader of such pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from .adapters import get_adapter
from .config import FinetuneConfig
from .errors import CalibrationDataError, ConfigError
from .evaluation import evaluate


@dataclass
class FinetuneResult:
    """The finetuned model (same object as the input, trained in place) and per-epoch metrics."""

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)


def _loader(data: Any, batch_size: int, seed: int) -> DataLoader:
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        inputs, labels = data
        if inputs.shape[0] == 0:
            raise CalibrationDataError("The training data is empty.")
        if inputs.shape[0] != labels.shape[0]:
            raise CalibrationDataError(f"{inputs.shape[0]} training inputs but {labels.shape[0]} labels.")
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(TensorDataset(inputs, labels), batch_size=batch_size, shuffle=True, generator=generator)
    raise CalibrationDataError(
        f"Unsupported training data of type {type(data).__name__}: pass (inputs, labels) tensors or a DataLoader."
    )


def _optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    raise ConfigError(f"Unknown optimizer {config.optimizer!r}.", field="optimizer")


def _scheduler(optimizer, config: FinetuneConfig, steps_per_epoch: int):
    if config.scheduler == "multistep":
        milestones = [m * steps_per_epoch for m in config.milestones]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=config.gamma)
    if config.scheduler == "cosine":
        total = config.max_steps or config.epochs * steps_per_epoch
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
    return None


def finetune(
    model: nn.Module,
    train_data: Any,
    eval_data: Any = None,
    config: FinetuneConfig | None = None,
    **overrides: Any,
) -> FinetuneResult:
    """Train ``model`` in place with cross-entropy, through an :class:`accelerate.Accelerator`.

    Args:
        model: the (fused) model.
        train_data: ``(inputs, labels)`` tensors or a DataLoader of such pairs.
        eval_data: held-out data evaluated after each epoch (never the test split used for reporting).
        config: a :class:`FinetuneConfig` (SGD momentum 0.9 by default, as the paper); ``overrides`` replace fields.

    Returns:
        `FinetuneResult` with the model and one metrics dict per epoch (``train_loss``, and ``eval_accuracy`` /
        ``eval_loss`` when ``eval_data`` is given).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    config = config or FinetuneConfig()
    if overrides:
        config = config.replace(**overrides)
    set_seed(config.seed)
    adapter = get_adapter(model)
    accelerator = Accelerator()
    loader = _loader(train_data, config.batch_size, config.seed)
    optimizer = _optimizer(model, config)
    scheduler = _scheduler(optimizer, config, len(loader))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    history: list[dict[str, Any]] = []
    step = 0
    for epoch in range(config.epochs):
        model.train()
        running, seen = 0.0, 0
        bar = tqdm(
            loader,
            desc=f"finetune epoch {epoch + 1}/{config.epochs}",
            leave=False,
            disable=not (config.progress and accelerator.is_local_main_process),
        )
        for inputs, labels in bar:
            args, kwargs = adapter.model_inputs(inputs)
            loss = F.cross_entropy(adapter.logits(model(*args, **kwargs)), labels.long())
            optimizer.zero_grad()
            accelerator.backward(loss)
            if config.grad_clip is not None:
                accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            running += float(loss.detach()) * labels.shape[0]
            seen += labels.shape[0]
            step += 1
            if config.max_steps is not None and step >= config.max_steps:
                break
        record: dict[str, Any] = {"epoch": epoch + 1, "step": step, "train_loss": running / max(seen, 1)}
        model.eval()
        if eval_data is not None:
            row = evaluate([accelerator.unwrap_model(model)], eval_data, ensemble=False)[0]
            record.update(eval_accuracy=row.accuracy, eval_loss=row.loss)
        history.append(record)
        if config.max_steps is not None and step >= config.max_steps:
            break
    return FinetuneResult(accelerator.unwrap_model(model).eval(), history)


__all__ = ["FinetuneResult", "finetune"]
