"""Sharing: loading folders and Hub ids (``find_loader``, adapter precedence, ``LoadError``) and pushing to the Hub
(``push_folder_to_hub``, ``FusionResult.push_to_hub``) against a local Hub server.

The server (tests/hub_server.py) checks the client protocol that huggingface_hub speaks, not the real Hub; the
one real-Hub test is skipped unless ``HF_TOKEN`` is set and huggingface.co is reachable.
"""

import hashlib
import os
import shutil
import socket
import traceback
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_clafusion import (
    FusionConfig,
    LoadError,
    SaveError,
    fuse,
    list_adapters,
    load_pretrained,
    register_adapter,
    save_model,
)
from hf_clafusion.adapters import find_loader, get_adapter
from hf_clafusion.adapters.torch import SequentialAdapter
from hf_clafusion.hub import download_snapshot, folder_license, load_fusion_result, push_folder_to_hub

from ._models import mlp
from .hub_server import HubServer, use_server


TOKEN = "hf_SECRETtoken123"
SAVED_FILES = {"README.md", "alignment.png", "architecture.json", "fusion_config.json", "model.safetensors"}
# Best-effort telemetry huggingface_hub may fetch on its first request; the server has no such route (404).
IGNORED_PATHS = {"/api/agent-harnesses"}

# huggingface_hub's own LFS upload passes a file object as `data=` to httpx2, which warns
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture(scope="module")
def result():
    inputs = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    return fuse([mlp(8, [16, 16, 16], 3), mlp(8, [12, 12], 3, seed=1)], inputs, FusionConfig(progress=False))


@pytest.fixture(scope="module")
def saved(result, tmp_path_factory) -> Path:
    """A folder written by save_pretrained, shared by the module: tests copy it before changing anything."""
    return result.save_pretrained(tmp_path_factory.mktemp("saved") / "model")


@pytest.fixture
def folder(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "model"))


@pytest.fixture
def hub(monkeypatch):
    server = HubServer(token=TOKEN).start()
    use_server(monkeypatch, server)
    yield server
    server.stop()


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def unexpected_requests(server: HubServer) -> list:
    """Requests the server refused, other than best-effort telemetry and the 409 "already exists" answers that
    ``create_repo(exist_ok=True)`` and ``create_branch(exist_ok=True)`` expect: none should happen."""
    return [r for r in server.requests if r.status >= 400 and r.status != 409 and r.path not in IGNORED_PATHS]


def test_push_folder_uploads_every_file_byte_identical(hub, folder):
    url = push_folder_to_hub(folder, "user/fused", token=TOKEN)

    head = hub.refs("user/fused")["main"]
    assert url == f"{hub.url}/user/fused/commit/{head}"
    pushed = hub.files("user/fused")
    assert set(pushed) == SAVED_FILES
    assert pushed == local_files(folder)
    assert hub.history("user/fused")[0].message == "Upload fused model (hf_clafusion)"
    # the binary files went through LFS (uploaded to the signed URL, content checked against its sha256)
    for name in ("model.safetensors", "alignment.png"):
        oid = hashlib.sha256(pushed[name]).hexdigest()
        assert hub.lfs_objects[oid] == pushed[name]
        assert any(r.method == "PUT" and r.path == f"/_lfs/{oid}" and r.status == 200 for r in hub.requests)
    assert not any(TOKEN.encode() in data for data in pushed.values())
    assert not unexpected_requests(hub)


def test_push_again_makes_a_second_commit(hub, folder):
    first = push_folder_to_hub(folder, "user/fused", token=TOKEN)
    (folder / "README.md").write_text((folder / "README.md").read_text() + "\nUpdated.\n")
    (folder / "notes.txt").write_text("second push\n")

    second = push_folder_to_hub(folder, "user/fused", token=TOKEN, commit_message="Second push")

    assert second != first
    assert second == f"{hub.url}/user/fused/commit/{hub.refs('user/fused')['main']}"
    assert hub.files("user/fused") == local_files(folder)
    assert [c.message for c in hub.history("user/fused")] == [
        "Second push",
        "Upload fused model (hf_clafusion)",
        "initial commit",
    ]
    # the first commit is still there, unchanged
    first_oid = first.rsplit("/", 1)[1]
    assert "notes.txt" not in hub.files("user/fused", first_oid)
    # an unchanged folder makes no empty commit: huggingface_hub skips it and returns the head commit
    assert push_folder_to_hub(folder, "user/fused", token=TOKEN) == second
    assert len(hub.history("user/fused")) == 3
    assert not unexpected_requests(hub)


