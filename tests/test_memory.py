"""Memory: what the pipeline shares with the parents and never writes into, streamed statistics, chunked averages."""

from __future__ import annotations

import pytest
import torch


transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from hf_clafusion import FusionConfig, fuse, fuse_pretrained  # noqa: E402
from hf_clafusion.adapters import capture_outputs, get_adapter  # noqa: E402
from hf_clafusion.core import ActivationStats, solve_transport, weighted_average  # noqa: E402
from hf_clafusion.core.averaging import AVERAGE_CHUNK  # noqa: E402
from hf_clafusion.fusion import (  # noqa: E402
    Stopwatch,
    align_segments,
    balance_depths,
    collect_group_statistics,
    collect_layer_activations,
    prepare,
    transport_to_anchor,
)
from hf_clafusion.result import TransportPlans  # noqa: E402

from ._models import fuse_leaves_parents_alone  # noqa: E402


CONFIG = FusionConfig(progress=False, repair=None, num_samples=16, batch_size=8)


def bert(layers: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64
    )
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def llama(layers: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config).eval()


def batch(n: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(n, 12, dtype=torch.long)
    mask[: n // 4, 8:] = 0
    return {"input_ids": torch.randint(3, 64, (n, 12), generator=g), "attention_mask": mask}


@pytest.mark.parametrize(
    ("build", "overrides"),
    [(bert, {}), (bert, {"unmatched": "identity"}), (llama, {})],
    ids=["bert-closed-form", "bert-fitted-identity-blocks", "llama-tied-head"],
)
def test_fuse_never_writes_into_the_parents_and_the_fused_model_shares_no_storage_with_them(build, overrides):
    fuse_leaves_parents_alone(build(3, 0), build(2, 1), lambda a, b: fuse([a, b], batch(), CONFIG, **overrides).model)


def test_a_float32_parent_is_prepared_on_its_own_storage_and_a_bf16_one_in_float32():
    model = llama(2, 0)
    prepared = get_adapter(model).prepare(model)
    assert all(p.data_ptr() == q.data_ptr() for p, q in zip(prepared.parameters(), model.parameters()))
    assert prepared.lm_head.weight is prepared.get_input_embeddings().weight  # tied weights stay tied
    prepared.to(torch.float64)  # replacing the copy's tensors leaves the parent's alone
    assert next(model.parameters()).dtype == torch.float32
    half = llama(2, 0).to(torch.bfloat16)
    converted = get_adapter(half).prepare(half)
    assert {p.dtype for p in converted.parameters()} == {torch.float32}
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert converted.config.dtype == torch.bfloat16  # restored when the fused model is saved


def test_a_balanced_model_holds_its_parents_tensors_except_in_inserted_blocks():
    model, template = bert(2, 1), bert(3, 0)
    adapter = get_adapter(model)
    balanced, _ = adapter.insert_identity(model, [[0, None, 1]], template, fit=False)
    own = model.state_dict()
    state = balanced.state_dict()
    for key in ("embeddings.word_embeddings.weight", "encoder.layer.0.intermediate.dense.weight"):
        assert state[key].data_ptr() == own[key].data_ptr()
    assert state["encoder.layer.2.intermediate.dense.weight"].data_ptr() == (
        own["encoder.layer.1.intermediate.dense.weight"].data_ptr()
    )
    assert not state["encoder.layer.1.output.dense.weight"].any()  # an inserted block's residual writer is zero


def test_streamed_group_statistics_equal_those_of_whole_batch_captures():
    models, data = [bert(3, 0), bert(2, 1)], batch()
    clock = Stopwatch()
    run = prepare(models, data, CONFIG.replace(unmatched="identity"), clock=clock)
    activations = collect_layer_activations(run, clock=clock)
    balanced = balance_depths(run, align_segments(run, activations, clock=clock), activations, clock=clock)
    streamed = collect_group_statistics(run, balanced, clock=clock)[1]
    groups = [spec.groups for spec in balanced.specs]
    reference = [ActivationStats() for _ in groups[1]]
    with torch.no_grad():
        for b in run.batches:
            features = []
            for model, spec in zip(balanced.models, groups):
                names = list(dict.fromkeys(c for g in spec for c in g.captures))
                with capture_outputs(model, names) as out:
                    model(**b)
                features.append({n: run.adapter.features(out[n], b) for n in names})
            for stats, group_b, group_a in zip(reference, groups[1], groups[0]):
                for name_b, name_a in zip(group_b.captures, group_a.captures):
                    stats.update(features[1][name_b], features[0][name_a])
    assert len(streamed) == len(reference)
    for got, want in zip(streamed, reference):
        assert got.count == want.count
        for field in ("sum_b", "sum_a", "sq_b", "sq_a", "cross"):
            assert torch.equal(getattr(got, field), getattr(want, field)), field


def test_capture_outputs_hands_each_value_to_on_capture_in_forward_order():
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    seen = []
    with capture_outputs(model, ["2", "0"], on_capture=lambda name, value: seen.append((name, value))) as store:
        model(torch.randn(6, 4))
    assert [name for name, _ in seen] == ["0", "2"]
    assert [tuple(value.shape) for _, value in seen] == [(6, 5), (6, 3)]
    assert store == {}


def test_weighted_average_in_chunks_equals_the_whole_tensor_at_once():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(AVERAGE_CHUNK + 1000, generator=g).reshape(-1, 8) for _ in range(3)]
    weights = [0.2, 0.3, 0.5]
    whole = torch.zeros_like(tensors[0], dtype=torch.float64)
    for t, w in zip(tensors, weights):
        whole += w * t.double()
    assert torch.equal(weighted_average(tensors, weights), whole.float())


def test_a_folder_loaded_bf16_pair_fuses_to_the_weights_of_the_in_memory_pair(tmp_path):
    parents = [llama(3, 0).to(torch.bfloat16), llama(2, 1).to(torch.bfloat16)]
    for name, model in zip(("deep", "shallow"), parents):
        model.save_pretrained(tmp_path / name)
    in_memory = fuse(parents, batch(), CONFIG).model.state_dict()
    loaded = fuse_pretrained([tmp_path / "deep", tmp_path / "shallow"], batch(), CONFIG).model.state_dict()
    assert in_memory.keys() == loaded.keys()
    assert all(torch.equal(v, loaded[k]) for k, v in in_memory.items())


def test_fuse_pretrained_frees_the_bf16_parents_it_loaded_once_their_float32_copies_exist(tmp_path, monkeypatch):
    import gc
    import weakref

    import hf_clafusion.api as api
    import hf_clafusion.fusion as fusion

    for name, layers, seed in (("deep", 3, 0), ("shallow", 2, 1)):
        llama(layers, seed).to(torch.bfloat16).save_pretrained(tmp_path / name)
    loaded, alive = [], []

    def load(folder, **kwargs):
        model = api_load(folder, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    def layer_activations(run, **kwargs):  # the first stage after prepare
        gc.collect()
        alive.append([ref() is not None for ref in loaded])
        return collect(run, **kwargs)

    api_load, collect = api.load_pretrained, fusion.collect_layer_activations
    monkeypatch.setattr(api, "load_pretrained", load)
    monkeypatch.setattr(fusion, "collect_layer_activations", layer_activations)
    user_model = llama(2, 2).to(torch.bfloat16)  # a parent passed as an object stays the caller's
    result = fuse_pretrained([tmp_path / "deep", tmp_path / "shallow"], batch(), CONFIG)
    assert alive == [[False, False]] and len(loaded) == 2
    assert result.model.config.dtype == torch.bfloat16  # still saved in the parents' dtype
    fuse_pretrained([tmp_path / "deep", user_model], batch(), CONFIG)
    assert {p.dtype for p in user_model.parameters()} == {torch.bfloat16}
    assert alive[1] == [False, False, False]
    # the CLI looks for the tokenizer between loading and fusing, and keeps no parent alive by doing so
    from safetensors.torch import save_file

    from hf_clafusion.cli import main

    from ._models import word_tokenizer

    for name in ("deep", "shallow"):
        word_tokenizer([f"w{i}" for i in range(60)]).save_pretrained(tmp_path / name)
    save_file({"inputs": batch()["input_ids"]}, str(tmp_path / "calibration.safetensors"))
    assert (
        main(
            [
                "fuse",
                str(tmp_path / "deep"),
                str(tmp_path / "shallow"),
                "--data",
                str(tmp_path / "calibration.safetensors"),
                "--output",
                str(tmp_path / "fused"),
                "--quiet",
                "--set",
                "repair=null",
                "--set",
                "num_samples=16",
                "--set",
                "batch_size=8",
            ]
        )
        == 0
    )
    assert alive[2] == [False] * 5 and (tmp_path / "fused" / "tokenizer_config.json").is_file()


def test_the_statistics_pass_runs_in_chunks_of_rows_when_a_batch_s_kept_captures_exceed_the_budget(monkeypatch):
    import hf_clafusion.fusion as fusion

    models, data = [bert(3, 0), bert(2, 1)], batch()  # 2 batches of 8 rows
    rows = []
    stream = fusion._stream_statistics

    def spy(run, runner, rename, pairs, statistics, part, order):
        rows.append(part["input_ids"].shape[0])
        return stream(run, runner, rename, pairs, statistics, part, order)

    monkeypatch.setattr(fusion, "_stream_statistics", spy)
    whole = fuse(models, data, CONFIG)
    assert rows == [8, 8]  # tiny captures fit: whole batches, as before
    rows.clear()
    monkeypatch.setattr(fusion, "_statistics_chunk_rows", lambda *args: 3)
    chunked = fuse(models, data, CONFIG)
    assert rows == [3, 3, 2, 3, 3, 2]
    for name, plan in whole.transport_plans[1].items():
        assert torch.equal(plan, chunked.transport_plans[1][name]), name
    expected = whole.model.state_dict()
    for name, tensor in chunked.model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6)


def test_the_statistics_chunk_is_the_budget_over_the_kept_captures_of_the_densest_row(monkeypatch):
    import hf_clafusion.fusion as fusion

    models, data = [bert(3, 0), bert(2, 1)], batch()
    data = {key: value.repeat(1, 8) for key, value in data.items()}  # 96 tokens: captures outweigh the weights
    clock = Stopwatch()
    run = prepare(models, data, CONFIG, clock=clock)
    model = run.models[1]
    captures = list(dict.fromkeys(c for g in run.specs[1].groups for c in g.captures))
    with torch.no_grad():
        with capture_outputs(model, captures) as out:
            model(**{k: v[4:5] for k, v in run.batches[0].items()})  # rows 0-3 are a third padding
        per_row = sum(run.adapter.features(out[c], None).numel() * 4 for c in captures)
    monkeypatch.setattr(fusion, "STATISTICS_CAPTURE_BYTES", 3 * per_row)  # above a third of the tiny weights' bytes
    weights = [*run.models, run.models[run.anchor]]  # parents and the fused model (the anchor's shape)
    assert 3 * per_row > sum(4 * p.numel() for m in weights for p in m.parameters()) // 3
    with torch.no_grad():
        chunk = fusion._statistics_chunk_rows(run, model, captures, 1)
        assert chunk == 3  # 3 rows fit: 8 rows run as 3 + 3 + 2 (measured on a row without padding)
        monkeypatch.setattr(fusion, "STATISTICS_CAPTURE_BYTES", 5 * per_row)
        assert fusion._statistics_chunk_rows(run, model, captures, 1) == 4  # 5 fit: 4 + 4, not 5 + 3
        monkeypatch.setattr(fusion, "STATISTICS_CAPTURE_BYTES", 8 * per_row)
        assert fusion._statistics_chunk_rows(run, model, captures, 1) is None  # a whole batch fits


def test_activation_distances_computed_block_by_block_equal_the_whole_matrix_formula():
    g = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(300, 700, generator=g) + 1  # 700 columns: blocks of 374 rows, the last one partial
    stats = ActivationStats()
    stats.update(x[:, torch.randperm(700, generator=g)][:, :600] + 0.1, x)
    n = stats.count
    dev_b, dev_a = stats.sum_b / n, stats.sum_a / n
    std_b = (stats.sq_b / n - dev_b.square()).clamp_min(0.0).sqrt()
    std_a = (stats.sq_a / n - dev_a.square()).clamp_min(0.0).sqrt()
    cov = stats.cross / n - dev_b[:, None] * dev_a[None, :]
    mean_b, mean_a = stats.shift_b.double() + dev_b, stats.shift_a.double() + dev_a
    sq = (mean_b[:, None] - mean_a[None, :]).square() + (std_b[:, None] - std_a[None, :]).square()
    whole = (sq + 2.0 * (std_b[:, None] * std_a[None, :] - cov).clamp_min(0.0)).sqrt()
    assert torch.equal(stats.moments()[4], cov)
    assert torch.equal(stats.distances(), whole)


@pytest.mark.parametrize("metric", ["activations", "correlation"])
def test_group_costs_are_kept_in_float32_and_give_the_plans_of_the_float64_distances(metric):
    """The statistics become float32 costs before any plan is solved (half the memory of the float64 moments), and
    the exact plans solved from them are those of the float64 distances."""
    from hf_clafusion.fusion import _group_costs

    models, data = [bert(3, 0), bert(2, 1)], batch()
    config = CONFIG.replace(ground_metric=metric, unmatched="identity")
    clock = Stopwatch()
    run = prepare(models, data, config, clock=clock)
    activations = collect_layer_activations(run, clock=clock)
    balanced = balance_depths(run, align_segments(run, activations, clock=clock), activations, clock=clock)
    statistics = collect_group_statistics(run, balanced, clock=clock)
    reference = [
        None if stats is None else (stats.correlation_distances() if metric == "correlation" else stats.distances())
        for stats in statistics[1]
    ]
    costs = _group_costs(run, statistics)[1]
    assert all(stats is None for stats in statistics[1])  # consumed
    assert sum(cost is not None for cost in costs) >= 4
    for cost, want in zip(costs, reference):
        if want is None:
            assert cost is None
            continue
        assert cost.dtype == torch.float32 and cost.shape == want.shape
        torch.testing.assert_close(cost.double(), want, rtol=1e-7, atol=1e-7 * float(want.max()))
        for solver in ("emd", "auto"):
            got = solve_transport(cost.double(), solver=solver).plan
            assert torch.equal(got, solve_transport(want, solver=solver).plan), solver


def test_exact_plans_are_kept_sparse_and_read_back_as_the_dense_plans_the_fusion_applied():
    models, data = [bert(3, 0), bert(2, 1)], batch()
    clock = Stopwatch()
    run = prepare(models, data, CONFIG, clock=clock)
    activations = collect_layer_activations(run, clock=clock)
    balanced = balance_depths(run, align_segments(run, activations, clock=clock), activations, clock=clock)
    transported = transport_to_anchor(run, balanced, collect_group_statistics(run, balanced, clock=clock), clock=clock)
    plans = transported.plans[1]
    assert isinstance(plans, TransportPlans) and len(plans) >= 4
    for name, plan in plans.items():
        n_model, n_anchor = plan.shape
        assert plans.is_compact(name), name
        assert plan.layout == torch.strided and plan.dtype == torch.float32
        assert int(torch.count_nonzero(plan)) <= n_model + n_anchor - 1  # a vertex of the transport polytope
        torch.testing.assert_close(plan.sum(), torch.tensor(1.0), rtol=1e-5, atol=1e-6)
        assert torch.equal(plans[name], plan)  # read twice, the same plan
    dense = sum(plan.numel() * 4 for plan in plans.values())
    assert plans.nbytes() < dense / 2

    # what a dict of dense plans held is what the mapping gives back
    result = fuse(models, data, CONFIG)
    for name, plan in result.transport_plans[1].items():
        assert torch.equal(plan, plans[name]), name


def test_transport_plans_keep_a_dense_plan_dense_and_round_trip_sparse_ones_exactly():
    g = torch.Generator().manual_seed(0)
    soft = torch.rand(6, 5, generator=g)
    soft /= soft.sum()
    hard = torch.zeros(6, 6)
    hard[torch.arange(6), torch.randperm(6, generator=g)] = 1 / 6
    plans = TransportPlans({"soft": soft, "hard": hard.double()})
    assert not plans.is_compact("soft") and plans.is_compact("hard")
    assert torch.equal(plans["soft"], soft) and torch.equal(plans["hard"], hard)
    assert plans["hard"].dtype == torch.float32
    assert list(plans) == ["soft", "hard"] and len(plans) == 2
    assert plans.nbytes() == soft.numel() * 4 + 6 * (2 * 8 + 4)
    del plans["soft"]
    assert list(plans.keys()) == ["hard"] and "TransportPlans({'hard': (6, 6)})" == repr(plans)
