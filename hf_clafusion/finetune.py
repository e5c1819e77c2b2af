"""``finetune``: train a (fused) model with Accelerate, optionally distilling from its parents.

The same code runs on one CPU, several CPU processes (gloo), one or many GPUs and several machines: start it
with ``python script.py`` or ``accelerate launch script.py``; the device comes from the environment (e.g.
``ACCELERATE_USE_CPU=1``), never from this module. Data come in any labelled form of docs/data.md (read by
:mod:`hf_clafusion.data`): ``datasets`` splits (preprocessing through the split's transform), ``(inputs, labels)``,
a torch Dataset, or a DataLoader of pairs or labelled dicts.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .adapters import get_adapter
from .config import FinetuneConfig
from .data import (
    LabelledData,
    check_input_dtype,
    check_labels,
    labelled_dataset,
    move_to,
    scored,
    split_batch,
    wrong_inputs_error,
)
from .errors import ClaFusionWarning, ConfigError, TrainingDivergedError


STATE_FILE = "trainer_state.json"
#: With ``keep_best``, a checkpoint's copy of the weights of the best evaluation so far.
BEST_FILE = "best_model.safetensors"


@dataclass
class FinetuneResult:
    """The finetuned model (the input model, trained in place) and one metrics record per epoch.

    ``initial_evaluation`` is the evaluation of the model before training (with an ``eval_dataset``; a resumed run
    reads it from its checkpoint), the reference of the accuracy-drop warning. ``kept_epoch`` is the epoch whose
    weights the model holds: the last one, or with ``keep_best`` the one with the best evaluation accuracy (0: the
    model before training).
    """

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    initial_evaluation: dict[str, float] | None = None
    kept_epoch: int | None = None


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | Sequence[torch.Tensor],
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    scaling: str = "batchmean",
) -> torch.Tensor:
    """Knowledge-distillation loss ``alpha * T^2 * KL(p_teacher || p_student) + (1 - alpha) * CE(student, labels)``.

    ``p = softmax(logits / T)``. Two scalings of the KL term:

    - ``"batchmean"`` (default): summed over the ``C`` classes and averaged over the batch
      (``F.kl_div(..., reduction="batchmean")``, the true KL divergence per sample); with several teachers (an
      ensemble of parents) ``p_teacher`` is the mean of their softmax outputs.
    - ``"official"``: the official CLAFusion scripts' ``nn.KLDivLoss()`` (``reduction="mean"``), which also
      divides by ``C``, with the teachers' *logits* averaged before the softmax. The same ``T`` is then ``C``
      times weaker, which is why their ``T = 20`` trains there but diverges with ``"batchmean"``.

    Args:
        student_logits (`Tensor` of shape `(B, C)`).
        teacher_logits (`Tensor` of shape `(B, C)`, or a list of them).
        labels (`Tensor` of shape `(B,)`).
        alpha (`float`): weight of the distillation term, in [0, 1].
        temperature (`float`): softmax temperature ``T``.
        scaling (`str`): ``"batchmean"`` or ``"official"``.

    Returns:
        A scalar tensor.

    Reference:
        Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015 (the ``T^2`` factor).
    """
    teachers = [teacher_logits] if isinstance(teacher_logits, torch.Tensor) else list(teacher_logits)
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if scaling == "official":
        target = (torch.stack([t.float() for t in teachers]).mean(0) / temperature).softmax(-1)
        kl = F.kl_div(log_student, target, reduction="sum") / target.numel()  # KLDivLoss(reduction="mean")
    elif scaling == "batchmean":
        target = torch.stack([(t.float() / temperature).softmax(-1) for t in teachers]).mean(0)
        kl = F.kl_div(log_student, target, reduction="batchmean")
    else:
        raise ConfigError(
            f"Invalid distillation `scaling`: {scaling!r}. Choose 'batchmean' or 'official'.", field="distill_scaling"
        )
    return alpha * temperature**2 * kl + (1.0 - alpha) * F.cross_entropy(student_logits.float(), labels.long())


# ------------------------------------------------------------------------------------------------- data


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


def _scheduler(optimizer, config: FinetuneConfig, steps_per_epoch: int, num_processes: int = 1):
    """The learning-rate schedule, counted in scheduler steps: Accelerate steps a prepared scheduler once per
    process for every optimiser step, so ``steps_per_epoch`` is the global number of batches per epoch (over the
    accumulation steps) and ``max_steps`` optimiser steps are ``max_steps * num_processes`` scheduler steps."""
    if config.scheduler == "multistep":
        milestones = [m * steps_per_epoch for m in config.milestones]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=config.gamma)
    if config.scheduler == "cosine":
        total = config.max_steps * num_processes if config.max_steps else config.epochs * steps_per_epoch
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
    return None


# ------------------------------------------------------------------------------------------------- pieces


@dataclass
class _Training:
    """What the loop runs with, built once by :func:`_setup` (prepared by Accelerate)."""

    accelerator: Any
    model: nn.Module  # as prepared (possibly wrapped for distribution)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: DataLoader
    eval_loader: DataLoader | None
    teachers: list[nn.Module]
    adapter: Any
    num_classes: int
    check_batches: bool  # labels not known up front: check each batch
    next_token: bool = False  # a causal LM: token labels are scored shifted by one (Adapter.next_token)


def _accelerator(config: FinetuneConfig):
    """An ``accelerate.Accelerator`` for ``config`` (device and processes come from the environment)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    set_seed(config.seed)
    _check_process_state()
    try:
        return Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            log_with=list(config.log_with) or None,
            project_config=ProjectConfiguration(project_dir=config.project_dir or config.checkpoint_dir or "."),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        )
    except (ValueError, RuntimeError) as error:
        raise ConfigError(f"Accelerate cannot run this configuration: {error}") from None


