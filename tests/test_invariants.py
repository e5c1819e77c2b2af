"""Function-preservation invariants (DESIGN.md): identity insertion, permuted copies, widened copies."""

import pytest
import torch

from hf_clafusion import FusionConfig, fuse
from hf_clafusion.adapters import get_adapter

from ._models import cnn, max_rel_error, mlp, permuted_copy, randomize_bn, widened_mlp


# Exact invariants: no statistics repair, and the two-sided rescaling that is exact for widened copies.
EXACT = FusionConfig(repair=None, plan_normalization="two_sided", progress=False)


def _insert(model, layouts, template):
    adapter = get_adapter(model)
    balanced, errors = adapter.insert_identity(adapter.prepare(model), layouts, adapter.prepare(template))
    assert errors == {}  # every identity of a Sequential is exact
    return balanced


@pytest.mark.parametrize("bias", [True, False])
def test_identity_layers_preserve_mlp_outputs(bias):
    shallow = mlp(10, [16, 12], 4, bias=bias)
    deep = mlp(10, [16, 9, 7, 12], 4, bias=bias, seed=1)
    x = torch.randn(50, 10)
    balanced = _insert(shallow, [[0, None, None, 1]], deep)
    assert sum(isinstance(m, torch.nn.Linear) for m in balanced) == 5
    assert max_rel_error(balanced(x), shallow(x)) < 1e-6


def test_identity_before_the_first_layer_is_exact_for_negative_inputs():
    """The official code inserts I before the first layer, where ReLU(I x) != x; the signed construction is exact."""
    shallow = mlp(6, [8, 8], 3)
    deep = mlp(6, [8, 8, 8, 8], 3, seed=1)
    x = torch.randn(40, 6) * 3  # plenty of negative inputs
    balanced = _insert(shallow, [[None, None, 0, 1]], deep)
    assert max_rel_error(balanced(x), shallow(x)) < 1e-6


@pytest.mark.parametrize("bn", [True, False])
def test_identity_layers_preserve_cnn_outputs(bn):
    shallow = cnn([6, "M", 8, "M"], bn=bn)
    deep = cnn([5, 5, 5, "M", 7, 7, "M"], bn=bn, seed=1)
    x = torch.rand(20, 1, 8, 8)
    balanced = _insert(shallow, [[0, None, None], [None, 0]], deep).eval()
    shallow.eval()
    assert sum(isinstance(m, torch.nn.Conv2d) for m in balanced) == 5
    assert max_rel_error(balanced(x), shallow(x)) < 1e-5


def test_identity_layers_in_the_fc_segment_after_flatten_preserve_outputs():
    shallow = cnn([4, "M"], hidden_fc=[10], bn=False)
    deep = cnn([4, "M"], hidden_fc=[12, 12, 12], bn=False, seed=1)
    x = torch.rand(10, 1, 8, 8)
    balanced = _insert(shallow, [[0], [0, None, None]], deep)
    assert max_rel_error(balanced(x), shallow(x)) < 1e-6
    first_fc = next(m for m in balanced if isinstance(m, torch.nn.Linear))
    assert first_fc.in_features == 4 * 4 * 4


def _fused_equals(original, other, x, **overrides):
    result = fuse([original, other], x, EXACT, **overrides)
    original.eval()
    return max_rel_error(result.model(x), original(x)), result


@pytest.mark.parametrize("seed", [0, 1])
def test_fusing_with_a_permuted_copy_returns_the_original_mlp(seed):
    model = mlp(12, [32, 24, 16], 5, seed=seed)
    x = torch.randn(200, 12)
    error, result = _fused_equals(model, permuted_copy(model, seed=seed + 10), x)
    assert error < 1e-4
    assert result.layer_alignment == [[0, 1, 2]]


@pytest.mark.parametrize("solver", ["emd", "permutation", "sinkhorn"])
@pytest.mark.parametrize("metric", ["activations", "weights"])
def test_every_solver_and_metric_fuse_a_permuted_copy_back_to_the_original(solver, metric):
    model = mlp(12, [20, 16], 5, seed=3)
    x = torch.randn(150, 12)
    overrides = {"solver": solver, "ground_metric": metric}
    if solver == "sinkhorn":
        overrides["reg"] = 0.002
    error, _ = _fused_equals(model, permuted_copy(model, seed=4), x, **overrides)
    assert error < (1e-4 if solver != "sinkhorn" else 2e-2)


@pytest.mark.parametrize("bn", [True, False])
def test_fusing_with_a_permuted_copy_returns_the_original_cnn(bn):
    model = cnn([6, 6, "M", 8, "M"], hidden_fc=[16], bn=bn, seed=2).eval()
    x = torch.rand(64, 1, 8, 8)
    error, _ = _fused_equals(model, permuted_copy(model, seed=5), x)
    assert error < 1e-4


