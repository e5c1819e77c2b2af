"""The ``hf-clafusion`` command line (the only argument parser in the package).

Subcommands: ``fuse``, ``finetune``, ``push``, ``inspect``, ``demo``. YAML configs map one-to-one to
:class:`~hf_clafusion.FusionConfig` / :class:`~hf_clafusion.FinetuneConfig` (unknown keys are rejected with the
list of valid ones). Exit codes: 0 success, 2 usage error (bad arguments or configuration), 1 any other
failure, reported in one line on stderr (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .errors import CalibrationDataError, ClaFusionError, ConfigError


EPILOG = """examples:
  hf-clafusion demo                                   # digits: MLP and CNN pairs, fused and finetuned
  hf-clafusion fuse ./deep ./shallow --data ./calib.safetensors --output ./fused
  hf-clafusion fuse ./deep ./shallow --data ./my_dataset --split train --config fusion.yaml --output ./fused
  hf-clafusion fuse ./a ./b --data ./calib.safetensors --set solver=sinkhorn --set reg=0.05 --output ./fused
  hf-clafusion finetune ./fused --data ./my_dataset --split train --eval-split validation --output ./fused-ft
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


def _config_dict(path: str | None, assignments: list[str]) -> dict[str, Any]:
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
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
        data[key.strip()] = yaml.safe_load(value)
    return data


def load_data(source: str, *, split: str | None, column: str | None = None) -> Any:
    """Calibration or training data from the command line.

    A ``.safetensors`` file gives its tensors (``inputs``/``labels`` keys, or its only tensor); a folder written
    by ``Dataset.save_to_disk`` is loaded with ``load_from_disk``; anything else goes to
    ``datasets.load_dataset(source, split=split)`` (local data files, or a Hub id when the network allows).
    """
    path = Path(source).expanduser()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        if not path.is_file():
            raise CalibrationDataError(f"Data file not found: {source!r}.")
        tensors = load_file(str(path))
        if "inputs" in tensors:
            return (tensors["inputs"], tensors["labels"]) if "labels" in tensors else tensors["inputs"]
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        raise CalibrationDataError(
            f"{source!r} holds tensors {sorted(tensors)}; name them 'inputs' (and 'labels') or keep only one."
        )
    try:
        import datasets
    except ImportError:
        raise CalibrationDataError(
            f"Loading {source!r} needs the datasets library: pip install -e '.[datasets]' in the hf_clafusion checkout."
        ) from None
    if (
        (path / "dataset_info.json").is_file()
        or (path / "state.json").is_file()
        or (path / "dataset_dict.json").is_file()
    ):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split is None or split not in loaded:
                raise CalibrationDataError(f"{source!r} has splits {list(loaded)}; choose one with --split.")
            loaded = loaded[split]
    else:
        try:
            loaded = datasets.load_dataset(source, split=split or "train")
        except Exception as error:
            raise CalibrationDataError(
                f"Could not load the dataset {source!r} (split {split or 'train'!r}): {type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}. Pass a local path (a save_to_disk folder, data "
                "files, or a .safetensors file)."
            ) from None
    if column is not None:
        if column not in loaded.column_names:
            raise CalibrationDataError(f"Column {column!r} not in the dataset; it has {loaded.column_names}.")
    return loaded.with_format("torch")


def cmd_fuse(args: argparse.Namespace) -> None:
    from .api import fuse_pretrained
    from .config import FusionConfig

    config = FusionConfig.from_dict({"progress": not args.quiet, **_config_dict(args.config, args.set)})
    data = load_data(args.data, split=args.split, column=args.input_column)
    if isinstance(data, tuple):
        data = data[0]
    if args.input_column is not None and hasattr(data, "select_columns"):
        data = data.select_columns([args.input_column])
    result = fuse_pretrained(args.parents, data, config)
    folder = result.save_pretrained(args.output, overwrite=args.overwrite, license=args.license)
    print(result.summary())
    print(f"saved to {folder}")
    if args.push_to:
        from .hub import push_folder_to_hub

        print(f"pushed: {push_folder_to_hub(folder, args.push_to, private=args.private)}")


def cmd_finetune(args: argparse.Namespace) -> None:
    from .config import FinetuneConfig
    from .finetune import finetune
    from .hub import FUSION_CONFIG_FILE, folder_license, load_fusion_result, load_pretrained, save_model

    config = FinetuneConfig.from_dict(
        {
            "progress": not args.quiet,
            "input_column": args.input_column,
            "label_column": args.label_column,
            **_config_dict(args.config, args.set),
        }
    )
    if args.eval_split is not None and Path(args.data).suffix == ".safetensors":
        raise UsageError("--eval-split needs a dataset with splits; a .safetensors file has none.")
    train = load_data(args.data, split=args.split)
    if not isinstance(train, tuple) and train is not None and not hasattr(train, "column_names"):
        raise CalibrationDataError(
            f"{args.data!r} holds inputs without labels; finetuning needs 'inputs' and 'labels'."
        )
    evaluation = None if args.eval_split is None else load_data(args.data, split=args.eval_split)
    source = Path(args.model)
    fused = (source / FUSION_CONFIG_FILE).is_file()
    result = load_fusion_result(source) if fused else None
    model = result.model if fused else load_pretrained(source)
    trained = finetune(model, train, evaluation, config)
    for record in trained.history:
        print(json.dumps(record))
    if result is not None:
        result.record_finetune(trained)
        license_ = args.license or folder_license(source)
        folder = result.save_pretrained(args.output, overwrite=args.overwrite, license=license_)
    else:
        folder = save_model(trained.model, args.output, overwrite=args.overwrite)
    print(f"saved to {folder}")


def cmd_push(args: argparse.Namespace) -> None:
    from .hub import push_folder_to_hub

    if not Path(args.folder).is_dir():
        raise UsageError(f"No such folder: {args.folder!r}. Save a model first (hf-clafusion fuse ... --output DIR).")
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
    result = load_fusion_result(folder)
    if (folder / "README.md").is_file():
        print("card metadata:")
        print(yaml.safe_dump(ModelCard.load(folder / "README.md").data.to_dict(), sort_keys=False).rstrip())
    print(result.summary())


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
    finetune.add_argument("--split", default="train")
    finetune.add_argument("--eval-split", default=None, help="held-out split evaluated after each epoch")
    finetune.add_argument("--input-column", default=None)
    finetune.add_argument("--label-column", default="label")
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
    try:
        args.handler(args)
        return 0
    except ClaFusionError as error:
        if args.debug:
            raise
        print(f"hf-clafusion: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, (UsageError, ConfigError)) else 1
    except KeyboardInterrupt:
        print("hf-clafusion: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
