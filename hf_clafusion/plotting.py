"""Plots: layer cost matrices with the chosen cross-layer alignment drawn on them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .result import PairAlignment


def plot_alignment(pairs: Sequence[PairAlignment], path: str | Path | None = None) -> Figure:
    """One heatmap per (pair, segment): rows are the deeper model's layers, columns the shallower one's.

    Each matched cell is circled, so the alignment reads as a monotone staircase. Saved as PNG when
    ``path`` is given (matplotlib's non-interactive Agg canvas; no display needed).
    """
    from matplotlib.figure import Figure

    panels = [(p, s) for p in pairs for s in range(len(p.alignment)) if p.costs[s].numel() > 0]
    fig = Figure(figsize=(3.6 * max(len(panels), 1), 3.4), layout="constrained")
    if not panels:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no layers to align", ha="center", va="center")
        ax.set_axis_off()
    for i, (pair, s) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        cost = pair.costs[s].detach().cpu().double().numpy()
        deep = pair.deeper[s]
        shallow = pair.reference if deep == pair.model else pair.model
        local = pair.local(s)
        image = ax.imshow(cost, cmap="viridis", aspect="auto", origin="upper")
        ax.plot(range(len(local)), local, "o", mfc="none", mec="red", mew=2, ms=12, label="alignment")
        ax.plot(range(len(local)), local, "-", color="red", lw=1)
        ax.set_xlabel(f"model {shallow} layer (segment {s})")
        ax.set_ylabel(f"model {deep} layer")
        ax.set_xticks(range(cost.shape[1]))
        ax.set_yticks(range(cost.shape[0]))
        ax.set_title(f"segment {s}: cost and alignment", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    if path is not None:
        fig.savefig(str(path), dpi=110)
    return fig
