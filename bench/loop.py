"""Production-loop benchmark: serving throughput and latency with capture, drift sampling and
shadow mode on vs off, on the real server (`bentoml serve`, one worker).

    .venv/bin/python bench/loop.py [--seconds 10] [--threads 8] [--model tiny|imagenet]

`tiny` (default) is tests/tiny.py's calibrated colour model: inference costs almost nothing, so
the loop's own cost shows at its largest. `imagenet` uses the EfficientNet-Lite0 model built by
`tuneserve bootstrap` in the current BentoML store (224 px), where the loop's share is smaller.
Phases, each `--seconds` of /classify from `--threads` client threads on one server:
- baseline: records only (every answer keeps its small prediction record; drift fraction 0);
- capture: every request's image captured (fraction 1: the worst case);
- shadow: a candidate version runs on a copy of every request;
then a second server with drift sampling of every answer (fraction 1) and all three together.
Prints a markdown table and writes bench/results/loop.json.

    .venv/bin/python bench/loop.py --drift-day [--hours 24] [--rate 10] [--seed 0]

simulates a day of drift windows on undrifted traffic through service/loop/drift.py (no server)
and counts false alarms, non-overlapping windows against the earlier overlapping rule; writes
bench/results/loop_drift_day.json.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
KEY = "bench-loop-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def images(count: int = 64) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def load(url: str, model: str, data: list[bytes], seconds: float, threads: int) -> dict:
    import httpx

    latencies: list[float] = []
    failures = [0]
    stop = time.monotonic() + seconds

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            i = index
            while time.monotonic() < stop:
                started = time.perf_counter()
                r = http.post("/classify", files={"image": ("x.png", data[i % len(data)], "image/png")}, data={"model": model})
                latencies.append(time.perf_counter() - started)
                failures[0] += r.status_code != 200
                i += threads

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return {"requests": len(latencies), "rps": len(latencies) / seconds, "failed": failures[0],
            "p50_ms": 1000 * statistics.median(latencies), "p95_ms": 1000 * float(np.percentile(latencies, 95))}


def publish_models(root: Path, kind: str) -> tuple[str, str, str]:
    from models.artifact import store
    from tests.tiny import write_trusted_tiny_model

    if kind == "imagenet":
        versions = [v.version for v in store.list_models().get("imagenet", [])]
        if len(versions) < 2:
            raise SystemExit("--model imagenet needs two versions of `imagenet` in the store (tuneserve bootstrap twice)")
        return "imagenet", versions[1], versions[0]
    first = store.publish("bench", write_trusted_tiny_model(root / "v1", root / "fit1")).version
    second = store.publish("bench", write_trusted_tiny_model(root / "v2", root / "fit2")).version
    return "bench", first, second


def phases(http, url, model, stable, candidate, data, args, drift: bool) -> dict:
    results = {}
    http.post(f"/models/{model}/rollout", json={"version": candidate, "percent": 0}, headers=AUTH)  # stable answers
    time.sleep(1.5)
    if not drift:
        results["baseline (records only)"] = load(url, model, data, args.seconds, args.threads)
        http.post(f"/models/{model}/capture", json={"enabled": True, "fraction": 1.0}, headers=AUTH)
        time.sleep(1.5)
        results["capture every image"] = load(url, model, data, args.seconds, args.threads)
        http.post(f"/models/{model}/capture", json={"enabled": False}, headers=AUTH)
        http.post(f"/models/{model}/rollout", json={"version": candidate, "mode": "shadow"}, headers=AUTH)
        time.sleep(1.5)
        results["shadow every request"] = load(url, model, data, args.seconds, args.threads)
        return results
    results["drift sample every answer"] = load(url, model, data, args.seconds, args.threads)
    http.post(f"/models/{model}/capture", json={"enabled": True, "fraction": 1.0}, headers=AUTH)
    http.post(f"/models/{model}/rollout", json={"version": candidate, "mode": "shadow"}, headers=AUTH)
    time.sleep(1.5)
    results["capture + drift + shadow"] = load(url, model, data, args.seconds, args.threads)
    return results


def _embeddings(rng, n: int, shift: float = 0.0, dims: int = 64, clusters: int = 10) -> np.ndarray:
    """Traffic like a classifier's embeddings: one cluster per class plus noise; `shift` moves every
    image along one direction (a camera or lighting change)."""
    points = np.eye(dims)[:clusters][rng.integers(0, clusters, n)] * 4 + rng.normal(size=(n, dims))
    points[:, -1] += shift
    return points


def drift_day(args) -> dict:
    """False alarms of the drift test over a simulated day of undrifted traffic, through the loop's
    own drift code and database: `--rate` answers/s, the default sampling (0.25), window (200),
    pass interval (30 s) and alpha (0.01). Non-overlapping windows (the loop's rule: a report once a
    full window of new samples is in) against the earlier rule (every pass tests the newest
    `window`, overlapping the last), then `--shift` of drift to show the windows still fire."""
    from models.artifact.reference import build_reference, load_reference
    from service.loop import drift
    from service.loop.db import LoopDb
    from service.loop.settings import LoopSettings

    s, rng = LoopSettings(), np.random.default_rng(args.seed)
    passes = int(args.hours * 3600 / s.drift_interval_s)
    per_pass = args.rate * s.drift_fraction * s.drift_interval_s
    with tempfile.TemporaryDirectory() as tmp:
        db, labels = LoopDb(Path(tmp)), [str(i) for i in range(10)]
        classes = rng.integers(0, 10, 1000)
        build_reference(_embeddings(rng, 1000), classes, classes, labels).save(Path(tmp))
        reference = load_reference(Path(tmp))  # float16 on disk, as a served version's

        def run(count: int, shift: float, overlapping: bool) -> tuple[list[bool], list[bool]]:
            windows, old, owed = [], [], 0.0
            for _ in range(count):
                owed += per_pass
                n, owed = int(owed), owed - int(owed)
                drift.write_samples(db, [drift.Sample("m", "v", "0", 0.5, False, e, 0.0)
                                         for e in _embeddings(rng, n, shift)], s.drift_max_samples)
                if overlapping:  # the earlier rule: the newest window, every pass
                    report = drift.window_report(db, "m", "v", reference, labels, s.drift_window, s.drift_alpha, after_id=0)
                    old.append(bool(report["embedding"]["drifted"]))
                if drift.unreported(db, "m", "v") >= s.drift_window:
                    report = drift.window_report(db, "m", "v", reference, labels, s.drift_window, s.drift_alpha)
                    drift.record(db, "m", "v", report)
                    windows.append(bool(report["embedding"]["drifted"]))
            return windows, old

        started = time.perf_counter()
        windows, old = run(passes, 0.0, overlapping=not args.skip_overlapping)
        shifted, _ = run(int(args.shift_minutes * 60 / s.drift_interval_s), args.shift, overlapping=False)
    episodes = sum(1 for i, x in enumerate(old) if x and (i == 0 or not old[i - 1]))
    result = {"hours": args.hours, "rate_per_s": args.rate, "window": s.drift_window, "alpha": s.drift_alpha,
              "windows": len(windows), "false_alarms": sum(windows), "rate": sum(windows) / max(1, len(windows)),
              "overlapping_tests": len(old), "overlapping_alarms": sum(old), "overlapping_episodes": episodes,
              "shift": args.shift, "shifted_windows": len(shifted), "shifted_detected": sum(shifted),
              "seconds": time.perf_counter() - started}
    print(json.dumps(result, indent=2))
    return result


def main() -> None:
    import httpx

    from tests.serving import bento_store, running_server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--model", choices=("tiny", "imagenet"), default="tiny")
    parser.add_argument("--drift-day", action="store_true", help="simulate a day of drift windows instead (no server)")
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--rate", type=float, default=10.0, help="--drift-day: answers per second")
    parser.add_argument("--shift", type=float, default=1.0, help="--drift-day: the drift after the day")
    parser.add_argument("--shift-minutes", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0, help="--drift-day: another seed draws another reference")
    parser.add_argument("--skip-overlapping", action="store_true", help="--drift-day: the loop's rule only")
    args = parser.parse_args()
    if args.drift_day:
        result = drift_day(args)
        (ROOT / "bench" / "results" / "loop_drift_day.json").write_text(json.dumps(result, indent=2))
        return
    data = images()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        if args.model == "tiny":
            stack.enter_context(bento_store(root / "bentoml"))  # a private store for the tiny models
        model, stable, candidate = publish_models(root, args.model)
        for drift in (False, True):
            env = {"TUNESERVE_HOME": str(root / f"home-{drift}"), "TUNESERVE_DEFAULT_MODEL": model, "TUNESERVE_API_KEY": KEY,
                   "TUNESERVE_WORKERS": "1", "TUNESERVE_ACCESS_LOG": "off", "TUNESERVE_CAPTURE_MIN_FREE_MB": "0",
                   "TUNESERVE_DRIFT_FRACTION": "1" if drift else "0", "TUNESERVE_DRIFT_INTERVAL_S": "5"}
            with running_server(env, root / f"server-{drift}.log", ready_timeout=300) as url, \
                    httpx.Client(base_url=url, timeout=60) as http:
                load(url, model, data, 2.0, args.threads)  # warm up
                results.update(phases(http, url, model, stable, candidate, data, args, drift))
    base = results["baseline (records only)"]["rps"]
    print(f"| phase ({args.model}, {args.threads} threads, {args.seconds:g} s) | req/s | vs baseline | p50 ms | p95 ms | failed |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['rps']:.0f} | {r['rps'] / base:.2f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['failed']} |")
    out = ROOT / "bench" / "results" / "loop.json"
    out.write_text(json.dumps({"model": args.model, "threads": args.threads, "seconds": args.seconds, "results": results}, indent=2))


if __name__ == "__main__":
    main()
