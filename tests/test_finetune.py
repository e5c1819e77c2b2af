"""finetune: the Accelerate loop, exact resume, distillation, bad input, and two CPU processes (gloo)."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from hf_clafusion import ConfigError, DataError, FinetuneConfig, finetune
from hf_clafusion.finetune import distillation_loss

from ._models import cpu_launch_command, mlp


hf_finetune = importlib.import_module("hf_clafusion.finetune")  # the module (the package exports the function)


def _data(n=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


# a constant rate: these tests train tiny models from scratch in a few steps, which the default cosine decay slows
CONFIG = FinetuneConfig(epochs=3, lr=0.05, batch_size=32, scheduler="none", progress=False)


def test_distillation_loss_matches_its_formula():
    student = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    teacher = torch.tensor([[1.0, 1.5, -0.5], [2.0, -1.0, 0.0]])
    labels = torch.tensor([0, 2])
    t, alpha = 4.0, 0.3
    p = (teacher / t).softmax(-1)
    q = (student / t).softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()  # KL(p_teacher || p_student), averaged over the batch
    expected = alpha * t * t * kl + (1 - alpha) * F.cross_entropy(student, labels)
    assert float(distillation_loss(student, teacher, labels, alpha=alpha, temperature=t)) == pytest.approx(
        float(expected)
    )
    ensemble = distillation_loss(student, [teacher, teacher * 0], labels, alpha=1.0, temperature=t)
    p2 = ((teacher / t).softmax(-1) + (teacher * 0 / t).softmax(-1)) / 2
    assert float(ensemble) == pytest.approx(float(t * t * (p2 * (p2.log() - q.log())).sum(-1).mean()), rel=1e-5)


def test_the_official_distillation_scaling_divides_by_the_classes_and_averages_teacher_logits():
    student = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    teachers = [torch.tensor([[1.0, 1.5, -0.5], [2.0, -1.0, 0.0]]), torch.tensor([[0.0, 3.0, 1.0], [-1.0, 0.5, 2.0]])]
    labels = torch.tensor([0, 2])
    t, alpha = 20.0, 0.5
    p = ((teachers[0] + teachers[1]) / 2 / t).softmax(-1)  # the mean of the logits, then the softmax
    q = (student / t).softmax(-1)
    kl = (p * (p.log() - q.log())).sum() / p.numel()  # nn.KLDivLoss(reduction="mean"): over batch AND classes
    expected = alpha * t * t * kl + (1 - alpha) * F.cross_entropy(student, labels)
    got = distillation_loss(student, teachers, labels, alpha=alpha, temperature=t, scaling="official")
    assert float(got) == pytest.approx(float(expected))
    assert FinetuneConfig.official_distillation().distill_scaling == "official"
    assert FinetuneConfig.official_distillation().distill_temperature == 20.0


def test_distillation_with_the_default_config_does_not_destroy_a_trained_model():
    x, y = _data(384)
    teacher = mlp(8, [32], 3, seed=1)
    finetune(teacher, (x, y), config=CONFIG.replace(epochs=10))
    student = mlp(8, [16, 16], 3, seed=2)
    finetune(student, (x, y), config=CONFIG.replace(epochs=10))
    tx, ty = _data(256, seed=5)
    before = float((student(tx).argmax(-1) == ty).float().mean())
    out = finetune(student, (x, y), (tx, ty), FinetuneConfig(epochs=2, batch_size=32, progress=False), teacher=teacher)
    assert out.initial_evaluation["eval_accuracy"] == pytest.approx(before)
    assert out.history[-1]["eval_accuracy"] > before - 0.05  # the default T = 2 trains stably with SGD lr 0.01


def test_a_non_finite_loss_stops_training_with_a_clear_error():
    from hf_clafusion import TrainingDivergedError

    x, y = _data()
    with pytest.raises(
        TrainingDivergedError, match=r"non-finite .* at optimiser step \d+, epoch 1.*Lower `lr` \(1e\+12\)"
    ):
        finetune(mlp(8, [16], 3), (x, y), config=CONFIG.replace(lr=1e12, momentum=0.0, weight_decay=0.0))
    finetune(mlp(8, [16], 3), (x, y), config=CONFIG)  # the guard stays silent on a normal run


def test_an_accuracy_collapse_after_an_epoch_is_warned_about():
    from hf_clafusion import ClaFusionWarning

    x, y = _data(384)
    model = mlp(8, [32], 3, seed=1)
    finetune(model, (x, y), config=CONFIG.replace(epochs=10))
    tx, ty = _data(256, seed=5)
    flipped = (y + 1) % 3  # training on wrong labels destroys the accuracy on the right ones
    with pytest.warns(ClaFusionWarning, match=r"Evaluation accuracy fell from 0\.\d+ .* after epoch \d.*Lower `lr`"):
        finetune(model, (x, flipped), (tx, ty), config=CONFIG.replace(epochs=3))


def _accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def test_keep_best_ends_with_the_weights_of_the_best_evaluation_the_start_included():
    x, y = _data(384)
    tx, ty = _data(256, seed=5)
    trained = mlp(8, [32], 3, seed=1)
    finetune(trained, (x, y), config=CONFIG.replace(epochs=10))
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    flipped = (y + 1) % 3  # every epoch on wrong labels is worse than the start
    config = CONFIG.replace(epochs=3, keep_best=True)
    with pytest.warns(Warning):  # the collapse warning still fires: it reports what training did
        out = finetune(trained, (x, flipped), (tx, ty), config)
    assert (
        out.kept_epoch == 0 and max(r["eval_accuracy"] for r in out.history) < out.initial_evaluation["eval_accuracy"]
    )
    assert all(torch.equal(v, before[k]) for k, v in out.model.state_dict().items())
    assert _accuracy(out.model, tx, ty) == pytest.approx(out.initial_evaluation["eval_accuracy"])

    model = mlp(8, [32], 3, seed=1)
    model.load_state_dict(before)
    with pytest.warns(Warning):
        plain = finetune(model, (x, flipped), (tx, ty), config.replace(keep_best=False))
    assert plain.kept_epoch == 3 and not torch.equal(plain.model.state_dict()["0.weight"], before["0.weight"])


@pytest.mark.parametrize("seed", [0, 1])
def test_keep_best_keeps_the_earliest_epoch_with_the_highest_evaluation_accuracy(seed):
    x, y = _data(384, seed=seed)
    noisy = torch.where(torch.rand(len(y), generator=torch.Generator().manual_seed(seed)) < 0.3, (y + 1) % 3, y)
    tx, ty = _data(128, seed=7)
    config = CONFIG.replace(epochs=5, lr=0.3, keep_best=True)
    out = finetune(mlp(8, [16], 3, seed=seed), (x, noisy), (tx, ty), config)
    accuracies = [out.initial_evaluation["eval_accuracy"]] + [r["eval_accuracy"] for r in out.history]
    assert out.kept_epoch == accuracies.index(max(accuracies))
    assert _accuracy(out.model, tx, ty) == pytest.approx(max(accuracies))


def test_keep_best_survives_a_resume_its_best_epoch_lies_before_the_interruption(tmp_path, monkeypatch):
    # epoch 1 trains on the right labels (the best evaluation), later epochs on wrong ones; the run dies in epoch 3
    x, y = _data(384)
    tx, ty = _data(256, seed=5)
    flipped = (y + 1) % 3
    labels = {"epoch": 0}

    class Schedule(torch.utils.data.Dataset):  # the labels change with the epoch: right first, then wrong
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return x[i], (y if labels["epoch"] == 0 else flipped)[i]

    config = CONFIG.replace(epochs=3, lr=0.1, keep_best=True, checkpoint_dir=str(tmp_path / "ckpt"))
    original = hf_finetune._evaluate

    def evaluate_then_switch(run, cfg):
        out = original(run, cfg)
        labels["epoch"] += 1  # the first call is the start's evaluation; labels go wrong after epoch 1
        return out

    monkeypatch.setattr(hf_finetune, "_evaluate", evaluate_then_switch)
    labels["epoch"] = -1
    full = finetune(mlp(8, [16], 3, seed=2), Schedule(), (tx, ty), config.replace(checkpoint_dir=None))
    assert full.kept_epoch == 1

    labels["epoch"] = -1
    original_step, calls = torch.optim.SGD.step, []

    def crash_in_epoch_three(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2 * 12 + 3:  # 12 steps an epoch: dies in epoch 3, after the checkpoint of epoch 2
            raise KeyboardInterrupt
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", crash_in_epoch_three)
    with pytest.raises(KeyboardInterrupt):
        finetune(mlp(8, [16], 3, seed=2), Schedule(), (tx, ty), config)
    monkeypatch.setattr(torch.optim.SGD, "step", original_step)
    latest = max((tmp_path / "ckpt").glob("checkpoint-*"))
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["epoch"] == 2 and state["best"]["epoch"] == 1 and (latest / "best_model.safetensors").is_file()
    assert state["initial_evaluation"] == full.initial_evaluation

    labels["epoch"] = 2  # wrong labels in the resumed epoch 3, as in the full run
    resumed = finetune(mlp(8, [16], 3, seed=7), Schedule(), (tx, ty), config.replace(resume_from="latest"))
    assert resumed.kept_epoch == 1 and resumed.initial_evaluation == full.initial_evaluation
    for key, value in full.model.state_dict().items():
        assert torch.allclose(resumed.model.state_dict()[key], value, atol=1e-6), key
    assert _accuracy(resumed.model, tx, ty) == pytest.approx(state["best"]["eval_accuracy"])


def test_keep_best_needs_an_evaluation_split():
    with pytest.raises(ConfigError, match=r"keep_best=True .* no eval_dataset was given.*--eval-split"):
        finetune(mlp(8, [16], 3), _data(), config=CONFIG.replace(keep_best=True))


def test_a_few_steps_lower_the_training_loss():
    result = finetune(mlp(8, [16], 3), _data(), _data(64, seed=1), CONFIG.replace(epochs=6, lr=0.1))
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.8 * losses[0]
    assert result.history[-1]["eval_samples"] == 64


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path, monkeypatch):
    config = CONFIG.replace(
        checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_steps=2, optimizer="adam", lr=0.01, scheduler="cosine"
    )
    full = finetune(mlp(8, [16], 3), _data(), config=config.replace(checkpoint_dir=str(tmp_path / "other"))).model

    original_step, calls = torch.optim.Adam.step, []

    def crash_after_nine(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 9:  # the process dies in the middle of epoch 2, after the checkpoint of step 8
            raise KeyboardInterrupt
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", crash_after_nine)
    with pytest.raises(KeyboardInterrupt):
        finetune(mlp(8, [16], 3), _data(), config=config)
    monkeypatch.setattr(torch.optim.Adam, "step", original_step)
    latest = json.loads(max((tmp_path / "ckpt").glob("checkpoint-*")).joinpath("trainer_state.json").read_text())
    assert latest["global_step"] == 8 and latest["epoch"] == 1 and latest["batch_in_epoch"] == 2

    resumed = finetune(mlp(8, [16], 3, seed=5), _data(), config=config.replace(resume_from="latest")).model
    for key, value in full.state_dict().items():
        assert torch.allclose(resumed.state_dict()[key], value, atol=1e-6), key
    final = json.loads(max((tmp_path / "ckpt").glob("checkpoint-*")).joinpath("trainer_state.json").read_text())
    assert final["global_step"] == 18 and final["epoch"] == 3 and len(final["history"]) == 3


def test_gradient_accumulation_equals_a_larger_batch():
    x, y = _data(128)
    big = finetune(
        mlp(8, [16], 3),
        (x, y),
        config=CONFIG.replace(epochs=1, batch_size=32, optimizer="sgd", momentum=0.0, weight_decay=0.0),
    )
    small = finetune(
        mlp(8, [16], 3),
        (x, y),
        config=CONFIG.replace(
            epochs=1, batch_size=16, optimizer="sgd", momentum=0.0, weight_decay=0.0, gradient_accumulation_steps=2
        ),
    )
    # same shuffled order: each optimiser step sees the same 32 samples
    assert big.history[0]["step"] == small.history[0]["step"] == 4


def test_distilling_from_an_ensemble_of_parents_trains():
    teachers = [finetune(mlp(8, [16], 3, seed=s), _data(), config=CONFIG).model for s in (1, 2)]
    student = finetune(
        mlp(8, [4], 3, seed=3),
        _data(),
        _data(64, 1),
        CONFIG.replace(distill_alpha=0.7, distill_temperature=4.0),
        teacher=teachers,
    )
    assert student.history[-1]["eval_accuracy"] > 0.5


def test_a_datasets_split_with_a_transform():
    from datasets import Dataset

    x, y = _data()
    split = Dataset.from_dict({"features": x.tolist(), "label": y.tolist()})
    split.set_transform(lambda b: {"x": torch.tensor(b["features"]) * 2.0, "label": b["label"]})
    result = finetune(mlp(8, [16], 3), split, config=CONFIG.replace(input_column="x"))
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_bad_input_is_refused_clearly():
    from datasets import Dataset

    x, y = _data(32)
    with pytest.raises(DataError, match="no label column 'label'.*columns: \\['x', 'z'\\].*label_column="):
        finetune(mlp(8, [4], 3), Dataset.from_dict({"x": x.tolist(), "z": y.tolist()}), config=CONFIG)
    with pytest.raises(DataError, match=r"training labels lie in \[0, 7\] but the model has 3 outputs"):
        finetune(mlp(8, [4], 3), (x, torch.full((32,), 7)), config=CONFIG)
    with pytest.raises(DataError, match="training data is empty"):
        finetune(mlp(8, [4], 3), Dataset.from_dict({"x": [], "label": []}), config=CONFIG)
    with pytest.raises(ConfigError, match="`optimizer`: 'lion'"):
        FinetuneConfig.from_dict({"optimizer": "lion"})
    with pytest.raises(ConfigError, match="needs `checkpoint_dir`"):
        FinetuneConfig(resume_from="latest")


SCRIPT = Path(__file__).with_name("_ddp_worker.py")


@pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU processes")
def test_two_cpu_processes_stay_in_sync(tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 with ACCELERATE_USE_CPU=1 runs two gloo processes."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPT.parents[1])}
    command = cpu_launch_command(str(SCRIPT), str(tmp_path), port=29517)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    assert reports[0]["weights"] == reports[1]["weights"]  # gradients were synchronised
    assert reports[0]["eval_samples"] == reports[1]["eval_samples"] == 101  # gathered once, no duplicates
    assert reports[0]["steps"] == 4  # 192 samples / (2 processes x 24) per step
    # keep_best: every process keeps the same epoch (the gathered accuracy), here the start, with its weights
    assert reports[0]["kept_epoch"] == reports[1]["kept_epoch"] == 0
    assert reports[0]["kept_weights"] == reports[1]["kept_weights"] == reports[0]["start_weights"]
    # a causal LM on token labels: in sync, and its gathered evaluation is one process's evaluate() of the same model
    assert reports[0]["lm_weights"] == reports[1]["lm_weights"]
    assert reports[0]["lm_eval"] == reports[1]["lm_eval"]
    lm_eval, single = reports[0]["lm_eval"], reports[0]["lm_evaluate"]
    assert lm_eval["eval_samples"] == 37 and lm_eval["eval_tokens"] == single["num_samples"] == 37 * 11
    assert lm_eval["eval_accuracy"] == pytest.approx(single["accuracy"])
    assert lm_eval["eval_loss"] == pytest.approx(single["loss"], rel=1e-5)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU processes")
def test_a_diverging_run_stops_every_process_at_the_same_step(tmp_path):
    """One process's loss becomes NaN: both processes raise TrainingDivergedError at that step (no deadlock)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPT.parents[1])}
    command = cpu_launch_command(str(SCRIPT), str(tmp_path), "diverge", port=29519)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["error"] for r in reports] == ["TrainingDivergedError"] * 2
    assert reports[0]["step"] == reports[1]["step"] == 3  # rank 1 poisoned step 3; rank 0 stopped there too


@pytest.mark.parametrize(
    ("name", "kind"),
    [("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED"), ("multi_node", "MULTI_GPU")],
)
def test_the_documented_accelerate_configs_parse_into_their_distributed_type(name, kind):
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(__file__).resolve().parents[1] / "recipes" / "accelerate_configs" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type.name == kind
    assert config.num_processes == config.num_machines * 8


def test_the_cosine_horizon_counts_scheduler_steps_of_every_process():
    """Accelerate steps a prepared scheduler once per process per optimiser step: max_steps optimiser steps on
    N processes are N * max_steps scheduler steps; epochs are counted in global batches already."""
    from hf_clafusion.finetune import _scheduler

    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    assert _scheduler(optimizer, FinetuneConfig(max_steps=5), 7, num_processes=2).T_max == 10
    assert _scheduler(optimizer, FinetuneConfig(epochs=3), 7, num_processes=2).T_max == 21
    assert _scheduler(optimizer, FinetuneConfig(scheduler="none"), 7) is None
