"""An HTTP server of the files under a directory, with Range support, for the remote-input tests.

`serve(root, **options)` yields (base URL, state). Options (the state's keys): `fail_every` answers every
N-th ranged GET 429 or 500 (alternately), `down_except_footers` answers 503 to ranged GETs that do not reach
the end of the file, `unavailable` answers 503 to the next N requests of `part_*` files. Paths under
/forbidden/ are answered 403. The state counts requests (method, name), ranged GETs and faults, every GET
served (name, start, end, size) and the body bytes served per relative path (`served`).
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class RangeFiles(BaseHTTPRequestHandler):
    """GET/HEAD of files under `state["root"]` with `Range: bytes=a-b | a- | -n` (see the module docstring)."""

    def __init__(self, *args, state: dict, **kwargs):
        self.state = state
        super().__init__(*args, **kwargs)

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:  # noqa: N802 (http.server API)
        self._serve(head=True)

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        relative = self.path.split("?")[0].lstrip("/")
        path = Path(self.state["root"]) / relative
        with self.state["lock"]:
            self.state["requests"].append(("HEAD" if head else "GET", path.name))
            overloaded = self.state["unavailable"] > 0 and path.name.startswith("part_")
            self.state["unavailable"] -= overloaded
        if relative.startswith("forbidden/"):
            self.send_error(403)
            return
        if overloaded:  # the next N requests of tile files: the server is briefly overloaded
            self.send_error(503)
            return
        if not path.is_file():
            self.send_error(404)
            return
        data, ranged = path.read_bytes(), self.headers.get("Range")
        start, end = 0, len(data)
        if ranged and not head:
            with self.state["lock"]:
                self.state["ranged"] += 1
                fault = self.state["fail_every"] and self.state["ranged"] % self.state["fail_every"] == 0
                self.state["faults"] += bool(fault)
            if fault:
                self.send_error(429 if self.state["faults"] % 2 else 500)
                return
            first, last = re.fullmatch(r"bytes=(\d*)-(\d*)", ranged).groups()
            start, end = (len(data) - int(last), len(data)) if not first else (
                int(first), min(len(data), int(last) + 1) if last else len(data))
            if self.state["down_except_footers"] and end < len(data):
                self.send_error(503)
                return
        self._send(data, start, end, partial_content=bool(ranged) and not head, head=head, relative=relative)

    def _send(self, data: bytes, start: int, end: int, partial_content: bool, head: bool, relative: str) -> None:
        body = data[start:end]
        self.send_response(206 if partial_content else 200)
        self.send_header("Content-Length", str(len(body) if not head else len(data)))
        self.send_header("Accept-Ranges", "bytes")
        if partial_content:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if not head:
            self.wfile.write(body)
            with self.state["lock"]:
                self.state["gets"].append((Path(relative).name, start, end, len(data)))
                self.state["served"][relative] += len(body)


def new_state(root: str | Path, **options) -> dict:
    state = {"root": str(root), "lock": threading.Lock(), "fail_every": 0, "down_except_footers": False,
             "unavailable": 0, "requests": [], "ranged": 0, "faults": 0, "gets": [], "served": Counter()}
    unknown = set(options) - set(state)
    assert not unknown, f"unknown options {unknown}"
    return {**state, **options}


@contextmanager
def serve(root: str | Path, **options) -> Iterator[tuple[str, dict]]:
    """(base URL, state) of a server on 127.0.0.1 over `root`; point state["root"] elsewhere to serve a copy."""
    state = new_state(root, **options)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeFiles, state=state))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