def test_push_to_a_revision_creates_the_branch(hub, saved, folder):
    push_folder_to_hub(saved, "user/fused", token=TOKEN)
    (folder / "README.md").write_text((folder / "README.md").read_text() + "\nOn dev.\n")

    url = push_folder_to_hub(folder, "user/fused", token=TOKEN, revision="dev")

    refs = hub.refs("user/fused")
    assert url == f"{hub.url}/user/fused/commit/{refs['dev']}"
    assert hub.files("user/fused", "dev") == local_files(folder)
    assert hub.files("user/fused", "main") == local_files(saved)  # main is untouched
    # the branch now exists: pushing to it again goes through (create_branch exist_ok)
    (folder / "extra.txt").write_text("again\n")
    push_folder_to_hub(folder, "user/fused", token=TOKEN, revision="dev")
    assert hub.files("user/fused", "dev") == local_files(folder)
    assert [c.message for c in hub.history("user/fused", "dev")][:2] == ["Upload fused model (hf_clafusion)"] * 2
    assert not unexpected_requests(hub)


def test_push_to_a_new_repo_branch(hub, folder):
    url = push_folder_to_hub(folder, "user/fresh", token=TOKEN, revision="experiment")
    assert url.endswith(hub.refs("user/fresh")["experiment"])
    assert hub.files("user/fresh", "experiment") == local_files(folder)
    assert hub.files("user/fresh", "main") == {}


def test_create_pr_opens_a_pull_request(hub, saved, folder):
    push_folder_to_hub(saved, "user/fused", token=TOKEN)
    (folder / "README.md").write_text((folder / "README.md").read_text() + "\nProposed change.\n")

    url = push_folder_to_hub(folder, "user/fused", token=TOKEN, create_pr=True)

    assert url == f"{hub.url}/user/fused/discussions/1"
    assert hub.files("user/fused", "refs/pr/1") == local_files(folder)
    assert hub.files("user/fused", "main") == local_files(saved)
    assert ("POST", "/api/models/user/fused/commit/main") in [(r.method, r.path) for r in hub.requests]
    assert not unexpected_requests(hub)


def test_server_error_leaves_the_local_folder_untouched(hub, folder):
    before = snapshot(folder)
    hub.commit_error = 500

    with pytest.raises(SaveError) as info:
        push_folder_to_hub(folder, "user/fused", token=TOKEN)

    message = str(info.value)
    assert "'user/fused'" in message
    assert "HTTP 500" in message
    assert "local folder is unchanged" in message
    assert snapshot(folder) == before
    assert hub.files("user/fused") == {}  # nothing was committed
    assert TOKEN not in message


@pytest.mark.parametrize("token", ["hf_WRONGtoken999", None], ids=["wrong-token", "no-token"])
def test_bad_token_gives_a_clear_error_without_the_token(hub, folder, monkeypatch, tmp_path, token):
    hub.echo_credentials = True  # worst case: the server quotes the credentials it refused
    # no implicit token from the environment or a login on this machine
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    before = snapshot(folder)

    with pytest.raises(SaveError) as info:
        push_folder_to_hub(folder, "user/fused", token=token)

    message = str(info.value)
    assert "HTTP 401" in message
    assert "token" in message.lower()
    assert "log in" in message or "login" in message
    assert "local folder is unchanged" in message
    rendered = "".join(traceback.format_exception(info.type, info.value, info.tb))
    for secret in (TOKEN, "hf_WRONGtoken999"):
        assert secret not in message
        assert secret not in rendered
    assert snapshot(folder) == before
    assert "user/fused" not in hub.repos


def test_fusion_result_push_to_hub_end_to_end(hub, result, tmp_path):
    from huggingface_hub import hf_hub_download

    url = result.push_to_hub("user/fused-e2e", token=TOKEN, commit_message="End to end")

    assert url == f"{hub.url}/user/fused-e2e/commit/{hub.refs('user/fused-e2e')['main']}"
    pushed = hub.files("user/fused-e2e")
    assert set(pushed) == SAVED_FILES
    assert b"user/fused-e2e" in pushed["README.md"]  # the card is named after the repo
    assert hub.history("user/fused-e2e")[0].message == "End to end"
    # read it back through the client (/resolve/) and load it: same model
    paths = [hf_hub_download("user/fused-e2e", name, token=TOKEN, cache_dir=tmp_path / "cache") for name in pushed]
    assert all(Path(p).read_bytes() == pushed[Path(p).name] for p in paths)
    model = load_pretrained(Path(paths[0]).parent)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), result.model(x))
    assert not unexpected_requests(hub)


