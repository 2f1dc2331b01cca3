"""A fine-tune job on a Ray cluster, timed step by step (run by hand, ~2 minutes on 2 cores).

    .venv/bin/python bench/ray_job.py [--ray-address http://head:8265] [--epochs 2]

Without --ray-address it starts a private single-node Ray (2 CPUs) and stops it at the end. It
then starts `bentoml serve` with TUNESERVE_JOB_BACKEND=ray, submits a real fine-tune over HTTP
(digits, 12 images per class, EfficientNet-Lite0, linear head at 32 px), and prints the
timeline: HTTP submit → claimed by a worker → Ray job running → each training phase (from the
trainer's progress events) → Ray job done → job succeeded → first /classify on the new version.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.ray_cluster import free_port, local_ray  # noqa: E402


def digits_zip(folder: Path, per_class: int = 12) -> tuple[bytes, Path]:
    subprocess.run([sys.executable, "-m", "tuneserve", "demo-data", "digits", str(folder), "--size", "32"],
                   cwd=ROOT, check=True, capture_output=True)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for label in sorted(p for p in folder.iterdir() if p.is_dir()):
            for image in sorted(label.iterdir())[:per_class]:
                bundle.write(image, f"{label.name}/{image.name}")
    return buffer.getvalue(), sorted((folder / "7").iterdir())[-1]


@contextlib.contextmanager
def server(env: dict[str, str], log_path: Path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "service.service:TuneServe", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        for _ in range(600):
            with contextlib.suppress(httpx.HTTPError):
                if client.get("/readyz").status_code == 200:
                    break
            if process.poll() is not None:
                raise RuntimeError(log_path.read_text()[-2000:])
            time.sleep(0.2)
        from models.serving.api_keys import client_key
        from service.config import key_settings

        client.headers["Authorization"] = f"Bearer {client_key(str(client.base_url), key_settings(env))}"  # keys are on by default
        yield client
    finally:
        process.terminate()
        process.wait(60)


def publish_default_model(env: dict[str, str], work: Path) -> None:
    code = ("from pathlib import Path; from models.artifact import store; from tests.tiny import write_tiny_model; "
            f"store.publish('imagenet', write_tiny_model(Path({str(work / 'stage')!r})))")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)


def timeline(job: dict, submitted: float, ray_info, progress_file: Path, served_at: float) -> list[tuple[float, str]]:
    marks = [(0.0, "POST /finetune answered 202 (job queued)"), (job["started"] - submitted, "claimed by a serving worker")]
    if ray_info is not None and ray_info.start_time:
        marks.append((ray_info.start_time / 1000 - submitted, f"Ray job {ray_info.submission_id} started"))
    for line in progress_file.read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "phase":
            marks.append((event["time"] - submitted, f"trainer phase: {event['phase']}"))
        elif event.get("event") == "epoch":
            marks.append((event["time"] - submitted, f"epoch {event['epoch']} done (val accuracy {event.get('val_accuracy')})"))
    if ray_info is not None and ray_info.end_time:
        marks.append((ray_info.end_time / 1000 - submitted, f"Ray job {ray_info.status}"))
    marks.append((job["finished"] - submitted, f"job {job['state']}: {job['model']}"))
    marks.append((served_at - submitted, "first /classify answered by the new version"))
    return sorted(marks)


def run(ray_url: str, epochs: int) -> None:
    from ray.job_submission import JobSubmissionClient

    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "TUNESERVE_HOME": str(work / "home"),
           "BENTOML_DO_NOT_TRACK": "true", "TUNESERVE_JOB_BACKEND": "ray", "TUNESERVE_RAY_ADDRESS": ray_url,
           "TUNESERVE_POLL_SECONDS": "1", "PYTHONPATH": str(ROOT)}
    publish_default_model(env, work)
    data, seven = digits_zip(work / "digits")
    config = {"name": "digits", "source": "efficientnet_lite0", "strategy": "linear", "epochs": epochs,
              "image_size": 32, "hflip": False, "batch_size": 16}
    with server(env, work / "server.log") as client:
        submitted = time.time()
        answer = client.post("/finetune", data={"config": json.dumps(config)}, files={"dataset": ("d.zip", data, "application/zip")})
        answer.raise_for_status()
        job_id = answer.json()["job_id"]
        while (job := client.get(f"/finetune/{job_id}").json())["state"] in ("queued", "running"):
            time.sleep(0.2)
        if job["state"] != "succeeded":
            print(client.get(f"/finetune/{job_id}/log", params={"lines": 60}).text)
            raise SystemExit(f"job {job['state']}: {job['error']}")
        version = job["model"].split(":")[1]
        while True:
            reply = client.post("/classify", data={"model": "digits"}, files={"image": ("7.png", seven.read_bytes(), "image/png")})
            if reply.status_code == 200 and reply.json()["version"] == version:
                served_at = time.time()
                break
            time.sleep(0.1)
    ray_info = JobSubmissionClient(ray_url).get_job_info(f"tuneserve-{job_id}-1")
    progress = work / "home" / "finetune" / "jobs" / job_id / "progress-1.jsonl"
    print(f"fine-tune job {job_id} on Ray ({ray_url}), {config}")
    for offset, what in timeline(job, submitted, ray_info, progress, served_at):
        print(f"  {offset:7.1f} s  {what}")
    print(f"  eval: {job['eval']}; classify a held-out 7 → {reply.json()['predictions'][0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ray-address", help="a running cluster's dashboard URL (default: start a private one)")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    if args.ray_address:
        run(args.ray_address, args.epochs)
        return
    started = time.monotonic()
    with local_ray(num_cpus=2) as url:
        print(f"private Ray up at {url} in {time.monotonic() - started:.1f} s")
        run(url, args.epochs)


if __name__ == "__main__":
    main()