def _setup(
    model: nn.Module, train: LabelledData, evaluation: LabelledData | None, teachers: list, config: FinetuneConfig
) -> _Training:
    """Accelerator, loaders, label checks, optimiser and scheduler, all prepared by Accelerate."""
    adapter = get_adapter(model)
    accelerator = _accelerator(config)
    train_loader = _loader(train.dataset, config.batch_size, shuffle=True)
    eval_batch = config.eval_batch_size or config.batch_size
    eval_loader = None if evaluation is None else _loader(evaluation.dataset, eval_batch, False)
    num_classes = _num_classes(model, adapter, train_loader, config)
    next_token = adapter.next_token(model)  # before Accelerate wraps the model (DistributedDataParallel)
    for data, what in ((train, "training"), (evaluation, "evaluation")):
        if data is not None and data.max_label is not None:
            check_labels(torch.tensor([0, data.max_label]), num_classes, what)
    optimizer = _optimizer(model, config)
    steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    scheduler = _scheduler(optimizer, config, steps_per_epoch, accelerator.num_processes)
    prepared = accelerator.prepare(model, optimizer, train_loader, *([scheduler] if scheduler else []))
    model, optimizer, train_loader = prepared[:3]
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    teachers = [t.to(accelerator.device).eval() for t in teachers]
    if config.log_with:
        accelerator.init_trackers("hf_clafusion", config={k: str(v) for k, v in config.to_dict().items()})
    return _Training(
        accelerator, model, optimizer, scheduler, train_loader, eval_loader, teachers, adapter, num_classes,
        check_batches=train.max_label is None, next_token=next_token,
    )  # fmt: skip


def _forward(run: _Training, model: nn.Module, inputs: Any) -> torch.Tensor:
    """Logits of ``model`` (the trained model or a teacher) on one batch of inputs."""
    args, kwargs = run.adapter.model_inputs(run.accelerator.unwrap_model(model), inputs)
    return run.adapter.logits(model(*args, **kwargs))


def _loss(run: _Training, inputs: Any, labels: torch.Tensor, config: FinetuneConfig) -> torch.Tensor:
    """Cross-entropy, or :func:`distillation_loss` against the teachers' logits, averaged over the scored predictions
    (every sample; with token labels every scored position, :func:`~hf_clafusion.data.scored`)."""
    output = _forward(run, run.model, inputs)
    logits, targets, _ = scored(output, labels, inputs, shift=run.next_token, what="training")
    if not targets.numel():  # a batch with nothing to score (every position ignored) trains nothing
        return output.sum() * 0.0
    if not run.teachers:
        return F.cross_entropy(logits.float(), targets.long())
    with torch.no_grad():
        teacher_logits = [
            scored(_forward(run, t, inputs), labels, inputs, shift=run.next_token, what="training")[0]
            for t in run.teachers
        ]
    return distillation_loss(
        logits,
        teacher_logits,
        targets,
        alpha=config.distill_alpha,
        temperature=config.distill_temperature,
        scaling=config.distill_scaling,
    )


