"""A private single-node Ray cluster for tests: `ray start --head --block` with 2 CPUs, every
port chosen free, its own temp folder, stopped by ending only its own processes (never `ray
stop`, which would end every Ray on the machine)."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PORT_OPTIONS = (
    "--port", "--dashboard-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
    "--ray-client-server-port", "--metrics-export-port", "--runtime-env-agent-port", "--node-manager-port",
    "--object-manager-port",
)


def free_port() -> int:
    """A free port outside Ray's default worker range (10002-19999), which Ray refuses to share."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 10002 <= port <= 19999:
            return port


def _descendants(pid: int) -> list[int]:
    import psutil

    with contextlib.suppress(psutil.Error):
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    return []


def _processes_using(folder: str) -> list[int]:
    """Ray's daemons name their session folder on their command line."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error, TypeError):
            if any(folder in part for part in process.info["cmdline"] or ()):
                found.append(process.info["pid"])
    return found


def _wait_until_jobs_run(url: str, deadline: float) -> None:
    """The dashboard answers before its job agent accepts work: run one trivial job to be sure."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(url)
    while True:
        try:
            submission = client.submit_job(entrypoint="true")
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    while not client.get_job_status(submission).is_terminal():
        if time.monotonic() > deadline:
            raise RuntimeError("Ray did not finish a trivial job")
        time.sleep(0.2)


@contextlib.contextmanager
def local_ray(num_cpus: int = 2, timeout: float = 120.0):
    """Yields the dashboard URL (what the Job Submission client connects to)."""
    import httpx

    temp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ports = {option: free_port() for option in PORT_OPTIONS}
    command = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--num-cpus", str(num_cpus),
        "--num-gpus", "0", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
        "--include-dashboard", "true", "--disable-usage-stats", "--temp-dir", temp,
    ]
    for option, port in ports.items():
        command += [option, str(port)]
    # Ray 2.5x turns token auth on for every new cluster once any local `ray.init()` has written
    # ~/.ray/auth_token; this private test cluster listens on loopback only, so say so explicitly.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    log = open(Path(temp) / "ray-start.log", "w")
    head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited {head.returncode}: {(Path(temp) / 'ray-start.log').read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/api/version", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray dashboard not up after {timeout}s: {(Path(temp) / 'ray-start.log').read_text()[-3000:]}")
            time.sleep(0.5)
        _wait_until_jobs_run(url, deadline)
        yield url
    finally:
        pids = {head.pid, *_descendants(head.pid), *_processes_using(temp)}
        for pid in list(pids):
            pids.update(_descendants(pid))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            if sig == signal.SIGTERM:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    head.wait(10)
        log.close()
