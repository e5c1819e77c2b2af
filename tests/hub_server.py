"""A local stand-in for the Hugging Face Hub HTTP API, for testing uploads without network.

This server checks that hf_clafusion drives the *client protocol* of ``huggingface_hub`` correctly (which
endpoints are called, in which order, with which payloads and headers). It is not the real Hub: it implements
only the calls that ``create_repo``, ``create_branch`` and ``upload_folder``/``create_commit`` make when Xet is
disabled (LFS "basic" transfer), plus enough of ``whoami``, repo info, refs and ``/resolve/`` for
``hf_hub_download`` to read files back. Anything else answers a clear 404. Passing tests against it does not
prove that the real Hub accepts the same requests (the real-Hub test, marked and skipped without a token, does).

Implemented routes (``{repo}`` is ``namespace/name``; revisions and file paths are URL-quoted by the client):

* ``POST /api/repos/create`` (409 when the repo exists, as the Hub does)
* ``POST /api/models/{repo}/branch/{branch}`` (409 when it exists; ``startingPoint`` honoured)
* ``POST /api/models/{repo}/preupload/{revision}`` (``lfs`` for ``*.safetensors``/``*.png``/large files,
  ``regular`` otherwise; the ``oid`` of an identical file already at the revision, as the Hub does)
* ``POST /{repo}.git/info/lfs/objects/batch`` (upload and verify hrefs pointing back at this server)
* ``PUT /_lfs/{oid}?ticket=...`` (the "signed URL": no auth header, the body's sha256 must equal the oid)
* ``POST /{repo}.git/info/lfs/objects/verify``
* ``POST /api/models/{repo}/commit/{revision}`` (ndjson; ``create_pr=1`` opens ``refs/pr/N``)
* ``POST /api/validate-yaml`` (the model card's front matter must be a YAML mapping)
* ``GET /api/whoami-v2``, ``GET /api/models/{repo}[/revision/{revision}]``, ``GET /api/models/{repo}/refs``
* ``GET``/``HEAD /{repo}/resolve/{revision}/{path}``

Usage::

    server = HubServer(token="hf_test").start()
    use_server(monkeypatch, server)  # points huggingface_hub at it for one test
    ...
    server.files("user/model")  # {path: bytes} at "main"
    server.stop()
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlsplit


LFS_SUFFIXES = (".safetensors", ".png", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".npy", ".npz")
LFS_MIN_SIZE = 10 * 1024 * 1024  # like the Hub: large files go to LFS whatever their extension
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a regular file (what ``git hash-object`` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Blob:
    data: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        """sha256 for LFS files, git sha1 for regular ones (the oids the Hub's preupload answer carries)."""
        return hashlib.sha256(self.data).hexdigest() if self.lfs else git_blob_sha1(self.data)


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    description: str
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_id: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # "main", "dev", "refs/pr/1" -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    num_prs: int = 0


class Request(NamedTuple):
    method: str
    path: str  # as sent, URL-quoted, without the query string
    status: int


class HubError(Exception):
    """An HTTP error answer: status, message, and the ``X-Error-Code`` the Hub would send."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.header_message = message  # X-Error-Message (the client classifies some errors by its exact text)
        self.code = code


class HubServer:
    """An in-memory Hub on ``127.0.0.1`` (random port) served from a background thread.

    Args:
        token: when set, every request (except the pre-signed LFS upload URL) must carry
            ``Authorization: Bearer <token>``; a missing header or another token is answered 401.
        user: the name ``whoami`` returns and the namespace of repo ids given without one.
        echo_credentials: worst case for secret handling: 401 answers quote the ``Authorization`` header they
            got (the real Hub does not), so a test can check that the caller keeps the token out of its errors.

    Attributes:
        url: the endpoint to point ``huggingface_hub`` at.
        commit_error: set to an HTTP status (e.g. 500) to make every commit request fail with it.
        requests: every request answered, in order, as :class:`Request` ``(method, path, status)``.
    """

    def __init__(self, *, token: str | None = None, user: str = "user", echo_credentials: bool = False):
        self.token = token
        self.user = user
        self.echo_credentials = echo_credentials
        self.commit_error: int | None = None
        self.requests: list[Request] = []
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self._tickets: dict[str, str] = {}  # upload ticket -> oid
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> HubServer:
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        host, port = self._httpd.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        # huggingface_hub's shared client pools keep-alive connections to this port: close them first, so
        # that the handler threads waiting on them see EOF and end
        from huggingface_hub.utils._http import close_session

        close_session()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- reading the store back (for assertions) ----------------------------------------------------------

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` (a branch, ``refs/pr/N`` or a commit oid), as bytes."""
        with self._lock:
            commit = self._commit_at(self._repo(repo_id), revision)
            return {path: blob.data for path, blob in commit.files.items()}

    def history(self, repo_id: str, revision: str = "main") -> list[Commit]:
        """The commits reachable from ``revision``, newest first (the repo's empty initial commit last)."""
        with self._lock:
            repo = self._repo(repo_id)
            commit: Commit | None = self._commit_at(repo, revision)
            out = []
            while commit is not None:
                out.append(commit)
                commit = repo.commits[commit.parent] if commit.parent else None
            return out

    def refs(self, repo_id: str) -> dict[str, str]:
        """Branch and pull-request refs of ``repo_id`` -> commit oid."""
        with self._lock:
            return dict(self._repo(repo_id).refs)

    # -- store helpers --------------------------------------------------------------------------------------

    def _repo(self, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, f"Repository not found: {repo_id!r}.", "RepoNotFound")
        return repo

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        if revision in repo.refs:
            return repo.commits[repo.refs[revision]]
        if _COMMIT_RE.match(revision) and revision in repo.commits:
            return repo.commits[revision]
        raise HubError(404, f"Invalid rev id: {revision!r} in {repo.repo_id!r}.", "RevisionNotFound")

    def _new_commit(
        self, repo: Repo, parent: str | None, files: dict[str, Blob], message: str, description: str = ""
    ) -> Commit:
        digest = hashlib.sha1(f"{repo.repo_id}\n{parent}\n{message}\n{len(repo.commits)}\n".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{files[path].oid}\n".encode())
        commit = Commit(digest.hexdigest(), parent, message, description, dict(files))
        repo.commits[commit.oid] = commit
        return commit


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer  # set on the per-server subclass
    protocol_version = "HTTP/1.1"
    timeout = 30  # never let a stuck connection hold a handler thread forever

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # keep test output clean; `hub.requests` records what came in

    def send_response(self, code: int, message: str | None = None) -> None:
        # logged here, before the answer leaves, so a test never reads the log ahead of its last request
        with self.hub._lock:
            self.hub.requests.append(Request(self.command, urlsplit(self.path).path, code))
        super().send_response(code, message)

    # -- dispatch ---------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        raw_segments = [s for s in split.path.split("/") if s]
        segments = [unquote(s) for s in raw_segments]
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        body = _read_body(self)
        try:
            if segments[:1] == ["_lfs"] and method == "PUT":  # pre-signed upload URL: no auth header
                return self._lfs_put(segments, query, body)
            self._check_auth()
            route = self._route(method, segments, raw_segments)
            if route is None:
                raise HubError(
                    404, f"hub_server: no route for {method} {split.path} (not implemented by the test server)."
                )
            handler, args = route
            return handler(*args, query=query, body=body)
        except HubError as error:
            self._send_json(
                {"error": error.message}, status=error.status, code=error.code, message=error.header_message
            )
        except Exception as error:  # a bug in this server: say so instead of dropping the connection
            # 501, not 500: the client retries 500s with backoff for half a minute, 501 fails the test at once
            message = f"hub_server internal error: {type(error).__name__}: {error}"
            self._send_json({"error": message}, status=501, message=message)

    def _route(self, method: str, s: list[str], raw: list[str]):
        n = len(s)
        if method == "POST" and s == ["api", "repos", "create"]:
            return self._create_repo, ()
        if method == "POST" and s == ["api", "validate-yaml"]:
            return self._validate_yaml, ()
        if method == "GET" and s == ["api", "whoami-v2"]:
            return self._whoami, ()
        if n >= 4 and s[:2] == ["api", "models"]:
            repo_id = f"{s[2]}/{s[3]}"
            rest = s[4:]
            if method == "GET" and not rest:
                return self._repo_info, (repo_id, None)
            if method == "GET" and len(rest) == 2 and rest[0] == "revision":
                return self._repo_info, (repo_id, rest[1])
            if method == "GET" and rest == ["refs"]:
                return self._list_refs, (repo_id,)
            if method == "POST" and len(rest) == 2 and rest[0] == "branch":
                return self._create_branch, (repo_id, rest[1])
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                return self._preupload, (repo_id, rest[1])
            if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                return self._commit, (repo_id, rest[1])
        if n == 6 and s[1].endswith(".git") and s[2:5] == ["info", "lfs", "objects"] and method == "POST":
            repo_id = f"{s[0]}/{s[1][: -len('.git')]}"
            if s[5] == "batch":
                return self._lfs_batch, (repo_id,)
            if s[5] == "verify":
                return self._lfs_verify, (repo_id,)
        if n >= 5 and s[0] != "api" and s[2] == "resolve" and method in ("GET", "HEAD"):
            # the file path keeps its "/" (quote() in hf_hub_url leaves them), so join the raw tail
            return self._resolve, (f"{s[0]}/{s[1]}", s[3], unquote("/".join(raw[4:])), method)
        return None

    # -- auth -------------------------------------------------------------------------------------------

    def _check_auth(self) -> None:
        token = self.hub.token
        if token is None:
            return
        header = self.headers.get("Authorization")
        if header is None:
            raise HubError(401, "You must be authenticated to access this resource: no Authorization header.")
        if header != f"Bearer {token}":
            error = HubError(401, "Invalid credentials in Authorization header")
            if self.hub.echo_credentials:
                error.message = f"Invalid credentials in Authorization header: {header!r}"
                error.header_message = "Invalid credentials in Authorization header"
            raise error

    # -- repos and branches -----------------------------------------------------------------------------

    def _create_repo(self, *, query: dict, body: bytes) -> None:
        payload = self._json(body)
        name = payload.get("name")
        if not isinstance(name, str) or not name:
            raise HubError(400, "`name` is required.")
        if payload.get("type", "model") != "model":
            raise HubError(400, "hub_server only hosts model repos.")
        repo_id = f"{payload.get('organization') or self.hub.user}/{name}"
        hub = self.hub
        with hub._lock:
            if repo_id in hub.repos:
                url = f"{hub.url}/{repo_id}"
                return self._send_json(
                    {"error": "You already created this model repo", "url": url}, status=409, message="Conflict"
                )
            repo = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
            hub.repos[repo_id] = repo
            repo.refs["main"] = hub._new_commit(repo, None, {}, "initial commit").oid
        self._send_json({"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _create_branch(self, repo_id: str, branch: str, *, query: dict, body: bytes) -> None:
        payload = self._json(body) if body else {}
        hub = self.hub
        with hub._lock:
            repo = hub._repo(repo_id)
            if branch in repo.refs:
                raise HubError(409, f"Reference already exists: {branch!r}.")
            if branch.startswith("refs/"):
                raise HubError(400, f"Invalid branch name: {branch!r}.")
            start = hub._commit_at(repo, payload.get("startingPoint") or "main")
            repo.refs[branch] = start.oid
        self._send_json({})

    def _list_refs(self, repo_id: str, *, query: dict, body: bytes) -> None:
        with self.hub._lock:
            repo = self.hub._repo(repo_id)
            refs = dict(repo.refs)
        branches = [{"name": k, "ref": f"refs/heads/{k}", "targetCommit": v} for k, v in refs.items() if "/" not in k]
        prs = [{"name": k, "ref": k, "targetCommit": v} for k, v in refs.items() if k.startswith("refs/pr/")]
        self._send_json({"branches": branches, "converts": [], "tags": [], "pullRequests": prs})

    def _repo_info(self, repo_id: str, revision: str | None, *, query: dict, body: bytes) -> None:
        with self.hub._lock:
            repo = self.hub._repo(repo_id)
            commit = self.hub._commit_at(repo, revision or "main")
            siblings = [{"rfilename": path} for path in sorted(commit.files)]
            private = repo.private
        self._send_json(
            {"id": repo_id, "modelId": repo_id, "sha": commit.oid, "private": private, "siblings": siblings}
        )

    def _whoami(self, *, query: dict, body: bytes) -> None:
        self._send_json(
            {"type": "user", "name": self.hub.user, "auth": {"type": "access_token", "accessToken": {"role": "write"}}}
        )

    def _validate_yaml(self, *, query: dict, body: bytes) -> None:
        import yaml

        content = self._json(body).get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
        if match is not None:
            try:
                meta = yaml.safe_load(match.group(1))
            except yaml.YAMLError as error:
                return self._send_json({"errors": [{"message": f"Invalid YAML: {error}"}]}, status=400)
            if meta is not None and not isinstance(meta, dict):
                return self._send_json({"errors": [{"message": "The metadata must be a YAML mapping."}]}, status=400)
        self._send_json({"errors": [], "warnings": []})

    # -- uploads ----------------------------------------------------------------------------------------

    def _preupload(self, repo_id: str, revision: str, *, query: dict, body: bytes) -> None:
        files = self._json(body).get("files")
        if not isinstance(files, list):
            raise HubError(400, "`files` must be a list.")
        with self.hub._lock:
            repo = self.hub._repo(repo_id)
            base = self.hub._commit_at(repo, revision)
        existing = base.files
        answer = []
        for f in files:
            path, size = f.get("path"), f.get("size")
            if not isinstance(path, str) or not isinstance(size, int) or not isinstance(f.get("sample"), str):
                raise HubError(400, f"Malformed preupload entry: {f!r}.")
            lfs = path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE
            entry: dict[str, Any] = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if path in existing:
                entry["oid"] = existing[path].oid
            answer.append(entry)
        self._send_json({"files": answer, "commitOid": base.oid})

    def _lfs_batch(self, repo_id: str, *, query: dict, body: bytes) -> None:
        payload = self._json(body)
        if payload.get("operation") != "upload":
            raise HubError(400, "hub_server only supports the LFS upload operation.")
        if "basic" not in (payload.get("transfers") or ["basic"]):
            raise HubError(400, "hub_server only supports the LFS 'basic' transfer.")
        hub = self.hub
        objects = []
        with hub._lock:
            repo = hub._repo(repo_id)
            ref = (payload.get("ref") or {}).get("name")
            if ref is not None:
                hub._commit_at(repo, ref)
            for obj in payload.get("objects", []):
                oid, size = obj.get("oid"), obj.get("size")
                if not (isinstance(oid, str) and re.fullmatch(r"[0-9a-f]{64}", oid) and isinstance(size, int)):
                    raise HubError(400, f"Malformed LFS object: {obj!r}.")
                item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
                if oid not in hub.lfs_objects:
                    ticket = secrets.token_hex(8)
                    hub._tickets[ticket] = oid
                    item["actions"] = {
                        "upload": {"href": f"{hub.url}/_lfs/{oid}?ticket={ticket}", "expires_in": 900},
                        "verify": {
                            "href": f"{hub.url}/{quote(repo_id)}.git/info/lfs/objects/verify",
                            "header": {"Authorization": "Bearer (sent by the client)"},
                        },
                    }
                objects.append(item)
        self._send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_put(self, segments: list[str], query: dict, body: bytes) -> None:
        if len(segments) != 2:
            raise HubError(404, "Unknown LFS upload URL.")
        oid = segments[1]
        hub = self.hub
        with hub._lock:
            if hub._tickets.get(query.get("ticket", "")) != oid:
                raise HubError(403, "The upload URL is not valid for this object (bad or missing ticket).")
            actual = hashlib.sha256(body).hexdigest()
            if actual != oid:
                raise HubError(400, f"Uploaded content does not match its oid: sha256 {actual} != {oid}.")
            hub.lfs_objects[oid] = body
            del hub._tickets[query["ticket"]]
        self._send_empty(200, {"ETag": f'"{oid[:32]}"'})

    def _lfs_verify(self, repo_id: str, *, query: dict, body: bytes) -> None:
        payload = self._json(body)
        with self.hub._lock:
            self.hub._repo(repo_id)
            data = self.hub.lfs_objects.get(payload.get("oid"))
        if data is None or len(data) != payload.get("size"):
            raise HubError(404, f"LFS object {payload.get('oid')!r} was not uploaded (or its size differs).")
        self._send_json({"success": True})

    def _commit(self, repo_id: str, revision: str, *, query: dict, body: bytes) -> None:
        hub = self.hub
        if hub.commit_error is not None:
            raise HubError(hub.commit_error, f"hub_server: commits are switched to fail with {hub.commit_error}.")
        if "ndjson" not in (self.headers.get("Content-Type") or ""):
            raise HubError(400, "The commit payload must be application/x-ndjson.")
        try:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise HubError(400, f"Malformed ndjson commit payload: {error}.") from None
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of the commit payload must be the header.")
        header = lines[0].get("value") or {}
        summary = header.get("summary")
        if not isinstance(summary, str) or not summary:
            raise HubError(400, "The commit summary is required.")
        create_pr = query.get("create_pr") in ("1", "true", "True")
        with hub._lock:
            repo = hub._repo(repo_id)
            base = hub._commit_at(repo, revision)
            parent_commit = header.get("parentCommit")
            if parent_commit is not None and parent_commit != base.oid:
                raise HubError(412, f"A commit has happened since {parent_commit}. Please refresh and try again.")
            files = dict(base.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value") or {}
                path = value.get("path")
                if not isinstance(path, str) or not path or path.startswith("/"):
                    raise HubError(400, f"Invalid path in commit entry: {line!r}.")
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, f"Unsupported encoding for {path!r}: {value.get('encoding')!r}.")
                    try:
                        data = base64.b64decode(value.get("content", ""), validate=True)
                    except ValueError:
                        raise HubError(400, f"Invalid base64 content for {path!r}.") from None
                    files[path] = Blob(data, lfs=False)
                elif key == "lfsFile":
                    oid = value.get("oid")
                    if value.get("algo", "sha256") != "sha256":
                        raise HubError(400, f"Unsupported LFS hash algorithm for {path!r}.")
                    data = hub.lfs_objects.get(oid)
                    if data is None:
                        raise HubError(400, f"LFS object {oid!r} for {path!r} was never uploaded.")
                    if "size" in value and value["size"] != len(data):
                        raise HubError(400, f"LFS size mismatch for {path!r}: {value['size']} != {len(data)}.")
                    files[path] = Blob(data, lfs=True)
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path!r}.", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for name in [p for p in files if p.startswith(prefix)]:
                        del files[name]
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}.")
            commit = hub._new_commit(repo, base.oid, files, summary, header.get("description") or "")
            pr_url = None
            if create_pr:
                repo.num_prs += 1
                repo.refs[f"refs/pr/{repo.num_prs}"] = commit.oid
                pr_url = f"{hub.url}/{repo_id}/discussions/{repo.num_prs}"
            else:
                repo.refs[revision] = commit.oid
        self._send_json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{hub.url}/{repo_id}/commit/{commit.oid}",
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            }
        )

    # -- downloads --------------------------------------------------------------------------------------

    def _resolve(self, repo_id: str, revision: str, path: str, method: str, *, query: dict, body: bytes) -> None:
        with self.hub._lock:
            commit = self.hub._commit_at(self.hub._repo(repo_id), revision)
            blob = commit.files.get(path)
            if blob is None:
                self.send_response(404)
                error = json.dumps({"error": f"Entry not found: {path!r}."}).encode()
                for name, value in {
                    "Content-Type": "application/json",
                    "Content-Length": str(len(error)),
                    "X-Error-Code": "EntryNotFound",
                    "X-Error-Message": "Entry not found",
                    "X-Repo-Commit": commit.oid,
                }.items():
                    self.send_header(name, value)
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(error)
                return
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(len(blob.data)),
            "ETag": f'"{blob.oid}"',
            "X-Repo-Commit": commit.oid,
        }
        if blob.lfs:
            headers["X-Linked-Etag"] = f'"{blob.oid}"'
            headers["X-Linked-Size"] = str(len(blob.data))
        self.send_response(200)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(blob.data)

    # -- response helpers -------------------------------------------------------------------------------

    @staticmethod
    def _json(body: bytes) -> dict:
        try:
            payload = json.loads(body or b"{}")
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise HubError(400, f"Malformed JSON body: {error}.") from None
        if not isinstance(payload, dict):
            raise HubError(400, "The JSON body must be an object.")
        return payload

    def _send_json(
        self, payload: Any, *, status: int = 200, code: str | None = None, message: str | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if code is not None:
            self.send_header("X-Error-Code", code)
        if message is not None and status >= 400:
            self.send_header("X-Error-Message", message.encode("ascii", "replace").decode())
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_empty(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()


def use_server(monkeypatch, server: HubServer) -> None:
    """Point ``huggingface_hub`` at ``server`` for one test (undone by ``monkeypatch``).

    ``huggingface_hub.constants`` is read when the client calls, so patching it is enough: ``HfApi()`` takes
    ``constants.ENDPOINT`` at construction, ``hf_hub_url`` formats ``HUGGINGFACE_CO_URL_TEMPLATE``, uploads
    choose Xet or LFS from ``HF_HUB_DISABLE_XET`` and every request is refused while ``HF_HUB_OFFLINE`` is true
    (the test suite sets it). Proxy variables are removed so that 127.0.0.1 is reached directly, and the
    shared HTTP client is closed so that it is rebuilt without them (:meth:`HubServer.stop` closes it again).
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    _http.close_session()  # rebuilt on the next request, without proxies; HubServer.stop() closes it again


__all__ = ["Blob", "Commit", "HubServer", "Repo", "Request", "git_blob_sha1", "use_server"]
