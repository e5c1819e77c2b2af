"""The demo behind ``hf-clafusion demo``: a real fusion of heterogeneous networks on data that needs no download.

On scikit-learn's digits (or Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package), it trains two MLPs
of the paper's shapes (hidden 400-200-100-50-25 and 400-200-100) and two VGG-style CNNs of different depth,
fuses each pair with CLAFusion, finetunes the fused model briefly, and prints a table: each parent, their
prediction ensemble, CLAFusion before and after finetuning, and the chain-mapping baseline. Fused models and
alignment plots are saved under the output folder.
"""

from __future__ import annotations

import gzip
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .config import FinetuneConfig, FusionConfig
from .errors import CalibrationDataError
from .evaluation import EvaluationReport, evaluate
from .finetune import finetune
from .fusion import fuse


ROWS = (
    "deep parent",
    "shallow parent",
    "ensemble (prediction average)",
    "CLAFusion",
    "CLAFusion + finetune",
    "chain mapping (baseline)",
)
FASHION_MNIST_DIRS = (
    "/usr/share/dataset-fashion-mnist",
    "/usr/share/fashion-mnist",
    "/usr/share/datasets/fashion-mnist",
)


@dataclass
class Split:
    x: torch.Tensor  # (N, C, H, W) in [0, 1]
    y: torch.Tensor

    def flat(self) -> torch.Tensor:
        return self.x.flatten(1)


def _split(x: np.ndarray, y: np.ndarray, num_train: int, num_val: int, seed: int) -> tuple[Split, Split, Split]:
    perm = np.random.default_rng(seed).permutation(len(x))
    x_t = torch.tensor(x[perm], dtype=torch.float32)
    y_t = torch.tensor(y[perm], dtype=torch.long)
    train = Split(x_t[:num_train], y_t[:num_train])
    val = Split(x_t[num_train : num_train + num_val], y_t[num_train : num_train + num_val])
    test = Split(x_t[num_train + num_val :], y_t[num_train + num_val :])
    return train, val, test


def load_digits_splits(seed: int = 0) -> tuple[Split, Split, Split]:
    """scikit-learn's digits: 1,797 8x8 images, split 1,200 train / 300 validation / 297 test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0)[:, None].astype(np.float32)
    return _split(images, data.target, 1200, 300, seed)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as handle:
        raw = handle.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def find_fashion_mnist() -> Path | None:
    """The folder of Debian's ``dataset-fashion-mnist`` files, if the package is installed."""
    for folder in FASHION_MNIST_DIRS:
        for candidate in Path(folder).rglob("train-images-idx3-ubyte*") if Path(folder).is_dir() else ():
            return candidate.parent
    return None


