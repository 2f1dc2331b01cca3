"""Serving benchmark: in process vs over HTTP, and ONNX Runtime vs PyTorch eager.

    .venv/bin/python bench/serve.py [--home /tmp/tuneserve-bench] [--seconds 8] [--workers 1]

Uses the `imagenet` EfficientNet-Lite0 model (224 px, 1000 classes) from `tuneserve bootstrap`
in a private BentoML store (built there on first run), on JPEG photos from scikit-image.
Prints a markdown table (paste it into docs/service.md) and writes bench/serve.json.
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
    from training.cli import bootstrap

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


async def http_bench(url: str, jpegs: list[bytes], seconds: float, clients: int = 32) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def one(i: int) -> float:
            started = time.perf_counter()
            response = await client.post("/classify", files={"image": ("p.jpg", jpegs[i % len(jpegs)], "image/jpeg")}, data={"top_k": "5"})
            response.raise_for_status()
            return (time.perf_counter() - started) * 1000

        for i in range(8):
            await one(i)  # warm up
        single = [await one(i) for i in range(60)]

        counter = {"done": 0}
        deadline = time.perf_counter() + seconds

        async def worker(offset: int) -> None:
            i = offset
            while time.perf_counter() < deadline:
                await one(i)
                counter["done"] += 1
                i += clients

        started = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        elapsed = time.perf_counter() - started
    return {
        "throughput": counter["done"] / elapsed,
        "requests": counter["done"],
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
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: cores / workers)")
    parser.add_argument("--batch-max-size", type=int, default=32)
    parser.add_argument("--batch-max-latency-ms", type=float, default=2.0)
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()

    os.environ["BENTOML_HOME"] = args.home
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    Path(args.home).mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    threads = args.threads or max(1, cores // args.workers)
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
        "TUNESERVE_WORKERS": str(args.workers),
        "TUNESERVE_THREADS": str(threads),
        "TUNESERVE_BATCH_MAX_SIZE": str(args.batch_max_size),
        "TUNESERVE_BATCH_MAX_LATENCY_MS": str(args.batch_max_latency_ms),
        "TUNESERVE_HOME": str(Path(args.home) / "tuneserve"),
    }
    server = start_server(env, port)
    try:
        remote = asyncio.run(http_bench(f"http://127.0.0.1:{port}", jpegs, args.seconds))
    finally:
        server.terminate()
        server.wait(30)

    ratio = remote["throughput"] / local["throughput"]
    rows = [
        ("in-process throughput (decode+preprocess+ORT, best batch %d)" % local["best_batch"], f"{local['throughput']:.1f} img/s"),
        ("in-process throughput by batch", ", ".join(f"{k}: {v}" for k, v in local["throughput_by_batch"].items())),
        (f"HTTP throughput, 32 concurrent clients ({args.workers} worker(s), {threads} ORT threads)", f"{remote['throughput']:.1f} img/s"),
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
    result = {"model": version.tag, "cores": cores, "workers": args.workers, "threads": threads,
              "in_process": local, "http": remote, "ratio": ratio, "torch_vs_onnx": compare,
              "batching": {"max_size": args.batch_max_size, "max_latency_ms": args.batch_max_latency_ms}}
    (ROOT / "bench" / "serve.json").write_text(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
