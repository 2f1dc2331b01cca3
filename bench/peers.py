"""Peer comparison: tuneserve beside LitServe, Ray Serve and a BentoML docs-style service.

    .venv/bin/python bench/peers.py [--requests 2000] [--clients 32] [--bad-requests 500]
                                    [--peers tuneserve,bentoml-docs,litserve,ray-serve]

Each peer (bench/peers/*_app.py, written as its project's docs show) serves the same ONNX file, the
`imagenet` EfficientNet-Lite0 from `tuneserve bootstrap`, with ONNX Runtime on 1 intra-op thread in
each of 2 workers/replicas, batching up to 32, decoding the JPEG and preparing it as the model's
manifest says (shorter side 256 bilinear, centre crop 224, uint8), by default with the same pixels and
work as tuneserve (JPEG draft decoding, only the crop window resampled; `--plain-decode`: the docs' way). tuneserve runs as `make serve` runs it
(`bentoml serve service.service:TuneServe`, 2 workers x 1 ORT thread). One server at a time, each:

1. started, and ready once a good request answers 200; then 2 x clients warm-up requests;
2. load: `--requests` pre-encoded multipart POSTs (bench/serve.py's photos) from `--clients`
   keep-alive clients; req/s, p50/p99 latency, the server's CPU time per request (all its processes);
3. bad input: `--bad-requests` requests, every 5th a bad image (truncated JPEG, not an image,
   empty file, JPEG header with a random body), same clients: how bad ones are answered, how many
   5xx, and how many *good* requests did not get a 200 (lost, e.g. failed with a bad batch mate);
4. one more good request (does it still answer?), then the server's process group is stopped.

LitServe and Ray Serve run from venvs of their own under `--venvs` (created on first run with
`python -m venv` + pip, pinned below, with tuneserve's ONNX Runtime, Pillow and numpy versions).
Prints a markdown table and writes bench/results/peers.json. `--server-cpus`/`--client-cpus` pin
the servers and the load generator to cores (e.g. `0,1` and `2` on a bigger machine).
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve import ensure_model, free_port, make_jpegs, percentile  # noqa: E402

PEER_DIR = ROOT / "bench" / "peers"
FRAMEWORKS = {"litserve": ["litserve==0.2.19", "python-multipart"],
              "ray-serve": ["ray[serve]==2.60.0", "python-multipart"]}
REQUEST_TIMEOUT_S = 120.0


# ---- the load generator: pre-encoded HTTP/1.1 over keep-alive connections (little client CPU) ----

def multipart(port: int, path: str, jpeg: bytes, fields: dict[str, str] | None = None) -> bytes:
    """One complete POST with the image as the multipart field `image`, encoded once, sent many times."""
    boundary = "peersbench"
    parts = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
                     for k, v in (fields or {}).items())
    body = parts + (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"p.jpg\"\r\n"
                    "Content-Type: image/jpeg\r\n\r\n").encode() + jpeg + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def read_body(reader: asyncio.StreamReader, head: bytes) -> bool:
    """Reads the body after `head` (Content-Length or chunked); True when the server closes the connection."""
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().lower()
    if headers.get(b"transfer-encoding") == b"chunked":
        while size := int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16):
            await reader.readexactly(size + 2)
        await reader.readuntil(b"\r\n")
    else:
        await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return headers.get(b"connection") == b"close"


class Connection:
    """One keep-alive client connection; reconnects after the server closed it or a request failed."""

    def __init__(self, port: int):
        self.port, self.streams = port, None

    async def send(self, request: bytes) -> tuple[int, float]:
        """(HTTP status, ms); status 0: the connection failed, -1: no answer in REQUEST_TIMEOUT_S."""
        started = time.perf_counter()
        try:
            status = await asyncio.wait_for(self._exchange(request), REQUEST_TIMEOUT_S)
        except asyncio.TimeoutError:
            status = -1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError):
            status = 0
        if status <= 0:
            self.close()
        return status, (time.perf_counter() - started) * 1000

    async def _exchange(self, request: bytes) -> int:
        if self.streams is None:
            self.streams = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self.streams
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if await read_body(reader, head):
            self.close()
        return int(head.split(b" ", 2)[1])

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


async def send_all(port: int, requests: list[bytes], clients: int) -> tuple[list[tuple[int, float]], float]:
    """Every request once, `clients` at a time, in order of index: ([(status, ms)] by index, seconds)."""
    results: list[tuple[int, float]] = [(0, 0.0)] * len(requests)
    indexes = iter(range(len(requests)))

    async def client() -> None:
        connection = Connection(port)
        for i in indexes:  # a shared iterator: each index goes to whichever client is free
            results[i] = await connection.send(requests[i])
        connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return results, time.perf_counter() - started


# ---- bad input ---------------------------------------------------------------------------------

def bad_images(jpeg: bytes) -> dict[str, bytes]:
    noise = random.Random(0).randbytes(len(jpeg))
    return {"truncated JPEG": jpeg[: len(jpeg) // 3], "not an image": b"this is not an image\n" * 20,
            "empty file": b"", "JPEG header, random body": jpeg[:20] + noise[20:]}


def mixed_images(jpegs: list[bytes], count: int, every: int = 5) -> list[tuple[str, bytes]]:
    """`count` (kind, bytes): every `every`-th a bad image (kinds in turn), the rest good photos."""
    bad = list(bad_images(jpegs[0]).items())
    return [bad[(i // every) % len(bad)] if i % every == every - 1 else ("good", jpegs[i % len(jpegs)])
            for i in range(count)]


def status_class(status: int) -> str:
    return {0: "connection failed", -1: "timed out"}.get(status, f"{status // 100}xx")


def tally(kinds: list[str], results: list[tuple[int, float]]) -> dict:
    """What the mix got back: statuses by input kind, 5xx answers, good requests without a 200."""
    by_kind: dict[str, dict[str, int]] = {}
    for kind, (status, _) in zip(kinds, results):
        counts = by_kind.setdefault(kind, {})
        counts[str(status)] = counts.get(str(status), 0) + 1
    good = [status for kind, (status, _) in zip(kinds, results) if kind == "good"]
    lost: dict[str, int] = {}
    for status in good:
        if status != 200:
            lost[status_class(status)] = lost.get(status_class(status), 0) + 1
    return {"requests": len(kinds), "good": len(good), "bad": len(kinds) - len(good),
            "status_5xx": sum(500 <= status < 600 for status, _ in results),
            "good_lost": sum(lost.values()), "good_lost_by_status": lost, "statuses_by_input": by_kind}


# ---- the servers -------------------------------------------------------------------------------

@dataclass
class Peer:
    name: str
    command: list[str]
    cwd: Path
    env: dict[str, str]
    path: str = "/classify"
    fields: dict[str, str] = field(default_factory=dict)
    version: str = ""


def ensure_venv(venvs: Path, framework: str) -> Path:
    """The framework's own venv (created and installed once; a stamp names what was installed)."""
    pins = [*FRAMEWORKS[framework], *(f"{n}=={importlib.metadata.version(d)}" for n, d in
                                      (("onnxruntime", ort_distribution()), ("pillow", "pillow"), ("numpy", "numpy")))]
    venv, stamp = venvs / framework, venvs / framework / "peers-installed.txt"
    if stamp.exists() and stamp.read_text().split() == pins:
        return venv / "bin" / "python"
    print(f"installing {framework} into {venv} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *pins], check=True)
    stamp.write_text("\n".join(pins))
    return venv / "bin" / "python"


def ort_distribution() -> str:
    """tuneserve's ONNX Runtime (the GPU build on Linux x86-64 runs the same CPU kernels) by its version."""
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            importlib.metadata.version(name)
            return name
        except importlib.metadata.PackageNotFoundError:
            continue
    raise RuntimeError("no onnxruntime in this venv")


def installed(python: Path | str, distribution: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({distribution!r}))"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def make_peers(names: list[str], home: Path, model_dir: Path, venvs: Path, args) -> list[Peer]:
    base = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", "PYTHONPATH": str(PEER_DIR),
            "PEER_MODEL_DIR": str(model_dir), "PEER_THREADS": "1", "PEER_WORKERS": str(args.workers),
            "PEER_MAX_BATCH": str(args.max_batch), "PEER_BATCH_TIMEOUT_S": str(args.batch_timeout_s),
            "PEER_SAME_DECODE": "0" if getattr(args, "plain_decode", False) else "1"}
    peers = []
    for name in names:
        port = free_port()
        env = {**base, "PEER_PORT": str(port)}
        if name == "tuneserve":
            env.update(TUNESERVE_DEFAULT_MODEL=args.model, TUNESERVE_WORKERS=str(args.workers), TUNESERVE_THREADS="1",
                       TUNESERVE_PRECISION="fp32", TUNESERVE_HOME=str(home / "tuneserve"),
                       TUNESERVE_GRPC_PORT=str(free_port()))
            env.pop("PYTHONPATH")
            command = [sys.executable, "-m", "bentoml", "serve", "service.service:TuneServe", "--host", "127.0.0.1",
                       "--port", str(port)]
            peers.append(Peer(name, command, ROOT, env, fields={"top_k": "5"}, version=installed(sys.executable, "bentoml")))
        elif name == "bentoml-docs":
            command = [sys.executable, "-m", "bentoml", "serve", "bentoml_app:Classify", "--host", "127.0.0.1",
                       "--port", str(port)]
            peers.append(Peer(name, command, PEER_DIR, env, version=installed(sys.executable, "bentoml")))
        else:
            python = ensure_venv(venvs, name)
            script = {"litserve": "litserve_app.py", "ray-serve": "ray_app.py"}[name]
            dist = {"litserve": "litserve", "ray-serve": "ray"}[name]
            if name == "ray-serve":  # as tuneserve's own Ray tests run it: no auth token written to ~/.ray
                env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
            peers.append(Peer(name, [str(python), script], PEER_DIR, env, version=installed(python, dist)))
        peers[-1].env["PEER_PORT"] = str(port)
    return peers


