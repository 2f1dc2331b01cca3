"""Serving benchmark: in process vs over HTTP, and ONNX Runtime vs PyTorch eager.

    .venv/bin/python bench/serve.py [--home /tmp/tuneserve-bench] [--seconds 8] [--workers N]

Uses the `imagenet` EfficientNet-Lite0 model (224 px, 1000 classes) from `tuneserve bootstrap`
in a private BentoML store (built there on first run), on JPEG photos from scikit-image.
Prints a markdown table (the README's Serving → Benchmark table) and writes bench/serve.json.
This script may import torch and training/ (the service never does).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def make_jpegs(count: int = 32) -> list[bytes]:
    from PIL import Image
    from skimage import data as skdata

    photos = [Image.fromarray(getattr(skdata, n)()).convert("RGB") for n in ("chelsea", "astronaut", "coffee", "rocket")]
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        width = 480 + 32 * (i % 5)  # typical upload sizes, ~480-608 px wide
        image = photo.resize((width, round(width * photo.height / photo.width)))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def ensure_model(name: str):
    from models import store

    if name in store.list_models():
        return store.resolve(name)
    print(f"bootstrapping {name} (EfficientNet-Lite0 export) into {os.environ['BENTOML_HOME']} ...", file=sys.stderr)
    from training.bootstrap import bootstrap

    return bootstrap(name)


def in_process(version, jpegs: list[bytes], threads: int, seconds: float) -> dict:
    from models.preprocess import prepare, stack
    from models.runtime import OnnxClassifier, RuntimeOptions

    model = OnnxClassifier(version.path, version.name, version.version, RuntimeOptions(device="cpu", intra_op_threads=threads)).load()
    spec = model.manifest.preprocessing
    pool = ThreadPoolExecutor(threads)
    model.predict(stack([prepare(jpegs[0], spec)]))  # warm up

    def run_batch(batch: list[bytes]) -> None:
        arrays = list(pool.map(lambda b: prepare(b, spec), batch))
        model.predict(stack(arrays))

    throughput = {}
    for size in (1, 8, 16, 32):
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 4:
            run_batch([jpegs[(done + i) % len(jpegs)] for i in range(size)])
            done += size
        throughput[size] = done / (time.perf_counter() - started)
    latencies = []
    for i in range(60):
        started = time.perf_counter()
        model.predict(stack([prepare(jpegs[i % len(jpegs)], spec)]))
        latencies.append((time.perf_counter() - started) * 1000)
    pool.shutdown()
    best = max(throughput, key=throughput.get)
    return {
        "throughput_by_batch": {str(k): round(v, 1) for k, v in throughput.items()},
        "best_batch": best,
        "throughput": throughput[best],
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "model": model,
    }


def torch_vs_onnx(model, jpegs: list[bytes], threads: int, batch: int = 16, repeats: int = 5) -> dict:
    import torch

    from models.preprocess import prepare, stack
    from training.backbones import build_backbone

    torch.set_num_threads(threads)
    images = stack([prepare(jpegs[i % len(jpegs)], model.manifest.preprocessing) for i in range(batch)])
    built = build_backbone("efficientnet_lite0", model.manifest.num_classes, None, model.manifest.preprocessing.size)
    net = built.model.eval()
    tensor = torch.from_numpy(images)

    def timed(fn) -> float:
        fn()
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - started)
        return batch / statistics.median(runs)

    with torch.inference_mode():
        torch_ips = timed(lambda: net(tensor))
    onnx_ips = timed(lambda: model.predict(images))
    return {"batch": batch, "torch_eager": torch_ips, "onnxruntime": onnx_ips, "ratio": onnx_ips / torch_ips}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart_request(port: int, jpeg: bytes, top_k: int = 5) -> bytes:
    """One complete, pre-encoded HTTP/1.1 POST /classify, reused for every send."""
    boundary = "tuneservebench"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"top_k\"\r\n\r\n{top_k}\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"p.jpg\"\r\n"
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode() + jpeg + f"\r\n--{boundary}--\r\n".encode()
    head = (
        f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


class RawClient:
    """A keep-alive HTTP/1.1 connection that sends pre-encoded requests.

    The load generator shares the 2 cores with the server, so it must cost as little CPU as
    possible (httpx spends ~1-2 ms of CPU per multipart request here); the server side is what
    is measured. Responses are checked for status 200 and read completely.
    """

    def __init__(self, port: int):
        self.port = port
        self.reader = self.writer = None

    async def send(self, request: bytes) -> float:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        started = time.perf_counter()
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await self.reader.readexactly(length)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
        return (time.perf_counter() - started) * 1000

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def http_bench(port: int, jpegs: list[bytes], seconds: float, clients: int = 32) -> dict:
    requests = [multipart_request(port, jpeg) for jpeg in jpegs]
    single_client = RawClient(port)
    for i in range(8):
        await single_client.send(requests[i % len(requests)])  # warm up
    single = [await single_client.send(requests[i % len(requests)]) for i in range(60)]
    await single_client.close()

    counter = {"done": 0}
    deadline = time.perf_counter() + seconds

    async def worker(offset: int) -> None:
        client, i = RawClient(port), offset
        while time.perf_counter() < deadline:
            await client.send(requests[i % len(requests)])
            counter["done"] += 1
            i += clients
        await client.close()

    started = time.perf_counter()
    cpu_started = time.process_time()
    await asyncio.gather(*(worker(k) for k in range(clients)))
    elapsed = time.perf_counter() - started
    return {
        "throughput": counter["done"] / elapsed,
        "requests": counter["done"],
        "client_cpu_ms_per_request": (time.process_time() - cpu_started) * 1000 / max(1, counter["done"]),
        "p50_ms": percentile(single, 50),
        "p99_ms": percentile(single, 99),
    }


def start_server(env: dict, port: int) -> subprocess.Popen:
    import httpx

    process = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "service.service:TuneServe", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("server exited")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise RuntimeError("server not ready in 120 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default="/tmp/tuneserve-bench", help="private BENTOML_HOME")
    parser.add_argument("--model", default="imagenet")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each throughput run")
    parser.add_argument("--workers", type=int, default=0, help="0: the service default (one per core on CPU)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: cores / workers)")
    parser.add_argument("--batch-max-size", type=int, default=32)
    parser.add_argument("--batch-max-latency-ms", type=float, default=0.0)
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()

    os.environ["BENTOML_HOME"] = args.home
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    Path(args.home).mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    workers = args.workers or cores
    threads = args.threads or max(1, cores // workers)
    version = ensure_model(args.model)
    jpegs = make_jpegs()
    print(f"model {version.tag}; {len(jpegs)} JPEGs ~{sum(map(len, jpegs)) // len(jpegs) // 1024} KB; {cores} cores", file=sys.stderr)

    local = in_process(version, jpegs, max(1, cores), args.seconds)
    model = local.pop("model")
    compare = None if args.skip_torch else torch_vs_onnx(model, jpegs, max(1, cores))

    port = free_port()
    env = {
        **os.environ,
        "TUNESERVE_DEFAULT_MODEL": args.model,
        "TUNESERVE_WORKERS": str(workers),
        "TUNESERVE_THREADS": str(threads),
        "TUNESERVE_BATCH_MAX_SIZE": str(args.batch_max_size),
        "TUNESERVE_BATCH_MAX_LATENCY_MS": str(args.batch_max_latency_ms),
        "TUNESERVE_HOME": str(Path(args.home) / "tuneserve"),
    }
    server = start_server(env, port)
    try:
        remote = asyncio.run(http_bench(port, jpegs, args.seconds))
    finally:
        server.terminate()
        server.wait(30)

    ratio = remote["throughput"] / local["throughput"]
    rows = [
        ("in-process throughput (decode+preprocess+ORT, best batch %d)" % local["best_batch"], f"{local['throughput']:.1f} img/s"),
        ("in-process throughput by batch", ", ".join(f"{k}: {v}" for k, v in local["throughput_by_batch"].items())),
        (f"HTTP throughput, 32 concurrent clients ({workers} worker(s), {threads} ORT thread(s) each)", f"{remote['throughput']:.1f} img/s"),
        ("HTTP / in-process throughput (goal ≥ 0.85)", f"{ratio:.2f}"),
        ("single client p50 / p99, in process", f"{local['p50_ms']:.1f} / {local['p99_ms']:.1f} ms"),
        ("single client p50 / p99, HTTP", f"{remote['p50_ms']:.1f} / {remote['p99_ms']:.1f} ms"),
        ("HTTP − in-process p50 (goal ≤ 10 ms)", f"{remote['p50_ms'] - local['p50_ms']:.1f} ms"),
    ]
    if compare:
        rows += [
            (f"PyTorch eager, batch {compare['batch']} (model only)", f"{compare['torch_eager']:.1f} img/s"),
            (f"ONNX Runtime, batch {compare['batch']} (model only)", f"{compare['onnxruntime']:.1f} img/s"),
            ("ONNX Runtime / PyTorch eager (goal ≥ 2×)", f"{compare['ratio']:.2f}×"),
        ]
    print(f"\n{version.tag} ({model.manifest.preprocessing.size} px, {model.manifest.num_classes} classes), {cores} CPU cores\n")
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    result = {"model": version.tag, "cores": cores, "workers": workers, "threads": threads,
              "in_process": local, "http": remote, "ratio": ratio, "torch_vs_onnx": compare,
              "batching": {"max_size": args.batch_max_size, "max_latency_ms": args.batch_max_latency_ms}}
    (ROOT / "bench" / "serve.json").write_text(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
