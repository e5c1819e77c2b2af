"""Recipe: train two timm image classifiers of different depth, fuse them with CLAFusion, finetune the result.

The parents are built with ``timm.create_model`` (e.g. a ResNet-34-shaped and a ResNet-18-shaped network,
``layers=[3, 4, 6, 3]`` vs ``[2, 2, 2, 2]``), images are preprocessed with timm's own data config through the
dataset's transform, and the fused model is an ordinary timm model of the deeper parent's depth. Runs unchanged
on one CPU, several CPU processes, or GPUs:

    python recipes/fuse_timm_image_classification.py --config recipes/configs/timm_resnet_digits.yaml
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \
        recipes/fuse_timm_image_classification.py --config recipes/configs/timm_resnet_digits.yaml

The table compares each parent, their ensemble, the fused model before and after finetuning, and each parent
finetuned for the same number of extra epochs (the fair baseline). Uses only hf_clafusion's public API.
"""

from __future__ import annotations

import argparse
import copy
import gzip
from pathlib import Path

import numpy as np
import timm
import torch
import yaml
from accelerate import PartialState
from datasets import ClassLabel, Dataset, Image, load_dataset, load_from_disk
from PIL import Image as PILImage
from timm.data import create_transform, resolve_data_config

from hf_clafusion import FinetuneConfig, FusionConfig, evaluate, finetune, fuse


def _images(array: np.ndarray) -> list[PILImage.Image]:
    return [PILImage.fromarray(a).convert("RGB") for a in array]


def get_datasets(config: dict) -> tuple[Dataset, Dataset, Dataset]:
    """Train / validation / test splits with an ``image`` (PIL) and a ``label`` column."""
    source, seed = config["dataset"], config.get("seed", 0)
    if source == "digits":
        from sklearn.datasets import load_digits

        data = load_digits()
        pixels = (data.images * (255.0 / 16.0)).round().astype(np.uint8)
        full = Dataset.from_dict({"image": _images(pixels), "label": data.target.tolist()}).shuffle(seed=seed)
        test = full.select(range(1500, len(full)))
        rest = full.select(range(1500)).train_test_split(test_size=300, seed=seed)
        train, val = rest["train"], rest["test"]
    elif source == "fashion-mnist":
        folder = Path(config.get("data_dir", "/usr/share/datasets/fashion-mnist"))

        def read(prefix: str, limit: int | None) -> Dataset:
            def idx(name: str) -> np.ndarray:
                raw = gzip.open(next(folder.glob(f"{prefix}-{name}*"))).read()
                dims = raw[3]
                shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
                return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)

            images, labels = idx("images-idx3-ubyte")[:limit], idx("labels-idx1-ubyte")[:limit]
            return Dataset.from_dict({"image": _images(images), "label": labels.astype(np.int64).tolist()})

        rest = read("train", config.get("num_train", 10000) + 2000).shuffle(seed=seed)
        split = rest.train_test_split(test_size=2000, seed=seed)
        train, val, test = split["train"], split["test"], read("t10k", config.get("num_test"))
    else:  # a folder saved with save_to_disk, local files, or a Hub id such as "uoft-cs/cifar10"
        loaded = load_from_disk(source) if Path(source, "dataset_dict.json").is_file() else load_dataset(source)
        image, label = config.get("image_column", "image"), config.get("label_column", "label")
        loaded = loaded.rename_columns({k: v for k, v in ((image, "image"), (label, "label")) if k != v})
        test = loaded["test"]
        if "validation" in loaded:
            train, val = loaded["train"], loaded["validation"]
        else:
            split = loaded["train"].train_test_split(test_size=config.get("num_validation", 5000), seed=seed)
            train, val = split["train"], split["test"]
    if "max_train" in config:
        train = train.select(range(min(config["max_train"], len(train))))
    if "num_test" in config:
        test = test.select(range(min(config["num_test"], len(test))))
    return train, val, test


def with_timm_transform(split: Dataset, model: torch.nn.Module, overrides: dict) -> Dataset:
    """The split with the model's timm eval preprocessing applied through the dataset's transform."""
    transform = create_transform(**resolve_data_config(overrides, model=model), is_training=False)

    def apply(batch):
        pixels = torch.stack([transform(image.convert("RGB")) for image in batch["image"]])
        return {"pixel_values": pixels, "label": torch.tensor(batch["label"])}

    out = split.select_columns(["image", "label"])
    if not isinstance(out.features["image"], Image):
        out = out.cast_column("image", Image())
    out.set_transform(apply)
    return out


def training_function(config: dict, args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(config.get("seed", 0))
    train_raw, val_raw, test_raw = get_datasets(config)
    feature = train_raw.features["label"]
    num_classes = feature.num_classes if isinstance(feature, ClassLabel) else int(max(train_raw["label"])) + 1

    def build(spec: dict) -> torch.nn.Module:
        return timm.create_model(
            spec["model"], pretrained=spec.get("pretrained", False), num_classes=num_classes, **spec.get("kwargs", {})
        )

    deep, shallow = build(config["deep"]), build(config["shallow"])
    data_config = {"input_size": tuple(config.get("input_size", (3, 32, 32))), "crop_pct": 1.0}
    train, val, test = (with_timm_transform(s, deep, data_config) for s in (train_raw, val_raw, test_raw))

    parent_cfg = FinetuneConfig.from_dict(
        {"progress": False, "input_column": "pixel_values", **config["parent_training"]}
    )
    tune_cfg = FinetuneConfig.from_dict(
        {"progress": False, "seed": config.get("seed", 0), "input_column": "pixel_values", **config["finetune"]}
    )
    deep = finetune(deep, train, val, parent_cfg.replace(seed=parent_cfg.seed + 1)).model
    shallow = finetune(shallow, train, val, parent_cfg.replace(seed=parent_cfg.seed + 2)).model

    # Fusion is deterministic: every process computes the same fused model from the same calibration samples.
    fusion_config = FusionConfig.from_dict({"progress": False, **config.get("fusion", {})})
    result = fuse([deep, shallow], train, fusion_config)  # the transform gives pixel_values; labels are ignored
    before = copy.deepcopy(result.model)
    tuned = finetune(result.model, train, val, tune_cfg)
    result.record_finetune(tuned)

    models = {"deep parent": deep, "shallow parent": shallow}
    rows = evaluate(list(models.values()), test, names=list(models))
    rows += evaluate([before, result.model], test, names=["CLAFusion", "CLAFusion + finetune"], ensemble=False)
    if config.get("baselines", True):
        extra = [finetune(copy.deepcopy(m), train, val, tune_cfg).model for m in models.values()]
        rows += evaluate(extra, test, names=[f"{n} + same finetune" for n in models], ensemble=False)
    if config.get("distill", False):
        student = finetune(copy.deepcopy(shallow), train, val, tune_cfg, teacher=[deep, shallow]).model
        rows += evaluate([student], test, names=["shallow parent + distillation"], ensemble=False)
    result.record_evaluation(rows, dataset=config["dataset"], fused="CLAFusion + finetune")
    if PartialState().is_main_process:  # only now: finetune's Accelerator has set the process state up
        print(result.summary())
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
        config.update(max_train=64, num_test=64)
        for key in ("parent_training", "finetune"):
            config[key] = {**config[key], "epochs": 1, "max_steps": 2}
        config["fusion"] = {**config.get("fusion", {}), "num_samples": 32}
    training_function(config, args)


if __name__ == "__main__":
    main()
