"""``finetune``: train a (fused) model with Accelerate, optionally distilling from its parents.

The same code runs on one CPU, several CPU processes (gloo), one or many GPUs and several machines: start it
with ``python script.py`` or ``accelerate launch script.py``; the device comes from the environment (e.g.
``ACCELERATE_USE_CPU=1``), never from this module. Data are ``datasets`` splits (with the model's
preprocessing applied through the dataset's transform), ``(inputs, labels)`` tensors, or a DataLoader.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from ._data import _is_dataset, move_to
from .adapters import get_adapter
from .config import FinetuneConfig
from .errors import CalibrationDataError, ConfigError


STATE_FILE = "trainer_state.json"


@dataclass
class FinetuneResult:
    """The finetuned model (the input model, trained in place) and one metrics record per epoch."""

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | Sequence[torch.Tensor],
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """Knowledge-distillation loss ``alpha * T^2 * KL(p_teacher || p_student) + (1 - alpha) * CE(student, labels)``.

    ``p = softmax(logits / T)``; with several teachers (an ensemble of parents) ``p_teacher`` is the mean of
    their softmax outputs. The KL term is averaged over the batch (``reduction="batchmean"``). Note that the
    official CLAFusion scripts use ``nn.KLDivLoss()`` with its default ``reduction="mean"``, which also divides
    by the number of classes.

    Args:
        student_logits (`Tensor` of shape `(B, C)`).
        teacher_logits (`Tensor` of shape `(B, C)`, or a list of them).
        labels (`Tensor` of shape `(B,)`).
        alpha (`float`): weight of the distillation term, in [0, 1].
        temperature (`float`): softmax temperature ``T``.

    Returns:
        A scalar tensor.
    """
    teachers = [teacher_logits] if isinstance(teacher_logits, torch.Tensor) else list(teacher_logits)
    target = torch.stack([(t.float() / temperature).softmax(-1) for t in teachers]).mean(0)
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_student, target, reduction="batchmean")
    return alpha * temperature**2 * kl + (1.0 - alpha) * F.cross_entropy(student_logits.float(), labels.long())


# ------------------------------------------------------------------------------------------------- data


class _ColumnDataset(Dataset):
    """A ``datasets`` split as ``(inputs, label)`` items; the split's own transform does the preprocessing."""

    def __init__(self, split: Any, input_column: str | None, label_column: str):
        if label_column not in split.column_names:
            raise CalibrationDataError(
                f"The dataset has no label column {label_column!r} (columns: {split.column_names}). Set "
                "`label_column` in FinetuneConfig."
            )
        self.split, self.input_column, self.label_column = split, input_column, label_column

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        return _split_row(self.split[int(index)], self.input_column, self.label_column)

    def labels(self) -> torch.Tensor | None:
        try:  # the raw column, without the split's transform
            raw = self.split.select_columns([self.label_column]).with_format(None)
            return torch.as_tensor(raw[:][self.label_column])
        except Exception:
            return None


def _split_row(row: Mapping, input_column: str | None, label_column: str) -> tuple[Any, torch.Tensor]:
    """``{inputs..., label}`` -> ``(inputs, label)``: one input column gives a tensor, several a dict."""
    if label_column not in row:
        raise CalibrationDataError(f"A batch has no label column {label_column!r} (keys: {sorted(row)}).")
    names = [input_column] if input_column is not None else [k for k in row if k != label_column]
    missing = [n for n in names if n not in row]
    if missing or not names:
        raise CalibrationDataError(
            f"Input column(s) {missing or names} not found (keys: {sorted(row)}). Set `input_column` in FinetuneConfig."
        )
    values = {n: torch.as_tensor(row[n]) for n in names}
    return (values[names[0]] if len(names) == 1 else values), torch.as_tensor(row[label_column])