def test_missing_folder_is_refused_before_any_request(hub, tmp_path):
    with pytest.raises(SaveError, match="not a folder"):
        push_folder_to_hub(tmp_path / "nothing-here", "user/fused", token=TOKEN)
    assert hub.requests == []


def _hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        return False
    return True


@pytest.mark.hub
@pytest.mark.skipif(not os.environ.get("HF_TOKEN"), reason="needs HF_TOKEN and network access to huggingface.co")
def test_push_to_the_real_hub(result, monkeypatch):
    if not _hub_reachable():
        pytest.skip("huggingface.co is not reachable")
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # tests/conftest.py sets it for every other test
    api = HfApi()
    repo_id = f"{api.whoami()['name']}/hf-clafusion-test-{uuid.uuid4().hex[:8]}"
    try:
        url = result.push_to_hub(repo_id, private=True)
        assert "/commit/" in url
        assert SAVED_FILES <= set(api.list_repo_files(repo_id))
    finally:
        api.delete_repo(repo_id, missing_ok=True)


def test_revision_with_create_pr_is_refused_before_any_request(tmp_path):
    from hf_clafusion import SaveError
    from hf_clafusion.hub import push_folder_to_hub

    with pytest.raises(SaveError, match="cannot be combined with revision='dev'"):
        push_folder_to_hub(tmp_path, "me/model", revision="dev", create_pr=True)


# ------------------------------------------------------------------------------------------- loading, precedence


@pytest.fixture
def registry(monkeypatch):
    """A copy of the adapter registry for the test, so the adapters it registers do not leak into other tests."""
    from hf_clafusion.adapters import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setattr(base, "_PRIORITY", dict(base._PRIORITY))


def loads_everything(module: type[nn.Module]) -> type[SequentialAdapter]:
    """A Sequential adapter that claims every folder and loads it as a fresh ``module()``."""

    class Greedy(SequentialAdapter):
        @classmethod
        def can_load(cls, directory: Path) -> bool:
            return True

        @classmethod
        def load(cls, directory: Path, *, allow_pickle: bool = False) -> nn.Module:
            return module()

    return Greedy


def test_a_saved_sequential_folder_is_found_by_its_own_can_load(tmp_path):
    model = mlp(8, [16, 12], 3)
    folder = save_model(model, tmp_path / "m")
    assert SequentialAdapter.can_load(folder) and not SequentialAdapter.can_load(tmp_path)
    loaded = find_loader(folder)(allow_pickle=False)
    x = torch.randn(5, 8)
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(load_pretrained(folder)(x), model(x))


def test_find_loader_knows_nothing_of_empty_folders_and_unknown_names(tmp_path):
    assert find_loader(tmp_path) is None
    assert find_loader("someone/some-model") is None
    with pytest.raises(TypeError, match="folder path or a reference string"):
        find_loader(3)


def test_built_in_adapters_are_tried_in_name_order_at_equal_priority():
    assert list_adapters() == ["timm", "torch.sequential", "transformers"]


def test_a_higher_priority_takes_precedence_whatever_the_registration_order(registry, tmp_path):
    folder = save_model(mlp(8, [16], 3), tmp_path / "m")
    register_adapter("zzz.high", priority=5)(loads_everything(nn.Tanh))
    register_adapter("aaa.low", priority=-1)(loads_everything(nn.ReLU))
    assert list_adapters() == ["zzz.high", "timm", "torch.sequential", "transformers", "aaa.low"]
    assert isinstance(find_loader(folder)(), nn.Tanh)
    assert isinstance(load_pretrained(folder), nn.Tanh)
    assert get_adapter(mlp(8, [16], 3)).name == "zzz.high"


def test_equal_priorities_are_tried_in_name_order_not_registration_order(registry, tmp_path):
    register_adapter("b.second")(loads_everything(nn.Tanh))
    register_adapter("a.first")(loads_everything(nn.ReLU))
    assert list_adapters()[:2] == ["a.first", "b.second"]
    assert isinstance(find_loader(tmp_path)(), nn.ReLU)