def port_of(peer: Peer) -> int:
    return int(peer.env["PEER_PORT"])


def start(peer: Peer, log: Path, cpus: set[int] | None) -> subprocess.Popen:
    """In a session of its own, so stop() ends every process the framework started."""
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    with open(log, "wb") as out:
        return subprocess.Popen(peer.command, cwd=peer.cwd, env=peer.env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=pin)


async def wait_ready(peer: Peer, process: subprocess.Popen, good: bytes, timeout_s: float = 300) -> float:
    """Seconds until a good request answers 200 (the one readiness test every framework passes alike)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"{peer.name} exited with {process.returncode}")
        connection = Connection(port_of(peer))
        status, _ = await connection.send(good)
        connection.close()
        if status == 200:
            return time.monotonic() - started
        await asyncio.sleep(1)
    raise RuntimeError(f"{peer.name} not ready in {timeout_s:.0f} s")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group and every process below it (BentoML's workers leave the
    group), SIGKILL what is left after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        pids = server_pids(process.pid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and server_pids(process.pid):
            time.sleep(0.5)
    process.poll()


def proc_stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name: [0] state, [1] ppid, [3] session, [11] utime, [12] stime."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def server_pids(root: int) -> list[int]:
    """Every live process the server started: its session and all descendants (some leave the session)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stats[int(entry.name)] = proc_stat(int(entry.name))
            except (FileNotFoundError, ProcessLookupError):
                continue
    found = {pid for pid, fields in stats.items() if int(fields[3]) == root} | ({root} & stats.keys())
    while True:
        more = {pid for pid, fields in stats.items() if int(fields[1]) in found} - found
        if not more:
            return sorted(pid for pid in found if stats[pid][0] != "Z")
        found |= more


