"""Serving benchmark: in process vs over HTTP (and the OIP over REST and gRPC), and ONNX Runtime vs PyTorch eager.

    .venv/bin/python bench/serve.py [--home /tmp/tuneserve-bench] [--seconds 8] [--workers N]

Uses the `imagenet` EfficientNet-Lite0 model (224 px, 1000 classes) from `tuneserve bootstrap`
in a private BentoML store (built there on first run), on JPEG photos from scikit-image.
Prints a markdown table (the README's Serving → Benchmark table) and writes bench/serve.json.

Then INT8 against fp32 (skip with --skip-int8): the model's static INT8 variant (quantized here on
first run, calibrated on bench/calibration_photos.py crops that exclude the photos measured), in
process at batch 16 on the same images, model only, over HTTP, and the top-5 of the photos.
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
    from models.artifact import store

    if name in store.list_models():
        return store.resolve(name)
    print(f"bootstrapping {name} (EfficientNet-Lite0 export) into {os.environ['BENTOML_HOME']} ...", file=sys.stderr)
    from training.bootstrap import bootstrap

    return bootstrap(name)


def load(version, threads: int, precision: str):
    from models.serving.runtime import OnnxClassifier, RuntimeOptions

    options = RuntimeOptions(device="cpu", intra_op_threads=threads, precision=precision)
    model = OnnxClassifier(version.path, version.name, version.version, options).load()
    assert model.variant == precision, (model.variant, model.variant_reason)
    return model


def in_process(version, jpegs: list[bytes], threads: int, seconds: float) -> dict:
    from models.serving.preprocess import prepare, stack

    model = load(version, threads, "fp32")
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
    latencies = single_latencies(model, jpegs)
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


def single_latencies(model, jpegs: list[bytes], count: int = 60) -> list[float]:
    """One image at a time, decode + preprocess + ORT, in ms: the in-process side of single-client latency."""
    from models.serving.preprocess import prepare, stack

    spec = model.manifest.preprocessing
    latencies = []
    for i in range(count):
        started = time.perf_counter()
        model.predict(stack([prepare(jpegs[i % len(jpegs)], spec)]))
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def like_a_worker(version, jpegs: list[bytes], threads: int) -> dict:
    """Single-image latency in process with one server worker's ORT threads: what a lone HTTP request
    runs on, so HTTP − this is the serving stack's own cost (the all-core figure also counts threads)."""
    model = load(version, threads, "fp32")
    single_latencies(model, jpegs, 8)  # warm up
    latencies = single_latencies(model, jpegs)
    return {"threads": threads, "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99)}


def torch_vs_onnx(model, jpegs: list[bytes], threads: int, batch: int = 16, repeats: int = 5) -> dict:
    import torch

    from models.serving.preprocess import prepare, stack
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


# ---- INT8 against fp32 ---------------------------------------------------------------------------


def ensure_int8(version):
    """`version` with its static INT8 variant, quantized here on first run (torch-free)."""
    if "int8" in version.manifest().variants:
        return version
    sys.path.insert(0, str(ROOT / "bench"))
    from calibration_photos import write_photos
    from models.data.datasets import load_samples
    from models.artifact.quantize import quantize_version
    from models.artifact.quantize_inputs import QuantizeConfig, data_from_samples

    folder = Path(os.environ["BENTOML_HOME"]) / "calibration-photos"
    write_photos(folder, 400)
    started = time.perf_counter()
    config = QuantizeConfig()
    data = data_from_samples(load_samples(folder, require_labels=False), version.manifest(), config)
    variant = quantize_version(version.path, data, config)
    print(f"quantized {version.tag} in {time.perf_counter() - started:.0f} s: {variant}", file=sys.stderr)
    return version


def int8_vs_fp32(version, jpegs: list[bytes], threads: int, seconds: float, batch: int = 16, rounds: int = 2) -> dict:
    """Throughput at `batch` on the same images, fp32 and int8 alternating; best round of each."""
    from models.serving.preprocess import prepare, stack

    models = {precision: load(version, threads, precision) for precision in ("fp32", "int8")}
    spec = models["fp32"].manifest.preprocessing
    pool = ThreadPoolExecutor(threads)
    batches = [[jpegs[(i * batch + j) % len(jpegs)] for j in range(batch)] for i in range(len(jpegs))]
    prepared = stack([prepare(b, spec) for b in batches[0]])
    measured: dict[str, dict[str, list[float]]] = {"in_process": {}, "model_only": {}}

    def rate(step) -> float:
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 4:
            step(done)
            done += 1
        return done * batch / (time.perf_counter() - started)

    for _ in range(rounds):
        for precision, model in models.items():
            model.predict(prepared)  # warm up
            measured["in_process"].setdefault(precision, []).append(rate(
                lambda i: model.predict(stack(list(pool.map(lambda b: prepare(b, spec), batches[i % len(batches)]))))))
            measured["model_only"].setdefault(precision, []).append(rate(lambda i: model.predict(prepared)))
    pool.shutdown()
    best = {kind: {p: max(v) for p, v in runs.items()} for kind, runs in measured.items()}
    return {"batch": batch, **best, "rounds": measured,
            "ratio_in_process": best["in_process"]["int8"] / best["in_process"]["fp32"],
            "ratio_model_only": best["model_only"]["int8"] / best["model_only"]["fp32"]}


def top5_check(version, threads: int) -> dict:
    """fp32 and int8 top-5 for the scikit-image photos (never used for calibration)."""
    from PIL import Image
    from skimage import data as skdata

    from models.serving.preprocess import prepare, stack

    models = {precision: load(version, threads, precision) for precision in ("fp32", "int8")}
    spec = models["fp32"].manifest.preprocessing
    checked = {}
    for name in ("chelsea", "astronaut", "coffee", "rocket"):
        image = stack([prepare(Image.fromarray(getattr(skdata, name)()).convert("RGB"), spec)])
        top = {p: m.top_k(m.predict(image), 5)[0] for p, m in models.items()}
        labels = {p: [r["label"] for r in rows] for p, rows in top.items()}
        checked[name] = {**labels, "same_top5": labels["fp32"] == labels["int8"],
                         "same_top5_set": set(labels["fp32"]) == set(labels["int8"]),
                         "top2_probabilities": {p: [round(r["probability"], 4) for r in rows[:2]] for p, rows in top.items()}}
    return checked


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


def v2_request(port: int, jpeg: bytes, model: str, top_k: int = 5) -> bytes:
    """The same image as one Open Inference Protocol request, as tritonclient sends it: a JSON header,
    then the BYTES tensor (4-byte little-endian length + the JPEG), no content type."""
    header = json.dumps({
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(jpeg) + 4}}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": top_k}}],
    }).encode()
    body = header + len(jpeg).to_bytes(4, "little") + jpeg
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


