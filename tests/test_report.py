"""The HTML report: self-contained, every chart present and well-formed, readable at 50 classes."""
import re
import xml.etree.ElementTree as ET

import numpy as np

from models.artifact import store
from models.data.metrics import evaluation_report, trust_report
from models.artifact.manifest import Manifest, Preprocessing
from models.data.report import render_report
from tests.tiny import noisy_colour_samples, write_trusted_tiny_model
from tuneserve.cli import main

SVG = "{http://www.w3.org/2000/svg}"


def _svgs(page: str) -> list[ET.Element]:
    return [ET.fromstring(block) for block in re.findall(r"<svg .*?</svg>", page, flags=re.S)]


def _fifty_class_report():
    rng = np.random.default_rng(0)
    labels = [f"class_{i:02d}_long_name" for i in range(50)]
    y = rng.integers(0, 50, 1000)
    logits = rng.normal(0, 1, (1000, 50))
    logits[np.arange(1000), y] += 4
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    manifest = Manifest(labels=labels, preprocessing=Preprocessing(size=8, resize=8, mean=(0, 0, 0), std=(1, 1, 1)),
                        backbone="b", source="s", thresholds={label: 0.5 for label in labels})
    report = evaluation_report(y, probabilities, labels)
    report.update(trust_report(logits * 2, probabilities, y, manifest, None))
    return report


def test_fifty_classes_every_chart_well_formed_and_offline():
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_accuracy": 0.5 + e / 10} for e in (1, 2, 3)]
    page = render_report(_fifty_class_report(), history)
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    assert not re.search(r"(src|href)=", page)  # nothing fetched: the page opens offline
    svgs = _svgs(page)
    assert len(svgs) == 7  # confusion, per-class, reliability ×2, risk–coverage, loss, accuracy
    confusion = svgs[0]
    cells = confusion.findall(f"{SVG}rect")
    assert len(cells) == 50 * 50 and int(cells[0].get("width")) >= 8  # one readable cell per (true, predicted)
    assert int(confusion.get("width")) <= 900
    assert confusion.find(f"{SVG}rect/{SVG}title").text.startswith("true class_00_long_name → predicted")
    per_class_titles = [t.text for t in svgs[1].iter(f"{SVG}title")]
    assert len(per_class_titles) == 150 and per_class_titles[2].startswith("class_00_long_name f1")
    for heading in ("Confusion matrix", "Per-class precision, recall, F1", "Reliability diagram", "Risk–coverage",
                    "Training curves", "ECE (15 bins) before → after", "min_confidence=auto"):
        assert heading in page


def test_evaluate_command_writes_report(bento_home, tmp_path, capsys):
    version = store.publish("colours", write_trusted_tiny_model(tmp_path / "m", tmp_path / "fit"))
    noisy_colour_samples(tmp_path / "test", 6, seed=5)
    path = tmp_path / "out" / "report.html"
    assert main(["evaluate", "--model", "colours", "--data", str(tmp_path / "test"), "--report", str(path)]) == 0
    page = path.read_text()
    assert f"colours:{version.version}" in page and "after (T = " in page
    assert len(_svgs(page)) == 5  # no training history for this hand-made version
    assert capsys.readouterr().out.count('"calibration"') == 1
