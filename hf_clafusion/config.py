"""Configuration dataclasses: :class:`FusionConfig` and :class:`FinetuneConfig`.

Both are plain frozen dataclasses, validated in ``__post_init__``, and round-trip through JSON/YAML
dictionaries with :meth:`to_dict` / :meth:`from_dict` (unknown keys are rejected with the list of valid
ones).

Every string-choice field is typed with one of the ``Literal`` aliases below. The aliases are the only place the
choices are written: validation, :func:`field_choices` (the command line's help) and the tables of
``docs/configuration.md`` are derived from them.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from .errors import ConfigError


LayerCost = Literal["cka", "cka_minibatch", "cca", "wasserstein", "neuron_count", "index"]
AlignmentMethod = Literal["cla", "chain", "random", "auto"]
Balancing = Literal["identity", "merge"]
Unmatched = Literal["average", "transplant", "identity"]
ReluApprox = Literal["sum", "majority", "avg"]
Anchor = Literal["deepest", "shallowest"]
GroundMetric = Literal["activations", "correlation", "weights", "weight_matching"]
Solver = Literal["emd", "sinkhorn", "permutation", "auto"]
Repair = Literal["auto", "bn", "repair"]
PlanNormalization = Literal["two_sided", "column"]
WidthMatching = Literal["partial", "transport"]
AttentionAlignment = Literal["heads", "cross_head"]
Optimizer = Literal["sgd", "adam", "adamw"]
Scheduler = Literal["none", "multistep", "cosine"]
MixedPrecision = Literal["no", "fp16", "bf16"]
DistillScaling = Literal["batchmean", "official"]


def _literal_values(annotation: Any) -> tuple[Any, ...]:
    """The values of the ``Literal`` in a (resolved) annotation, also inside a union (with ``None`` when the union
    is optional, so ``Literal["a", "b"] | None`` gives ``("a", "b", None)``); empty when there is no ``Literal``."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        values = tuple(value for arg in args for value in _literal_values(arg))
        return values + (None,) if values and type(None) in args else values
    return ()


@functools.cache
def field_choices(config_class: type) -> dict[str, tuple[Any, ...]]:
    """The allowed values of every choice field of a config class, read from the fields' ``Literal`` types.

    Example:
        ```py
        >>> from hf_clafusion.config import FusionConfig, field_choices
        >>> field_choices(FusionConfig)["solver"]
        ('emd', 'sinkhorn', 'permutation')
        ```
    """
    hints = typing.get_type_hints(config_class)
    choices = {f.name: _literal_values(hints[f.name]) for f in dataclasses.fields(config_class)}
    return {name: values for name, values in choices.items() if values}


#: What a choice field accepts besides its ``Literal`` values, worded for messages, help and docs.
_OTHER_VALUES = {"anchor": "a model index >= 0"}


def describe_choices(config_class: type) -> dict[str, str]:
    """Per choice field, the accepted values in words (``"'deepest', 'shallowest' or a model index >= 0"``)."""
    described = {}
    for name, values in field_choices(config_class).items():
        text = ", ".join(map(repr, values))
        described[name] = f"{text} or {_OTHER_VALUES[name]}" if name in _OTHER_VALUES else text
    return described


def _check_choice(config: Any, name: str) -> None:
    """Refuse a value of a pure choice field (its type is a ``Literal``, or an optional one) outside its choices."""
    value = getattr(config, name)
    choices = field_choices(type(config))[name]
    if value not in choices:
        raise ConfigError(
            f"Invalid value for `{name}`: {value!r}. Choose one of: {', '.join(repr(c) for c in choices)}.",
            field=name,
        )


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"Invalid value for `{name}`: {value!r}. It must be an integer >= {minimum}.", field=name)


class _DictMixin:
    _name: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON/YAML-serialisable dictionary."""
        out = dataclasses.asdict(self)  # type: ignore[call-overload]
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build from a dictionary (e.g. parsed YAML); unknown keys raise :class:`ConfigError`."""
        if not isinstance(data, dict):
            raise ConfigError(f"A {cls.__name__} must be built from a mapping, got {type(data).__name__}.")
        valid = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ConfigError(
                f"Unknown {cls.__name__} key(s): {', '.join(map(repr, unknown))}. Valid keys: {', '.join(valid)}.",
                field=unknown[0],
            )
        return cls(**data)

    def replace(self, **overrides: Any):
        """A copy with some fields changed (validated again); unknown names raise :class:`ConfigError`."""
        return type(self).from_dict({**self.to_dict(), **overrides})


