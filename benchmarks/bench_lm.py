"""Benchmark: one-shot quality of fused causal language models, against the baselines a user could get without fusion.

Run by hand (not a test), from the repository root, in the project's environment:

    .venv/bin/python benchmarks/bench_lm.py                    # 3 seeds
    .venv/bin/python benchmarks/bench_lm.py --seeds 0 --methods default "alignment='cla'"
    .venv/bin/python benchmarks/bench_lm.py --depths 6 3                  # a pair where CLA has a choice to make
    .venv/bin/python benchmarks/bench_lm.py --finetune                    # + the same finetuning for every model
    .venv/bin/python benchmarks/bench_lm.py --parent-data skewed --share 1 --finetune  # one language per parent

The pair: Llama-shaped causal LMs (4 vs 2 layers by default, hidden 64, 4 query / 2 key-value heads) trained from scratch on
a generated language. Each sequence is 12 tokens of a fixed random sparse Markov chain (every token has three
likely successors), a separator, then the same 12 tokens again: the first half is predictable from the previous
token only in part, the second half exactly by attending back (a copy, which needs two layers: an induction head).
The seed splits the sequences, initialises the models, orders the training data and picks the calibration part.

Metrics on the test split, over every position after the first: next-token accuracy (the argmax is the next token)
and perplexity (exp of the mean cross-entropy); "copy accuracy" counts the 12 copied positions only. The ensemble
averages the parents' logits (what ``alignment="auto"``'s trial compares with). Differences between methods are
paired over seeds: mean +- std of the per-seed differences. Parents are cached under ``--cache``.

With ``--parent-data skewed`` the parents see different data: a second language (another chain over the same
tokens) joins the first, the deep parent trains on ``--share`` of its sequences from the first language and the
shallow one on ``--share`` from the second; calibration, finetuning and test data mix both half and half.

With ``--finetune``, the default's fused model, the best one-shot setting's (Sinkhorn with averaged unmatched
blocks), each parent and the shallow parent distilled from both are finetuned with the same budget
(`hf_clafusion.finetune`, token labels: 2 epochs of AdamW over 1,000 new sequences of the same language that no
parent saw, the same data order for every model) and evaluated on the same test split.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from hf_clafusion import FinetuneConfig, finetune, fuse


VOCAB, HALF = 64, 12
SEP, BOS = 1, 0
LENGTH = 2 * HALF + 2  # BOS, the chain, SEP, the copy

#: Fusion methods: FusionConfig overrides on top of the defaults.
METHODS: dict[str, dict[str, Any]] = {
    "default": {},
    "alignment='cla'": {"alignment": "cla"},
    "chain alignment": {"alignment": "chain"},
    "unmatched='average'": {"unmatched": "average"},
    "repair='repair'": {"repair": "repair"},
    "correlation cost": {"ground_metric": "correlation"},
    "sinkhorn reg=0.05": {"solver": "sinkhorn", "reg": 0.05},
    "sinkhorn reg=0.1": {"solver": "sinkhorn", "reg": 0.1},
    "sinkhorn reg=0.05, unmatched='average'": {"solver": "sinkhorn", "reg": 0.05, "unmatched": "average"},
    "weights=(0.7, 0.3)": {"weights": (0.7, 0.3)},
}
#: Fused models finetuned with --finetune (when their method runs).
FINETUNED = ("default", "sinkhorn reg=0.05, unmatched='average'")


def language(n: int, seed: int = 1234, samples: int | None = None) -> torch.Tensor:
    """``(n, LENGTH)`` token ids: BOS, 12 steps of a fixed sparse Markov chain, SEP, the 12 steps again.

    ``seed`` fixes the chain (the language) and, unless ``samples`` gives another seed, the sequences drawn.
    """
    g = torch.Generator().manual_seed(seed)  # the language is fixed; the benchmark seed only splits it
    first = 2  # ids 0 and 1 are BOS and SEP
    words = VOCAB - first
    successors = torch.stack([torch.randperm(words, generator=g)[:3] for _ in range(words)])  # (words, 3)
    if samples is not None:  # other sequences of the same language
        g = torch.Generator().manual_seed(samples)
    probs = torch.tensor([0.6, 0.3, 0.1])
    tokens = torch.empty(n, HALF, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, words, (n,), generator=g)
    for t in range(1, HALF):
        pick = torch.multinomial(probs, n, replacement=True, generator=g)
        tokens[:, t] = successors[tokens[:, t - 1], pick]
    tokens += first
    bos = torch.full((n, 1), BOS)
    sep = torch.full((n, 1), SEP)
    return torch.cat([bos, tokens, sep, tokens], 1)


def make_model(layers: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=LENGTH,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def train(model: nn.Module, ids: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    steps = epochs * math.ceil(len(ids) / 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(ids), generator=order)
        for start in range(0, len(ids), 64):
            batch = ids[perm[start : start + 64]]
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(input_ids=ids[i : i + 256]).logits.float() for i in range(0, len(ids), 256)])


def metrics(out: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """Next-token accuracy, copy accuracy and perplexity of ``out`` (logits of ``ids``)."""
    pred, target = out[:, :-1], ids[:, 1:]
    hits = pred.argmax(-1) == target
    nll = F.cross_entropy(pred.reshape(-1, VOCAB), target.reshape(-1))
    return {
        "accuracy": float(hits.float().mean()),
        "copy accuracy": float(hits[:, -HALF:].float().mean()),
        "perplexity": float(nll.exp()),
    }


def _cached_parents(
    seed: int, parts: dict[str, torch.Tensor], cache: Path, epochs: int, depths: tuple[int, int], tag: str
) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    deep, shallow = depths
    models = {"deep": make_model(deep), "shallow": make_model(shallow), "deep2": make_model(deep)}
    name = ("lm" if depths == (4, 2) else f"lm{deep}-{shallow}") + tag
    path = cache / f"{name}-seed{seed}.pt"
    if path.is_file():
        states = torch.load(path, weights_only=True)
        for key, model in models.items():
            model.load_state_dict(states[key])
            model.eval()
        return models
    for offset, (key, model) in enumerate(models.items()):
        start = time.perf_counter()
        train(model, parts[key], epochs, seed * 10 + offset)
        print(f"  trained {name}/{key} (seed {seed}) in {time.perf_counter() - start:.0f}s", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({key: model.state_dict() for key, model in models.items()}, path)
    return models


#: The second language of ``--parent-data skewed`` (another chain over the same tokens).
OTHER_LANGUAGE = 4321


def _data(
    seed: int, skewed: bool, share: float = 0.9
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each parent's training sequences, the calibration sequences, the test split and the finetuning sequences.

    Shared: every parent trains on the same 4,000 sequences. Skewed: two languages (two chains over the same tokens);
    the deep parent trains on ``share`` of the first and the rest of the second, the shallow one (and the same-depth
    partner) the other way round, 4,000 sequences each; calibration, test and finetuning data mix both languages half
    and half.
    """
    order = torch.Generator().manual_seed(seed)
    if not skewed:
        ids = language(6000)
        perm = torch.randperm(len(ids), generator=order)
        train_ids, test_ids = ids[perm[:4000]], ids[perm[4000:]]
        parts = dict.fromkeys(("deep", "shallow", "deep2"), train_ids)
        return parts, train_ids[:200], test_ids, language(1000, samples=20_000 + seed)
    a, b = language(6000), language(6000, seed=OTHER_LANGUAGE)
    a, b = a[torch.randperm(6000, generator=order)], b[torch.randperm(6000, generator=order)]
    own = round(4000 * share)
    deep_part = torch.cat([a[:own], b[: 4000 - own]])
    shallow_part = torch.cat([a[own:4000], b[4000 - own : 4000]])
    parts = {"deep": deep_part, "shallow": shallow_part, "deep2": shallow_part}
    calibration = torch.cat([a[:100], b[4000 - own : 4100 - own]])
    test = torch.cat([a[4000:5000], b[4000:5000]])
    tune = torch.cat([language(500, samples=20_000 + seed), language(500, OTHER_LANGUAGE, samples=30_000 + seed)])
    return parts, calibration, test, tune


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    skewed = args.parent_data == "skewed"
    parts, calibration_ids, test_ids, tune = _data(seed, skewed, args.share)
    tag = "" if not skewed else "-skewed" if args.share == 0.9 else f"-skewed{args.share:g}"
    models = _cached_parents(seed, parts, Path(args.cache), args.epochs, tuple(args.depths), tag)
    calibration = {"input_ids": calibration_ids, "attention_mask": torch.ones_like(calibration_ids)}
    rows: dict[str, dict[str, Any]] = {}
    fused: dict[str, nn.Module] = {}  # the methods of FINETUNED, finetuned with --finetune
    deep, shallow = logits(models["deep"], test_ids), logits(models["shallow"], test_ids)
    rows["deep parent"] = metrics(deep, test_ids)
    rows["shallow parent"] = metrics(shallow, test_ids)
    rows["ensemble (mean of logits)"] = metrics((deep + shallow) / 2, test_ids)
    for method, overrides in METHODS.items():
        if args.methods and method not in args.methods:
            continue
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fuse([models["deep"], models["shallow"]], calibration, seed=seed, progress=False, **overrides)
        rows[method] = metrics(logits(result.model, test_ids), test_ids)
        rows[method]["seconds"] = time.perf_counter() - start
        rows[method]["kept"] = result.alignment_trial.get("kept", result.config.alignment)
        if method in FINETUNED:
            fused[method] = result.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same = fuse([models["deep"], models["deep2"]], calibration, seed=seed, progress=False)
    rows["same-depth fusion (deep + deep)"] = metrics(logits(same.model, test_ids), test_ids)
    if args.finetune:
        data = ({"input_ids": tune, "attention_mask": torch.ones_like(tune)}, tune)  # sequences no parent saw
        budget = FinetuneConfig(epochs=2, batch_size=64, optimizer="adamw", lr=1e-3, seed=seed, progress=False)
        both = [models["deep"], models["shallow"]]
        runs = {
            "deep parent": (copy.deepcopy(models["deep"]), None),
            "shallow parent": (copy.deepcopy(models["shallow"]), None),
            "shallow distilled from both": (copy.deepcopy(models["shallow"]), both),
            **{method: (model, None) for method, model in fused.items()},
        }
        for row, (model, teacher) in runs.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = finetune(model, data, config=budget, teacher=teacher)
            tuned = metrics(logits(out.model, test_ids), test_ids)
            rows.setdefault(row, {}).update({f"{k} +finetune": v for k, v in tuned.items()})
    return rows