# Uniform marginals make duplication exact when every neuron has the same number of copies (fusion_math.md §1).
SHUFFLED_DOUBLE = [[3, 0, 5, 1, 1, 4, 2, 0, 5, 3, 2, 4], [4, 0, 2, 1, 3, 3, 0, 2, 4, 1]]


def test_fusing_with_a_widened_copy_returns_the_original_narrow_anchor():
    model = mlp(10, [6, 5], 3, seed=7)
    wide = widened_mlp(model, SHUFFLED_DOUBLE)
    x = torch.randn(200, 10)
    assert max_rel_error(wide(x), model(x)) < 1e-5
    error, _ = _fused_equals(model, wide, x, anchor=0)
    assert error < 1e-4


def test_fusing_with_a_widened_copy_returns_the_original_wide_anchor():
    model = mlp(10, [6, 5], 3, seed=8)
    wide = widened_mlp(model, SHUFFLED_DOUBLE)
    x = torch.randn(200, 10)
    result = fuse([wide, model], x, EXACT, anchor=0)
    assert max_rel_error(result.model(x), wide(x)) < 1e-4


def test_official_column_normalisation_is_wrong_for_widened_copies():
    """fusion_math.md §1: one rescaling on both axes breaks when widths differ (the reason for two_sided)."""
    model = mlp(10, [6, 5], 3, seed=8)
    wide = widened_mlp(model, SHUFFLED_DOUBLE)
    x = torch.randn(200, 10)
    result = fuse([wide, model], x, EXACT, anchor=0, plan_normalization="column", width_matching="transport")
    assert max_rel_error(result.model(x), wide(x)) > 0.05


# Some neurons copied three times, some once: uniform transport is not exact here, a partial assignment is.
UNEVEN = [[0, 0, 0, 1, 2, 3, 4, 5], [4, 0, 2, 1, 3, 3, 3]]


@pytest.mark.parametrize("sources", [SHUFFLED_DOUBLE, UNEVEN], ids=["doubled", "uneven"])
@pytest.mark.parametrize("normalization", ["column", "two_sided"])
@pytest.mark.parametrize("repair", [None, "repair"])
def test_partial_width_matching_fuses_a_widened_copy_back_exactly(sources, normalization, repair):
    """`width_matching="partial"` (the default): each narrow neuron is matched with one of its copies, the other
    copies stay the anchor's, so the fused model computes the wide anchor's function whatever the copy counts and
    plan normalisation; REPAIR is the identity there."""
    model = mlp(10, [6, 5], 3, seed=8)
    wide = widened_mlp(model, sources)
    x = torch.randn(200, 10)
    assert max_rel_error(wide(x), model(x)) < 1e-5
    config = FusionConfig(repair=repair, plan_normalization=normalization, progress=False)
    result = fuse([wide, model], x, config, anchor=0)
    assert set(result.transport_solvers[1].values()) == {"partial"}
    assert max_rel_error(result.model(x), wide(x)) < 1e-4
    if sources is UNEVEN and repair is None:  # the transport plan cannot do this
        spread = fuse([wide, model], x, config, anchor=0, width_matching="transport")
        assert max_rel_error(spread.model(x), wide(x)) > 0.05


def test_partial_width_matching_keeps_unpaired_anchor_neurons_whole():
    """An anchor neuron without a partner keeps the anchor's incoming weights and bias exactly; a paired one is
    the average of the two models' neurons, the narrow model's weights placed on its partners' inputs only."""
    wide, narrow = mlp(10, [12, 8], 3, seed=1), mlp(10, [6, 5], 3, seed=2)
    x = torch.randn(300, 10)
    result = fuse([wide, narrow], x, FusionConfig(repair=None, progress=False), anchor=0)
    plans = result.transport_plans[1]
    fused = [m for m in result.model if isinstance(m, torch.nn.Linear)]
    parents = [[m for m in model if isinstance(m, torch.nn.Linear)] for model in (wide, narrow)]
    previous = torch.eye(10, dtype=torch.float64)  # the inputs: shared
    for i, name in enumerate(["layer.0", "layer.2"]):
        plan = plans[name].double()
        match = (plan > 0).double()
        assert torch.equal(match.sum(1), torch.ones(plan.shape[0], dtype=torch.float64))  # each narrow neuron once
        assert bool((match.sum(0) <= 1).all())
        alone = match.sum(0) == 0
        assert int(alone.sum()) == plan.shape[1] - plan.shape[0]
        anchor_w, narrow_w = parents[0][i].weight.double(), parents[1][i].weight.double()
        torch.testing.assert_close(fused[i].weight.double()[alone], anchor_w[alone])
        torch.testing.assert_close(fused[i].bias.double()[alone], parents[0][i].bias.double()[alone])
        expected = 0.5 * anchor_w + 0.5 * match.T @ narrow_w @ previous
        torch.testing.assert_close(fused[i].weight.double()[~alone], expected[~alone], atol=1e-6, rtol=1e-5)
        previous = match


