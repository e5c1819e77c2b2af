"""Plot: variance collapse after averaging, and what statistics repair (REPAIR) does about it.

Run by hand (not a test), from the repository root, in the project's environment (a few seconds on a CPU):

    .venv/bin/python benchmarks/plot_repair.py                        # writes docs/img/repair_std.png
    .venv/bin/python benchmarks/plot_repair.py --output /tmp/repair.png --seed 1

Two MLPs of the same shape (64 -> 5 x 64 -> 10, ReLU, with biases) are trained from different initialisations
on scikit-learn's digits for a few epochs, then fused twice with the public API: ``repair=None`` (plain
averaging of the aligned neurons) and ``repair="repair"``. For each hidden layer the plot shows the standard
deviation of its pre-activation (the ``Linear`` output) over the test images, averaged over the layer's
channels, for both parents and both fused models, with the REPAIR target ``sigma* = (sigma_A + sigma_B) / 2``
(averaged over channels) that the repaired model is corrected to. A permutation of a parent's neurons does not change this per-layer
average, so the parents' curves are also those of the aligned parents. Statistics repair is calibrated on the
training images; the curves and the accuracies in the legend are measured on the held-out test images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from hf_clafusion import FusionConfig, fuse
from hf_clafusion.demo import load_digits_splits, make_mlp, train_parent


HIDDEN = [64, 64, 64, 64, 64]


@torch.no_grad()
def layer_stds(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Per hidden ``Linear`` (the classifier excluded): its output's std over ``x``, averaged over channels."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]
    outputs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach().clone())) for m in linears]
    try:
        model.eval()(x)
    finally:
        for hook in hooks:
            hook.remove()
    return [float(out.std(dim=0, unbiased=False).mean()) for out in outputs]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model.eval()(x).argmax(-1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("docs/img/repair_std.png"))
    parser.add_argument("--seed", type=int, default=0, help="Data split seed; the parents use seed and seed + 1.")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, _, test = load_digits_splits(args.seed)
    parents = []
    for k in range(2):
        torch.manual_seed(args.seed + k)
        parents.append(train_parent(make_mlp(64, HIDDEN, 10), train, epochs=args.epochs, lr=1e-3, seed=args.seed + k))

    calibration = train.x[:400]
    fused = {
        mode: fuse(parents, calibration, FusionConfig(repair=mode, num_samples=400, progress=False)).model
        for mode in (None, "repair")
    }

    x, y = test.x, test.y
    curves = {
        "parent A": (layer_stds(parents[0], x), accuracy(parents[0], x, y), dict(color="tab:blue", ls="--")),
        "parent B": (layer_stds(parents[1], x), accuracy(parents[1], x, y), dict(color="tab:orange", ls="--")),
        "fused, repair=None": (
            layer_stds(fused[None], x),
            accuracy(fused[None], x, y),
            dict(color="tab:red", marker="o"),
        ),
        'fused, repair="repair"': (
            layer_stds(fused["repair"], x),
            accuracy(fused["repair"], x, y),
            dict(color="tab:green", marker="s"),
        ),
    }

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    layers = range(1, len(HIDDEN) + 1)
    target = [(a + b) / 2 for a, b in zip(curves["parent A"][0], curves["parent B"][0])]
    ax.plot(layers, target, color="black", ls=":", lw=2, zorder=5, label="REPAIR target: mean of the parents' std")
    for label, (stds, acc, style) in curves.items():
        ax.plot(layers, stds, label=f"{label} (test accuracy {100 * acc:.1f} %)", lw=2, **style)
        print(f"{label:26s} acc {100 * acc:5.1f} %  std per layer {[round(s, 3) for s in stds]}")
    ax.set_xticks(list(layers))
    ax.set_xlabel("hidden layer (pre-activation, Linear output)")
    ax.set_ylabel("activation std, mean over channels")
    ax.set_ylim(bottom=0)
    ax.set_title("Variance collapse after averaging two MLPs (digits), and REPAIR")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8.5)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
