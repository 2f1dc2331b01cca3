"""Transfer benchmark on real, offline, shifted targets: the default job against simple baselines.

    python bench/transfer.py [--targets digits-writer,fashion] [--sizes 10,100,all] [--seeds 0,1,2]
                             [--source efficientnet_lite0] [--out bench/results/transfer.json] [--quick]

For every target (bench/transfer_data.py), train size (images per class, or all) and seed, on the
same splits in the same run:
  auto             what a job with default settings does (training/auto.py: logistic and multi-depth
                   heads on the frozen source, a fine-tune when the budget and val leave room; the best
                   on val), at the recipe's image size; val carved from train as the product does
  raw-logistic     logistic regression on the raw pixels
  raw-svc          an RBF SVC on the raw pixels
  embed-knn        k-NN on the source's embedding (its pooled last layer)
  embed-logistic   a logistic probe on the source's embedding
  scratch          the same network from random weights, trained for the wall time auto used
Accuracy, macro F1, balanced accuracy, per-class recall, the positive class's recall where the target
names one (inspection: "defective") and seconds; mean ± std over seeds in the markdown table.
Images of varying sizes (the inspection targets) reach the raw-pixel baselines resized to one
MAX_SIDE × MAX_SIDE grid; inspection defect masks are written beside the data (root/masks/<same
path>). State the machine's load with the numbers: this prints it.
`--quick` (CI): one target, 10 images per class, one seed, 300 test images. Test splits larger than
`--max-test` (2,000) are subsampled with the seed, the same images for every method.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

HOME = Path(tempfile.mkdtemp(prefix="tuneserve-bench-transfer-"))
os.environ.setdefault("BENTOML_HOME", str(HOME / "bentoml"))  # a private store: never the user's
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.baselines import MAX_SIDE, embedding_knn, embedding_logistic, raw_logistic, raw_svc, score  # noqa: E402
from bench.transfer_data import TARGETS, Target, load_target  # noqa: E402
from models.data.datasets import Sample, split_samples  # noqa: E402
from training.auto import predict, run_auto  # noqa: E402
from training.backbones import build_source  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data import ImageDataset, make_loader  # noqa: E402
from training.recipe import choose  # noqa: E402
from training.train import train  # noqa: E402

QUICK_TEST_IMAGES = 300
MAX_SCRATCH_EPOCHS = 100  # a bound, should auto's wall time ever include a pause


def write_images(x: np.ndarray, y: np.ndarray, labels: list[str], root: Path, split: str | None,
                 masks: np.ndarray | None = None) -> list[Sample]:
    """PNGs under root/<label>/; each mask (when given) at root/../masks/<the same path>, outside the dataset."""
    samples = []
    for i, (image, target) in enumerate(zip(x, y)):
        relative = Path(labels[target]) / f"{split or 'train'}-{i:05d}.png"
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / relative)
        if masks is not None:
            (root.parent / "masks" / relative).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(masks[i].astype(np.uint8) * 255).save(root.parent / "masks" / relative)
        samples.append(Sample(root / relative, labels[target], split))
    return samples


def on_one_grid(images: np.ndarray, side: int = MAX_SIDE) -> np.ndarray:
    """Images of different sizes (an object array) → uint8 [N, side, side, 3] for the raw-pixel baselines,
    which resize to at most MAX_SIDE anyway; a stacked array passes through untouched."""
    if images.dtype != object:
        return images
    return np.stack([np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR))
                     for image in images])


@torch.no_grad()
def embeddings(config: TrainConfig, labels: list[str], samples: list[Sample]) -> np.ndarray:
    built = build_source(config, len(labels), labels)
    model = built.model.eval()
    loader = make_loader(ImageDataset(samples, labels, built.preprocessing, train=False, cache=False), 128, False, 0, 0)
    return np.concatenate([model(x)[2].numpy() for x, _ in loader])


def prepare_case(target: Target, seed: int, root: Path, source: str) -> tuple[TrainConfig, dict, list[str]]:
    labels = list(target.labels)
    train = write_images(target.train_x, target.train_y, labels, root / "data", None, target.train_masks)
    test = write_images(target.test_x, target.test_y, labels, root / "data", "test", target.test_masks)
    splits = split_samples(train + test, val_fraction=0.15, test_fraction=0.0, seed=seed)
    config = TrainConfig(name="bench", source=source, data=str(root / "data"), seed=seed,
                         output_dir=str(root / "run"))
    recipe = choose(config, splits, labels)
    config = config.replace(image_size=recipe.image_size, hflip=recipe.hflip, crop_scale=recipe.crop_scale,
                            epochs=recipe.epochs)
    return config, splits, labels


def run_case(target: Target, seed: int, source: str) -> list[dict]:
    root = Path(tempfile.mkdtemp(dir=HOME))
    config, splits, labels = prepare_case(target, seed, root, source)
    test_y = np.array([labels.index(s.label) for s in splits["test"]])
    rows = []

    started = time.monotonic()
    result = run_auto(config, splits, labels)
    auto_s = time.monotonic() - started
    pred = predict(result.built.model, splits["test"], labels, result.built.preprocessing)
    positive = labels.index(target.positive) if target.positive else None
    rows.append(record("auto", score(test_y, pred, auto_s), positive, chosen=result.strategy,
                       candidates=result.candidates, image_size=config.image_size))
    train_x, test_x = on_one_grid(target.train_x), on_one_grid(target.test_x)
    rows.append(record("raw-logistic", raw_logistic(train_x, target.train_y, test_x, target.test_y), positive))
    rows.append(record("raw-svc", raw_svc(train_x, target.train_y, test_x, target.test_y), positive))

    started = time.monotonic()
    train_samples = splits["train"] + splits["val"]
    train_f = embeddings(config, labels, train_samples)
    test_f = embeddings(config, labels, splits["test"])
    embed_s = time.monotonic() - started
    train_fy = np.array([labels.index(s.label) for s in train_samples])
    for name, fit in (("embed-knn", embedding_knn), ("embed-logistic", embedding_logistic)):
        scores = fit(train_f, train_fy, test_f, test_y)
        rows.append(record(name, replace(scores, seconds=scores.seconds + embed_s), positive))
    rows.append(scratch_row(config, splits, labels, auto_s, test_y, root, positive))
    return rows


def scratch_row(config: TrainConfig, splits: dict, labels: list[str], budget_s: float, test_y: np.ndarray,
                root: Path, positive: int | None = None) -> dict:
    """The same network from random weights, trained for about the wall time auto used (epochs from one timed epoch)."""
    started = time.monotonic()
    scratch = config.replace(strategy="full", weights="none", epochs=1, patience=0, output_dir=str(root / "scratch"))
    result = train(scratch, splits, labels)
    epoch_s = max(time.monotonic() - started, 1e-3)
    epochs = min(MAX_SCRATCH_EPOCHS, max(1, int(budget_s // epoch_s)))
    if epochs > 1:
        result = train(scratch.replace(epochs=epochs, output_dir=str(root / "scratch2")), splits, labels)
    pred = predict(result.built.model, splits["test"], labels, result.built.preprocessing)
    return record("scratch", score(test_y, pred, time.monotonic() - started), positive, epochs=epochs)


def record(method: str, scores, positive: int | None = None, **extra) -> dict:
    """A result row; `positive` (a class id present in the test split) adds that class's recall."""
    row = {"method": method, **asdict(scores), "min_recall": float(min(scores.per_class_recall))}
    if positive is not None:  # per_class_recall follows the sorted test labels, which hold every class here
        row["positive_recall"] = float(scores.per_class_recall[positive])
    return {**row, **extra}


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["target"], row["per_class"], row["method"]), []).append(row)
    table = []
    for (target, per_class, method), members in groups.items():
        def stat(key):
            values = np.array([m[key] for m in members], dtype=float)
            return float(values.mean()), float(values.std())
        table.append({"target": target, "per_class": per_class, "method": method, "seeds": len(members),
                      **{key: stat(key) for key in ("accuracy", "macro_f1", "seconds")},
                      "min_recall": stat("min_recall") if "min_recall" in members[0] else None,
                      "positive_recall": stat("positive_recall") if "positive_recall" in members[0] else None,
                      "chosen": sorted({m.get("chosen") for m in members if m.get("chosen")})})
    return table