def _as_dataset(data: Any, config: FinetuneConfig, what: str) -> Dataset | DataLoader:
    if isinstance(data, DataLoader):
        return data
    if _is_dataset(data):
        dataset: Dataset = _ColumnDataset(data, config.input_column, config.label_column)
        labels = dataset.labels()
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        inputs, labels = data
        if inputs.shape[0] != labels.shape[0]:
            raise CalibrationDataError(f"The {what} data has {inputs.shape[0]} inputs but {labels.shape[0]} labels.")
        dataset = TensorDataset(inputs, labels)
    elif isinstance(data, Dataset):
        dataset, labels = data, None
    else:
        raise CalibrationDataError(
            f"Unsupported {what} data of type {type(data).__name__}: pass a datasets split, (inputs, labels) "
            "tensors, a torch Dataset of (inputs, label) items, or a DataLoader."
        )
    if len(dataset) == 0:
        raise CalibrationDataError(f"The {what} data is empty: the split has no rows.")
    if labels is not None and labels.numel() and int(labels.min()) < 0:
        raise CalibrationDataError(f"The {what} labels must be >= 0, got {int(labels.min())}.")
    dataset.max_label = None if labels is None else int(labels.max())  # type: ignore[attr-defined]
    return dataset


def _check_labels(labels: torch.Tensor, num_classes: int, what: str) -> None:
    if labels.numel() and (int(labels.max()) >= num_classes or int(labels.min()) < 0):
        raise CalibrationDataError(
            f"The {what} labels lie in [{int(labels.min())}, {int(labels.max())}] but the model has {num_classes} "
            f"outputs (classes 0-{num_classes - 1}). Check the label column or the model's classifier."
        )


def _loader(data: Dataset | DataLoader, batch_size: int, shuffle: bool) -> DataLoader:
    if isinstance(data, DataLoader):
        return data
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle)


# ------------------------------------------------------------------------------------------------- optimisation


def _optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    raise ConfigError(f"Unknown optimizer {config.optimizer!r}. Choose one of: 'sgd', 'adam', 'adamw'.")


def _scheduler(optimizer, config: FinetuneConfig, steps_per_epoch: int):
    if config.scheduler == "multistep":
        milestones = [m * steps_per_epoch for m in config.milestones]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=config.gamma)
    if config.scheduler == "cosine":
        total = config.max_steps or config.epochs * steps_per_epoch
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
    return None


def _batch(batch: Any, label_column: str) -> tuple[Any, torch.Tensor]:
    """A DataLoader batch as ``(inputs, labels)``: pairs pass through, dict batches are split on the label column."""
    if isinstance(batch, Mapping):
        return _split_row(batch, None, label_column)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise CalibrationDataError(
        f"Training batches must be (inputs, labels) pairs or dicts with a {label_column!r} key, got {type(batch).__name__}."
    )


def _inputs(adapter, inputs: Any) -> tuple[tuple, dict]:
    if isinstance(inputs, Mapping):
        return adapter.model_inputs(dict(inputs))
    return adapter.model_inputs(inputs)


# ------------------------------------------------------------------------------------------------- the loop


@torch.no_grad()
def _evaluate(model, loader, adapter, accelerator, label_column: str) -> dict[str, float]:
    """Accuracy and loss over the whole split, gathered across processes without duplicated samples."""
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for batch in loader:
        inputs, labels = _batch(batch, label_column)
        args, kwargs = _inputs(adapter, inputs)
        logits = adapter.logits(model(*args, **kwargs)).float()
        losses = F.cross_entropy(logits, labels.long(), reduction="none")
        preds, labels, losses = accelerator.gather_for_metrics((logits.argmax(-1), labels, losses))
        correct += int((preds == labels).sum())
        total += labels.numel()
        loss_sum += float(losses.sum())
    return {"eval_accuracy": correct / max(total, 1), "eval_loss": loss_sum / max(total, 1), "eval_samples": total}


def _latest_checkpoint(directory: Path) -> Path | None:
    candidates = [p for p in directory.glob("checkpoint-*") if (p / STATE_FILE).is_file()]
    return max(candidates, key=lambda p: json.loads((p / STATE_FILE).read_text())["global_step"], default=None)


