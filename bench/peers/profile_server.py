"""Where tuneserve's CPU goes per request: py-spy on both workers under the peer bench's load.

    bash bench/profile.sh [--seconds 20] [--clients 32] [--rate 100] [--native] [--out DIR]

(bench/profile.sh runs this file; a bench/profile.py would shadow the standard library's `profile`,
which cProfile imports, in every script run from bench/.)

Starts tuneserve as bench/peers.py does (`bentoml serve service.service:TuneServe`, 2 workers x 1
ONNX Runtime thread, the `imagenet` model, the same photos), puts it under the same closed-loop load
(`--clients` keep-alive clients sending pre-encoded multipart /classify requests), and runs
`py-spy record` on each worker for `--seconds` (py-spy needs root or ptrace rights). Writes to --out:

- profile.collapsed.txt: the collapsed stacks of both workers, as recorded (`worker-N;frame;... count`);
- profile.svg: a flame graph of the busy stacks (frames coloured: model, decode and resize in blue);
- profile.json: the summary, printed as markdown: CPU ms per request by category and the top
  functions (self), i.e. each one's share of the busy samples x the workers' CPU time per request,
  measured from /proc over the recording (requests: those answered meanwhile).

A stack counts for the first category, in this order, that any of its frames matches: ONNX
Runtime, JPEG decode, resize, the production loop's per-request work (service/loop), multipart,
JSON encoding, batcher hand-off (service/batching.py, futures, threads), HTTP parsing; else other.
Stacks whose leaf is a wait (a condition, a queue, uvloop's loop in epoll) are left out: py-spy
should drop idle threads but, where its idle test misses, reports them. Without --native, time in C
extensions counts for the Python frame that called them (enough for these categories).
"""
from __future__ import annotations

import argparse
import asyncio
import html
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.peers import (Connection, make_peers, multipart, port_of, proc_stat, server_pids, start,  # noqa: E402
                         stop, wait_ready)
from bench.serve import ensure_model, make_jpegs  # noqa: E402

OTHER = "other"
# A stack belongs to its leaf-most frame that one of these names (checked in this order per frame).
# Generic frames (asyncio, threading, numpy, abc, ...) match none, so a stack in them belongs to
# whoever called them; the ASGI framework's own frames count as "other", so a wrapper above them
# (the loop's client-id middleware, uvicorn's run_asgi) never takes the time spent inside it.
CATEGORIES = [
    ("ONNX Runtime", ("onnxruntime/", "run_with_iobinding")),
    ("JPEG decode", ("decode_image (", "PIL/ImageFile.py", "PIL/JpegImagePlugin.py", "open (PIL/Image.py",
                     "convert (PIL/Image.py", "load (PIL/Image.py")),
    ("resize", ("resize_and_crop (", "resize (PIL/Image.py")),
    ("multipart", ("multipart/", "starlette/formparsers.py", "service/routes/forms.py")),
    ("JSON encoding", ("json/", "dump_json (", "starlette/responses.py", "fastapi/encoders.py", "serialize_response (")),
    ("production loop", ("service/loop/",)),
    ("batcher hand-off", ("service/batching.py",)),
    ("HTTP parsing", ("httptools", "h11/", "uvicorn/protocols/")),
    (OTHER, ("starlette/", "fastapi/", "bentoml", "anyio/", "opentelemetry/", "prometheus_client/", "logging/",
             "service/", "models/", "uvicorn/", "pydantic", "grpc")),
]
# Leaves where a thread waits (py-spy reports these although it drops idle threads: its idle test
# misses them on some kernels/sandboxes, and a thread woken but not yet on a core counts as running).
# Runner.run as the leaf is uvloop's C loop: mostly epoll_wait; its own C work is not told apart.
WAITING = ("Condition.wait (threading.py", "Event.wait (threading.py", "Queue.get (queue.py",
           "_worker (concurrent/futures/thread.py", "Thread.run (threading.py", "Runner.run (asyncio/runners.py",
           "select (selectors.py", "Thread.join (threading.py")


def categorise(stack: list[str]) -> str:
    for frame in reversed(stack):
        for name, needles in CATEGORIES:
            if any(needle in frame for needle in needles):
                return name
    return OTHER


def waiting(stack: list[str]) -> bool:
    return stack[-1].startswith(WAITING)


def read_collapsed(text: str) -> list[tuple[list[str], int]]:
    """py-spy's raw format: `frame;frame;...;leaf count` per line, root first."""
    stacks = []
    for line in text.splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks.append((frames.split(";"), int(count)))
    return stacks


