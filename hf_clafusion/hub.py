"""Saving, loading and sharing models: safetensors weights, the family's architecture file, ``fusion_config.json``,
Hub downloads and uploads.

Writes are atomic (a temporary sibling folder renamed into place), so an interrupted save never leaves a
half-written model at the target path.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapters import find_loader, list_adapters
from .adapters.base import adapter_class
from .adapters.files import check_weight_files
from .download import ALLOW_PATTERNS, download_snapshot
from .errors import ClaFusionWarning, LoadError, SaveError


if TYPE_CHECKING:
    from torch import nn

    from .result import FusionResult

FUSION_CONFIG_FILE = "fusion_config.json"
PLOT_FILE = "alignment.png"


def folder_license(folder: str | Path) -> str | None:
    """The ``license`` in the metadata of the folder's ``README.md`` model card, or None (no card, no license)."""
    card = Path(folder) / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(card).data.license
    except Exception:  # a README without card metadata
        return None


def check_target(target: str | Path, overwrite: bool = False) -> None:
    """Refuse a save target that is a file, or a non-empty folder without ``overwrite`` (checked before any work).

    Raises:
        SaveError: the target cannot be written.
    """
    target = Path(target).expanduser()
    if target.exists() and not target.is_dir():
        raise SaveError(f"Cannot save into {str(target)!r}: it exists and is not a folder. Choose another path.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise SaveError(
            f"The folder {str(target)!r} already exists and is not empty. Pass overwrite=True (--overwrite on the "
            "command line) to replace it, or choose another path."
        )


def _current_umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it; restored at once
    os.umask(mask)
    return mask


def _apply_umask(folder: Path) -> None:
    """Give a folder written through ``tempfile`` (mode 0700, files possibly 0600) the modes the user's umask
    gives ordinary files and folders, as ``save_pretrained`` does: 0755 / 0644 under the usual umask 022."""
    mask = _current_umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def atomic_directory_write(target: str | Path, write, *, overwrite: bool = False) -> Path:
    """Run ``write(tmp_dir)`` in a temporary sibling of ``target`` and rename it into place when it succeeds.

    The folder and its files get the modes of the user's umask (not the 0700 of a temporary folder).
    """
    target = Path(target).expanduser().resolve()
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        _apply_umask(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def fusion_record(result: FusionResult) -> dict[str, Any]:
    """The content of ``fusion_config.json``: :meth:`FusionResult.to_record`."""
    return result.to_record()


def _is_hub_id(name: str | None) -> bool:
    if not name or os.path.exists(name) or name.startswith((".", "/", "~")):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _card_license(parents: list[dict[str, Any]], license: str | None) -> str | None:  # noqa: A002
    if license is not None:
        return license
    licenses = [p.get("license") for p in parents]
    known = {lic for lic in licenses if lic}
    if len(known) == 1 and all(licenses):
        return known.pop()
    if len(known) > 1:
        warnings.warn(
            f"The parents have different licenses ({', '.join(sorted(known))}); the model card names none. Pass "
            "`license=` to save_pretrained/push_to_hub once you know which applies.",
            ClaFusionWarning,
            stacklevel=3,
        )
    return None


def build_model_card(
    result: FusionResult,
    *,
    license: str | None = None,  # noqa: A002
    datasets: list[str] | None = None,
    model_name: str | None = None,
    load_path: str = "path/to/this/folder",
):
    """The ``README.md`` model card of a fused model (huggingface_hub ``ModelCard`` from the package's template).

    Metadata: ``library_name: hf_clafusion``, ``base_model`` = the parents that have Hub ids (local or in-memory
    parents are named in the body with their content hashes), ``tags`` (model-fusion, clafusion, the family),
    ``datasets``, ``license`` (inherited when all parents agree), and ``model-index`` from the recorded evaluation.
    """
    import yaml
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from .result import best_epoch

    name = model_name or "Fused model (CLAFusion)"
    base_models = [p["name_or_path"] for p in result.parents if _is_hub_id(p.get("name_or_path"))]
    eval_results = None
    fused_rows = [r for r in result.evaluation if r.get("fused")]
    if fused_rows and result.evaluation_dataset:
        eval_results = [
            EvalResult(
                task_type=result.evaluation_task,
                dataset_type=result.evaluation_dataset,
                dataset_name=result.evaluation_dataset,
                metric_type="accuracy",
                metric_value=round(float(row["accuracy"]), 6),
            )
            for row in fused_rows[-1:]
        ]
    family = result.adapter.split(".")[0]
    card_data = ModelCardData(
        library_name="hf_clafusion",
        base_model=base_models or None,
        tags=["model-fusion", "clafusion", family],
        datasets=datasets or ([result.evaluation_dataset] if result.evaluation_dataset else None),
        license=_card_license(result.parents, license),
        model_name=name if eval_results else None,
        eval_results=eval_results,
    )
    alignment_rows = [
        {"model": p.model, "reference": p.reference, "segment": s, "deeper": p.deeper[s], "layers": p.alignment[s]}
        for p in result.pairs
        for s in range(len(p.alignment))
    ]
    calibration = ", ".join(
        f"{k} {v}" for k, v in result.calibration.items() if k in ("source", "num_samples", "total", "seed")
    )
    template = (Path(__file__).parent / "templates" / "model_card.md").read_text()
    return ModelCard.from_template(
        card_data,
        template_str=template,
        model_name=name,
        num_parents=len(result.parents),
        family=result.adapter,
        balancing=result.config.balancing,
        anchor=result.anchor,
        parents=result.parents,
        num_parameters=sum(t.numel() for t in result.model.parameters()),
        alignment_rows=alignment_rows,
        alignment_trial=result.alignment_trial,
        config_yaml=yaml.safe_dump(result.config.to_dict(), sort_keys=False),
        calibration=calibration,
        load_path=load_path,
        evaluation=result.evaluation,
        per_token=adapter_class(result.adapter)().next_token(result.model),  # a causal LM: scored per next token
        finetune=result.finetune_history,
        finetune_best=best_epoch(result.finetune_history),
        finetune_kept=result.kept_earlier_epoch,
    )


#: Files whose presence shows that a folder holds a tokenizer / an image processor.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json",)


def _local_folder(source: str) -> Path | None:
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder
    if not _is_hub_id(source):
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, local_files_only=True, allow_patterns=ALLOW_PATTERNS))
    except Exception:  # not in the local cache
        return None


