"""The hf-clafusion command line: each subcommand's happy path and its errors; the generated reference pages."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from hf_clafusion import ClaFusionError, load_pretrained, save_model
from hf_clafusion.cli import build_parser, main
from hf_clafusion.config import FinetuneConfig, FusionConfig, describe_choices

from ._models import mlp


@pytest.fixture
def parents(tmp_path):
    deep = save_model(mlp(8, [16, 16, 16], 3), tmp_path / "deep")
    shallow = save_model(mlp(8, [12, 12], 3, seed=1), tmp_path / "shallow")
    x = torch.randn(120, 8)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    save_file({"inputs": x, "labels": y}, str(tmp_path / "data.safetensors"))
    return deep, shallow, tmp_path / "data.safetensors"


@pytest.mark.parametrize("command", ["fuse", "finetune", "push", "inspect", "demo"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: hf-clafusion " + command in capsys.readouterr().out


@pytest.mark.parametrize(("command", "config_class"), [("fuse", FusionConfig), ("finetune", FinetuneConfig)])
def test_help_lists_the_allowed_values_of_every_choice_field(command, config_class, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    for name, values in describe_choices(config_class).items():
        assert f"  {name}: {values}\n" in out


def docs_hooks():
    path = Path(__file__).resolve().parent.parent / "docs" / "hooks.py"
    spec = importlib.util.spec_from_file_location("docs_hooks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("config_class", [FusionConfig, FinetuneConfig], ids=lambda c: c.__name__)
def test_the_configuration_page_table_has_every_field_with_its_default_choices_and_help(config_class):
    hooks = docs_hooks()
    page = (Path(hooks.__file__).parent / "configuration.md").read_text()
    assert f"<!-- CONFIG FIELDS: {config_class.__name__} -->" in page
    rows = hooks.on_page_markdown(f"<!-- CONFIG FIELDS: {config_class.__name__} -->", None, None, None).split("\n")
    fields = dataclasses.fields(config_class)
    assert len(rows) == 2 + len(fields)  # header, separator, one row per field in field order
    choices = describe_choices(config_class)
    for row, f in zip(rows[2:], fields):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert row.startswith(f"| `{f.name}` | `{f.type}` | `{default!r}` | {choices.get(f.name, '')} | ")
        assert f.metadata["help"].replace("|", "\\|") in row


def test_fuse_then_inspect_then_finetune(parents, tmp_path, capsys):
    deep, shallow, data = parents
    config = tmp_path / "fusion.yaml"
    config.write_text(yaml.safe_dump({"layer_cost": "cka", "num_samples": 100, "seed": 3}))
    out = tmp_path / "fused"
    code = main(
        [
            "fuse",
            str(deep),
            str(shallow),
            "--data",
            str(data),
            "--config",
            str(config),
            "--set",
            "solver=sinkhorn",
            "--set",
            "reg=0.05",
            "--output",
            str(out),
            "--quiet",
            "--license",
            "mit",
        ]
    )
    assert code == 0
    record = json.loads((out / "fusion_config.json").read_text())
    assert record["config"]["solver"] == "sinkhorn" and record["config"]["seed"] == 3
    assert record["parents"][0]["name_or_path"] == str(deep)
    assert ModelCard.load(out / "README.md").data.license == "mit"
    capsys.readouterr()

    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "library_name: hf_clafusion" in printed and "segment 0: model 1 layers -> model 0 layers" in printed

    tuned = tmp_path / "tuned"
    assert (
        main(
            [
                "finetune",
                str(out),
                "--data",
                str(data),
                "--set",
                "epochs=2",
                "--set",
                "lr=0.05",
                "--output",
                str(tuned),
                "--quiet",
            ]
        )
        == 0
    )
    history = json.loads((tuned / "fusion_config.json").read_text())["finetune"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert "## Finetuning" in (tuned / "README.md").read_text()
    assert load_pretrained(tuned)(torch.randn(2, 8)).shape == (2, 3)


def test_fuse_from_a_dataset_folder(parents, tmp_path):
    from datasets import Dataset

    deep, shallow, _ = parents
    Dataset.from_dict({"x": torch.randn(50, 8).tolist(), "label": [0] * 50}).save_to_disk(str(tmp_path / "ds"))
    assert (
        main(
            [
                "fuse",
                str(deep),
                str(shallow),
                "--data",
                str(tmp_path / "ds"),
                "--input-column",
                "x",
                "--output",
                str(tmp_path / "out"),
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "out" / "fusion_config.json").read_text())["calibration"]["total"] == 50


def test_bad_yaml_key_is_a_usage_error(parents, tmp_path, capsys):
    deep, shallow, data = parents
    config = tmp_path / "bad.yaml"
    config.write_text("solvr: emd\n")
    assert (
        main(
            [
                "fuse",
                str(deep),
                str(shallow),
                "--data",
                str(data),
                "--config",
                str(config),
                "--output",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "Unknown FusionConfig key(s): 'solvr'. Valid keys: layer_cost" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_missing_parent_path_is_a_one_line_failure(parents, tmp_path, capsys):
    _, shallow, data = parents
    code = main(
        ["fuse", str(tmp_path / "nope") + "/", str(shallow), "--data", str(data), "--output", str(tmp_path / "x")]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("hf-clafusion: error: ") and "neither an existing folder nor a valid Hub id" in err
    assert err.count("\n") == 1


def test_debug_reraises_the_library_error_that_is_otherwise_a_one_line_message(parents, tmp_path, capsys):
    _, shallow, data = parents
    argv = ["fuse", str(tmp_path / "nope") + "/", str(shallow), "--data", str(data), "--output", str(tmp_path / "x")]
    assert main(argv) == 1  # without --debug: an exit code and one line, no traceback
    err = capsys.readouterr().err
    assert err.startswith("hf-clafusion: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "neither an existing folder" in err
    with pytest.raises(ClaFusionError, match="neither an existing folder") as info:
        main(["--debug", *argv])
    # the original exception, raised from inside the library (its traceback reaches the raising frame)
    assert "hf_clafusion" in str(info.traceback[-1].path) and "cli.py" not in str(info.traceback[-1].path)
    assert not (tmp_path / "x").exists()


def test_push_needs_an_existing_folder(tmp_path, capsys):
    assert main(["push", str(tmp_path / "missing"), "me/model"]) == 2
    assert "No such folder" in capsys.readouterr().err


def test_usage_errors_exit_with_code_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fuse"])
    assert info.value.code == 2


def test_parser_has_the_documented_subcommands():
    parser = build_parser()
    assert {"fuse", "finetune", "push", "inspect", "demo"} <= set(parser._subparsers._group_actions[0].choices)
