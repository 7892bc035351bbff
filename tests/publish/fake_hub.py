"""A loopback HTTP server speaking the slice of the Hugging Face Hub API that an upload uses.

Shapes follow huggingface_hub 1.x (hf_api.create_repo / create_branch / list_repo_tree / _validate_yaml,
_commit_api._fetch_upload_modes / _send_commit, lfs.post_lfs_batch_info / lfs_upload). Files ending in
.safetensors are answered "lfs" at preupload (as the Hub does), everything else "regular".
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, unquote, urlparse

import yaml

MAX_BODY = 64 * 2**20


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Repo:
    private: bool
    branches: dict = field(default_factory=lambda: {"main": {".gitattributes": b"*.safetensors filter=lfs\n"}})
    commits: list = field(default_factory=list)  # (branch, summary, {path: bytes}, [deleted])
    lfs_paths: set = field(default_factory=set)


@dataclass
class Failure:
    method: str
    pattern: str  # regex searched in the request path
    status: int
    times: int
    error_code: Optional[str] = None


class HubState:
    def __init__(self, token: Optional[str]):
        self.token = token  # when set, any other Authorization gets 401
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self.auth_headers: list[Optional[str]] = []
        self.failures: list[Failure] = []
        self.lock = threading.Lock()

    def fail(self, method: str, pattern: str, status: int, times: int = 1, error_code: Optional[str] = None):
        self.failures.append(Failure(method, pattern, status, times, error_code))

    def calls(self, method: str, pattern: str) -> int:
        return sum(1 for m, p in self.requests if m == method and re.search(pattern, p))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10
    state: HubState
    base: str

    def log_message(self, *args):  # keep test output quiet
        pass

    # -- plumbing ---------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY:
                    raise ValueError("body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length)

    def _send(self, status: int, payload=None, headers: Optional[dict] = None):
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, code: Optional[str] = None):
        self._send(status, {"error": message}, {"X-Error-Code": code} if code else None)

    def _dispatch(self, method: str):
        url = urlparse(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        body = self._body()
        state = self.state
        with state.lock:
            state.requests.append((method, path))
            state.auth_headers.append(self.headers.get("Authorization"))
            for failure in state.failures:
                if failure.times > 0 and failure.method == method and re.search(failure.pattern, path):
                    failure.times -= 1
                    return self._error(failure.status, f"injected {failure.status}", failure.error_code)
            presigned = path.startswith("/lfs-upload/")  # like an S3 URL: no Authorization header
            if state.token is not None and not presigned and self.headers.get("Authorization") != f"Bearer {state.token}":
                return self._error(401, "Invalid credentials in Authorization header")
            return self._route(method, path, query, body)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # -- the API ----------------------------------------------------------------------------------
    def _route(self, method, path, query, body):
        state = self.state
        if method == "POST" and path == "/api/repos/create":
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            if repo_id in state.repos:
                # The Hub's 409 carries the url too; create_repo(exist_ok=True) reads it.
                return self._send(409, {"error": "You already created this model repo", "url": f"{self.base}/{repo_id}"})
            state.repos[repo_id] = Repo(private=req.get("visibility") == "private")
            return self._send(200, {"url": f"{self.base}/{repo_id}", "name": repo_id})
        if method == "POST" and path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            try:
                meta = yaml.safe_load(match.group(1)) if match else None
            except yaml.YAMLError as err:
                return self._send(400, {"errors": [{"message": str(err)}], "warnings": []})
            if not isinstance(meta, dict):
                return self._send(400, {"errors": [{"message": "no metadata"}], "warnings": []})
            return self._send(200, {"errors": [], "warnings": []})
        if method == "PUT" and path.startswith("/lfs-upload/"):
            oid = path.rsplit("/", 1)[1]
            if hashlib.sha256(body).hexdigest() != oid:
                return self._error(400, "sha256 mismatch")
            state.lfs[oid] = body
            return self._send(200, {})
        if method == "POST" and path == "/lfs-verify":
            req = json.loads(body)
            ok = req["oid"] in state.lfs and len(state.lfs[req["oid"]]) == req["size"]
            return self._send(200 if ok else 404, {})
        m = re.match(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$", path)
        if m and method == "POST":
            if m["repo"] not in state.repos:
                return self._error(404, "Repository not found", "RepoNotFound")
            req = json.loads(body)
            objects = []
            for obj in req["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in state.lfs:
                    entry["actions"] = {"upload": {"href": f"{self.base}/lfs-upload/{obj['oid']}"},
                                        "verify": {"href": f"{self.base}/lfs-verify"}}
                objects.append(entry)
            return self._send(200, {"transfer": "basic", "objects": objects})
        m = re.match(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<op>tree|preupload|commit|branch)/(?P<rev>[^/]+)(?P<sub>/.*)?$", path)
        if m is None:
            return self._error(404, f"no route for {method} {path}")
        repo = state.repos.get(m["repo"])
        if repo is None:
            return self._error(404, "Repository not found", "RepoNotFound")
        op, rev = m["op"], m["rev"]
        if op == "branch" and method == "POST":
            if rev in repo.branches:
                return self._error(409, "Reference already exists")
            start = json.loads(body or b"{}").get("startingPoint") or "main"
            repo.branches[rev] = dict(repo.branches[start])
            return self._send(200, {})
        files = repo.branches.get(rev)
        if files is None:
            return self._error(404, "Revision not found", "RevisionNotFound")
        if op == "tree" and method == "GET":
            return self._send(200, [self._entry(repo, p, d) for p, d in sorted(files.items())])
        if op == "preupload" and method == "POST":
            out = []
            for item in json.loads(body)["files"]:
                lfs = item["path"].endswith(".safetensors")
                old = files.get(item["path"])
                oid = None if old is None else (hashlib.sha256(old).hexdigest() if lfs else git_oid(old))
                out.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular",
                            "shouldIgnore": False, "oid": oid})
            return self._send(200, {"files": out, "commitOid": "0" * 40})
        if op == "commit" and method == "POST":
            return self._commit(repo, m["repo"], rev, body)
        return self._error(405, f"{method} not allowed on {op}")

    def _entry(self, repo: Repo, path: str, data: bytes) -> dict:
        if path in repo.lfs_paths:
            sha = hashlib.sha256(data).hexdigest()
            pointer = lfs_pointer(sha, len(data))
            return {"type": "file", "path": path, "size": len(data), "oid": git_oid(pointer),
                    "lfs": {"oid": sha, "size": len(data), "pointerSize": len(pointer)}}
        return {"type": "file", "path": path, "size": len(data), "oid": git_oid(data)}

    def _commit(self, repo: Repo, repo_id: str, rev: str, body: bytes):
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return self._error(400, "commit payload must start with a header")
        added, deleted = {}, []
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                added[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.state.lfs:
                    return self._error(422, f"LFS object {value['oid']} was not uploaded")
                added[value["path"]] = self.state.lfs[value["oid"]]
                repo.lfs_paths.add(value["path"])
            elif line["key"] == "deletedFile":
                deleted.append(value["path"])
            else:
                return self._error(400, f"unsupported operation {line['key']}")
        files = repo.branches[rev]
        for path in deleted:
            files.pop(path, None)
        files.update(added)
        repo.commits.append((rev, lines[0]["value"]["summary"], added, deleted))
        oid = hashlib.sha1(f"{repo_id}{len(repo.commits)}".encode()).hexdigest()
        return self._send(200, {"commitUrl": f"{self.base}/{repo_id}/commit/{oid}", "commitOid": oid,
                                "pullRequestUrl": None})


class FakeHub:
    """`with FakeHub() as hub:` serves on 127.0.0.1:<free port> until the block ends."""

    def __init__(self, token: Optional[str] = None):
        self.state = HubState(token)
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeHub":
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        handler.base = self.url
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