def _train_epoch(
    run: _Training, config: FinetuneConfig, epoch: int, skip: int, global_step: int, history: list, saved: _Saved
) -> tuple[float, int, int, bool]:
    """One epoch (from batch ``skip`` on, when resuming): ``(train_loss, global_step, batches_done, stopped)``.

    Checkpoints every ``config.checkpoint_steps`` optimiser steps; stops early at ``config.max_steps``.
    """
    accelerator, model, optimizer = run.accelerator, run.model, run.optimizer
    model.train()
    run.train_loader.set_epoch(epoch)
    batches = accelerator.skip_first_batches(run.train_loader, skip) if skip else run.train_loader
    loss_sum = torch.zeros((), device=accelerator.device)
    seen = torch.zeros((), device=accelerator.device)
    bar = tqdm(
        batches,
        desc=f"finetune epoch {epoch + 1}/{config.epochs}",
        leave=False,
        initial=skip,
        total=len(run.train_loader),
        disable=not (config.progress and accelerator.is_local_main_process),
    )
    batch_index = skip
    stop = False
    for batch in bar:
        inputs, labels = split_batch(
            batch, label_column=config.label_column, input_column=config.input_column, what="training"
        )
        batch_index += 1
        if run.check_batches:
            check_labels(labels, run.num_classes, "training")
        with accelerator.accumulate(model):
            loss = _loss(run, inputs, labels, config)
            _stop_if_diverged(run, loss, config, epoch, global_step)
            accelerator.backward(loss)
            if config.grad_clip is not None and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            if run.scheduler is not None and accelerator.sync_gradients:
                run.scheduler.step()
            optimizer.zero_grad()
        loss_sum += loss.detach().float() * labels.shape[0]
        seen += labels.shape[0]
        if accelerator.sync_gradients:
            global_step += 1
            if config.checkpoint_steps and global_step % config.checkpoint_steps == 0:
                _save_checkpoint(accelerator, config, epoch, batch_index, global_step, history, saved)
            if config.max_steps is not None and global_step >= config.max_steps:
                stop = True
                break
    totals = accelerator.reduce(torch.stack([loss_sum, seen]), reduction="sum")
    return float(totals[0] / totals[1].clamp_min(1)), global_step, batch_index, stop


def _stop_if_diverged(run: _Training, loss: torch.Tensor, config: FinetuneConfig, epoch: int, step: int) -> None:
    """Raise :class:`TrainingDivergedError` on every process at once when any process's loss is not finite.

    The processes agree through one all-reduce per batch, so no process is left waiting in a collective for
    one that stopped.
    """
    bad = torch.tensor([0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0], device=run.accelerator.device)
    if float(run.accelerator.reduce(bad, reduction="sum")[0]) == 0:
        return
    knobs = f"`lr` ({config.lr:g})"
    if run.teachers:
        knobs += f" or `distill_temperature` ({config.distill_temperature:g}, scaling {config.distill_scaling!r})"
    raise TrainingDivergedError(
        f"The training loss became non-finite ({float(loss.detach()):g} on this process) at optimiser step "
        f"{step + 1}, epoch {epoch + 1}; training stopped on every process. Lower {knobs}, or set `grad_clip` "
        "(e.g. 1.0)."
    )


def _warn_if_collapsed(initial: dict[str, float] | None, record: dict[str, Any], config: FinetuneConfig, run) -> None:
    """Warn when evaluation accuracy fell below half of what the model had before training."""
    if initial is None or "eval_accuracy" not in record or initial["eval_accuracy"] <= 0:
        return
    if record["eval_accuracy"] < 0.5 * initial["eval_accuracy"]:
        knobs = f"`lr` ({config.lr:g})"
        if run.teachers:
            knobs += f" and `distill_temperature` ({config.distill_temperature:g})"
        warnings.warn(
            ClaFusionWarning(
                f"Evaluation accuracy fell from {initial['eval_accuracy']:.4f} before training to "
                f"{record['eval_accuracy']:.4f} after epoch {record['epoch']}: training is destroying the model. "
                f"Lower {knobs}."
            ),
            stacklevel=3,
        )