def markdown(table: list[dict]) -> str:
    """The table; "positive recall" (the defective class's, for inspection) is blank for targets without one."""
    lines = ["| target | train/class | method | accuracy | macro F1 | worst-class recall | positive recall | seconds"
             " | auto chose |", "|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        fmt = lambda pair: f"{pair[0]:.3f} ± {pair[1]:.3f}" if pair else ""  # noqa: E731
        lines.append(f"| {row['target']} | {row['per_class']} | {row['method']} | {fmt(row['accuracy'])} | "
                     f"{fmt(row['macro_f1'])} | {fmt(row['min_recall'])} | {fmt(row.get('positive_recall'))} | "
                     f"{row['seconds'][0]:.1f} | {', '.join(row['chosen'])} |")
    return "\n".join(lines)


def parse_sizes(text: str) -> list[int | None]:
    return [None if part == "all" else int(part) for part in text.split(",")]


def run_target(name: str, per_class: int | None, seed: int, args) -> list[dict]:
    target = load_target(name, per_class, seed)
    if len(target.test_y) > args.max_test:
        keep = np.random.default_rng(seed).permutation(len(target.test_y))[:args.max_test]
        masks = None if target.test_masks is None else target.test_masks[keep]
        target = replace(target, test_x=target.test_x[keep], test_y=target.test_y[keep], test_masks=masks)
    load_before = os.getloadavg()[0]
    rows = []
    for row in run_case(target, seed, args.source):
        rows.append({"target": name, "per_class": per_class or "all", "seed": seed, "train_images": len(target.train_y),
                     "test_images": len(target.test_y), "load_1min": round(load_before, 2), **row})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "candidates"}), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--sizes", default="10,100,all")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--source", default="efficientnet_lite0")
    parser.add_argument("--out", default="")
    parser.add_argument("--max-test", type=int, default=2000,
                        help="a seeded subsample of larger test splits (fashion's 10,000, MNIST's 5,000): 2 cores")
    parser.add_argument("--quick", action="store_true", help="CI: digits-writer, 10 per class, seed 0, 300 test images")
    parser.add_argument("--from-log", default="", help="only summarise the rows a (possibly cut-short) run printed")
    args = parser.parse_args(argv)
    if args.from_log:
        lines = Path(args.from_log).read_text().splitlines()
        print(markdown(summarise([json.loads(line) for line in lines if line.startswith('{"target"') and '"method"' in line])))
        return 0
    if args.quick:
        args.targets, args.sizes, args.seeds, args.max_test = "digits-writer", "10", "0", QUICK_TEST_IMAGES
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    # seed-major: a run cut short still covers every target and size at the seeds it finished
    for seed in (int(s) for s in args.seeds.split(",")):
        for per_class in parse_sizes(args.sizes):
            for name in args.targets.split(","):
                rows += run_target(name, per_class, seed, args)
    table = summarise(rows)
    print(markdown(table))
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "table": table, "loadavg_end": os.getloadavg()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
