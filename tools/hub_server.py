"""A Hugging Face Hub-compatible HTTP server on loopback for tests and benchmarks: a directory as a dataset repo.

    with HubServer(directory, "org/name") as hub:        # http://127.0.0.1:PORT, one commit of `directory`
        hub.fail("images/part_00001.parquet", 429, times=2, retry_after=1)
        subprocess.run(cmd, env=os.environ | hub.env)   # HF_ENDPOINT, and every other host refused
        hub.stats()                                      # requests and bytes served, per kind and path

It answers what huggingface_hub's HfFileSystem calls for ls / find / glob / info / open of
`hf://datasets/ORG/NAME[@REV]/...` (hf_file_system.py, hf_api.py, file_download.py):

    GET  /api/datasets/ORG/NAME[/revision/REV]            repo_info: id, sha (the revision check)
    GET  /api/datasets/ORG/NAME/tree/REV[/PATH]?recursive=&expand=[&cursor=]
                                                          one page of entries; the next page's URL in a
                                                          `Link: <...>; rel="next"` header (as the Hub)
    POST /api/datasets/ORG/NAME/paths-info/REV            form paths=...&expand=...
    HEAD/GET /datasets/ORG/NAME/resolve/REV/PATH          X-Repo-Commit, ETag, Content-Length, Accept-Ranges;
                                                          `Range: bytes=a-b` -> 206 with Content-Range
    LFS files (*.parquet and files over 10 MiB, as the Hub stores them) answer resolve with a 302
    (X-Linked-Size, X-Linked-Etag) to /cdn/SHA256/PATH on a second port, another origin, as the Hub
    redirects to its CDN: a ranged read costs the same two requests as against huggingface.co, and
    the client drops its Authorization header on the way, as it must.

REV is `main` or the commit sha. Errors carry the Hub's X-Error-Code (RepoNotFound, RevisionNotFound,
EntryNotFound), which the client maps to its exception types. Faults: `fail(path, status, times,
retry_after)` answers the next `times` requests of a repo path (None: every one) with `status`. A
request for any other host (through the proxy variables `env` sets) is refused and counted in
`stats()["foreign"]`, so a test can assert that the client never left 127.0.0.1.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import re
import sys
import threading
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LFS_SUFFIXES = (".parquet",)
LFS_MIN_BYTES = 10 << 20
PAGE_SIZE, EXPANDED_PAGE_SIZE = 1000, 50  # the Hub's tree page sizes
CHUNK = 1 << 20


@dataclass
class RepoEntry:
    path: str
    file: Path | None  # None: a directory
    size: int = 0


@dataclass
class Fault:
    path: str
    status: int
    times: int | None  # None: until cleared
    retry_after: float | None


class HubServer:
    """Context manager: `endpoint`, `env`, `sha`, `fail()`, `clear_faults()`, `stats()`, `reset_stats()`."""

    def __init__(self, root: Path | str, repo_id: str = "org/name", page_size: int = PAGE_SIZE):
        self.root, self.repo_id, self.page_size = Path(root), repo_id, page_size
        self.entries = _scan(self.root)
        listing = "\n".join(f"{e.path} {e.size}" for e in self.entries.values())
        self.sha = hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest()
        self.lock = threading.Lock()
        self.faults: list[Fault] = []
        self._hashes: dict[str, tuple[str, str]] = {}  # path -> (git blob oid, sha256)
        self.reset_stats()
        self.servers: dict[str, ThreadingHTTPServer] = {}  # "hub" (the endpoint) and "cdn"

    def __enter__(self) -> HubServer:
        for role in ("hub", "cdn"):
            server = _Server(("127.0.0.1", 0), type("Handler", (HubHandler,), {"hub": self, "role": role}))
            threading.Thread(target=server.serve_forever, daemon=True, name=f"hub-server-{role}").start()
            self.servers[role] = server
        return self

    def __exit__(self, *exc) -> None:
        for server in self.servers.values():
            server.shutdown()
            server.server_close()

    def origin(self, role: str) -> str:
        assert role in self.servers, "start the server first (with HubServer(...) as hub)"
        return f"http://127.0.0.1:{self.servers[role].server_address[1]}"

    @property
    def endpoint(self) -> str:
        return self.origin("hub")

    @property
    def url(self) -> str:
        """The repo as an hf:// URL."""
        return f"hf://datasets/{self.repo_id}"

    @property
    def env(self) -> dict[str, str]:
        """The environment of a client process: this endpoint, and a proxy that refuses any other host."""
        return {"HF_ENDPOINT": self.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1",
                "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                **{name: self.endpoint for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                                                    "http_proxy", "https_proxy", "all_proxy")},
                "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}

    def fail(self, path: str, status: int, times: int | None = 1, retry_after: float | None = None) -> None:
        """Answer the next `times` requests of repo path `path` (None: all of them) with HTTP `status`."""
        with self.lock:
            self.faults.append(Fault(path.strip("/"), status, times, retry_after))

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def reset_stats(self) -> None:
        with self.lock:
            self._stats = {"requests": Counter(), "bytes": Counter(), "faults": Counter(), "log": [],
                           "foreign": [], "authorization": Counter()}

    def stats(self) -> dict:
        """requests per kind (api, resolve, cdn), body bytes per repo path, faults per path, every
        request as (method, kind, path, Range, status), foreign hosts asked for, Authorization headers."""
        with self.lock:
            return {name: (value.copy() if hasattr(value, "copy") else value) for name, value in self._stats.items()}

    def hashes(self, path: str) -> tuple[str, str]:
        """(git blob oid, sha256) of a file, computed once (streamed)."""
        with self.lock:
            known = self._hashes.get(path)
        if known is None:
            entry, git, sha256 = self.entries[path], hashlib.sha1(), hashlib.sha256()
            git.update(f"blob {entry.size}\0".encode())
            with open(entry.file, "rb") as source:
                while chunk := source.read(CHUNK):
                    git.update(chunk)
                    sha256.update(chunk)
            known = (git.hexdigest(), sha256.hexdigest())
            with self.lock:
                self._hashes[path] = known
        return known

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES) or self.entries[path].size >= LFS_MIN_BYTES

    def take_fault(self, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.path == path and (fault.times is None or fault.times > 0):
                    if fault.times is not None:
                        fault.times -= 1
                    self._stats["faults"][path] += 1
                    return fault
        return None

    def record(self, method: str, kind: str, path: str, ranged: str | None, status: int, body: int,
               authorization: str | None) -> None:
        with self.lock:
            self._stats["requests"][kind] += 1
            self._stats["bytes"][path] += body
            self._stats["log"].append((method, kind, path, ranged, status))
            if authorization:
                self._stats["authorization"][authorization] += 1

    def record_foreign(self, target: str) -> None:
        with self.lock:
            self._stats["foreign"].append(target)

    def tree_entry(self, entry: RepoEntry, expand: bool) -> dict:
        if entry.file is None:
            item = {"type": "directory", "oid": hashlib.sha1(f"tree {entry.path}".encode()).hexdigest(),
                    "path": entry.path}
        else:
            oid, sha256 = self.hashes(entry.path)
            item = {"type": "file", "oid": oid, "size": entry.size, "path": entry.path}
            if self.is_lfs(entry.path):
                item["lfs"] = {"oid": sha256, "size": entry.size, "pointerSize": 134}
        if expand:
            item["lastCommit"] = {"id": self.sha, "title": "fixture", "date": "2026-01-01T00:00:00.000Z"}
        return item

    def children(self, path: str, recursive: bool) -> list[RepoEntry]:
        prefix = f"{path}/" if path else ""
        found = [e for p, e in self.entries.items() if p.startswith(prefix) and p != path]
        return found if recursive else [e for e in found if "/" not in e.path[len(prefix):]]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up (after a refused CONNECT, at exit) is not an error of the server."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def _scan(root: Path) -> dict[str, RepoEntry]:
    """Every file and folder under root, sorted by path; the Hub lists folders too."""
    entries: dict[str, RepoEntry] = {}
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = file.relative_to(root).as_posix()
        parts = relative.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            entries.setdefault(folder, RepoEntry(folder, None))
        entries[relative] = RepoEntry(relative, file, file.stat().st_size)
    return dict(sorted(entries.items()))


_API = re.compile(r"^/api/datasets/([^/]+/[^/]+)(?:/(revision|tree|paths-info)/([^/]+)(/.*)?)?$")
_RESOLVE = re.compile(r"^/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_CDN = re.compile(r"^/cdn/([0-9a-f]{64})/(.+)$")


class HubHandler(BaseHTTPRequestHandler):
    hub: HubServer
    role: str  # "hub" or "cdn"
    protocol_version = "HTTP/1.1"  # keep-alive, as the Hub

    def log_message(self, *args) -> None:
        pass

    def do_CONNECT(self) -> None:  # noqa: N802 (http.server API): an https request for another host
        self.hub.record_foreign(self.path)
        self.close_connection = True
        self._error(403, "Forbidden", "this test server only serves 127.0.0.1")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch()

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def _dispatch(self) -> None:
        if not self.path.startswith("/"):  # an absolute URL: a plain-http request for another host
            self.hub.record_foreign(self.path)
            self._error(403, "Forbidden", "this test server only serves 127.0.0.1")
            return
        length = int(self.headers.get("Content-Length") or 0)  # read now: the connection is kept alive
        self.body = self.rfile.read(length) if self.command == "POST" and length else b""
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path)
        if self.role == "hub" and (match := _API.match(url.path)):
            self._api(match, urllib.parse.parse_qs(url.query))
        elif self.role == "hub" and (match := _RESOLVE.match(path)) and self.command in ("GET", "HEAD"):
            self._resolve(match.group(1), urllib.parse.unquote(match.group(2)), match.group(3))
        elif self.role == "cdn" and (match := _CDN.match(path)) and self.command in ("GET", "HEAD"):
            self._cdn(match.group(1), match.group(2))
        else:
            self._error(404, None, f"no route {self.command} {url.path}")

    # --- the API ---

    def _api(self, match: re.Match, query: dict[str, list[str]]) -> None:
        repo_id, action, revision, rest = match.groups()
        path = urllib.parse.unquote(rest or "").strip("/")
        if self._repo_error(repo_id, urllib.parse.unquote(revision or "main"), "api", path):
            return
        if action in (None, "revision"):
            self._json("api", "", {"id": repo_id, "sha": self.hub.sha, "private": False,
                                   "siblings": [{"rfilename": p} for p, e in self.hub.entries.items() if e.file]})
        elif action == "tree":
            self._tree(path, query)
        else:
            form = urllib.parse.parse_qs(self.body.decode())
            expand = form.get("expand", ["False"])[0].lower() == "true"
            found = [self.hub.entries[p.strip("/")] for p in form.get("paths", []) if p.strip("/") in self.hub.entries]
            self._json("api", "", [self.hub.tree_entry(e, expand) for e in found])

    def _tree(self, path: str, query: dict[str, list[str]]) -> None:
        if self._fault("api", path):
            return
        entry = self.hub.entries.get(path) if path else RepoEntry("", None)
        if entry is None or entry.file is not None:
            self._error(404, "EntryNotFound", f"{path} does not exist on main", "api", path)
            return
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        expand = query.get("expand", ["false"])[0].lower() == "true"
        found = self.hub.children(path, recursive)
        start = int(base64.urlsafe_b64decode(query["cursor"][0]).decode()) if "cursor" in query else 0
        size = min(self.hub.page_size, EXPANDED_PAGE_SIZE) if expand else self.hub.page_size
        headers = {}
        if start + size < len(found):
            cursor = base64.urlsafe_b64encode(str(start + size).encode()).decode()
            following = urllib.parse.urlencode({**{k: v[0] for k, v in query.items()}, "cursor": cursor})
            headers["Link"] = f'<{self.hub.endpoint}{urllib.parse.urlsplit(self.path).path}?{following}>; rel="next"'
        self._json("api", path, [self.hub.tree_entry(e, expand) for e in found[start:start + size]], headers)

    def _repo_error(self, repo_id: str, revision: str, kind: str, path: str) -> bool:
        if repo_id != self.hub.repo_id:
            self._error(404, "RepoNotFound", "Repository not found", kind, path)
        elif revision not in ("main", self.hub.sha):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", kind, path)
        else:
            return False
        return True

    # --- files ---

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        if self._repo_error(repo_id, revision, "resolve", path) or self._fault("resolve", path):
            return
        entry = self.hub.entries.get(path)
        if entry is None or entry.file is None:
            self._error(404, "EntryNotFound", f"{path} does not exist", "resolve", path)
            return
        oid, sha256 = self.hub.hashes(path)
        headers = {"X-Repo-Commit": self.hub.sha, "Accept-Ranges": "bytes"}
        if not self.hub.is_lfs(path):
            self._file("resolve", path, entry, {**headers, "ETag": f'"{oid}"'})
            return
        location = f"{self.hub.origin('cdn')}/cdn/{sha256}/{urllib.parse.quote(path, safe='')}"
        self._send(302, {**headers, "Location": location, "ETag": f'"{oid}"', "X-Linked-Etag": f'"{sha256}"',
                         "X-Linked-Size": str(entry.size), "Content-Length": "0"}, b"", "resolve", path)

    def _cdn(self, sha256: str, quoted: str) -> None:
        path = urllib.parse.unquote(quoted)
        entry = self.hub.entries.get(path)
        if entry is None or entry.file is None or self.hub.hashes(path)[1] != sha256:
            self._error(404, None, "no such object", "cdn", path)
            return
        if not self._fault("cdn", path):
            self._file("cdn", path, entry, {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"})

    def _file(self, kind: str, path: str, entry: RepoEntry, headers: dict[str, str]) -> None:
        """The file, or the bytes of one `Range: bytes=a-b | a- | -n` (206); an unsatisfiable range is 416."""
        start, end, ranged = 0, entry.size, self.headers.get("Range")
        if ranged:
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", ranged.strip())
            first, last = match.groups() if match else ("", "")
            if not first and last:
                start = max(0, entry.size - int(last))
            elif first:
                start, end = int(first), min(entry.size, int(last) + 1) if last else entry.size
            if not match or start >= end:
                self._send(416, {"Content-Range": f"bytes */{entry.size}", "Content-Length": "0"}, b"", kind, path)
                return
            headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{entry.size}"}
        headers["Content-Length"] = str(end - start)
        headers["Last-Modified"] = email.utils.formatdate(entry.file.stat().st_mtime, usegmt=True)
        status = 206 if ranged else 200
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        sent = 0
        if self.command != "HEAD":
            with open(entry.file, "rb") as source:
                source.seek(start)
                while sent < end - start:
                    chunk = source.read(min(CHUNK, end - start - sent))
                    self.wfile.write(chunk)
                    sent += len(chunk)
        self.hub.record(self.command, kind, path, ranged, status, sent, self.headers.get("Authorization"))

    # --- plumbing ---

    def _fault(self, kind: str, path: str) -> bool:
        fault = self.hub.take_fault(path)
        if fault is None:
            return False
        headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
        message = {429: "Too Many Requests"}.get(fault.status, "injected fault")
        self._error(fault.status, None, message, kind, path, headers)
        return True

    def _json(self, kind: str, path: str, payload, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self._send(200, {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})},
                   body, kind, path)

    def _error(self, status: int, code: str | None, message: str, kind: str = "api", path: str = "",
               headers: dict[str, str] | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        extra = {"X-Error-Code": code, "X-Error-Message": message} if code else {}
        self._send(status, {"Content-Type": "application/json", "Content-Length": str(len(body)), **extra,
                            **(headers or {})}, body, kind, path)

    def _send(self, status: int, headers: dict[str, str], body: bytes, kind: str, path: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        self.hub.record(self.command, kind, path, self.headers.get("Range"), status,
                        0 if self.command == "HEAD" else len(body), self.headers.get("Authorization"))
