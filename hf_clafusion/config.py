"""Configuration dataclasses: :class:`FusionConfig` and :class:`FinetuneConfig`.

Both are plain frozen dataclasses, validated in ``__post_init__``, and round-trip through JSON/YAML
dictionaries with :meth:`to_dict` / :meth:`from_dict` (unknown keys are rejected with the list of valid
ones).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ConfigError


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
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

    layer_cost: str = field(
        default="cka",
        metadata={
            "help": "Layer dissimilarity for cross-layer alignment: 'cka' (1 - linear CKA, the paper's biased "
            "estimator), 'cka_minibatch' (1 - CKA from unbiased HSIC accumulated over batches; memory independent "
            "of the number of samples), 'cca' (1 - mean squared canonical correlation), 'wasserstein' (exact "
            "EMD between the layers' neuron clouds), 'neuron_count' or 'index' (the official euclidean measures)."
        },
    )
    alignment: str = field(
        default="cla",
        metadata={"help": "'cla' (the dynamic programme), 'chain' (layer k -> layer k) or 'random' (baselines)."},
    )
    first_fixed: int = field(
        default=1, metadata={"help": "Leading hidden layers of each segment matched one-to-one (official s - 1)."}
    )
    last_fixed: int = field(
        default=1, metadata={"help": "Trailing hidden layers of each segment matched end-to-end (official f)."}
    )
    balancing: str = field(
        default="identity",
        metadata={
            "help": "'identity': the fused model has the deeper depth (identity layers inserted into the "
            "shallower model); 'merge': the shallower depth (unmatched deep layers merged, MLPs only)."
        },
    )
    relu_approx: str = field(
        default="avg",
        metadata={"help": "For balancing='merge': how a removed ReLU becomes a diagonal: 'sum', 'majority', 'avg'."},
    )
    anchor: int | str = field(
        default="deepest",
        metadata={
            "help": "Whose widths and neuron basis the fused model takes: 'deepest', 'shallowest' or a model "
            "index. The paper's teacher-student compression anchors on the (narrow) student."
        },
    )
    ground_metric: str = field(
        default="activations",
        metadata={"help": "Neuron cost for optimal transport: 'activations' (RMS distance) or 'weights'."},
    )
    solver: str = field(
        default="emd",
        metadata={"help": "Transport solver: 'emd' (exact), 'sinkhorn' (entropic) or 'permutation' (LAP)."},
    )
    reg: float = field(default=0.05, metadata={"help": "Sinkhorn regularisation, relative to the max cost."})
    plan_normalization: str = field(
        default="two_sided",
        metadata={
            "help": "'two_sided': R = n_A T on output axes, S = n_B T on input axes (exact for widened copies); "
            "'column': the official code's column-normalised plan on both axes."
        },
    )
    weights: tuple[float, ...] | None = field(
        default=None, metadata={"help": "Averaging weight per model (sums to 1); uniform when None."}
    )
    num_samples: int = field(default=200, metadata={"help": "Calibration samples used (the paper: 200)."})
    batch_size: int = field(default=100, metadata={"help": "Batch size for the calibration forward passes."})
    seed: int = field(default=0, metadata={"help": "Seed for sample selection, random alignment and solvers."})
    device: str | None = field(
        default=None, metadata={"help": "Device for the fusion math; None = the models' device."}
    )
    repair: str | None = field(
        default="auto",
        metadata={
            "help": "Statistics repair of the fused model: 'bn' (recompute BatchNorm running statistics), "
            "'repair' (REPAIR: per-channel affine corrections folded into the weights so every pre-activation and "
            "residual branch output has the parents' aligned mean and std), None (none, as the official code), or "
            "'auto' (models with real BatchNorms: 'bn' or 'repair', whichever agrees best with the parents' "
            "ensemble on the data; others: 'repair'; the resolved value is saved)."
        },
    )
    repair_samples: int | None = field(
        default=None,
        metadata={"help": "Samples of the calibration data used for statistics repair; None = the num_samples used."},
    )
    reset_bn_stats: bool | None = field(
        default=None,
        metadata={"help": "Deprecated alias of `repair`: True -> repair='bn', False -> repair=None."},
    )
    progress: bool = field(default=True, metadata={"help": "Show tqdm progress bars."})
    attention: str = field(
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

    LAYER_COSTS: ClassVar[tuple[str, ...]] = ("cka", "cka_minibatch", "cca", "wasserstein", "neuron_count", "index")
    ALIGNMENTS: ClassVar[tuple[str, ...]] = ("cla", "chain", "random")
    BALANCINGS: ClassVar[tuple[str, ...]] = ("identity", "merge")
    RELU_APPROX: ClassVar[tuple[str, ...]] = ("sum", "majority", "avg")
    GROUND_METRICS: ClassVar[tuple[str, ...]] = ("activations", "weights")
    SOLVERS: ClassVar[tuple[str, ...]] = ("emd", "sinkhorn", "permutation")
    PLAN_NORMALIZATIONS: ClassVar[tuple[str, ...]] = ("two_sided", "column")
    ATTENTION: ClassVar[tuple[str, ...]] = ("heads", "cross_head")
    REPAIRS: ClassVar[tuple[str | None, ...]] = ("auto", "bn", "repair", None)

    def __post_init__(self) -> None:
        _check_choice("layer_cost", self.layer_cost, self.LAYER_COSTS)
        _check_choice("alignment", self.alignment, self.ALIGNMENTS)
        _check_choice("balancing", self.balancing, self.BALANCINGS)
        _check_choice("relu_approx", self.relu_approx, self.RELU_APPROX)
        _check_choice("ground_metric", self.ground_metric, self.GROUND_METRICS)
        _check_choice("solver", self.solver, self.SOLVERS)
        _check_choice("plan_normalization", self.plan_normalization, self.PLAN_NORMALIZATIONS)
        _check_choice("attention", self.attention, self.ATTENTION)
        _check_int("max_length", self.max_length, 1)
        _check_int("first_fixed", self.first_fixed, 0)
        _check_int("last_fixed", self.last_fixed, 0)
        _check_int("num_samples", self.num_samples, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("seed", self.seed, 0)
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
        _check_choice("repair", self.repair, self.REPAIRS)
        if self.repair_samples is not None:
            _check_int("repair_samples", self.repair_samples, 1)
        if isinstance(self.anchor, bool) or not (
            self.anchor in ("deepest", "shallowest") or (isinstance(self.anchor, int) and self.anchor >= 0)
        ):
            raise ConfigError(
                f"Invalid value for `anchor`: {self.anchor!r}. Use 'deepest', 'shallowest' or a model index >= 0.",
                field="anchor",
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
        axes, fused onto the *shallow* model's widths, no statistics repair (no BatchNorm recomputation). Differences that remain (the output layer is never
        OT-aligned here; identity layers are never inserted before the input) are listed in
        ``docs/differences.md``.
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
            num_samples=200,
            seed=21,
            repair=None,
        )
        base.update(overrides)
        return cls(**base)


@dataclass(frozen=True)
class FinetuneConfig(_DictMixin):
    """How to finetune a (fused) model with :func:`hf_clafusion.finetune`."""

    epochs: int = field(default=1, metadata={"help": "Passes over the training data."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimiser steps."})
    batch_size: int = field(default=64, metadata={"help": "Per-process batch size."})
    optimizer: str = field(default="sgd", metadata={"help": "'sgd' (momentum), 'adam' or 'adamw'."})
    lr: float = field(default=0.01, metadata={"help": "Learning rate."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (the paper: 0.9)."})
    weight_decay: float = field(default=5e-4, metadata={"help": "Weight decay."})
    scheduler: str = field(default="none", metadata={"help": "'none', 'multistep' or 'cosine'."})
    milestones: tuple[int, ...] = field(default=(), metadata={"help": "Epochs where 'multistep' decays."})
    gamma: float = field(default=0.5, metadata={"help": "Decay factor for 'multistep'."})
    grad_clip: float | None = field(default=None, metadata={"help": "Clip gradients to this global norm."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimiser step."})
    mixed_precision: str = field(
        default="no", metadata={"help": "'no', 'fp16' or 'bf16' (where the hardware supports it)."}
    )
    eval_batch_size: int | None = field(
        default=None, metadata={"help": "Evaluation batch size (default: batch_size)."}
    )
    input_column: str | None = field(
        default=None, metadata={"help": "Dataset column holding the model input (default: the non-label columns)."}
    )
    label_column: str = field(default="label", metadata={"help": "Dataset column holding the class labels."})
    checkpoint_dir: str | None = field(
        default=None, metadata={"help": "Where to write `accelerator.save_state` checkpoints (each epoch)."}
    )
    checkpoint_steps: int | None = field(
        default=None, metadata={"help": "Also checkpoint every this many optimiser steps (needs checkpoint_dir)."}
    )
    resume_from: str | None = field(
        default=None, metadata={"help": "A checkpoint folder to resume from, or 'latest' (in checkpoint_dir)."}
    )
    distill_alpha: float = field(
        default=0.5, metadata={"help": "Distillation weight: alpha * T^2 * KL + (1 - alpha) * CE (with a teacher)."}
    )
    distill_temperature: float = field(
        default=20.0, metadata={"help": "Distillation temperature T (the official scripts: 20)."}
    )
    log_with: tuple[str, ...] = field(
        default=(), metadata={"help": "Accelerate trackers to log metrics to, e.g. ['tensorboard']."}
    )
    project_dir: str | None = field(default=None, metadata={"help": "Folder for tracker logs."})
    seed: int = field(default=0, metadata={"help": "Seed for shuffling and initialisation."})
    progress: bool = field(default=True, metadata={"help": "Show tqdm progress bars (main process only)."})

    OPTIMIZERS: ClassVar[tuple[str, ...]] = ("sgd", "adam", "adamw")
    SCHEDULERS: ClassVar[tuple[str, ...]] = ("none", "multistep", "cosine")
    PRECISIONS: ClassVar[tuple[str, ...]] = ("no", "fp16", "bf16")

    def __post_init__(self) -> None:
        _check_choice("optimizer", self.optimizer, self.OPTIMIZERS)
        _check_choice("scheduler", self.scheduler, self.SCHEDULERS)
        _check_choice("mixed_precision", self.mixed_precision, self.PRECISIONS)
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


__all__ = ["FinetuneConfig", "FusionConfig"]