def find_processor(model: nn.Module, sources: list[str]) -> Any:
    """The tokenizer (text models) or image processor (vision models) saved in the first of ``sources`` (folders,
    or Hub ids in the local cache) that holds one, or None.

    Only a folder that holds the processor's own files is read: ``AutoTokenizer`` would otherwise build a
    useless tokenizer from a model's ``config.json`` alone.
    """
    vision = getattr(model, "main_input_name", "input_ids") == "pixel_values"
    names = IMAGE_PROCESSOR_FILES if vision else TOKENIZER_FILES
    for source in sources:
        folder = _local_folder(source) if source else None
        if folder is None or not any((folder / name).is_file() for name in names):
            continue
        import transformers

        auto = transformers.AutoImageProcessor if vision else transformers.AutoTokenizer
        try:
            return auto.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        except Exception:  # files there but unreadable: try the next source
            continue
    return None


def processor_sources(result: FusionResult) -> list[str | None]:
    """Where a fused model's tokenizer / image processor is looked for: the anchor parent's folder or Hub id, then
    the other parents'."""
    order = [result.anchor] + [i for i in range(len(result.parents)) if i != result.anchor]
    return [result.parents[i].get("name_or_path") for i in order if i < len(result.parents)]


def resolve_processor(model: nn.Module, family: str, processor: Any, sources: list[str]) -> Any:
    """The processor to save beside ``model``: ``processor`` itself; none for ``False`` or a family without one;
    for ``None`` (a transformers text or vision model) the one :func:`find_processor` finds in ``sources``.

    Raises:
        SaveError: a transformers model's tokenizer / image processor was asked for but none was found.
    """
    if processor is False:
        return None
    if processor is not None or family.split(".")[0] != "transformers":
        return processor
    found = find_processor(model, sources)
    if found is None:
        vision = getattr(model, "main_input_name", "input_ids") == "pixel_values"
        kind, auto = ("image processor", "AutoImageProcessor") if vision else ("tokenizer", "AutoTokenizer")
        looked = ", ".join(repr(s) for s in sources if s) or "none: the parents were built in memory"
        raise SaveError(
            f"This {type(model).__name__} needs its {kind} saved beside it, and none was found where its parents "
            f"came from (looked in: {looked}). Pass processor={auto}.from_pretrained(...) to save it, or "
            "processor=False (--no-processor on the command line) to save the model without one."
        )
    return found


