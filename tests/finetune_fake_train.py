"""A stand-in for `python -m training.run` with the same command line and progress contract.

Used by tests/test_finetune*.py through TUNESERVE_TRAINING_COMMAND. Steps sleep
TUNESERVE_FAKE_TRAIN_STEP_S seconds (default 0.1); 4 steps per epoch; a checkpoint file per epoch in
output_dir; `--resume` continues after the last one; publishes a tests/tiny.py model named
`config.name` whose labels are the dataset's class folders. A name starting with `fail` fails
with exit code 2; SIGTERM exits 143 without publishing. TUNESERVE_FAKE_TRAIN_PAD_KB adds a file of that size to
the version; TUNESERVE_FAKE_TRAIN_PUBLISH_GATE=PATH waits for PATH to exist before publishing. Events go
through training/progress.py, as the real trainer's do, so the job tests break when the event
format changes.
"""
import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.jobs.events import ExitCode  # noqa: E402  (torch-free)
from training.progress import JsonlWriter, Progress  # noqa: E402  (torch-free)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--progress", required=True)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    config = json.loads(Path(args.config).read_text())
    out = Path(config["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(JsonlWriter(args.progress))

    def on_term(signum, frame):
        progress.failed("cancelled (SIGTERM)", cancelled=True)
        os._exit(ExitCode.TERMINATED)

    signal.signal(signal.SIGTERM, on_term)
    print(f"fake training pid {os.getpid()} config {args.config} resume={args.resume}", flush=True)
    progress.phase("loading")
    if config["name"].startswith("fail"):
        progress.failed("bad data: every image is unreadable (fake)")
        return ExitCode.BAD_INPUT
    step_s = float(os.environ.get("TUNESERVE_FAKE_TRAIN_STEP_S", "0.1"))
    epochs, steps = int(config.get("epochs") or 2), 4
    start = 1
    if args.resume:
        done = sorted(int(p.stem.split("-")[1]) for p in out.glob("epoch-*.pt"))
        start = (done[-1] + 1) if done else 1
        print(f"resuming after epoch {start - 1}", flush=True)
    (out / "resumed_from.txt").write_text(str(start - 1)) if args.resume else None
    progress.phase("training")
    for epoch in range(start, epochs + 1):
        for step in range(1, steps + 1):
            time.sleep(step_s)
            remaining = ((epochs - epoch) * steps + (steps - step)) * step_s
            progress.step(epoch, epochs, step, steps, train_loss=1.0 / (epoch * steps + step), eta_s=remaining)
        (out / f"epoch-{epoch}.pt").write_text("x")
        progress.epoch_end(epoch, epochs, train_loss=0.5 / epoch, val_accuracy=0.5 + 0.1 * epoch, val_loss=0.4)
    progress.phase("exporting")
    from tests.tiny import write_tiny_model

    data = Path(config["data"])
    labels = sorted(p.name for p in data.iterdir() if p.is_dir() and p.name not in ("train", "val", "test"))
    if not labels:
        labels = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    staging = out / "staging"
    write_tiny_model(staging, labels=labels, accuracy=0.9)
    manifest_path = staging / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["source"] = config["source"]
    manifest["lineage"] = [config["source"]]
    manifest["training"] = {k: config.get(k) for k in ("strategy", "epochs")}
    manifest_path.write_text(json.dumps(manifest))
    if os.environ.get("TUNESERVE_FAKE_TRAIN_PAD_KB"):  # a bigger version, for the full-disk test
        (staging / "padding.bin").write_bytes(os.urandom(int(os.environ["TUNESERVE_FAKE_TRAIN_PAD_KB"]) * 1024))
    progress.phase("publishing")
    time.sleep(float(os.environ.get("TUNESERVE_FAKE_TRAIN_PUBLISH_S", "0")))
    gate = os.environ.get("TUNESERVE_FAKE_TRAIN_PUBLISH_GATE")
    while gate and not os.path.exists(gate):  # the test opens the gate once the disk is full
        time.sleep(0.05)
    from models.artifact import store

    try:
        version = store.publish(config["name"], staging, {"job": os.environ.get("TUNESERVE_JOB_ID")})
    except Exception as error:  # as training.run does: the job ends with a failed event naming the cause
        progress.failed(f"{type(error).__name__}: {error}")
        return 1
    progress.succeeded(version.tag, {"accuracy": 0.9, "top_k_accuracy": 1.0, "samples": 3, "macro_f1": 0.9})
    return 0


if __name__ == "__main__":
    sys.exit(main())
