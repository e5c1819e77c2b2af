"""Run by tests/test_finetune.py under `accelerate launch`: finetune on two CPU processes and report."""

import gc
import hashlib
import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from hf_clafusion import FinetuneConfig, evaluate, finetune
from tests._models import mlp


def _digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode() + value.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def _causal_lm():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 32, (64 + 37, 12), generator=g)
    ids[:, 1:] = (ids[:, :1] + torch.arange(1, 12)) % 30 + 2
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    train = ({k: v[:64] for k, v in data.items()}, ids[:64])
    held = ({k: v[64:] for k, v in data.items()}, ids[64:])
    return transformers.LlamaForCausalLM(config), train, held


def main(out: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x, xe = torch.randn(192, 8, generator=g), torch.randn(101, 8, generator=g)
    y, ye = (x[:, 0] > 0).long(), (xe[:, 0] > 0).long()
    result = finetune(
        mlp(8, [16], 2), (x, y), (xe, ye), FinetuneConfig(epochs=1, batch_size=24, lr=0.1, progress=False)
    )
    state = PartialState()  # after the Accelerator: it reads ACCELERATE_USE_CPU, a bare PartialState does not
    start = _digest(result.model)
    # keep_best on wrong labels: every later epoch is worse, so each process must end with the start's weights
    kept = finetune(
        result.model,
        (x, 1 - y),
        (xe, ye),
        FinetuneConfig(epochs=2, batch_size=24, lr=0.5, progress=False, keep_best=True, scheduler="none"),
    )
    # a causal LM on token labels: 37 evaluation sequences, an odd count, gathered once
    lm, (batch, ids), (held, held_ids) = _causal_lm()
    tuned = finetune(
        lm,
        (batch, ids),
        (held, held_ids),
        FinetuneConfig(epochs=1, batch_size=8, optimizer="adamw", lr=3e-3, progress=False),
    )
    report = {
        "lm_weights": _digest(tuned.model),
        "lm_eval": {k: tuned.history[-1][k] for k in ("eval_accuracy", "eval_loss", "eval_samples", "eval_tokens")},
        "lm_evaluate": evaluate(tuned.model, (held, held_ids), ensemble=False)[0].to_dict(),  # one process's view
        "world_size": state.num_processes,
        "weights": start,
        "eval_samples": result.history[-1]["eval_samples"],
        "steps": result.history[-1]["step"],
        "start_weights": start,
        "kept_epoch": kept.kept_epoch,
        "kept_weights": _digest(kept.model),
    }
    (out / f"rank{state.process_index}.json").write_text(json.dumps(report))
    # Tear gloo down before the interpreter exits: an open process group aborts at exit now and then
    # ("terminate called without an active exception").
    state.wait_for_everyone()
    state.destroy_process_group()


def diverge(out: Path) -> None:
    """Rank 1's loss becomes NaN at its third batch: both ranks must stop there with TrainingDivergedError."""
    import re

    from hf_clafusion import TrainingDivergedError

    finetune_module = sys.modules["hf_clafusion.finetune"]  # the package's `finetune` attribute is the function

    g = torch.Generator().manual_seed(0)
    x = torch.randn(192, 8, generator=g)
    y = (x[:, 0] > 0).long()
    real_loss, calls = finetune_module._loss, []

    def poisoned(run, inputs, labels, config):
        loss = real_loss(run, inputs, labels, config)
        calls.append(1)
        return loss * float("nan") if run.accelerator.process_index == 1 and len(calls) == 3 else loss

    finetune_module._loss = poisoned
    try:
        finetune(mlp(8, [16], 2), (x, y), config=FinetuneConfig(epochs=1, batch_size=24, progress=False))
        error, step = None, None
    except TrainingDivergedError as caught:
        error, step = type(caught).__name__, int(re.search(r"optimiser step (\d+)", str(caught)).group(1))
    state = PartialState()
    (out / f"rank{state.process_index}.json").write_text(json.dumps({"error": error, "step": step}))
    # the stopped run's DDP wrapper can sit in reference cycles (module hooks, the traceback's frames): collect it
    # while its process group lives; left to exit, it may be torn down after the group (a gloo abort, "terminate
    # called without an active exception", was seen once on rank 1 under heavy load)
    gc.collect()
    state.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[2:] == ["diverge"]:
        diverge(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]))
