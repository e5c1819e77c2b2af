"""The ``hf-clafusion`` command line (the only argument parser in the package).

Subcommands: ``fuse``, ``finetune``, ``evaluate``, ``push``, ``inspect``, ``demo``. YAML configs map one-to-one to
:class:`~hf_clafusion.FusionConfig` / :class:`~hf_clafusion.FinetuneConfig` (unknown keys are rejected with the
list of valid ones). Exit codes: 0 success, 2 usage error (bad arguments or configuration), 1 any other
failure (any error, including a missing optional package), reported in one line on stderr (``--debug`` shows the
traceback).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from .errors import CalibrationDataError, ClaFusionError, ClaFusionWarning, ConfigError, LoadError


EPILOG = """examples:
  hf-clafusion demo                                   # digits: MLP and CNN pairs, fused and finetuned
  hf-clafusion fuse ./deep ./shallow --data ./calib.safetensors --output ./fused
  hf-clafusion fuse ./deep ./shallow --data ./my_dataset --split train --config fusion.yaml --output ./fused
  hf-clafusion fuse ./a ./b --data ./calib.safetensors --set solver=sinkhorn --set reg=0.05 --output ./fused
  hf-clafusion finetune ./fused --data ./my_dataset --split train --eval-split validation --output ./fused-ft
  hf-clafusion finetune ./fused --data ./train.safetensors --eval-fraction 0.1 --output ./fused-ft
  hf-clafusion evaluate ./fused-ft ./deep ./shallow --data ./my_dataset --split test
  hf-clafusion inspect ./fused
  hf-clafusion push ./fused me/fused-mlp --private    # token from `hf auth login` or HF_TOKEN
"""


def config_choices_help(config_class: type) -> str:
    """The allowed values of every choice field of ``config_class``, for a subcommand's ``--help``."""
    from .config import describe_choices

    lines = [f"{config_class.__name__} choices (for --set KEY=VALUE and --config):"]
    lines += [f"  {name}: {values}" for name, values in describe_choices(config_class).items()]
    return "\n".join(lines) + "\n\n"


class UsageError(ClaFusionError):
    """A command-line argument cannot be used (exit code 2)."""


@functools.cache
def _yaml_loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        """YAML 1.1's safe loader that also reads ``1e-3`` (no dot) as a float, as YAML 1.2 and Python do."""

    exponent = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", exponent, list("-+0123456789"))
    return Loader


