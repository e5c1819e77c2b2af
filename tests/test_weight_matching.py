"""Git Re-Basin weight matching: ``hf_clafusion.core.weight_matching`` and ``ground_metric="weight_matching"``."""

from __future__ import annotations

import pytest
import torch

from hf_clafusion import ConfigError, FusionConfig, core, fuse
from hf_clafusion.adapters import get_adapter

from ._models import cnn, max_rel_error, mlp, permuted_copy, randomize_bn, widened_mlp
from .families import FACTORIES, logits
from .test_invariants import SHUFFLED_DOUBLE


EXACT = FusionConfig(repair=None, plan_normalization="two_sided", progress=False)
BY_NAME = {f.name: f for f in FACTORIES}


def _groups(model) -> list[core.MatchGroup]:
    adapter = get_adapter(model)
    return [core.MatchGroup(g.axes) for g in adapter.spec(adapter.prepare(model)).groups]


def _identity_plans(groups, state) -> list[torch.Tensor]:
    widths = [state[g.axes[0].param].shape[g.axes[0].axis] for g in groups]
    return [torch.eye(n, dtype=torch.float64) / n for n in widths]


def _is_permutation(plan: torch.Tensor) -> bool:
    scaled = plan.double() * plan.shape[0]
    return plan.shape[0] == plan.shape[1] and core.permutation_of(scaled.round()) is not None


@pytest.mark.parametrize("init", ["none", "identity"])
def test_weight_matching_undoes_the_permutation_of_a_permuted_copy_from_any_start(init):
    model = mlp(8, [16, 16, 16], 4, seed=2)
    twin = permuted_copy(model, seed=3)
    groups = _groups(model)
    state_a, state_b = model.state_dict(), twin.state_dict()
    start = _identity_plans(groups, state_a) if init == "identity" else None
    found = core.weight_matching(state_b, state_a, groups, init=start)
    assert found.converged
    best = core.weight_matching_objective(state_a, state_a, groups, _identity_plans(groups, state_a))
    assert found.objective[-1] == pytest.approx(best, rel=1e-12)  # the copy's own weights, exactly
    for group, plan in zip(groups, found.plans):
        assert _is_permutation(plan)
        for axis in group.axes:  # the plan moves every tensor of the copy back onto the original's
            moved = core.apply_plan(state_b[axis.param], axis.axis, plan * plan.shape[0])
            if len(_owners_of(groups, axis.param)) == 1:
                assert torch.equal(moved, state_a[axis.param])


def _owners_of(groups, param):
    return [g for g in groups if any(axis.param == param for axis in g.axes)]


@pytest.mark.parametrize("family", ["mlp", "vgg-cnn", "timm-resnet", "llama-gqa"])
def test_a_permuted_copy_fuses_back_to_the_original_with_inverse_permutation_plans(family):
    factory = BY_NAME[family]
    if factory.module:
        pytest.importorskip(factory.module)
    shallow = factory.shallow(seed=2)
    model = get_adapter(shallow).prepare(shallow).eval()
    twin = permuted_copy(model, seed=3)
    batch = factory.batch()
    result = fuse([model, twin], batch, EXACT, ground_metric="weight_matching")
    assert all(_is_permutation(plan) for plan in result.transport_plans[1].values())
    fused, original = result.model.state_dict(), model.state_dict()
    assert all(torch.equal(fused[name], original[name]) for name in original if fused[name].is_floating_point())
    assert max_rel_error(logits(result.model, batch), logits(model, batch)) < 1e-5


def test_weight_matching_never_scores_below_the_one_pass_weight_plans_and_improves_a_random_pair():
    deep, other = mlp(8, [16, 12, 10], 4, seed=5), mlp(8, [12, 16, 10], 4, seed=6)
    x = torch.randn(32, 8)
    groups = _groups(deep)
    scores = {}
    for metric in ("weights", "weight_matching"):
        result = fuse([deep, other], x, EXACT, ground_metric=metric)
        plans = [result.transport_plans[1][name].double() for name in result.transport_plans[1]]
        scores[metric] = core.weight_matching_objective(
            other.state_dict(), deep.state_dict(), groups, plans, normalization="two_sided"
        )
    assert scores["weight_matching"] > scores["weights"] + 1e-3 * abs(scores["weights"])


