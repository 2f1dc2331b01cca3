"""Evidence maps bench: are they useful, and what do they cost? (docs/explain.md)

On a stored model trained on the inspection target (`tuneserve demo-data inspection DIR`, which keeps
each defect's mask), for every defective test image, with the `defective` class's map from the graph:

- pointing game: is the map's largest cell on the defect (the cell holds any defect pixel)?
- positive share: the share of the map's positive evidence that lies on the defect (each cell's
  positive evidence times the share of the cell the defect covers);
against a random map (uniform noise, 200 draws per image) and a centre prior (a Gaussian bump,
sigma = side / 4), at the map's own resolution, so every method gets the same cells.

Cost, in process on ONNX Runtime (CPU), interleaved, median and minimum of repeats: the graph fetching
probabilities only (what a request without explain fetches) against probabilities + logits +
evidence (explain), at batch 1 and 16, and the same graph with the evidence output pruned (what its
presence costs a request that does not ask); and the per-image summary + overlay PNG cost.

    python bench/explain.py --model inspect --data DIR [--pictures docs/explain] [--json out.json]
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.serving.evidence import area_weights, overlay_png, summarise  # noqa: E402

DRAWS = 200


def cell_share(mask: np.ndarray, side: int) -> np.ndarray:
    """[side, side]: the share of each map cell the defect covers."""
    rows, cols = area_weights(side, mask.shape[0]), area_weights(side, mask.shape[1])
    return (rows @ mask.astype(np.float64) @ cols.T) / (rows @ np.ones(mask.shape) @ cols.T)


def scores(cells: np.ndarray, share: np.ndarray) -> tuple[float, float]:
    """(pointing hit, positive share on the defect) of one map."""
    hit = float(share.flat[int(np.argmax(cells))] > 0)
    positive = np.clip(cells, 0, None)
    total = positive.sum()
    return hit, float((positive * share).sum() / total) if total > 0 else 0.0


def centre_prior(side: int) -> np.ndarray:
    grid = np.arange(side) - (side - 1) / 2
    return np.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / (2 * (side / 4) ** 2))


def crop_mask(path: Path, spec) -> np.ndarray:
    """The mask through the same resize and centre crop as the image (serving's preprocessing)."""
    from PIL import Image

    from models.serving.preprocess import resize_and_crop

    return resize_and_crop(Image.open(path).convert("RGB"), spec)[..., 0] > 127


def defective_tests(data: Path) -> list[dict]:
    with (data / "masks.csv").open() as handle:
        return [row for row in csv.DictReader(handle) if row["split"] == "test" and row["label"] == "defective"]


def usefulness(classifier, data: Path, pictures: Path | None, count: int) -> dict:
    from models.serving.preprocess import prepare

    spec, labels = classifier.manifest.preprocessing, classifier.manifest.labels
    target = labels.index("defective")
    rows = defective_tests(data)
    pixels = np.stack([prepare(str(data / r["path"]), spec) for r in rows])
    masks = [crop_mask(data / r["mask"], spec) for r in rows]
    name = classifier.require_evidence()
    probabilities, evidence = classifier.run(pixels, [classifier.manifest.output_names[1], name])
    side, rng = evidence.shape[-1], np.random.default_rng(0)
    methods = {"evidence": [], "random": [], "centre prior": []}
    for maps, mask in zip(evidence, masks):
        share = cell_share(mask, side)
        methods["evidence"].append(scores(maps[target], share))
        methods["random"].append(tuple(np.mean([scores(rng.random((side, side)), share) for _ in range(DRAWS)], 0)))
        methods["centre prior"].append(scores(centre_prior(side), share))
    called = probabilities.argmax(1) == target
    result = {"images": len(rows), "side": side, "called_defective": int(called.sum()),
              "defect_area_share": float(np.mean([m.mean() for m in masks]))}
    for method, values in methods.items():
        values = np.array(values)
        result[method] = {"pointing": float(values[:, 0].mean()), "positive_share": float(values[:, 1].mean()),
                          "pointing_when_called": float(values[called, 0].mean()) if called.any() else None}
    if pictures is not None:
        write_pictures(pixels, masks, evidence[:, target], probabilities[:, target], rows, pictures, count)
    return result


def write_pictures(pixels, masks, maps, probability, rows, directory: Path, count: int) -> None:
    """image | defect mask outline | evidence overlay, for the `count` images the model is surest are defective."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    for rank, index in enumerate(np.argsort(-probability)[:count]):
        image = Image.fromarray(pixels[index])
        outlined = pixels[index].copy()
        edge = masks[index] & ~np.pad(masks[index], 1)[2:, 1:-1] | masks[index] & ~np.pad(masks[index], 1)[:-2, 1:-1]
        outlined[masks[index]] = (0.5 * outlined[masks[index]] + [0, 127, 0]).astype(np.uint8)
        outlined[edge] = (0, 255, 0)
        overlay = Image.open(__import__("io").BytesIO(overlay_png(pixels[index], summarise(maps[index]).grid)))
        sheet = Image.new("RGB", (image.width * 3 + 8, image.height), "white")
        for column, part in enumerate((image, Image.fromarray(outlined), overlay)):
            sheet.paste(part, (column * (image.width + 4), 0))
        kinds = rows[index]["defects"].replace(" ", "-") or "defect"
        sheet.save(directory / f"inspection-{rank + 1}-{kinds}-p{probability[index]:.2f}.png", optimize=True)


def median_ms(call, repeats: int, clock=time.perf_counter) -> float:
    times = []
    for _ in range(repeats):
        started = clock()
        call()
        times.append((clock() - started) * 1000)
    return statistics.median(times)


def pruned_graph(path: Path, output: str) -> bytes:
    """The graph without `output` and the nodes only it needed."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    kept = [o for o in graph.output if o.name != output]
    del graph.output[:]
    graph.output.extend(kept)
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [node for node in graph.node if not any(out in used for out in node.output)]
        if not dead:
            return model.SerializeToString()
        for node in dead:
            graph.node.remove(node)


def evidence_share(path: Path, output: str, images: np.ndarray, runs: int = 5) -> float:
    """The share of the graph's kernel time (ORT's own profile) spent in the nodes only `output` needs:
    a ratio within the same runs, so a loaded machine slows both sides alike."""
    import onnx
    import onnxruntime as ort

    pruned = onnx.load_from_string(pruned_graph(path, output))
    only_evidence = {node.name for node in onnx.load(str(path)).graph.node} - {node.name for node in pruned.graph.node}
    options = ort.SessionOptions()
    options.enable_profiling, options.log_severity_level = True, 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep node names as exported
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, {session.get_inputs()[0].name: images})
    profile = Path(session.end_profiling())
    events = [e for e in json.loads(profile.read_text()) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    profile.unlink()
    total = sum(e["dur"] for e in events)
    return sum(e["dur"] for e in events if e["name"].removesuffix("_kernel_time") in only_evidence) / total


def cost(classifier, repeats: int) -> dict:
    import onnxruntime as ort

    manifest = classifier.manifest
    probabilities, name = manifest.output_names[1], classifier.require_evidence()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the pruned graph keeps initializers only the evidence read: ORT drops them, loudly
    plain = ort.InferenceSession(pruned_graph(classifier.directory / "model.onnx", name), options,
                                 providers=["CPUExecutionProvider"])
    size, out = manifest.preprocessing.size, {}
    rng = np.random.default_rng(1)
    for batch in (1, 16):
        images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        calls = {"without explain": lambda: classifier.run(images, [probabilities]),
                 "explain": lambda: classifier.run(images, [probabilities, manifest.output_names[0], name]),
                 "graph without evidence": lambda: plain.run([probabilities], {manifest.input_name: images})}
        for call in calls.values():
            call()  # warm
        rounds = {label: [] for label in calls}
        cpu = {label: [] for label in calls}
        for _ in range(max(8, repeats // batch)):
            for label, call in calls.items():
                rounds[label].append(median_ms(call, 1))
                cpu[label].append(median_ms(call, 1, time.process_time))
        # wall median and minimum, and the CPU time of the process (all ORT threads): on a shared, loaded
        # machine wall time is mostly other people's work; CPU time is much less so
        out[f"batch {batch}"] = {label: {"median": statistics.median(values), "min": min(values),
                                         "cpu_median": statistics.median(cpu[label])}
                                 for label, values in rounds.items()}
        out[f"batch {batch}"]["evidence share of kernel time"] = evidence_share(classifier.directory / "model.onnx", name, images)
    maps = classifier.run(images[:1], [name])[0][0]
    out["summary + overlay per image"] = median_ms(lambda: overlay_png(images[0], summarise(maps[0]).grid, 224), 20)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--pictures", type=Path)
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from tuneserve.score import load_model

    classifier = load_model(args.model, "cpu", "fp32")
    result = {"model": classifier.tag, "strategy": classifier.manifest.training.get("strategy"),
              "usefulness": usefulness(classifier, args.data, args.pictures, args.count),
              "cost_ms": cost(classifier, args.repeats)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
