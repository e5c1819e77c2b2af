"""``FusionConfig(alignment="auto")``: fuse with CLA's and chain's alignments, keep the one closer to the ensemble."""

import pytest
import torch
from torch import nn

from hf_clafusion import FusionConfig, fuse
from hf_clafusion.hub import build_model_card
from hf_clafusion.result import FusionResult

from ._models import digits_split, mlp, permuted_copy, train


CONFIG = FusionConfig(progress=False)


def _states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@torch.no_grad()
def _agreement(model: nn.Module, parents: list[nn.Module], x: torch.Tensor) -> int:
    ensemble = sum(0.5 * p(x) for p in parents).argmax(-1)
    return int((model(x).argmax(-1) == ensemble).sum())


def _trained(deep_hidden: list[int], shallow_hidden: list[int], seed: int):
    (x, y), _ = digits_split(seed=0)
    deep = train(mlp(64, deep_hidden, 10, seed=seed), x, y, epochs=8, seed=seed)
    shallow = train(mlp(64, shallow_hidden, 10, seed=seed + 1), x, y, epochs=8, seed=seed + 1)
    return deep, shallow, x[:200]


@pytest.fixture(scope="module")
def trained_pair():
    """Digits MLPs whose chain fusion agrees with the ensemble a little more often (87 % vs 85 %)."""
    return _trained([32, 32, 32, 32], [24, 24, 24], seed=1)


@pytest.fixture(scope="module")
def cla_pair():
    """Digits MLPs whose CLA fusion agrees with the ensemble far more often (78.5 % vs 69.5 %)."""
    return _trained([32, 32, 32, 32, 32], [24, 24, 24], seed=3)


@pytest.mark.parametrize("pair", ["trained_pair", "cla_pair"])
def test_auto_keeps_the_fusion_whose_predictions_agree_most_with_the_ensemble(pair, request):
    deep, shallow, x = request.getfixturevalue(pair)
    auto = fuse([deep, shallow], x, CONFIG, alignment="auto")
    cla = fuse([deep, shallow], x, CONFIG, alignment="cla")
    chain = fuse([deep, shallow], x, CONFIG, alignment="chain")
    assert cla.layer_alignment != chain.layer_alignment  # a real choice
    trial = auto.alignment_trial
    assert trial["tried"] == ["cla", "chain"] and trial["samples"] == len(x)
    counts = {"cla": _agreement(cla.model, [deep, shallow], x), "chain": _agreement(chain.model, [deep, shallow], x)}
    assert trial["agreement"] == pytest.approx({m: c / len(x) for m, c in counts.items()}, abs=1e-12)
    expected = "chain" if counts["chain"] > counts["cla"] else "cla"  # CLA's on ties
    assert trial["kept"] == expected and auto.config.alignment == expected
    kept = {"cla": cla, "chain": chain}[expected]
    assert auto.layer_alignment == kept.layer_alignment
    assert _states_equal(auto.model, kept.model)  # the kept candidate is that fusion, bit for bit
    assert f"kept {expected}" in auto.summary()
    card = " ".join(build_model_card(auto).text.split())
    assert f"the `{expected}` one (above) was kept" in card
    assert "was kept" not in build_model_card(cla).text  # no trial, no sentence


def test_auto_keeps_chain_where_the_shallow_model_is_the_deep_ones_first_layers():
    # deep = the shallow model's layers with two exact identity layers before the head: chain's alignment pairs
    # every layer with itself and fuses back to the deep model (the ensemble's function exactly); CLA's, forced to
    # match the last layers, averages a real layer with an identity one
    shallow = mlp(8, [16, 16], 5, seed=3)
    eye = [nn.Linear(16, 16), nn.Linear(16, 16)]
    with torch.no_grad():
        for layer in eye:
            layer.weight.copy_(torch.eye(16))
            layer.bias.zero_()
    deep = nn.Sequential(*shallow[:4], eye[0], nn.ReLU(), eye[1], nn.ReLU(), shallow[4])
    x = torch.randn(128, 8)
    result = fuse([deep, shallow], x, CONFIG, alignment="auto", repair=None)
    assert result.alignment_trial["kept"] == "chain"
    assert result.alignment_trial["agreement"]["chain"] == 1.0 > result.alignment_trial["agreement"]["cla"]
    assert result.layer_alignment == [[0, 1]]
    with torch.no_grad():
        assert torch.allclose(result.model(x), deep(x), atol=1e-5)


def test_auto_does_not_try_when_the_alignments_agree_or_depths_are_equal():
    deep, shallow = mlp(8, [16, 16, 16], 3, seed=1), mlp(8, [12], 3, seed=2)  # one shallow layer: [0] either way
    x = torch.randn(64, 8)
    auto = fuse([deep, shallow], x, CONFIG, alignment="auto")
    cla = fuse([deep, shallow], x, CONFIG, alignment="cla")
    assert auto.alignment_trial == {} and auto.config.alignment == "cla" and "alignment_trial" not in auto.timings
    assert _states_equal(auto.model, cla.model)
    # equal depths: a permuted copy still fuses back to the original
    twin = permuted_copy(deep, seed=4)
    back = fuse([deep, twin], x, CONFIG, alignment="auto")
    assert back.alignment_trial == {}
    original = deep.state_dict()
    assert all(torch.allclose(t, original[k], atol=1e-6) for k, t in back.model.state_dict().items())


