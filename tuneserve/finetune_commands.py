"""`tuneserve finetune`: submit a fine-tune job to a (remote) tuneserve server and follow it.

    tuneserve finetune --server URL --data DIR|ZIP --name NAME --source SRC [--strategy full] [--epochs 3] [--follow]
    tuneserve finetune status JOB_ID [--follow]
    tuneserve finetune list [--state running]
    tuneserve finetune cancel JOB_ID
    tuneserve finetune resume JOB_ID [--follow]

On tuneserve.client (httpx, typed); no torch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from models.jobs.train_config import TrainConfig
from tuneserve.client import ENDED_STATES, Client, ClientError, JobHandle
from tuneserve.model_flags import add_model_flags, given_values

ACTIONS = ("submit", "status", "list", "cancel", "resume", "log")
SERVER_SET = ("data", "output_dir")  # the server fills these in; --data here is the dataset to upload


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
    add_model_flags(p, TrainConfig, aliases={"learning_rate": ["--lr"]}, exclude=SERVER_SET)  # the job's config
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="a training config field as JSON, e.g. --set hflip=false (repeatable; overrides the flags)")
    p.add_argument("--state", help="list: only jobs in this state")
    p.add_argument("--follow", "-f", action="store_true", help="follow the job with a progress bar until it ends")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls when following")
    p.add_argument("--timeout", type=float, default=600.0, help="HTTP timeout for the upload, seconds")
    p.set_defaults(handler=run)


# -- commands ---------------------------------------------------------------------------------
def build_config(args: argparse.Namespace) -> dict[str, Any]:
    if not args.name:
        raise ClientError("--name is required to submit")
    config: dict[str, Any] = given_values(args, TrainConfig, exclude=SERVER_SET)
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
    """Wait for the job with a progress bar; → the final job as a dict."""
    from tqdm import tqdm

    bar = tqdm(total=100.0, desc=job_id, unit="%", file=out, bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")
    shown = [0.0]

    def show(job) -> None:
        progress = job.progress or {}
        percent = 100.0 if job.state == "succeeded" else float(progress.get("percent") or 0.0)
        if percent > shown[0]:
            bar.update(percent - shown[0])
            shown[0] = percent
        postfix = {"state": job.state, "phase": job.phase}
        if progress.get("epoch"):
            postfix["epoch"] = f"{progress['epoch']}/{progress.get('epochs')}"
        for key in ("train_loss", "val_accuracy"):
            if progress.get(key) is not None:
                postfix[key] = f"{progress[key]:.3f}"
        if progress.get("eta_s") is not None:
            postfix["eta"] = f"{progress['eta_s']:.0f}s"
        bar.set_postfix(postfix, refresh=True)

    try:
        return JobHandle(client, job_id).wait(interval=interval, on_progress=show).model_dump()
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
    try:
        with Client(args.server, args.api_key, args.timeout) as client:
            return _run(client, args)
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run(client: Client, args: argparse.Namespace) -> int:
    if args.action == "list":
        for job in (j.model_dump() for j in client.jobs(args.state)):
            progress = job.get("progress") or {}
            print(f"{job['job_id']}  {job['state']:<11} {job.get('name') or '':<20} {progress.get('percent', '')!s:>5}%  {job.get('model') or job.get('error') or ''}")
        return 0
    if args.action in ("status", "cancel", "resume", "log"):
        if not args.job_id:
            raise ClientError(f"tuneserve finetune {args.action} JOB_ID")
        if args.action == "log":
            print(client.log(args.job_id))
            return 0
        act = {"status": client.job, "cancel": client.cancel, "resume": client.resume}[args.action]
        job = act(args.job_id).model_dump()
        if args.follow and job["state"] not in ENDED_STATES:
            job = follow(client, args.job_id, args.interval)
        print(json.dumps(job, indent=2) if args.action == "status" and not args.follow else _summary(job))
        return 0 if job["state"] != "failed" else 1
    # submit
    config = build_config(args)
    if bool(args.data) == bool(args.data_path):
        raise ClientError("give exactly one of --data DIR|ZIP or --data-path PATH_ON_SERVER")
    handle = client.finetune(config, data=args.data, data_path=args.data_path)
    answer = handle.submitted.model_dump()
    job_id = answer["job_id"]
    dataset = answer.get("dataset") or {}
    print(f"submitted {job_id}: {dataset.get('images', '?')} images, {dataset.get('classes', '?')} classes", file=sys.stderr)
    if not args.follow:
        print(job_id)
        return 0
    job = follow(client, job_id, args.interval)
    print(_summary(job))
    return 0 if job["state"] == "succeeded" else 1
