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

from ._models import mlp, word_tokenizer


@pytest.fixture
def parents(tmp_path):
    deep = save_model(mlp(8, [16, 16, 16], 3), tmp_path / "deep")
    shallow = save_model(mlp(8, [12, 12], 3, seed=1), tmp_path / "shallow")
    x = torch.randn(120, 8)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    save_file({"inputs": x, "labels": y}, str(tmp_path / "data.safetensors"))
    return deep, shallow, tmp_path / "data.safetensors"


@pytest.mark.parametrize("command", ["fuse", "finetune", "evaluate", "push", "inspect", "demo"])
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


@pytest.mark.parametrize("command", ["finetune", "evaluate"])
def test_a_missing_model_folder_typed_as_a_relative_path_is_named_as_a_path(
    command, parents, tmp_path, capsys, monkeypatch
):
    _, _, data = parents
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = [command, "./missing", "--data", str(data)] + (["--output", "out"] if command == "finetune" else [])
    assert main(argv) == 1
    err = one_line_error(capsys)
    assert "'./missing' is neither an existing folder nor a valid Hub id" in err  # not a Hub cache miss of 'missing'


@pytest.mark.parametrize("argv", [["push", "me/model"], ["inspect"]], ids=["push", "inspect"])
def test_a_missing_folder_exits_with_code_1_like_a_missing_data_file(argv, tmp_path, capsys):
    assert main([argv[0], str(tmp_path / "missing"), *argv[1:]]) == 1
    assert "No such folder" in one_line_error(capsys)


def test_usage_errors_exit_with_code_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fuse"])
    assert info.value.code == 2


def test_parser_has_the_documented_subcommands():
    parser = build_parser()
    assert {"fuse", "finetune", "evaluate", "push", "inspect", "demo"} <= set(
        parser._subparsers._group_actions[0].choices
    )


