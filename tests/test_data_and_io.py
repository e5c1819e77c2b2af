"""Calibration data forms, save/load round trips, atomic writes, fuse_pretrained loading."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from hf_clafusion import (
    ClaFusionError,
    FusionConfig,
    SaveError,
    align,
    fuse,
    fuse_pretrained,
    load_pretrained,
    save_model,
)
from hf_clafusion.adapters import get_adapter

from ._models import cnn, max_rel_error, mlp


CONFIG = FusionConfig(progress=False, repair=None, num_samples=64)


@pytest.fixture
def pair():
    return mlp(8, [16, 16, 16], 3), mlp(8, [12, 12], 3, seed=1)


def test_all_calibration_forms_give_the_same_fusion(pair):
    x = torch.randn(64, 8)
    y = torch.randint(0, 3, (64,))
    reference = fuse(pair, x, CONFIG).model.state_dict()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    for data in (loader, [x[:20], x[20:]]):
        state = fuse(pair, data, CONFIG).model.state_dict()
        assert all(torch.allclose(state[k], reference[k], atol=1e-5) for k in reference)


def test_a_datasets_split_is_subsampled_with_recorded_provenance(pair):
    from datasets import Dataset

    ds = Dataset.from_dict({"x": torch.randn(100, 8).tolist(), "label": [0] * 100}).with_format("torch")
    result = fuse(pair, ds, CONFIG)
    prov = result.calibration
    assert prov["source"] == "datasets.Dataset" and prov["total"] == 100 and prov["num_samples"] == 64
    assert len(prov["indices"]) == 64 and prov["indices"] == sorted(prov["indices"])
    again = fuse(pair, ds, CONFIG).calibration["indices"]
    assert again == prov["indices"]


def test_a_one_tensor_dict_is_the_input_of_a_sequential(pair):
    x = torch.randn(64, 8)
    reference = fuse(pair, x, CONFIG).model.state_dict()
    state = fuse(pair, {"pixel_values": x}, CONFIG).model.state_dict()
    assert all(torch.allclose(state[k], reference[k], atol=1e-6) for k in reference)
    with pytest.raises(ClaFusionError, match=r"takes one input tensor, but the batch has keys \['a', 'b'\]"):
        fuse(pair, {"a": x, "b": x}, CONFIG)


def test_align_preview_and_plot(pair, tmp_path):
    preview = align(pair, torch.randn(64, 8), CONFIG)
    assert preview.layer_alignment == [[0, 2]]
    assert preview.layer_costs[0].shape == (3, 2)
    preview.plot_alignment(tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_save_load_round_trip_gives_equal_outputs(tmp_path):
    deep, shallow = cnn([6, 6, "M", 8, "M"], hidden_fc=[16]), cnn([6, "M", 8, "M"], hidden_fc=[16], seed=3)
    x = torch.rand(32, 1, 8, 8)
    result = fuse([deep, shallow], x, FusionConfig(progress=False))
    folder = result.save_pretrained(tmp_path / "fused")
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "alignment.png",
        "architecture.json",
        "fusion_config.json",
        "model.safetensors",
    ]
    record = json.loads((folder / "fusion_config.json").read_text())
    assert record["config"] == result.config.to_dict()
    assert record["layer_alignments"][0]["alignment"] == result.layer_alignment
    assert record["parents"][0]["sha256"] == result.parents[0]["sha256"]
    loaded = load_pretrained(folder)
    assert max_rel_error(loaded(x), result.model(x)) == 0.0
    assert FusionConfig.from_dict(record["config"]) == result.config


def test_existing_non_empty_target_is_refused_unless_overwrite(pair, tmp_path):
    result = fuse(pair, torch.randn(64, 8), CONFIG)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(SaveError, match="already exists and is not empty. Pass overwrite=True"):
        result.save_pretrained(target)
    assert (target / "keep.txt").exists()
    result.save_pretrained(target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left behind


def test_a_failing_save_leaves_nothing_at_the_target(pair, tmp_path, monkeypatch):
    result = fuse(pair, torch.randn(64, 8), CONFIG)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("hf_clafusion.result.FusionResult.plot_alignment", boom)
    with pytest.raises(OSError, match="disk full"):
        result.save_pretrained(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_killed_save_leaves_no_folder_at_the_target(tmp_path):
    """Kill the process between files: the target path must not exist."""
    script = f"""