def summarise(stacks: list[tuple[list[str], int]], cpu_s: float, requests: int, top: int = 15) -> dict:
    """Shares of the busy samples by category and by function (self), turned into CPU ms per request
    with the workers' CPU time measured from /proc over the same window (sample counts alone would
    depend on how many threads py-spy wrongly finds busy)."""
    busy = [(frames, count) for frames, count in stacks if not waiting(frames)]
    by_category: dict[str, int] = {}
    by_leaf: dict[tuple[str, str], int] = {}
    for frames, count in busy:
        category = categorise(frames)
        by_category[category] = by_category.get(category, 0) + count
        by_leaf[frames[-1], category] = by_leaf.get((frames[-1], category), 0) + count
    total = sum(by_category.values()) or 1
    cpu_ms = cpu_s * 1000 / max(1, requests)

    def row(count: int) -> dict:
        return {"samples": count, "share": count / total, "cpu_ms_per_request": count / total * cpu_ms}

    order = [name for name, _ in CATEGORIES]
    return {
        "samples": sum(count for _, count in stacks), "busy_samples": total, "requests": requests,
        "worker_cpu_s": cpu_s, "cpu_ms_per_request": cpu_ms,
        "categories": [{"category": c, **row(by_category.get(c, 0))} for c in order],
        "top": [{"frame": leaf, "category": category, **row(n)}
                for (leaf, category), n in sorted(by_leaf.items(), key=lambda item: -item[1])[:top]],
    }


def markdown(summary: dict) -> str:
    lines = [f"{summary['busy_samples']} busy samples of {summary['samples']} over both workers; "
             f"{summary['requests']} requests answered while recording; the workers used "
             f"{summary['worker_cpu_s']:.1f} s of CPU, {summary['cpu_ms_per_request']:.1f} ms per request\n",
             "| category | share of samples | CPU ms per request |", "|---|---|---|"]
    lines += [f"| {c['category']} | {c['share']:.1%} | {c['cpu_ms_per_request']:.2f} |" for c in summary["categories"]]
    lines += ["", "| top function (self) | category | share | CPU ms per request |", "|---|---|---|---|"]
    lines += [f"| `{t['frame']}` | {t['category']} | {t['share']:.1%} | {t['cpu_ms_per_request']:.2f} |"
              for t in summary["top"]]
    return "\n".join(lines)


# ---- the flame graph -----------------------------------------------------------------------------

def tree(stacks: list[tuple[list[str], int]]) -> dict:
    root: dict = {"name": "all", "count": 0, "children": {}}
    for frames, count in stacks:
        root["count"] += count
        node = root
        for frame in frames:
            node = node["children"].setdefault(frame, {"name": frame, "count": 0, "children": {}})
            node["count"] += count
    return root


def colour(frame: str) -> str:
    """Warm colours as flame graphs use; ONNX Runtime, decode and resize in blue so the model stands out."""
    hue = zlib.crc32(frame.encode()) % 40
    if categorise([frame]) in ("ONNX Runtime", "JPEG decode", "resize"):
        return f"hsl({200 + hue}, 60%, 65%)"
    return f"hsl({hue}, 80%, 60%)"


def svg(stacks: list[tuple[list[str], int]], width: int = 1600, row: int = 16) -> str:
    """A static flame graph (root at the bottom); each frame's full name and share in its tooltip."""
    root = tree(stacks)
    total = root["count"] or 1
    boxes: list[str] = []
    depth_max = [0]

    def place(node: dict, x: float, depth: int) -> None:
        depth_max[0] = max(depth_max[0], depth)
        w = node["count"] / total * width
        if w < 0.3:
            return
        label = html.escape(node["name"])
        boxes.append((depth, f'<g><title>{label} ({node["count"]} samples, {node["count"] / total:.2%})</title>'
                      f'<rect x="{x:.1f}" y="{{y}}" width="{w:.1f}" height="{row - 1}" fill="{colour(node["name"])}"/>'
                      + (f'<text x="{x + 2:.1f}" y="{{ty}}">{html.escape(node["name"][: int(w / 7)])}</text>' if w > 30 else "")
                      + "</g>"))
        for child in sorted(node["children"].values(), key=lambda c: c["name"]):
            place(child, x, depth + 1)
            x += child["count"] / total * width

    place(root, 0.0, 0)
    height = (depth_max[0] + 2) * row
    body = [b.replace("{y}", str(height - (d + 1) * row)).replace("{ty}", str(height - (d + 1) * row + row - 4))
            for d, b in boxes]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" '
            f'font-size="11">\n' + "\n".join(body) + "\n</svg>\n")


# ---- the run -----------------------------------------------------------------------------------