def load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)``, except that ``1e-3`` is the float 0.001 (plain YAML 1.1 gives the string '1e-3')."""
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # a SafeLoader subclass: no arbitrary objects


def _config_dict(path: str | None, assignments: list[str]) -> dict[str, Any]:
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = load_yaml(Path(path).read_text())
        except FileNotFoundError:
            raise UsageError(f"Config file not found: {path!r}.") from None
        except yaml.YAMLError as error:
            raise UsageError(f"Config file {path!r} is not valid YAML: {error}.") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UsageError(f"Config file {path!r} must hold a mapping of fields, got {type(loaded).__name__}.")
        data.update(loaded or {})
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects key=value, got {item!r}.")
        data[key.strip()] = load_yaml(value)
    return data


def _split_keys(tensors: dict[str, Any]) -> dict[str, dict[str, Any]]:
    splits: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        name, sep, field_ = key.rpartition("/")
        if sep and field_ in ("inputs", "labels"):
            splits.setdefault(name, {})[field_] = tensor
    return splits


def load_data(source: str, *, split: str | None, column: str | None = None, default_split: str = "train") -> Any:
    """Calibration, training or evaluation data from the command line.

    A ``.safetensors`` file gives its tensors: ``inputs`` (and ``labels``), or its only tensor; or, for a file
    with splits, ``<split>/inputs`` and ``<split>/labels`` (e.g. ``train/inputs``, ``validation/labels``) selected
    by ``split`` (``None``: ``default_split``). A folder written by ``Dataset.save_to_disk`` is loaded with
    ``load_from_disk``; anything else goes to ``datasets.load_dataset(source, split=split)`` (local data files, or a
    Hub id when the network allows). A ``split`` given for a file without splits is refused: the whole file would
    be read, whatever the split asked for.
    """
    path = Path(source).expanduser()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        from .adapters.files import check_safetensors

        if not path.is_file():
            raise CalibrationDataError(f"Data file not found: {source!r}.")
        check_safetensors(path)
        tensors = load_file(str(path))
        splits = _split_keys(tensors)
        if splits:
            name = split or default_split
            if name not in splits or "inputs" not in splits[name]:
                raise CalibrationDataError(
                    f"{source!r} has no split {name!r} (no {name + '/inputs'!r} tensor); its splits are "
                    f"{sorted(splits)}. Choose one with --split / --eval-split."
                )
            chosen = splits[name]
            return (chosen["inputs"], chosen["labels"]) if "labels" in chosen else chosen["inputs"]
        if split is not None:
            raise CalibrationDataError(
                f"{source!r} has no splits (its tensors are {sorted(tensors)}), so --split {split} cannot choose "
                f"one. Leave out --split to use the whole file, or store the split as '{split}/inputs' and "
                f"'{split}/labels' tensors."
            )
        if "inputs" in tensors:
            return (tensors["inputs"], tensors["labels"]) if "labels" in tensors else tensors["inputs"]
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        raise CalibrationDataError(
            f"{source!r} holds tensors {sorted(tensors)}; name them 'inputs' (and 'labels'), or "
            "'<split>/inputs' and '<split>/labels' for several splits, or keep only one."
        )
    try:
        import datasets
    except ImportError:
        raise CalibrationDataError(
            f"Loading {source!r} needs the datasets library: pip install -e '.[datasets]' from the checkout."
        ) from None
    if (
        (path / "dataset_info.json").is_file()
        or (path / "state.json").is_file()
        or (path / "dataset_dict.json").is_file()
    ):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if (split or default_split) not in loaded:
                raise CalibrationDataError(
                    f"{source!r} has splits {list(loaded)}, not {split or default_split!r}; choose one with --split."
                )
            loaded = loaded[split or default_split]
        elif split is not None:
            raise CalibrationDataError(
                f"{source!r} holds one dataset without splits (saved from a Dataset, not a DatasetDict), so --split "
                f"{split} cannot choose one. Leave out --split to use all of it, or save a DatasetDict with a "
                f"{split!r} split."
            )
    else:
        try:
            loaded = datasets.load_dataset(source, split=split or default_split)
        except Exception as error:
            raise CalibrationDataError(
                f"Could not load the dataset {source!r} (split {split or default_split!r}): {type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}. Pass a local path (a save_to_disk folder, data "
                "files, or a .safetensors file)."
            ) from None
    if column is not None:
        if column not in loaded.column_names:
            raise CalibrationDataError(
                f"Column {column!r} not in the dataset; it has {loaded.column_names}. Name one of them with "
                "--input-column."
            )
    return loaded.with_format("torch")


def known_splits(source: str) -> list[str] | None:
    """The splits of ``source``: a ``.safetensors`` file's (``[]`` when it has none) or a ``DatasetDict`` folder's;
    None when only ``datasets.load_dataset`` can tell (a Hub id or data files: it reports a missing split itself)."""
    path = Path(source).expanduser()
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return sorted(_split_keys(dict.fromkeys(handle.keys())))
    if (path / "dataset_dict.json").is_file():
        return list(json.loads((path / "dataset_dict.json").read_text()).get("splits", []))
    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        return []  # one Dataset saved with save_to_disk: no splits
    return None


def hold_out(data: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """Split ``(inputs, labels)`` tensors or a dataset into training and held-out parts (seeded, shuffled)."""
    import torch

    if not 0.0 < fraction < 1.0:
        raise UsageError(f"--eval-fraction must be between 0 and 1 (exclusive), got {fraction}.")
    if hasattr(data, "train_test_split"):
        parts = data.train_test_split(test_size=fraction, seed=seed)
        return parts["train"], parts["test"]
    inputs, labels = data
    count = labels.shape[0]
    held = max(1, round(count * fraction))
    if held >= count:
        raise UsageError(f"--eval-fraction {fraction} leaves no training rows out of {count}.")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    train, evaluation = order[held:], order[:held]
    return (inputs[train], labels[train]), (inputs[evaluation], labels[evaluation])


def tokenize_text(
    data: Any, model: Any, folder: Path, *, input_column: str | None, label_column: str, max_length: int
) -> tuple[Any, bool]:
    """Tokenize a dataset's raw-text input column with the tokenizer saved in ``folder`` (or beside the model).

    Returns the data (unchanged when it holds no text) and whether it was tokenized; the tokenized dataset has the
    tokenizer's columns (``input_ids``, ``attention_mask``...) and the label column.

    Raises:
        CalibrationDataError: raw text but no tokenizer, or several text columns and no ``--input-column``.
    """
    if not hasattr(data, "features"):
        return data, False
    texts = [
        name
        for name, feature in data.features.items()
        if name != label_column and getattr(feature, "dtype", None) in ("string", "large_string")
    ]
    if input_column is not None:
        texts = [input_column] if input_column in texts else []
    if not texts:
        return data, False
    if len(texts) > 1:
        raise CalibrationDataError(
            f"The dataset has several text columns {texts}; choose the model input with --input-column."
        )
    from .hub import find_processor

    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    tokenizer = find_processor(model, [str(folder)] + ([name] if name else []))
    if tokenizer is None or not callable(tokenizer):
        raise CalibrationDataError(
            f"The column {texts[0]!r} holds raw text, and no tokenizer was found in {str(folder)!r}. Save the "
            "tokenizer into the model folder (tokenizer.save_pretrained(folder)), or tokenize the dataset first."
        )
    column = texts[0]
    keep = {label_column}
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        max_length = min(max_length, positions)  # never longer than the model can read

    def encode(batch: dict[str, Any]) -> dict[str, Any]:
        return tokenizer(batch[column], truncation=True, padding="max_length", max_length=max_length)

    encoded = data.with_format(None).map(
        encode, batched=True, remove_columns=[c for c in data.column_names if c not in keep]
    )
    return encoded.with_format("torch"), True


def _load_model(source: str) -> tuple[Any, Any]:
    """``(FusionResult or None, model)`` of a saved folder or Hub id, as typed (``Path('./x')`` would drop the
    ``./`` that tells a missing folder from a Hub id)."""
    from .hub import FUSION_CONFIG_FILE, load_fusion_result, load_pretrained

    folder = Path(source).expanduser()
    if (folder / FUSION_CONFIG_FILE).is_file():
        result = load_fusion_result(folder)
        return result, result.model
    return None, load_pretrained(source)


def cmd_fuse(args: argparse.Namespace) -> None:
    from .adapters import get_adapter
    from .api import fuse_resolved, resolve_parent
    from .config import FusionConfig
    from .hub import check_target, resolve_processor

    config = FusionConfig.from_dict({"progress": not args.quiet, **_config_dict(args.config, args.set)})
    check_target(args.output, args.overwrite)  # before the (long) fusion, not after it
    data = load_data(args.data, split=args.split, column=args.input_column)
    if isinstance(data, tuple):
        data = data[0]
    if args.input_column is not None and hasattr(data, "select_columns"):
        data = data.select_columns([args.input_column])
    parents = [resolve_parent(item) for item in args.parents]
    if not args.no_processor:  # a transformers model needs its tokenizer / image processor: a missing one fails now
        model = parents[0][0]
        sources = [meta.get("name_or_path") for _, meta in parents]
        resolve_processor(model, get_adapter(model).name, None, sources)
        del model  # no reference of ours may keep a loaded parent alive: fuse_resolved frees each once prepared
    result = fuse_resolved(parents, data, config)
    processor = False if args.no_processor else None  # the anchor parent's is saved (looked for again, anchor first)
    folder = result.save_pretrained(args.output, overwrite=args.overwrite, license=args.license, processor=processor)
    print(result.summary())
    print(f"saved to {folder}")
    if args.push_to:
        from .hub import push_folder_to_hub

        print(f"pushed: {push_folder_to_hub(folder, args.push_to, private=args.private)}")


def cmd_finetune(args: argparse.Namespace) -> None:
    from .adapters import get_adapter
    from .config import FinetuneConfig
    from .finetune import finetune
    from .hub import check_target, folder_license, processor_sources, resolve_processor, save_model

    check_target(args.output, args.overwrite)  # before training
    if args.eval_split is not None and args.eval_fraction is not None:
        raise UsageError("Pass --eval-split or --eval-fraction, not both.")
    splits = None if args.eval_split is None else known_splits(args.data)
    if splits is not None and args.eval_split not in splits:
        how = (
            f"its splits are {splits}"
            if splits
            else "it has no splits; a .safetensors file holds one as "
            f"'{args.eval_split}/inputs' and '{args.eval_split}/labels' tensors, a folder from DatasetDict.save_to_disk"
        )
        raise CalibrationDataError(
            f"{args.data!r} has no split {args.eval_split!r} ({how}). Choose one with --eval-split, or hold out "
            "part of the training data with --eval-fraction 0.1."
        )
    source = Path(args.model)
    result, model = _load_model(args.model)
    # the tokenizer / image processor to save beside the result, found before training: a missing one fails now
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    sources = [str(source), *(processor_sources(result) if result is not None else [name])]
    family = result.adapter if result is not None else get_adapter(model).name
    processor = resolve_processor(model, family, False if args.no_processor else None, sources)
    train = load_data(args.data, split=args.split)
    evaluation = None if args.eval_split is None else load_data(args.data, split=args.eval_split)
    if not isinstance(train, (tuple, list)) and not hasattr(train, "column_names"):
        raise CalibrationDataError(
            f"{args.data!r} holds inputs without labels; finetuning needs 'inputs' and 'labels' tensors."
        )
    if args.eval_fraction is not None:
        train, evaluation = hold_out(train, args.eval_fraction, args.seed)
    tokenize = dict(input_column=args.input_column, label_column=args.label_column, max_length=args.max_length)
    train, tokenized = tokenize_text(train, model, source, **tokenize)
    if evaluation is not None:
        evaluation, _ = tokenize_text(evaluation, model, source, **tokenize)
    config = FinetuneConfig.from_dict(
        {
            "progress": not args.quiet,
            "input_column": None if tokenized else args.input_column,
            "label_column": args.label_column,
            **_config_dict(args.config, args.set),
        }
    )
    trained = finetune(model, train, evaluation, config)
    for record in trained.history:
        print(json.dumps(record))
    processor = False if processor is None else processor  # as resolved above: nothing more to look for
    if result is not None:
        result.record_finetune(trained)
        license_ = args.license or folder_license(source)
        folder = result.save_pretrained(args.output, overwrite=args.overwrite, license=license_, processor=processor)
    else:
        folder = save_model(trained.model, args.output, overwrite=args.overwrite, processor=processor)
    print(f"saved to {folder}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .evaluation import evaluate

    models = [_load_model(folder)[1] for folder in args.models]
    data = load_data(args.data, split=args.split, default_split="test")
    if not isinstance(data, (tuple, list)) and not hasattr(data, "column_names"):
        raise CalibrationDataError(
            f"{args.data!r} holds inputs without labels; evaluation needs 'inputs' and 'labels' tensors."
        )
    data, _ = tokenize_text(
        data,
        models[0],
        Path(args.models[0]),
        input_column=args.input_column,
        label_column=args.label_column,
        max_length=args.max_length,
    )
    report = evaluate(
        models,
        data,
        names=list(args.models),
        ensemble=len(models) > 1,
        label_column=args.label_column,
        batch_size=args.batch_size,
    )
    print(report)


def cmd_push(args: argparse.Namespace) -> None:
    from .hub import push_folder_to_hub

    if not Path(args.folder).is_dir():
        raise LoadError(f"No such folder: {args.folder!r}. Save a model first (hf-clafusion fuse ... --output DIR).")
    url = push_folder_to_hub(
        args.folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        create_pr=args.create_pr,
        commit_message=args.message,
    )
    print(url)


def cmd_inspect(args: argparse.Namespace) -> None:
    import yaml
    from huggingface_hub import ModelCard

    from .hub import load_fusion_result

    folder = Path(args.folder)
    if not folder.is_dir():
        raise LoadError(f"No such folder: {args.folder!r}. Pass a folder written by hf-clafusion fuse / finetune.")
    result = load_fusion_result(folder)
    if (folder / "README.md").is_file():
        print("card metadata:")
        print(yaml.safe_dump(ModelCard.load(folder / "README.md").data.to_dict(), sort_keys=False).rstrip())
    print(result.summary())  # includes the finetuning history
    if result.evaluation:
        print("recorded evaluation" + (f" on {result.evaluation_dataset}:" if result.evaluation_dataset else ":"))
        for row in result.evaluation:
            marker = "  (this model)" if row.get("fused") else ""
            print(f"  {row['name']}: accuracy {100 * row['accuracy']:.2f}%, loss {row['loss']:.4f}{marker}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.dataset, args.output, seed=args.seed, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .config import FinetuneConfig, FusionConfig

    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="hf-clafusion",
        description="Fuse trained neural networks of different depths and widths (CLAFusion).",
        epilog=EPILOG,
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"hf-clafusion {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fuse = commands.add_parser(
        "fuse",
        help="fuse two or more models",
        epilog=config_choices_help(FusionConfig) + EPILOG,
        formatter_class=formatter,
        description="Load the parents (folders saved by hf_clafusion or Hub ids), fuse them "
        "on calibration data, and save the fused model with its card.",
    )
    fuse.add_argument("parents", nargs="+", help="parent model folders or Hub ids (two or more)")
    fuse.add_argument(
        "--data", required=True, help="calibration data: .safetensors file, dataset folder, or dataset id"
    )
    fuse.add_argument("--split", default=None, help="dataset split (default: train)")
    fuse.add_argument("--input-column", default=None, help="the dataset column holding model inputs")
    fuse.add_argument("--config", default=None, help="YAML file with FusionConfig fields")
    fuse.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config field")
    fuse.add_argument("--output", required=True, help="folder to write (must not exist or be empty)")
    fuse.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    fuse.add_argument("--license", default=None, help="license for the model card")
    fuse.add_argument("--push-to", default=None, metavar="REPO_ID", help="also push to this Hub repository")
    fuse.add_argument("--private", action="store_true", help="create the Hub repository as private")
    fuse.add_argument(
        "--no-processor",
        action="store_true",
        help="save a transformers model without the anchor parent's tokenizer / image processor",
    )
    fuse.add_argument("--quiet", action="store_true", help="no progress bars")
    fuse.set_defaults(handler=cmd_fuse)

    finetune = commands.add_parser(
        "finetune",
        help="finetune a saved (fused) model",
        epilog=config_choices_help(FinetuneConfig) + EPILOG,
        formatter_class=formatter,
    )
    finetune.add_argument("model", help="a folder saved by hf_clafusion")
    finetune.add_argument("--data", required=True, help=".safetensors file (inputs, labels), dataset folder or id")
    finetune.add_argument(
        "--split", default=None, help="training split (a dataset's, or a .safetensors file's; default: train)"
    )
    finetune.add_argument(
        "--eval-split",
        default=None,
        help="held-out split evaluated after each epoch (in a .safetensors file: the SPLIT/inputs, SPLIT/labels tensors)",
    )
    finetune.add_argument(
        "--eval-fraction",
        type=float,
        default=None,
        metavar="F",
        help="instead of --eval-split: hold out this fraction of the training data (seeded by --seed)",
    )
    finetune.add_argument("--seed", type=int, default=0, help="seed of --eval-fraction's split")
    finetune.add_argument("--input-column", default=None)
    finetune.add_argument("--label-column", default="label")
    finetune.add_argument(
        "--max-length",
        type=int,
        default=128,
        help="tokens per text (raw-text datasets, tokenized with the model's tokenizer)",
    )
    finetune.add_argument(
        "--no-processor", action="store_true", help="save a transformers model without its tokenizer / image processor"
    )
    finetune.add_argument("--config", default=None, help="YAML file with FinetuneConfig fields")
    finetune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    finetune.add_argument("--output", required=True)
    finetune.add_argument("--overwrite", action="store_true")
    finetune.add_argument("--license", default=None, help="license for the card (default: the input folder's)")
    finetune.add_argument("--quiet", action="store_true")
    finetune.set_defaults(handler=cmd_finetune)

    push = commands.add_parser(
        "push", help="upload a saved folder to the Hub", epilog=EPILOG, formatter_class=formatter
    )
    push.add_argument("folder")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", default=None, help="branch to commit to")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--message", default=None, help="commit message")
    push.set_defaults(handler=cmd_push)

    evaluate = commands.add_parser(
        "evaluate",
        help="accuracy of saved models on labelled data",
        description="Load one or more saved models and print their accuracy and loss on labelled data (with the "
        "prediction ensemble when several are given). Raw text is tokenized with the first model's tokenizer.",
        epilog=EPILOG,
        formatter_class=formatter,
    )
    evaluate.add_argument("models", nargs="+", help="model folders (saved by hf_clafusion, timm or transformers)")
    evaluate.add_argument("--data", required=True, help=".safetensors file (inputs, labels), dataset folder or id")
    evaluate.add_argument("--split", default=None, help="the split to evaluate (default: test)")
    evaluate.add_argument("--input-column", default=None)
    evaluate.add_argument("--label-column", default="label")
    evaluate.add_argument("--max-length", type=int, default=128, help="tokens per text (raw-text datasets)")
    evaluate.add_argument("--batch-size", type=int, default=256)
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars (tokenizing raw text)")
    evaluate.set_defaults(handler=cmd_evaluate)

    inspect = commands.add_parser("inspect", help="print a saved fused model's card data and alignment")
    inspect.add_argument("folder")
    inspect.set_defaults(handler=cmd_inspect)

    demo = commands.add_parser(
        "demo",
        help="train, fuse and finetune MLP and CNN pairs on real data (no download)",
        description="Train two MLPs (hidden 400-200-100-50-25 vs 400-200-100) and two VGG-style CNNs of different "
        "depth, fuse each pair with CLAFusion, finetune briefly, print the accuracy table and save the fused models "
        "and alignment plots.",
        epilog=EPILOG,
        formatter_class=formatter,
    )
    demo.add_argument("--dataset", choices=["digits", "fashion-mnist"], default="digits")
    demo.add_argument("--output", default="clafusion-demo", help="folder for fused models and plots")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="fewer training epochs (a smoke run)")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False) or args.handler is cmd_inspect:  # inspect prints a summary, not a load
        quiet_other_progress_bars()
    try:
        with warnings.catch_warnings():
            if not args.debug:
                warnings.showwarning = warning_printer(warnings.showwarning)
            args.handler(args)
        return 0
    except KeyboardInterrupt:
        print("hf-clafusion: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # every failure is one line on stderr; --debug shows the traceback
        if args.debug:
            raise
        print(f"hf-clafusion: error: {error_line(error)}", file=sys.stderr)
        return 2 if isinstance(error, (UsageError, ConfigError)) else 1


def quiet_other_progress_bars() -> None:
    """``--quiet`` also for the progress bars of huggingface_hub, transformers (saving) and datasets (tokenizing):
    through their environment variables when not imported yet, their switches when they are."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers follows huggingface_hub's setting
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    switches = [
        ("huggingface_hub.utils", "disable_progress_bars"),
        ("transformers.utils.logging", "disable_progress_bar"),
        ("datasets.utils.tqdm", "disable_progress_bars"),
    ]
    for module, switch in switches:
        if module in sys.modules:
            getattr(sys.modules[module], switch)()


def warning_printer(fallback: Any) -> Any:
    """A ``warnings.showwarning`` that prints the library's own warnings as one line, ``hf-clafusion: warning: ...``
    (without the source line of the library that raised them), and hands any other warning to ``fallback``."""

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, ClaFusionWarning):
            print(f"hf-clafusion: warning: {' '.join(str(message).split())}", file=file or sys.stderr)
        else:
            fallback(message, category, filename, lineno, file, line)

    return show


def error_line(error: BaseException) -> str:
    """The one-line message the command line prints for ``error``."""
    text = " ".join(str(error).split())
    if isinstance(error, ClaFusionError):
        return text
    if isinstance(error, ImportError):
        return (
            f"a package this command needs is missing ({text or type(error).__name__}). Install the matching "
            "extra; from a checkout: pip install -e '.[timm]', '.[transformers]' or '.[datasets]'."
        )
    return (
        f"unexpected {type(error).__name__}: {text}. Rerun with --debug (hf-clafusion --debug ...) for the "
        "traceback, and report it if the input looks right."
    )


if __name__ == "__main__":
    sys.exit(main())