# ------------------------------------------------------------------------- what a new user meets: errors, data, text


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("hf-clafusion: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_an_existing_output_folder_is_refused_before_the_fusion_runs(parents, tmp_path, capsys):
    deep, shallow, _ = parents
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    # the data file does not exist: had the fusion started, that would be the error
    missing = str(tmp_path / "missing.safetensors")
    assert main(["fuse", str(deep), str(shallow), "--data", missing, "--output", str(out), "--quiet"]) == 1
    assert "already exists and is not empty" in one_line_error(capsys)
    assert (out / "keep.txt").read_text() == "mine"


def test_finetuning_on_raw_text_without_a_tokenizer_is_one_line(parents, tmp_path, capsys):
    from datasets import Dataset

    deep, _, _ = parents
    Dataset.from_dict({"text": ["hello world"] * 8, "label": [0] * 8}).save_to_disk(str(tmp_path / "text"))
    code = main(["finetune", str(deep), "--data", str(tmp_path / "text"), "--output", str(tmp_path / "o"), "--quiet"])
    assert code == 1
    assert "'text' holds raw text, and no tokenizer was found" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_library_warnings_are_one_line_each_on_stderr(parents, tmp_path, capsys):
    deep, shallow, data = parents
    # CCA on 10 samples of layers up to 16 wide is degenerate: the library warns (a ClaFusionWarning)
    argv = ["fuse", str(deep), str(shallow), "--data", str(data), "--set", "layer_cost=cca", "--set", "num_samples=10"]
    assert main([*argv, "--output", str(tmp_path / "fused"), "--quiet"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("hf-clafusion: warning: ") for line in lines), lines
    assert any("CCA is degenerate" in line for line in lines)


def test_a_missing_optional_package_is_one_line_with_the_install_hint(monkeypatch, tmp_path, capsys):
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=3, layers=[1, 1, 1, 1], channels=(8,) * 4)
    folder = save_model(model, tmp_path / "resnet")
    monkeypatch.setitem(__import__("sys").modules, "timm", None)  # as if the timm extra were not installed
    data = tmp_path / "data.safetensors"
    save_file({"inputs": torch.randn(4, 3, 16, 16), "labels": torch.zeros(4, dtype=torch.long)}, str(data))
    assert main(["evaluate", str(folder), "--data", str(data)]) == 1
    err = one_line_error(capsys)
    assert "timm" in err and "pip install -e '.[timm]'" in err


def test_any_other_exception_is_one_line_and_debug_shows_it(tmp_path, capsys):
    from hf_clafusion.cli import error_line

    line = error_line(TypeError("new(): invalid data type 'str'\nmore"))
    assert "\n" not in line and line.startswith("unexpected TypeError: new(): invalid data type 'str' more.")
    assert "--debug" in line


def test_eval_split_reads_split_keys_of_a_safetensors_file(parents, tmp_path, capsys):
    deep, _, _ = parents
    x = torch.randn(100, 8)
    y = (x[:, 0] > 0).long()
    data = tmp_path / "splits.safetensors"
    save_file(
        {"train/inputs": x[:80], "train/labels": y[:80], "validation/inputs": x[80:], "validation/labels": y[80:]},
        str(data),
    )
    out = tmp_path / "tuned"
    args = ["finetune", str(deep), "--data", str(data), "--eval-split", "validation", "--set", "epochs=2"]
    assert main([*args, "--output", str(out), "--quiet"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["eval_samples"] for r in records] == [20, 20]
    # a plain file has no such split: the error says how to give one
    _, _, plain = parents
    args = ["finetune", str(deep), "--data", str(plain), "--eval-split", "validation", "--output", str(tmp_path / "x")]
    assert main(args) == 1  # a data problem, as for a missing --split
    err = one_line_error(capsys)
    assert "'validation/inputs'" in err and "--eval-fraction" in err


def test_eval_fraction_holds_out_part_of_a_safetensors_file(parents, tmp_path, capsys):
    deep, _, data = parents  # 120 rows
    out = tmp_path / "tuned"
    args = ["finetune", str(deep), "--data", str(data), "--eval-fraction", "0.25", "--set", "epochs=1"]
    assert main([*args, "--output", str(out), "--quiet"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert records[0]["eval_samples"] == 30


def test_exponent_floats_without_a_dot_are_numbers_in_config_files_and_set(parents, tmp_path, capsys):
    deep, _, data = parents
    config = tmp_path / "finetune.yaml"
    # plain YAML 1.1 reads 1e-3 as the string '1e-3'; a constant rate, so the logged rate is the one set
    config.write_text("lr: 1e-3\nepochs: 1\nscheduler: none\n")
    args = ["finetune", str(deep), "--data", str(data), "--config", str(config), "--set", "weight_decay=5e-4"]
    assert main([*args, "--output", str(tmp_path / "tuned"), "--quiet"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert records[0]["lr"] == pytest.approx(1e-3)  # and weight_decay=5e-4 passed validation as a number


@pytest.mark.parametrize("command", ["evaluate", "finetune", "fuse"])
def test_a_split_asked_of_a_file_without_splits_is_refused_not_ignored(command, parents, tmp_path, capsys):
    deep, shallow, data = parents  # 'inputs' and 'labels' only: --split test would silently read the whole file
    models = [str(deep), str(shallow)] if command == "fuse" else [str(deep)]
    output = [] if command == "evaluate" else ["--output", str(tmp_path / "out")]
    assert main([command, *models, "--data", str(data), "--split", "test", *output, "--quiet"]) == 1
    err = one_line_error(capsys)
    assert "has no splits" in err and "Leave out --split" in err and "'test/inputs'" in err
    assert not (tmp_path / "out").exists()


def test_splits_a_dataset_folder_lacks_are_refused_naming_the_ones_it_has(parents, tmp_path, capsys):
    from datasets import Dataset, DatasetDict

    deep, _, _ = parents
    x = torch.randn(40, 8)
    rows = Dataset.from_dict({"inputs": x.tolist(), "label": (x[:, 0] > 0).long().tolist()})
    DatasetDict({"train": rows, "test": rows}).save_to_disk(str(tmp_path / "dict"))
    rows.save_to_disk(str(tmp_path / "one"))
    out = ["--output", str(tmp_path / "out"), "--quiet"]
    assert main(["finetune", str(deep), "--data", str(tmp_path / "dict"), "--eval-split", "validation", *out]) == 1
    assert "has no split 'validation' (its splits are ['train', 'test'])" in one_line_error(capsys)
    # one Dataset has no splits: a split asked of it would silently be all of it
    assert main(["evaluate", str(deep), "--data", str(tmp_path / "one"), "--split", "test"]) == 1
    assert "without splits" in one_line_error(capsys)
    assert main(["evaluate", str(deep), "--data", str(tmp_path / "one")]) == 0


def test_evaluate_prints_the_accuracy_table(parents, tmp_path, capsys):
    deep, shallow, data = parents
    assert main(["evaluate", str(deep), str(shallow), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    from safetensors.torch import load_file

    from hf_clafusion import evaluate

    tensors = load_file(str(data))
    models = [load_pretrained(deep), load_pretrained(shallow)]
    expected = evaluate(models, (tensors["inputs"], tensors["labels"]), names=[str(deep), str(shallow)])
    assert out.strip() == str(expected).strip()
    assert "ensemble" in out


def test_inspect_shows_the_finetuning_history(parents, tmp_path, capsys):
    deep, shallow, data = parents
    fused, tuned = tmp_path / "fused", tmp_path / "tuned"
    assert main(["fuse", str(deep), str(shallow), "--data", str(data), "--output", str(fused), "--quiet"]) == 0
    args = ["finetune", str(fused), "--data", str(data), "--eval-fraction", "0.2", "--set", "epochs=2"]
    assert main([*args, "--output", str(tuned), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tuned)]) == 0
    out = capsys.readouterr().out
    assert "finetuned for 2 epoch(s); saved weights: after the last one" in out
    assert "epoch 1: train loss" in out and "epoch 2: train loss" in out and "best eval accuracy" in out


def test_inspect_shows_the_recorded_evaluation(parents, tmp_path, capsys):
    from hf_clafusion import evaluate
    from hf_clafusion.hub import load_fusion_result

    deep, shallow, data = parents
    fused = tmp_path / "fused"
    assert main(["fuse", str(deep), str(shallow), "--data", str(data), "--output", str(fused), "--quiet"]) == 0
    result = load_fusion_result(fused)
    x, y = torch.randn(30, 8), torch.randint(0, 3, (30,))
    result.record_evaluation(evaluate([result.model], (x, y), names=["fused"]), dataset="toy")
    result.save_pretrained(tmp_path / "evaluated")
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "evaluated")]) == 0
    out = capsys.readouterr().out
    row = result.evaluation[0]
    assert "recorded evaluation on toy:" in out
    assert f"  fused: accuracy {100 * row['accuracy']:.2f}%, loss {row['loss']:.4f}  (this model)" in out


def _bert_folder(folder: Path, layers: int, seed: int) -> Path:
    transformers = pytest.importorskip("transformers")
    tokenizer = word_tokenizer(["hello", "world", "good", "bad"])
    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
        max_position_embeddings=32,
    )
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_fuse_keeps_the_anchor_tokenizer_and_finetune_tokenizes_raw_text(tmp_path, capsys):
    """The tokenizer round trip: fused with the CLI, AutoTokenizer reads the parent's tokenizer back from the output;
    finetune and evaluate then tokenize a raw-text dataset with it."""
    transformers = pytest.importorskip("transformers")
    from datasets import Dataset

    deep, shallow = _bert_folder(tmp_path / "deep", 3, 0), _bert_folder(tmp_path / "shallow", 2, 1)
    ids = torch.randint(4, 8, (24, 6), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, str(tmp_path / "calib.safetensors"))
    out = tmp_path / "fused"
    args = ["fuse", str(deep), str(shallow), "--data", str(tmp_path / "calib.safetensors")]
    assert main([*args, "--output", str(out), "--quiet"]) == 0
    parent = transformers.AutoTokenizer.from_pretrained(deep)
    fused = transformers.AutoTokenizer.from_pretrained(out)
    assert fused("hello world")["input_ids"] == parent("hello world")["input_ids"] == [4, 5]

    texts = ["hello world good", "bad world", "good good hello", "bad bad world"] * 6
    labels = [int("good" in t) for t in texts]
    Dataset.from_dict({"text": texts, "label": labels}).save_to_disk(str(tmp_path / "text"))
    tuned = tmp_path / "tuned"
    args = ["finetune", str(out), "--data", str(tmp_path / "text"), "--eval-fraction", "0.25", "--max-length", "8"]
    assert main([*args, "--set", "epochs=1", "--output", str(tuned), "--quiet"]) == 0
    assert transformers.AutoTokenizer.from_pretrained(tuned)("hello world")["input_ids"] == [4, 5]
    capsys.readouterr()
    assert main(["evaluate", str(tuned), "--data", str(tmp_path / "text")]) == 0  # one Dataset: no --split
    assert str(tuned) in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:Cannot enable progress bars")  # a --quiet run before set the variable
@pytest.mark.parametrize("command", ["evaluate --quiet", "inspect"])
def test_quiet_also_turns_off_the_progress_bars_of_the_hugging_face_libraries(command, parents, tmp_path, monkeypatch):
    """Tokenizing (datasets), loading and saving (transformers, huggingface_hub) draw their own bars; --quiet turns
    them off too, and inspect always does. (The tests set TQDM_DISABLE, so the bars themselves cannot be seen here:
    their switches can.)"""
    datasets_tqdm = pytest.importorskip("datasets.utils.tqdm")
    hub_utils = pytest.importorskip("huggingface_hub.utils")
    transformers_logging = pytest.importorskip("transformers.utils.logging")
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)  # main sets them for libraries not imported yet; undone afterwards
    deep, shallow, data = parents
    fused = str(tmp_path / "fused")
    assert main(["fuse", str(deep), str(shallow), "--data", str(data), "--output", fused, "--quiet"]) == 0
    argv = (
        ["evaluate", fused, "--data", str(data), "--quiet"] if command.startswith("evaluate") else ["inspect", fused]
    )
    datasets_tqdm.enable_progress_bars()
    hub_utils.enable_progress_bars()
    transformers_logging.enable_progress_bar()
    try:
        assert main(argv) == 0
        assert datasets_tqdm.are_progress_bars_disabled()
        assert hub_utils.are_progress_bars_disabled()
        assert not transformers_logging.is_progress_bar_enabled()
    finally:
        datasets_tqdm.enable_progress_bars()
        hub_utils.enable_progress_bars()
        transformers_logging.enable_progress_bar()


def test_no_processor_saves_a_transformers_model_without_a_tokenizer(tmp_path, capsys, monkeypatch):
    from hf_clafusion import api

    deep, shallow = _bert_folder(tmp_path / "deep", 3, 0), _bert_folder(tmp_path / "shallow", 2, 1)
    for folder in (deep, shallow):
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (folder / name).unlink(missing_ok=True)
    ids = torch.randint(4, 8, (24, 6), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, str(tmp_path / "calib.safetensors"))
    fusions = []
    run_fusion = api.run_fusion
    monkeypatch.setattr(api, "run_fusion", lambda *a, **k: fusions.append(1) or run_fusion(*a, **k))
    args = ["fuse", str(deep), str(shallow), "--data", str(tmp_path / "calib.safetensors"), "--quiet"]
    assert main([*args, "--output", str(tmp_path / "a")]) == 1
    assert "needs its tokenizer" in one_line_error(capsys) and not (tmp_path / "a").exists()
    assert fusions == []  # refused before fusing, not after a long fusion
    assert main([*args, "--output", str(tmp_path / "b"), "--no-processor"]) == 0
    assert (tmp_path / "b" / "model.safetensors").is_file() and fusions == [1]
    # the tokenizer of the second parent (not the anchor) is enough to start, and is saved beside the result
    word_tokenizer(["hello", "world", "good", "bad"]).save_pretrained(shallow)
    assert main([*args, "--output", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "tokenizer_config.json").is_file()


def test_finetune_trains_a_causal_lm_and_looks_for_its_tokenizer_before_training(tmp_path, capsys):
    import datasets
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "lm")  # no tokenizer beside it
    ids = torch.randint(2, 32, (32, 9), generator=torch.Generator().manual_seed(0))
    columns = {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": ids.tolist()}
    datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "data"))
    args = ["finetune", str(tmp_path / "lm"), "--data", str(tmp_path / "data"), "--eval-fraction", "0.25", "--quiet"]
    assert main([*args, "--set", "epochs=1", "--output", str(tmp_path / "a")]) == 1
    captured = capsys.readouterr()
    assert "needs its tokenizer" in captured.err and '"epoch"' not in captured.out  # refused before any training
    assert not (tmp_path / "a").exists()
    assert main([*args, "--set", "epochs=1", "--output", str(tmp_path / "b"), "--no-processor"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert records[-1]["eval_samples"] == 8 and records[-1]["eval_tokens"] == 8 * 8  # 9 tokens, 8 predicted each
    assert (tmp_path / "b" / "model.safetensors").is_file()
    # a tokenizer saved in the folder being finetuned is found there and saved beside the result
    word_tokenizer([f"w{i}" for i in range(20)]).save_pretrained(tmp_path / "lm")
    assert main([*args, "--set", "epochs=1", "--output", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "tokenizer_config.json").is_file()
