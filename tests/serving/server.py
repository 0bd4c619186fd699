"""A real ``medtl serve`` process on loopback for tests (the API test and the page test).

    with running_server(bundle) as url:          # url: "http://127.0.0.1:PORT"
        httpx.get(f"{url}/v1/model")

The process is ``python -m medtl.cli serve SOURCE --port PORT [extra args]``; the helper waits
for GET /ready to answer 200 (failing the test if the process ends first), and on exit stops
it (SIGTERM, then kill) and keeps its stderr (the request log) in ``server.log`` for checks.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.processes import wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: str = field(default="")  # the process's stderr, filled in when it has stopped


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ready", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def running_server(source: str | Path, *extra: str, env: dict[str, str] | None = None,
                   timeout: float = 120.0) -> Iterator[Server]:
    """``medtl serve SOURCE`` on 127.0.0.1 at a free port, ready; stopped on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "medtl.cli", "serve", str(source), "--port", str(port),
           *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    server = Server(f"http://127.0.0.1:{port}", proc)
    try:
        wait_for(lambda: _ready(server.url), proc, "/ready", timeout=timeout)
        yield server
    finally:
        proc.terminate()
        try:
            server.log = proc.communicate(timeout=20)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            server.log = proc.communicate()[1]


def post_files(url: str, route: str, files: Sequence[tuple[str, str, bytes]],
               headers: dict[str, str] | None = None):
    """POST multipart ``files`` ((field, file name, bytes), ...) with httpx; the response."""
    import httpx

    return httpx.post(f"{url}{route}", files=[(f, (n, b)) for f, n, b in files],
                      headers=headers or {}, timeout=60)