def grpc_request(jpeg: bytes, model: str, top_k: int = 5):
    """The same image as one OIP gRPC ModelInfer request, as tritonclient.grpc sends it (raw contents)."""
    from service.oip import grpc_predict_v2_pb2 as pb

    image = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])
    top = pb.ModelInferRequest.InferRequestedOutputTensor(
        name="probabilities", parameters={"classification": pb.InferParameter(int64_param=top_k)})
    return pb.ModelInferRequest(model_name=model, inputs=[image], outputs=[top],
                                raw_input_contents=[len(jpeg).to_bytes(4, "little") + jpeg])


async def grpc_bench(port: int, requests: list, seconds: float, clients: int = 32, channels: int = 8) -> dict:
    """As `http_bench`, over gRPC: 32 concurrent callers on `channels` connections (the workers share
    the port, so each connection lands on one of them), and single-caller latency on one connection."""
    import grpc

    from service.oip import grpc_predict_v2_pb2_grpc as pb_grpc

    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", -1)]  # one TCP connection each
    opened = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(channels)]
    stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in opened]

    async def call(stub, request) -> float:
        started = time.perf_counter()
        await stub.ModelInfer(request)
        return (time.perf_counter() - started) * 1000

    for i in range(8):
        await call(stubs[0], requests[i % len(requests)])  # warm up
    single = [await call(stubs[0], requests[i % len(requests)]) for i in range(60)]
    counter = {"done": 0}
    deadline = time.perf_counter() + seconds

    async def caller(offset: int) -> None:
        stub, i = stubs[offset % channels], offset
        while time.perf_counter() < deadline:
            await call(stub, requests[i % len(requests)])
            counter["done"] += 1
            i += clients

    measured = await concurrently(caller, clients, counter, single)
    for channel in opened:
        await channel.close()
    return measured


