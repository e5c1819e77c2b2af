"""Plots: layer cost matrices with the chosen cross-layer alignment drawn on them.

The functions take plain arrays and labels, not result objects; :meth:`FusionResult.plot_alignment` builds them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ClaFusionError


if TYPE_CHECKING:
    from matplotlib.figure import Figure


def plot_alignment(
    costs: Sequence[Any],
    alignments: Sequence[Sequence[int]],
    *,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    titles: Sequence[str] | None = None,
    row_starts: Sequence[int] | None = None,
    column_starts: Sequence[int] | None = None,
    colorbar_label: str = "layer cost (lower: more similar)",
    path: str | Path | None = None,
) -> Figure:
    """One heatmap per cost matrix, with its alignment circled, so each alignment reads as a monotone staircase.

    Args:
        costs: per panel, a ``(deep, shallow)`` cost matrix (a numpy array or nested lists).
        alignments: per panel, for each column ``j`` the row matched to it (``len(alignments[i]) == shallow``).
        row_labels: per panel, the y-axis label (default ``"deeper model layer"``).
        column_labels: per panel, the x-axis label (default ``"shallower model layer"``).
        titles: per panel, the title (default ``"cost and alignment"``).
        row_starts: per panel, the number of the first row's layer (default 0): ticks read ``start + i``, so
            a panel of one segment can be numbered over the whole network, as the model card's table is.
        column_starts: the same for the columns.
        colorbar_label: the label of every panel's colour bar.
        path: when given, the figure is saved there as PNG (matplotlib's non-interactive Agg canvas; no display
            needed).

    Returns:
        The matplotlib ``Figure``; with no panels, one that says there are no layers to align.
    """
    import numpy as np
    from matplotlib.figure import Figure

    count = len(costs)
    if len(alignments) != count:
        raise ClaFusionError(
            f"plot_alignment got {count} cost matrices but {len(alignments)} alignments. Pass one alignment per "
            "cost matrix."
        )
    row_labels = row_labels if row_labels is not None else ["deeper model layer"] * count
    column_labels = column_labels if column_labels is not None else ["shallower model layer"] * count
    titles = titles if titles is not None else ["cost and alignment"] * count
    row_starts = row_starts if row_starts is not None else [0] * count
    column_starts = column_starts if column_starts is not None else [0] * count
    fig = Figure(figsize=(3.6 * max(count, 1), 3.4), layout="constrained")
    if not count:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no layers to align", ha="center", va="center")
        ax.set_axis_off()
    for i, (cost, alignment) in enumerate(zip(costs, alignments)):
        cost = np.asarray(cost, dtype=np.float64)
        ax = fig.add_subplot(1, count, i + 1)
        image = ax.imshow(cost, cmap="viridis", aspect="auto", origin="upper")
        ax.plot(range(len(alignment)), alignment, "o", mfc="none", mec="red", mew=2, ms=12, label="alignment")
        ax.plot(range(len(alignment)), alignment, "-", color="red", lw=1)
        ax.set_xlabel(column_labels[i])
        ax.set_ylabel(row_labels[i])
        ax.set_xticks(range(cost.shape[1]), [str(column_starts[i] + j) for j in range(cost.shape[1])])
        ax.set_yticks(range(cost.shape[0]), [str(row_starts[i] + j) for j in range(cost.shape[0])])
        ax.set_title(titles[i], fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8).set_label(colorbar_label, fontsize=8)
    if path is not None:
        fig.savefig(str(path), dpi=110)
    return fig


__all__ = ["plot_alignment"]
