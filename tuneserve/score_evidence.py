"""`tuneserve score --evidence DIR`: one overlay PNG per readable image (DIR/<its key>.png), the evidence
for its most probable label drawn on the crop the model saw (docs/explain.md).

A pass of its own after the scoring, on the fp32 graph (whose maps export checked), fetching only
probabilities and evidence: scoring without --evidence never computes into or copies the maps.
"""
from __future__ import annotations

from pathlib import Path


def check_explainable(model: str) -> None:
    """Refuse before any scoring when the version has no evidence maps (EvidenceUnavailable says why)."""
    from models.artifact import store
    from models.serving.evidence import evidence_output

    version = store.resolve(model)
    evidence_output(version.manifest(), version.tag, None)


def overlay_path(directory: Path, key: str) -> Path:
    """DIR/<key>.png; a key outside the input root (an absolute path) keeps its parts without the root."""
    parts = Path(key).parts
    return Path(directory, *(parts[1:] if Path(key).is_absolute() else parts)).with_suffix(".png")


def write_overlays(model: str, source: Path, directory: Path, batch_size: int = 64, device: str = "auto",
                   max_pixels: int | None = None) -> int:
    """Overlays of every readable image under `source`; returns how many were written."""
    from models.serving.evidence import overlay_png, summarise
    from models.serving.preprocess import DEFAULT_MAX_PIXELS, stack
    from tuneserve.score import load_model
    from tuneserve.score_core import collect_input, prepare_one

    classifier = load_model(model, device, "fp32")
    name = classifier.require_evidence()
    data = collect_input(Path(source), classifier.manifest.labels, use_labels=False)
    spec, written = classifier.manifest.preprocessing, 0
    for start in range(0, len(data.samples), batch_size):
        batch = data.samples[start:start + batch_size]
        ready = [(s, array) for s in batch for array, error in [prepare_one(str(s.path), spec, max_pixels or DEFAULT_MAX_PIXELS)]
                 if error is None]
        if not ready:
            continue
        probabilities, evidence = classifier.run(stack([a for _, a in ready]), [classifier.manifest.output_names[1], name])
        for (sample, array), row, maps in zip(ready, probabilities, evidence):
            path = overlay_path(Path(directory), data.key(sample))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(overlay_png(array, summarise(maps[int(row.argmax())]).grid, 224))
            written += 1
    return written
