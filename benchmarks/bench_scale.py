#!/usr/bin/env python
"""Width scaling of the neuron-transport step for ``hf_clafusion`` (run by hand; not a test).

Prints markdown tables of seconds per width ``n``:

1. **equal widths** ``(n, n)``: the exact solvers ``solver="auto"`` chooses between -- a linear assignment
   (``scipy.optimize.linear_sum_assignment``, what ``"auto"`` runs here) and POT's network simplex
   (``ot.emd``, ``solver="emd"``) -- plus log-domain Sinkhorn (``solver="sinkhorn"``, ``reg=0.05``) for
   reference, and the crossover width from which the assignment is faster than EMD;
2. **unequal widths** ``(n, 4n)`` (``--ratio``; e.g. a 768-wide group against a 3072-wide one): EMD, which ``"auto"`` runs there,
   and, for reference, the linear assignment on costs whose rows are replicated four times (also exact,
   because integral supplies have an integral optimal flow);
3. **statistics**: one group's :class:`~hf_clafusion.core.ActivationStats` on ``--samples`` token samples in
   batches of 512, with float32 products (the default) and float64 products, and the RMS-distance cost.

Costs come from the statistics of synthetic activations with structure like a trained layer's: ``a`` is a
rank-64 signal plus noise (``S = 2048`` samples), ``b`` is a permuted copy of ``a`` plus as much noise again,
so the optimum is unique but not trivial. Every solver gets the same cost matrix; the plans of the exact
solvers are checked to have the same objective. A cell is skipped (``-``) when the previous width's time,
scaled by the width ratio to the power 3 (exact solvers) or 2 (Sinkhorn's iterations, statistics), would
exceed ``--budget`` seconds. Sinkhorn runs up to 1000 log-domain iterations (``stopThr=1e-9`` is rarely
reached first). ``OMP_NUM_THREADS`` and torch's thread count are left as they are; the 1-minute load average
is printed with each table.

Usage::

    python benchmarks/bench_scale.py                          # 64 ... 8192, budget 120 s per cell
    python benchmarks/bench_scale.py --widths 256 1024 4096 --budget 60
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

from hf_clafusion.core import ActivationStats, transport_plan


SIGNAL_RANK = 64
COST_SAMPLES = 2048


def structured_acts(samples: int, n_b: int, n_a: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(samples, n_B)`` and ``(samples, n_A)`` float32 activations, B's neurons noisy copies of some of A's."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(samples, SIGNAL_RANK, generator=g)
    acts_a = latent @ torch.randn(SIGNAL_RANK, n_a, generator=g) / SIGNAL_RANK**0.5 + torch.randn(
        samples, n_a, generator=g
    )
    picked = torch.randperm(n_a, generator=g)[:n_b] if n_b <= n_a else torch.randint(n_a, (n_b,), generator=g)
    acts_b = acts_a[:, picked] + torch.randn(samples, n_b, generator=g)
    return acts_b, acts_a


def structured_cost(n_b: int, n_a: int) -> np.ndarray:
    stats = ActivationStats()
    acts_b, acts_a = structured_acts(COST_SAMPLES, n_b, n_a)
    for start in range(0, COST_SAMPLES, 512):
        stats.update(acts_b[start : start + 512], acts_a[start : start + 512])
    return stats.distances().numpy()


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def assignment(cost: np.ndarray, replicate: int = 1) -> np.ndarray:
    n_b, n_a = cost.shape
    rows, cols = linear_sum_assignment(np.repeat(cost, replicate, axis=0) if replicate > 1 else cost)
    plan = np.zeros((n_b, n_a))
    np.add.at(plan, (rows // replicate, cols), 1.0 / n_a)
    return plan


def emd(cost: np.ndarray) -> np.ndarray:
    n_b, n_a = cost.shape
    return ot.emd(np.full(n_b, 1.0 / n_b), np.full(n_a, 1.0 / n_a), cost, numItermax=10_000_000)


def sinkhorn(cost: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():  # a capped run may not converge; only its time is reported
        warnings.simplefilter("ignore")
        return transport_plan(torch.from_numpy(cost), solver="sinkhorn", reg=0.05, max_iter=1000).numpy()


class Column:
    """One solver's timings across widths, skipping widths predicted to exceed the budget."""

    def __init__(self, name: str, budget: float, power: int = 3) -> None:
        self.name, self.budget, self.power, self.last, self.times = name, budget, power, None, {}

    def skips(self, width: int, prev_width: int | None) -> bool:
        if self.last is None or not prev_width:
            return False
        return self.last * (width / prev_width) ** self.power > self.budget

    def run(self, width: int, fn, prev_width: int | None):
        if self.skips(width, prev_width):
            self.times[width] = None
            return None
        seconds, out = timed(fn, repeats=3 if (self.last or 0) < 0.2 else 1)
        self.last, self.times[width] = seconds, seconds
        return out


