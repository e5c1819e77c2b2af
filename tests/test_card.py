"""What a saved fused model tells: the model card (metadata that huggingface_hub validates, a body with parents,
alignment and config), the ``fusion_config.json`` record and the alignment plot."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData

from hf_clafusion import (
    ClaFusionError,
    ClaFusionWarning,
    FinetuneResult,
    FusionConfig,
    FusionResult,
    evaluate,
    fuse,
    fuse_pretrained,
    save_model,
)
from hf_clafusion.hub import FUSION_CONFIG_FILE, build_model_card, load_fusion_result
from hf_clafusion.plotting import plot_alignment

from ._models import mlp


@pytest.fixture
def result():
    models = [mlp(8, [16, 16, 16], 3), mlp(8, [12, 12], 3, seed=1)]
    res = fuse(models, torch.randn(64, 8), FusionConfig(progress=False, solver="sinkhorn"))
    x, y = torch.randn(40, 8), torch.randint(0, 3, (40,))
    res.record_evaluation(evaluate(models + [res.model], (x, y), names=["deep", "shallow", "fused"]), dataset="toy")
    return res


def test_card_metadata_parses_and_validates(result, tmp_path):
    folder = result.save_pretrained(tmp_path / "m", license="apache-2.0", model_name="toy-fused")
    text = (folder / "README.md").read_text()
    header = yaml.safe_load(text.split("---")[1])
    data = ModelCardData(**header)  # validates the metadata, model-index included
    assert data.library_name == "hf_clafusion"
    assert data.tags == ["model-fusion", "clafusion", "torch"]
    assert data.license == "apache-2.0" and data.datasets == ["toy"]
    assert data.eval_results[0].metric_type == "accuracy"
    assert data.eval_results[0].metric_value == pytest.approx(result.evaluation[2]["accuracy"], abs=1e-6)
    card = ModelCard.load(folder / "README.md")
    assert card.data.model_name == "toy-fused"


def test_card_body_has_parents_alignment_config_and_citations(result):
    body = build_model_card(result).text
    for parent in result.parents:
        assert parent["sha256"][:16] in body
    assert "| 1 | 0 | 0 | 0 | [0, 2] |" in body
    assert "solver: sinkhorn" in body and "layer_cost: cka" in body
    assert "| fused |" in body and "| ensemble |" in body
    assert "nguyen2023clafusion" in body and "singh2020otfusion" in body
    assert "load_pretrained(" in body and "## Limitations" in body


def test_base_model_lists_only_hub_ids(result):
    result.parents[0]["name_or_path"] = "someone/deep-mlp"
    result.parents[1]["name_or_path"] = "/tmp/local-folder"
    assert build_model_card(result).data.base_model == ["someone/deep-mlp"]


def test_license_is_inherited_when_parents_agree_and_warns_otherwise(tmp_path):
    for name, lic in (("a", "mit"), ("b", "mit"), ("c", "apache-2.0")):
        folder = save_model(mlp(8, [16, 16] if name == "a" else [12], 3, seed=len(name)), tmp_path / name)
        ModelCard(f"---\nlicense: {lic}\n---\n# {name}\n").save(folder / "README.md")
    x = torch.randn(64, 8)
    same = fuse_pretrained([tmp_path / "a", tmp_path / "b"], x, progress=False)
    assert build_model_card(same).data.license == "mit"
    mixed = fuse_pretrained([tmp_path / "a", tmp_path / "c"], x, progress=False)
    with pytest.warns(ClaFusionWarning, match=r"different licenses \(apache-2.0, mit\)"):
        assert build_model_card(mixed).data.license is None


def test_finetuning_makes_the_recorded_evaluation_stale(result):
    assert build_model_card(result).data.eval_results
    result.record_finetune(FinetuneResult(result.model, [{"epoch": 1, "step": 3, "train_loss": 0.5}]))
    card = build_model_card(result)
    assert card.data.eval_results is None  # no accuracy claimed for the finetuned model until re-evaluated
    assert "## Finetuning" in card.text and "| 1 | 0.5000 |" in card.text


def test_the_card_and_summary_say_which_epoch_s_weights_were_kept(result):
    history = [
        {"epoch": 1, "step": 3, "train_loss": 0.5, "eval_accuracy": 0.9, "eval_loss": 0.3},
        {"epoch": 2, "step": 6, "train_loss": 0.4, "eval_accuracy": 0.8, "eval_loss": 0.4},
    ]
    result.record_finetune(FinetuneResult(result.model, history, kept_epoch=2))
    text = build_model_card(result).text
    assert "those after the last epoch (epoch 2)" in text and "reached at epoch 1; those weights were not" in text
    assert "saved weights: after the last one" in result.summary()
    result.record_finetune(FinetuneResult(result.model, history, kept_epoch=1))
    text = build_model_card(result).text
    assert "The saved weights are those after epoch 1, which had the best evaluation accuracy" in text
    assert "after the last epoch" not in text and "the last epoch was 2" in text
    assert "saved weights: after epoch 1 (the best evaluation accuracy, keep_best)" in result.summary()
    result.record_finetune(FinetuneResult(result.model, history, kept_epoch=0))
    assert "The saved weights are those before finetuning" in build_model_card(result).text


def test_the_card_tells_how_to_load_from_where_it_lives(result):
    assert 'load_pretrained("me/fused-mlp")' in build_model_card(result, load_path="me/fused-mlp").text


# ------------------------------------------------------------------------------------------- the saved record


def assert_same_result_fields(restored: FusionResult, original: FusionResult) -> None:
    for f in dataclasses.fields(FusionResult):
        if f.name in ("model", "transport_plans"):  # the model is loaded beside the record; plans are not saved
            continue
        if f.name == "pairs":
            assert len(restored.pairs) == len(original.pairs)
            for got, want in zip(restored.pairs, original.pairs):
                for name in ("model", "reference", "deeper", "alignment", "offsets"):
                    assert getattr(got, name) == getattr(want, name), name
                assert all(torch.equal(g, w.double()) for g, w in zip(got.costs, want.costs))
        else:
            assert getattr(restored, f.name) == getattr(original, f.name), f.name


@pytest.fixture
def recorded(result):
    """The result with every recorded field away from its default, so a dropped field cannot go unnoticed."""
    result.record_evaluation(result.evaluation, dataset="toy", task="text-classification")
    result.finetune_history = [{"epoch": 1, "step": 3, "train_loss": 0.5}]
    result.finetune_kept_epoch = 1
    result.identity_errors = {"0.1": 0.01}
    result.bn_reset = True
    result.alignment_trial = {
        "tried": ["cla", "chain"],
        "kept": "chain",
        "agreement": {"cla": 0.5, "chain": 0.75},
        "samples": 4,
    }
    defaults = FusionResult(result.model, [], {}, {}, {}, FusionConfig(), "", 0, [])
    for f in dataclasses.fields(FusionResult):
        if f.name not in ("model", "transport_plans", "anchor"):  # the anchor is model 0, which is the default
            assert getattr(result, f.name) != getattr(defaults, f.name), f.name
    return result


def test_from_record_of_to_record_keeps_every_recorded_field(recorded):
    record = json.loads(json.dumps(recorded.to_record()))  # what fusion_config.json holds
    restored = FusionResult.from_record(record, recorded.model)
    assert_same_result_fields(restored, recorded)
    assert restored.to_record() == record


def test_the_saved_record_keeps_the_evaluation_task(recorded, tmp_path):
    folder = recorded.save_pretrained(tmp_path / "m")
    assert json.loads((folder / FUSION_CONFIG_FILE).read_text())["evaluation_task"] == "text-classification"
    loaded = load_fusion_result(folder)
    assert_same_result_fields(loaded, recorded)
    assert build_model_card(loaded).data.eval_results[0].task_type == "text-classification"


def test_records_of_earlier_versions_load_with_defaults(result):
    record = result.to_record()
    del record["evaluation_task"], record["finetune"], record["identity_errors"]
    restored = FusionResult.from_record(record, result.model)
    assert restored.evaluation_task == "image-classification"
    assert restored.finetune_history == [] and restored.identity_errors == {}


# ------------------------------------------------------------------------------------------- the alignment plot


def test_plot_alignment_takes_plain_arrays_and_circles_each_match(tmp_path):
    cost = np.arange(12.0).reshape(4, 3)
    figure = plot_alignment(
        [cost, [[0.0, 1.0], [1.0, 0.0]]],
        [[0, 2, 3], [1, 0]],
        row_labels=["deep", "deep"],
        column_labels=["shallow", "shallow"],
        titles=["first", "second"],
        path=tmp_path / "plot.png",
    )
    panels = [ax for ax in figure.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["first", "second"]
    np.testing.assert_array_equal(panels[0].images[0].get_array(), cost)
    assert list(panels[0].lines[0].get_ydata()) == [0, 2, 3]
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_alignment_refuses_a_missing_alignment():
    with pytest.raises(ClaFusionError, match="2 cost matrices but 1 alignments"):
        plot_alignment([np.zeros((2, 2)), np.zeros((3, 2))], [[0, 1]])


def test_the_result_plot_has_one_panel_per_segment_with_layers(result):
    panels = [ax for ax in result.plot_alignment().axes if ax.images]
    pair = result.pairs[0]
    assert len(panels) == sum(c.numel() > 0 for c in pair.costs)
    assert list(panels[0].lines[0].get_ydata()) == pair.local(0)


def test_the_plot_numbers_layers_over_the_network_as_the_card_does():
    """Two segments (a pooling layer between them): the second panel's ticks continue the network-wide numbering
    that the card's table and ``layer_alignment`` use, and every colour bar says what it measures."""
    from ._models import cnn

    deep = cnn([8, 8, 8, "M", 8, 8, 8, "M"], 3, size=8)
    shallow = cnn([8, 8, "M", 8, 8, "M"], 3, size=8, seed=1)
    res = fuse([deep, shallow], torch.randn(48, 1, 8, 8), FusionConfig(progress=False))
    pair = res.pairs[0]
    assert len(pair.alignment) >= 2 and pair.offsets[1] > 0
    figure = res.plot_alignment()
    panels = [ax for ax in figure.axes if ax.images]
    second = panels[1]
    rows = [int(t.get_text()) for t in second.get_yticklabels()]
    columns = [int(t.get_text()) for t in second.get_xticklabels()]
    assert rows[0] == pair.offsets[1] and columns[0] == len(pair.alignment[0])
    # the circled matches, read through the tick labels, are the card's (network-wide) indices
    matched = [rows[int(y)] for y in second.lines[0].get_ydata()]
    assert matched == pair.alignment[1]
    assert (
        f"| {pair.model} | {pair.reference} | 1 | {pair.deeper[1]} | {pair.alignment[1]} |"
        in build_model_card(res).text
    )
    bars = [ax for ax in figure.axes if not ax.images]
    assert bars and all("cka cost" in ax.get_ylabel() for ax in bars)