import time, torch, hf_clafusion.hub as hub
from hf_clafusion import fuse, FusionConfig
from tests._models import mlp
r = fuse([mlp(8, [16, 16], 3), mlp(8, [16], 3, seed=1)], torch.randn(32, 8), FusionConfig(progress=False))
original = hub.fusion_record
def slow(result):
    print("writing", flush=True)
    time.sleep(60)
    return original(result)
hub.fusion_record = slow
r.save_pretrained({str(tmp_path / "out")!r})
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "out").exists()


def test_fuse_pretrained_from_folders_records_paths(pair, tmp_path):
    save_model(pair[0], tmp_path / "deep")
    save_model(pair[1], tmp_path / "shallow")
    result = fuse_pretrained([tmp_path / "deep", str(tmp_path / "shallow")], torch.randn(64, 8), CONFIG)
    reference = fuse(pair, torch.randn(64, 8), CONFIG)
    assert result.layer_alignment == reference.layer_alignment
    assert result.parents[0]["name_or_path"] == str(tmp_path / "deep")


def test_fuse_pretrained_fails_fast_for_a_hub_id_without_network():
    start = time.perf_counter()
    with pytest.raises(ClaFusionError, match="Could not get 'someone/some-model'.*pass the local folder path"):
        fuse_pretrained(["someone/some-model", mlp(8, [4], 3)], torch.randn(8, 8))
    assert time.perf_counter() - start < 15


def test_fuse_pretrained_rejects_missing_paths_and_other_families(tmp_path):
    with pytest.raises(SaveError, match="neither an existing folder nor a valid Hub id"):
        fuse_pretrained(["./no/such/dir/", mlp(8, [4], 3)], torch.randn(8, 8))
    (tmp_path / "config.json").write_text(json.dumps({"something": "else"}))
    with pytest.raises(SaveError, match="not saved by hf_clafusion"):
        fuse_pretrained([tmp_path, mlp(8, [4], 3)], torch.randn(8, 8))


def test_a_split_with_a_transform_is_calibrated_through_its_transform(pair):
    from datasets import Dataset

    x = torch.randn(64, 8)
    split = Dataset.from_dict({"raw": x.tolist(), "label": [0] * 64})
    split.set_transform(lambda b: {"pixel_values": [torch.tensor(v) * 2.0 for v in b["raw"]], "label": b["label"]})
    via_transform = fuse(pair, split, CONFIG).model.state_dict()
    direct = fuse(pair, x * 2.0, CONFIG).model.state_dict()
    assert all(torch.allclose(via_transform[k], direct[k], atol=1e-5) for k in direct)


# ------------------------------------------------------------------------------------------------- labelled data
# evaluate and finetune read labelled data through one layer (hf_clafusion.data); every form gives the same batches.

N = 16


def _family(name: str):
    """A tiny model of ``name`` and labelled inputs for it: ``(model factory, main input key, inputs, labels)``."""
    import transformers

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (N,), generator=g)
    if name == "mlp":
        return (lambda: mlp(8, [16], 3)), "x", torch.randn(N, 8, generator=g), y
    if name == "vit":
        config = transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=16,
            patch_size=4, num_labels=3,
        )  # fmt: skip

        def vit():
            torch.manual_seed(0)
            return transformers.ViTForImageClassification(config)

        return vit, "pixel_values", torch.randn(N, 3, 16, 16, generator=g), y
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, num_labels=3,
    )  # fmt: skip

    def bert():
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification(config)

    return bert, "input_ids", torch.randint(3, 50, (N, 12), generator=g), y


