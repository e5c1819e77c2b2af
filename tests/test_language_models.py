"""Token labels: evaluate and finetune causal and masked language models (per-position scoring, shifted for causal LMs)."""

import pytest
import torch
import transformers

from hf_clafusion import DataError, FinetuneConfig, evaluate, finetune
from hf_clafusion.data import IGNORE_INDEX, scored

from ._models import mlp


VOCAB = 48


def _llama(layers: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


def _masked_lm(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    )
    return transformers.BertForMaskedLM(config).eval()


def _sequences(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """17 tokens: a random first one, then each the fixed successor of the one before (a bigram a model learns)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(n, 17, dtype=torch.long)
    ids[:, 0] = torch.randint(2, VOCAB, (n,), generator=g)
    for t in range(1, 17):
        ids[:, t] = (ids[:, t - 1] * 7 + 3) % (VOCAB - 2) + 2
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _padded(n: int = 12, seed: int = 1) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Right-padded sequences, their labels -100 at padding (as transformers' collators make them) and on a prompt."""
    batch = _sequences(n, seed)
    batch["attention_mask"][: n // 3, 12:] = 0
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    labels[:, :3] = IGNORE_INDEX  # a prompt nobody scores
    return batch, labels


@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_evaluate_scores_a_causal_lm_as_its_own_loss_does(make):
    model = make()
    batch, labels = _padded()
    report = evaluate(model, (batch, labels), ensemble=False)
    with torch.no_grad():
        out = model(**batch, labels=labels)
    assert report[0].loss == pytest.approx(float(out.loss), rel=1e-5)  # transformers shifts the labels inside
    predicted, target = out.logits[:, :-1].argmax(-1), labels[:, 1:]
    scored_positions = target != IGNORE_INDEX
    assert report[0].num_samples == int(scored_positions.sum())
    assert report[0].accuracy == pytest.approx(float((predicted == target)[scored_positions].float().mean()))


def test_evaluate_scores_a_masked_lm_without_shifting():
    model = _masked_lm()
    batch, labels = _padded()
    report = evaluate(model, (batch, labels), ensemble=False)
    with torch.no_grad():
        out = model(**batch, labels=labels)
    assert report[0].loss == pytest.approx(float(out.loss), rel=1e-5)
    assert report[0].num_samples == int((labels != IGNORE_INDEX).sum())


def test_the_ensemble_of_language_models_averages_each_positions_distribution():
    models = [_llama(seed=0), _llama(seed=1)]
    batch = _sequences(6)
    report = evaluate(models, (batch, batch["input_ids"]))
    with torch.no_grad():
        probs = torch.stack([m(**batch).logits[:, :-1].softmax(-1) for m in models]).mean(0)
    target = batch["input_ids"][:, 1:]
    assert report["ensemble"].accuracy == pytest.approx(float((probs.argmax(-1) == target).float().mean()))
    expected = float(-probs.gather(-1, target[..., None]).log().mean())
    assert report["ensemble"].loss == pytest.approx(expected, rel=1e-5)


def test_scored_positions_follow_labels_mask_and_shift():
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[1, 2, IGNORE_INDEX, 4], [0, 1, 2, 3]])
    inputs = {"input_ids": labels.clamp_min(0), "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    kept, targets, samples = scored(logits, labels, inputs, shift=True)
    # position t predicts label t + 1: row 0 scores labels 2 and 4 (t = 0, 2), row 1 labels 1 and 2 (its 3 is padding)
    assert targets.tolist() == [2, 4, 1, 2] and samples.tolist() == [0, 0, 1, 1]
    assert torch.equal(kept, torch.stack([logits[0, 0], logits[0, 2], logits[1, 0], logits[1, 1]]))
    kept, targets, samples = scored(logits, labels, inputs, shift=False)
    assert targets.tolist() == [1, 2, 4, 0, 1, 2] and samples.tolist() == [0, 0, 0, 1, 1, 1]


def test_finetune_trains_a_causal_lm_on_token_labels():
    train, held = _sequences(256), _sequences(64, seed=9)
    config = FinetuneConfig(epochs=4, batch_size=32, optimizer="adamw", lr=3e-3, progress=False, keep_best=True)
    out = finetune(_llama(), (train, train["input_ids"]), (held, held["input_ids"]), config)
    start, last = out.initial_evaluation, out.history[-1]
    assert last["eval_tokens"] == 64 * 16 and last["eval_samples"] == 64  # 17 tokens, 16 predicted, per sequence
    assert last["eval_loss"] < 0.85 * start["eval_loss"] and last["eval_accuracy"] > start["eval_accuracy"] + 0.1
    report = evaluate(out.model, (held, held["input_ids"]), ensemble=False)  # finetune's evaluation is evaluate's
    kept = out.history[out.kept_epoch - 1] if out.kept_epoch else start
    assert report[0].accuracy == pytest.approx(kept["eval_accuracy"])
    assert report[0].loss == pytest.approx(kept["eval_loss"], rel=1e-4)


def test_distillation_moves_a_causal_lm_toward_its_teacher():
    train, held = _sequences(256), _sequences(64, seed=9)
    teacher = finetune(
        _llama(seed=3),
        (train, train["input_ids"]),
        config=FinetuneConfig(epochs=4, batch_size=32, optimizer="adamw", lr=3e-3, progress=False),
    ).model.eval()
    student = _llama(layers=1, seed=4)

    def agreement(model):
        with torch.no_grad():
            return float((model(**held).logits.argmax(-1) == teacher(**held).logits.argmax(-1)).float().mean())

    before = agreement(student)
    config = FinetuneConfig(
        epochs=3, batch_size=32, optimizer="adamw", lr=3e-3, progress=False, distill_alpha=1.0
    )  # the teacher alone: the labels do not enter the loss
    out = finetune(student, (train, train["input_ids"]), config=config, teacher=teacher)
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in out.history)
    assert agreement(out.model) > before + 0.2


def test_token_labels_from_a_datasets_split():
    datasets = pytest.importorskip("datasets")
    data = _sequences(64)
    split = datasets.Dataset.from_dict(
        {**{k: v.tolist() for k, v in data.items()}, "labels": data["input_ids"].tolist()}
    )
    report = evaluate(_llama(), split, ensemble=False)
    assert report[0].num_samples == 64 * 16
    out = finetune(_llama(), split, split, FinetuneConfig(epochs=1, batch_size=16, progress=False))
    assert out.history[0]["eval_tokens"] == 64 * 16


def test_label_shapes_that_do_not_fit_the_model_are_refused():
    batch = _sequences(8)
    with pytest.raises(DataError, match=r"one class per sample .* token labels shaped like `input_ids`"):
        evaluate(_llama(), (batch, torch.zeros(8, dtype=torch.long)))
    with pytest.raises(DataError, match=r"labels are per token .* One-hot class labels\? Pass labels.argmax"):
        evaluate(mlp(4, [8], 3), (torch.randn(8, 4), torch.zeros(8, 3, dtype=torch.long)))
    with pytest.raises(DataError, match=r"one class per sample"):
        finetune(_llama(), (batch, torch.zeros(8, dtype=torch.long)), config=FinetuneConfig(epochs=1, progress=False))


def test_a_fused_causal_lm_is_finetuned_and_its_card_reports_next_token_accuracy():
    from hf_clafusion import fuse
    from hf_clafusion.hub import build_model_card

    train, held = _sequences(128), _sequences(32, seed=9)
    result = fuse([_llama(layers=2, seed=0), _llama(layers=1, seed=1)], train, progress=False, num_samples=64)
    tuned = finetune(
        result.model,
        (train, train["input_ids"]),
        (held, held["input_ids"]),
        FinetuneConfig(epochs=2, batch_size=32, optimizer="adamw", lr=3e-3, progress=False),
    )
    result.record_finetune(tuned)
    report = evaluate([result.model], (held, held["input_ids"]), names=["fused + finetune"], ensemble=False)
    result.record_evaluation(report, dataset="generated", fused="fused + finetune", task="text-generation")
    card = build_model_card(result).text
    assert "| model | next-token accuracy | loss (log-perplexity) | scored tokens |" in card
    assert f"| fused + finetune | {100 * report[0].accuracy:.2f} % |" in card and "| 512 |" in card  # 32 x 16
    assert report[0].accuracy == pytest.approx(tuned.history[-1]["eval_accuracy"])
