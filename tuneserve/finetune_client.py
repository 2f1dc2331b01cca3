"""`tuneserve finetune`: submit a fine-tune job to a (remote) tuneserve server and follow it.

    tuneserve finetune --server URL --data DIR|ZIP --name NAME --source SRC [--strategy full] [--epochs 3] [--follow]
    tuneserve finetune status JOB_ID [--follow]
    tuneserve finetune list [--state running]
    tuneserve finetune cancel JOB_ID
    tuneserve finetune resume JOB_ID [--follow]

Standard library HTTP (urllib) and tqdm only; no torch, no service imports.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from pathlib import Path
from typing import Any, Iterator

# The server's ENDED_STATES (service/finetune/store.py; tests/test_finetune_store.py keeps them equal):
# nothing changes after these until a resume.
ENDED_STATES = frozenset({"succeeded", "failed", "cancelled", "interrupted"})
ACTIONS = ("submit", "status", "list", "cancel", "resume", "log")


class ClientError(Exception):
    pass


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="submit a fine-tune job to a tuneserve server and follow it (or status/list/cancel/resume/log)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", nargs="?", choices=ACTIONS, default="submit")
    p.add_argument("job_id", nargs="?", help="job id (status, cancel, resume, log)")
    p.add_argument("--server", default=os.environ.get("TUNESERVE_SERVER", "http://127.0.0.1:3000"),
                   help="server URL (default $TUNESERVE_SERVER or http://127.0.0.1:3000)")
    p.add_argument("--api-key", help="API key (default $TUNESERVE_API_KEY, else the server's key file when the server is on this machine)")
    p.add_argument("--data", type=Path, help="dataset: folder per class / manifest folder (zipped for you) or a .zip")
    p.add_argument("--data-path", help="a dataset path inside the server's data root instead of an upload")
    p.add_argument("--name", help="target model name (a new version if it exists)")
    p.add_argument("--source", help="backbone (efficientnet_lite0, resnet18:IMAGENET1K_V1, simple_cnn:none) or stored model name[:version]")
    p.add_argument("--strategy", choices=["linear", "partial", "full"])
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--image-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--test-fraction", type=float)
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="any other training config field, e.g. --set hflip=false (repeatable)")
    p.add_argument("--state", help="list: only jobs in this state")
    p.add_argument("--follow", "-f", action="store_true", help="follow the job with a progress bar until it ends")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls when following")
    p.add_argument("--timeout", type=float, default=600.0, help="HTTP timeout for the upload, seconds")
    p.set_defaults(handler=run)


# -- HTTP -------------------------------------------------------------------------------------
class Client:
    def __init__(self, server: str, api_key: str | None = None, timeout: float = 600.0):
        from models.api_keys import client_key

        self.server = server.rstrip("/")
        self.api_key = api_key or client_key(self.server)  # a server on this machine: its key file
        self.timeout = timeout

    def request(self, method: str, path: str, body=None, headers: dict[str, str] | None = None, timeout: float | None = None) -> Any:
        headers = dict(headers or {})
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.server + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                data = response.read()
                kind = response.headers.get("content-type", "")
        except urllib.error.HTTPError as error:
            raw = error.read().decode(errors="replace")
            try:
                payload = json.loads(raw)
                message = payload.get("error") or payload.get("detail") or raw
            except (json.JSONDecodeError, AttributeError):
                message = raw
            raise ClientError(f"{method} {path}: HTTP {error.code}: {message}") from None
        except urllib.error.URLError as error:
            raise ClientError(f"cannot reach {self.server}: {error.reason}") from None
        return json.loads(data) if "json" in kind else data.decode(errors="replace")

    def submit(self, config: dict[str, Any], archive: Path | None = None, data_path: str | None = None) -> dict:
        fields = {"config": json.dumps(config)}
        if data_path:
            fields["data_path"] = data_path
        body, length, content_type = _multipart(fields, ("dataset", archive) if archive else None)
        return self.request("POST", "/finetune", body, {"Content-Type": content_type, "Content-Length": str(length)})

    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/finetune/{urllib.parse.quote(job_id)}", timeout=30)


def _multipart(fields: dict[str, str], file: tuple[str, Path] | None) -> tuple[Iterator[bytes] | bytes, int, str]:
    """A multipart/form-data body that streams the file from disk, with its exact length."""
    boundary = uuid.uuid4().hex
    head = b""
    for key, value in fields.items():
        head += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{key}\"\r\n\r\n{value}\r\n").encode()
    tail = f"--{boundary}--\r\n".encode()
    content_type = f"multipart/form-data; boundary={boundary}"
    if file is None:
        body = head + tail
        return body, len(body), content_type
    name, path = file
    head += (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{path.name}\"\r\n"
        "Content-Type: application/zip\r\n\r\n"
    ).encode()
    size = path.stat().st_size
    end = b"\r\n" + tail

    def chunks() -> Iterator[bytes]:
        yield head
        with path.open("rb") as handle:
            while chunk := handle.read(1024 * 1024):
                yield chunk
        yield end

    return chunks(), len(head) + size + len(end), content_type


def zip_folder(folder: Path, destination: Path) -> Path:
    with zipfile.ZipFile(destination, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink() and not path.name.startswith("."):
                bundle.write(path, path.relative_to(folder).as_posix())
    return destination


# -- commands ---------------------------------------------------------------------------------
def build_config(args: argparse.Namespace) -> dict[str, Any]:
    if not args.name:
        raise ClientError("--name is required to submit")
    config: dict[str, Any] = {"name": args.name}
    for key in ("source", "strategy", "epochs", "batch_size", "learning_rate", "image_size", "seed", "val_fraction", "test_fraction"):
        value = getattr(args, key)
        if value is not None:
            config[key] = value
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ClientError(f"--set {item!r}: expected KEY=VALUE")
        try:
            config[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            config[key.strip()] = raw
    return config


def follow(client: Client, job_id: str, interval: float = 1.0, out=sys.stderr) -> dict:
    from tqdm import tqdm

    bar = tqdm(total=100.0, desc=job_id, unit="%", file=out, bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")
    shown = 0.0
    try:
        while True:
            job = client.job(job_id)
            progress = job.get("progress") or {}
            percent = float(progress.get("percent") or 0.0)
            if percent > shown:
                bar.update(percent - shown)
                shown = percent
            postfix = {"state": job["state"], "phase": job.get("phase")}
            if progress.get("epoch"):
                postfix["epoch"] = f"{progress['epoch']}/{progress.get('epochs')}"
            for key in ("train_loss", "val_accuracy"):
                if progress.get(key) is not None:
                    postfix[key] = f"{progress[key]:.3f}"
            if progress.get("eta_s") is not None:
                postfix["eta"] = f"{progress['eta_s']:.0f}s"
            bar.set_postfix(postfix, refresh=True)
            if job["state"] in ENDED_STATES:
                if job["state"] == "succeeded" and shown < 100:
                    bar.update(100 - shown)
                return job
            time.sleep(interval)
    finally:
        bar.close()


def _summary(job: dict) -> str:
    if job["state"] == "succeeded":
        accuracy = (job.get("eval") or {}).get("accuracy")
        return f"{job['job_id']}: succeeded → {job['model']}" + (f" (test accuracy {accuracy:.3f})" if accuracy is not None else "")
    if job["state"] in ("failed", "cancelled", "interrupted"):
        return f"{job['job_id']}: {job['state']}: {job.get('error')}"
    return f"{job['job_id']}: {job['state']}"


def run(args: argparse.Namespace) -> int:
    client = Client(args.server, args.api_key, args.timeout)
    try:
        return _run(client, args)
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run(client: Client, args: argparse.Namespace) -> int:
    if args.action == "list":
        query = f"?state={urllib.parse.quote(args.state)}" if args.state else ""
        jobs = client.request("GET", f"/finetune{query}", timeout=30)["jobs"]
        for job in jobs:
            progress = job.get("progress") or {}
            print(f"{job['job_id']}  {job['state']:<11} {job.get('name') or '':<20} {progress.get('percent', '')!s:>5}%  {job.get('model') or job.get('error') or ''}")
        return 0
    if args.action in ("status", "cancel", "resume", "log"):
        if not args.job_id:
            raise ClientError(f"tuneserve finetune {args.action} JOB_ID")
        path = f"/finetune/{urllib.parse.quote(args.job_id)}"
        if args.action == "log":
            print(client.request("GET", path + "/log?lines=200", timeout=30))
            return 0
        job = client.request("POST", f"{path}/{args.action}", b"", timeout=30) if args.action != "status" else client.job(args.job_id)
        if args.follow and job["state"] not in ENDED_STATES:
            job = follow(client, args.job_id, args.interval)
        print(json.dumps(job, indent=2) if args.action == "status" and not args.follow else _summary(job))
        return 0 if job["state"] != "failed" else 1
    # submit
    config = build_config(args)
    if bool(args.data) == bool(args.data_path):
        raise ClientError("give exactly one of --data DIR|ZIP or --data-path PATH_ON_SERVER")
    with tempfile.TemporaryDirectory() as scratch:
        archive = None
        if args.data:
            if not args.data.exists():
                raise ClientError(f"--data {args.data}: no such file or folder")
            if args.data.is_dir():
                archive = zip_folder(args.data, Path(scratch) / f"{args.data.name or 'data'}.zip")
            elif args.data.suffix.lower() == ".zip":
                archive = args.data
            else:
                raise ClientError("--data must be a folder or a .zip")
        answer = client.submit(config, archive, args.data_path)
    job_id = answer["job_id"]
    dataset = answer.get("dataset") or {}
    print(f"submitted {job_id}: {dataset.get('images', '?')} images, {dataset.get('classes', '?')} classes", file=sys.stderr)
    if not args.follow:
        print(job_id)
        return 0
    job = follow(client, job_id, args.interval)
    print(_summary(job))
    return 0 if job["state"] == "succeeded" else 1
