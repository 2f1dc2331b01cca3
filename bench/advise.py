"""Transfer advisor benchmark, offline and CPU-sized (2 shared cores): does the advisor rank sources
the way real fine-tunes do, how fast is it, how good are instant heads, and do default settings work?

    python bench/advise.py [--out bench/results/advise.json] [--size 64] [--gt-epochs 3]

Five sources, each a stored model of another "industry", all at --size px:
  imagenet  the bootstrapped EfficientNet-Lite0 (ImageNet), at --size
  fonts     imagenet fine-tuned on digits 0-9 printed in the system's fonts
  textures  imagenet fine-tuned on scikit-image textures (brick, grass, gravel, moon)
  faces     imagenet fine-tuned on scikit-image's lfw_subset (face / not a face)
  shapes    imagenet fine-tuned on drawn circles, squares, triangles, lines
Three small targets none of them was trained on (10 train + 3 val images per class), each with a
SHIFTED test split (other images than training's, as production data would be):
  handwritten  scikit-learn digits; train from the first half of the file, test from the second half
  photo-tex    crops of five other scikit-image pictures; train from their top halves, test from bottom halves
  new-shapes   stars, hexagons, crosses, rings; train black on white and filled, test coloured outlines on noise
For each target: the advisor's LogME ranking vs the test accuracy of a real full fine-tune from
every source (same epochs), weighted Kendall tau; advisor time / fine-tune time; instant heads at
1/5/10 images per class vs a full fine-tune on the same images; default-settings jobs (no recipe
fields) on demo digits and on every target, beside a raw-pixel logistic regression on the same split.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

# TUNESERVE_BENCH_HOME keeps the store between runs, so --resume can skip finished stages
HOME = Path(os.environ.get("TUNESERVE_BENCH_HOME") or tempfile.mkdtemp(prefix="tuneserve-bench-advise-"))
os.environ["BENTOML_HOME"] = str(HOME / "bentoml")  # a private store: never the user's ~/bentoml
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from models.transfer.transferability import weighted_kendall_tau  # noqa: E402

SOURCES = ("imagenet", "fonts", "textures", "faces", "shapes")
TARGETS = ("handwritten", "photo-tex", "new-shapes")
FONT_DIRS = ("/usr/share/fonts/truetype", "/usr/share/fonts")


# ---- data (offline, written as folders or manifests) --------------------------------------------------


def write_manifest(root: Path, rows: list[tuple[Image.Image, str, str | None]]) -> Path:
    """Images + manifest.csv (path,label,split) under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["path,label,split"]
    for index, (image, label, split) in enumerate(rows):
        name = f"{label}_{index:05d}.png"
        image.save(root / name)
        lines.append(f"{name},{label},{split or ''}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


def fonts() -> list[str]:
    found = sorted({str(p) for d in FONT_DIRS if Path(d).is_dir() for p in Path(d).rglob("*.ttf")})
    return [f for f in found if "MathTeX" not in f]


def printed_digit(digit: int, font_path: str, size: int, rng) -> Image.Image:
    canvas = Image.new("L", (size, size), 255)
    font = ImageFont.truetype(font_path, int(size * rng.uniform(0.55, 0.8)))
    draw = ImageDraw.Draw(canvas)
    box = draw.textbbox((0, 0), str(digit), font=font)
    x = (size - (box[2] - box[0])) / 2 - box[0] + rng.uniform(-4, 4)
    y = (size - (box[3] - box[1])) / 2 - box[1] + rng.uniform(-4, 4)
    draw.text((x, y), str(digit), fill=0, font=font)
    return canvas.rotate(rng.uniform(-10, 10), fillcolor=255)


def source_fonts(root: Path, size: int, per_class: int = 24) -> Path:  # 240 images
    rng, paths = np.random.default_rng(1), fonts()
    rows = [(printed_digit(d, paths[(i * 7 + d) % len(paths)], size, rng), str(d), None)
            for d in range(10) for i in range(per_class)]
    return write_manifest(root, rows)


def source_textures(root: Path, size: int) -> Path:
    from training.demo_data import write_textures

    write_textures(root, size, per_class=25, seed=2)  # 100 images
    return root


def source_faces(root: Path, size: int) -> Path:
    from skimage import data as skdata

    images = skdata.lfw_subset()  # 100 faces, then 100 non-faces, 25x25 floats; every other one: 100 images
    rows = [(Image.fromarray((img * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR),
             "face" if i < 100 else "not-face", None) for i, img in enumerate(images) if i % 2 == 0]
    return write_manifest(root, rows)


def draw_shape(kind: str, size: int, rng, filled: bool, colour, background) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    c, r = size / 2 + rng.uniform(-6, 6, 2), size * rng.uniform(0.22, 0.36)
    fill, outline, width = (colour if filled else None), colour, max(2, size // 16)
    angle = rng.uniform(0, 2 * np.pi)

    def polygon(n: int, inner: float | None = None):
        points = []
        for k in range(n * (2 if inner else 1)):
            radius = r if not inner or k % 2 == 0 else r * inner
            a = angle + k * np.pi * 2 / (n * (2 if inner else 1))
            points.append((c[0] + radius * np.cos(a), c[1] + radius * np.sin(a)))
        draw.polygon(points, fill=fill, outline=outline, width=width)

    if kind in ("circle", "ring"):
        draw.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=None if kind == "ring" else fill, outline=outline, width=width)
        if kind == "ring":
            draw.ellipse([c[0] - r / 2, c[1] - r / 2, c[0] + r / 2, c[1] + r / 2], outline=outline, width=width)
    elif kind in ("square", "triangle", "hexagon"):
        polygon({"square": 4, "triangle": 3, "hexagon": 6}[kind])
    elif kind == "star":
        polygon(5, inner=0.45)
    elif kind == "line":
        draw.line([(c[0] - r * np.cos(angle), c[1] - r * np.sin(angle)), (c[0] + r * np.cos(angle), c[1] + r * np.sin(angle))],
                  fill=outline, width=width)
    elif kind == "cross":
        for a in (angle, angle + np.pi / 2):
            draw.line([(c[0] - r * np.cos(a), c[1] - r * np.sin(a)), (c[0] + r * np.cos(a), c[1] + r * np.sin(a))],
                      fill=outline, width=width * 2)
    return image


def source_shapes(root: Path, size: int, per_class: int = 25) -> Path:  # 100 images
    rng = np.random.default_rng(3)
    rows = []
    for kind in ("circle", "square", "triangle", "line"):
        for _ in range(per_class):
            colour = tuple(int(v) for v in rng.integers(0, 200, 3))
            rows.append((draw_shape(kind, size, rng, bool(rng.random() < 0.5), colour, (255, 255, 255)), kind, None))
    return write_manifest(root, rows)


def target_handwritten(root: Path, size: int, train: int, val: int, test: int) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    half = len(digits.target) // 2
    rows, seen = [], {}
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        image = Image.fromarray(np.clip(pixels * 255 / 16, 0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        key = (index >= half, int(label))
        seen[key] = seen.get(key, 0) + 1
        if index < half and seen[key] <= train + val:
            rows.append((image, str(label), "train" if seen[key] <= train else "val"))
        elif index >= half and seen[key] <= test:
            rows.append((image, str(label), "test"))
    return write_manifest(root, rows)


def target_photo_textures(root: Path, size: int, train: int, val: int, test: int) -> Path:
    from skimage import data as skdata

    rng, rows = np.random.default_rng(4), []
    for name in ("camera", "coins", "text", "page", "hubble_deep_field"):
        picture = getattr(skdata, name)()
        height = picture.shape[0]
        for split, count, (top, bottom) in (("train", train, (0, height // 2)), ("val", val, (0, height // 2)),
                                            ("test", test, (height // 2, height))):
            for _ in range(count):
                side = int(rng.integers(size // 2, min(bottom - top, picture.shape[1], size * 2)))
                y = int(rng.integers(top, bottom - side + 1))
                x = int(rng.integers(0, picture.shape[1] - side + 1))
                crop = Image.fromarray(picture[y : y + side, x : x + side]).convert("RGB").resize((size, size))
                rows.append((crop, name, split))
    return write_manifest(root, rows)


def target_new_shapes(root: Path, size: int, train: int, val: int, test: int) -> Path:
    rng, rows = np.random.default_rng(5), []
    for kind in ("star", "hexagon", "cross", "ring"):
        for split, count in (("train", train), ("val", val), ("test", test)):
            for _ in range(count):
                if split == "test":  # shifted: coloured outlines on a noisy coloured background
                    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
                    background = tuple(int(v) for v in rng.integers(0, 256, 3))
                    image = draw_shape(kind, size, rng, False, colour, background)
                    noise = rng.integers(-40, 40, (size, size, 3))
                    image = Image.fromarray(np.clip(np.asarray(image).astype(int) + noise, 0, 255).astype(np.uint8))
                else:
                    image = draw_shape(kind, size, rng, True, (0, 0, 0), (255, 255, 255))
                rows.append((image, kind, split))
    return write_manifest(root, rows)


# ---- runs ---------------------------------------------------------------------------------------------


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def publish_source(name: str, data: Path, args) -> dict:
    from training.config import TrainConfig
    from training.pipeline import run

    config = TrainConfig(name=name, source="imagenet", data=str(data), strategy="full", epochs=args.source_epochs,
                         image_size=args.size, batch_size=8, int8=False, output_dir=str(HOME / "runs" / name))
    result, seconds = timed(run, config)
    return {"model": result.version.tag, "accuracy": result.report["accuracy"], "seconds": round(seconds, 1)}


def splits_of(data: Path):
    from models.data.datasets import load_samples, split_samples

    samples = load_samples(data)
    return split_samples(samples, 0.15, 0.15, 0), sorted({s.label for s in samples})


def torch_finetune(source: str, splits, labels, args, train=None) -> tuple[float, float]:
    """(test accuracy, seconds) of a full fine-tune from a stored source, evaluated in torch (no export)."""
    import torch

    from models.serving.preprocess import prepare
    from training.config import TrainConfig
    from training.train import train as train_model

    parts = {**splits, "train": train if train is not None else splits["train"]}
    batch = 8
    while len(parts["train"]) % batch == 1:  # a last batch of one breaks BatchNorm on 1x1 feature maps
        batch -= 1
    epochs = max(args.gt_epochs, math.ceil(args.gt_steps / math.ceil(len(parts["train"]) / batch)))
    config = TrainConfig(name="gt", source=source, data="-", strategy="full", epochs=epochs, batch_size=batch,
                         learning_rate=args.gt_lr,
                         image_size=args.size, hflip=False, int8=False,
                         output_dir=tempfile.mkdtemp(prefix="gt-", dir=HOME))  # fresh: no stale best.pt
    result, seconds = timed(train_model, config, parts, labels)
    model, spec = result.built.model.eval(), result.built.preprocessing
    images = torch.from_numpy(np.stack([prepare(s.path, spec) for s in splits["test"]]))
    with torch.no_grad():
        predicted = model(images)[0].argmax(1).numpy()
    truth = np.array([labels.index(s.label) for s in splits["test"]])
    return float((predicted == truth).mean()), seconds


def raw_pixel_baseline(splits, labels, size: int = 16) -> float:
    from sklearn.linear_model import LogisticRegression

    def pixels(samples):
        return np.stack([np.asarray(Image.open(s.path).convert("L").resize((size, size)), np.float32).ravel() / 255
                         for s in samples])

    probe = LogisticRegression(max_iter=2000).fit(pixels(splits["train"]), [s.label for s in splits["train"]])
    return float((probe.predict(pixels(splits["test"])) == np.array([s.label for s in splits["test"]])).mean())


def rank_target(target: str, data: Path, tags: dict[str, str], args) -> dict:
    from models.jobs.advise import AdviseConfig
    from models.transfer.advise import advise

    splits, labels = splits_of(data)
    advice, advise_s = timed(advise, AdviseConfig(data=str(data), candidates=list(tags.values()), folds=3))
    logme = {c["model"]: c["logme"] for c in advice["candidates"]}
    probe = {c["model"]: c["probe_accuracy"] for c in advice["candidates"]}
    truth, seconds = {}, []
    for name, tag in tags.items():
        truth[name], spent = torch_finetune(tag, splits, labels, args)
        seconds.append(spent)
        print(f"  {target}: fine-tune from {name}: {truth[name]:.3f} in {spent:.0f}s", flush=True)
    names = list(tags)
    tau = weighted_kendall_tau({n: logme[tags[n]] for n in names}, truth)
    return {"target": target, "classes": len(labels), "train": len(splits["train"]), "test": len(splits["test"]),
            "logme": {n: logme[tags[n]] for n in names}, "probe": {n: probe[tags[n]] for n in names},
            "finetune_accuracy": truth, "weighted_tau": round(float(tau), 3), "advise_seconds": round(advise_s, 1),
            "mean_finetune_seconds": round(float(np.mean(seconds)), 1), "best_by_advisor": advice["best"],
            "learning_curve": advice["learning_curve"], "raw_pixel_logistic": raw_pixel_baseline(splits, labels)}


def instant_vs_full(data: Path, source: str, args) -> list[dict]:
    """Instant heads and a full fine-tune on the first n train images per class; the same val and shifted test."""
    from models.transfer.instant import run_instant
    from training.config import TrainConfig

    splits, labels = splits_of(data)
    rows = []
    for n in (1, 5, 10):
        train = [s for label in labels for s in [x for x in splits["train"] if x.label == label][:n]]
        subset = write_subset(data, train, splits, n)
        row = {"images_per_class": n}
        for strategy in ("prototype", "logistic"):
            config = TrainConfig(name=f"instant-{strategy}-{n}", source=source, data=str(subset), strategy=strategy,
                                 min_images_per_class=1, output_dir=str(HOME / "runs" / f"instant-{strategy}-{n}"))
            result, seconds = timed(run_instant, config)
            row[strategy] = {"accuracy": result.report["accuracy"], "seconds": round(seconds, 1)}
        accuracy, seconds = torch_finetune(source, splits, labels, args, train=train)
        row["full"] = {"accuracy": accuracy, "seconds": round(seconds, 1)}
        print(f"  instant {n}/class: {row}", flush=True)
        rows.append(row)
    return rows


def write_subset(data: Path, train, splits, n: int) -> Path:
    import shutil

    root = HOME / "subsets" / f"{data.name}-{n}"
    root.mkdir(parents=True, exist_ok=True)
    lines = ["path,label,split"]
    for split, group in (("train", train), ("val", splits["val"]), ("test", splits["test"])):
        for s in group:
            shutil.copy2(s.path, root / s.path.name)  # manifests may only point inside their folder
            lines.append(f"{s.path.name},{s.label},{split}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


def default_job(name: str, data: Path) -> dict:
    """A fine-tune with no recipe fields set (source, strategy, epochs, size, augmentation: all defaults)."""
    from training.config import TrainConfig
    from training.pipeline import run

    config = TrainConfig(name=name, data=str(data), output_dir=str(HOME / "runs" / f"default-{name}"))
    result, seconds = timed(run, config)
    manifest = result.version.manifest()
    return {"accuracy": result.report["accuracy"], "seconds": round(seconds, 1), "image_size": manifest.preprocessing.size,
            "recipe": manifest.recipe}


# ---- the whole benchmark ----------------------------------------------------------------------------


def save(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))


def build_sources(args, results: dict, out: Path) -> dict[str, str]:
    from training.bootstrap import bootstrap

    if "imagenet" not in results.setdefault("sources", {}):
        version, seconds = timed(bootstrap, "imagenet", args.size)
        results["sources"]["imagenet"] = {"model": version.tag, "seconds": round(seconds, 1), "accuracy": None}
    writers = {"fonts": source_fonts, "textures": source_textures, "faces": source_faces, "shapes": source_shapes}
    for name, writer in writers.items():
        if name in results["sources"]:
            continue
        data = writer(HOME / "data" / f"source-{name}", args.size)
        results["sources"][name] = publish_source(name, data, args)
        print(f"source {name}: {results['sources'][name]}", flush=True)
        save(results, out)
    return {name: entry["model"] for name, entry in results["sources"].items()}


def markdown(results: dict) -> str:
    """The docs tables from a results file (`python bench/advise.py --table FILE`)."""
    names = list(results["sources"])
    lines = ["| target (classes, train / shifted test) | " + " | ".join(names)
             + " | τw LogME | τw probe | raw pixels | advise s / fine-tune s |", "|---|" + "---|" * (len(names) + 4)]
    for t in results.get("targets", []):
        cells = [f"{t['logme'][n]:.3f} / {t['probe'][n]:.2f} / **{t['finetune_accuracy'][n]:.2f}**" for n in names]
        probe_tau = weighted_kendall_tau({n: t["probe"][n] for n in names}, {n: t["finetune_accuracy"][n] for n in names})
        lines.append(f"| {t['target']} ({t['classes']}, {t['train']} / {t['test']}) | " + " | ".join(cells)
                     + f" | {t['weighted_tau']:.2f} | {probe_tau:.2f} | {t['raw_pixel_logistic']:.2f} | "
                     f"{t['advise_seconds']:.0f} / {t['mean_finetune_seconds']:.0f} |")
    lines += ["", "| images per class | prototype acc (s) | logistic acc (s) | full fine-tune acc (s) |", "|---|---|---|---|"]
    for row in results.get("instant", {}).get("rows", []):
        lines.append(f"| {row['images_per_class']} | " + " | ".join(
            f"{row[k]['accuracy']:.3f} ({row[k]['seconds']:.0f})" for k in ("prototype", "logistic", "full")) + " |")
    lines += ["", "| default-settings job | accuracy | seconds | image size | raw-pixel logistic |", "|---|---|---|---|---|"]
    for name, job in results.get("defaults", {}).items():
        lines.append(f"| {name} | {job['accuracy']:.3f} | {job['seconds']:.0f} | {job['image_size']} | "
                     f"{job.get('raw_pixel_logistic', float('nan')):.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/advise.json"))
    parser.add_argument("--size", type=int, default=64, help="image size of every source and fine-tune")
    parser.add_argument("--source-epochs", type=int, default=2)
    parser.add_argument("--gt-epochs", type=int, default=3, help="least epochs of each ground-truth full fine-tune")
    parser.add_argument("--gt-steps", type=int, default=40, help="least optimiser steps of each ground-truth fine-tune")
    parser.add_argument("--gt-lr", type=float, default=1e-2, help="head learning rate of the ground-truth fine-tunes")
    parser.add_argument("--train", type=int, default=10, help="train images per class of each target (<= 20)")
    parser.add_argument("--skip-defaults", action="store_true")
    parser.add_argument("--resume", action="store_true", help="keep the stages already in --out (same TUNESERVE_BENCH_HOME)")
    parser.add_argument("--table", type=Path, metavar="RESULTS", help="print the docs tables of a results file and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown(json.loads(args.table.read_text())))
        return 0
    import torch

    torch.set_num_threads(2)
    started = time.perf_counter()
    results: dict = json.loads(args.out.read_text()) if args.resume and args.out.is_file() else {}
    results["scale"] = {"cores": os.cpu_count(), "size": args.size, "source_epochs": args.source_epochs,
                        "gt_epochs": args.gt_epochs, "gt_steps": args.gt_steps, "gt_lr": args.gt_lr,
                        "train_per_class": args.train, "val_per_class": 3,
                        "test_per_class": 15}
    tags = build_sources(args, results, args.out)
    writers = {"handwritten": target_handwritten, "photo-tex": target_photo_textures, "new-shapes": target_new_shapes}
    targets = {name: writer(HOME / "data" / f"target-{name}", args.size, args.train, 3, 15) for name, writer in writers.items()}
    results.setdefault("targets", [])
    for name, data in targets.items():
        if any(t["target"] == name for t in results["targets"]):
            continue
        results["targets"].append(rank_target(name, data, tags, args))
        print(f"target {name}: tau {results['targets'][-1]['weighted_tau']}", flush=True)
        save(results, args.out)
    taus = [t["weighted_tau"] for t in results["targets"]]
    results["mean_weighted_tau"] = round(float(np.mean(taus)), 3)
    results["advise_over_finetune"] = round(float(np.mean([t["advise_seconds"] / t["mean_finetune_seconds"]
                                                           for t in results["targets"]])), 3)
    best = results["targets"][0]["best_by_advisor"]
    if "instant" not in results:  # its own copy of the target with 10 train images per class
        handwritten = target_handwritten(HOME / "data" / "instant-handwritten", args.size, 10, 3, 15)
        results["instant"] = {"target": "handwritten", "source": best, "rows": instant_vs_full(handwritten, best, args)}
        save(results, args.out)
    if not args.skip_defaults:
        from training.demo_data import write_digits

        results.setdefault("defaults", {})
        for name, data in targets.items():
            if name in results["defaults"]:
                continue
            splits, labels = splits_of(data)
            results["defaults"][name] = {**default_job(f"default-{name}", data),
                                         "raw_pixel_logistic": raw_pixel_baseline(splits, labels)}
            save(results, args.out)
        digits = HOME / "data" / "demo-digits"
        if "demo-digits" not in results["defaults"]:
            write_digits(digits, 64)
            splits, labels = splits_of(digits)
            results["defaults"]["demo-digits"] = {**default_job("digits", digits),
                                                  "raw_pixel_logistic": raw_pixel_baseline(splits, labels)}
            save(results, args.out)
    results["seconds"] = round(time.perf_counter() - started, 1)
    save(results, args.out)
    print(json.dumps({k: results[k] for k in ("mean_weighted_tau", "advise_over_finetune", "seconds")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