def _mean_std(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "–"
    std = scale * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.fmean(values):.2f} ± {std:.2f}"


def summarise(per_seed: list[dict[str, dict[str, Any]]], depths: tuple[int, int], label: str = "") -> str:
    order = list(dict.fromkeys(row for seed in per_seed for row in seed))
    lines = [
        f"\n### lm, {depths[0]} + {depths[1]} layers{label} ({len(per_seed)} seed(s); test split, mean ± std)\n",
        "| model | next-token accuracy % | copy accuracy % | perplexity | Δ accuracy vs chain (paired) "
        "| Δ accuracy vs same-depth (paired) | kept | +finetune accuracy % | +finetune perplexity "
        "| +finetune Δ accuracy vs best parent +finetune (paired) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in order:
        present = [s for s in per_seed if row in s]
        one_shot = [s for s in present if "accuracy" in s[row]]
        acc = [s[row]["accuracy"] for s in one_shot]
        chain = [s[row]["accuracy"] - s["chain alignment"]["accuracy"] for s in one_shot if "chain alignment" in s]
        same = [s[row]["accuracy"] - s["same-depth fusion (deep + deep)"]["accuracy"] for s in one_shot]
        parent = row in ("deep parent", "shallow parent", "ensemble (mean of logits)")
        kept = ", ".join(str(s[row]["kept"]) for s in present if "kept" in s[row]) or "–"
        tuned = [s for s in present if "accuracy +finetune" in s[row]]
        best = [
            s[row]["accuracy +finetune"]
            - max(s["deep parent"]["accuracy +finetune"], s["shallow parent"]["accuracy +finetune"])
            for s in tuned
            if "accuracy +finetune" in s["deep parent"]
        ]
        lines.append(
            f"| {row} | {_mean_std(acc)} | {_mean_std([s[row]['copy accuracy'] for s in one_shot])} "
            f"| {_mean_std([s[row]['perplexity'] for s in one_shot], 1.0)} "
            f"| {'–' if parent else _mean_std(chain)} | {'–' if parent else _mean_std(same)} | {kept} "
            f"| {_mean_std([s[row]['accuracy +finetune'] for s in tuned])} "
            f"| {_mean_std([s[row]['perplexity +finetune'] for s in tuned], 1.0)} | {_mean_std(best)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS), metavar="METHOD")
    parser.add_argument("--depths", nargs=2, type=int, default=[4, 2], metavar=("DEEP", "SHALLOW"))
    parser.add_argument("--epochs", type=int, default=8, help="Parent training epochs over 4,000 sequences.")
    parser.add_argument(
        "--parent-data",
        choices=["shared", "skewed"],
        default="shared",
        help="shared: every parent trains on the same sequences. skewed: two languages, each parent mostly one "
        "(90/10), test and finetuning data half and half: the parents' knowledge is complementary.",
    )
    parser.add_argument(
        "--share", type=float, default=0.9, help="With skewed data: each parent's share of its language."
    )
    parser.add_argument(
        "--finetune", action="store_true", help="Also finetune the fused models and the parents (the same budget)."
    )
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "hf_clafusion_bench"))
    parser.add_argument("--output", default=None, help="Also write the raw results as JSON here (after every seed).")
    args = parser.parse_args()
    per_seed = []
    for seed in args.seeds:
        start = time.perf_counter()
        print(f"lm, seed {seed}", flush=True)
        per_seed.append(run_seed(seed, args))
        print(f"  done in {time.perf_counter() - start:.0f}s", flush=True)
        if args.output:
            Path(args.output).write_text(json.dumps(per_seed, indent=1))
    label = f", skewed parent data ({args.share:g})" if args.parent_data == "skewed" else ""
    print(summarise(per_seed, tuple(args.depths), label))


if __name__ == "__main__":
    main()
