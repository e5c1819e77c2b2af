#!/usr/bin/env python
"""Fusion speed and memory benchmark for ``hf_clafusion`` (run by hand; not a test).

Prints three markdown tables:

1. the paper's MLP pair on digits-shaped input (64 -> 400-200-100-50-25 -> 10 fused with
   64 -> 400-200-100 -> 10, 200 calibration samples): wall time per pipeline stage, peak memory, and the
   ratio to the "floor" (one forward pass of both parents over the calibration samples);
2. scaling with the hidden width W (deep: 4 hidden layers of width W, shallow: 2), 200 samples;
3. scaling with the number of calibration samples for ``layer_cost="cka"`` and ``"cka_minibatch"``.

Every case runs in a fresh subprocess (this file with ``--worker``), so imports are excluded from the timings
and the peak-memory figure is the growth of ``ru_maxrss`` above the post-import, post-construction baseline.
Each case is timed as the median of several ``fuse`` calls after one warm-up call. The number of torch
threads is left at torch's default.

Usage::

    python benchmarks/bench_fusion.py                  # full run (several minutes on 2 cores)
    python benchmarks/bench_fusion.py --quick          # fewer repeats and sizes
    python benchmarks/bench_fusion.py --output bench.md
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


STAGES = (
    "prepare",
    "activations_layers",
    "layer_alignment",
    "balancing",
    "activations_groups",
    "transport",
    "averaging",
    "bn_reset",
)
INPUT_FEATURES = 64
NUM_CLASSES = 10
PAPER_DEEP = (400, 200, 100, 50, 25)
PAPER_SHALLOW = (400, 200, 100)
PAPER_SAMPLES = 200
FUSION_BATCH_SIZE = 100  # FusionConfig's default batch_size (sections 1 and 2)
PAPER_TARGET_S = 0.3
OFFICIAL_S = 1.3
SINKHORN_THRESHOLD_S = 60.0
RESULT_PREFIX = "BENCH_RESULT:"
BUSY_CORES = 0.3  # other processes' CPU use above which a quick case is measured again
RETRY_MAX_S = 60.0
RETRY_PAUSE_S = 15.0


# --------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One benchmark measurement, run in its own subprocess."""

    name: str
    deep: tuple[int, ...]
    shallow: tuple[int, ...]
    num_samples: int
    config: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None  # "paper" -> load the trained paper pair from the work directory
    repeats: int = 5
    time_budget_s: float = 120.0

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> Case:
        data = json.loads(text)
        data["deep"], data["shallow"] = tuple(data["deep"]), tuple(data["shallow"])
        return cls(**data)


# --------------------------------------------------------------------------------------------- models and data


def build_mlp(widths: tuple[int, ...], seed: int):
    """``nn.Sequential`` of Linear/ReLU: 64 -> widths... -> 10, seeded initialisation."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    previous = INPUT_FEATURES
    for width in widths:
        layers += [nn.Linear(previous, width), nn.ReLU()]
        previous = width
    layers.append(nn.Linear(previous, NUM_CLASSES))
    return nn.Sequential(*layers).eval()


def digits_like(num_samples: int, seed: int = 0):
    """``(num_samples, 64)`` standardised inputs and their labels, plus a description of the source.

    scikit-learn's digits in a seeded random order (1,797 distinct 8x8 images); rows beyond those are
    resampled images plus Gaussian noise (0.1 standard deviations). Without scikit-learn: standard normal
    inputs and random labels.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        inputs = torch.randn(num_samples, INPUT_FEATURES, generator=generator)
        labels = torch.randint(0, NUM_CLASSES, (num_samples,), generator=generator)
        return inputs, labels, "random normal inputs (scikit-learn not installed)"
    digits = load_digits()
    x = torch.as_tensor(digits.data, dtype=torch.float32)
    y = torch.as_tensor(digits.target, dtype=torch.long)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    order = torch.randperm(x.shape[0], generator=generator)
    x, y = x[order], y[order]
    source = "scikit-learn digits"
    extra = num_samples - x.shape[0]
    if extra > 0:
        index = torch.randint(0, x.shape[0], (extra,), generator=generator)
        noise = 0.1 * torch.randn(extra, INPUT_FEATURES, generator=generator)
        x, y = torch.cat([x, x[index] + noise]), torch.cat([y, y[index]])
        source += f" (first {digits.data.shape[0]} rows; further rows resampled with noise)"
    return x[:num_samples], y[:num_samples], source