async def concurrently(caller, clients: int, counter: dict, single: list[float]) -> dict:
    """Run `clients` callers to their deadline; throughput, client CPU per request, single-client p50/p99."""
    started, cpu_started = time.perf_counter(), time.process_time()
    await asyncio.gather(*(caller(k) for k in range(clients)))
    elapsed = time.perf_counter() - started
    return {
        "throughput": counter["done"] / elapsed,
        "requests": counter["done"],
        "client_cpu_ms_per_request": (time.process_time() - cpu_started) * 1000 / max(1, counter["done"]),
        "p50_ms": percentile(single, 50),
        "p99_ms": percentile(single, 99),
    }


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


async def http_bench(port: int, requests: list[bytes], seconds: float, clients: int = 32) -> dict:
    """Throughput of 32 concurrent keep-alive clients sending `requests`, and single-client latency."""
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

    return await concurrently(worker, clients, counter, single)


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


def http_run(env: dict, jpegs: list[bytes], seconds: float, precision: str, v2: bool = False) -> dict:
    """HTTP throughput with TUNESERVE_PRECISION=`precision`, and the variant the responses name;
    with `v2`, the Open Inference Protocol over REST and over gRPC on the same server and images right after."""
    import httpx

    port, grpc_port = free_port(), free_port()
    server = start_server({**env, "TUNESERVE_PRECISION": precision, "TUNESERVE_GRPC_PORT": str(grpc_port)}, port)
    try:
        answer = httpx.post(f"http://127.0.0.1:{port}/classify", files={"image": ("p.jpg", jpegs[0], "image/jpeg")}, timeout=60)
        result = asyncio.run(http_bench(port, [multipart_request(port, jpeg) for jpeg in jpegs], seconds))
        result["variant"] = answer.json()["variant"]
        if v2:
            model = env["TUNESERVE_DEFAULT_MODEL"]
            result["v2"] = asyncio.run(http_bench(port, [v2_request(port, jpeg, model) for jpeg in jpegs], seconds))
            result["grpc"] = asyncio.run(grpc_bench(grpc_port, [grpc_request(jpeg, model) for jpeg in jpegs], seconds))
        return result
    finally:
        server.terminate()
        server.wait(30)