def finetune(
    model: nn.Module,
    train_dataset: Any,
    eval_dataset: Any = None,
    config: FinetuneConfig | None = None,
    *,
    teacher: nn.Module | Sequence[nn.Module] | None = None,
    **overrides: Any,
) -> FinetuneResult:
    """Finetune ``model`` with cross-entropy (or knowledge distillation) through an ``accelerate.Accelerator``.

    Args:
        model: the (fused) model; trained in place.
        train_dataset: a ``datasets`` split (inputs from ``config.input_column`` or the non-label columns,
            labels from ``config.label_column``; apply preprocessing with ``split.set_transform``), ``(inputs,
            labels)`` tensors, a torch ``Dataset`` of ``(inputs, label)`` items, or a DataLoader.
        eval_dataset: a held-out split in the same forms, evaluated after each epoch (use a validation split:
            nothing here selects on the test set).
        config: a :class:`FinetuneConfig`; ``overrides`` replace some of its fields.
        teacher: one model or a list of models (e.g. the parents, as an ensemble) to distil from, with
            :func:`distillation_loss` (``config.distill_alpha``, ``config.distill_temperature``).

    Returns:
        `FinetuneResult`: the model and one record per epoch (``train_loss``, ``lr``, ``step``, and
        ``eval_accuracy`` / ``eval_loss`` / ``eval_samples`` with ``eval_dataset``), also logged to the
        configured Accelerate trackers.

    Raises:
        CalibrationDataError: empty split, missing label column, labels outside the model's classes.
        ConfigError: invalid configuration (unknown optimiser, unsupported mixed precision, ...).

    Example:
        ```py
        from hf_clafusion import FinetuneConfig, finetune

        out = finetune(result.model, train_split, val_split, FinetuneConfig(epochs=3, lr=0.01), teacher=parents)
        print(out.history[-1]["eval_accuracy"])
        ```
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    config = config or FinetuneConfig()
    if not isinstance(config, FinetuneConfig):
        raise ConfigError(f"`config` must be a FinetuneConfig, got {type(config).__name__}.")
    if overrides:
        config = config.replace(**overrides)
    adapter = get_adapter(model)
    train_data = _as_dataset(train_dataset, config, "training")
    eval_data = None if eval_dataset is None else _as_dataset(eval_dataset, config, "evaluation")
    teachers = [] if teacher is None else ([teacher] if isinstance(teacher, nn.Module) else list(teacher))

    set_seed(config.seed)
    _check_process_state()
    try:
        accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            log_with=list(config.log_with) or None,
            project_config=ProjectConfiguration(project_dir=config.project_dir or config.checkpoint_dir or "."),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        )
    except (ValueError, RuntimeError) as error:
        raise ConfigError(f"Accelerate cannot run this configuration: {error}") from None

    train_loader = _loader(train_data, config.batch_size, shuffle=True)
    eval_loader = None if eval_data is None else _loader(eval_data, config.eval_batch_size or config.batch_size, False)
    num_classes = _num_classes(model, adapter, train_loader, config.label_column)
    for data, what in ((train_data, "training"), (eval_data, "evaluation")):
        if getattr(data, "max_label", None) is not None:
            _check_labels(torch.tensor([0, data.max_label]), num_classes, what)
    check_batches = getattr(train_data, "max_label", None) is None  # labels not known up front: check each batch

    optimizer = _optimizer(model, config)
    steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    scheduler = _scheduler(optimizer, config, steps_per_epoch)
    prepared = accelerator.prepare(model, optimizer, train_loader, *([scheduler] if scheduler else []))
    model, optimizer, train_loader = prepared[:3]
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    teachers = [t.to(accelerator.device).eval() for t in teachers]
    if config.log_with:
        accelerator.init_trackers("hf_clafusion", config={k: str(v) for k, v in config.to_dict().items()})

    state = {"epoch": 0, "batch_in_epoch": 0, "global_step": 0, "history": []}
    if config.resume_from is not None:
        state = _resume(accelerator, config)
    history: list[dict[str, Any]] = state["history"]
    global_step = state["global_step"]

    for epoch in range(state["epoch"], config.epochs):
        model.train()
        train_loader.set_epoch(epoch)
        skip = state["batch_in_epoch"] if epoch == state["epoch"] else 0
        batches = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        loss_sum = torch.zeros((), device=accelerator.device)
        seen = torch.zeros((), device=accelerator.device)
        bar = tqdm(
            batches,
            desc=f"finetune epoch {epoch + 1}/{config.epochs}",
            leave=False,
            initial=skip,
            total=len(train_loader),
            disable=not (config.progress and accelerator.is_local_main_process),
        )
        batch_index = skip
        stop = False
        for batch in bar:
            inputs, labels = _batch(batch, config.label_column)
            batch_index += 1
            if check_batches:
                _check_labels(labels, num_classes, "training")
            with accelerator.accumulate(model):
                args, kwargs = _inputs(adapter, inputs)
                logits = adapter.logits(model(*args, **kwargs))
                if teachers:
                    with torch.no_grad():
                        teacher_logits = [adapter.logits(t(*args, **kwargs)) for t in teachers]
                    loss = distillation_loss(
                        logits,
                        teacher_logits,
                        labels,
                        alpha=config.distill_alpha,
                        temperature=config.distill_temperature,
                    )
                else:
                    loss = F.cross_entropy(logits.float(), labels.long())
                accelerator.backward(loss)
                if config.grad_clip is not None and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                if scheduler is not None and accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            loss_sum += loss.detach().float() * labels.shape[0]
            seen += labels.shape[0]
            if accelerator.sync_gradients:
                global_step += 1
                if config.checkpoint_steps and global_step % config.checkpoint_steps == 0:
                    _save_checkpoint(accelerator, config, epoch, batch_index, global_step, history)
                if config.max_steps is not None and global_step >= config.max_steps:
                    stop = True
                    break
        totals = accelerator.reduce(torch.stack([loss_sum, seen]), reduction="sum")
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": global_step,
            "train_loss": float(totals[0] / totals[1].clamp_min(1)),
            "lr": optimizer.param_groups[0]["lr"],
        }
        if eval_loader is not None:
            record.update(_evaluate(model, eval_loader, adapter, accelerator, config.label_column))
        history.append(record)
        if config.log_with:
            accelerator.log({k: v for k, v in record.items() if k != "epoch"}, step=global_step)
        if config.checkpoint_dir is not None:
            finished = not stop or batch_index >= len(train_loader)
            _save_checkpoint(
                accelerator,
                config,
                epoch + 1 if finished else epoch,
                0 if finished else batch_index,
                global_step,
                history,
            )
        if stop:
            break
    if config.log_with:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return FinetuneResult(accelerator.unwrap_model(model).eval(), history)


def _check_process_state() -> None:
    """Refuse to train alone when the launcher started several processes but the state was set up without them."""
    import os

    from accelerate import PartialState
    from accelerate.utils import DistributedType

    world = int(os.environ.get("WORLD_SIZE", "1"))
    shared = PartialState._shared_state
    if world > 1 and shared and shared.get("distributed_type") == DistributedType.NO:
        raise ConfigError(
            f"The launcher started {world} processes, but Accelerate's process state was created before finetune() "
            "without distribution (a bare PartialState() ignores ACCELERATE_USE_CPU). Create it after finetune(), "
            "or as PartialState(cpu=True) on CPUs."
        )


def _num_classes(model: nn.Module, adapter, loader: DataLoader, label_column: str) -> int:
    inputs, _ = _batch(next(iter(loader)), label_column)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        args, kwargs = _inputs(adapter, move_to(inputs, device))
        num = int(adapter.logits(model(*args, **kwargs)).shape[-1])
    model.train(was_training)
    return num


def _save_checkpoint(accelerator, config: FinetuneConfig, epoch: int, batch: int, step: int, history: list) -> None:
    folder = Path(config.checkpoint_dir) / f"checkpoint-{step:08d}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        state = {"epoch": epoch, "batch_in_epoch": batch, "global_step": step, "history": history}
        (folder / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    accelerator.wait_for_everyone()


def _resume(accelerator, config: FinetuneConfig) -> dict[str, Any]:
    if config.resume_from == "latest":
        folder = _latest_checkpoint(Path(config.checkpoint_dir))
        if folder is None:
            raise ConfigError(f"resume_from='latest' but {config.checkpoint_dir!r} holds no checkpoint yet.")
    else:
        folder = Path(config.resume_from)
    if not (folder / STATE_FILE).is_file():
        raise ConfigError(
            f"Cannot resume from {str(folder)!r}: it is not a finetune checkpoint ({STATE_FILE} missing)."
        )
    accelerator.load_state(str(folder))
    return json.loads((folder / STATE_FILE).read_text())


__all__ = ["FinetuneResult", "distillation_loss", "finetune"]
