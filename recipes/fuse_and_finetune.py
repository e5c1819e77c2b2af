"""Recipe: train two classifiers of different depth, fuse them with CLAFusion, finetune the fused model.

Runs unchanged on one CPU, several CPU processes, or GPUs:

    python recipes/fuse_and_finetune.py --config recipes/configs/digits_mlp.yaml
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/fuse_and_finetune.py \
        --config recipes/configs/digits_mlp.yaml

It prints one table: each parent, their prediction ensemble, the fused model before and after finetuning, the
parents finetuned for the same number of extra epochs (the fair baseline), and (optionally) the shallow parent
distilled from both parents. Uses only hf_clafusion's public API; argparse lives here, not in the library.
"""

from __future__ import annotations

import argparse
import copy
import gzip
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import PartialState
from datasets import Dataset, load_dataset, load_from_disk
from torch import nn

from hf_clafusion import FinetuneConfig, FusionConfig, evaluate, finetune, fuse


def get_datasets(config: dict) -> tuple[Dataset, Dataset, Dataset]:
    """Train / validation / test ``datasets`` splits with an ``image`` (C, H, W float) and a ``label`` column."""
    source, seed = config["dataset"], config.get("seed", 0)
    if source == "digits":
        from sklearn.datasets import load_digits

        data = load_digits()
        images, labels = (data.images / 16.0)[:, None].astype(np.float32), data.target
        full = Dataset.from_dict({"image": images, "label": labels}).shuffle(seed=seed)
        test = full.select(range(1500, len(full)))
        rest = full.select(range(1500)).train_test_split(test_size=300, seed=seed)
        train, val = rest["train"], rest["test"]
    elif source == "fashion-mnist":
        folder = Path(config.get("data_dir", "/usr/share/datasets/fashion-mnist"))

        def read(prefix: str) -> Dataset:
            def idx(name: str) -> np.ndarray:
                raw = gzip.open(next(folder.glob(f"{prefix}-{name}*"))).read()
                dims = raw[3]
                shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
                return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)

            x = torch.tensor(idx("images-idx3-ubyte"), dtype=torch.float32)[:, None] / 255.0
            x = nn.functional.avg_pool2d(x, 2)  # 14 x 14: keeps the recipe fast on CPUs
            return Dataset.from_dict({"image": x.numpy(), "label": idx("labels-idx1-ubyte").astype(np.int64)})

        rest = read("train").shuffle(seed=seed).select(range(config.get("num_train", 10000) + 2000))
        split = rest.train_test_split(test_size=2000, seed=seed)
        train, val, test = split["train"], split["test"], read("t10k")
    else:  # a local folder saved with save_to_disk, local data files, or a Hub id when the network allows
        loaded = load_from_disk(source) if Path(source, "dataset_dict.json").is_file() else load_dataset(source)
        train, val, test = loaded["train"], loaded["validation"], loaded["test"]
    if "max_train" in config:
        train = train.select(range(min(config["max_train"], len(train))))
    return tuple(split.with_format("torch") for split in (train, val, test))


def build_model(spec: dict, shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    """``kind: mlp`` with ``hidden: [...]``, or ``kind: cnn`` with ``channels: [16, 'M', 32, 'M']`` (3x3 conv+BN+ReLU)."""
    channels, size, _ = shape
    layers: list[nn.Module] = []
    if spec["kind"] == "mlp":
        layers.append(nn.Flatten())
        width = channels * size * size
        for h in spec["hidden"]:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        return nn.Sequential(*layers)
    for item in spec["channels"]:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            size //= 2
        else:
            layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU()]
            channels = item
    layers += [nn.Flatten(), nn.Linear(channels * size * size, num_classes)]
    return nn.Sequential(*layers)


def training_function(config: dict, args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(config.get("seed", 0))
    train, val, test = get_datasets(config)
    shape = tuple(train[0]["image"].shape)
    test_rows = test[:]
    num_classes = int(max(int(train[:]["label"].max()), int(test_rows["label"].max()))) + 1
    parent_cfg = FinetuneConfig.from_dict(
        {"progress": False, "seed": config.get("seed", 0), "input_column": "image", **config["parent_training"]}
    )
    tune_cfg = FinetuneConfig.from_dict(
        {"progress": False, "seed": config.get("seed", 0), "input_column": "image", **config["finetune"]}
    )
    test_pair = (test_rows["image"], test_rows["label"])

    deep = build_model(config["deep"], shape, num_classes)
    shallow = build_model(config["shallow"], shape, num_classes)
    deep = finetune(deep, train, val, parent_cfg.replace(seed=parent_cfg.seed + 1)).model
    shallow = finetune(shallow, train, val, parent_cfg.replace(seed=parent_cfg.seed + 2)).model

    # Fusion is deterministic: every process computes the same fused model from the same calibration samples.
    fusion_config = FusionConfig.from_dict({"progress": False, **config.get("fusion", {})})
    result = fuse([deep, shallow], train.select_columns(["image"]), fusion_config)
    before = copy.deepcopy(result.model)
    tuned = finetune(result.model, train, val, tune_cfg)
    result.record_finetune(tuned)

    models = {"deep parent": deep, "shallow parent": shallow}
    rows = evaluate(list(models.values()), test_pair, names=list(models))
    rows += evaluate([before, result.model], test_pair, names=["CLAFusion", "CLAFusion + finetune"], ensemble=False)
    if config.get("baselines", True):
        extra = [finetune(copy.deepcopy(m), train, val, tune_cfg).model for m in models.values()]
        rows += evaluate(extra, test_pair, names=[f"{n} + same finetune" for n in models], ensemble=False)
    if config.get("distill", False):
        student = finetune(copy.deepcopy(shallow), train, val, tune_cfg, teacher=[deep, shallow]).model
        rows += evaluate([student], test_pair, names=["shallow parent + distillation"], ensemble=False)
    result.record_evaluation(rows, dataset=config["dataset"], fused="CLAFusion + finetune")
    # Ask for the process state only now: finetune's Accelerator has set it up (a PartialState created first
    # would ignore ACCELERATE_USE_CPU and run every CPU process alone).
    if PartialState().is_main_process:
        print(rows)
        if args.output:
            folder = result.save_pretrained(args.output, overwrite=True, model_name=config.get("name"))
            print(f"saved to {folder}")
    return rows.to_dicts()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe config (see recipes/configs/)")
    parser.add_argument("--output", default=None, help="where to save the fused, finetuned model")
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    parser.add_argument("--seed", type=int, default=None, help="override the config's seed (data split and training)")
    args = parser.parse_args(argv)
    config = yaml.safe_load(Path(args.config).read_text())
    if args.seed is not None:
        config["seed"] = args.seed
    if args.smoke:
        config["max_train"] = 256
        for key in ("parent_training", "finetune"):
            config[key] = {**config[key], "epochs": 1, "max_steps": 3}
        config["fusion"] = {**config.get("fusion", {}), "num_samples": 64}
    training_function(config, args)


if __name__ == "__main__":
    main()
