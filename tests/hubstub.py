"""A loopback HTTP server that speaks the hub's file endpoints, for offline tests and benchmarks.

It serves local folders as hub repos so that the real ``huggingface_hub`` client does the
work (``HF_ENDPOINT=http://127.0.0.1:PORT``):

- ``HEAD|GET /{org}/{name}/resolve/{revision}/{path}`` with ``X-Repo-Commit``, ``ETag``,
  ``Content-Length`` and HTTP range requests (206 + ``Content-Range``);
- ``GET /api/models/{org}/{name}[/revision/{revision}]``: repo info with ``siblings``;
- ``GET /api/models/{org}/{name}/tree/{revision}[/{path}]``: file listing;
- 404s carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) as the
  hub does. Every request can be delayed (``latency`` seconds) and is counted with the bytes sent.

Only binds to 127.0.0.1; the server stops with :meth:`HubStub.close`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote


class HubStub:
    """Serve ``{repo_id: folder}`` on loopback. Use as a context manager."""

    def __init__(self, repos: dict[str, Path], latency: float = 0.0, revision: str = "main") -> None:
        self.repos = {k: Path(v) for k, v in repos.items()}
        self.latency = latency
        self.revision = revision
        self.commit = {k: hashlib.sha1(f"{k}:{v}".encode()).hexdigest() for k, v in self.repos.items()}
        self.requests = 0
        self.bytes_sent = 0
        self.log: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                stub._handle(self, head=True)

            def do_GET(self) -> None:  # noqa: N802
                stub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> HubStub:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- request handling -------------------------------------------------------------

    def _send(
        self, h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str], head: bool
    ) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", headers.get("Content-Length", str(len(body))))
        h.end_headers()
        if not head:
            h.wfile.write(body)
            with self._lock:
                self.bytes_sent += len(body)

    def _error(self, h: BaseHTTPRequestHandler, code: str, head: bool) -> None:
        body = json.dumps({"error": code}).encode()
        self._send(h, 404, body, {"X-Error-Code": code, "Content-Type": "application/json"}, head)

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        with self._lock:
            self.requests += 1
            self.log.append((h.command, h.path, h.headers.get("Range")))
        if self.latency:
            time.sleep(self.latency)
        path = unquote(h.path.split("?")[0])
        m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(?:/(.*))?)?$", path)
        if m:
            self._api(h, m.group(1), m.group(2), m.group(3), head)
            return
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if not m:
            self._error(h, "RepoNotFound", head)
            return
        repo, rev, fname = m.groups()
        if repo not in self.repos:
            self._error(h, "RepoNotFound", head)
            return
        if rev not in (self.revision, self.commit[repo]):
            self._error(h, "RevisionNotFound", head)
            return
        fpath = self.repos[repo] / fname
        if not fpath.is_file():
            self._error(h, "EntryNotFound", head)
            return
        size = fpath.stat().st_size
        etag = hashlib.sha1(f"{self.commit[repo]}/{fname}/{size}".encode()).hexdigest()
        headers = {"X-Repo-Commit": self.commit[repo], "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        rng = h.headers.get("Range")
        if rng and not head:
            rm = re.match(r"bytes=(\d+)-(\d*)", rng)
            start = int(rm.group(1)) if rm else 0
            end = min(int(rm.group(2)) if rm and rm.group(2) else size - 1, size - 1)
            with fpath.open("rb") as fh:
                fh.seek(start)
                body = fh.read(max(0, end - start + 1))
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            self._send(h, 206, body, headers, head)
            return
        if head:
            headers["Content-Length"] = str(size)
            self._send(h, 200, b"", headers, head=True)
            return
        self._send(h, 200, fpath.read_bytes(), headers, head)

    def _api(
        self, h: BaseHTTPRequestHandler, repo: str, kind: str | None, rev: str | None, head: bool
    ) -> None:
        if repo not in self.repos:
            self._error(h, "RepoNotFound", head)
            return
        if rev and rev not in (self.revision, self.commit[repo]):
            self._error(h, "RevisionNotFound", head)
            return
        root = self.repos[repo]
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        if kind == "tree":
            body = [
                {"type": "file", "path": f, "size": (root / f).stat().st_size, "oid": "0" * 40} for f in files
            ]
        else:
            body = {
                "id": repo,
                "modelId": repo,
                "sha": self.commit[repo],
                "private": False,
                "siblings": [{"rfilename": f, "size": (root / f).stat().st_size} for f in files],
            }
        self._send(h, 200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)


_DTYPE_SIZE = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "U8": 1, "I32": 4}


def write_sparse_shard(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> int:
    """Write a valid safetensors file whose data region is a hole (sparse: costs no disk).

    Args:
        path: file to write.
        tensors: name -> (safetensors dtype, shape).

    Returns:
        The file's apparent size in bytes.
    """
    header: dict[str, Any] = {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = _DTYPE_SIZE[dtype]
        for s in shape:
            n *= s
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        fh.truncate(8 + len(raw) + offset)
    return 8 + len(raw) + offset
