"""Statistics repair after fusion: REPAIR math, folding, BatchNorm recomputation, and the config field."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from hf_clafusion import FusionConfig, fuse
from hf_clafusion.adapters import get_adapter
from hf_clafusion.adapters.base import reset_batchnorm_stats
from hf_clafusion.core import (
    ChannelStats,
    affine_correction,
    carry_statistics,
    fold_affine,
    is_identity_batchnorm,
    repair_targets,
)
from hf_clafusion.errors import ConfigError, UnsupportedArchitectureError

from ._models import accuracy, cnn, max_rel_error, mlp, permuted_copy, train


MODES = ["auto", "bn", "repair", None]


def _calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """``model`` with BatchNorm statistics of ``x`` (one batch), as a model trained on that data has."""
    model = copy.deepcopy(model)
    reset_batchnorm_stats(model, [x], get_adapter(model))
    return model.eval()


def _identity_bns(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1.0)
            m.bias.data.zero_()
            m.running_mean.zero_()
            m.running_var.fill_(1.0 - m.eps)
    return model


# --------------------------------------------------------------------------------------------- core math


def test_channel_stats_are_the_population_mean_and_std_over_all_updates():
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    stats = ChannelStats()
    stats.update(x[:20])
    stats.update(x[20:])
    torch.testing.assert_close(stats.mean, x.double().mean(0))
    torch.testing.assert_close(stats.std, x.double().std(0, unbiased=False))


def test_statistics_carried_by_a_permutation_plan_are_permuted():
    values = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    perm = torch.tensor([2, 0, 1])  # parent channel i is anchor channel perm[i]
    r_map = torch.zeros(3, 3, dtype=torch.float64)
    r_map[torch.arange(3), perm] = 1.0
    carried = carry_statistics(values, r_map)
    assert carried[perm].tolist() == values.tolist()


def test_targets_are_the_weighted_means_of_parent_statistics():
    mean, std = repair_targets(
        [torch.tensor([0.0, 4.0]), torch.tensor([2.0, 0.0])],
        [torch.tensor([1.0, 1.0]), torch.tensor([3.0, 2.0])],
        [3, 1],
    )
    torch.testing.assert_close(mean, torch.tensor([0.5, 3.0], dtype=torch.float64))
    torch.testing.assert_close(std, torch.tensor([1.5, 1.25], dtype=torch.float64))


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("bias", [True, False])
def test_folding_is_exact_the_layer_outputs_the_explicit_affine_correction(kind, bias):
    torch.manual_seed(0)
    layer = nn.Linear(5, 4, bias=bias) if kind == "linear" else nn.Conv2d(3, 4, 3, padding=1, bias=bias)
    x = torch.randn(8, 5) if kind == "linear" else torch.randn(8, 3, 6, 6)
    with torch.no_grad():
        y = layer(x)
    stats = ChannelStats()
    stats.update(y.transpose(0, 1).reshape(4, -1).T)
    target_mean, target_std = torch.tensor([0.0, 1.0, -1.0, 2.0]), torch.tensor([1.0, 0.5, 2.0, 3.0])
    scale, shift = affine_correction(stats.mean, stats.std, target_mean, target_std, shift=bias)
    weight, new_bias = fold_affine(layer.weight.data, layer.bias.data if bias else None, scale, shift)
    folded = copy.deepcopy(layer)
    folded.weight.data.copy_(weight)
    if bias:
        folded.bias.data.copy_(new_bias)
    view = (1, -1) + (1,) * (y.ndim - 2)
    expected = y.double() * scale.view(view) + (0 if shift is None else shift.view(view))
    with torch.no_grad():
        out = folded(x).double()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    after = ChannelStats()
    after.update(out.transpose(0, 1).reshape(4, -1).T)
    torch.testing.assert_close(after.std, target_std.double(), rtol=1e-4, atol=1e-5)
    if bias:
        torch.testing.assert_close(after.mean, target_mean.double(), rtol=1e-4, atol=1e-5)


def test_a_shift_is_never_folded_into_a_layer_without_a_bias():
    with pytest.raises(ValueError, match="without a bias"):
        fold_affine(torch.ones(2, 3), None, torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))


def test_identity_batchnorm_detection_uses_the_effective_affine_map():
    n, eps = 4, 1e-5
    assert is_identity_batchnorm(torch.ones(n), torch.zeros(n), torch.zeros(n), torch.full((n,), 1 - eps), eps)
    # running statistics compensated by the affine parameters: still the identity
    assert is_identity_batchnorm(
        torch.full((n,), 2.0), torch.full((n,), 0.3), torch.full((n,), 0.3), torch.full((n,), 4 - eps), eps
    )
    assert not is_identity_batchnorm(torch.ones(n), torch.zeros(n), torch.zeros(n), torch.ones(n), eps=0.1)


# --------------------------------------------------------------------------------------------- the fusion stage


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["mlp", "cnn-bn"])
def test_a_permuted_copy_fuses_back_to_the_original_with_every_repair_mode(family, mode):
    x = torch.rand(64, 6) if family == "mlp" else torch.rand(64, 1, 8, 8)
    model = mlp(6, [16, 12], 3) if family == "mlp" else _calibrated(cnn([8, 8, "M", 8, "M"], hidden_fc=[12]), x)
    config = FusionConfig(progress=False, repair=mode, num_samples=64, batch_size=64)
    result = fuse([model, permuted_copy(model, seed=3)], x, config)
    with torch.no_grad():
        assert max_rel_error(result.model(x), model(x)) < 1e-4
    assert result.config.repair in ("bn", "repair", None)


def _sign_test_winner(first: str | None, second: str, hits: dict) -> str | None:
    """The paired sign test of ``repair="auto"``, written out: ``second`` only with clearly more agreement."""
    wins = int((hits[second] & ~hits[first]).sum())
    losses = int((~hits[second] & hits[first]).sum())
    return second if wins - losses > (wins + losses) ** 0.5 else first


def test_clearly_better_needs_more_than_a_sample_or_two_of_difference():
    from hf_clafusion.repair import clearly_better

    reference = torch.zeros(200, dtype=torch.bool)
    reference[:100] = True
    one_more, many_more, swapped = reference.clone(), reference.clone(), reference.roll(50)
    one_more[100] = True
    many_more[100:120] = True
    assert not clearly_better(one_more, reference) and clearly_better(many_more, reference)
    assert not clearly_better(reference, reference) and not clearly_better(swapped, reference)  # 50 wins, 50 losses
    assert not clearly_better(reference, many_more)


def test_auto_without_batchnorm_keeps_no_repair_unless_repair_agrees_clearly_better_and_saves_it(tmp_path):
    x = torch.rand(64, 6, generator=torch.Generator().manual_seed(0))
    models = [mlp(6, [8, 8], 3, seed=0), mlp(6, [8], 3, seed=1)]
    config = FusionConfig(progress=False, num_samples=64)
    with torch.no_grad():
        ensemble = sum(m.eval()(x) for m in models).argmax(-1)
        hits = {
            mode: fuse(models, x, config, repair=mode).model(x).argmax(-1) == ensemble for mode in (None, "repair")
        }
        auto = fuse(models, x, config)
    best = _sign_test_winner(None, "repair", hits)
    assert (auto.config.repair, auto.bn_reset) == (best, False)
    auto.save_pretrained(tmp_path, processor=False)
    assert json.loads((tmp_path / "fusion_config.json").read_text())["config"]["repair"] == best


def test_auto_on_a_batchnorm_net_keeps_bn_unless_repair_agrees_clearly_better_with_the_parents_ensemble():
    x = torch.rand(128, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    models = [cnn([8, 8, "M", 16, "M"], seed=0, hidden_fc=[16]), cnn([8, "M", 16, "M"], seed=1, hidden_fc=[16])]
    config = FusionConfig(progress=False, num_samples=128, batch_size=64)
    with torch.no_grad():
        ensemble = sum(m.eval()(x) for m in models).argmax(-1)
        hits = {
            mode: fuse(models, x, config, repair=mode).model(x).argmax(-1) == ensemble for mode in ("bn", "repair")
        }
        auto = fuse(models, x, config)
        best = _sign_test_winner("bn", "repair", hits)
        assert auto.config.repair == best and auto.bn_reset == (best == "bn")
        assert torch.equal(auto.model(x).argmax(-1) == ensemble, hits[best])


def test_repair_and_bn_recomputation_agree_on_a_batchnorm_net():
    x = torch.rand(128, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    models = [_calibrated(cnn([8, 8, "M", 16, "M"], seed=s), x) for s in (0, 1)]
    config = FusionConfig(progress=False, num_samples=128, batch_size=128)
    by_bn = fuse(models, x, config, repair="bn").model
    by_repair = fuse(models, x, config, repair="repair").model
    unrepaired = fuse(models, x, config, repair=None).model
    with torch.no_grad():
        gap = max_rel_error(by_repair(x), by_bn(x))
        assert gap < 0.02
        assert gap < 0.2 * max_rel_error(unrepaired(x), by_bn(x))


def test_identity_batchnorms_stay_identities():
    x = torch.rand(64, 1, 8, 8)
    models = [_identity_bns(cnn([8, 8, "M", 8, "M"], seed=s)) for s in (0, 1)]
    result = fuse(models, x, progress=False, repair="bn")
    norms = [m for m in result.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(is_identity_batchnorm(m.weight, m.bias, m.running_mean, m.running_var, m.eps) for m in norms)
    assert not result.bn_reset
    # identity BatchNorms are not real BatchNorms: "auto" does not consider recomputing them
    auto = fuse(models, x, progress=False)
    assert auto.config.repair in (None, "repair") and not auto.bn_reset


def test_repair_raises_one_shot_accuracy_of_a_trained_mlp_pair(digits):
    (x, y), (x_test, y_test) = digits
    gains = []
    for seed in range(2):
        deep = train(mlp(64, [48, 40, 32, 24], 10, seed=10 * seed), x, y, epochs=10, seed=10 * seed)
        shallow = train(mlp(64, [48, 32], 10, seed=10 * seed + 1), x, y, epochs=10, seed=10 * seed + 1)
        config = FusionConfig(progress=False, seed=seed, alignment="cla")  # one fusion each, as measured
        repaired = fuse([deep, shallow], x, config, repair="repair").model
        plain = fuse([deep, shallow], x, config, repair=None).model
        gains.append(accuracy(repaired, x_test, y_test) - accuracy(plain, x_test, y_test))
    # measured: +2.3 and +3.3 points with the default column rescaling (+7 to +15 with two_sided)
    assert min(gains) > 0.01, gains


# --------------------------------------------------------------------------------------------- config


def test_reset_bn_stats_is_a_deprecated_alias_of_repair():
    with pytest.warns(DeprecationWarning, match="repair='bn'"):
        assert FusionConfig(reset_bn_stats=True).repair == "bn"
    with pytest.warns(DeprecationWarning):
        loaded = FusionConfig.from_dict({"reset_bn_stats": False})
    assert loaded.repair is None and loaded.reset_bn_stats is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert FusionConfig.from_dict(loaded.to_dict()) == loaded  # saved again without the alias


def test_official_preset_does_no_repair_and_bad_values_are_refused():
    assert FusionConfig.official().repair is None
    assert FusionConfig().repair == "auto"
    with pytest.raises(ConfigError, match="`repair`.*'repair'"):
        FusionConfig(repair="renorm")
    with pytest.raises(ConfigError, match="repair_samples"):
        FusionConfig(repair_samples=0)


def test_repair_on_an_uncovered_family_is_refused_and_auto_warns():
    pytest.importorskip("timm")
    from .test_timm import images, vit

    models, x = [vit(1, seed=0), vit(1, seed=1)], images(16)
    base = FusionConfig(progress=False, num_samples=16, batch_size=16)
    with pytest.raises(UnsupportedArchitectureError, match="repair='repair' is not supported"):
        fuse(models, x, base, repair="repair")
    with pytest.warns(UserWarning, match="not repaired"):
        assert fuse(models, x, base).config.repair is None


# --------------------------------------------------------------------------------------------- timm ResNet


def test_timm_resnet_permuted_copy_fuses_back_with_repair():
    pytest.importorskip("timm")
    from .test_timm import images, permuted_copy, resnet

    model, x = resnet([2, 1, 1, 1]), images(64)
    result = fuse([model, permuted_copy(model, seed=1)], x, progress=False, repair="repair", num_samples=64)
    with torch.no_grad():
        # not 1e-6: channels that are dead after the ReLU on this data are interchangeable for the (post-ReLU)
        # matching but not for the (pre-ReLU) statistics, and their correction may wake them up slightly
        assert max_rel_error(result.model(x), model(x)) < 1e-2


def test_after_repair_every_point_has_its_target_and_identity_blocks_take_the_real_blocks_targets():
    pytest.importorskip("timm")
    from hf_clafusion.repair import measure, repair_targets

    from .test_timm import images, resnet

    x = images(64)
    deep, shallow = resnet([3, 1, 1, 1], seed=0), resnet([1, 1, 1, 1], seed=1)
    # the explicit route (identity blocks inserted and transported); the closed form is tested below
    result = fuse(
        [deep, shallow], x, progress=False, repair="repair", num_samples=64, batch_size=64, unmatched="identity"
    )
    adapter = get_adapter(deep)
    balanced, _ = adapter.insert_identity(adapter.prepare(shallow), [[0, None, None], [0], [0], [0]], deep)
    parents = [adapter.prepare(deep), balanced]
    points = [adapter.spec(m).repair_points for m in parents]
    stats = [measure(m, [p.capture for p in points[k]], [x], adapter) for k, m in enumerate(parents)]
    targets = repair_targets(points, stats, result.anchor, result.transport_plans, [0.5, 0.5])
    fused_stats = measure(result.model, [p.capture for p in points[0]], [x], adapter)
    for point, target, got in zip(points[0], targets, fused_stats):
        torch.testing.assert_close(got.mean, target[0], rtol=1e-3, atol=1e-4, msg=point.capture)
        torch.testing.assert_close(got.std, target[1], rtol=1e-3, atol=1e-4, msg=point.capture)
    # layer1.1 and layer1.2 are identity blocks in the shallow model: their branch targets are the deep model's
    index = [p.capture for p in points[0]].index("layer1.2.bn2")
    assert float(stats[1][index].std.max()) == 0.0
    torch.testing.assert_close(targets[index][1], stats[0][index].std)


@pytest.mark.parametrize("unmatched", ["transplant", "average"])
def test_repair_of_a_closed_form_resnet_fusion_gives_unmatched_blocks_the_anchors_statistics(unmatched):
    """Closed form (timm ResNet): at repair points inside blocks only the anchor has, the repaired fused model has
    the anchor's statistics; everywhere else it has the targets of both parents, the shallow one measured at its
    own depth and carried by the transport plans."""
    pytest.importorskip("timm")
    from hf_clafusion import core
    from hf_clafusion.repair import measure

    from .test_timm import images, resnet

    x = images(64)
    deep, shallow = resnet([3, 1, 1, 1], seed=0), resnet([1, 1, 1, 1], seed=1)
    config = dict(progress=False, num_samples=64, batch_size=64, unmatched=unmatched)
    result = fuse([deep, shallow], x, repair="repair", **config)
    assert result.config.repair == "repair" and "layer1.1.conv1" not in result.transport_plans[1]
    adapter = get_adapter(deep)
    anchor, own = adapter.prepare(deep), adapter.prepare(shallow)
    points = adapter.spec(anchor).repair_points
    inside = [p for p in points if p.capture.startswith(("layer1.1.", "layer1.2."))]
    assert len(inside) == 4  # bn1 and bn2 of each of the two unmatched blocks
    targets = measure(anchor, [p.capture for p in inside], [x], adapter)
    after = measure(result.model, [p.capture for p in inside], [x], adapter)
    for point, a, t in zip(inside, after, targets):
        torch.testing.assert_close(a.mean, t.mean, rtol=1e-3, atol=1e-4, msg=point.capture)
        torch.testing.assert_close(a.std, t.std, rtol=1e-3, atol=1e-4, msg=point.capture)
    outside = [p for p in points if p not in inside]
    mine = [p.capture for p in outside]  # the shallow parent has the same names outside layer1.1 and layer1.2
    anchor_stats = measure(anchor, mine, [x], adapter)
    shallow_stats = measure(own, mine, [x], adapter)
    after = measure(result.model, mine, [x], adapter)
    for point, a, s_a, s_b in zip(outside, after, anchor_stats, shallow_stats):
        r_map = core.plan_maps(result.transport_plans[1][point.group].double(), result.config.plan_normalization)[0]
        carried = [core.carry_statistics(v, r_map) for v in (s_b.mean, s_b.std)]
        mean, std = core.repair_targets([s_a.mean, carried[0]], [s_a.std, carried[1]], [0.5, 0.5])
        torch.testing.assert_close(a.mean.double(), mean.double(), rtol=1e-3, atol=1e-4, msg=point.capture)
        torch.testing.assert_close(a.std.double(), std.double(), rtol=1e-3, atol=1e-4, msg=point.capture)


# --------------------------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_transformers_permuted_copy_fuses_back_with_repair_and_identity_blocks_take_real_targets(family):
    pytest.importorskip("transformers")
    from hf_clafusion.repair import measure

    from .test_transformers import inputs, make, out, permuted_copy

    model, batch = make(family, 2), inputs(family, 16)
    result = fuse([model, permuted_copy(model, seed=1)], batch, progress=False, repair="repair", num_samples=16)
    assert result.config.repair == "repair"
    assert max_rel_error(out(result.model, batch), out(model, batch)) < 1e-4
    if family == "bert":
        return  # post-LN identity blocks are fitted, not zero branches
    deep, shallow = make(family, 3, seed=0), make(family, 1, seed=1)
    result = fuse([deep, shallow], batch, progress=False, repair="repair", num_samples=16)
    adapter = get_adapter(deep)
    points = adapter.spec(result.model).repair_points
    fused_stats = measure(result.model, [p.capture for p in points], [batch], adapter)
    deep_stats = measure(adapter.prepare(deep), [p.capture for p in points], [batch], adapter)
    # at the middle block (an identity in the shallow model) the branch outputs get the deep model's statistics
    for index in [i for i, p in enumerate(points) if ".1." in p.capture and p.group == "residual"]:
        torch.testing.assert_close(fused_stats[index].std, deep_stats[index].std, rtol=1e-3, atol=1e-5)


def test_auto_leaves_transformers_to_an_explicit_repair():
    pytest.importorskip("transformers")
    from hf_clafusion.repair import resolve_mode

    from .test_transformers import inputs, make

    deep, shallow, batch = make("gpt2", 3, seed=0), make("gpt2", 1, seed=1), inputs("gpt2", 16)
    result = fuse([deep, shallow], batch, progress=False, num_samples=16)
    assert result.config.repair is None and "repair" not in result.timings  # TransformersAdapter.auto_repair
    assert fuse([deep, shallow], batch, progress=False, num_samples=16, repair="repair").config.repair == "repair"
    adapter = get_adapter(deep)
    model = adapter.prepare(deep)
    assert resolve_mode("auto", model, [model], adapter.spec(model), auto_repair=adapter.auto_repair) is None


# --------------------------------------------------------------------------------------------- measurement passes


def _sequential_repair(fused, points, targets, batches, adapter) -> None:
    """The exact sequential REPAIR: each point measured after the corrections before it are folded (one forward
    pass over ``batches`` per point), as the library did before measuring all points in a bounded number of
    passes."""
    from hf_clafusion.repair import measure

    params = dict(fused.named_parameters())
    for point, target in zip(points, targets):
        if target is None:
            continue
        (stats,) = measure(fused, [point.capture], batches, adapter)
        scale, shift = affine_correction(stats.mean, stats.std, *target, shift=point.bias is not None)
        bias = params[point.bias].data if point.bias is not None else None
        weight, bias = fold_affine(params[point.weight].data, bias, scale, shift, axis=point.axis)
        params[point.weight].data.copy_(weight)
        if bias is not None:
            params[point.bias].data.copy_(bias)


def _trained_pair(family, digits):
    """Two trained models of one architecture (different seeds) and 512 samples to repair on."""
    (x, y), _ = digits
    if family == "cnn-bn":
        x = x.view(-1, 1, 8, 8)
        models = [cnn([8, 8, "M", 16, 16, "M"], seed=s, hidden_fc=[16]) for s in (0, 1)]
    else:
        models = [mlp(64, [32, 32, 32, 32, 32], 10, bias=family == "mlp", seed=s) for s in (0, 1)]
    return [train(m, x, y, epochs=4, seed=s) for s, m in enumerate(models)], x[:512]


def _unrepaired(models, x, batch_size):
    """An unrepaired fusion of same-depth ``models``, the arguments of `repair_statistics` for it, and the
    anchor's repair points with their targets."""
    from hf_clafusion.repair import measure, repair_targets

    result = fuse(models, x, FusionConfig(progress=False, repair=None, num_samples=len(x), batch_size=batch_size))
    adapter = get_adapter(models[0])
    parents = [adapter.prepare(m) for m in models]
    specs = [adapter.spec(m) for m in parents]
    batches = list(x.split(batch_size))
    kwargs = dict(
        parents=parents,
        specs=specs,
        anchor=result.anchor,
        plans=result.transport_plans,
        weights=[0.5, 0.5],
        adapter=adapter,
        batches=batches,
        plan_normalization=result.config.plan_normalization,
    )
    points = [s.repair_points for s in specs]
    stats = [measure(m, [p.capture for p in points[k]], batches, adapter) for k, m in enumerate(parents)]
    targets = repair_targets(
        points, stats, result.anchor, result.transport_plans, [0.5, 0.5], result.config.plan_normalization
    )
    return result.model, kwargs, points[result.anchor], targets


