"""Each recipe runs end to end for a few steps, as `python` and as `accelerate launch` (2 CPU processes)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ._models import cpu_launch_command


ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "fuse_and_finetune.py"
CONFIG = ROOT / "recipes" / "configs" / "digits_mlp.yaml"


def _env():
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_recipe_runs_with_python(tmp_path):
    done = subprocess.run(
        [sys.executable, str(RECIPE), "--config", str(CONFIG), "--smoke", "--output", str(tmp_path / "out")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for row in ("deep parent", "CLAFusion + finetune", "shallow parent + same finetune", "distillation"):
        assert row in done.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert "## Finetuning" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU processes")
def test_recipe_runs_with_accelerate_launch_on_two_processes(tmp_path):
    command = cpu_launch_command(
        str(RECIPE), "--config", str(CONFIG), "--smoke", "--output", str(tmp_path / "out"), port=29519
    )
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("CLAFusion + finetune") == 1  # the table is printed by the main process only
    assert (tmp_path / "out" / "fusion_config.json").is_file()
