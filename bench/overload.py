"""Overload benchmark: open-loop arrivals at 2x and 4x the measured capacity, with admission control on
(the defaults) and off (bounds raised out of reach), on the same server build, model and photos.

    .venv/bin/python bench/overload.py [--home /tmp/tuneserve-bench] [--seconds 15]

1. Capacity: 32 closed-loop keep-alive clients for `--seconds` (bench/serve.py's client) → C req/s.
2. For each of {admission on, admission off} and each rate in {2C, 4C}: Poisson arrivals for
   `--seconds`, each request sent on an idle keep-alive connection (a new one when none is idle),
   whatever happened to earlier ones (open loop); a probe GETs /readyz every 100 ms meanwhile.
   Every request still unanswered 30 s after the arrivals stop counts as timed out.
Reports per run: offered and answered rates, the share answered 200 and 503, other statuses, p50 /
p99 latency of the accepted (200) requests, and /readyz p50 / max. Writes bench/results/overload.json.
Uses the `imagenet` EfficientNet-Lite0 model from `tuneserve bootstrap` (built on first run).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve import ensure_model, free_port, http_bench, make_jpegs, multipart_request, percentile, start_server  # noqa: E402

OFF = {"TUNESERVE_MAX_INFLIGHT_REQUESTS": "1000000", "TUNESERVE_MAX_QUEUED_IMAGES": "1000000",
       "TUNESERVE_REQUEST_DEADLINE_S": "1000000"}  # the bounds out of reach: what the server did before them
DRAIN_S = 30.0


async def send(port: int, request: bytes, idle: list) -> tuple[int, float]:
    """One request on an idle connection (or a new one): (status, ms). Status 0: the connection failed."""
    started = time.perf_counter()
    reader, writer = idle.pop() if idle else await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length, close = 0, False
        for line in head.split(b"\r\n"):
            lower = line.lower()
            if lower.startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
            close |= lower.startswith(b"connection:") and b"close" in lower
        await reader.readexactly(length)
    except (OSError, asyncio.IncompleteReadError, ValueError):
        writer.close()
        return 0, (time.perf_counter() - started) * 1000
    if close:
        writer.close()
    else:
        idle.append((reader, writer))
    return status, (time.perf_counter() - started) * 1000


async def probe(port: int, stop: asyncio.Event) -> list[float]:
    """/readyz latency every 100 ms until `stop` (its own connection each time, as a load balancer does)."""
    request = f"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
    latencies = []
    while not stop.is_set():
        started = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            await reader.read()
            writer.close()
        except OSError:
            pass
        latencies.append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(0.1)
    return latencies


async def open_loop(port: int, requests: list[bytes], rate: float, seconds: float, seed: int = 0) -> dict:
    rng, idle, tasks = random.Random(seed), [], []
    stop = asyncio.Event()
    prober = asyncio.ensure_future(probe(port, stop))
    started = time.perf_counter()
    next_at, i = started, 0
    while next_at < started + seconds:
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        tasks.append(asyncio.ensure_future(send(port, requests[i % len(requests)], idle)))
        i += 1
        next_at += rng.expovariate(rate)
    done, pending = await asyncio.wait(tasks, timeout=DRAIN_S)
    for task in pending:
        task.cancel()
    stop.set()
    ready = await prober
    for _, writer in idle:
        writer.close()
    results = [task.result() for task in done]
    ok = [ms for status, ms in results if status == 200]
    count = len(tasks)
    statuses: dict[str, int] = {}
    for status, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {
        "offered_rps": round(count / seconds, 1), "sent": count, "answered_200": len(ok), "statuses": statuses,
        "timed_out": len(pending), "share_200": round(len(ok) / count, 3),
        "share_503": round(statuses.get("503", 0) / count, 3), "goodput_rps": round(len(ok) / seconds, 1),
        "p50_ms": round(percentile(ok, 50), 1) if ok else None, "p99_ms": round(percentile(ok, 99), 1) if ok else None,
        "readyz_p50_ms": round(percentile(ready, 50), 1), "readyz_max_ms": round(max(ready), 1),
    }


def run(env: dict, jpegs: list[bytes], seconds: float, capacity: float | None) -> dict:
    port = free_port()
    server = start_server({**env, "TUNESERVE_GRPC_PORT": "0"}, port)
    try:
        requests = [multipart_request(port, jpeg) for jpeg in jpegs]
        if capacity is None:
            capacity = asyncio.run(http_bench(port, requests, seconds))["throughput"]
        rows = {"capacity_rps": round(capacity, 1)}
        for factor in (2, 4):
            rows[f"{factor}x"] = asyncio.run(open_loop(port, requests, factor * capacity, seconds, seed=factor))
            time.sleep(3)  # let the server drain before the next rate
        return rows
    finally:
        server.terminate()
        server.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default="/tmp/tuneserve-bench", help="private BENTOML_HOME")
    parser.add_argument("--model", default="imagenet")
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    os.environ["BENTOML_HOME"] = args.home
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    Path(args.home).mkdir(parents=True, exist_ok=True)
    ensure_model(args.model)
    jpegs = make_jpegs()
    env = {**os.environ, "TUNESERVE_DEFAULT_MODEL": args.model, "TUNESERVE_ACCESS_LOG": "off",
           "TUNESERVE_HOME": str(Path(args.home) / "tuneserve-overload")}
    load = os.getloadavg()
    on = run(env, jpegs, args.seconds, None)
    off = run({**env, **OFF}, jpegs, args.seconds, on["capacity_rps"])
    result = {"admission_on": on, "admission_off": off, "load_before": [round(x, 2) for x in load],
              "load_after": [round(x, 2) for x in os.getloadavg()], "cores": len(os.sched_getaffinity(0))}
    out = ROOT / "bench" / "results" / "overload.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"capacity {on['capacity_rps']} req/s (32 closed-loop clients); load before {result['load_before']}")
    print("| admission | offered | 200 | 503 | other | timed out | goodput req/s | accepted p50 ms | p99 ms | /readyz p50 ms | max ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, rows in (("on (defaults)", on), ("off", off)):
        for factor in ("2x", "4x"):
            r = rows[factor]
            other = sum(v for k, v in r["statuses"].items() if k not in ("200", "503"))
            print(f"| {name} | {factor} = {r['offered_rps']} req/s | {r['share_200']:.1%} | {r['share_503']:.1%} | {other} | "
                  f"{r['timed_out']} | {r['goodput_rps']} | {r['p50_ms']} | {r['p99_ms']} | {r['readyz_p50_ms']} | {r['readyz_max_ms']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
