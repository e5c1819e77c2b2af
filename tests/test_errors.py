"""Bad input gets a ClaFusionError subclass naming the problem, the value, and the fix."""

import dataclasses
import typing

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
    LoadError,
    SaveError,
    UnsupportedArchitectureError,
    fuse,
)
from hf_clafusion import config as config_module
from hf_clafusion.config import describe_choices, field_choices

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
    with pytest.raises(ConfigError, match=r"`anchor`: 5, but only 2 models.*Pass an index from 0 to 1 .*'deepest'"):
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
        LoadError,
        SaveError,
        UnsupportedArchitectureError,
    ):
        assert issubclass(cls, ClaFusionError)


def test_load_error_is_a_save_error_so_existing_handlers_keep_catching_load_failures():
    assert issubclass(LoadError, SaveError) and issubclass(LoadError, OSError)
    import hf_clafusion

    assert "LoadError" in hf_clafusion.__all__ and hf_clafusion.__all__ == sorted(hf_clafusion.__all__)


# ------------------------------------------------------------------------------------------- config choices

CONFIGS = [FusionConfig, FinetuneConfig]


FREE_TEXT = {
    FusionConfig: {"device", "input_column"},
    FinetuneConfig: {"input_column", "label_column", "checkpoint_dir", "resume_from", "project_dir"},
}


@pytest.mark.parametrize("config_class", CONFIGS, ids=lambda c: c.__name__)
def test_string_fields_are_literal_choices_except_the_free_text_ones(config_class):
    hints = typing.get_type_hints(config_class)
    plain_strings = {
        f.name for f in dataclasses.fields(config_class) if hints[f.name] is str or hints[f.name] == str | None
    }
    assert plain_strings == FREE_TEXT[config_class]  # paths, devices and column names: no fixed set of values
    for name, choices in field_choices(config_class).items():
        default = next(f.default for f in dataclasses.fields(config_class) if f.name == name)
        assert default in choices


@pytest.mark.parametrize("config_class", CONFIGS, ids=lambda c: c.__name__)
def test_every_choice_is_accepted_and_anything_else_refused_with_the_choices(config_class):
    for name, choices in field_choices(config_class).items():
        for value in choices:
            assert getattr(config_class(**{name: value}), name) == value
        with pytest.raises(ConfigError, match=rf"Invalid value for `{name}`: 'bogus'\.") as info:
            config_class(**{name: "bogus"})
        assert info.value.field == name
        assert all(repr(value) in str(info.value) for value in choices)


def test_the_choice_lists_come_from_the_literal_aliases():
    assert field_choices(FusionConfig)["solver"] == typing.get_args(config_module.Solver) == FusionConfig.SOLVERS
    assert field_choices(FusionConfig)["layer_cost"] == FusionConfig.LAYER_COSTS
    assert field_choices(FinetuneConfig)["mixed_precision"] == typing.get_args(config_module.MixedPrecision)
    assert describe_choices(FusionConfig)["anchor"] == "'deepest', 'shallowest' or a model index >= 0"
    assert set(field_choices(FinetuneConfig)) == {"optimizer", "scheduler", "mixed_precision", "distill_scaling"}


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


@pytest.mark.parametrize("what", ["evaluation", "training"])
def test_evaluation_and_training_data_of_the_wrong_shape_name_the_batch_shape(what):
    from hf_clafusion import DataError, evaluate, finetune

    model = mlp(8, [16], 3)
    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))  # 5 features for a model that reads 8
    with pytest.raises(DataError, match=rf"cannot run on the {what} data \(a batch: Tensor of shape \(\d+, 5\)"):
        if what == "evaluation":
            evaluate([model, mlp(8, [12], 3, seed=1)], (x, y))
        else:
            finetune(model, (x, y), epochs=1, progress=False)


def test_field_choices_reads_literals_inside_unions_and_keeps_none_for_optional_ones():
    @dataclasses.dataclass
    class Example:
        mode: typing.Literal["a", "b"] | None = None
        anchor: typing.Literal["first"] | int = "first"
        name: str | None = None

    assert field_choices(Example) == {"mode": ("a", "b", None), "anchor": ("first",)}