def test_register_adapter_refuses_a_priority_that_is_not_an_integer():
    with pytest.raises(ValueError, match="priorities must be integers, got 1.5"):
        register_adapter("x", priority=1.5)


def test_load_failures_raise_load_error_which_old_save_error_handlers_still_catch(tmp_path):
    (tmp_path / "config.json").write_text('{"something": "else"}')
    with pytest.raises(LoadError, match="not saved by hf_clafusion") as info:
        load_pretrained(tmp_path)
    assert isinstance(info.value, SaveError)
    with pytest.raises(LoadError, match="No fusion_config.json"):
        load_fusion_result(tmp_path)


def test_download_snapshot_refuses_bad_ids_and_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoadError, match="'not a/valid id!' is neither an existing folder nor a valid Hub id"):
        download_snapshot("not a/valid id!")
    with pytest.raises(LoadError, match="Could not get 'someone/some-model' from the local cache"):
        download_snapshot("someone/some-model")


def test_folder_license_reads_the_card_metadata(tmp_path):
    assert folder_license(tmp_path) is None
    (tmp_path / "README.md").write_text("no metadata here\n")
    assert folder_license(tmp_path) is None
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# A model\n")
    assert folder_license(tmp_path) == "mit"


# ------------------------------------------------------------------------------- damaged files, file modes, processors


def _saved_folder(family: str, tmp_path: Path) -> Path:
    """A tiny model of ``family`` saved in its own format."""
    folder = tmp_path / family
    if family == "torch":
        return save_model(mlp(8, [16], 3), folder)
    if family == "timm":
        timm = pytest.importorskip("timm")
        model = timm.create_model("resnet18", pretrained=False, num_classes=3, layers=[1, 1, 1, 1], channels=(8,) * 4)
        return save_model(model, folder)
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("family", ["torch", "timm", "transformers"])
def test_a_truncated_weights_file_is_a_load_error_naming_the_file(family, tmp_path):
    folder = _saved_folder(family, tmp_path)
    weights = folder / "model.safetensors"
    _truncate(weights)
    message = rf"{weights.name}.*is damaged .*Download it again, or save the model again"
    with pytest.raises(LoadError, match=message):
        load_pretrained(folder)
    # the family's own load path says the same, not a raw SafetensorError
    adapter = {"torch": "torch.sequential"}.get(family, family)
    from hf_clafusion.adapters.base import adapter_class

    with pytest.raises(LoadError, match=message):
        adapter_class(adapter).load(folder)


def test_a_weights_file_cut_inside_its_header_is_a_load_error(tmp_path):
    folder = _saved_folder("torch", tmp_path)
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:20])
    with pytest.raises(LoadError, match="header needs .* bytes but the file holds 20"):
        load_pretrained(folder)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_folders_and_files_follow_the_umask(umask, result, tmp_path):
    old = os.umask(umask)
    try:
        folder = result.save_pretrained(tmp_path / "fused")
        plain = save_model(mlp(8, [16], 3), tmp_path / "plain")
    finally:
        os.umask(old)
    for root in (folder, plain):
        assert root.stat().st_mode & 0o777 == 0o777 & ~umask
        files = [p for p in root.rglob("*") if p.is_file()]
        assert files and {p.stat().st_mode & 0o777 for p in files} == {0o666 & ~umask}


def test_a_transformers_model_is_not_saved_without_its_tokenizer_unless_asked(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    model = transformers.BertForSequenceClassification(config)
    with pytest.raises(SaveError, match="needs its tokenizer .*processor=False"):
        save_model(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    folder = save_model(model, tmp_path / "m", processor=False)
    assert (folder / "config.json").is_file() and not (folder / "tokenizer_config.json").exists()


def test_a_saved_timm_model_does_not_claim_the_pretrained_tag(tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18.a1_in1k", pretrained=False, num_classes=3, layers=[1, 1, 1, 1])
    assert model.pretrained_cfg["tag"] == "a1_in1k"
    folder = save_model(model, tmp_path / "m")
    import json

    saved = json.loads((folder / "config.json").read_text())
    assert saved["pretrained_cfg"].get("tag") is None  # a fused / finetuned model was not trained with that recipe
    assert load_pretrained(folder)(torch.randn(1, 3, 32, 32)).shape == (1, 3)
