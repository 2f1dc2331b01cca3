"""A real `bentoml serve service.service:TuneServe` for integration tests: free loopback port,
private BentoML store, tiny models published by the caller, the server log in a file."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def bento_store(home: Path) -> Iterator[Path]:
    """BENTOML_HOME (this process and the servers it starts) points at `home` while inside."""
    from tests.conftest import _point_bentoml_at

    old = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(home)
    _point_bentoml_at(home)
    try:
        yield home
    finally:
        if old is None:
            os.environ.pop("BENTOML_HOME", None)
        else:
            os.environ["BENTOML_HOME"] = old
        _point_bentoml_at(None)


@contextlib.contextmanager
def running_server(env: dict[str, str], log_path: Path, ready_timeout: float = 90) -> Iterator[str]:
    """Start the server with `env` added to this environment; yields its base URL once /readyz is 200."""
    import httpx

    port = free_port()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", "service.service:TuneServe", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            # a free gRPC port unless the caller names one: servers of parallel tests never share one
            env={**os.environ, "BENTOML_DO_NOT_TRACK": "true", "TUNESERVE_GRPC_PORT": str(free_port()), **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(process, url, log_path, ready_timeout, httpx)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)


def _wait_ready(process, url: str, log_path: Path, timeout: float, httpx) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=30) as client:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {log_path.read_text()[-3000:]}")
            try:
                if client.get("/readyz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready in {timeout:.0f} s: {log_path.read_text()[-3000:]}")
            time.sleep(0.3)