def worker_pids(root: int) -> list[int]:
    """The BentoML worker processes (the ones that serve requests), not the supervisor."""
    workers = []
    for pid in server_pids(root):
        try:
            if b"_bentoml_impl.worker.service" in Path(f"/proc/{pid}/cmdline").read_bytes():
                workers.append(pid)
        except FileNotFoundError:
            continue
    return workers


async def load_while(port: int, requests: list[bytes], clients: int, busy) -> list[float]:
    """Closed-loop load until busy() turns false; the completion time of every 200."""
    done: list[float] = []

    async def client(offset: int) -> None:
        connection, i = Connection(port), offset
        while busy():
            status, _ = await connection.send(requests[i % len(requests)])
            if status == 200:
                done.append(time.monotonic())
            i += clients
        connection.close()

    await asyncio.gather(*(client(k) for k in range(clients)))
    return done


def cpu_s(pids: list[int]) -> float:
    fields = [proc_stat(pid) for pid in pids]
    return sum(int(f[11]) + int(f[12]) for f in fields) / os.sysconf("SC_CLK_TCK")


async def profile(peer, process, jpegs: list[bytes], args, out: Path) -> tuple[str, int, float]:
    """Load on, py-spy on each worker for args.seconds, load off:
    (merged collapsed stacks, requests answered while recording, the workers' CPU seconds meanwhile)."""
    port = port_of(peer)
    requests = [multipart(port, peer.path, jpeg, peer.fields) for jpeg in jpegs]
    await wait_ready(peer, process, requests[0])
    spies: list[subprocess.Popen] = []
    window: list[float] = []
    workers = worker_pids(process.pid)
    used: list[float] = []

    async def record_after_warm_up() -> None:
        await asyncio.sleep(args.warm_up)
        window.append(time.monotonic())
        used.append(cpu_s(workers))
        for n, pid in enumerate(workers, 1):
            command = [args.py_spy, "record", "--pid", str(pid), "--duration", str(args.seconds), "--rate",
                       str(args.rate), "--format", "raw", "--output", str(out / f"worker-{n}.txt")]
            spies.append(subprocess.Popen(command + (["--native"] if args.native else []), stdout=subprocess.DEVNULL))
        while any(spy.poll() is None for spy in spies):
            await asyncio.sleep(0.2)
        window.append(time.monotonic())
        used.append(cpu_s(workers))

    recorder = asyncio.create_task(record_after_warm_up())
    done = await load_while(port, requests, args.clients, lambda: not recorder.done())
    await recorder
    if not spies or any(spy.returncode for spy in spies):
        raise RuntimeError(f"py-spy failed ({[spy.returncode for spy in spies]}); it needs root or ptrace rights")
    answered = sum(window[0] <= t <= window[1] for t in done)
    merged = "".join(f"worker-{n};{line}\n" for n, path in enumerate(sorted(out.glob("worker-*.txt")), 1)
                     for line in path.read_text().splitlines() if line.strip())
    for path in out.glob("worker-*.txt"):  # merged into profile.collapsed.txt
        path.unlink()
    return merged, answered, used[1] - used[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=20, help="py-spy recording length")
    parser.add_argument("--warm-up", type=float, default=5.0, help="seconds of load before recording")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames too; slower)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--home", default="/tmp/tuneserve-bench")
    parser.add_argument("--model", default="imagenet")
    parser.add_argument("--py-spy", default=str(Path(sys.executable).parent / "py-spy"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "profile"))
    args = parser.parse_args()
    args.max_batch, args.batch_timeout_s = 32, 0.01  # make_peers' settings; tuneserve keeps its own defaults

    home, out = Path(args.home), Path(args.out)
    os.environ["BENTOML_HOME"] = str(home)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("worker-*.txt"):
        old.unlink()
    version = ensure_model(args.model)
    (peer,) = make_peers(["tuneserve"], home, Path(version.path), home, args)
    (home / "peer-logs").mkdir(parents=True, exist_ok=True)
    process = start(peer, home / "peer-logs" / "profile-tuneserve.log", None)
    try:
        collapsed, answered, used = asyncio.run(profile(peer, process, make_jpegs(), args, out))
    finally:
        stop(process)
    stacks = read_collapsed(collapsed)
    summary = summarise(stacks, used, answered)
    (out / "profile.collapsed.txt").write_text(collapsed)
    (out / "profile.svg").write_text(svg([(frames, n) for frames, n in stacks if not waiting(frames)]))
    (out / "profile.json").write_text(json.dumps({"seconds": args.seconds, "clients": args.clients, "rate_hz": args.rate, **summary}, indent=2))
    print(markdown(summary))
    print(f"\nwritten: {out}/profile.svg, profile.collapsed.txt, profile.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
