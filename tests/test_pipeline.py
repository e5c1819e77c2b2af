"""The fusion pipeline as stage functions (hf_clafusion/fusion.py): values in, values out."""

import pytest
import torch

from hf_clafusion import FusionConfig, fuse
from hf_clafusion.adapters import get_adapter
from hf_clafusion.errors import IncompatibleModelsError
from hf_clafusion.fusion import (
    Stopwatch,
    align_segments,
    average,
    balance_depths,
    collect_group_statistics,
    collect_layer_activations,
    load_fused,
    prepare,
    repair_statistics,
    transport_to_anchor,
)

from ._models import cnn, fuse_leaves_parents_alone, mlp


def _run_stages(models, data, config):
    """Every stage of ``fuse`` called by hand, returning what each produced."""
    clock = Stopwatch()
    run = prepare(models, data, config, clock=clock)
    activations = collect_layer_activations(run, clock=clock)
    alignment = align_segments(run, activations, clock=clock)
    balanced = balance_depths(run, alignment, activations, clock=clock)
    statistics = collect_group_statistics(run, balanced, clock=clock)
    transported = transport_to_anchor(run, balanced, statistics, clock=clock)
    fused = load_fused(balanced.models[run.anchor], average(transported.states, run.weights, anchor=run.anchor))
    return run, alignment, balanced, transported, fused, clock


@pytest.mark.parametrize("balancing", ["identity", "merge"])
def test_the_stages_called_by_hand_give_the_model_fuse_gives(balancing):
    deep, shallow = mlp(8, [16, 14, 12, 16], 3, seed=1), mlp(8, [12, 10], 3, seed=2)
    x = torch.randn(64, 8)
    config = FusionConfig(balancing=balancing, repair=None, progress=False, alignment="cla")  # one candidate
    _, alignment, _, transported, fused, clock = _run_stages([deep, shallow], x, config)
    result = fuse([deep, shallow], x, config)
    assert [p.alignment for p in alignment.pairs] == [p.alignment for p in result.pairs]
    assert transported.plans[1].keys() == result.transport_plans[1].keys()
    expected = result.model.state_dict()
    assert list(fused.state_dict()) == list(expected)
    assert all(torch.equal(t, expected[name]) for name, t in fused.state_dict().items())
    assert list(clock.timings) == [k for k in result.timings if k != "averaging"]


def test_average_yields_the_weighted_average_tensor_by_tensor_in_the_anchor_order():
    a = {"w": torch.randn(3, 4), "b": torch.randn(3), "bn.num_batches_tracked": torch.tensor(5)}
    b = {"bn.num_batches_tracked": torch.tensor(9), "b": torch.randn(3), "w": torch.randn(3, 4)}
    stream = average({0: a, 1: b}, [0.25, 0.75], anchor=1)
    assert next(stream)[0] == "bn.num_batches_tracked"  # one tensor at a time, nothing computed ahead
    rest = dict(stream)
    assert list(rest) == ["b", "w"]
    assert torch.allclose(rest["w"], 0.25 * a["w"] + 0.75 * b["w"])
    assert torch.allclose(rest["b"], 0.25 * a["b"] + 0.75 * b["b"])


def test_average_streams_the_tensors_before_a_later_shape_mismatch():
    a = {"first": torch.zeros(2), "second": torch.zeros(3)}
    b = {"first": torch.ones(2), "second": torch.ones(4)}
    stream = average({0: a, 1: b}, [0.5, 0.5], anchor=0)
    name, tensor = next(stream)
    assert name == "first" and torch.equal(tensor, torch.full((2,), 0.5))
    with pytest.raises(IncompatibleModelsError, match="'second' has different shapes"):
        next(stream)


def test_average_refuses_models_with_different_parameter_names_before_yielding_anything():
    stream = average({0: {"w": torch.zeros(2)}, 1: {"w": torch.zeros(2), "b": torch.zeros(2)}}, [0.5, 0.5], anchor=0)
    with pytest.raises(IncompatibleModelsError, match=r"parameters \['b'\] exist in only one"):
        next(stream)