def test_the_card_says_which_epoch_the_weights_are_from_and_the_best_one(result):
    history = [
        {"epoch": 1, "train_loss": 0.9, "eval_accuracy": 0.5},
        {"epoch": 2, "train_loss": 0.7, "eval_accuracy": 0.8},
        {"epoch": 3, "train_loss": 0.6, "eval_accuracy": 0.75},
    ]
    result.record_finetune(FinetuneResult(result.model, history))
    text = " ".join(build_model_card(result).text.split())
    assert "The saved weights are those after the last epoch (epoch 3)." in text
    assert "The best evaluation accuracy, 80.00 %, was reached at epoch 2; those weights were not kept." in text
    summary = result.summary()
    assert "best eval accuracy 80.00% at epoch 2" in summary and "epoch 3: train loss 0.6000" in summary


def test_tied_layer_costs_warn_that_the_alignment_is_arbitrary():
    """Freshly initialised timm ResNets: the last BatchNorm of every block starts at zero, so every block of a stage
    outputs the same activations, every layer cost ties, and the alignment is arbitrary."""
    timm = pytest.importorskip("timm")

    def fresh(layers, seed):
        torch.manual_seed(seed)
        return timm.create_model(
            "resnet18", pretrained=False, num_classes=3, layers=layers, channels=(8, 8, 8, 8), in_chans=1
        ).eval()

    x = torch.randn(32, 1, 16, 16)
    with pytest.warns(ClaFusionWarning, match=r"All layer costs of segment \d .* are equal .*arbitrary.*BatchNorm"):
        fuse([fresh([3, 1, 1, 1], 0), fresh([1, 1, 1, 1], 1)], x, FusionConfig(progress=False))


def test_trained_layer_costs_do_not_warn(recwarn):
    models = [mlp(8, [16, 16, 16], 3), mlp(8, [12, 12], 3, seed=1)]
    fuse(models, torch.randn(64, 8), FusionConfig(progress=False))
    assert not [w for w in recwarn if "layer costs" in str(w.message)]