def save_fusion_result(
    result: FusionResult,
    save_directory: str | Path,
    *,
    overwrite: bool = False,
    license: str | None = None,  # noqa: A002
    datasets: list[str] | None = None,
    model_name: str | None = None,
    load_path: str | None = None,
    processor: Any = None,
    max_shard_size: int | str | None = None,
) -> Path:
    """Implementation of :meth:`FusionResult.save_pretrained` (``load_path``: what the card tells users to load;
    ``processor``: a tokenizer / image processor saved beside the model with its own ``save_pretrained``; None
    finds the anchor parent's (then another parent's) for a transformers model, False saves none;
    ``max_shard_size``: see :func:`save_weights`)."""
    check_target(Path(save_directory).expanduser(), overwrite)
    adapter = adapter_class(result.adapter)()
    processor = resolve_processor(result.model, result.adapter, processor, processor_sources(result))
    card = build_model_card(
        result, license=license, datasets=datasets, model_name=model_name, load_path=load_path or str(save_directory)
    )

    def write(tmp: Path) -> None:
        save_weights(adapter, result.model, tmp, max_shard_size=max_shard_size)
        if processor is not None:
            processor.save_pretrained(tmp)
        (tmp / FUSION_CONFIG_FILE).write_text(json.dumps(fusion_record(result), indent=2) + "\n")
        result.plot_alignment(tmp / PLOT_FILE)
        card.save(tmp / "README.md")

    return atomic_directory_write(save_directory, write, overwrite=overwrite)


def save_weights(adapter: Any, model: nn.Module, directory: Path, *, max_shard_size: int | str | None = None) -> None:
    """``adapter.save(model, directory)``, with the weights split into safetensors shards of at most
    ``max_shard_size`` (bytes, or a string such as ``"5GB"``) as ``save_pretrained`` does: ``model-00001-of-0000N
    .safetensors`` files and a ``model.safetensors.index.json`` weight map. ``None`` writes one file.

    transformers models are sharded by their own ``save_pretrained``; other families' single
    ``model.safetensors`` is split afterwards, and their ``load`` reads either layout.
    """
    if max_shard_size is None:
        adapter.save(model, directory)
        return
    if "max_shard_size" in inspect.signature(adapter.save).parameters:
        adapter.save(model, directory, max_shard_size=max_shard_size)
        return
    adapter.save(model, directory)
    single = Path(directory) / "model.safetensors"
    if not single.is_file():
        raise SaveError(
            f"max_shard_size={max_shard_size!r}: the {adapter.name} adapter wrote no model.safetensors to split into "
            "shards. Save without max_shard_size."
        )
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file

    state = load_file(str(single))
    single.unlink()
    save_torch_state_dict(state, directory, max_shard_size=max_shard_size, metadata={"format": "pt"})


def save_model(
    model: nn.Module,
    save_directory: str | Path,
    *,
    overwrite: bool = False,
    processor: Any = None,
    sources: list[str] | None = None,
) -> Path:
    """Save any supported model (a parent, a finetuned model) in its family's format, atomically.

    Args:
        model: the model.
        save_directory: the folder to create.
        overwrite: replace an existing non-empty folder.
        processor: a tokenizer / image processor saved beside it; None finds the one in ``sources`` (default: the
            model's ``name_or_path``) for a transformers model, and fails when there is none; False saves none.
        sources: folders or Hub ids to look for the processor in.
    """
    from .adapters import get_adapter

    check_target(Path(save_directory).expanduser(), overwrite)
    adapter = get_adapter(model)
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    processor = resolve_processor(model, adapter.name, processor, sources if sources is not None else [name])

    def write(tmp: Path) -> None:
        adapter.save(adapter.prepare(model), tmp)
        if processor is not None:
            processor.save_pretrained(tmp)

    return atomic_directory_write(save_directory, write, overwrite=overwrite)