def test_the_trial_is_recorded_and_reloaded(trained_pair):
    deep, shallow, x = trained_pair
    result = fuse([deep, shallow], x, CONFIG, alignment="auto")
    record = result.to_record()
    assert record["alignment_trial"] == result.alignment_trial
    assert record["config"]["alignment"] == result.alignment_trial["kept"]  # the resolved value is saved
    again = FusionResult.from_record(record, result.model)
    assert again.alignment_trial == result.alignment_trial
    old = {k: v for k, v in record.items() if k != "alignment_trial"}  # written before the trial existed
    assert FusionResult.from_record(old, result.model).alignment_trial == {}


def test_headless_models_keep_cla_and_say_why():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_attention_heads=2, intermediate_size=32, max_position_embeddings=16
    )
    torch.manual_seed(0)
    deep = transformers.BertModel(transformers.BertConfig(**{**config.to_dict(), "num_hidden_layers": 4})).eval()
    shallow = transformers.BertModel(transformers.BertConfig(**{**config.to_dict(), "num_hidden_layers": 2})).eval()
    data = {"input_ids": torch.randint(0, 50, (16, 8)), "attention_mask": torch.ones(16, 8, dtype=torch.long)}
    result = fuse([deep, shallow], data, CONFIG, alignment="auto")
    assert result.config.alignment == "cla" and "alignment_trial" not in result.timings
    assert (
        result.alignment_trial["kept"] == "cla"
        and "BertModel has no prediction head" in result.alignment_trial["skipped"]
    )
    assert "cla without a trial (BertModel has no prediction head" in result.summary()
    assert "was kept without a trial: BertModel has no prediction head" in " ".join(
        build_model_card(result).text.split()
    )
    cla = fuse([deep, shallow], data, CONFIG, alignment="cla")
    assert (
        result.layer_alignment
        == cla.layer_alignment
        != fuse([deep, shallow], data, CONFIG, alignment="chain").layer_alignment
    )
    assert _states_equal(result.model, cla.model)


def test_a_spilled_candidate_comes_back_bit_for_bit_with_its_ties_and_buffers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from hf_clafusion.fusion import restore_module, spill_module

    from .test_transformers import inputs, make

    for family in ("gpt2", "llama"):  # a tied head; Llama's non-persistent rotary buffer
        model = make(family, 2)
        batch = inputs(family)
        with torch.no_grad():
            before = model(**batch).logits
        state = {k: v.clone() for k, v in model.state_dict().items()}
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        spill_module(model, tmp_path / f"{family}.pt")
        assert all(p.numel() == 0 for p in model.parameters())  # its memory is freed
        restore_module(model, tmp_path / f"{family}.pt", torch.device("cpu"))
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
        if family == "gpt2":
            assert model.lm_head.weight is model.transformer.wte.weight
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, before)
    assert isinstance(model, transformers.PreTrainedModel)


def test_spilling_the_first_candidate_changes_nothing_and_leaves_no_file(cla_pair, monkeypatch, tmp_path):
    import tempfile

    from hf_clafusion import fusion

    deep, shallow, x = cla_pair
    kept_in_memory = fuse([deep, shallow], x, CONFIG, alignment="auto")
    monkeypatch.setattr(fusion, "TRIAL_SPILL_BYTES", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    restored = []
    restore = fusion.restore_module
    monkeypatch.setattr(fusion, "restore_module", lambda *args: restored.append(1) or restore(*args))
    spilled = fuse([deep, shallow], x, CONFIG, alignment="auto")
    assert restored == [1]
    assert spilled.alignment_trial == kept_in_memory.alignment_trial
    assert spilled.alignment_trial["kept"] == "cla"  # the first candidate: spilled, then restored
    assert _states_equal(spilled.model, kept_in_memory.model)
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone


def test_a_causal_lm_pair_is_tried_on_its_token_predictions_and_saves(tmp_path):
    transformers = pytest.importorskip("transformers")
    from .test_transformers import inputs, make

    deep, shallow, batch = make("llama", 4, seed=0), make("llama", 2, seed=1), inputs("llama")
    config = CONFIG.replace(num_samples=16, batch_size=8)
    auto = fuse([deep, shallow], batch, config, alignment="auto")
    trial = auto.alignment_trial
    assert trial["tried"] == ["cla", "chain"] and trial["samples"] == batch["input_ids"].numel()  # every token
    kept = fuse([deep, shallow], batch, config, alignment=trial["kept"])
    assert auto.layer_alignment == kept.layer_alignment and _states_equal(auto.model, kept.model)
    auto.save_pretrained(tmp_path / "fused", processor=False)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fused").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, auto.model(**batch).logits, atol=1e-5)
    saved = (tmp_path / "fused" / "fusion_config.json").read_text()
    assert '"alignment_trial"' in saved and f'"alignment": "{trial["kept"]}"' in saved


def test_three_models_are_tried_together(trained_pair):
    deep, shallow, x = trained_pair
    (train_x, train_y), _ = digits_split(seed=0)
    third = train(mlp(64, [20, 20], 10, seed=7), train_x, train_y, epochs=8, seed=7)
    models = [deep, shallow, third]
    auto = fuse(models, x, CONFIG, alignment="auto")
    assert auto.alignment_trial["tried"] == ["cla", "chain"]
    kept = fuse(models, x, CONFIG, alignment=auto.alignment_trial["kept"])
    assert auto.layer_alignments == kept.layer_alignments and _states_equal(auto.model, kept.model)
    with torch.no_grad():
        ensemble = sum(m(x) for m in models).argmax(-1)  # equal weights
        agreement = {
            m: int((fuse(models, x, CONFIG, alignment=m).model(x).argmax(-1) == ensemble).sum()) / len(x)
            for m in ("cla", "chain")
        }
    assert auto.alignment_trial["agreement"] == pytest.approx(agreement, abs=1e-12)