def _relative_gaps(model, reference, points):
    """Largest relative difference (Frobenius) between corrected parameters of ``model`` and ``reference``."""
    ours, ref = model.state_dict(), reference.state_dict()
    keys = [k for p in points for k in (p.weight, p.bias) if k is not None]
    return max(float((ours[k] - ref[k]).norm() / ref[k].norm()) for k in keys)


@pytest.mark.parametrize("hidden", [[16], [16, 16, 16, 16, 16, 16]])
def test_repair_measures_the_fused_model_in_two_passes_however_many_points_it_has(hidden):
    from hf_clafusion.repair import repair_statistics

    x = torch.rand(256, 6, generator=torch.Generator().manual_seed(0))
    models = [mlp(6, hidden, 3, seed=s) for s in (0, 1)]
    fused, kwargs, points, _ = _unrepaired(models, x, batch_size=64)
    calls = []
    fused.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        assert repair_statistics(fused, **kwargs) == len(points) == len(hidden)
    assert len(calls) == 2 * len(kwargs["batches"])  # the parents are measured once each, on their own models


@pytest.mark.parametrize("family", ["mlp", "mlp-no-bias", "cnn-bn"])
def test_two_pass_repair_is_close_to_the_exact_sequential_one_and_converges_to_it(family, digits):
    from hf_clafusion.repair import measure, repair_statistics

    models, x = _trained_pair(family, digits)
    fused, kwargs, points, targets = _unrepaired(models, x, batch_size=64)
    exact = copy.deepcopy(fused)
    with torch.no_grad():
        _sequential_repair(exact, points, targets, kwargs["batches"], kwargs["adapter"])
        two = copy.deepcopy(fused)
        repair_statistics(two, **kwargs)
        # pass p makes the first p points exact (each is measured with every point before it final)
        converged = copy.deepcopy(fused)
        repair_statistics(converged, **kwargs, passes=len(points))
        # one batch: its statistics are the population's, so the on-the-fly pass alone is the exact scheme
        single, single_kwargs, _, single_targets = _unrepaired(models, x[:128], batch_size=128)
        single_exact = copy.deepcopy(single)
        _sequential_repair(single_exact, points, single_targets, single_kwargs["batches"], single_kwargs["adapter"])
        repair_statistics(single, **single_kwargs, passes=1)
        stats = measure(two, [p.capture for p in points], kwargs["batches"], kwargs["adapter"])
    assert _relative_gaps(converged, exact, points) < 1e-5
    assert _relative_gaps(single, single_exact, points) < 1e-5
    # measured: weights 3.3 % (mlp), 1.1 % (bias-free mlp), 0.1 % (cnn) from the exact ones; statistics at most
    # 1.2 %, 2.2 %, 0.3 % (relative L2) from their targets: below the sampling error of the targets themselves
    # (a std estimated from 512 samples is uncertain by about 1 / sqrt(2 * 512) = 3 %)
    assert _relative_gaps(two, exact, points) < 0.05
    for point, (mean, std), got in zip(points, targets, stats):
        assert float((got.std - std).norm() / std.norm()) < 0.03, point.capture
        if point.bias is not None:
            assert float((got.mean - mean).norm() / std.norm()) < 0.03, point.capture
