"""One inspection-grey case of bench/transfer.py, with the default job's candidates in full: the default
job (`run_auto` on `prepare_case`'s splits and recipe) against raw-pixel baselines and the frozen-feature
logistic head at 224 px and at the recipe's size, on the same splits. One JSON row per method.

    .venv/bin/python bench/auto_inspection.py DEFECTIVE_TRAIN_IMAGES TEST_IMAGES [SEED [VARIANT]]   # e.g. 30 300 (seed 0, grey)
"""
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench.transfer as bt  # noqa: E402
from bench.baselines import embedding_logistic, raw_logistic, raw_svc, score  # noqa: E402
from bench.transfer_data import load_inspection  # noqa: E402
from training.auto import predict, run_auto  # noqa: E402


def main() -> None:
    per_class, test_images = int(sys.argv[1]), int(sys.argv[2])
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    variant = sys.argv[4] if len(sys.argv) > 4 else "grey"
    logging.basicConfig(format="%(asctime)s %(message)s")  # the job's plan (why each candidate ran) on stderr
    logging.getLogger("tuneserve.training").setLevel(logging.INFO)
    target = load_inspection(per_class, seed, variant, test_images=test_images)
    root = Path(tempfile.mkdtemp())
    config, splits, labels = bt.prepare_case(target, seed, root, "efficientnet_lite0")
    test_y = np.array([labels.index(s.label) for s in splits["test"]])

    def out(method, scores, **extra):
        row = {"method": method, **{k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(scores).items()},
               **extra}
        print(json.dumps(row, default=str), flush=True)

    print("seed", seed, "variant", variant, "load at start", os.getloadavg(), "train/val/test", len(splits["train"]), len(splits["val"]),
          len(splits["test"]), "image_size", config.image_size, flush=True)
    started = time.monotonic()
    result = run_auto(config, splits, labels)
    auto_s = time.monotonic() - started
    pred = predict(result.built.model, splits["test"], labels, result.built.preprocessing)
    out("auto", score(test_y, pred, auto_s), chosen=result.strategy, budget_s=result.budget_s,
        candidates=result.candidates)
    train_x, test_x = bt.on_one_grid(target.train_x), bt.on_one_grid(target.test_x)
    out("raw-logistic", raw_logistic(train_x, target.train_y, test_x, target.test_y))
    out("raw-svc", raw_svc(train_x, target.train_y, test_x, target.test_y))
    train_samples = splits["train"] + splits["val"]
    train_y = np.array([labels.index(s.label) for s in train_samples])
    for size in (224, config.image_size):
        sized = config.replace(image_size=size)
        started = time.monotonic()
        train_f, test_f = bt.embeddings(sized, labels, train_samples), bt.embeddings(sized, labels, splits["test"])
        scores = embedding_logistic(train_f, train_y, test_f, test_y)
        out(f"embed-logistic@{size}", scores, seconds_total=round(time.monotonic() - started, 1))
    print("load at end", os.getloadavg(), flush=True)


if __name__ == "__main__":
    main()
