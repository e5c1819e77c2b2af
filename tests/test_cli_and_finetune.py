import re
import subprocess
import sys

import pytest
import torch

from hf_clafusion import DataError, FinetuneConfig, finetune
from hf_clafusion.cli import main

from ._models import mlp


def test_help_lists_the_subcommands_and_version_prints_the_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "hf-clafusion demo" in capsys.readouterr().out
    out = subprocess.run([sys.executable, "-m", "hf_clafusion", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("hf-clafusion ")


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--dataset", "imagenet"])
    assert info.value.code == 2
    assert "invalid choice: 'imagenet'" in capsys.readouterr().err


def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--quick", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for row in ("deep parent", "shallow parent", "ensemble", "CLAFusion + finetune", "chain mapping"):
        assert row in out
    for name in ("mlp", "cnn"):
        assert re.search(
            rf"^{name}: one-shot CLAFusion is \d+\.\d\d points (above|below) the chain-mapping", out, re.M
        )
        assert (tmp_path / name / "model.safetensors").exists()
        assert (tmp_path / name / "alignment.png").exists()


def test_missing_dataset_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("hf_clafusion.demo.find_fashion_mnist", lambda: None)
    assert main(["demo", "--dataset", "fashion-mnist", "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-clafusion: error: Fashion-MNIST is not installed") and "\n" not in err


def test_finetune_lowers_the_training_loss():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    model = mlp(8, [16], 3)
    result = finetune(model, (x, y), (x, y), FinetuneConfig(epochs=4, lr=0.05, batch_size=32, progress=False))
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.8 * losses[0]
    assert result.history[-1]["eval_accuracy"] > 0.6


def test_finetune_rejects_bad_data():
    with pytest.raises(DataError, match="training data is empty"):
        finetune(
            mlp(8, [4], 3),
            (torch.empty(0, 8), torch.empty(0, dtype=torch.long)),
            config=FinetuneConfig(progress=False),
        )
    with pytest.raises(DataError, match="Unsupported training data of type str"):
        finetune(mlp(8, [4], 3), "data.csv")