def server_cpu_s(root: int) -> float:
    """User + system CPU seconds of the server's live processes (from /proc, no psutil needed)."""
    total = 0
    for pid in server_pids(root):
        try:
            fields = proc_stat(pid)
            total += int(fields[11]) + int(fields[12])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


# ---- one peer, end to end ------------------------------------------------------------------------

async def measure(peer: Peer, process: subprocess.Popen, jpegs: list[bytes], args) -> dict:
    port = port_of(peer)
    good = [multipart(port, peer.path, jpeg, peer.fields) for jpeg in jpegs]
    ready_s = await wait_ready(peer, process, good[0])
    await send_all(port, [good[i % len(good)] for i in range(2 * args.clients)], args.clients)  # warm up
    cpu_before, load_before = server_cpu_s(process.pid), os.getloadavg()[0]
    results, seconds = await send_all(port, [good[i % len(good)] for i in range(args.requests)], args.clients)
    cpu_s = server_cpu_s(process.pid) - cpu_before
    ok = [ms for status, ms in results if status == 200]
    load = {"requests": args.requests, "clients": args.clients, "seconds": seconds,
            "throughput": len(ok) / seconds, "p50_ms": percentile(ok, 50) if ok else None,
            "p99_ms": percentile(ok, 99) if ok else None, "not_200": len(results) - len(ok),
            "server_cpu_ms_per_request": cpu_s * 1000 / max(1, len(ok)), "server_processes": len(server_pids(process.pid)),
            "loadavg_1m": [load_before, os.getloadavg()[0]]}
    mix = mixed_images(jpegs, args.bad_requests)
    answers, _ = await send_all(port, [multipart(port, peer.path, data, peer.fields) for _, data in mix], args.clients)
    bad = tally([kind for kind, _ in mix], answers)
    connection = Connection(port)
    bad["answers_after"] = (await connection.send(good[0]))[0]
    connection.close()
    return {"ready_s": ready_s, "load": load, "bad_input": bad}


