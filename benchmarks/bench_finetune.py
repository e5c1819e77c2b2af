"""Benchmark: throughput of hf_clafusion.finetune against a bare PyTorch loop, and 1 -> 2 process scaling.

Run by hand (not a test), from the repository root:

    python benchmarks/bench_finetune.py                 # overhead table + scaling table
    python benchmarks/bench_finetune.py --skip-scaling  # overhead only

The model is the paper's deep MLP (64 -> 400-200-100-50-25 -> 10) on random digits-shaped data; both loops do
the same work (SGD with momentum, batch 64, cross-entropy, shuffled batches, no evaluation). The scaling run
launches `accelerate launch --multi_gpu --num_processes N` with ACCELERATE_USE_CPU=1 (gloo), each process with
torch threads = cores / N, and reports samples per second over all processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from hf_clafusion.demo import make_cnn, make_mlp


HIDDEN = [400, 200, 100, 50, 25]


MODEL = "mlp"  # or "cnn": VGG-style 32-32-M-64-64-64-M on 1x14x14 inputs (the Fashion-MNIST recipe's deep parent)


def make_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (n, 64) if MODEL == "mlp" else (n, 1, 14, 14)
    return torch.rand(*shape, generator=g), torch.randint(0, 10, (n,), generator=g)


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    if MODEL == "cnn":
        return make_cnn([32, 32, "M", 64, 64, 64, "M"], in_channels=1, size=14, num_classes=10)
    return make_mlp(64, HIDDEN, 10)


def bare_loop(x: torch.Tensor, y: torch.Tensor, epochs: int) -> float:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for inputs, labels in loader:
            loss = F.cross_entropy(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return time.perf_counter() - start


def library_loop(x: torch.Tensor, y: torch.Tensor, epochs: int) -> float:
    from hf_clafusion import FinetuneConfig, finetune

    start = time.perf_counter()
    finetune(make_model(), (x, y), config=FinetuneConfig(epochs=epochs, batch_size=64, progress=False))
    return time.perf_counter() - start


def overhead_table(samples: int, epochs: int, repeats: int) -> str:
    x, y = make_data(samples)
    library_loop(x[:256], y[:256], 1)  # warm-up: imports, Accelerate state
    bare_loop(x[:256], y[:256], 1)
    bare = statistics.median(bare_loop(x, y, epochs) for _ in range(repeats))
    lib = statistics.median(library_loop(x, y, epochs) for _ in range(repeats))
    total = samples * epochs
    return "\n".join(
        [
            f"Finetune overhead ({MODEL}): {samples} samples x {epochs} epochs, batch 64, median of {repeats} runs, "
            f"{torch.get_num_threads()} torch threads",
            "",
            "| loop | seconds | samples/s | overhead |",
            "|---|---|---|---|",
            f"| bare PyTorch | {bare:.3f} | {total / bare:,.0f} | - |",
            f"| hf_clafusion.finetune | {lib:.3f} | {total / lib:,.0f} | {100 * (lib / bare - 1):+.1f} % |",
        ]
    )


WORKER = """
import json, os, sys, time, torch
sys.path.insert(0, {root!r})
import benchmarks.bench_finetune as bench
bench.MODEL = {model!r}
from benchmarks.bench_finetune import make_data, make_model
from hf_clafusion import FinetuneConfig, finetune
x, y = make_data({samples})
finetune(make_model(), (x[:512], y[:512]), config=FinetuneConfig(epochs=1, batch_size=64, progress=False))
start = time.perf_counter()
finetune(make_model(), (x, y), config=FinetuneConfig(epochs={epochs}, batch_size=64, progress=False))
elapsed = time.perf_counter() - start
from accelerate import PartialState
state = PartialState()
if state.is_main_process:
    json.dump({{"seconds": elapsed, "processes": state.num_processes}}, open({out!r}, "w"))
"""


def scaling_table(samples: int, epochs: int, processes: list[int]) -> str:
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in processes:
            out = Path(tmp) / f"p{n}.json"
            script = Path(tmp) / "worker.py"
            root = str(Path(__file__).resolve().parents[1])
            script.write_text(WORKER.format(root=root, samples=samples, epochs=epochs, out=str(out), model=MODEL))
            env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": str(max(cores // n, 1))}
            if n == 1:
                command = [sys.executable, str(script)]
            else:
                command = [
                    sys.executable,
                    "-m",
                    "accelerate.commands.launch",
                    "--multi_gpu",
                    "--num_processes",
                    str(n),
                    "--num_machines",
                    "1",
                    "--mixed_precision",
                    "no",
                    "--dynamo_backend",
                    "no",
                    "--main_process_port",
                    "29531",
                    str(script),
                ]
            subprocess.run(command, env=env, check=True, capture_output=True, text=True)
            result = json.loads(out.read_text())
            rows.append((n, result["processes"], result["seconds"]))
    base = rows[0][2]
    lines = [
        f"Scaling ({MODEL}) on {cores} cores: {samples} samples x {epochs} epochs, per-process batch 64 "
        "(global batch 64 x N)",
        "",
        "| processes | ran | seconds | samples/s | speed-up |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {n} | {ran} | {sec:.2f} | {samples * epochs / sec:,.0f} | {base / sec:.2f}x |" for n, ran, sec in rows
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    args = parser.parse_args()
    global MODEL
    MODEL = args.model
    print(overhead_table(args.samples, args.epochs, args.repeats))
    if not args.skip_scaling:
        print()
        print(scaling_table(args.samples, args.epochs, [1, 2]))


if __name__ == "__main__":
    main()
