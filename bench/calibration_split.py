"""Test-split ECE of auto's published head: temperature fitted on its own val logits (the rows it was
refitted on, the old way) against cross-fitted val logits (training/crossfit.py, what export does now).

    python bench/calibration_split.py [--targets digits-writer,faces,textures] [--per-class 10] [--seeds 0,1]
                                      [--max-test 2000] [--out bench/results/calibration-split.json]

Each case is bench/transfer.py's: the target's train images with val carved from them (15 %), the
recipe's image size, the default source. `budget_s` is 5 s so auto keeps to its cheap heads (a
fine-tune never trains on val, so it is calibrated on val as before). ECE: 15 equal-width bins,
models/serving/calibration.py, as eval.json reports it. Prints the machine's load.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.transfer import prepare_case  # noqa: E402
from bench.transfer_data import load_target  # noqa: E402
from models.serving import calibration as cal  # noqa: E402
from training.auto import run_auto  # noqa: E402
from training.data import ImageDataset, make_loader  # noqa: E402


@torch.no_grad()
def logits_of(model, samples, labels, spec) -> np.ndarray:
    dataset = ImageDataset(samples, labels, spec, train=False, cache=False)
    model.eval()
    return np.concatenate([model(x)[0].numpy() for x, _ in make_loader(dataset, 64, False, 0, 0)])


def scores(logits: np.ndarray, y: np.ndarray, temperature: float) -> dict:
    probabilities = cal.softmax(logits, temperature)
    return {"temperature": round(temperature, 3), "ece": round(cal.ece(probabilities, y), 4),
            "nll": round(cal.nll(probabilities, y), 4)}


def run_case(name: str, per_class: int, seed: int, source: str, max_test: int) -> dict:
    target = load_target(name, per_class, seed)
    if len(target.test_y) > max_test:  # the same seeded subsample bench/transfer.py takes
        keep = np.random.default_rng(seed).permutation(len(target.test_y))[:max_test]
        target = replace(target, test_x=target.test_x[keep], test_y=target.test_y[keep])
    config, splits, labels = prepare_case(target, seed, Path(tempfile.mkdtemp()), source)
    config = config.replace(budget_s=5.0)
    started = time.monotonic()
    result = run_auto(config, splits, labels)
    model, spec = result.built.model, result.built.preprocessing
    y_val = np.array([labels.index(s.label) for s in splits["val"]])
    y_test = np.array([labels.index(s.label) for s in splits["test"]])
    val_logits, test_logits = logits_of(model, splits["val"], labels, spec), logits_of(model, splits["test"], labels, spec)
    row = {"target": name, "per_class": per_class, "seed": seed, "chosen": result.strategy,
           "val": len(y_val), "test": len(y_test), "test_accuracy": round(float((test_logits.argmax(1) == y_test).mean()), 4),
           "val_accuracy_seen": round(float((val_logits.argmax(1) == y_val).mean()), 4),
           "uncalibrated": scores(test_logits, y_test, 1.0),
           "seen": scores(test_logits, y_test, cal.fit_temperature(val_logits, y_val))}
    if result.calibration_logits is not None:
        crossfit = result.calibration_logits
        row["val_accuracy_crossfit"] = round(float((crossfit.argmax(1) == y_val).mean()), 4)
        row["crossfit"] = scores(test_logits, y_test, cal.fit_temperature(crossfit, y_val))
    row["seconds"] = round(time.monotonic() - started, 1)
    row["load_1min"] = round(os.getloadavg()[0], 2)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="digits-writer,faces,textures")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--source", default="efficientnet_lite0")
    parser.add_argument("--max-test", type=int, default=2000)
    parser.add_argument("--out", default="bench/results/calibration-split.json")
    args = parser.parse_args(argv)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in args.targets.split(","):
            rows.append(run_case(name, args.per_class, seed, args.source, args.max_test))
            print(json.dumps(rows[-1]), flush=True)
            Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
