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
    partial_assignment,
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


def test_partial_assignment_is_the_cheapest_injective_matching():
    """Brute force over every injective map of 3 rows into 5 columns; R = S = the 0/1 matching."""
    import itertools

    cost = torch.rand(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    plan = partial_assignment(cost)
    best = min(
        itertools.permutations(range(5), 3), key=lambda cols: float(sum(cost[i, c] for i, c in enumerate(cols)))
    )
    match = torch.zeros(3, 5, dtype=torch.float64)
    match[torch.arange(3), torch.tensor(best)] = 1.0
    torch.testing.assert_close(plan, match / 3)
    assert float(plan.sum()) == pytest.approx(1.0)
    for normalization in ("column", "two_sided"):
        r_map, s_map = plan_maps(plan, normalization)
        torch.testing.assert_close(r_map, match)
        torch.testing.assert_close(s_map, match)
    with pytest.raises(ValueError, match="n_B <= n_A"):
        partial_assignment(cost.T)


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


# --------------------------------------------------------------------------- exact solver choice ("auto")


def _structured_cost(n_b: int, n_a: int, seed: int = 0) -> np.ndarray:
    """Distances between neuron embeddings where B's neurons are noisy copies of some of A's (a unique optimum)."""
    rng = np.random.default_rng(seed)
    xa = rng.normal(size=(n_a, 8))
    xb = xa[rng.permutation(n_a)[:n_b]] + 0.5 * rng.normal(size=(n_b, 8))
    return np.sqrt(((xb[:, None] - xa[None]) ** 2).sum(-1))


def _emd(cost: np.ndarray) -> np.ndarray:
    import ot

    n_b, n_a = cost.shape
    return ot.emd(np.full(n_b, 1 / n_b), np.full(n_a, 1 / n_a), cost, numItermax=1_000_000)


def test_auto_gives_exactly_emds_plan_for_equal_widths_by_a_linear_assignment():
    from hf_clafusion.core import solve_transport

    cost = _structured_cost(24, 24)
    solution = solve_transport(cost, solver="auto")
    assert solution.solver == "permutation"
    assert np.array_equal(solution.plan, _emd(cost))
    on_torch = solve_transport(torch.from_numpy(cost), solver="auto")
    assert isinstance(on_torch.plan, torch.Tensor) and np.array_equal(on_torch.plan.numpy(), _emd(cost))


def test_auto_runs_the_assignment_only_where_the_costs_nearly_pick_a_permutation():
    from hf_clafusion.core import solve_transport

    rng = np.random.default_rng(3)
    clear = rng.random((64, 64)) + 10 * (1 - np.eye(64)[rng.permutation(64)])  # one cheap partner per row
    random = rng.random((64, 64))  # unstructured: the rows' cheapest columns collide
    tied = np.ones((64, 64))
    tied[:, :8] = rng.random((64, 8))  # dead-neuron-like ties: every row's minimum in 8 columns
    for cost, expected in ((clear, "permutation"), (random, "emd"), (tied, "emd")):
        solution = solve_transport(cost, solver="auto")
        assert solution.solver == expected
        assert float((solution.plan * cost).sum()) == pytest.approx(float((_emd(cost) * cost).sum()), abs=1e-12)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (16, 48)])
def test_auto_reaches_emds_objective_for_unequal_widths(shape):
    from hf_clafusion.core import solve_transport

    cost = _structured_cost(*shape, seed=1) if shape[0] <= shape[1] else _structured_cost(*shape[::-1], seed=1).T
    solution = solve_transport(cost, solver="auto")
    assert solution.solver == "emd"
    assert float((solution.plan * cost).sum()) == pytest.approx(float((_emd(cost) * cost).sum()), abs=1e-9)
    assert np.allclose(solution.plan.sum(1), 1 / shape[0]) and np.allclose(solution.plan.sum(0), 1 / shape[1])