def load_fashion_mnist_splits(seed: int = 0, num_train: int = 6000, num_val: int = 1000) -> tuple[Split, Split, Split]:
    """Fashion-MNIST from Debian's package, 28x28 images average-pooled to 14x14; the official test set for testing."""
    folder = find_fashion_mnist()
    if folder is None:
        raise CalibrationDataError(
            f"Fashion-MNIST is not installed (looked in {', '.join(FASHION_MNIST_DIRS)}). Install it with "
            "`apt-get install dataset-fashion-mnist`, or run the demo with --dataset digits."
        )

    def load(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        images = _read_idx(next(folder.glob(f"{prefix}-images-idx3-ubyte*")))
        labels = _read_idx(next(folder.glob(f"{prefix}-labels-idx1-ubyte*")))
        x = torch.tensor(images, dtype=torch.float32)[:, None] / 255.0
        return F.avg_pool2d(x, 2).numpy(), labels.astype(np.int64)

    x, y = load("train")
    train, val, _ = _split(x, y, num_train, num_val, seed)
    x_test, y_test = load("t10k")
    return train, val, Split(torch.tensor(x_test), torch.tensor(y_test))


def make_mlp(in_features: int, hidden: list[int], num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def make_cnn(config: list, in_channels: int, size: int, num_classes: int) -> nn.Sequential:
    """VGG-style: 3x3 conv + BatchNorm + ReLU, 'M' = 2x2 max-pool, then a linear classifier."""
    layers: list[nn.Module] = []
    channels = in_channels
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            size //= 2
        else:
            layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU()]
            channels = item
    layers += [nn.Flatten(), nn.Linear(channels * size * size, num_classes)]
    return nn.Sequential(*layers)


def train_parent(model: nn.Module, train: Split, *, epochs: int, lr: float, seed: int) -> nn.Module:
    """Adam with cross-entropy: a few seconds on a CPU."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(train.x), generator=generator)
        for start in range(0, len(perm), 64):
            idx = perm[start : start + 64]
            loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def run_pair(
    name: str,
    deep: nn.Module,
    shallow: nn.Module,
    data: tuple[Split, Split, Split],
    output: Path,
    seed: int,
    finetune_epochs: int,
    dataset_name: str,
) -> list[tuple[str, float]]:
    train, val, test = data
    config = FusionConfig(seed=seed, progress=False)
    result = fuse([deep, shallow], train.x, config)
    chain = fuse([deep, shallow], train.x, config, alignment="chain")
    parents = evaluate([deep, shallow], (test.x, test.y), names=["deep parent", "shallow parent"])
    before = evaluate([result.model, chain.model], (test.x, test.y), ensemble=False)
    start = time.perf_counter()
    finetuned = finetune(
        result.model,
        (train.x, train.y),
        (val.x, val.y),
        FinetuneConfig(
            epochs=finetune_epochs,
            lr=0.02,
            optimizer="sgd",
            momentum=0.9,
            weight_decay=5e-4,
            batch_size=64,
            seed=seed,
            progress=False,
            keep_best=True,  # the weights of the best validation accuracy, the fused model before training included
        ),
    )
    result.timings["finetune"] = time.perf_counter() - start
    after = evaluate([finetuned.model], (test.x, test.y), ensemble=False)[0]
    report = EvaluationReport([parents[0], parents[1], parents[2], before[0], after, before[1]])
    for row, label in zip(report, ROWS):
        row.name = label
    result.record_finetune(finetuned)
    result.record_evaluation(report, dataset=dataset_name, fused="CLAFusion + finetune")
    folder = result.save_pretrained(output / name, overwrite=True, model_name=f"CLAFusion {name} ({dataset_name})")
    print(f"\n{name}: {result.summary()}\nsaved to {folder} (alignment plot: {folder / 'alignment.png'})")
    return [(row.name, row.accuracy) for row in report]


def run_demo(
    dataset: str = "digits", output: str | Path = "clafusion-demo", seed: int = 0, quick: bool = False
) -> dict:
    """Run the demo; returns ``{pair name: [(row, accuracy), ...]}`` and prints the table."""
    torch.manual_seed(seed)
    output = Path(output)
    if dataset == "digits":
        data = load_digits_splits(seed)
        epochs = {"mlp": 40, "cnn": 25}
    elif dataset == "fashion-mnist":
        data = load_fashion_mnist_splits(seed)
        epochs = {"mlp": 8, "cnn": 5}
    else:
        raise CalibrationDataError(f"Unknown demo dataset {dataset!r}. Choose 'digits' or 'fashion-mnist'.")
    if quick:
        epochs = {k: max(1, v // 8) for k, v in epochs.items()}
    train = data[0]
    channels, size = train.x.shape[1], train.x.shape[-1]
    features = channels * size * size
    num_classes = int(train.y.max()) + 1
    print(
        f"Dataset {dataset}: {len(train.x)} train / {len(data[1].x)} validation / {len(data[2].x)} test images "
        f"of {channels}x{size}x{size}"
    )
    pairs = {
        "mlp": (
            make_mlp(features, [400, 200, 100, 50, 25], num_classes),
            make_mlp(features, [400, 200, 100], num_classes),
        ),
        "cnn": (
            make_cnn([32, 32, "M", 64, 64, 64, "M"], channels, size, num_classes),
            make_cnn([16, "M", 32, "M"], channels, size, num_classes),
        ),
    }
    tables = {}
    for name, (deep, shallow) in pairs.items():
        start = time.perf_counter()
        train_parent(deep, train, epochs=epochs[name], lr=1e-3, seed=seed)
        train_parent(shallow, train, epochs=epochs[name], lr=1e-3, seed=seed + 1)
        print(f"trained the {name} parents in {time.perf_counter() - start:.1f}s")
        tables[name] = run_pair(
            name, deep, shallow, data, output, seed, finetune_epochs=1 if quick else 5, dataset_name=dataset
        )
    print(format_table(tables, dataset))
    print(verdict(tables))
    return tables


def verdict(tables: dict) -> str:
    """One line per pair: how the fused model compares with the baselines the table shows, said plainly."""
    lines = []
    for name, rows in tables.items():
        acc = {row: 100 * value for row, value in rows}
        best = max(acc["deep parent"], acc["shallow parent"])
        one_shot = acc["CLAFusion"] - acc["chain mapping (baseline)"]
        tuned = acc["CLAFusion + finetune"] - best
        lines.append(
            f"{name}: one-shot CLAFusion is {abs(one_shot):.2f} points {'above' if one_shot >= 0 else 'below'} the "
            f"chain-mapping baseline; after finetuning it is {abs(tuned):.2f} points "
            f"{'above' if tuned >= 0 else 'below'} the better parent (which was not finetuned here: "
            "benchmarks/bench_quality.py gives every model the same finetuning budget)."
        )
    return "\n".join(lines)


def format_table(tables: dict, dataset: str) -> str:
    names = list(tables)
    rows = [row for row, _ in next(iter(tables.values()))]
    width = max(len(r) for r in rows)
    lines = ["", f"Test accuracy on {dataset}", f"{'model':<{width}}  " + "  ".join(f"{n:>8}" for n in names)]
    lines.append("-" * width + "  " + "  ".join("-" * 8 for _ in names))
    for i, row in enumerate(rows):
        lines.append(f"{row:<{width}}  " + "  ".join(f"{100 * tables[n][i][1]:7.2f}%" for n in names))
    return "\n".join(lines)
