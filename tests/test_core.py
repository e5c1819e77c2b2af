"""The pure tensor math in hf_clafusion.core."""

import numpy as np
import pytest
import torch

from hf_clafusion import CalibrationDataError, ClaFusionWarning, ConfigError
from hf_clafusion.core import (
    ActivationStats,
    MinibatchCKA,
    absorb_signed_input,
    apply_plan,
    cca_cost_matrix,
    cka_cost_matrix,
    identity_weight,
    index_cost_matrix,
    linear_cka,
    merge_linear,
    neuron_count_cost_matrix,
    neuron_distances,
    plan_maps,
    relu_diagonal,
    signed_identity_weight,
    transport_plan,
    wasserstein_cost_matrix,
    weight_distances,
)


def _reference_cka(x, y):
    """Feature-space linear CKA (Kornblith et al. 2019, eq. 5) on centred data."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def test_cka_matches_feature_space_formula_and_invariances():
    x = torch.randn(80, 12, dtype=torch.float64)
    y = x @ torch.randn(12, 7, dtype=torch.float64) + 0.5 * torch.randn(80, 7, dtype=torch.float64)
    assert float(linear_cka(x, y)) == pytest.approx(_reference_cka(x, y), rel=1e-9)
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    assert float(linear_cka(x, 3.0 * x @ q + 1.0)) == pytest.approx(1.0, abs=1e-9)  # orthogonal + scale + shift


def test_cka_cost_matrix_is_batched_over_all_pairs():
    a = [torch.randn(50, 6), torch.randn(50, 3, 2, 2)]
    b = [torch.randn(50, 4), a[0] * 2, torch.randn(50, 9)]
    cost = cka_cost_matrix(a, b)
    assert cost.shape == (2, 3)
    assert float(cost[0, 1]) == pytest.approx(0.0, abs=1e-9)
    for i in range(2):
        for j in range(3):
            expected = 1 - _reference_cka(a[i].reshape(50, -1).double(), b[j].reshape(50, -1).double())
            assert float(cost[i, j]) == pytest.approx(expected, abs=1e-9)


def test_minibatch_cka_converges_to_the_full_estimate():
    torch.manual_seed(0)
    x = torch.randn(4000, 10, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(10, 5, dtype=torch.float64))
    acc = MinibatchCKA()
    for start in range(0, 4000, 200):
        acc.update([x[start : start + 200]], [y[start : start + 200]])
    assert acc.num_batches == 20
    assert float(acc.compute()[0, 0]) == pytest.approx(1 - _reference_cka(x, y), abs=0.01)


def test_minibatch_cka_needs_four_samples_per_batch():
    with pytest.raises(CalibrationDataError, match="at least 4 samples per batch"):
        MinibatchCKA().update([torch.randn(3, 2)], [torch.randn(3, 2)])


def test_cca_warns_when_degenerate_and_is_zero_for_linear_maps():
    x = torch.randn(100, 5, dtype=torch.float64)
    cost = cca_cost_matrix([x], [x @ torch.randn(5, 5, dtype=torch.float64)])
    assert float(cost[0, 0]) == pytest.approx(0.0, abs=1e-9)
    with pytest.warns(ClaFusionWarning, match="CCA is degenerate.*widest layer 20 >= 10 samples"):
        cca_cost_matrix([torch.randn(10, 20)], [torch.randn(10, 3)])


def test_wasserstein_cost_is_zero_for_a_permuted_layer_and_positive_otherwise():
    x = torch.randn(60, 8)
    cost = wasserstein_cost_matrix([x], [x[:, torch.randperm(8)], torch.randn(60, 8)])
    assert float(cost[0, 0]) == pytest.approx(0.0, abs=1e-6)
    assert float(cost[0, 1]) > 0.5


def test_official_euclidean_measures():
    assert neuron_count_cost_matrix([400, 200], [400, 100]).tolist() == [[0.0, 90000.0], [40000.0, 10000.0]]
    assert index_cost_matrix(3, 2).tolist() == [[0.0, 1.0], [1.0, 0.0], [4.0, 1.0]]


def test_streamed_statistics_equal_direct_distances():
    a, b = torch.randn(300, 7), torch.randn(300, 5)
    stats = ActivationStats()
    for start in range(0, 300, 64):
        stats.update(b[start : start + 64], a[start : start + 64])
    assert torch.allclose(stats.distances(), neuron_distances(b, a), atol=1e-9)
    direct = torch.cdist(b.double().T, a.double().T) / 300**0.5
    assert torch.allclose(stats.distances(), direct, atol=1e-9)


@pytest.mark.parametrize("solver", ["emd", "sinkhorn", "permutation"])
def test_plans_have_uniform_marginals(solver):
    cost = torch.rand(6, 6, dtype=torch.float64)
    plan = transport_plan(cost, solver=solver, reg=0.05)
    assert torch.allclose(plan.sum(0), torch.full((6,), 1 / 6, dtype=torch.float64), atol=1e-6)
    assert float(plan.sum()) == pytest.approx(1.0, abs=1e-6)


def test_emd_recovers_a_permutation_and_returns_numpy_for_numpy():
    perm = torch.randperm(7)
    cost = 1.0 - torch.eye(7, dtype=torch.float64)[perm]
    plan = transport_plan(cost.numpy(), solver="emd")
    assert isinstance(plan, np.ndarray)
    assert (plan.argmax(1) == perm.numpy()).all()


def test_permutation_solver_needs_equal_widths():
    with pytest.raises(ConfigError, match="equal width, got 4 and 6"):
        transport_plan(torch.rand(4, 6), solver="permutation")


def test_sinkhorn_warns_when_it_cannot_converge():
    with pytest.warns(ClaFusionWarning, match="Raise `reg`"):
        transport_plan(torch.rand(30, 20, dtype=torch.float64), solver="sinkhorn", reg=1e-4, max_iter=3)


def test_two_sided_maps_and_column_maps():
    plan = transport_plan(torch.rand(4, 8, dtype=torch.float64), solver="emd")
    r, s = plan_maps(plan, "two_sided")
    assert torch.allclose(r.sum(0), torch.ones(8, dtype=torch.float64))
    assert torch.allclose(s.sum(1), torch.ones(4, dtype=torch.float64))
    r2, s2 = plan_maps(plan, "column")
    assert torch.equal(r2, s2)


def test_apply_plan_on_conv_and_flattened_axes():
    weight = torch.randn(5, 3, 3, 3)
    perm = torch.tensor([2, 0, 1])
    matrix = torch.zeros(3, 3, dtype=torch.float64)
    matrix[perm, torch.arange(3)] = 1.0
    assert torch.equal(apply_plan(weight, 1, matrix), weight[:, perm])
    flat = torch.randn(4, 3 * 5)
    expected = flat.view(4, 3, 5)[:, perm].reshape(4, 15)
    assert torch.allclose(apply_plan(flat, 1, matrix, inner=5), expected)


def test_identity_and_signed_identity_weights():
    x = torch.randn(10, 4)
    assert torch.equal(torch.relu(x.abs() @ identity_weight(4).T), x.abs())
    split = torch.relu(x @ signed_identity_weight(4, first=True).T)
    again = torch.relu(split @ signed_identity_weight(4, first=False).T)
    w = torch.randn(3, 4)
    assert torch.allclose(again @ absorb_signed_input(w).T, x @ w.T, atol=1e-6)
    conv = identity_weight(2, [3, 3])
    assert conv[0, 0, 1, 1] == 1 and conv.sum() == 2
    with pytest.raises(ConfigError, match="odd kernel"):
        identity_weight(2, [2, 2])


def test_merge_linear_composes_layers_with_a_diagonal():
    w1, b1, w2, b2 = torch.randn(6, 4), torch.randn(6), torch.randn(3, 6), torch.randn(3)
    x = torch.randn(20, 4)
    d = relu_diagonal(x @ w1.T + b1, "avg")
    w, b = merge_linear(w1, b1, d, w2, b2)
    expected = ((x @ w1.T + b1) * d.float()) @ w2.T + b2
    assert torch.allclose(x @ w.T + b, expected, atol=1e-5)
    z = torch.tensor([[1.0, -2.0, 0.5], [-1.0, -1.0, 0.5], [3.0, -1.0, -2.0]])
    assert relu_diagonal(z, "sum").tolist() == [1.0, 0.0, 0.0]
    assert relu_diagonal(z, "majority").tolist() == [1.0, 0.0, 1.0]
    assert relu_diagonal(z, "avg").tolist() == pytest.approx([2 / 3, 0.0, 2 / 3])


def test_weight_distances_shape():
    assert weight_distances(torch.randn(4, 3, 3, 3), torch.randn(6, 3, 3, 3)).shape == (4, 6)


def test_sinkhorn_runs_on_the_input_backend():
    cost = np.random.default_rng(0).random((5, 7))
    plan_np = transport_plan(cost, solver="sinkhorn", reg=0.05)
    plan_t = transport_plan(torch.tensor(cost), solver="sinkhorn", reg=0.05)
    assert isinstance(plan_np, np.ndarray) and isinstance(plan_t, torch.Tensor)
    assert np.allclose(plan_np, plan_t.numpy(), atol=1e-9)
    assert np.allclose(plan_np.sum(0), 1 / 7)


def test_cka_gram_and_feature_forms_agree():
    """Layers wider than the number of samples use the Gram form, narrow ones the feature form: same values."""
    x = torch.randn(20, 50, dtype=torch.float64)  # D > N: Gram form
    y = x[:, :10] @ torch.randn(10, 8, dtype=torch.float64) + 0.3 * torch.randn(20, 8, dtype=torch.float64)
    wide_y = torch.cat([y, torch.randn(20, 40, dtype=torch.float64)], dim=1)
    cost = cka_cost_matrix([x], [y, wide_y])
    assert float(cost[0, 0]) == pytest.approx(1 - _reference_cka(x, y), abs=1e-12)
    assert float(cost[0, 1]) == pytest.approx(1 - _reference_cka(x, wide_y), abs=1e-12)


# --------------------------------------------------------------------------- head-structured plans


def _head_perm(heads: int, dim: int, within: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(heads, generator=g)
    index = []
    for h in order.tolist():
        inner = torch.randperm(dim, generator=g) if within else torch.arange(dim)
        index.extend((h * dim + inner).tolist())
    return torch.tensor(index)


@pytest.mark.parametrize("within", [True, False])
def test_head_plan_recovers_a_head_structured_permutation(within):
    from hf_clafusion.core import ActivationStats, head_plan

    heads, dim = 4, 6
    acts_a = torch.randn(300, heads * dim)
    perm = _head_perm(heads, dim, within, seed=3)
    acts_b = acts_a[:, perm]  # neuron i of B is neuron perm[i] of A
    stats = ActivationStats()
    stats.update(acts_b, acts_a)
    plan = head_plan(stats.distances(), heads, within=within)
    assert torch.allclose(plan.sum(0), torch.full((heads * dim,), 1 / (heads * dim), dtype=torch.float64))
    assert plan.argmax(1).tolist() == perm.tolist()


def test_head_plan_keeps_heads_whole_even_when_a_free_assignment_would_split_them():
    from hf_clafusion.core import head_plan

    heads, dim = 2, 2
    # the free optimum maps B's dims {0, 2} to A's head 0, which would split B's heads
    cost = torch.tensor([[0.0, 9, 9, 9], [9, 9, 0, 9], [9, 0, 9, 9], [9, 9, 9, 0]])
    plan = head_plan(cost, heads, within=True)
    targets = plan.argmax(1).tolist()
    for h in range(heads):
        assert len({t // dim for t in targets[h * dim : (h + 1) * dim]}) == 1


def test_head_plan_without_within_head_freedom_keeps_dimensions_in_place():
    from hf_clafusion.core import head_plan

    cost = torch.rand(12, 12)
    targets = head_plan(cost, 3, within=False).argmax(1)
    assert all((targets[h * 4 : (h + 1) * 4] - targets[h * 4]).tolist() == [0, 1, 2, 3] for h in range(3))


def test_expand_head_plan_repeats_the_head_map_for_grouped_query_heads():
    from hf_clafusion.core import expand_head_plan

    kv_heads, dim, repeat = 2, 3, 2
    perm = _head_perm(kv_heads, dim, True, seed=1)
    matrix = torch.eye(kv_heads * dim)[perm]
    expanded = expand_head_plan(matrix, kv_heads, repeat)
    q = torch.randn(kv_heads * repeat * dim, 5)  # rows (kv_head, repeat, dim)
    moved = (expanded.T @ q).reshape(kv_heads, repeat, dim, 5)
    rows = q.reshape(kv_heads, repeat, dim, 5)
    for r in range(repeat):  # every query head of a group follows its key/value head's map
        assert torch.equal(moved[:, r].reshape(-1, 5), matrix.T @ rows[:, r].reshape(-1, 5))
    assert not torch.equal(moved, rows)


def test_capture_points_read_inputs_outputs_and_channel_slices():
    from torch import nn

    from hf_clafusion.adapters.base import capture_outputs, parse_capture

    assert parse_capture("a.b:input[2:5]") == ("a.b", "input", slice(2, 5))
    assert parse_capture("fc") == ("fc", "output", None)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(3, 4)
    with capture_outputs(model, ["0", "2:input", "0[1:3]"]) as out:
        model(x)
    hidden = model[0](x)
    assert torch.equal(out["0"], hidden)
    assert torch.equal(out["2:input"], torch.relu(hidden))
    assert torch.equal(out["0[1:3]"], hidden[:, 1:3])
    with pytest.raises(KeyError, match="Malformed capture"):
        with capture_outputs(model, ["0[1:]"]):
            pass