def run_peer(peer: Peer, jpegs: list[bytes], args, logs: Path, cpus: set[int] | None) -> dict:
    log = logs / f"{peer.name}.log"
    for attempt in range(2):  # a second start: Ray's 30 s node start-up deadline can pass on a loaded machine
        process = start(peer, log, cpus)
        try:
            result = asyncio.run(measure(peer, process, jpegs, args))
        except RuntimeError as error:
            result = {"error": str(error)}
        finally:
            stop(process)
        if "exited with" not in result.get("error", ""):
            break
        print(f"{peer.name}: {result['error']} (start {attempt + 1}; log: {log})", file=sys.stderr)
    print(f"{peer.name}: {json.dumps(result.get('load', result), default=float)} (log: {log})", file=sys.stderr)
    return {"name": peer.name, "version": peer.version, "command": " ".join(peer.command[1:]), "log": str(log), **result}


# ---- the report --------------------------------------------------------------------------------

def table(results: list[dict]) -> str:
    rows = ["| server | req/s | p50 ms | p99 ms | server CPU ms/req | bad mix: 5xx | bad mix: good lost | "
            "bad images answered | answers after |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['name']} {r['version']} | failed: {r['error']} |" + " |" * 7)
            continue
        load, bad = r["load"], r["bad_input"]
        answered = {}
        for kind, counts in bad["statuses_by_input"].items():
            if kind != "good":
                for status, n in counts.items():
                    answered[status] = answered.get(status, 0) + n
        rows.append(f"| {r['name']} {r['version']} | {load['throughput']:.1f} | {load['p50_ms']:.1f} | "
                    f"{load['p99_ms']:.1f} | {load['server_cpu_ms_per_request']:.1f} | {bad['status_5xx']} | "
                    f"{bad['good_lost']} of {bad['good']} | "
                    f"{', '.join(f'{n}× {s}' for s, n in sorted(answered.items()))} | {bad['answers_after']} |")
    return "\n".join(rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default="tuneserve,bentoml-docs,litserve,ray-serve")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--bad-requests", type=int, default=500, help="the bad-input mix (every 5th bad)")
    parser.add_argument("--workers", type=int, default=2, help="workers / replicas per server")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--batch-timeout-s", type=float, default=0.01, help="LitServe's and Ray Serve's batch wait")
    parser.add_argument("--plain-decode", action="store_true",
                        help="peers decode in full and resize the whole image (docs style) instead of tuneserve's savings")
    parser.add_argument("--home", default="/tmp/tuneserve-bench", help="private BENTOML_HOME (model built there once)")
    parser.add_argument("--model", default="imagenet")
    parser.add_argument("--venvs", default=str(ROOT.parent / "peer-venvs"), help="where the peers' venvs live")
    parser.add_argument("--server-cpus", default="", help="pin the servers to these cores, e.g. 0,1")
    parser.add_argument("--client-cpus", default="", help="pin the load generator to these cores, e.g. 2")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "peers.json"))
    return parser.parse_args()


def cpu_set(text: str) -> set[int] | None:
    return {int(c) for c in text.split(",")} if text else None


def main() -> int:
    args = parse_args()
    home = Path(args.home)
    os.environ["BENTOML_HOME"] = str(home)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    home.mkdir(parents=True, exist_ok=True)
    version = ensure_model(args.model)
    if cpu_set(args.client_cpus):
        os.sched_setaffinity(0, cpu_set(args.client_cpus))
    jpegs = make_jpegs()
    logs = home / "peer-logs"
    logs.mkdir(exist_ok=True)
    peers = make_peers(args.peers.split(","), home, Path(version.path), Path(args.venvs), args)
    results = [run_peer(peer, jpegs, args, logs, cpu_set(args.server_cpus)) for peer in peers]
    print(f"\n{version.tag}, {len(jpegs)} JPEGs, {args.requests} requests from {args.clients} clients, "
          f"bad-input mix {args.bad_requests} (every 5th bad), {os.cpu_count()} cores\n\n{table(results)}")
    report = {"model": version.tag, "model_file": str(Path(version.path) / "model.onnx"), "cores": os.cpu_count(),
              "server_cpus": args.server_cpus, "client_cpus": args.client_cpus, "workers": args.workers,
              "ort_intra_op_threads": 1, "max_batch": args.max_batch, "batch_timeout_s": args.batch_timeout_s,
              "peers_decode": "plain" if args.plain_decode else "same as tuneserve",
              "onnxruntime": importlib.metadata.version(ort_distribution()), "peers": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
