"""Bad input gets a ClaFusionError subclass naming the problem, the value, and the fix."""

import pytest
import torch
from torch import nn

from hf_clafusion import (
    AlignmentError,
    CalibrationDataError,
    ClaFusionError,
    ConfigError,
    FinetuneConfig,
    FusionConfig,
    IncompatibleModelsError,
    InvalidWeightsError,
    UnsupportedArchitectureError,
    fuse,
)

from ._models import mlp


X = torch.randn(32, 8)


def _fuse(models, data=X, **overrides):
    return fuse(models, data, FusionConfig(progress=False), **overrides)


def test_different_output_sizes_are_refused():
    with pytest.raises(IncompatibleModelsError, match=r"different output sizes: \[3, 5\].*same number of outputs"):
        _fuse([mlp(8, [16], 3), mlp(8, [16], 5)])


def test_different_input_sizes_are_refused():
    with pytest.raises(IncompatibleModelsError, match=r"inputs of different sizes: \[8, 6\]"):
        _fuse([mlp(8, [16], 3), mlp(6, [16], 3)])


def test_unsupported_layer_types_are_refused():
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3))
    with pytest.raises(UnsupportedArchitectureError, match=r"'GELU'.*Supported: Linear") as info:
        _fuse([model, mlp(8, [16], 3)])
    assert info.value.layer_type == "GELU"


def test_unsupported_model_classes_are_refused():
    class Net(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(UnsupportedArchitectureError, match=r"No adapter for a model of type 'Net'"):
        _fuse([Net(), Net()])


def test_non_finite_weights_are_refused():
    bad = mlp(8, [16], 3)
    bad[0].weight.data[0, 0] = float("nan")
    with pytest.raises(InvalidWeightsError, match=r"Model 1 has non-finite values in '0.weight' \(1 of 128"):
        _fuse([mlp(8, [16], 3), bad])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (torch.empty(0, 8), "got 0, need at least 4"),
        (torch.randn(2, 8), "got 2, need at least 4"),
        ([], "got 0"),
        ("text", "Unsupported calibration data of type str"),
    ],
)
def test_empty_or_too_few_calibration_samples(data, match):
    with pytest.raises(CalibrationDataError, match=match):
        _fuse([mlp(8, [16], 3), mlp(8, [16], 3, seed=1)], data)


def test_infeasible_first_last_fixed():
    deep, shallow = mlp(8, [16, 16, 16, 16, 16], 3), mlp(8, [16, 16, 16], 3)
    with pytest.raises(AlignmentError, match=r"has 3 layer\(s\), fewer than first_fixed=2 \+ last_fixed=2"):
        _fuse([deep, shallow], first_fixed=2, last_fixed=2)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("solver", "hungarian", r"Invalid value for `solver`: 'hungarian'. Choose one of: 'emd'"),
        ("num_samples", 0, r"`num_samples`: 0. It must be an integer >= 1"),
        ("anchor", "middle", r"`anchor`: 'middle'"),
        ("weights", (0.7, 0.7), r"`weights`: \(0.7, 0.7\)"),
        ("reg", -1.0, r"`reg`: -1.0"),
    ],
)
def test_invalid_config_values(field, value, match):
    with pytest.raises(ConfigError, match=match) as info:
        FusionConfig(**{field: value})
    assert info.value.field == field


def test_unknown_config_keys_list_valid_ones():
    with pytest.raises(ConfigError, match=r"Unknown FusionConfig key\(s\): 'solvr'. Valid keys: layer_cost"):
        FusionConfig.from_dict({"solvr": "emd"})
    with pytest.raises(ConfigError, match=r"`optimizer`: 'rmsprop'. Choose one of: 'sgd', 'adam', 'adamw'"):
        FinetuneConfig(optimizer="rmsprop")


def test_anchor_index_out_of_range():
    with pytest.raises(ConfigError, match=r"`anchor`: 5, but only 2 models"):
        _fuse([mlp(8, [16], 3), mlp(8, [16], 3, seed=1)], anchor=5)


def test_models_on_different_devices():
    other = mlp(8, [16], 3).to("meta")
    with pytest.raises(IncompatibleModelsError, match=r"different devices \(model 0: cpu, model 1: meta\)"):
        _fuse([mlp(8, [16], 3), other])


def test_a_single_model_is_refused():
    with pytest.raises(IncompatibleModelsError, match="at least 2 models, got 1"):
        _fuse([mlp(8, [16], 3)])


def test_merge_refuses_cnns():
    from ._models import cnn

    x = torch.rand(16, 1, 8, 8)
    with pytest.raises(UnsupportedArchitectureError, match="balancing='merge'.*only supports MLPs"):
        fuse([cnn([4, 4, 4, "M"]), cnn([4, "M"], seed=1)], x, FusionConfig(progress=False, balancing="merge"))


def test_every_error_is_a_clafusion_error():
    for cls in (
        AlignmentError,
        CalibrationDataError,
        ConfigError,
        IncompatibleModelsError,
        InvalidWeightsError,
        UnsupportedArchitectureError,
    ):
        assert issubclass(cls, ClaFusionError)


def test_models_built_from_different_layer_types_are_refused():
    from ._models import cnn

    x = torch.rand(16, 1, 8, 8)
    with pytest.raises(IncompatibleModelsError, match=r"built from different layer types: parameters \['"):
        fuse([cnn([4, 4, "M"], bn=True), cnn([4, 4, "M"], bn=False, seed=1)], x, FusionConfig(progress=False))
    with pytest.raises(IncompatibleModelsError, match="both with or both without BatchNorm and biases"):
        _fuse([mlp(8, [16, 16], 3, bias=True), mlp(8, [16], 3, bias=False)])


def test_calibration_data_of_the_wrong_shape():
    with pytest.raises(CalibrationDataError, match=r"cannot run on the calibration data \(batch shape \(32, 5\)\)"):
        _fuse([mlp(8, [16, 16], 3), mlp(8, [16], 3, seed=1)], torch.randn(32, 5))


def test_wrong_calibration_shape_is_caught_even_without_activation_costs():
    from ._models import cnn

    models = [cnn([4, 4, "M"]), cnn([4, "M"], seed=1)]
    with pytest.raises(CalibrationDataError, match="recompute BatchNorm statistics"):
        fuse(
            models, torch.rand(16, 3, 8, 8), FusionConfig(progress=False, layer_cost="index", ground_metric="weights")
        )