def load_pretrained(path: str | Path, *, allow_pickle: bool = False) -> nn.Module:
    """Load a model saved by hf_clafusion (:meth:`FusionResult.save_pretrained` or :func:`save_model`), or a folder
    in a supported family's own format (timm, transformers).

    ``path`` is a local folder, or a Hub id (downloaded; with no network, looked up in the local cache only).
    Only safetensors weights are read by default. A folder holding a pickle checkpoint (``pytorch_model.bin``,
    ``model.pt`` or ``model.pth``) instead is refused unless ``allow_pickle=True``, and then read with
    ``torch.load(weights_only=True)``.

    Raises:
        LoadError: the folder does not exist, was not written by hf_clafusion or a supported library, holds only
            pickle weights or a damaged (truncated) ``*.safetensors`` file, or is a Hub id that cannot be
            downloaded. (Adapters may still raise its parent class
            :class:`SaveError` for a folder they recognise but cannot read.)
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        folder = download_snapshot(str(path))
    check_weight_files(folder)
    if (folder / FUSION_CONFIG_FILE).is_file():
        name = json.loads((folder / FUSION_CONFIG_FILE).read_text()).get("adapter")
        if name is not None:
            return adapter_class(name).load(folder, allow_pickle=allow_pickle)
    loader = find_loader(folder)
    if loader is None:
        raise LoadError(
            f"{str(path)!r} holds no {FUSION_CONFIG_FILE} and no model folder that an adapter recognises "
            f"({', '.join(list_adapters())}); it was not saved by hf_clafusion or by a supported library."
        )
    return loader(allow_pickle=allow_pickle)


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _push_failure(error: Exception, folder: Path, repo_id: str, revision: str | None, token: str | None) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    hints = {
        401: "The token is missing or invalid: log in with `hf auth login` or pass `token=`.",
        403: f"The token may not write to {repo_id!r}: check its permissions or the namespace.",
        404: f"Repository or revision not found: {repo_id!r} (revision {revision!r}).",
    }
    network = isinstance(error, OSError) or any(
        word in cls.__name__ for cls in type(error).__mro__ for word in ("Transport", "Connect", "Timeout", "Offline")
    )
    if status in hints:
        hint = hints[status]
    elif network or (status is not None and status >= 500):
        hint = "Check the network connection and the Hub status, then push again."
    else:
        hint = "The Hub client refused the request; check the arguments."
    detail = _scrub(str(error).splitlines()[0] if str(error) else type(error).__name__, token)
    return (
        f"Pushing {str(folder)!r} to {repo_id!r} failed ({type(error).__name__}"
        f"{f', HTTP {status}' if status else ''}: {detail}). {hint} The local folder is unchanged."
    )


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
) -> str:
    """Upload a saved model folder to the Hub in one commit (``create_repo(exist_ok=True)`` + ``upload_folder``).

    Args:
        folder: a folder written by :meth:`FusionResult.save_pretrained` (or any folder).
        repo_id: ``namespace/name``.
        private: create the repository as private (ignored when it exists).
        token: a Hub token; default: the logged-in token or ``HF_TOKEN``. Never written to logs, errors or files.
        revision: the branch to commit to (created from the default branch if missing).
        create_pr: open a pull request instead of committing to the branch.
        commit_message: defaults to "Upload fused model (hf_clafusion)".

    Returns:
        The commit (or pull request) URL.

    Raises:
        SaveError: the folder is missing, or the Hub refused or could not be reached (no token, no network,
            permission denied). The local folder is left untouched.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise SaveError(f"Nothing to push: {str(folder)!r} is not a folder. Save the model first.")
    if create_pr and revision is not None:
        raise SaveError(
            f"create_pr=True opens a pull request against the default branch; it cannot be combined with "
            f"revision={revision!r}. Drop one of the two."
        )
    api = HfApi(token=token)
    failure = None
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or "Upload fused model (hf_clafusion)",
        )
    except Exception as error:  # every failure of the client becomes one clear error
        failure = _push_failure(error, folder, repo_id, revision, token)
    if failure is not None:  # raised outside `except` so the client's exception (and what it echoed) is dropped
        raise SaveError(failure)
    return str(getattr(info, "pr_url", None) or getattr(info, "commit_url", info))


def load_fusion_result(path: str | Path, *, allow_pickle: bool = False) -> FusionResult:
    """Rebuild a :class:`FusionResult` (model, alignment, costs, config, provenance) from a saved folder.

    Transport plans are not saved, so ``transport_plans`` is empty.

    Raises:
        LoadError: the folder holds no ``fusion_config.json`` (or the model in it cannot be loaded).
    """
    from .result import FusionResult

    folder = Path(path).expanduser()
    record_file = folder / FUSION_CONFIG_FILE
    if not record_file.is_file():
        raise LoadError(f"No {FUSION_CONFIG_FILE} in {str(path)!r}: it is not a fused model saved by hf_clafusion.")
    record = json.loads(record_file.read_text())
    return FusionResult.from_record(record, load_pretrained(folder, allow_pickle=allow_pickle))


__all__ = [
    "ALLOW_PATTERNS",
    "atomic_directory_write",
    "build_model_card",
    "check_target",
    "download_snapshot",
    "find_processor",
    "folder_license",
    "fusion_record",
    "load_fusion_result",
    "load_pretrained",
    "processor_sources",
    "push_folder_to_hub",
    "resolve_processor",
    "save_fusion_result",
    "save_model",
]