def fmt(value: float | None) -> str:
    return "-" if value is None else (f"{value:.2g}" if value < 1 else f"{value:.1f}")


def crossover(fast: dict, slow: dict) -> str:
    """The smallest width from which ``fast`` beats ``slow`` at every measured width."""
    widths = [w for w in fast if fast[w] is not None and slow.get(w) is not None]
    for i, w in enumerate(widths):
        if all(fast[v] < slow[v] for v in widths[i:]):
            return f"{w}" + (" (faster at every measured width)" if i == 0 else "")
    return "none measured"


def print_table(columns: dict, widths: list[int]) -> None:
    """One markdown row per width, one column of seconds per solver or statistic."""
    print("| n | " + " | ".join(columns) + " |")
    print("|---:|" + "---:|" * len(columns))
    for width in widths:
        print(f"| {width} | " + " | ".join(fmt(c.times.get(width)) for c in columns.values()) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--budget", type=float, default=120.0, help="Skip a cell predicted to take longer (s).")
    parser.add_argument("--samples", type=int, default=4096, help="Token samples for the statistics table.")
    parser.add_argument("--ratio", type=int, default=4, help="Width ratio of the unequal-widths table.")
    args = parser.parse_args()
    widths = sorted(args.widths)
    for fn in (assignment, emd, sinkhorn):  # warm up imports and caches outside the timings
        fn(structured_cost(8, 8))
    print(f"# bench_scale: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, POT {ot.__version__}")

    # 1. equal widths
    cols = {name: Column(name, args.budget) for name in ("assignment (auto)", "emd")}
    cols["sinkhorn"] = Column("sinkhorn", args.budget, power=2)  # O(n^2) per iteration, 1000 iterations
    fns = {"assignment (auto)": assignment, "emd": emd, "sinkhorn": sinkhorn}
    prev = None
    for width in tqdm(widths, desc="equal widths"):
        if all(c.skips(width, prev) for c in cols.values()):
            break
        cost = structured_cost(width, width)
        plans = {name: cols[name].run(width, lambda f=fns[name], c=cost: f(c), prev) for name in cols}
        if plans["assignment (auto)"] is not None and plans["emd"] is not None:
            gap = abs(float((plans["assignment (auto)"] - plans["emd"]).ravel() @ cost.ravel()))
            assert gap < 1e-9, f"assignment and EMD objectives differ by {gap} at width {width}"
        prev = width
    print(f"\n## Equal widths (n, n): seconds (1-min load average {os.getloadavg()[0]:.2f})\n")
    print_table(cols, widths)
    cross = crossover(cols["assignment (auto)"].times, cols["emd"].times)
    print(f"\nCrossover (assignment faster than EMD from): {cross}")

    # 2. unequal widths
    ratio = args.ratio
    ucols = {name: Column(name, args.budget) for name in ("emd (auto)", f"assignment on {ratio}x rows")}
    prev = None
    for width in tqdm(widths, desc=f"widths (n, {ratio}n)"):
        if all(c.skips(width, prev) for c in ucols.values()):
            ucols_skipped = [c.run(width, None, prev) for c in ucols.values()]
            assert ucols_skipped == [None] * len(ucols)
            continue
        cost = structured_cost(width, ratio * width)
        plan_emd = ucols["emd (auto)"].run(width, lambda c=cost: emd(c), prev)
        plan_lap = ucols[f"assignment on {ratio}x rows"].run(width, lambda c=cost: assignment(c, ratio), prev)
        if plan_emd is not None and plan_lap is not None:
            gap = abs(float((plan_lap - plan_emd).ravel() @ cost.ravel()))
            assert gap < 1e-9, f"replicated assignment and EMD objectives differ by {gap} at width {width}"
        prev = width
    print(f"\n## Unequal widths (n, {ratio}n): seconds (1-min load average {os.getloadavg()[0]:.2f})\n")
    print_table(ucols, widths)

    # 3. statistics
    scols = {name: Column(name, args.budget, power=2) for name in ("float32 products", "float64 products")}
    scols["distances()"] = Column("distances()", args.budget, power=2)
    prev = None
    for width in tqdm(widths, desc="statistics"):
        acts_b, acts_a = structured_acts(args.samples, width, width, seed=1)

        def accumulate(dtype: torch.dtype, b=acts_b, a=acts_a) -> ActivationStats:
            stats = ActivationStats(dtype)
            for start in range(0, args.samples, 512):
                stats.update(b[start : start + 512], a[start : start + 512])
            return stats

        stats = scols["float32 products"].run(width, lambda: accumulate(torch.float32), prev)
        scols["float64 products"].run(width, lambda: accumulate(torch.float64), prev)
        if stats is not None:
            scols["distances()"].run(width, stats.distances, prev)
        prev = width
    print(
        f"\n## Statistics of one (n, n) group on {args.samples} samples: seconds "
        f"(1-min load average {os.getloadavg()[0]:.2f})\n"
    )
    print_table(scols, widths)


if __name__ == "__main__":
    main()