@dataclass(frozen=True)
class FusionConfig(_DictMixin):
    """How to align and fuse models. Every field has a default; see ``docs/configuration.md``.

    Example:
        ```py
        >>> from hf_clafusion import FusionConfig
        >>> FusionConfig(layer_cost="cka", solver="emd").balancing
        'identity'
        >>> FusionConfig.official().anchor
        'shallowest'
        ```
    """

    layer_cost: LayerCost = field(
        default="cka",
        metadata={
            "help": "Layer dissimilarity for cross-layer alignment. `cka`: 1 - linear CKA (biased HSIC, the paper's "
            "estimator; computed in the Gram form for layers wider than the number of samples and in the "
            "equal, cheaper feature form otherwise). `cka_minibatch`: 1 - CKA from unbiased HSIC accumulated "
            "over batches (memory independent of the number of samples; batches need at least 4 samples). "
            "`cca`: 1 - mean squared canonical correlation. `wasserstein`: exact EMD between the two layers' "
            "neuron clouds. `neuron_count`: `(width_i - width_j)^2`; `index`: `(i - j)^2` (the official "
            "euclidean measures)."
        },
    )
    alignment: AlignmentMethod = field(
        default="auto",
        metadata={
            "help": "`cla`: the dynamic programme. `auto` (default): fuse with `cla`'s alignment and with `chain`'s where they "
            "differ, and keep the one whose predictions on the calibration data agree most often with the parents' "
            "ensemble (CLA's on ties; the resolved value is saved). `chain` (layer `k` -> layer `k`) "
            "and `random` (seeded, honours the fixed layers) are baselines."
        },
    )
    first_fixed: int = field(
        default=1,
        metadata={
            "help": "Leading hidden layers of each segment matched one-to-one (official `start_layer_idx - 1`)."
        },
    )
    last_fixed: int = field(
        default=1,
        metadata={"help": "Trailing hidden layers of each segment matched end-to-end (official `free_end_layers`)."},
    )
    balancing: Balancing = field(
        default="identity",
        metadata={
            "help": "`identity`: identity layers inserted into the shallower model, the fused model has the deeper "
            "depth. `merge`: the deeper model's unmatched layers are merged into their successors, the fused "
            "model has the shallower depth (MLPs only)."
        },
    )
    unmatched: Unmatched = field(
        default="transplant",
        metadata={
            "help": "With `balancing='identity'`, the fused block where only the deeper anchor has one: `transplant` "
            "(the anchor's block whole; measured best, see docs/benchmarks.md), `average` (its residual writers "
            "scaled by the anchor's weight, the closed form of averaging with an identity block, as CLAFusion) or "
            "`identity` (identity blocks inserted and averaged explicitly). Residual families (transformers; timm "
            "ResNet, ViT, ConvNeXt) have the closed form; VGGs and plain torch MLPs/CNNs always average explicitly."
        },
    )
    relu_approx: ReluApprox = field(
        default="avg",
        metadata={
            "help": "With `balancing='merge'`, the diagonal replacing a removed ReLU: `sum`, `majority` or `avg`."
        },
    )
    anchor: Anchor | int = field(
        default="deepest",
        metadata={
            "help": "Whose architecture, widths and neuron basis the fused model takes: `deepest`, `shallowest` or a "
            "model index. The paper's teacher-student compression anchors on the (narrow) student."
        },
    )
    ground_metric: GroundMetric = field(
        default="activations",
        metadata={
            "help": "Neuron cost for optimal transport: `activations` (RMS distance of activations), "
            "`correlation` (RMS distance of z-scored activations, sqrt(2 (1 - rho)), as REPAIR and ZipIt! use; "
            "invariant to each neuron's scale and shift), `weights` (distance between weight rows, layer by layer) "
            "or `weight_matching` (Git Re-Basin weight matching: every group's plan re-chosen in turn, from the "
            "`weights` plans, to maximise the summed inner products of the aligned weights until no plan changes; "
            "exact solvers only)."
        },
    )
    solver: Solver = field(
        default="auto",
        metadata={
            "help": "Transport solver: `auto` (exact: a linear assignment for equal widths whose costs nearly pick a "
            "permutation, EMD otherwise; "
            "`summary()` says which ran), `emd` (exact network simplex), `sinkhorn` (entropic, log-domain, only "
            "when asked for) or `permutation` (linear assignment; equal widths only)."
        },
    )
    reg: float = field(default=0.05, metadata={"help": "Sinkhorn regularisation, relative to the maximum cost."})
    plan_normalization: PlanNormalization = field(
        default="column",
        metadata={
            "help": "`column`: the column-normalised plan `R = n_A T` on output and input axes (the official code's; "
            "measured best when widths differ, see docs/benchmarks.md). `two_sided`: `R` on output axes, "
            "`S = n_B T` on input axes (exact for copies widened by neuron duplication). Equal widths: the same."
        },
    )
    width_matching: WidthMatching = field(
        default="partial",
        metadata={
            "help": "Where a model's layer is narrower than the anchor's (exact solvers): `partial` matches each of "
            "its neurons with one anchor neuron (a rectangular linear assignment on the same costs) and the anchor "
            "neurons left without a partner keep the anchor's weights (measured best, see docs/benchmarks.md); "
            "`transport` (OTFusion, CLAFusion) spreads each neuron over several anchor neurons by the transport "
            "plan and averages every anchor neuron. Equal widths, wider models, Sinkhorn and weight matching: the "
            "same."
        },
    )
    weights: tuple[float, ...] | None = field(
        default=None, metadata={"help": "Averaging weight per model (non-negative, summing to 1); uniform when None."}
    )
    num_samples: int = field(default=200, metadata={"help": "Calibration samples used (the paper uses 200)."})
    batch_size: int = field(default=100, metadata={"help": "Batch size of the calibration forward passes."})
    seed: int = field(
        default=0,
        metadata={"help": "Seed for the calibration subset, the `random` alignment baseline and the solvers."},
    )
    device: str | None = field(
        default=None,
        metadata={
            "help": "Device for the forward passes and the fusion math; None uses the models' device (they must all "
            "be on one device)."
        },
    )
    repair: Repair | None = field(
        default="auto",
        metadata={
            "help": "Statistics repair of the fused model: `bn` (recompute BatchNorm running statistics), "
            "`repair` (REPAIR: per-channel affine corrections folded into the weights so every pre-activation and "
            "residual branch output has the parents' aligned mean and std), None (none, as the official code), or "
            "`auto` (models with real BatchNorms: `bn`, or `repair` where it agrees clearly better with the "
            "parents' ensemble on the data; others: None or `repair` the same way; transformers: None; the resolved "
            "value is saved)."
        },
    )
    repair_samples: int | None = field(
        default=None,
        metadata={"help": "Samples of the calibration data used for statistics repair; None = the num_samples used."},
    )
    positions_per_sample: int | None = field(
        default=None,
        metadata={
            "help": "Positions (tokens of a sequence, pixels of a feature map) per calibration sample, on average, "
            "that enter the activation statistics of the neuron costs: evenly spaced over each batch's positions, "
            "the same for every model. Cuts the statistics' cost in proportion, not the forward passes; None uses "
            "every position (see docs/transformers.md for the effect on the result)."
        },
    )
    transport_threads: int | None = field(
        default=None,
        metadata={
            "help": "Transport plans solved at once (with activation or correlation costs, whose plans are "
            "independent); None = torch.get_num_threads() where a group has at least 2048 x 2048 neuron pairs, "
            "else 1. Each running EMD holds about 4 n_B x n_A float64 values besides its cost: 1 uses the least "
            "memory, more finish wide layers sooner (docs/transformers.md)."
        },
    )
    reset_bn_stats: bool | None = field(
        default=None,
        metadata={"help": "Deprecated alias of `repair`: True -> `repair='bn'`, False -> `repair=None`."},
    )
    progress: bool = field(default=True, metadata={"help": "Show tqdm progress bars."})
    attention: AttentionAlignment = field(
        default="heads",
        metadata={
            "help": "How attention projections are aligned: 'heads' (heads move as wholes, exact for permuted "
            "copies; needs equal head counts and head sizes) or 'cross_head' (every query/key/value dimension "
            "transported freely, as transformer-fusion does; approximate, allows different widths and head "
            "counts)."
        },
    )
    input_column: str | None = field(
        default=None,
        metadata={
            "help": "Column of a datasets split holding raw text or images to preprocess with the parents' "
            "tokenizer / data config (None: the split already holds model inputs, or it is detected)."
        },
    )
    max_length: int = field(
        default=128, metadata={"help": "Truncation length when raw calibration text is tokenized."}
    )

    #: The choices of each string field (kept for compatibility; the ``Literal`` aliases are the source).
    LAYER_COSTS: ClassVar[tuple[str, ...]] = typing.get_args(LayerCost)
    ALIGNMENTS: ClassVar[tuple[str, ...]] = typing.get_args(AlignmentMethod)
    BALANCINGS: ClassVar[tuple[str, ...]] = typing.get_args(Balancing)
    RELU_APPROX: ClassVar[tuple[str, ...]] = typing.get_args(ReluApprox)
    GROUND_METRICS: ClassVar[tuple[str, ...]] = typing.get_args(GroundMetric)
    SOLVERS: ClassVar[tuple[str, ...]] = typing.get_args(Solver)
    PLAN_NORMALIZATIONS: ClassVar[tuple[str, ...]] = typing.get_args(PlanNormalization)
    ATTENTION: ClassVar[tuple[str, ...]] = typing.get_args(AttentionAlignment)
    REPAIRS: ClassVar[tuple[str | None, ...]] = (*typing.get_args(Repair), None)

    def __post_init__(self) -> None:
        if self.reset_bn_stats is not None:  # deprecated alias, kept so saved configs still load
            if not isinstance(self.reset_bn_stats, bool):
                raise ConfigError(
                    f"Invalid value for `reset_bn_stats`: {self.reset_bn_stats!r}. It is a deprecated boolean; "
                    "use repair='bn' (True) or repair=None (False) instead.",
                    field="reset_bn_stats",
                )
            warnings.warn(
                "FusionConfig.reset_bn_stats is deprecated; use repair='bn' (for True) or repair=None (for False).",
                DeprecationWarning,
                stacklevel=3,
            )
            object.__setattr__(self, "repair", "bn" if self.reset_bn_stats else None)
            object.__setattr__(self, "reset_bn_stats", None)
        for name in field_choices(FusionConfig):
            if name != "anchor":  # a choice or a model index, checked below
                _check_choice(self, name)
        _check_int("max_length", self.max_length, 1)
        _check_int("first_fixed", self.first_fixed, 0)
        _check_int("last_fixed", self.last_fixed, 0)
        _check_int("num_samples", self.num_samples, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("seed", self.seed, 0)
        if self.repair_samples is not None:
            _check_int("repair_samples", self.repair_samples, 1)
        if self.positions_per_sample is not None:
            _check_int("positions_per_sample", self.positions_per_sample, 1)
        if self.transport_threads is not None:
            _check_int("transport_threads", self.transport_threads, 1)
        if isinstance(self.anchor, bool) or not (
            self.anchor in typing.get_args(Anchor) or (isinstance(self.anchor, int) and self.anchor >= 0)
        ):
            raise ConfigError(
                f"Invalid value for `anchor`: {self.anchor!r}. Use {describe_choices(FusionConfig)['anchor']}.",
                field="anchor",
            )
        if self.ground_metric == "weight_matching" and self.solver == "sinkhorn":
            raise ConfigError(
                "Invalid combination: ground_metric='weight_matching' with solver='sinkhorn'. Weight matching "
                "searches hard assignments; use solver='auto', 'emd' or 'permutation', or another ground_metric "
                "for soft plans.",
                field="solver",
            )
        if not isinstance(self.reg, (int, float)) or not self.reg > 0:
            raise ConfigError(f"Invalid value for `reg`: {self.reg!r}. It must be a number > 0.", field="reg")
        if self.weights is not None:
            weights = tuple(float(w) for w in self.weights)
            if len(weights) < 2 or any(w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
                raise ConfigError(
                    f"Invalid value for `weights`: {self.weights!r}. Give one non-negative weight per model, "
                    "summing to 1 (or None for a uniform average).",
                    field="weights",
                )
            object.__setattr__(self, "weights", weights)

    @classmethod
    def official(cls, **overrides: Any) -> FusionConfig:
        """The settings of the official CLAFusion scripts (hsgser/clafusion), for comparison with the paper.

        1 - linear CKA (Gram form) on 200 samples (activation seed 21), start_layer_idx s = 2 and
        free_end_layers f = 1 (first_fixed=1, last_fixed=1), identity layers inserted into the shallow model,
        activation ground metric sqrt(||a - b||^2 / N), exact EMD, the column-normalised plan applied on both
        axes and spread over every anchor neuron where a model is narrower (``width_matching="transport"``), fused
        onto the *shallow* model's widths, no statistics repair (no BatchNorm recomputation). Differences that
        remain (the output layer is never OT-aligned here; identity layers are never inserted before the input) are
        listed in ``docs/differences.md``.
        """
        base = dict(
            layer_cost="cka",
            alignment="cla",
            first_fixed=1,
            last_fixed=1,
            balancing="identity",
            anchor="shallowest",
            ground_metric="activations",
            solver="emd",
            plan_normalization="column",
            width_matching="transport",
            num_samples=200,
            seed=21,
            repair=None,
            unmatched="average",
        )
        base.update(overrides)
        return cls(**base)


@dataclass(frozen=True)
class FinetuneConfig(_DictMixin):
    """How to finetune a (fused) model with :func:`hf_clafusion.finetune`."""

    epochs: int = field(default=1, metadata={"help": "Passes over the training data."})
    max_steps: int | None = field(
        default=None, metadata={"help": "Stop after this many optimiser steps (over all epochs)."}
    )
    batch_size: int = field(
        default=64, metadata={"help": "Per-process batch size (when the data is not already a DataLoader)."}
    )
    optimizer: Optimizer = field(default="sgd", metadata={"help": "`sgd` (with momentum), `adam` or `adamw`."})
    lr: float = field(default=0.01, metadata={"help": "Learning rate."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (the paper: 0.9)."})
    weight_decay: float = field(default=5e-4, metadata={"help": "Weight decay."})
    scheduler: Scheduler = field(
        default="cosine",
        metadata={
            "help": "`cosine` (to zero over `max_steps`, or all epochs), `multistep` or `none` (a constant rate)."
        },
    )
    milestones: tuple[int, ...] = field(
        default=(), metadata={"help": "Epochs at which `multistep` multiplies the learning rate by `gamma`."}
    )
    gamma: float = field(default=0.5, metadata={"help": "Decay factor of `multistep`."})
    grad_clip: float | None = field(default=None, metadata={"help": "Clip gradients to this global norm."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Batches per optimiser step (Accelerate's `accumulate`)."}
    )
    mixed_precision: MixedPrecision = field(
        default="no", metadata={"help": "`no`, `fp16` or `bf16`, where the hardware supports it."}
    )
    eval_batch_size: int | None = field(
        default=None, metadata={"help": "Evaluation batch size (default: batch_size)."}
    )
    input_column: str | None = field(
        default=None, metadata={"help": "Dataset column holding the model input (default: every non-label column)."}
    )
    label_column: str = field(default="label", metadata={"help": "Dataset column holding the class labels."})
    keep_best: bool = field(
        default=False,
        metadata={
            "help": "With an `eval_dataset`: end with the weights of the evaluation with the highest accuracy, the "
            "model before training included (the earliest among ties; `transformers`' `load_best_model_at_end`). "
            "Keeps one CPU copy of the weights. After `resume_from`, only the epochs run since count."
        },
    )
    checkpoint_dir: str | None = field(
        default=None, metadata={"help": "Folder for `accelerator.save_state` checkpoints, written after each epoch."}
    )
    checkpoint_steps: int | None = field(
        default=None, metadata={"help": "Also checkpoint every this many optimiser steps (needs checkpoint_dir)."}
    )
    resume_from: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or `latest` in `checkpoint_dir`: exact resume."}
    )
    distill_alpha: float = field(
        default=0.5,
        metadata={"help": "With `teacher=`: weight of the distillation term, `alpha * T^2 * KL + (1 - alpha) * CE`."},
    )
    distill_temperature: float = field(
        default=2.0,
        metadata={
            "help": "With `teacher=`: the temperature `T`. 2 trains stably with the default SGD on every benchmark "
            "pair; the official scripts' 20 is only stable with their `official` scaling "
            "(`FinetuneConfig.official_distillation()`)."
        },
    )
    distill_scaling: DistillScaling = field(
        default="batchmean",
        metadata={
            "help": "With `teacher=`: `batchmean` (KL summed over classes, averaged over the batch; the teachers' "
            "probabilities averaged) or `official` (the official scripts: `KLDivLoss(reduction='mean')`, which also "
            "divides by the number of classes, and the teachers' logits averaged)."
        },
    )
    log_with: tuple[str, ...] = field(
        default=(), metadata={"help": "Accelerate trackers to log the per-epoch metrics to, e.g. `['tensorboard']`."}
    )
    project_dir: str | None = field(default=None, metadata={"help": "Folder for tracker logs."})
    seed: int = field(default=0, metadata={"help": "Seed for shuffling and initialisation."})
    progress: bool = field(default=True, metadata={"help": "Show tqdm progress bars (main process only)."})

    #: The choices of each string field (kept for compatibility; the ``Literal`` aliases are the source).
    OPTIMIZERS: ClassVar[tuple[str, ...]] = typing.get_args(Optimizer)
    SCHEDULERS: ClassVar[tuple[str, ...]] = typing.get_args(Scheduler)
    PRECISIONS: ClassVar[tuple[str, ...]] = typing.get_args(MixedPrecision)

    def __post_init__(self) -> None:
        for name in field_choices(FinetuneConfig):
            _check_choice(self, name)
        _check_int("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        for name in ("eval_batch_size", "checkpoint_steps"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if self.checkpoint_steps is not None and self.checkpoint_dir is None:
            raise ConfigError(
                "`checkpoint_steps` needs `checkpoint_dir`: set where checkpoints go.", field="checkpoint_dir"
            )
        if self.resume_from == "latest" and self.checkpoint_dir is None:
            raise ConfigError("resume_from='latest' needs `checkpoint_dir`.", field="resume_from")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ConfigError(
                f"Invalid value for `distill_alpha`: {self.distill_alpha!r}. It must be in [0, 1].",
                field="distill_alpha",
            )
        if not self.distill_temperature > 0:
            raise ConfigError(
                f"Invalid value for `distill_temperature`: {self.distill_temperature!r}. It must be > 0.",
                field="distill_temperature",
            )
        object.__setattr__(self, "log_with", tuple(self.log_with))
        _check_int("epochs", self.epochs, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("seed", self.seed, 0)
        if self.max_steps is not None:
            _check_int("max_steps", self.max_steps, 1)
        for name in ("lr", "momentum", "weight_decay", "gamma"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or (name == "lr" and value == 0):
                raise ConfigError(
                    f"Invalid value for `{name}`: {value!r}. It must be a number >= 0 (lr > 0).", field=name
                )
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"Invalid value for `grad_clip`: {self.grad_clip!r}. Use a number > 0 or None.")
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))

    @classmethod
    def official_distillation(cls, **overrides: Any) -> FinetuneConfig:
        """The official CLAFusion scripts' distillation: ``T = 20`` with their loss scaling (opt-in).

        ``KLDivLoss(reduction="mean")`` divides the KL term by the number of classes as well as the batch, and
        several teachers' logits are averaged before the softmax. With ``distill_scaling="batchmean"`` (the
        default) the same ``T = 20`` is ``C`` times stronger and diverges with SGD at lr 0.01; see
        ``docs/finetuning.md``. SGD with momentum 0.9 and weight decay 5e-4 at lr 0.01, as their teacher-student
        runs.
        """
        base: dict[str, Any] = dict(
            optimizer="sgd",
            lr=0.01,
            momentum=0.9,
            weight_decay=5e-4,
            scheduler="none",
            distill_temperature=20.0,
            distill_scaling="official",
        )
        base.update(overrides)
        return cls(**base)


__all__ = [
    "AlignmentMethod",
    "Anchor",
    "AttentionAlignment",
    "Balancing",
    "DistillScaling",
    "FinetuneConfig",
    "FusionConfig",
    "GroundMetric",
    "LayerCost",
    "MixedPrecision",
    "Optimizer",
    "PlanNormalization",
    "ReluApprox",
    "Repair",
    "Scheduler",
    "Solver",
    "WidthMatching",
    "describe_choices",
    "field_choices",
]
