"""Fusion of trained models on real data (scikit-learn's digits)."""

import copy

import pytest
import torch

from hf_clafusion import FusionConfig, evaluate, fuse

from ._models import accuracy, mlp, train


def _average(a, b):
    fused = copy.deepcopy(a)
    fused.load_state_dict({k: (a.state_dict()[k] + b.state_dict()[k]) / 2 for k in a.state_dict()})
    return fused


def test_ot_fusion_beats_plain_averaging_by_5_points(digits):
    (x, y), (x_test, y_test) = digits
    gains = []
    for seed in range(3):
        a = train(mlp(64, [64, 48], 10, seed=10 * seed), x, y, epochs=15, seed=10 * seed)
        b = train(mlp(64, [64, 48], 10, seed=10 * seed + 1), x, y, epochs=15, seed=10 * seed + 1)
        fused = fuse([a, b], x, FusionConfig(progress=False, seed=seed)).model
        gains.append(accuracy(fused, x_test, y_test) - accuracy(_average(a, b), x_test, y_test))
    assert sum(gains) / len(gains) >= 0.05, gains


@pytest.mark.parametrize("balancing", ["identity", "merge"])
def test_different_depth_pair_fuses_with_the_requested_depth(digits, balancing):
    (x, y), (x_test, y_test) = digits
    deep = train(mlp(64, [48, 40, 32, 24, 16], 10, seed=1), x, y, epochs=10, seed=1)
    shallow = train(mlp(64, [48, 40, 32], 10, seed=2), x, y, epochs=10, seed=2)
    result = fuse([deep, shallow], x, FusionConfig(progress=False, balancing=balancing, alignment="cla"))
    linears = [m for m in result.model if isinstance(m, torch.nn.Linear)]
    assert len(linears) == (6 if balancing == "identity" else 4)
    # the anchor (the deeper model) gives the widths; merge keeps its matched layers 0, 1 and 4
    assert [lin.out_features for lin in linears[:-1]] == (
        [48, 40, 32, 24, 16] if balancing == "identity" else [48, 40, 16]
    )
    assert len(result.layer_alignment) == 1 and len(result.layer_alignment[0]) == 3
    assert result.layer_alignment[0][0] == 0 and result.layer_alignment[0][-1] == 4
    # the fused model is a working classifier, far above chance (10 %)
    assert accuracy(result.model, x_test, y_test) > 0.3


def test_shallow_anchor_gives_deep_depth_with_shallow_widths(digits):
    """The paper's teacher-student compression: the teacher's depth with the student's widths."""
    (x, y), _ = digits
    teacher = train(mlp(64, [64, 64, 64, 64], 10, seed=3), x, y, epochs=5, seed=3)
    student = train(mlp(64, [24, 24], 10, seed=4), x, y, epochs=5, seed=4)
    result = fuse([teacher, student], x, FusionConfig(progress=False, anchor="shallowest"))
    widths = [m.out_features for m in result.model if isinstance(m, torch.nn.Linear)][:-1]
    assert widths == [24, 24, 24, 24]
    assert result.anchor == 1


def test_three_models_of_different_depths_fuse(digits):
    (x, y), (x_test, y_test) = digits
    models = [
        train(mlp(64, [48, 32, 32, 24], 10, seed=5), x, y, epochs=8, seed=5),
        train(mlp(64, [40, 24], 10, seed=6), x, y, epochs=8, seed=6),
        train(mlp(64, [32, 32, 16], 10, seed=7), x, y, epochs=8, seed=7),
    ]
    result = fuse(models, x, FusionConfig(progress=False))
    assert len(result.layer_alignments) == 2
    assert [len(a[0]) for a in result.layer_alignments] == [2, 3]
    assert sum(isinstance(m, torch.nn.Linear) for m in result.model) == 5
    report = evaluate(models + [result.model], (x_test, y_test), names=["a", "b", "c", "fused"])
    assert report["fused"].accuracy > 0.3
    assert report["ensemble"].num_samples == len(y_test)


def test_same_inputs_and_seed_give_bit_identical_weights(digits):
    (x, y), _ = digits
    a = train(mlp(64, [32, 24, 16], 10, seed=8), x, y, epochs=3, seed=8)
    b = train(mlp(64, [32, 16], 10, seed=9), x, y, epochs=3, seed=9)
    config = FusionConfig(progress=False, seed=3, num_samples=150)
    first, second = fuse([a, b], x, config).model.state_dict(), fuse([a, b], x, config).model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
