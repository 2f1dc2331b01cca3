"""`tuneserve score`: formats, resume, error rows, evaluation report, and the Ray engine."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.tiny import write_tiny_model
from tuneserve.score import score
from tuneserve.score_output import Journal, journal_path, read_rows, report_path

CLASSES = ("red", "green", "blue")


@pytest.fixture
def tiny_model(bento_home, tmp_path):
    from models.artifact import store

    version = store.publish("tiny", write_tiny_model(tmp_path / "staging"))
    return version


def draw(path: Path, colour: str, seed: int, size=(40, 30), fmt: str | None = None) -> Path:
    """A noisy image whose dominant channel is `colour`."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 90, size=(size[1], size[0], 3))
    pixels[..., CLASSES.index(colour)] += 120 + seed % 30
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path, format=fmt)
    return path


def plain_folder(root: Path, n: int = 7) -> dict[str, str]:
    """Unlabelled images (one nested) plus a corrupt one; returns path → expected label."""
    expected = {}
    for i in range(n):
        colour = CLASSES[i % 3]
        name = f"img{i:02d}.png" if i != 3 else f"nested/deeper/img{i:02d}.jpg"
        draw(root / name, colour, seed=i)
        expected[name] = colour
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    expected["broken.jpg"] = None
    return expected


def class_folders(root: Path) -> int:
    """4 images per class; one green image filed under red: accuracy is 11/12."""
    for c, colour in enumerate(CLASSES):
        for i in range(4):
            draw(root / colour / f"{i}.png", colour, seed=10 * c + i)
    draw(root / "red" / "3.png", "green", seed=99)
    return 12


def check_rows(rows: list[dict], expected: dict[str, str | None], tag: str) -> None:
    assert sorted(r["path"] for r in rows) == sorted(expected)
    for row in rows:
        assert f"{row['model']}:{row['version']}" == tag
        if expected[row["path"]] is None:
            assert row["error"] and row["label_1"] is None and row["probability_1"] is None
        else:
            assert row["error"] is None, row
            assert row["label_1"] == expected[row["path"]]
            probabilities = [row[f"probability_{i}"] for i in (1, 2, 3)]
            assert probabilities == sorted(probabilities, reverse=True)
            assert abs(sum(probabilities) - 1) < 1e-5


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_formats_and_error_row(tiny_model, tmp_path, suffix, monkeypatch):
    expected = plain_folder(tmp_path / "images")
    output = tmp_path / "out" / f"scores{suffix}"
    monkeypatch.chdir(tmp_path)  # a relative input still gives paths relative to it
    result = score("tiny", Path("images"), output, top_k=3, batch_size=3, workers=2, progress=False)
    assert result.scored == len(expected) and result.errors == 1 and result.total == len(expected)
    rows = list(read_rows(output))
    check_rows(rows, expected, tiny_model.tag)
    assert list(rows[0]) == ["path", "label", "abstained", "in_domain", "label_1", "probability_1", "label_2",
                             "probability_2", "label_3", "probability_3", "model", "version", "variant", "error"]
    assert not journal_path(output).exists() and not report_path(output).exists()
    assert [p.name for p in output.parent.iterdir()] == [output.name]  # no temporary files left


def test_cli_manifest_and_process_pool(tiny_model, tmp_path, capsys):
    from tuneserve.cli import main

    expected = plain_folder(tmp_path / "images", n=4)
    manifest = tmp_path / "images" / "list.jsonl"
    manifest.write_text("".join(json.dumps({"path": p}) + "\n" for p in [*expected, "gone.png"]))
    expected["gone.png"] = None
    output = tmp_path / "scores.csv"
    code = main(["score", "--model", "tiny:latest", "--input", str(manifest), "--output", str(output),
                 "--top-k", "3", "--batch-size", "2", "--workers", "2", "--pool", "process", "--no-progress"])
    assert code == 0
    rows = list(read_rows(output))
    check_rows(rows, expected, tiny_model.tag)
    assert [r["path"] for r in rows] == list(expected)  # manifest order kept
    assert "scored 6 images (2 unreadable)" in capsys.readouterr().err


def test_resume_after_interruption(tiny_model, tmp_path):
    expected = plain_folder(tmp_path / "images", n=11)  # 12 images, 4 batches of 3
    output = tmp_path / "scores.parquet"

    def interrupt(batches_done):
        if batches_done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        score("tiny", tmp_path / "images", output, top_k=3, batch_size=3, workers=2, progress=False, on_batch=interrupt)
    assert not output.exists()  # never half-written
    journaled = Journal(output).read()
    assert len(journaled) == 6
    with journal_path(output).open("a") as handle:  # a kill in the middle of a write
        handle.write('{"path": "img09.png", "label_1": "re')

    result = score("tiny", tmp_path / "images", output, top_k=3, batch_size=3, workers=2, progress=False)
    assert (result.skipped, result.scored, result.total) == (6, 6, 12)
    rows = list(read_rows(output))
    check_rows(rows, expected, tiny_model.tag)  # each path exactly once
    assert not journal_path(output).exists()

    again = score("tiny", tmp_path / "images", output, top_k=3, progress=False)
    assert (again.scored, again.skipped, again.total) == (0, 12, 12)
    draw(tmp_path / "images" / "late.png", "blue", seed=5)  # a rerun picks up new images
    expected["late.png"] = "blue"
    more = score("tiny", tmp_path / "images", output, top_k=3, progress=False)
    assert (more.scored, more.total) == (1, 13)
    check_rows(list(read_rows(output)), expected, tiny_model.tag)

    from models.errors import DatasetError

    with pytest.raises(DatasetError, match="same --top-k"):
        score("tiny", tmp_path / "images", output, top_k=2, progress=False)