@torch.no_grad()
def _evaluate(run: _Training, config: FinetuneConfig) -> dict[str, float]:
    """Accuracy and loss over the whole evaluation split, gathered across processes without duplicated samples.

    With token labels (a language model) accuracy and loss are per scored position (next-token accuracy and the
    mean cross-entropy, whose exponential is the perplexity), and ``eval_tokens`` counts the positions.
    """
    run.model.eval()
    correct = scored_total = 0.0
    loss_sum = 0.0
    samples = 0
    tokens = False
    for batch in run.eval_loader:
        inputs, labels = split_batch(
            batch, label_column=config.label_column, input_column=config.input_column, what="evaluation"
        )
        tokens = tokens or labels.ndim == 2
        logits, targets, sample = scored(
            _forward(run, run.model, inputs).float(), labels, inputs, shift=run.next_token, what="evaluation"
        )
        losses = F.cross_entropy(logits, targets.long(), reduction="none")
        # per-sample sums, so that gather_for_metrics can drop the samples repeated to fill the last batch
        per_sample = torch.zeros(3, labels.shape[0], device=losses.device)
        for row, values in enumerate(((logits.argmax(-1) == targets).float(), torch.ones_like(losses), losses)):
            per_sample[row].index_add_(0, sample.to(losses.device), values)
        hits, counts, sums = run.accelerator.gather_for_metrics(tuple(per_sample))
        correct += float(hits.sum())
        scored_total += float(counts.sum())
        loss_sum += float(sums.sum())
        samples += counts.numel()
    record = {
        "eval_accuracy": correct / max(scored_total, 1),
        "eval_loss": loss_sum / max(scored_total, 1),
        "eval_samples": samples,
    }
    if tokens:
        record["eval_tokens"] = int(scored_total)
    return record


def _latest_checkpoint(directory: Path) -> Path | None:
    candidates = [p for p in directory.glob("checkpoint-*") if (p / STATE_FILE).is_file()]
    return max(candidates, key=lambda p: json.loads((p / STATE_FILE).read_text())["global_step"], default=None)


# ------------------------------------------------------------------------------------------------- the loop


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
        train_dataset: labelled data in any form of the table in docs/data.md: a ``datasets`` split (inputs
            from ``config.input_column`` or the non-label columns, labels from ``config.label_column``; apply
            preprocessing with ``split.set_transform``), ``(inputs, labels)`` (inputs a tensor or a dict of
            tensors, labels a tensor or a list of ints), a torch ``Dataset`` of ``(inputs, label)`` items, or a
            DataLoader (or list) of pairs or of dicts with a label key.
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
        DataError: empty split, missing label column, labels outside the model's classes, unsupported form.
        ConfigError: invalid configuration (unknown optimiser, unsupported mixed precision, ...).
        TrainingDivergedError: the loss became NaN or infinite (every process stops at the same step).

    Warns:
        ClaFusionWarning: evaluation accuracy after an epoch fell below half of the accuracy before training.

    Example:
        ```py
        from hf_clafusion import FinetuneConfig, finetune

        out = finetune(result.model, train_split, val_split, FinetuneConfig(epochs=3, lr=0.01), teacher=parents)
        print(out.history[-1]["eval_accuracy"])
        ```
    """
    config = config or FinetuneConfig()
    if not isinstance(config, FinetuneConfig):
        raise ConfigError(f"`config` must be a FinetuneConfig, got {type(config).__name__}.")
    if overrides:
        config = config.replace(**overrides)
    columns = {"label_column": config.label_column, "input_column": config.input_column}
    train = labelled_dataset(train_dataset, **columns, what="training")
    evaluation = None if eval_dataset is None else labelled_dataset(eval_dataset, **columns, what="evaluation")
    if config.keep_best and evaluation is None:
        raise ConfigError(
            "keep_best=True keeps the weights with the best evaluation accuracy, but no eval_dataset was given. "
            "Pass a validation split as eval_dataset (hf-clafusion finetune: --eval-split or --eval-fraction), or "
            "set keep_best=False.",
            field="keep_best",
        )
    teachers = [] if teacher is None else ([teacher] if isinstance(teacher, nn.Module) else list(teacher))
    run = _setup(model, train, evaluation, teachers, config)

    state = {"epoch": 0, "batch_in_epoch": 0, "global_step": 0, "history": []}
    best = _Best()
    if config.resume_from is not None:
        state, folder = _resume(run.accelerator, config)
        if config.keep_best:
            best.load(folder, state)  # the best evaluation before the interruption still competes
    history: list[dict[str, Any]] = state["history"]
    global_step = state["global_step"]
    initial = state.get("initial_evaluation")  # the reference of the collapse warning survives a resume
    if run.eval_loader is not None and config.resume_from is None:
        initial = _evaluate(run, config)
        if config.keep_best:
            best.offer(run, initial["eval_accuracy"], 0)
    saved = _Saved(best, initial)
    for epoch in range(state["epoch"], config.epochs):
        skip = state["batch_in_epoch"] if epoch == state["epoch"] else 0
        train_loss, global_step, batch_index, stop = _train_epoch(
            run, config, epoch, skip, global_step, history, saved
        )
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": global_step,
            "train_loss": train_loss,
            "lr": run.optimizer.param_groups[0]["lr"],
        }
        if run.eval_loader is not None:
            record.update(_evaluate(run, config))
            _warn_if_collapsed(initial, record, config, run)
            if config.keep_best:
                best.offer(run, record["eval_accuracy"], epoch + 1)
        history.append(record)
        if config.log_with:
            run.accelerator.log({k: v for k, v in record.items() if k != "epoch"}, step=global_step)
        if config.checkpoint_dir is not None:
            finished = not stop or batch_index >= len(run.train_loader)
            next_epoch, next_batch = (epoch + 1, 0) if finished else (epoch, batch_index)
            _save_checkpoint(run.accelerator, config, next_epoch, next_batch, global_step, history, saved)
        if stop:
            break
    if config.log_with:
        run.accelerator.end_training()
    run.accelerator.wait_for_everyone()
    model = run.accelerator.unwrap_model(run.model)
    kept = history[-1]["epoch"] if history else state["epoch"]
    if best.state is not None and best.epoch != kept:
        model.load_state_dict(best.state)  # every process chose the same epoch: the accuracy is gathered
        kept = best.epoch
    return FinetuneResult(model.eval(), history, initial, kept_epoch=kept)


class _Best:
    """The best evaluation so far and a CPU copy of the weights that reached it (``keep_best``).

    Checkpoints carry it (:data:`BEST_FILE` beside the training state), so a resumed run still ends with the best
    weights of the epochs before its interruption.
    """

    def __init__(self) -> None:
        self.accuracy = -math.inf
        self.epoch: int | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def offer(self, run: _Training, accuracy: float, epoch: int) -> None:
        """Keep the model's weights if ``accuracy`` beats every earlier one (ties keep the earlier epoch)."""
        if accuracy <= self.accuracy:
            return
        self.state = None  # the previous copy goes before the new one is made
        weights = run.accelerator.unwrap_model(run.model).state_dict()
        self.state = {name: tensor.detach().to("cpu", copy=True) for name, tensor in weights.items()}
        self.accuracy, self.epoch = accuracy, epoch

    def record(self) -> dict[str, Any] | None:
        """What the training state file says of it (None before any evaluation)."""
        return None if self.state is None else {"epoch": self.epoch, "eval_accuracy": self.accuracy}

    def load(self, folder: Path, state: dict[str, Any]) -> None:
        """The best weights a checkpoint saved, if it saved any (checkpoints without ``keep_best`` hold none)."""
        record = state.get("best")
        if record is None or not (folder / BEST_FILE).is_file():
            return
        from safetensors.torch import load_file

        self.state = load_file(str(folder / BEST_FILE))
        self.accuracy, self.epoch = float(record["eval_accuracy"]), int(record["epoch"])


