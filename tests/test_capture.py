"""Activation capture sees what the hooked module computed, whatever in-place operations run after it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hf_clafusion import FusionConfig, fuse
from hf_clafusion.adapters.base import capture_outputs

from ._models import cnn, mlp


CONFIG = FusionConfig(progress=False, repair=None, num_samples=32, batch_size=16)


def _with_inplace(model: nn.Module, inplace: bool) -> nn.Module:
    """A copy of ``model`` whose ReLUs (same function) run in place or not."""
    out = copy.deepcopy(model)
    for module in out.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = inplace
    return out


def _assert_same_fusion(models, data, **overrides):
    results = [
        fuse([_with_inplace(m, inplace) for m in models], data, CONFIG, **overrides) for inplace in (False, True)
    ]
    plain, inplace = results
    for pair_p, pair_i in zip(plain.pairs, inplace.pairs):
        assert pair_p.alignment == pair_i.alignment
        for cost_p, cost_i in zip(pair_p.costs, pair_i.costs):
            torch.testing.assert_close(cost_i, cost_p, rtol=0, atol=0)
    for k, plans in plain.transport_plans.items():
        for name, plan in plans.items():
            torch.testing.assert_close(inplace.transport_plans[k][name], plan, rtol=0, atol=0)
    state_p, state_i = plain.model.state_dict(), inplace.model.state_dict()
    assert state_p.keys() == state_i.keys()
    for name in state_p:
        torch.testing.assert_close(state_i[name], state_p[name], rtol=0, atol=0)


def test_a_captured_output_is_not_overwritten_by_a_following_inplace_relu():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 2))
    x = torch.randn(16, 4)
    with capture_outputs(model, ["0"]) as out, torch.no_grad():
        model(x)
    torch.testing.assert_close(out["0"], model[0](x).detach())
    assert (out["0"] < 0).any()  # the pre-activation, not its ReLU


def test_inplace_and_plain_relu_mlps_fuse_identically():
    deep, shallow = mlp(6, [16, 12, 12], 3, seed=0), mlp(6, [14, 10], 3, seed=1)
    _assert_same_fusion([deep, shallow], torch.randn(32, 6, generator=torch.Generator().manual_seed(0)))


def test_inplace_and_plain_relu_cnns_fuse_identically():
    deep = cnn([8, 8, "M", 8, 8, "M"], seed=0, bn=False, hidden_fc=[12])
    shallow = cnn([8, "M", 8, "M"], seed=1, bn=False, hidden_fc=[12])
    _assert_same_fusion([deep, shallow], torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)))


def test_inplace_and_plain_relu_timm_resnets_fuse_identically():
    pytest.importorskip("timm")
    from .test_timm import images, resnet

    deep, shallow = resnet([2, 1, 1, 1], seed=0), resnet([1, 1, 1, 1], seed=1)
    _assert_same_fusion([deep, shallow], images(32))


def test_inplace_and_plain_relu_transformers_fuse_identically():
    pytest.importorskip("transformers")
    from .test_transformers import inputs, make

    deep, shallow = (make("bert", layers, seed=seed, hidden_act="relu") for layers, seed in ((3, 0), (2, 1)))
    assert any(isinstance(m, nn.ReLU) for m in deep.modules())
    _assert_same_fusion([deep, shallow], inputs("bert", 32))