def _forms(key: str, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Every labelled form of docs/data.md holding the same samples (text gets an explicit all-ones mask)."""
    from datasets import Dataset

    inputs = {key: x, "attention_mask": torch.ones_like(x)} if key == "input_ids" else {key: x}
    rows = [{**{k: v[i] for k, v in inputs.items()}, "labels": y[i]} for i in range(N)]
    columns = {k: v.tolist() for k, v in inputs.items()}
    return {
        "tensor pair": (x, y),
        "labels as a list": (x, y.tolist()),
        "(dict, labels)": (inputs, y),
        "DataLoader of pairs": DataLoader(TensorDataset(x, y), batch_size=8),
        "DataLoader of dicts with a labels key": DataLoader(rows, batch_size=8),
        "datasets split": Dataset.from_dict({**columns, "label": y.tolist()}),
    }


@pytest.mark.parametrize("family", ["mlp", "vit", "bert"])
def test_every_labelled_form_gives_the_same_evaluation(family):
    from hf_clafusion import evaluate

    make, key, x, y = _family(family)
    model = make()
    reference = evaluate(model, (x, y))[0]
    assert reference.num_samples == N
    for form, data in _forms(key, x, y).items():
        row = evaluate(model, data)[0]
        assert row.num_samples == N, form
        assert row.accuracy == reference.accuracy, form
        assert row.loss == pytest.approx(reference.loss, rel=1e-5), form


@pytest.mark.parametrize("family", ["mlp", "vit", "bert"])
def test_every_labelled_form_trains_and_in_memory_forms_train_identically(family):
    from hf_clafusion import FinetuneConfig, finetune

    make, key, x, y = _family(family)
    config = FinetuneConfig(epochs=1, lr=0.05, batch_size=8, progress=False)
    reference = finetune(make(), (x, y), (x, y), config).history
    assert reference[0]["eval_samples"] == N
    for form, data in _forms(key, x, y).items():
        history = finetune(make(), data, data, config).history
        assert len(history) == 1 and history[0]["eval_samples"] == N, form
        assert torch.isfinite(torch.tensor(history[0]["train_loss"])), form
        if not form.startswith("DataLoader"):  # the same samples in the same seeded order as the tensor pair
            assert history[0]["train_loss"] == pytest.approx(reference[0]["train_loss"], rel=1e-4), form
            assert history[0]["eval_loss"] == pytest.approx(reference[0]["eval_loss"], rel=1e-4), form


def test_a_fresh_adapter_reads_the_main_input_from_the_model():
    make, _, x, _ = _family("vit")
    vit = make()
    args, kwargs = get_adapter(vit).model_inputs(vit, x)
    assert args == () and kwargs["pixel_values"] is x


def test_plain_input_ids_get_an_all_ones_attention_mask():
    make, _, ids, _ = _family("bert")
    bert = make()
    _, kwargs = get_adapter(bert).model_inputs(bert, ids)
    assert torch.equal(kwargs["attention_mask"], torch.ones_like(ids))
    padded = {"input_ids": ids, "attention_mask": torch.zeros_like(ids)}
    assert get_adapter(bert).model_inputs(bert, padded)[1]["attention_mask"] is padded["attention_mask"]


def test_a_list_of_per_sample_vectors_is_stacked_for_fusion(pair):
    x = torch.randn(64, 8)
    reference = fuse(pair, x, CONFIG).model.state_dict()
    state = fuse(pair, list(x), CONFIG).model.state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_labelled_forms_are_calibration_data_without_their_labels(pair):
    x = torch.randn(64, 8)
    reference = fuse(pair, x, CONFIG).model.state_dict()
    for data in (
        (x, torch.randint(0, 3, (64,))),
        (x, [1] * 64),
        {"x": x, "labels": torch.zeros(64, dtype=torch.long)},
        DataLoader(TensorDataset(x), batch_size=16),  # 1-tuples of inputs
    ):
        state = fuse(pair, data, CONFIG).model.state_dict()
        assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_finetune_writes_nothing_onto_the_users_dataset():
    from hf_clafusion import FinetuneConfig, finetune

    x, y = torch.randn(N, 8), torch.randint(0, 3, (N,))
    dataset = TensorDataset(x, y)
    before = dict(vars(dataset))
    finetune(mlp(8, [4], 3), dataset, config=FinetuneConfig(epochs=1, batch_size=8, progress=False))
    assert vars(dataset).keys() == before.keys()


def _refusal(call) -> str:
    from hf_clafusion import DataError

    with pytest.raises(DataError) as info:
        call()
    return str(info.value)


def test_refusals_of_labelled_data_show_the_value_and_the_fix():
    from hf_clafusion import FinetuneConfig, evaluate, finetune

    model = mlp(8, [4], 3)
    x, y = torch.randn(N, 8), torch.randint(0, 3, (N,))
    config = FinetuneConfig(epochs=1, batch_size=8, progress=False)
    cases = {
        lambda: evaluate(model, (x.double(), y)): r"evaluation inputs are float64 \(Tensor of shape \(16, 8\) and "
        r"dtype float64\).*Call `\.float\(\)`",
        lambda: finetune(model, (x.double(), y), config=config): r"training inputs are float64.*`\.float\(\)`",
        lambda: evaluate(model, x): r"evaluation data needs labels, got only inputs \(Tensor of shape \(16, 8\).*"
        r"Pass \(inputs, labels\)",
        lambda: evaluate(model, (x, y[:15])): r"16 inputs but 15 labels",
        # integer (N, C) labels could be token labels: refused where the model's logits show they are not
        lambda: evaluate(model, (x, torch.nn.functional.one_hot(y, 3))): r"labels are per token \(\(16, 3\)\) but "
        r"the model's logits are shaped \(16, 3\).*One-hot class labels\? Pass labels\.argmax\(-1\)",
        lambda: evaluate(model, (x, torch.nn.functional.one_hot(y, 3).float())): r"shaped \(N,\) .*got shape "
        r"\(16, 3\) of float32.*labels\.argmax\(-1\)",
        lambda: evaluate(model, DataLoader([{"x": x[i]} for i in range(N)], batch_size=8)): r"no label column "
        r"'label' \(columns: \['x'\]\).*label_column=",
        lambda: finetune(model, ([torch.randn(8), torch.randn(7)], [0, 1]), config=config): r"list of 2 tensors of "
        r"different shapes \[\(7,\), \(8,\)\].*Pass one tensor",
        lambda: finetune(model, 42, config=config): r"Unsupported training data of type int \(int 42\).*docs/data.md",
        lambda: evaluate(model, (x, torch.full((N,), 5))): r"evaluation labels lie in \[5, 5\] but the model has 3",
    }
    for call, pattern in cases.items():
        message = _refusal(call)
        assert re.search(pattern, message), message
        assert "calibration" not in message, message


def test_float64_calibration_data_is_refused_with_the_fix(pair):
    from hf_clafusion import CalibrationDataError

    with pytest.raises(CalibrationDataError, match=r"calibration inputs are float64 .*dtype float64.*`\.float\(\)`"):
        fuse(pair, torch.randn(64, 8, dtype=torch.float64), CONFIG)


def test_raw_images_with_a_processor_evaluate_as_their_processed_tensors():
    import transformers
    from PIL import Image

    from hf_clafusion import evaluate

    make, _, _, y = _family("vit")
    vit = make()
    g = torch.Generator().manual_seed(1)
    images = [Image.fromarray(torch.randint(0, 255, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()) for _ in y]
    processor = transformers.ViTImageProcessor(size={"height": 16, "width": 16})
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    raw = evaluate(vit, (images, y.tolist()), processor=processor)[0]
    processed = evaluate(vit, (pixels, y))[0]
    assert raw.num_samples == N and raw.accuracy == processed.accuracy
    assert raw.loss == pytest.approx(processed.loss, rel=1e-6)
