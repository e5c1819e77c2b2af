"""Each recipe runs end to end for a few steps, as `python` and as `accelerate launch` (2 CPU processes)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ._models import cpu_launch_command


ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "digits-mlp": ("fuse_and_finetune.py", "digits_mlp.yaml", ("distillation",)),
    "timm-resnet": ("fuse_timm_image_classification.py", "timm_resnet_digits.yaml", ("distillation",)),
    "transformers-minilm": ("fuse_transformers_text_classification.py", "minilm_docstrings.yaml", ()),
    "transformers-causal-lm": ("fuse_causal_lm.py", "docstrings_lm.yaml", ()),
}


def _env():
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _paths(name):
    script, config, extra_rows = RECIPES[name]
    return ROOT / "recipes" / script, ROOT / "recipes" / "configs" / config, extra_rows


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_runs_with_python(name, tmp_path):
    script, config, extra_rows = _paths(name)
    done = subprocess.run(
        [sys.executable, str(script), "--config", str(config), "--smoke", "--output", str(tmp_path / "out")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for row in ("deep parent", "CLAFusion + finetune", "shallow parent + same finetune", *extra_rows):
        assert row in done.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert "## Finetuning" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU processes")
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_runs_with_accelerate_launch_on_two_processes(name, tmp_path):
    script, config, _ = _paths(name)
    port = 29519 + sorted(RECIPES).index(name)
    command = cpu_launch_command(
        str(script), "--config", str(config), "--smoke", "--output", str(tmp_path / "out"), port=port
    )
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("CLAFusion + finetune") == 1  # the table is printed by the main process only
    assert (tmp_path / "out" / "fusion_config.json").is_file()
