"""A loopback fake of the Hugging Face Hub routes that huggingface_hub's client calls.

It answers every upload with ``"uploadMode": "regular"`` (no LFS, no Xet), so eight routes are
enough for the real client to create repos, commit, tag, branch, list, resolve and download:

    POST /api/repos/create                         POST /api/validate-yaml
    POST /api/models/{repo}/preupload/{rev}        POST /api/models/{repo}/commit/{rev}   (NDJSON)
    POST /api/models/{repo}/tag/{rev}              POST /api/models/{repo}/branch/{branch}
    GET  /api/models/{repo}[/revision/{rev}]       GET  /api/models/{repo}/tree/{rev}[/{path}]
    HEAD|GET /{repo}/resolve/{rev}/{path}

Like the Hub: commits form a chain per branch, ``parentCommit`` that is not the branch head is
answered 412, private repos need the token, missing things carry ``X-Error-Code``. Unlike it: no
LFS/Xet transfer, no pagination, no pull requests, no rate limits, no gated repos.
Tests can reach into the storage (``put_raw``, ``tamper``) to play a hostile or corrupted repo.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, bytes]
    message: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        if rev in self.commits:
            return rev
        return None


class FakeHub:
    """Holds the repos and runs the HTTP server on 127.0.0.1 (a free port) in a thread."""

    def __init__(self, token: str = "hf_fake_token") -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.commit_bodies: list[list[dict[str, Any]]] = []  # the NDJSON lines of every commit
        self._lock = threading.Lock()
        self._counter = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---------------------------------------------------------------- storage helpers for tests

    def new_commit(self, repo: Repo, branch: str, files: dict[str, bytes], message: str) -> Commit:
        with self._lock:
            self._counter += 1
            parent = repo.branches.get(branch)
            oid = hashlib.sha1(f"{repo.repo_id}:{self._counter}:{parent}".encode()).hexdigest()
            commit = Commit(oid, parent, files, message)
            repo.commits[oid] = commit
            repo.branches[branch] = oid
            return commit

    def head_files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.resolve(rev)].files)

    def put_raw(self, repo_id: str, path: str, data: bytes | None, branch: str = "main") -> str:
        """Commit one file (or delete it with ``data=None``) bypassing every check; returns the oid."""
        files = self.head_files(repo_id, branch)
        if data is None:
            files.pop(path, None)
        else:
            files[path] = data
        return self.new_commit(self.repos[repo_id], branch, files, f"raw {path}").oid

    def tamper(self, repo_id: str, path: str, offset: int = -1) -> str:
        """Flip one byte of ``path`` in a new commit (a corrupted upload or a malicious edit)."""
        data = bytearray(self.head_files(repo_id)[path])
        data[offset] ^= 0x01
        return self.put_raw(repo_id, path, bytes(data))


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:  # keep test output clean
            pass

        # ------------------------------------------------------------ plumbing

        def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None, raw: bytes | None = None) -> None:
            data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if raw is None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, status: int, code: str, message: str) -> None:
            self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _authorised(self) -> bool:
            return self.headers.get("Authorization") == f"Bearer {hub.token}"

        def _repo(self, repo_id: str, *, write: bool = False) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if write and not self._authorised():
                self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
                return None
            if repo is None or (repo.private and not self._authorised()):
                self._error(404 if repo is None else 401, "RepoNotFound", f"Repository {repo_id} not found")
                return None
            return repo

        def _rev(self, repo: Repo, rev: str) -> str | None:
            oid = repo.resolve(rev)
            if oid is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return oid

        # ------------------------------------------------------------ dispatch

        def do_HEAD(self) -> None:  # noqa: N802
            self._dispatch()

        def do_GET(self) -> None:  # noqa: N802
            self._dispatch()

        def do_POST(self) -> None:  # noqa: N802
            self._dispatch()

        def _dispatch(self) -> None:
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.split("/")[1:]]
            query = parse_qs(url.query)
            hub.requests.append((self.command, url.path))
            if parts[:1] == ["api"]:
                self._api(parts[1:], query)
            elif len(parts) >= 5 and parts[2] == "resolve" and self.command in ("GET", "HEAD"):
                self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            else:
                self._error(404, "NotFound", f"no route {self.command} {url.path}")

        def _api(self, parts: list[str], query: dict[str, list[str]]) -> None:
            if self.command == "POST" and parts == ["repos", "create"]:
                return self._create()
            if self.command == "POST" and parts == ["validate-yaml"]:
                return self._validate_yaml()
            if len(parts) < 3 or parts[0] != "models":
                return self._error(404, "NotFound", f"no route {self.path}")
            repo_id, rest = f"{parts[1]}/{parts[2]}", parts[3:]
            if self.command == "GET" and (not rest or rest[0] == "revision"):
                return self._info(repo_id, rest[1] if len(rest) > 1 else "main")
            if self.command == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), "true" in query.get("recursive", []))
            if self.command == "POST" and len(rest) == 2 and rest[0] in ("preupload", "commit", "tag", "branch"):
                return getattr(self, f"_{rest[0]}")(repo_id, rest[1])
            return self._error(404, "NotFound", f"no route {self.command} {self.path}")

        # ------------------------------------------------------------ routes

        def _create(self) -> None:
            if not self._authorised():
                return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
            payload = json.loads(self._body())
            repo_id = f"{payload.get('organization') or 'fake-user'}/{payload['name']}"
            if repo_id in hub.repos:
                return self._send(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
            repo = Repo(repo_id, private=payload.get("visibility") == "private")
            hub.repos[repo_id] = repo
            hub.new_commit(repo, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "initial commit")
            self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def _validate_yaml(self) -> None:
            content = json.loads(self._body()).get("content", "")
            block = re.match(r"^\s*---[\r\n]+(.*?)[\r\n]+---[\r\n]", content, re.DOTALL)  # the card's front matter
            errors = []
            try:
                meta = yaml.safe_load(block.group(1)) if block else None
            except yaml.YAMLError as exc:
                meta, errors = None, [{"message": f"invalid YAML: {exc}"}]
            if meta is not None and not isinstance(meta, dict):
                errors.append({"message": "metadata must be a mapping"})
            for entry in (meta or {}).get("model-index", []) if isinstance(meta, dict) else []:
                for result in entry.get("results", []):
                    if not {"task", "dataset", "metrics"} <= set(result) or "type" not in result["task"]:
                        errors.append({"message": f"model-index result lacks task.type/dataset/metrics: {result}"})
                    for metric in result.get("metrics", []):
                        if not {"type", "value"} <= set(metric):
                            errors.append({"message": f"model-index metric lacks type/value: {metric}"})
            self._send(400 if errors else 200, {"errors": errors, "warnings": []})

        def _info(self, repo_id: str, rev: str) -> None:
            repo = self._repo(repo_id)
            oid = repo and self._rev(repo, rev)
            if oid:
                files = repo.commits[oid].files
                self._send(200, {"id": repo_id, "modelId": repo_id, "sha": oid, "private": repo.private,
                                 "siblings": [{"rfilename": p} for p in sorted(files)], "tags": [], "downloads": 0})

        def _tree(self, repo_id: str, rev: str, under: str, recursive: bool) -> None:
            repo = self._repo(repo_id)
            oid = repo and self._rev(repo, rev)
            if not oid:
                return
            prefix = f"{under}/" if under else ""
            entries, dirs = [], set()
            for path, data in sorted(repo.commits[oid].files.items()):
                if not path.startswith(prefix):
                    continue
                rel = path[len(prefix):].split("/")
                for depth in range(1, len(rel)):
                    if recursive or depth == 1:
                        dirs.add(prefix + "/".join(rel[:depth]))
                if recursive or len(rel) == 1:
                    entries.append({"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path})
            entries += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d} for d in sorted(dirs)]
            if under and not entries:
                return self._error(404, "EntryNotFound", f"{under} does not exist on {rev}")
            self._send(200, entries)

        def _preupload(self, repo_id: str, rev: str) -> None:
            repo = self._repo(repo_id, write=True)
            oid = repo and self._rev(repo, rev)
            if not oid:
                return
            files = repo.commits[oid].files
            payload = json.loads(self._body())
            answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                       "oid": git_blob_sha1(files[f["path"]]) if f["path"] in files else None} for f in payload["files"]]
            self._send(200, {"files": answer, "commitOid": oid})

        def _commit(self, repo_id: str, rev: str) -> None:
            repo = self._repo(repo_id, write=True)
            body = self._body()
            if repo is None:
                return
            if rev not in repo.branches:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            hub.commit_bodies.append(lines)
            header = lines[0]["value"]
            head = repo.branches[rev]
            if header.get("parentCommit") and header["parentCommit"] != head:
                return self._send(412, {"error": f"A commit has happened since {header['parentCommit']}. Please refresh and try again."})
            files = dict(repo.commits[head].files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    if value["path"] not in files:
                        return self._error(404, "EntryNotFound", f"A file with this name doesn't exist: {value['path']}")
                    del files[value["path"]]
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    files = {p: d for p, d in files.items() if not p.startswith(folder)}
                else:
                    return self._send(400, {"error": f"this fake only takes regular uploads, got {key!r}"})
            commit = hub.new_commit(repo, rev, files, header.get("summary", ""))
            self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{commit.oid}", "commitOid": commit.oid,
                             "pullRequestUrl": None})

        def _tag(self, repo_id: str, rev: str) -> None:
            repo = self._repo(repo_id, write=True)
            payload = json.loads(self._body() or b"{}")
            oid = repo and self._rev(repo, rev)
            if not oid:
                return
            if payload["tag"] in repo.tags:
                return self._send(409, {"error": f"Tag {payload['tag']} already exists"})
            repo.tags[payload["tag"]] = oid
            self._send(200, {})

        def _branch(self, repo_id: str, branch: str) -> None:
            repo = self._repo(repo_id, write=True)
            payload = json.loads(self._body() or b"{}")
            if repo is None:
                return
            if branch in repo.branches:
                return self._send(409, {"error": f"Branch {branch} already exists"})
            start = repo.resolve(payload.get("startingPoint") or "main")
            repo.branches[branch] = start
            self._send(200, {})

        def _resolve(self, repo_id: str, rev: str, path: str) -> None:
            repo = self._repo(repo_id)
            oid = repo and self._rev(repo, rev)
            if not oid:
                return
            data = repo.commits[oid].files.get(path)
            if data is None:
                return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}")
            etag = git_blob_sha1(data)
            self._send(200, raw=data, headers={"X-Repo-Commit": oid, "ETag": f'"{etag}"',
                                               "Content-Type": "application/octet-stream"})

    return Handler