@pytest.mark.parametrize("reset", [False, True])
def test_repair_statistics_recomputes_batchnorm_statistics_only_when_asked(reset):
    deep, shallow = cnn([6, 6, 6, "M"], 4, seed=1), cnn([5, 5, "M"], 4, seed=2)
    x = torch.randn(32, 1, 8, 8)
    config = FusionConfig(repair="bn" if reset else None, batch_size=32, progress=False)
    run, _, balanced, transported, fused, clock = _run_stages([deep, shallow], x, config)
    averaged = fused.state_dict()
    averaged = {name: t.clone() for name, t in averaged.items()}
    outcome = repair_statistics(fused, run, balanced, transported, clock=clock)
    assert outcome.bn_reset is reset and outcome.mode == ("bn" if reset else None)
    assert ("bn_reset" in clock.timings) is reset
    first_bn = fused[1]
    if reset:
        with torch.no_grad():
            conv_out = fused[0](x)
        assert torch.allclose(first_bn.running_mean, conv_out.mean(dim=(0, 2, 3)), atol=1e-5)
        assert not torch.allclose(first_bn.running_mean, averaged["1.running_mean"])
    else:
        assert all(torch.equal(t, averaged[name]) for name, t in fused.state_dict().items())


def test_insert_identity_returns_the_errors_and_leaves_the_adapter_unchanged():
    shallow, deep = mlp(6, [8, 8], 2, seed=1), mlp(6, [8, 8, 8], 2, seed=2)
    adapter = get_adapter(shallow)
    before = dict(vars(adapter))
    balanced, errors = adapter.insert_identity(adapter.prepare(shallow), [[0, None, 1]], adapter.prepare(deep))
    assert errors == {}
    assert sum(isinstance(m, torch.nn.Linear) for m in balanced) == 4
    assert vars(adapter) == before
    assert not hasattr(adapter, "identity_errors")


def test_stopwatch_records_a_stage_that_raises():
    clock = Stopwatch()
    with pytest.raises(ValueError), clock("failing"):
        raise ValueError("boom")
    assert list(clock.timings) == ["failing"]
    assert clock.timings["failing"] >= 0.0


def test_the_auto_repair_trial_is_timed_even_when_it_keeps_no_repair():
    deep, shallow = mlp(8, [12, 12, 12], 3, seed=1), mlp(8, [10], 3, seed=2)
    result = fuse([deep, shallow], torch.randn(48, 8), progress=False, batch_size=48)
    assert result.config.repair in (None, "repair")  # an MLP without BatchNorm: None and "repair" were tried
    assert result.timings["repair"] > 0.0 and "bn_reset" not in result.timings
    unrepaired = fuse([deep, shallow], torch.randn(48, 8), progress=False, batch_size=48, repair=None)
    assert "repair" not in unrepaired.timings and "bn_reset" not in unrepaired.timings


def _mlp_pair():
    return mlp(8, [16, 14, 12, 16], 3, seed=1), mlp(8, [12, 10], 3, seed=2), torch.randn(64, 8)


def _cnn_pair():
    return cnn([8, 8, "M", 16, 16], seed=1), cnn([8, "M", 16], seed=2), torch.randn(64, 1, 8, 8)


@pytest.mark.parametrize(
    ("build", "overrides"),
    [
        (_mlp_pair, {"repair": None}),
        (_mlp_pair, {"repair": "repair"}),
        (_mlp_pair, {"balancing": "merge"}),  # the deep parent's unmatched layers merged into their neighbours
        (_cnn_pair, {"repair": None}),
        (_cnn_pair, {"repair": "bn"}),
        (_cnn_pair, {"repair": "repair"}),
    ],
    ids=["mlp", "mlp-repair", "mlp-merge", "cnn-bn", "cnn-bn-recomputed", "cnn-bn-repair"],
)
def test_fuse_never_writes_into_sequential_parents_and_shares_no_storage_with_them(build, overrides):
    deep, shallow, data = build()
    config = FusionConfig(progress=False, **overrides)
    fuse_leaves_parents_alone(deep, shallow, lambda a, b: fuse([a, b], data, config).model)