def test_explicit_solvers_report_themselves_and_unknown_ones_list_the_choices():
    from hf_clafusion.core import solve_transport

    cost = torch.rand(5, 5, dtype=torch.float64)
    assert [solve_transport(cost, solver=s).solver for s in ("emd", "permutation", "sinkhorn")] == [
        "emd",
        "permutation",
        "sinkhorn",
    ]
    with pytest.raises(ConfigError, match="Unknown solver 'lap'. Choose one of: 'auto', 'emd'"):
        transport_plan(cost, solver="lap")


def test_fuse_with_auto_reports_the_solver_per_group_in_the_summary():
    from hf_clafusion import FusionConfig, fuse

    from ._models import mlp, permuted_copy

    model = mlp(8, [12, 10], 3, seed=5)
    x = torch.randn(120, 8)
    result = fuse([model, permuted_copy(model, seed=6)], x, FusionConfig(progress=False, solver="auto"))
    assert result.transport_solvers == {1: {"layer.0": "permutation", "layer.2": "permutation"}}
    assert "transport: auto -> permutation (2 groups)" in result.summary()
    assert torch.allclose(result.model(x), model(x), atol=1e-4)


# --------------------------------------------------------------------------- float32 products, float64 sums


def _group_activations(model, x):
    """Each alignment group's captured activations ``(samples, width)``, as fusion collects them."""
    from hf_clafusion.adapters import get_adapter
    from hf_clafusion.adapters.base import capture_outputs

    adapter = get_adapter(model)
    prepared = adapter.prepare(model).eval()
    names = [c for g in adapter.spec(prepared).groups for c in g.captures]
    with torch.no_grad(), capture_outputs(prepared, names) as out:
        prepared(x)
    return [adapter.features(out[n], x) for n in names]


@pytest.mark.parametrize("case", ["mlp", "cnn_bn", "cnn"])
def test_float32_products_give_the_same_costs_and_plans_as_float64(case):
    from ._models import cnn, mlp, permuted_copy

    if case == "mlp":
        model, x = mlp(12, [32, 24, 16], 5, seed=0), torch.randn(200, 12)
    else:
        model, x = cnn([6, 6, "M", 8, "M"], hidden_fc=[16], bn=case == "cnn_bn", seed=2), torch.rand(64, 1, 8, 8)
    other = permuted_copy(model, seed=5)
    for acts_b, acts_a in zip(_group_activations(other, x), _group_activations(model, x), strict=True):
        single, double = ActivationStats(), ActivationStats(torch.float64)
        for start in range(0, acts_a.shape[0], 50):
            single.update(acts_b[start : start + 50], acts_a[start : start + 50])
            double.update(acts_b[start : start + 50], acts_a[start : start + 50])
        for metric in ("distances", "correlation_distances"):
            c32, c64 = getattr(single, metric)(), getattr(double, metric)()
            assert c32.dtype == torch.float64
            # squared costs agree to float32 precision of the scale (square roots magnify errors near 0)
            assert torch.allclose(c32.square(), c64.square(), atol=1e-6 * float(c64.max()) ** 2)
            for solver in ("emd", "auto"):
                assert torch.equal(transport_plan(c32, solver=solver), transport_plan(c64, solver=solver))


def test_float32_statistics_resolve_a_near_tie_that_the_uncentred_float32_formula_gets_wrong():
    """Neurons 0 and 1 of A differ by 1e-3 of their std on top of a mean of 100: the right match is a near tie."""
    g = torch.Generator().manual_seed(0)
    samples = 2000
    base = torch.randn(samples, 6, dtype=torch.float64, generator=g)
    base[:, 1] = base[:, 0] + 1e-3 * torch.randn(samples, dtype=torch.float64, generator=g)
    acts_a = (100.0 + base).float()
    perm = [1, 0, 3, 2, 5, 4]
    acts_b = (100.0 + base[:, perm] + 3e-4 * torch.randn(samples, 6, dtype=torch.float64, generator=g)).float()
    single, double = ActivationStats(), ActivationStats(torch.float64)
    for start in range(0, samples, 250):
        single.update(acts_b[start : start + 250], acts_a[start : start + 250])
        double.update(acts_b[start : start + 250], acts_a[start : start + 250])
    c32, c64 = single.distances(), double.distances()
    assert torch.allclose(c32.square(), c64.square(), atol=1e-6 * float(c64.max()) ** 2)
    expected = transport_plan(c64, solver="emd")
    assert expected.argmax(1).tolist() == perm
    assert torch.equal(transport_plan(c32, solver="emd"), expected)
    assert torch.equal(transport_plan(c32, solver="auto"), expected)
    # the uncentred float32 form ||a||^2 + ||b||^2 - 2<a, b> loses the difference to cancellation
    b, a = acts_b, acts_a
    naive = (b.square().sum(0)[:, None] + a.square().sum(0)[None, :] - 2 * b.T @ a).clamp_min(0).double()
    assert not torch.equal(transport_plan(naive, solver="emd"), expected)