def int8_rows(int8: dict) -> list[tuple[str, ...]]:
    speed, http, top5 = int8["throughput"], int8["http"], int8["top5"]
    same = sum(v["same_top5"] for v in top5.values())
    same_set = sum(v["same_top5_set"] for v in top5.values())
    variant = int8["variant"]
    return [
        (f"in process, batch {speed['batch']} (decode+preprocess+ORT)", f"{speed['in_process']['fp32']:.1f}",
         f"{speed['in_process']['int8']:.1f}", f"**{speed['ratio_in_process']:.2f}×**"),
        (f"model only, batch {speed['batch']}", f"{speed['model_only']['fp32']:.1f}", f"{speed['model_only']['int8']:.1f}",
         f"{speed['ratio_model_only']:.2f}×"),
        ("HTTP /classify, 32 clients (variant named by the response)", f"{http['fp32']['throughput']:.1f} ({http['fp32']['variant']})",
         f"{http['int8']['throughput']:.1f} ({http['int8']['variant']})",
         f"**{http['int8']['throughput'] / http['fp32']['throughput']:.2f}×**"),
        ("top-5 of chelsea, astronaut, coffee, rocket: same order / same labels", "", "",
         f"{same}/{len(top5)} / {same_set}/{len(top5)}"),
        (f"held-out crops ({variant['samples']}): top-1 agreement, max |Δp| ({variant['calibration']} calibration)",
         "", "", f"{variant['agreement']:.3f}, {variant['max_probability_diff']:.3f}"),
    ]


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
    parser.add_argument("--skip-int8", action="store_true", help="no INT8 against fp32 section")
    args = parser.parse_args()

    os.environ["BENTOML_HOME"] = args.home
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    Path(args.home).mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    workers = args.workers or cores
    threads = args.threads or max(1, cores // workers)
    version = ensure_model(args.model)
    if not args.skip_int8:
        version = ensure_int8(version)
    jpegs = make_jpegs()
    print(f"model {version.tag}; {len(jpegs)} JPEGs ~{sum(map(len, jpegs)) // len(jpegs) // 1024} KB; {cores} cores", file=sys.stderr)

    local = in_process(version, jpegs, max(1, cores), args.seconds)
    model = local.pop("model")
    local["like_a_worker"] = like_a_worker(version, jpegs, threads) if threads != max(1, cores) else None
    compare = None if args.skip_torch else torch_vs_onnx(model, jpegs, max(1, cores))

    env = {
        **os.environ,
        "TUNESERVE_DEFAULT_MODEL": args.model,
        "TUNESERVE_WORKERS": str(workers),
        "TUNESERVE_THREADS": str(threads),
        "TUNESERVE_BATCH_MAX_SIZE": str(args.batch_max_size),
        "TUNESERVE_BATCH_MAX_LATENCY_MS": str(args.batch_max_latency_ms),
        "TUNESERVE_HOME": str(Path(args.home) / "tuneserve"),
    }
    remote = http_run(env, jpegs, args.seconds, "fp32", v2=True)
    int8 = None
    if not args.skip_int8:  # right after the fp32 server, so both see the same machine
        int8 = {"http": {"fp32": remote, "int8": http_run(env, jpegs, args.seconds, "int8")},
                "throughput": int8_vs_fp32(version, jpegs, max(1, cores), args.seconds),
                "top5": top5_check(version, max(1, cores)),
                "variant": version.manifest().variants["int8"].model_dump()}

    ratio = remote["throughput"] / local["throughput"]
    rows = [
        ("in-process throughput (decode+preprocess+ORT, best batch %d)" % local["best_batch"], f"{local['throughput']:.1f} img/s"),
        ("in-process throughput by batch", ", ".join(f"{k}: {v}" for k, v in local["throughput_by_batch"].items())),
        (f"HTTP throughput, 32 concurrent clients ({workers} worker(s), {threads} ORT thread(s) each)", f"{remote['throughput']:.1f} img/s"),
        ("HTTP / in-process throughput (goal ≥ 0.95)", f"{ratio:.2f}"),
        ("single client p50 / p99, in process", f"{local['p50_ms']:.1f} / {local['p99_ms']:.1f} ms"),
        ("single client p50 / p99, HTTP", f"{remote['p50_ms']:.1f} / {remote['p99_ms']:.1f} ms"),
        ("HTTP − in-process p50 (goal ≤ 5 ms)", f"{remote['p50_ms'] - local['p50_ms']:.1f} ms"),
        ("HTTP ÷ in-process single-client p99 (goal ≤ 2×)", f"{remote['p99_ms'] / local['p99_ms']:.2f}×"),
    ]
    if local["like_a_worker"]:
        same = local["like_a_worker"]
        rows += [
            (f"single client p50 / p99, in process with a worker's {same['threads']} ORT thread(s)", f"{same['p50_ms']:.1f} / {same['p99_ms']:.1f} ms"),
            ("HTTP − in-process p50, same threads (the serving stack's own cost)", f"{remote['p50_ms'] - same['p50_ms']:.1f} ms"),
            ("HTTP ÷ in-process single-client p99, same threads", f"{remote['p99_ms'] / same['p99_ms']:.2f}×"),
        ]
    rows += [
        ("OIP over REST (POST /v2/models/…/infer, BYTES + classification 5), same server and images",
         f"{remote['v2']['throughput']:.1f} img/s ({remote['v2']['throughput'] / remote['throughput']:.2f}× /classify); "
         f"p50 / p99 {remote['v2']['p50_ms']:.1f} / {remote['v2']['p99_ms']:.1f} ms"),
        ("OIP over gRPC (ModelInfer, same request as raw contents; 32 callers on 8 connections)",
         f"{remote['grpc']['throughput']:.1f} img/s ({remote['grpc']['throughput'] / remote['v2']['throughput']:.2f}× REST /v2); "
         f"p50 / p99 {remote['grpc']['p50_ms']:.1f} / {remote['grpc']['p99_ms']:.1f} ms; "
         f"client CPU {remote['grpc']['client_cpu_ms_per_request']:.1f} vs {remote['v2']['client_cpu_ms_per_request']:.1f} ms/request"),
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
    if int8:
        print("\nINT8 (static QDQ) against fp32, img/s, same images, alternating rounds (best of each)\n")
        print("| measure | fp32 | int8 | int8 ÷ fp32 |\n|---|---|---|---|")
        for row in int8_rows(int8):
            print("| " + " | ".join(row) + " |")
        for name, check in int8["top5"].items():
            print(f"  {name}: fp32 {check['fp32']} / int8 {check['int8']}; top-2 p {check['top2_probabilities']}",
                  file=sys.stderr)
    result = {"model": version.tag, "cores": cores, "workers": workers, "threads": threads,
              "in_process": local, "http": remote, "ratio": ratio, "torch_vs_onnx": compare, "int8": int8,
              "batching": {"max_size": args.batch_max_size, "max_latency_ms": args.batch_max_latency_ms}}
    (ROOT / "bench" / "serve.json").write_text(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