def train_paper_pair(workdir: Path, steps: int, max_samples: int) -> str:
    """Train the paper pair for a few full-batch Adam steps, save both and the calibration data.

    Returns a one-line description of what was done.
    """
    import torch
    from torch import nn

    inputs, labels, source = digits_like(max_samples)
    torch.save(inputs, workdir / "data.pt")
    description = f"Calibration data: {source}"
    inputs, labels = inputs[:1797], labels[:1797]  # train on distinct images only
    for name, widths, seed in (("deep", PAPER_DEEP, 0), ("shallow", PAPER_SHALLOW, 1)):
        model = build_mlp(widths, seed).train()
        if steps > 0:
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            for _ in range(steps):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(inputs), labels).backward()
                optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(inputs).argmax(1) == labels).float().mean().item()
        description += f"; paper {name} ({steps} Adam steps): train accuracy {accuracy:.2f}"
        torch.save(model.state_dict(), workdir / f"paper_{name}.pt")
    return description


# --------------------------------------------------------------------------------------------- worker (one case)


def _max_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB.

    ``VmHWM`` from /proc/self/status where available: the same high-water mark as ``ru_maxrss``, but without
    ``getrusage``'s extra maximum over exited threads, so that :func:`_reset_peak_rss` really lowers it.
    Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _reset_peak_rss() -> bool:
    """Lower the RSS high-water mark to the current RSS (Linux ``/proc/self/clear_refs``).

    Importing torch briefly uses more memory than it keeps; without the reset that import-time peak would
    hide every fusion that stays below it. Returns whether the reset worked.
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _limit_data_segment(extra_bytes: int) -> None:
    """Cap this process's data segment so an oversized allocation raises instead of waking the OOM killer."""
    if not sys.platform.startswith("linux") or extra_bytes <= 0:
        return
    try:
        with open("/proc/self/status") as status:
            vm_data = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmData:"))
        resource.setrlimit(resource.RLIMIT_DATA, (vm_data + extra_bytes, resource.RLIM_INFINITY))
    except (OSError, ValueError, StopIteration):
        pass


def _busy_cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds used by the whole machine, CPU seconds used by this process) so far; None if unknown."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(v) for v in stat.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    own = os.times()
    return busy, own.user + own.system


def _other_cores(before: tuple[float, float] | None, after: tuple[float, float] | None, wall_s: float) -> float | None:
    """Average number of cores that *other* processes kept busy between two :func:`_busy_cpu_seconds`."""
    if before is None or after is None or wall_s <= 0:
        return None
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / wall_s)


def _floor_seconds(models, data, batch_size: int, repeats: int = 30) -> float:
    """Median time of the forward passes of all parents over the calibration data (the fusion's lower bound)."""
    import torch

    def once() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for model in models:
                for begin in range(0, data.shape[0], batch_size):
                    model(data[begin : begin + batch_size])
        return time.perf_counter() - start

    once()
    return statistics.median(once() for _ in range(repeats))


