"""bench/transfer.py --quick: the transfer benchmark's CI mode on real data (digits split by writer)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
METHODS = {"auto", "raw-logistic", "raw-svc", "embed-knn", "embed-logistic", "scratch"}


@pytest.mark.slow
def test_quick_transfer_benchmark_reports_every_method_and_auto_beats_the_linear_baselines(tmp_path):
    out = tmp_path / "transfer.json"
    env = {"BENTOML_HOME": str(tmp_path / "bentoml"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "transfer.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {row["method"]: row for row in result["rows"]}
    assert set(rows) == METHODS
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and len(row["per_class_recall"]) == 10 and row["test_images"] == 300
    auto = rows["auto"]
    assert auto["chosen"] in {"prototype", "logistic", "multidepth", "full"} and auto["image_size"] == 96
    assert {c["strategy"] for c in auto["candidates"]} >= {"prototype", "logistic", "multidepth"}
    # 100 train images of other writers' digits: the multi-depth head is far ahead of a linear model on
    # pixels or on the last layer's ImageNet features (measured 0.96 vs 0.8-0.9)
    assert auto["accuracy"] > rows["raw-logistic"]["accuracy"]
    assert auto["accuracy"] > rows["embed-logistic"]["accuracy"]
    assert "| digits-writer | 10 | auto |" in done.stdout and "load average" in done.stdout