# --------------------------------------------------------------------------- correlation cost


def test_correlation_cost_is_the_distance_between_z_scored_activations():
    a = torch.randn(400, 6, dtype=torch.float64)
    b = a @ torch.randn(6, 4, dtype=torch.float64) + torch.randn(400, 4, dtype=torch.float64)
    stats = ActivationStats(torch.float64)
    stats.update(b[:150], a[:150])
    stats.update(b[150:], a[150:])
    z = lambda t: (t - t.mean(0)) / t.std(0, unbiased=False)  # noqa: E731
    assert torch.allclose(stats.correlation_distances(), torch.cdist(z(b).T, z(a).T) / 400**0.5, atol=1e-9)
    rho = torch.corrcoef(torch.cat([b, a], 1).T)[:4, 4:]
    assert torch.allclose(stats.correlations(), rho, atol=1e-9)


def test_correlation_cost_is_invariant_to_per_neuron_positive_scaling_and_shift():
    a = torch.randn(300, 8)
    b = a[:, torch.randperm(8)] + 0.3 * torch.randn(300, 8)
    scale, shift = torch.rand(8) * 5 + 0.1, torch.randn(8) * 10
    plain, moved = ActivationStats(), ActivationStats()
    plain.update(b, a)
    moved.update(b * scale + shift, a)
    assert torch.allclose(moved.correlation_distances(), plain.correlation_distances(), atol=1e-5)
    assert not torch.allclose(moved.distances(), plain.distances(), atol=1e-1)  # the RMS distance is not
    assert torch.equal(
        transport_plan(moved.correlation_distances(), solver="auto"),
        transport_plan(plain.correlation_distances(), solver="auto"),
    )


def test_a_constant_neuron_z_scores_to_zero_also_when_it_carries_only_rounding_noise():
    a = torch.randn(50, 3)
    a[:, 2] = 0.1
    ulp = float(torch.tensor(1000.0).nextafter(torch.tensor(2000.0))) - 1000.0
    rounding = 1000.0 + ulp * torch.randint(0, 2, (50,)).float()  # constant up to float32 resolution
    b = torch.stack([a[:, 0], a[:, 1], rounding], 1)
    stats = ActivationStats()
    stats.update(b[:20], a[:20])
    stats.update(b[20:], a[20:])
    assert [m.tolist() for m in stats.live()] == [[True, True, False], [True, True, False]]
    cost = stats.correlation_distances()
    assert float(cost[2, 2]) == 0.0 and float(cost[0, 2]) == 1.0 and float(cost[2, 0]) == 1.0
    assert float(cost[0, 0]) == pytest.approx(0.0, abs=1e-3)


def test_fuse_with_correlation_costs_returns_the_original_for_a_permuted_copy():
    from hf_clafusion import FusionConfig, fuse

    from ._models import cnn, permuted_copy

    model = cnn([6, 6, "M", 8, "M"], hidden_fc=[16], bn=True, seed=2).eval()
    x = torch.rand(64, 1, 8, 8)
    config = FusionConfig(progress=False, repair=None, ground_metric="correlation")
    result = fuse([model, permuted_copy(model, seed=5)], x, config)
    assert "ground metric correlation" in result.summary()
    assert torch.allclose(result.model(x), model(x), atol=1e-4)
