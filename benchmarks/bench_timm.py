"""Real-data benchmark of the timm adapter: two timm ResNets of different depth, fused with CLAFusion.

For each seed it trains a deep and a shallow timm ResNet (BasicBlock) on scikit-learn's digits (8x8, upsampled
to 16x16) or on Fashion-MNIST (``--dataset fashion-mnist``, read from ``/usr/share/datasets/fashion-mnist``),
then fuses them with the cross-layer alignment (CLA), the ``chain`` and ``random`` baselines, and CLA computed
on residual contributions (block output minus block input) instead of block outputs. Every model is
evaluated on the held-out split before and after the same short finetune (``hf_clafusion.finetune``). The
parents get the same finetune, so "after" rows compare equal training budgets.

Run by hand (not part of the test suite); a few minutes on 2 CPU cores:

    python benchmarks/bench_timm.py                       # digits, 3 seeds
    python benchmarks/bench_timm.py --dataset fashion-mnist --train-size 12000
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import statistics
import time
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn

import hf_clafusion.core as core
from hf_clafusion import FinetuneConfig, FusionConfig, finetune, fuse
from hf_clafusion.adapters.base import capture_outputs


DEEP, SHALLOW = [5, 4, 1, 1], [3, 2, 1, 1]
CHANNELS = (16, 32, 32, 32)
FASHION = Path("/usr/share/datasets/fashion-mnist")


def load_data(name: str, train_size: int, seed: int):
    if name == "digits":
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        x = nn.functional.interpolate(x, size=16, mode="bilinear", align_corners=False)
        y = torch.tensor(data.target, dtype=torch.long)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        x, y = (x[perm] - 0.3) / 0.35, y[perm]
        return (x[:1400], y[:1400]), (x[1400:], y[1400:])

    def read(kind):
        with gzip.open(FASHION / f"{kind}-images-idx3-ubyte.gz") as f:
            images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
        with gzip.open(FASHION / f"{kind}-labels-idx1-ubyte.gz") as f:
            labels = np.frombuffer(f.read(), np.uint8, offset=8)
        return (torch.tensor(images, dtype=torch.float32) / 255.0 - 0.29) / 0.35, torch.tensor(labels).long()

    x, y = read("train")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:train_size]
    xt, yt = read("t10k")
    return (x[perm], y[perm]), (xt[:2000], yt[:2000])


def make(layers, seed):
    torch.manual_seed(seed)
    return timm.create_model(
        "resnet18", pretrained=False, num_classes=10, in_chans=1, layers=layers, channels=CHANNELS
    )


def train(model, x, y, epochs, seed, lr=3e-3, batch_size=64):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for start in range(0, len(x), batch_size):
            idx = perm[start : start + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    return float(
        sum((model(x[i : i + 500]).argmax(-1) == y[i : i + 500]).sum() for i in range(0, len(x), 500)) / len(x)
    )


@torch.no_grad()
def contribution_alignment(deep, shallow, x, first_fixed=1, last_fixed=1):
    """CLA on residual contributions ``block(x) - x`` (stages whose depths differ), keyed by cost shape."""
    out = {}
    for stage, (m, n) in enumerate(zip(DEEP, SHALLOW), start=1):
        if m == n:
            continue
        acts = []
        for model, depth in ((deep, m), (shallow, n)):
            names = [f"layer{stage}.{j}" for j in range(depth)] + [f"layer{stage}.{j}:input" for j in range(depth)]
            with capture_outputs(model, names) as store:
                model(x)
            # block 0 changes resolution/width: its contribution is its output (the input is not comparable)
            acts.append(
                [store[f"layer{stage}.0"].clone()]
                + [store[f"layer{stage}.{j}"] - store[f"layer{stage}.{j}:input"] for j in range(1, depth)]
            )
        cost = core.cka_cost_matrix(acts[0], acts[1])
        first, last = core.relax_constraints(n, first_fixed, last_fixed)
        out[(m, n)] = core.align_layers(cost, first_fixed=first, last_fixed=last)
    return out


@contextlib.contextmanager
def forced_alignment(by_shape):
    original = core.align_layers

    def align(cost, *, first_fixed=1, last_fixed=1):
        return by_shape.get(tuple(cost.shape)) or original(cost, first_fixed=first_fixed, last_fixed=last_fixed)

    core.align_layers = align
    try:
        yield
    finally:
        core.align_layers = original


def run_seed(args, seed):
    (x_train, y_train), (x_test, y_test) = load_data(args.dataset, args.train_size, seed)
    start = time.perf_counter()
    deep = train(make(DEEP, seed), x_train, y_train, args.epochs, seed)
    shallow = train(make(SHALLOW, seed + 100), x_train, y_train, args.epochs, seed + 100)
    train_s = time.perf_counter() - start
    calib = x_train[: args.calibration]
    rows, alignments = {}, {}
    rows["parent deep " + str(DEEP)] = deep
    rows["parent shallow " + str(SHALLOW)] = shallow
    for name, alignment in (("fused CLA", "cla"), ("fused chain", "chain"), ("fused random", "random")):
        result = fuse([deep, shallow], calib, FusionConfig(alignment=alignment, seed=seed, progress=False))
        rows[name] = result.model
        alignments[name] = result.layer_alignment
    contrib = contribution_alignment(deep, shallow, calib)
    with forced_alignment(contrib):
        result = fuse([deep, shallow], calib, FusionConfig(seed=seed, progress=False))
    rows["fused CLA (contribution cost)"] = result.model
    alignments["fused CLA (contribution cost)"] = result.layer_alignment
    before = {name: accuracy(m, x_test, y_test) for name, m in rows.items()}
    after = {}
    config = FinetuneConfig(
        epochs=args.finetune_epochs, optimizer="adam", lr=1e-3, weight_decay=0.0, progress=False, seed=seed
    )
    for name, model in rows.items():
        copy_ = __import__("copy").deepcopy(model)
        finetune(copy_, (x_train, y_train), config=config)
        after[name] = accuracy(copy_, x_test, y_test)
    return before, after, alignments, train_s


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["digits", "fashion-mnist"], default="digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15, help="parent training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--train-size", type=int, default=12000, help="Fashion-MNIST training subset")
    parser.add_argument("--calibration", type=int, default=400, help="calibration samples for fusion")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = [run_seed(args, seed) for seed in args.seeds]
    names = list(results[0][0])
    print(
        f"\n{args.dataset}: timm ResNet (BasicBlock) layers={DEEP} vs {SHALLOW}, channels={CHANNELS}; "
        f"{len(args.seeds)} seeds; finetune {args.finetune_epochs} epoch(s) Adam 1e-3 for every row\n"
    )
    print("| model | accuracy before finetune | accuracy after finetune |")
    print("|---|---|---|")
    for name in names:
        b = [r[0][name] * 100 for r in results]
        a = [r[1][name] * 100 for r in results]
        print(
            f"| {name} | {statistics.mean(b):.2f} ± {statistics.pstdev(b):.2f} | "
            f"{statistics.mean(a):.2f} ± {statistics.pstdev(a):.2f} |"
        )
    print("\nLayer alignments (network-wide block indices of the deep model) per seed:")
    for seed, r in zip(args.seeds, results):
        print(f"  seed {seed}: " + "; ".join(f"{k}: {v}" for k, v in r[2].items() if k != "parent"))
    print(f"\nParent training: {statistics.mean(r[3] for r in results):.1f} s per seed (both parents).")


if __name__ == "__main__":
    main()
