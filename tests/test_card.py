"""The model card: metadata that huggingface_hub validates, and a body with parents, alignment and config."""

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData

from hf_clafusion import ClaFusionWarning, FusionConfig, evaluate, fuse, fuse_pretrained, save_model
from hf_clafusion.hub import build_model_card

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
    from hf_clafusion import FinetuneResult

    assert build_model_card(result).data.eval_results
    result.record_finetune(FinetuneResult(result.model, [{"epoch": 1, "step": 3, "train_loss": 0.5}]))
    card = build_model_card(result)
    assert card.data.eval_results is None  # no accuracy claimed for the finetuned model until re-evaluated
    assert "## Finetuning" in card.text and "| 1 | 0.5000 |" in card.text


def test_the_card_tells_how_to_load_from_where_it_lives(result):
    assert 'load_pretrained("me/fused-mlp")' in build_model_card(result, load_path="me/fused-mlp").text
