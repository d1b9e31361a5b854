"""A local, in-memory stand-in for the Hugging Face Hub REST API: tests drive the REAL `huggingface_hub` client
(no mocks of `HfApi`) against it, with no network. Standard library only; serves on 127.0.0.1, in a daemon thread.

Use from a test module (either form)::

    pytest_plugins = ["tests.hub_server"]        # then:  def test_x(hub): ...
    from tests.hub_server import hub  # noqa: F401  # then:  def test_x(hub):  # noqa: F811

`hub` is a fresh `LocalHub` per test, with the client pointed at it, HF_HOME/HF_HUB_CACHE under `tmp_path` and
HF_TOKEN set to `hub.token`. Without pytest fixtures: ``with LocalHub() as h, use_local_hub(h, some_dir): ...``.

Why patching and not just ``HF_ENDPOINT``: `huggingface_hub.constants` reads the environment ONCE, at import, and
the module-level `huggingface_hub.hf_api.api` (behind `huggingface_hub.create_repo`, `upload_folder`, ...) keeps the
endpoint it saw when created. The port is only known at fixture time, so `use_local_hub` sets the env vars (for
subprocesses) AND patches the imported constants and `hf_api.api.endpoint`, all undone on exit. It also turns
`HF_HUB_OFFLINE` off (CI exports HF_HUB_OFFLINE=1) and `HF_HUB_DISABLE_XET` on (hf_xet is installed; Xet is not
emulated). Regular files travel base64 inside the ndjson commit; binary or `*.safetensors`-like files go through
the basic Git-LFS batch API (PUT to /_lfs/<sha256>), and `resolve` answers them with a 302 to a same-host "CDN".
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import re
import socket
import threading
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

TOKEN = "hf_localhub_valid_token"
USER = "local-user"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".npy", ".npz", ".onnx", ".h5", ".msgpack")
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub sends files of 10 MB and more through LFS whatever their name
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()
TYPES = {"models": "model", "datasets": "dataset", "spaces": "space", None: "model"}  # URL part -> repo_type
PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}  # repo_type -> prefix of web/resolve URLs
DATE = "2024-01-01T00:00:00.000Z"

# Routes. The client quotes revisions with safe="", so a revision is always one path segment.
API_RE = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(.*))?$")
NS = r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+?)"
RESOLVE_RE = re.compile(NS + r"/resolve/([^/]+)/(.+)$")
LFS_BATCH_RE = re.compile(NS + r"\.git/info/lfs/objects/batch$")
LFS_PUT_RE = re.compile(r"^/_lfs/([0-9a-f]{64})$")
CDN_RE = re.compile(r"^/_cdn/([0-9a-f]{40})/([0-9a-f]{64})$")


@dataclass
class File:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:  # what git stores for an LFS file
        return b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %d\n" % (
            self.sha256.encode(),
            len(self.data),
        )

    @property
    def oid(self) -> str:  # git blob id: of the content for regular files, of the pointer for LFS files
        blob = self.pointer if self.lfs else self.data
        return hashlib.sha1(b"blob %d\0" % len(blob) + blob).hexdigest()


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit sha
    commits: dict[str, dict[str, File]] = field(default_factory=dict)  # commit sha -> {path: File}


class HubError(Exception):
    """Raised inside a handler; becomes an error response carrying the Hub's X-Error-Code / X-Error-Message."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class LocalHub:
    """The in-memory Hub. `with LocalHub() as hub:` serves it on http://127.0.0.1:<free port> until the block ends."""

    def __init__(self, token: str = TOKEN, user: str = USER):
        self.token, self.user = token, user
        self.repos: dict[tuple[str, str], Repo] = {}  # (repo_type, "ns/name") -> Repo
        self.lfs: dict[str, bytes] = {}  # sha256 -> content (LFS uploads, and every committed LFS file)
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.errors: list[str] = []  # tracebacks of server bugs (answered as 400 so that the client does not retry)
        # Fault injection: while > 0, each file download sends only this many bytes of the body, then drops the
        # connection (a network failure mid-download). Counted down by one per cut download.
        self.cut_downloads = 0
        self.cut_after_bytes = 16
        self.lock = threading.RLock()  # requests are handled one at a time
        self._ids = itertools.count()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "LocalHub is not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> LocalHub:
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()  # stops serve_forever; then end the kept-alive client connections
        for sock in list(self._server.open_sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = self._thread = None

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- state helpers, also handy to seed a repo directly from a test ---
    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> Repo:
        with self.lock:
            repo = self.repos[(repo_type, repo_id)] = Repo(private=private)
            self.commit(repo, "main", {".gitattributes": File(GITATTRIBUTES, lfs=False)}, "initial commit")
            return repo

    def commit(self, repo: Repo, branch: str, tree: dict[str, File], message: str) -> str:
        with self.lock:
            listing = sorted((path, f.oid) for path, f in tree.items())
            sha = hashlib.sha1(f"{next(self._ids)}|{repo.branches.get(branch)}|{message}|{listing}".encode())
            sha = sha.hexdigest()
            repo.commits[sha], repo.branches[branch] = dict(tree), sha
            self.lfs.update({f.sha256: f.data for f in tree.values() if f.lfs})  # what the "CDN" serves
            return sha

    def add_files(self, repo_id: str, files: dict[str, bytes], branch: str = "main", repo_type: str = "model") -> str:
        """Commit `files` straight into the store (creating the repo if needed); returns the commit sha."""
        with self.lock:
            repo = self.repos.get((repo_type, repo_id)) or self.create_repo(repo_id, repo_type)
            tree = dict(repo.commits[repo.branches.get(branch) or repo.branches["main"]])
            tree.update({p: File(d, lfs=p.endswith(LFS_SUFFIXES) or b"\0" in d[:512]) for p, d in files.items()})
            return self.commit(repo, branch, tree, "add files")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: LocalHub):
        super().__init__(("127.0.0.1", 0), _Handler)  # loopback only, free port
        self.hub = hub
        self.open_sockets: set[socket.socket] = set()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every response carries a Content-Length
    timeout = 30
    server: _Server

    def setup(self):
        super().setup()
        self.server.open_sockets.add(self.connection)

    def finish(self):
        self.server.open_sockets.discard(self.connection)
        super().finish()

    def log_message(self, format, *args):  # keep test output clean; see LocalHub.requests instead
        pass

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = lambda self: self._dispatch()

    # --- plumbing ---
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []  # httpx streams bodies of unknown length with chunked encoding
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # optional trailers
            pass
        return b"".join(chunks)

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data, content_type: str = "application/json") -> None:
        self._send(200, json.dumps(data).encode(), {"Content-Type": content_type})

    def _bytes(self, data: bytes, headers: dict) -> None:
        """Serve file content, honouring one `Range: bytes=a-b` (resumed downloads, safetensors header reads)."""
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", **headers}
        hub = self.server.hub
        if hub.cut_downloads > 0 and self.command == "GET":
            hub.cut_downloads -= 1
            self.send_response(200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: hub.cut_after_bytes])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "").strip())
        if match is None or self.command == "HEAD":
            return self._send(200, data, headers)
        start, end = int(match[1]), min(int(match[2] or len(data) - 1), len(data) - 1)
        if start >= len(data):
            raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
        self._send(206, data[start : end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"})

    def _dispatch(self) -> None:
        hub, url = self.server.hub, urlsplit(self.path)
        self.body = self._read_body() if self.command in ("POST", "PUT", "DELETE") else b""
        with hub.lock:
            hub.requests.append((self.command, url.path))
            try:
                self._route(url.path, parse_qs(url.query))
            except HubError as err:
                headers = {"Content-Type": "application/json", "X-Error-Message": err.message, **err.headers}
                headers.update({"X-Error-Code": err.code} if err.code else {})
                self._send(err.status, json.dumps({"error": err.message}).encode(), headers)
            except Exception as exc:  # a bug here, or a payload we do not understand: say so, fast
                hub.errors.append(traceback.format_exc())
                body = json.dumps({"error": f"LocalHub error: {exc!r}"}).encode()
                self._send(400, body, {"Content-Type": "application/json", "X-Error-Message": "LocalHub error"})

    def _route(self, path: str, query: dict) -> None:
        hub, method = self.server.hub, self.command
        if m := API_RE.match(path):
            return self._api(TYPES[m[1]], unquote(m[2]), m[3] or "", query)
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo()
        if path == "/api/repos/delete" and method == "DELETE":
            payload = json.loads(self.body)
            key = (payload.get("type") or "model", f"{payload.get('organization') or hub.user}/{payload['name']}")
            self._repo(*key, write=True)
            del hub.repos[key]
            return self._json({})
        if path == "/api/whoami-v2" and method == "GET":
            self._authenticated(required=True)
            auth = {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}}
            return self._json({"type": "user", "name": hub.user, "fullname": hub.user, "orgs": [], "auth": auth})
        if path == "/api/validate-yaml" and method == "POST":  # sent before committing a README.md: accept all
            return self._json({"errors": [], "warnings": []})
        if (m := LFS_BATCH_RE.match(path)) and method == "POST":
            return self._lfs_batch(TYPES[m[1]], unquote(m[2]))
        if (m := LFS_PUT_RE.match(path)) and method == "PUT":  # basic transfer; like a signed URL, no auth
            if hashlib.sha256(self.body).hexdigest() != m[1]:
                raise HubError(400, "LFS upload does not match its sha256")
            hub.lfs[m[1]] = self.body
            return self._send(200, headers={"ETag": f'"{m[1]}"'})
        if path == "/_lfs/verify" and method == "POST":
            obj = json.loads(self.body)
            if obj["oid"] not in hub.lfs or len(hub.lfs[obj["oid"]]) != obj["size"]:
                raise HubError(404, "LFS object not found")
            return self._json({})
        if (m := CDN_RE.match(path)) and method in ("GET", "HEAD") and m[2] in hub.lfs:
            return self._bytes(hub.lfs[m[2]], {"ETag": f'"{m[2]}"', "X-Repo-Commit": m[1]})
        if (m := RESOLVE_RE.match(path)) and method in ("GET", "HEAD"):
            return self._resolve_file(TYPES[m[1]], unquote(m[2]), m[3], unquote(m[4]))
        raise HubError(404, f"LocalHub has no route for {method} {path}")

    # --- auth, repos and revisions ---
    def _authenticated(self, required: bool = False) -> bool:
        """True for the valid token, False for no token; a wrong token is always 401, as on the Hub."""
        header = self.headers.get("Authorization")
        if header is None and required:
            raise HubError(401, "You must be authenticated to access this resource")
        if header is not None and header != f"Bearer {self.server.hub.token}":
            raise HubError(401, "Invalid credentials in Authorization header")
        return header is not None

    def _repo(self, repo_type: str, repo_id: str, write: bool = False) -> Repo:
        authed = self._authenticated(required=write)
        repo = self.server.hub.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authed):  # like the Hub: 401 when anonymous, else 404
            raise HubError(404 if authed else 401, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _revision(repo: Repo, quoted_revision: str) -> str:
        """Branch name or full commit sha -> commit sha."""
        revision = unquote(quoted_revision)
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _create_repo(self) -> None:
        hub, payload = self.server.hub, json.loads(self.body)
        self._authenticated(required=True)
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or hub.user}/{payload['name']}"
        if (repo_type, repo_id) in hub.repos:
            raise HubError(409, f"You already created this {repo_type} repo")
        private = bool(payload.get("private")) or payload.get("visibility") == "private"  # 1.x and 2.x payloads
        hub.create_repo(repo_id, repo_type, private=private)
        self._json({"url": f"{hub.url}/{PREFIX[repo_type]}{repo_id}", "name": repo_id, "id": repo_id})

    # --- /api/{type}s/{ns}/{name}/... ---
    def _api(self, repo_type: str, repo_id: str, rest: str, query: dict) -> None:
        action, _, arg = rest.partition("/")
        method = self.command
        repo = self._repo(repo_type, repo_id, write=method != "GET")
        if method == "GET" and action in ("", "revision"):  # repo_info / model_info; snapshot_download starts here
            sha = self._revision(repo, arg if action else "main")
            siblings = [
                {"rfilename": path, "size": len(f.data), "blobId": f.oid, "lfs": None if not f.lfs else
                 {"sha256": f.sha256, "size": len(f.data), "pointerSize": len(f.pointer)}}
                for path, f in sorted(repo.commits[sha].items())
            ]  # fmt: skip
            info = dict(_id=repo_id, id=repo_id, author=repo_id.split("/")[0], sha=sha, private=repo.private, tags=[])
            info.update(gated=False, disabled=False, lastModified=DATE, createdAt=DATE, siblings=siblings)
            return self._json(info)
        if method == "GET" and action == "tree":  # list_repo_tree / list_repo_files / snapshot_download
            revision, _, sub = arg.partition("/")
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            return self._json(self._tree(repo.commits[self._revision(repo, revision)], unquote(sub), recursive))
        if method == "GET" and action == "refs":
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in repo.branches.items()]
            return self._json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})
        if method == "POST" and action == "preupload":
            return self._preupload(repo, arg)
        if method == "POST" and action == "commit":
            if query.get("create_pr"):
                raise HubError(400, "LocalHub does not support pull requests (create_pr)")
            return self._commit(repo, repo_type, repo_id, unquote(arg))
        if action == "branch" and method == "POST":  # create_branch, from `startingPoint` or main
            if unquote(arg) in repo.branches:
                raise HubError(409, "Reference already exists")
            start = json.loads(self.body or b"{}").get("startingPoint") or "main"
            repo.branches[unquote(arg)] = self._revision(repo, start)
            return self._json({})
        if action == "branch" and method == "DELETE" and unquote(arg) in repo.branches and unquote(arg) != "main":
            del repo.branches[unquote(arg)]
            return self._json({})
        raise HubError(404, f"LocalHub has no route for {method} /api/{repo_type}s/{repo_id}/{rest}")

    @staticmethod
    def _tree(tree: dict[str, File], sub: str, recursive: bool) -> list[dict]:
        """Entries under folder `sub`, like GET /api/models/{id}/tree/{rev}/{sub}: folders first met, then files."""
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        entries, seen_folders = [], set()
        for path, f in sorted(tree.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):  # folders on the way
                folder = prefix + "/".join(parts[:depth])
                if folder not in seen_folders:
                    seen_folders.add(folder)
                    oid = hashlib.sha1(folder.encode()).hexdigest()
                    entries.append({"type": "directory", "oid": oid, "size": 0, "path": folder})
            if recursive or len(parts) == 1:
                entry = {"type": "file", "oid": f.oid, "size": len(f.data), "path": path}
                if f.lfs:
                    entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": len(f.pointer)}
                entries.append(entry)
        if prefix and not entries:
            raise HubError(404, f"{sub} does not exist", "EntryNotFound")
        return entries

    # --- upload: preupload -> (LFS batch + PUT + verify) -> ndjson commit ---
    def _preupload(self, repo: Repo, revision: str) -> None:
        current, answer = repo.commits[self._revision(repo, revision)], []
        for f in json.loads(self.body)["files"]:
            sample = base64.b64decode(f["sample"])  # first 512 bytes
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE or b"\0" in sample
            old = current.get(f["path"])  # the client drops a file whose oid this matches (no empty commit)
            oid = None if old is None or old.lfs != lfs else (old.sha256 if lfs else old.oid)
            mode = "lfs" if lfs else "regular"
            answer.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._json({"files": answer})

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        hub = self.server.hub
        self._repo(repo_type, repo_id, write=True)
        objects = []
        for obj in json.loads(self.body)["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in hub.lfs:  # no "actions" = already stored, the client skips the upload
                upload, verify = {"href": f"{hub.url}/_lfs/{obj['oid']}"}, {"href": f"{hub.url}/_lfs/verify"}
                answer["actions"] = {"upload": upload, "verify": verify}
            objects.append(answer)
        self._json({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _commit(self, repo: Repo, repo_type: str, repo_id: str, branch: str) -> None:
        hub = self.server.hub
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch} (commits go to a branch)", "RevisionNotFound")
        if header.get("parentCommit") not in (None, repo.branches[branch]):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        tree = dict(repo.commits[repo.branches[branch]])
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":  # regular file, inline
                content = value["content"]
                data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                tree[value["path"]] = File(data, lfs=False)
            elif key == "lfsFile":  # uploaded before through the LFS batch API
                if value["oid"] not in hub.lfs:
                    raise HubError(422, f"LFS object {value['oid']} was never uploaded")
                tree[value["path"]] = File(hub.lfs[value["oid"]], lfs=True)
            elif key == "deletedFile":
                if tree.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                tree = {p: f for p, f in tree.items() if not p.startswith(value["path"].rstrip("/") + "/")}
        sha = hub.commit(repo, branch, tree, header.get("summary", ""))
        commit_url = f"{hub.url}/{PREFIX[repo_type]}{repo_id}/commit/{sha}"
        self._json({"success": True, "commitOid": sha, "commitUrl": commit_url, "pullRequestUrl": None})

    # --- download: HEAD (metadata) and GET on /{repo_id}/resolve/{revision}/{filename} ---
    def _resolve_file(self, repo_type: str, repo_id: str, revision: str, filename: str) -> None:
        repo = self._repo(repo_type, repo_id)
        sha = self._revision(repo, revision)
        f = repo.commits[sha].get(filename)
        if f is None:  # X-Repo-Commit lets the client cache the miss under .no_exist/<sha>/
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "ETag": f'"{f.oid}"'}
        if not f.lfs:
            return self._bytes(f.data, headers)
        # LFS: like the Hub, redirect to a "CDN", here on the same host. The client follows same-host redirects even
        # for HEAD, so the CDN answer repeats X-Repo-Commit and carries the sha256 as its ETag.
        headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(len(f.data))})
        self._send(302, headers={**headers, "Location": f"{self.server.hub.url}/_cdn/{sha}/{f.sha256}"})


