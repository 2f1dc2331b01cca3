"""Many models behind one server: requests spread over N models with a Zipf distribution, each worker
holding at most `max_loaded_models` of them (an LRU, service/pool/registry.py).

    .venv/bin/python bench/models.py [--counts 10,50,200] [--real 20] [--bound 8] [--seconds 20] [--clients 8]

For each N: a private BentoML store with N published models (tiny torch-free ones from tests/tiny.py;
`--real K` adds one run with K copies of the bootstrapped `imagenet` EfficientNet-Lite0, taken from
--lite0 or bootstrapped), then `bentoml serve` (2 workers by default) and:

- start → /readyz 200 (only the default model is loaded at start), and what GET /readyz/models lists;
- cold loads: one request to every model not requested before, one at a time (each is the first
  request to an unloaded model); p50/p99, checked against `tuneserve_model_load_seconds_count`;
- Zipf traffic (s = --zipf over the N models in a random order) from `--clients` keep-alive
  clients for `--seconds`: throughput, p50/p99, the share of requests that loaded a model (from the
  metric), evictions, and each worker's RSS before and after.

Prints a markdown table and writes bench/results/models.json. The load generator shares the cores
with the server; the load average is printed with every row.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve import RawClient, free_port, percentile  # noqa: E402


def publish(home: Path, count: int, lite0: Path | None) -> None:
    """N models into the store at `home` (in a child process: BENTOML_HOME is read at import)."""
    marker = home / f"published-{count}-{'lite0' if lite0 else 'tiny'}"
    if marker.exists():
        return
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            "from bench.models import publish_here; publish_here(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4])")
    subprocess.run([sys.executable, "-c", code, str(ROOT), str(home / "stage"), str(count), str(lite0 or "")],
                   env={**os.environ, "BENTOML_HOME": str(home)}, check=True)
    marker.touch()


def publish_here(stage: Path, count: int, lite0: str) -> None:
    from models.artifact import store
    from tests.tiny import write_tiny_model

    for i in range(count):
        if lite0:  # the graph and manifest only: the checkpoint is never read by the service
            (stage / f"m{i}").mkdir(parents=True, exist_ok=True)
            for name in ("model.onnx", "manifest.json"):
                shutil.copy2(Path(lite0) / name, stage / f"m{i}" / name)
            store.publish(f"m{i}", stage / f"m{i}")
        else:
            store.publish(f"m{i}", write_tiny_model(stage / f"m{i}", labels=[f"red{i}", f"green{i}", f"blue{i}"]))
        shutil.rmtree(stage / f"m{i}")


def lite0_version(given: str | None) -> Path:
    """The directory of an `imagenet` EfficientNet-Lite0 version: --lite0, else bootstrapped once."""
    if given:
        return Path(given)
    home = Path("/tmp/tuneserve-bench-models/lite0-source")
    env = {**os.environ, "BENTOML_HOME": str(home)}
    found = list((home / "models" / "imagenet").glob("*/model.onnx"))
    if not found:
        subprocess.run([sys.executable, "-m", "training.bootstrap"], cwd=ROOT, env=env, check=True)
        found = list((home / "models" / "imagenet").glob("*/model.onnx"))
    return found[0].parent


def image(lite0: bool) -> bytes:
    from PIL import Image

    size = (500, 375) if lite0 else (64, 48)  # a photo-sized JPEG for Lite0, a small one for tiny models
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def request(port: int, jpeg: bytes, model: str) -> bytes:
    boundary = "tuneservebench"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"top_k\"\r\n\r\n1\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"p.jpg\"\r\n"
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode() + jpeg + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


def start(home: Path, bound: int, workers: int, port: int) -> tuple[subprocess.Popen, float]:
    """The server on the store at `home`, and seconds from its start to /readyz 200."""
    import httpx

    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", "TUNESERVE_AUTH": "off",
           "TUNESERVE_DEFAULT_MODEL": "m0", "TUNESERVE_MAX_LOADED_MODELS": str(bound), "TUNESERVE_WORKERS": str(workers),
           "TUNESERVE_HOME": str(home / "state"), "TUNESERVE_GRPC_PORT": str(free_port()), "TUNESERVE_ACCESS_LOG": "false"}
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "service.service:TuneServe", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=(home / "server.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    while time.perf_counter() - started < 300:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {(home / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.terminate()
    raise RuntimeError("server not ready in 300 s")


def worker_rss_mb(process: subprocess.Popen) -> list[float]:
    """Resident memory of each serving worker (the server's children running the service), MB."""
    import psutil

    found = []
    for child in psutil.Process(process.pid).children(recursive=True):
        try:
            if "worker" in " ".join(child.cmdline()):
                found.append(round(child.memory_info().rss / 2**20, 1))
        except psutil.Error:
            continue
    return sorted(found)


def metric(port: int, name: str, labels: str = "") -> float:
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def cold_loads(port: int, requests: dict[str, bytes]) -> dict:
    """One request to every model but the default, one at a time: each is a first request, so a cold load."""
    async def run() -> list[float]:
        client = RawClient(port)
        times = [await client.send(requests[name]) for name in requests if name != "m0"]
        await client.close()
        return times

    loads = metric(port, "tuneserve_model_load_seconds_count", '{reason="request"}')
    times = asyncio.run(run())
    loaded = metric(port, "tuneserve_model_load_seconds_count", '{reason="request"}') - loads
    return {"requests": len(times), "loads": loaded, "p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99)}


def zipf_traffic(port: int, requests: dict[str, bytes], s: float, seconds: float, clients: int) -> dict:
    """`clients` keep-alive clients for `seconds`, each request's model drawn from Zipf(s) over the models."""
    names = list(requests)
    rng = np.random.default_rng(1)
    rng.shuffle(names)  # popularity independent of the name (m0, the default, is not always the hottest)
    weights = 1.0 / np.arange(1, len(names) + 1) ** s
    draws = rng.choice(len(names), size=200_000, p=weights / weights.sum())
    latencies: list[float] = []
    before = {k: metric(port, *k) for k in [("tuneserve_model_load_seconds_count", '{reason="request"}'), ("tuneserve_model_evictions_total",)]}

    async def client(offset: int, deadline: float) -> None:
        raw, i = RawClient(port), offset
        while time.perf_counter() < deadline:
            latencies.append(await raw.send(requests[names[draws[i % len(draws)]]]))
            i += clients
        await raw.close()

    async def run() -> float:
        started = time.perf_counter()
        await asyncio.gather(*(client(k, started + seconds) for k in range(clients)))
        return time.perf_counter() - started

    elapsed = asyncio.run(run())
    after = {k: metric(port, *k) for k in before}
    loads, evictions = (after[k] - before[k] for k in before)
    return {"requests": len(latencies), "throughput": len(latencies) / elapsed, "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99), "cold_share": loads / max(1, len(latencies)), "evictions": evictions,
            "distinct_models": int(len(set(draws[: len(latencies)].tolist())))}


def one_run(home: Path, count: int, lite0: Path | None, args) -> dict:
    import httpx

    publish(home, count, lite0)
    port = free_port()
    process, ready_s = start(home, args.bound, args.workers, port)
    try:
        held = httpx.get(f"http://127.0.0.1:{port}/readyz/models", timeout=30).json()
        jpeg = image(lite0 is not None)
        requests = {f"m{i}": request(port, jpeg, f"m{i}") for i in range(count)}
        rss_start = worker_rss_mb(process)
        cold = cold_loads(port, requests)
        traffic = zipf_traffic(port, requests, args.zipf, args.seconds, args.clients)
        state = httpx.get(f"http://127.0.0.1:{port}/readyz/models", timeout=30).json()
        return {"models": count, "kind": "lite0" if lite0 else "tiny", "bound": args.bound, "workers": args.workers,
                "ready_s": ready_s, "loaded_at_ready": [e["model"] for e in held["loaded"]], "cold": cold,
                "zipf": traffic, "rss_start_mb": rss_start, "rss_end_mb": worker_rss_mb(process),
                "peak_loaded": state["peak_loaded"], "load_average": os.getloadavg()}
    finally:
        process.terminate()
        process.wait(30)


def row(r: dict) -> str:
    z, c = r["zipf"], r["cold"]
    return (f"| {r['models']} {r['kind']} | {r['ready_s']:.1f} s | {z['throughput']:.0f} req/s | {z['p50_ms']:.1f} / {z['p99_ms']:.0f} ms "
            f"| {100 * z['cold_share']:.1f} % | {c['p50_ms']:.0f} / {c['p99_ms']:.0f} ms ({c['requests']}) "
            f"| {' + '.join(f'{m:.0f}' for m in r['rss_start_mb'])} → {' + '.join(f'{m:.0f}' for m in r['rss_end_mb'])} MB "
            f"| {r['peak_loaded']} | {' / '.join(f'{x:.1f}' for x in r['load_average'])} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="10,50,200", help="numbers of tiny models, one run each")
    parser.add_argument("--real", type=int, default=0, help="also a run with this many EfficientNet-Lite0 copies")
    parser.add_argument("--lite0", help="a stored imagenet version's folder to copy (default: bootstrap one)")
    parser.add_argument("--bound", type=int, default=8, help="TUNESERVE_MAX_LOADED_MODELS")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent s: P(rank k) ∝ 1/k^s")
    parser.add_argument("--home", default="/tmp/tuneserve-bench-models")
    args = parser.parse_args()
    runs = [(int(n), None) for n in args.counts.split(",") if n]
    if args.real:
        runs.append((args.real, lite0_version(args.lite0)))
    results = []
    print("| models | start → /readyz | Zipf throughput | p50 / p99 | cold-load share | cold first request p50 / p99 (n) "
          "| RSS per worker, start → end | peak loaded | load average |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    for count, lite0 in runs:
        home = Path(args.home) / f"{count}-{'lite0' if lite0 else 'tiny'}"
        results.append(one_run(home, count, lite0, args))
        print(row(results[-1]), flush=True)
    out = ROOT / "bench" / "results" / "models.json"
    out.write_text(json.dumps({"args": vars(args), "runs": results}, indent=1))
    print(f"written {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