def test_labelled_input_writes_eval_report(tiny_model, tmp_path):
    class_folders(tmp_path / "data")
    output = tmp_path / "scores.jsonl"
    result = score("tiny", tmp_path / "data", output, top_k=2, batch_size=5, progress=False)
    report = json.loads(report_path(output).read_text())
    assert report == result.report
    assert report["samples"] == 12
    assert report["accuracy"] == pytest.approx(11 / 12)
    assert report["top_k"] == 2 and report["model"] == tiny_model.tag
    assert report["confusion_matrix"]["matrix"][0] == [3, 1, 0]  # red row: one predicted green
    rows = {r["path"]: r for r in read_rows(output)}
    assert rows["red/3.png"]["true_label"] == "red" and rows["red/3.png"]["label_1"] == "green"

    # a CSV manifest with labels (relative to its folder) gives the same report
    manifest = tmp_path / "data" / "labels.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{r['true_label']}\n" for p, r in rows.items()))
    again = score("tiny", manifest, tmp_path / "from_manifest.csv", top_k=2, progress=False)
    assert again.report["accuracy"] == pytest.approx(11 / 12)
    assert again.report == result.report

    # --no-eval: folder names are ignored, no report
    plain = score("tiny", tmp_path / "data", tmp_path / "plain.csv", top_k=2, use_labels=False, progress=False)
    assert plain.report is None and not report_path(tmp_path / "plain.csv").exists()


@pytest.mark.slow
def test_ray_engine_matches_local(tiny_model, tmp_path):
    ray = pytest.importorskip("ray")
    from tuneserve.ray_score import score_ray

    expected = plain_folder(tmp_path / "images", n=9)
    local = tmp_path / "local.parquet"
    score("tiny", tmp_path / "images", local, top_k=3, batch_size=4, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = tmp_path / "ray.parquet"
        result = score_ray("tiny", tmp_path / "images", remote, top_k=3, batch_size=4, concurrency=1, progress=False)
    finally:
        ray.shutdown()
    assert result.errors == 1 and result.total == len(expected)
    import pyarrow.parquet as pq

    assert pq.read_schema(remote) == pq.read_schema(local)
    local_rows = {r["path"]: r for r in read_rows(local)}
    ray_rows = {r["path"]: r for r in read_rows(remote)}
    assert local_rows.keys() == ray_rows.keys() == expected.keys()
    for path, row in local_rows.items():
        other = ray_rows[path]
        for key, value in row.items():
            if key.startswith("probability_") and value is not None:
                assert other[key] == pytest.approx(value, abs=1e-5)
            elif key != "error":
                assert other[key] == value, (path, key)
        assert bool(other["error"]) == bool(row["error"])


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_min_confidence_abstains_in_rows(bento_home, tmp_path, suffix):
    """auto: per-label thresholds and the in-domain score; a number: the top probability only."""
    from models.artifact import store
    from models.serving.decision import InvalidMinConfidence
    from tests.tiny import write_trusted_tiny_model

    store.publish("trusted", write_trusted_tiny_model(tmp_path / "staging", tmp_path / "fit"))
    images = tmp_path / "images"
    draw(images / "red.png", "red", seed=1)
    Image.new("RGB", (20, 20), (250, 250, 0)).save(images / "yellow.png")  # two channels high: never seen
    Image.new("RGB", (20, 20), (120, 100, 110)).save(images / "murky.png")  # no channel dominates
    auto = {r["path"]: r for r in read_rows(_scored(tmp_path, "trusted", images, suffix, "auto"))}
    assert auto["red.png"]["label"] == "red" and auto["red.png"]["abstained"] is False
    assert auto["red.png"]["in_domain"] >= 0.05
    assert auto["yellow.png"]["label"] is None and auto["yellow.png"]["abstained"] is True
    assert auto["yellow.png"]["in_domain"] < 0.05 and auto["yellow.png"]["label_1"] is not None  # ranking kept
    assert auto["murky.png"]["abstained"] is True
    fixed = {r["path"]: r for r in read_rows(_scored(tmp_path, "trusted", images, suffix, 0.99))}
    assert fixed["murky.png"]["abstained"] is True and fixed["murky.png"]["label"] is None
    assert fixed["red.png"]["probability_1"] < 0.99 or fixed["red.png"]["label"] == "red"
    plain = {r["path"]: r for r in read_rows(_scored(tmp_path, "trusted", images, suffix, None))}
    assert all(r["abstained"] is False and r["label"] == r["label_1"] for r in plain.values())
    store.publish("old", write_tiny_model(tmp_path / "old"))
    with pytest.raises(InvalidMinConfidence, match="no per-label thresholds"):
        _scored(tmp_path, "old", images, suffix, "auto")
    old = list(read_rows(_scored(tmp_path, "old", images, suffix, 0.5)))
    assert all(r["in_domain"] is None for r in old)  # exported without an in-domain score


def _scored(tmp_path, model, images, suffix, min_confidence):
    output = tmp_path / f"{model}-{min_confidence}" / f"scores{suffix}"
    score(model, images, output, top_k=2, workers=1, progress=False, min_confidence=min_confidence)
    return output