def run_worker(case: Case, workdir: Path, memory_limit_bytes: int) -> dict[str, Any]:
    """Measure one case in this (fresh) process; returns a JSON-serialisable dict."""
    import torch

    from hf_clafusion import FusionConfig, fuse

    deep, shallow = build_mlp(case.deep, 0), build_mlp(case.shallow, 1)
    if case.weights == "paper":
        deep.load_state_dict(torch.load(workdir / "paper_deep.pt"))
        shallow.load_state_dict(torch.load(workdir / "paper_shallow.pt"))
    data = torch.load(workdir / "data.pt")[: case.num_samples].clone()
    config = FusionConfig(num_samples=case.num_samples, progress=False, **case.config)
    gc.collect()
    peak_reset = _reset_peak_rss()
    baseline_mib = _max_rss_mib()
    _limit_data_segment(memory_limit_bytes)
    load_before = os.getloadavg()[0]
    cpu_before, wall_before = _busy_cpu_seconds(), time.perf_counter()

    def timed_fuse() -> tuple[float, dict[str, float]]:
        gc.collect()
        start = time.perf_counter()
        result = fuse([deep, shallow], data, config)
        return time.perf_counter() - start, dict(result.timings)

    warmup_s, _ = timed_fuse()
    runs = case.repeats
    if warmup_s * case.repeats > case.time_budget_s:
        runs = max(1, int(case.time_budget_s // max(warmup_s, 1e-9)))
    measured = [timed_fuse() for _ in range(runs)]
    peak_mib = _max_rss_mib()
    other = _other_cores(cpu_before, _busy_cpu_seconds(), time.perf_counter() - wall_before)
    load_after = os.getloadavg()[0]
    floor_s = _floor_seconds([deep, shallow], data, config.batch_size)

    totals = [total for total, _ in measured]
    stages = {s: statistics.median(t.get(s, 0.0) for _, t in measured) for s in STAGES}
    return {
        "ok": True,
        "runs": runs,
        "warmup_s": warmup_s,
        "total_s": statistics.median(totals),
        "total_min_s": min(totals),
        "total_max_s": max(totals),
        "stages": stages,
        "outside_s": statistics.median(total - sum(t.values()) for total, t in measured),
        "floor_s": floor_s,
        "peak_mib": peak_mib - baseline_mib,
        "baseline_mib": baseline_mib,
        "peak_reset": peak_reset,
        "load": [load_before, load_after],
        "other_cores": other,
        "threads": torch.get_num_threads(),
    }


def worker_main(case_json: str, workdir: str, memory_limit_bytes: int) -> None:
    case = Case.from_json(case_json)
    try:
        result = run_worker(case, Path(workdir), memory_limit_bytes)
    except (MemoryError, RuntimeError) as error:  # torch reports a failed allocation as RuntimeError
        message = str(error).splitlines()[0][:200]
        result = {"ok": False, "error": f"out of memory ({message})" if "alloc" in message else message}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------- driver


def available_memory_bytes() -> int:
    """``MemAvailable`` from /proc/meminfo (0 when unknown)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cka_gram_bytes(case: Case) -> int:
    """Rough peak of ``layer_cost='cka'``: float64 ``N x N`` Gram matrices, one per hidden layer wider than N.

    ``cka_cost_matrix`` uses the Gram form only for layers with more features than samples (the feature form,
    with no ``N x N`` matrix, otherwise) and keeps each Gram matrix for the whole cost matrix.
    """
    if case.config.get("layer_cost", "cka") != "cka":
        return 0
    wide = sum(1 for width in (*case.deep, *case.shallow) if width > case.num_samples)
    return wide * case.num_samples**2 * 8


def run_case(case: Case, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``case`` in a fresh interpreter; rerun it when other processes were busy and it is quick to redo.

    A case is retried (up to ``args.retries`` times, after a pause) when other processes kept more than
    ``BUSY_CORES`` cores busy during its timed runs and it took under ``RETRY_MAX_S`` seconds; the attempt
    with the least foreign CPU use is kept.
    """
    needed = cka_gram_bytes(case)
    if args.memory_limit and needed > args.memory_limit:
        return {
            "ok": False,
            "error": f"skipped: 'cka' Gram matrices need ~{needed / 2**30:.0f} GiB "
            f"(limit {args.memory_limit / 2**30:.0f} GiB)",
        }
    attempts = [_run_subprocess(case, workdir, args.memory_limit, args.case_timeout)]
    while len(attempts) <= args.retries:
        last = attempts[-1]
        busy = last.get("other_cores")
        if not last.get("ok") or busy is None or busy <= BUSY_CORES:
            break
        if last["warmup_s"] + last["runs"] * last["total_s"] > RETRY_MAX_S:
            break
        log(f"      other processes used {busy:.2f} cores; retrying in {RETRY_PAUSE_S:.0f} s")
        time.sleep(RETRY_PAUSE_S)
        attempts.append(_run_subprocess(case, workdir, args.memory_limit, args.case_timeout))
    done = [a for a in attempts if a.get("ok")]
    if not done:
        return attempts[-1]
    best = min(done, key=lambda a: a.get("other_cores") or 0.0)
    best["attempts"] = len(attempts)
    return best


def _run_subprocess(case: Case, workdir: Path, memory_limit: int, timeout_s: float) -> dict[str, Any]:
    """Run ``case`` once in a fresh interpreter and parse its result line."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", case.to_json(), str(workdir), str(memory_limit)]
    try:
        process = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(process.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (process.stderr.strip().splitlines() or [f"exit status {process.returncode}"])[-1]
    if process.returncode < 0:
        tail = f"killed by signal {-process.returncode} (out of memory?)"
    return {"ok": False, "error": tail[:200]}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- formatting


def seconds(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if value < 100 else f"{value:.1f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    align = ["---" if i == 0 else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def other_cores(result: dict[str, Any]) -> str:
    value = result.get("other_cores") if result.get("ok") else None
    return "-" if value is None else f"{value:.2f}"


def load_note(results: list[dict[str, Any]]) -> str:
    """One sentence on how busy the machine was while these cases ran."""
    done = [r for r in results if r.get("ok")]
    if not done:
        return ""
    loads = [x for r in done for x in r["load"]]
    note = f"1-min load average {min(loads):.2f}-{max(loads):.2f} on {os.cpu_count()} CPU(s)"
    others = [r["other_cores"] for r in done if r.get("other_cores") is not None]
    if others:
        note += f"; other processes kept up to {max(others):.2f} cores busy during the timed runs ('other CPU')"
    return note + "."


def stage_columns(result: dict[str, Any]) -> list[str]:
    if not result.get("ok"):
        return ["-"] * len(STAGES)
    return [seconds(result["stages"][s]) for s in STAGES]


def summary_columns(result: dict[str, Any]) -> list[str]:
    """runs, total, total range, peak memory, other processes' CPU (or the error)."""
    if not result.get("ok"):
        return ["-", result.get("error", "failed"), "-", "-", "-"]
    spread = f"{seconds(result['total_min_s'])}-{seconds(result['total_max_s'])}"
    return [
        str(result["runs"]),
        f"**{seconds(result['total_s'])}**",
        spread,
        f"{result['peak_mib']:.1f}",
        other_cores(result),
    ]


# --------------------------------------------------------------------------------------------- sections


def section_paper(workdir: Path, args: argparse.Namespace) -> str:
    case = Case("paper", PAPER_DEEP, PAPER_SHALLOW, PAPER_SAMPLES, weights="paper", repeats=args.repeats)
    log("[1/3] paper MLP pair")
    result = run_case(case, workdir, args)
    heading = (
        "## 1. Paper MLP pair (64 -> 400-200-100-50-25 -> 10 with 64 -> 400-200-100 -> 10), "
        f"{PAPER_SAMPLES} calibration samples\n\n"
        f"Target: total fusion time under {PAPER_TARGET_S} s on a 2-core machine (the official CLAFusion code "
        f"takes about {OFFICIAL_S} s). Median of {args.repeats} runs after 1 warm-up; default FusionConfig "
        "(cka, cla, identity, activations, emd)."
    )
    if not result.get("ok"):
        return f"{heading}\n\nFAILED: {result.get('error')}"
    total = result["total_s"]
    rows = [[s, seconds(result["stages"][s], 4), f"{100 * result['stages'][s] / total:.0f}%"] for s in STAGES]
    untimed = result["outside_s"]  # fuse() time outside the timed stages (median over runs)
    rows.append(["(outside stages)", seconds(untimed, 4), f"{100 * untimed / total:.0f}%"])
    rows.append(["**total (wall)**", f"**{seconds(total, 4)}**", "100%"])
    stage_table = table(["stage", "median (s)", "share"], rows)
    floor = result["floor_s"]
    verdict = "yes" if total < PAPER_TARGET_S else "NO"
    summary = table(
        [
            "total fusion (s)",
            "range (s)",
            "floor: parents' forward (s)",
            "fusion / floor",
            "peak RSS delta (MiB)",
            "other CPU",
            f"under {PAPER_TARGET_S} s",
        ],
        [
            [
                seconds(total, 4),
                f"{seconds(result['total_min_s'], 4)}-{seconds(result['total_max_s'], 4)}",
                seconds(floor, 5),
                f"{total / floor:.0f}x",
                f"{result['peak_mib']:.1f}",
                other_cores(result),
                verdict,
            ]
        ],
    )
    note = (
        "Floor: forward passes of both parents over the calibration samples (batches of "
        f"{FUSION_BATCH_SIZE}, no grad, median of 30). " + load_note([result])
    )
    return f"{heading}\n\n{stage_table}\n\n{summary}\n\n{note}"


def section_width(workdir: Path, args: argparse.Namespace) -> str:
    widths = args.widths
    results: list[tuple[int, str, dict[str, Any]]] = []

    def run(width: int, solver: str) -> dict[str, Any]:
        log(f"[2/3] width {width}, solver={solver}")
        case = Case(
            f"width{width}-{solver}",
            (width,) * 4,
            (width,) * 2,
            PAPER_SAMPLES,
            config={"solver": solver},
            repeats=args.scaling_repeats,
            time_budget_s=args.time_budget,
        )
        result = run_case(case, workdir, args)
        results.append((width, solver, result))
        return result

    emd = {w: run(w, "emd") for w in widths}
    largest = emd[max(widths)]
    slow = not largest.get("ok") or largest["total_s"] > SINKHORN_THRESHOLD_S
    sinkhorn = args.sinkhorn == "always" or (args.sinkhorn == "auto" and slow)
    if sinkhorn:
        for w in widths:
            run(w, "sinkhorn")

    header = ["W", "solver", "runs", "total (s)", "range (s)", "peak RSS delta (MiB)", "other CPU", *STAGES]
    rows = [[str(w), solver, *summary_columns(r), *stage_columns(r)] for w, solver, r in results]
    if largest.get("ok"):
        emd_note = f"EMD at W={max(widths)} took {seconds(largest['total_s'])} s"
    else:
        emd_note = f"EMD at W={max(widths)} failed ({largest.get('error')})"
    if sinkhorn and args.sinkhorn == "auto":
        emd_note += f" (> {SINKHORN_THRESHOLD_S:.0f} s), so solver='sinkhorn' rows are included."
    elif sinkhorn:
        emd_note += "; solver='sinkhorn' rows requested with --sinkhorn always."
    else:
        emd_note += f"; solver='sinkhorn' rows are added when it exceeds {SINKHORN_THRESHOLD_S:.0f} s."
    heading = (
        "## 2. Scaling with width: deep = 4 hidden layers of width W, shallow = 2, "
        f"{PAPER_SAMPLES} samples (random init)\n\n"
        f"Median of up to {args.scaling_repeats} run(s) after 1 warm-up (fewer when the warm-up shows they "
        f"would exceed {args.time_budget:.0f} s; see 'runs'). Stage columns are medians in seconds."
    )
    notes = f"{emd_note} {load_note([r for _, _, r in results])}"
    return f"{heading}\n\n{table(header, rows)}\n\n{notes}"


def section_samples(workdir: Path, args: argparse.Namespace) -> str:
    results: list[tuple[int, str, dict[str, Any]]] = []
    for layer_cost in ("cka", "cka_minibatch"):
        for n in args.samples:
            log(f"[3/3] {n} samples, layer_cost={layer_cost}")
            case = Case(
                f"samples{n}-{layer_cost}",
                PAPER_DEEP,
                PAPER_SHALLOW,
                n,
                config={"layer_cost": layer_cost, "batch_size": 500},
                weights="paper",
                repeats=args.scaling_repeats,
                time_budget_s=args.time_budget,
            )
            results.append((n, layer_cost, run_case(case, workdir, args)))
    header = ["samples", "layer_cost", "runs", "total (s)", "range (s)", "peak RSS delta (MiB)", "other CPU", *STAGES]
    rows = [[str(n), cost, *summary_columns(r), *stage_columns(r)] for n, cost, r in results]
    heading = (
        "## 3. Scaling with calibration samples: paper MLP pair, batch_size=500\n\n"
        f"Median of up to {args.scaling_repeats} run(s) after 1 warm-up. 'cka' keeps centred activations "
        "(N x width) and an N x N Gram matrix only for layers wider than N; 'cka_minibatch' accumulates "
        "per-batch HSIC (memory independent of N)."
    )
    notes = load_note([r for _, _, r in results])
    if args.memory_limit:
        notes += f" Memory cap per case: {args.memory_limit / 2**30:.1f} GiB (RLIMIT_DATA; cases estimated above it are skipped)."
    return f"{heading}\n\n{table(header, rows)}\n\n{notes}"


# --------------------------------------------------------------------------------------------- main


def environment(description: str) -> str:
    import numpy
    import ot
    import torch

    return (
        f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads, "
        f"default), numpy {numpy.__version__}, POT {ot.__version__}; {platform.machine()}, "
        f"{os.cpu_count()} CPU(s), {platform.platform()}.\n{description}.\n"
        "Each case runs in a fresh subprocess; imports, model construction and data loading are excluded. "
        "Peak RSS delta = peak RSS after the fusions (warm-up included) minus peak RSS after imports and "
        "model construction; on Linux the high-water mark is first reset to the current RSS "
        "(/proc/self/clear_refs) and read as VmHWM (= ru_maxrss without the maximum over exited threads), so "
        "import-time transients do not hide the fusion's memory.\n"
        "Other processes may share the CPU: 'other CPU' is the average number of cores used by other processes "
        "during a case's timed runs (from /proc/stat); treat timings taken while it is well above 0 as upper "
        "bounds."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes (a smoke run, a few minutes)")
    parser.add_argument("--output", type=Path, help="also write the markdown report to this file")
    parser.add_argument(
        "--sinkhorn",
        choices=("auto", "always", "never"),
        default="auto",
        help=f"add solver='sinkhorn' width rows: auto = when EMD at the largest width takes > {SINKHORN_THRESHOLD_S:.0f} s",
    )
    parser.add_argument(
        "--train-steps", type=int, default=100, help="full-batch Adam steps for the paper pair (0: random init)"
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help=f"re-measure a case (under {RETRY_MAX_S:.0f} s) when other processes used > {BUSY_CORES} cores",
    )
    parser.add_argument(
        "--case-timeout", type=float, default=900.0, help="seconds before a case's subprocess is killed"
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=120.0,
        help="scaling cases: fewer measured runs when the warm-up shows they would take longer than this",
    )
    parser.add_argument(
        "--memory-limit-gib",
        type=float,
        default=None,
        help="per-case memory cap (default: 80%% of available memory; 0 disables)",
    )
    parser.add_argument("--sections", default="1,2,3", help="comma-separated sections to run, e.g. '1' or '2,3'")
    parser.add_argument("--widths", type=int, nargs="+", help="section 2 widths (default 256 512 1024 2048 4096)")
    parser.add_argument("--samples", type=int, nargs="+", help="section 3 sample counts (default 200 1000 5000 20000)")
    parser.add_argument("--worker", nargs=3, metavar=("CASE", "WORKDIR", "LIMIT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    args.repeats = 2 if args.quick else 5
    args.scaling_repeats = 1 if args.quick else 3
    args.widths = args.widths or ([256, 512, 1024] if args.quick else [256, 512, 1024, 2048, 4096])
    args.samples = args.samples or ([200, 1000, 5000] if args.quick else [200, 1000, 5000, 20000])
    if args.memory_limit_gib is None:
        args.memory_limit = int(0.8 * available_memory_bytes())
    else:
        args.memory_limit = int(args.memory_limit_gib * 2**30)
    args.sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        case_json, workdir, limit = args.worker
        worker_main(case_json, workdir, int(limit))
        return 0

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_fusion_") as tmp:
        workdir = Path(tmp)
        log("training the paper pair and writing calibration data")
        description = train_paper_pair(workdir, args.train_steps, max([PAPER_SAMPLES, *args.samples]))
        parts = [f"# hf_clafusion fusion benchmark{' (--quick)' if args.quick else ''}", environment(description)]
        sections = (("1", section_paper), ("2", section_width), ("3", section_samples))
        for key, section in sections:
            if key in args.sections:
                parts.append(section(workdir, args))
    parts.append(f"_Benchmark wall time: {time.perf_counter() - started:.0f} s._")
    report = "\n\n".join(parts) + "\n"
    print(report)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)
        log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