@contextlib.contextmanager
def use_local_hub(hub: LocalHub, hf_home: str | Path, login: bool = True):
    """Point the already-imported `huggingface_hub` at `hub`, with a private HF_HOME; all undone on exit.

    With `login=True`, HF_TOKEN is the hub's valid token, as for a logged-in user (pass `token=False` to a call to
    act anonymously, or `token="..."` to try another token)."""
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import close_session

    home = Path(hf_home)
    home.mkdir(parents=True, exist_ok=True)
    cache, assets = str(home / "hub"), str(home / "assets")
    env = dict(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_CACHE=cache, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")  # fmt: skip
    consts = dict(ENDPOINT=hub.url, HUGGINGFACE_CO_URL_TEMPLATE=hub.url + "/{repo_id}/resolve/{revision}/{filename}",
                  HF_HOME=str(home), HF_HUB_CACHE=cache, HUGGINGFACE_HUB_CACHE=cache, HF_ASSETS_CACHE=assets,
                  HUGGINGFACE_ASSETS_CACHE=assets, HF_XET_CACHE=str(home / "xet"), HF_TOKEN_PATH=str(home / "token"),
                  HF_STORED_TOKENS_PATH=str(home / "stored_tokens"), HF_HUB_OFFLINE=False, HF_HUB_DISABLE_XET=True,
                  HF_HUB_DISABLE_TELEMETRY=True)  # fmt: skip
    if hasattr(constants, "HF_URL_HOSTS"):  # hosts whose URLs count as Hub URLs (hf:// parsing, redirects)
        consts["HF_URL_HOSTS"] = frozenset(constants.HF_URL_HOSTS) | {"127.0.0.1"}
    with pytest.MonkeyPatch.context() as mp:
        for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE", "HF_HUB_ENABLE_HF_TRANSFER"):
            mp.delenv(key, raising=False)
        for key, value in {**env, **({"HF_TOKEN": hub.token} if login else {})}.items():
            mp.setenv(key, value)
        for key, value in consts.items():
            if hasattr(constants, key):
                mp.setattr(constants, key, value)
        mp.setattr(hf_api.api, "endpoint", hub.url)  # the HfApi() behind huggingface_hub.upload_folder & co
        close_session()  # fresh httpx client: no pooled connection nor proxy setting from before
        try:
            yield hub
        finally:
            close_session()


@contextlib.contextmanager
def offline_mode():
    """HF_HUB_OFFLINE=1 for an already-imported huggingface_hub (the env var alone is only read at import)."""
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture
def hub(tmp_path):
    """A fresh LocalHub per test; huggingface_hub points at it, HF_HOME/HF_HUB_CACHE live under tmp_path."""
    with LocalHub() as server, use_local_hub(server, tmp_path / "hf_home"):
        yield server