@pytest.mark.parametrize("widths", [([16, 16, 16], [16, 16, 16]), ([16, 12, 10], [12, 16, 10])])
def test_each_sweep_raises_the_objective_and_the_result_is_a_fixed_point(widths):
    a, b = mlp(8, widths[0], 4, seed=5), mlp(8, widths[1], 4, seed=6)
    groups = _groups(a)
    state_a, state_b = a.state_dict(), b.state_dict()
    found = core.weight_matching(state_b, state_a, groups, seed=0)
    assert found.converged and found.sweeps >= 2
    assert all(later >= earlier for earlier, later in zip(found.objective, found.objective[1:]))
    assert found.objective[-1] > found.objective[0]
    for g in range(len(groups)):  # no single group's plan can be improved given the others
        similarity = core.group_similarity(state_b, state_a, groups, found.plans, g)
        best = core.transport_plan(similarity.max() - similarity, solver="emd")
        assert float((best * similarity).sum()) <= float((found.plans[g] * similarity).sum()) + 1e-9


def test_the_group_similarity_is_the_exact_change_of_the_objective_in_that_group():
    a, b = mlp(8, [10, 7, 6], 4, seed=1), mlp(8, [7, 10, 6], 4, seed=2)
    groups = _groups(a)
    state_a, state_b = a.state_dict(), b.state_dict()
    plans = core.weight_matching(state_b, state_a, groups, max_sweeps=0).plans
    g = 1
    similarity = core.group_similarity(state_b, state_a, groups, plans, g, normalization="two_sided")
    other = core.transport_plan(torch.rand(*plans[g].shape, dtype=torch.float64))
    changed = plans[:g] + [other] + plans[g + 1 :]
    delta = core.weight_matching_objective(state_b, state_a, groups, changed, normalization="two_sided")
    delta -= core.weight_matching_objective(state_b, state_a, groups, plans, normalization="two_sided")
    assert delta == pytest.approx(float(((other - plans[g]) * similarity).sum()), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("anchor", [0, 1])
def test_a_copy_widened_by_neuron_duplication_fuses_back_exactly_with_unequal_widths(anchor):
    model = mlp(10, [6, 5], 3, seed=7)
    wide = widened_mlp(model, SHUFFLED_DOUBLE)
    x = torch.randn(200, 10)
    result = fuse([model, wide], x, EXACT, anchor=anchor, ground_metric="weight_matching")
    assert set(result.transport_solvers[1 - anchor].values()) == {"emd"}
    assert max_rel_error(result.model(x), (model if anchor == 0 else wide)(x)) < 1e-4


def test_batchnorm_running_statistics_follow_the_plans_but_do_not_choose_them():
    a, b = cnn([8, 8, "M", 8, "M"], 4, bn=True, seed=1), cnn([8, 8, "M", 8, "M"], 4, bn=True, seed=2)
    randomize_bn(a, 1)
    randomize_bn(b, 2)
    x = torch.rand(16, 1, 8, 8)
    before = fuse([a, b], x, EXACT, ground_metric="weight_matching")
    with torch.no_grad():
        for module in b.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.mul_(torch.linspace(1, 1000, module.num_features))
    after = fuse([a, b], x, EXACT, ground_metric="weight_matching")
    for name, plan in before.transport_plans[1].items():
        assert torch.equal(plan, after.transport_plans[1][name])


def test_weight_matching_is_deterministic_for_a_seed():
    deep, other = mlp(8, [16, 12, 10], 4, seed=5), mlp(8, [12, 16, 10], 4, seed=6)
    x = torch.randn(32, 8)
    first, second = (fuse([deep, other], x, EXACT, ground_metric="weight_matching", seed=3) for _ in range(2))
    for name, plan in first.transport_plans[1].items():
        assert torch.equal(plan, second.transport_plans[1][name])


def test_a_deep_and_a_shallow_resnet_get_plans_for_the_same_groups_as_the_one_pass_metric():
    """The groups inside blocks only the deeper model has are fused in closed form, without a plan, as before."""
    factory = BY_NAME["timm-resnet"]
    pytest.importorskip(factory.module)
    models, batch = [factory.deep(), factory.shallow()], factory.batch()
    one_pass = fuse(models, batch, EXACT, ground_metric="weights")
    matched = fuse(models, batch, EXACT, ground_metric="weight_matching")
    assert set(matched.transport_plans[1]) == set(one_pass.transport_plans[1])
    assert torch.isfinite(logits(matched.model, batch)).all()


def test_weight_matching_refuses_a_soft_solver():
    with pytest.raises(ConfigError, match="weight_matching.*sinkhorn"):
        FusionConfig(ground_metric="weight_matching", solver="sinkhorn")
    with pytest.raises(ConfigError, match="exact solver"):
        core.weight_matching({}, {}, [], solver="sinkhorn")