@dataclass
class _Saved:
    """What a checkpoint keeps besides Accelerate's state: the best weights so far and the start's evaluation."""

    best: _Best
    initial: dict[str, float] | None


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


def _num_classes(model: nn.Module, adapter, loader: DataLoader, config: FinetuneConfig) -> int:
    """The model's number of outputs, from one forward pass on the first training batch."""
    inputs, _ = split_batch(
        next(iter(loader)), label_column=config.label_column, input_column=config.input_column, what="training"
    )
    check_input_dtype(inputs, model, "training")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        args, kwargs = adapter.model_inputs(model, move_to(inputs, device))
        try:
            num = int(adapter.logits(model(*args, **kwargs)).shape[-1])
        except (RuntimeError, TypeError, ValueError) as error:
            explained = wrong_inputs_error(error, inputs, "training")
            if explained is None:
                raise
            raise explained from error
        finally:
            model.train(was_training)
    return num


# ------------------------------------------------------------------------------------------------- checkpoints


def _save_checkpoint(
    accelerator, config: FinetuneConfig, epoch: int, batch: int, step: int, history: list, saved: _Saved
) -> None:
    """Accelerate's state, then the best weights (``keep_best``), then the training state file, which is written last:
    a folder without it is not a checkpoint (an interrupted save is never resumed from)."""
    folder = Path(config.checkpoint_dir) / f"checkpoint-{step:08d}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        state = {"epoch": epoch, "batch_in_epoch": batch, "global_step": step, "history": history}
        if saved.initial is not None:
            state["initial_evaluation"] = saved.initial
        if saved.best.state is not None:
            from safetensors.torch import save_file

            save_file(saved.best.state, str(folder / BEST_FILE))
            state["best"] = saved.best.record()
        (folder / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    accelerator.wait_for_everyone()


def _resume(accelerator, config: FinetuneConfig) -> tuple[dict[str, Any], Path]:
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
    return json.loads((folder / STATE_FILE).read_text()), folder


__all__ = ["FinetuneResult", "distillation_loss", "finetune"]