def test_fusing_a_model_with_two_permuted_copies_returns_the_original():
    """Fusing a model with itself and a permuted copy of itself, K = 3, returns the original."""
    model = mlp(8, [16, 16], 4, seed=9)
    x = torch.randn(100, 8)
    result = fuse([model, permuted_copy(model, 1), permuted_copy(model, 2)], x, EXACT)
    assert max_rel_error(result.model(x), model(x)) < 1e-4
    assert len(result.layer_alignments) == 2


def test_bn_reset_recomputes_statistics_on_calibration_data():
    model = cnn([6, "M"], bn=True, seed=3)
    randomize_bn(model, 4)
    x = torch.rand(64, 1, 8, 8)
    config = FusionConfig(progress=False, num_samples=64, batch_size=64, repair="bn")
    result = fuse([model, permuted_copy(model, 3)], x, config)
    bn = next(m for m in result.model if isinstance(m, torch.nn.BatchNorm2d))
    conv_out = result.model[0](x)
    assert torch.allclose(bn.running_mean, conv_out.mean(dim=(0, 2, 3)), atol=1e-4)
    assert result.bn_reset


def test_depths_that_cross_over_between_segments_fuse_to_the_deeper_of_each_at_the_cheapest_layers():
    a = cnn([4, 4, 4, "M", 6, "M"], seed=1)  # deeper in segment 0
    b = cnn([5, "M", 6, 6, 6, "M"], seed=2)  # deeper in segment 1
    x = torch.rand(32, 1, 8, 8)
    result = fuse([a, b], x, FusionConfig(progress=False))
    convs = [m for m in result.model if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 6
    pair = result.pairs[0]
    assert pair.deeper == [0, 1]  # model 0 is deeper in segment 0, model 1 in segment 1
    # one-layer segments (first/last-fixed relaxed): each is matched to its cheapest layer of the deeper model
    costs = result.layer_costs
    assert [c.shape for c in costs] == [(3, 1), (3, 1)]
    cheapest = [int(c[:, 0].argmin()) for c in costs]
    assert [pair.local(0), pair.local(1)] == [[cheapest[0]], [cheapest[1]]]
    # reported as hidden-layer indices of the deeper model: model 1's segment 1 starts after its one layer
    assert result.layer_alignment == [[cheapest[0]], [1 + cheapest[1]]]
    assert [c.out_channels for c in convs] == [4, 4, 4, 6, 6, 6]  # the anchor (model 0) widths; identity layers in it


def test_partial_width_matching_keeps_unpaired_conv_channels_and_their_batchnorm():
    """Convolutions and BatchNorm (parameters and running statistics) of an unpaired anchor channel are the
    anchor's; the classifier reading the flattened map gets the narrow model's weights on paired channels only."""
    wide, narrow = cnn([8, "M"], 3, bn=True, seed=1), cnn([4, "M"], 3, bn=True, seed=2)
    x = torch.rand(64, 1, 8, 8)
    result = fuse([wide, narrow], x, FusionConfig(repair=None, progress=False), anchor=0)
    plan = next(iter(result.transport_plans[1].values())).double()
    assert result.transport_solvers[1] == {name: "partial" for name in result.transport_plans[1]}
    alone = plan.sum(0) == 0
    assert int(alone.sum()) == 4
    fused_state, wide_state, narrow_state = result.model.state_dict(), wide.state_dict(), narrow.state_dict()
    for name in ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        torch.testing.assert_close(fused_state[name][alone], wide_state[name][alone])
    # the classifier: a Linear over 8 channels x 16 positions, channel-major
    match = (plan > 0).double()
    head_narrow = narrow_state["5.weight"].double().reshape(3, 4, 16)
    carried = torch.einsum("oip,ij->ojp", head_narrow, match).reshape(3, -1)
    expected = 0.5 * wide_state["5.weight"].double() + 0.5 * carried
    torch.testing.assert_close(fused_state["5.weight"].double(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("repair", [None, "repair"])
def test_partial_width_matching_with_three_models_gives_a_missing_models_weight_to_the_anchor(repair):
    """K = 3: fusing a wide model with two copies of a narrow one equals fusing it with one copy weighted twice;
    at an unpaired anchor neuron both copies' weight goes to the anchor, in the weights and the REPAIR targets."""
    wide, narrow = mlp(10, [12, 8], 3, seed=1), mlp(10, [6, 5], 3, seed=2)
    x = torch.randn(300, 10)
    config = FusionConfig(repair=repair, progress=False)
    three = fuse([wide, narrow, narrow], x, config, anchor=0)
    two = fuse([wide, narrow], x, config, anchor=0, weights=(1 / 3, 2 / 3))
    assert max_rel_error(three.model(x), two.model(x)) < 1e-5
