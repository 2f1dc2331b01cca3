"""One fine-tune run end to end: load data → train → export → parity → evaluate → publish."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.data.datasets import fingerprint, split_origins
from models.artifact.manifest import DatasetInfo, eval_summary, write_eval
from models.data.report import write_report
from models.serving.runtime import RuntimeOptions
from models.artifact.store import ModelVersion
from models.serving.trust import calibrate_version
from training.config import TrainConfig
from training.progress import Progress, StageMeter

log = logging.getLogger("tuneserve.training")
REPORT_FILE = "report.html"


@dataclass
class RunResult:
    version: ModelVersion
    report: dict[str, Any]
    history: list[dict[str, Any]]
    seconds: float
    train_seconds: float
    report_path: Path | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.version.tag,
            "report": str(self.report_path) if self.report_path else None,
            "eval": eval_summary(self.report),
            "epochs": self.history,
            "seconds": round(self.seconds, 1),
            "train_seconds": round(self.train_seconds, 1),
        }


def image_meter(progress: Progress, stage: str):
    """`on_images(done, total)` → `stage` events (the total is known once the pass starts)."""
    meter = StageMeter(progress, stage, 1, unit="images")

    def on_images(done: int, total: int) -> None:
        meter.total = total
        meter(done)
    return on_images


def run(config: TrainConfig, progress: Progress | None = None, stop: threading.Event | None = None,
        resume: bool = False) -> RunResult:
    started = time.monotonic()
    progress = progress or Progress()
    config.validate()
    if config.is_instant():  # a head on a stored embedding: no torch, seconds
        from models.transfer.instant import run_instant

        result = run_instant(config, progress, stop)
        return RunResult(result.version, result.report, [], result.seconds, result.seconds)
    from training.data import check_readable, load_dataset, prepare_splits
    from training.export import evaluate_export, export_model, held_out_images, publish, quantize_export
    from training.auto import run_auto, should_run_auto
    from training.recipe import apply_recipe
    from training.train import train

    out = config.resolved_output_dir()
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        for stale in ("last.pt", "best.pt", "metrics.jsonl"):
            (out / stale).unlink(missing_ok=True)
    config.save(out)

    progress.phase("loading")
    samples = load_dataset(config.data, out / "data")
    splits, labels = prepare_splits(samples, config.val_fraction, config.test_fraction, config.seed,
                                    config.min_images_per_class)
    check_readable(samples, workers=max(1, config.num_workers) + 1)
    origins = split_origins(samples, splits)
    dataset = DatasetInfo(fingerprint=fingerprint(samples), num_train=len(splits["train"]),
                          num_val=len(splits["val"]), num_test=len(splits["test"]), source=str(config.data),
                          splits_given=origins["given"], splits_derived=origins["derived"])
    log.info("data: %d classes, train %d, val %d, test %d (given: %s; carved from train: %s)", len(labels),
             dataset.num_train, dataset.num_val, dataset.num_test, origins["given"] or "none", origins["derived"] or "none")

    config, recipe = apply_recipe(config, splits, labels, out, progress, resume)  # before training: the job shows it
    progress.phase("training")
    if should_run_auto(config):
        result = run_auto(config, splits, labels, progress, stop, resume, job_started=started)
    else:
        result = train(config, splits, labels, progress, stop, resume)
    test = splits["test"] or splits["val"]
    recipe_record = {**recipe.to_dict(), "candidates": result.candidates, "budget_s": result.budget_s,
                     "chosen": result.strategy, "chosen_by": "val macro F1" if result.candidates else None}
    training = {**config.to_dict(), "strategy": result.strategy or config.strategy, "recipe": recipe_record,
                "best_epoch": result.best_epoch, "history": result.history,
                "device": result.device, "train_seconds": round(result.seconds, 1),
                "stopped_early": result.stopped_early, "evaluated_on": "test" if splits["test"] else "val"}
    staging = out / "export"
    export_model(result.built, labels, staging, held_out_images(test, result.built.preprocessing), training,
                 dataset, progress, checkpoint=result.checkpoint)
    progress.phase("calibrating")
    # auto's cheap heads were refitted on val: calibrate on val logits from heads that never saw the row
    calibrate_version(staging, config.name, splits["train"], splits["val"], RuntimeOptions(device=config.device),
                      val_logits=getattr(result, "calibration_logits", None), on_images=image_meter(progress, "calibration"))
    report, per_image_s = evaluate_export(staging, config.name, test, config.top_k, config.device, progress)
    if config.int8:  # the budget is a hard cap: INT8 runs only in what it leaves, at the pace auto planned it
        budget = result.budget_s or config.budget_s
        report = quantize_export(staging, splits, progress, budget - (time.monotonic() - started) if budget else None,
                                 result.pass_s or per_image_s)
    write_eval(report, out)
    version = publish(config.name, staging, {"fingerprint": dataset.fingerprint, "strategy": training["strategy"]},
                      progress, stop)
    report_path = write_report(out / REPORT_FILE, report, result.history, title=f"tuneserve report: {version.tag}")
    return RunResult(version, report, result.history, time.monotonic() - started, result.seconds, report_path)
