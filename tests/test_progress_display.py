"""The whole-job progress of `tuneserve train` (tuneserve/progress_display.py): a line at least every
interval when stderr is a log, a bar on a terminal, the ETA rule, the ticker stopped at the end; and the
`stage` events the export emits (training/progress.py StageMeter, evaluation per batch, int8 per method).
Fast: no torch, no training."""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
import types

import pytest

from models.jobs.events import Progress
from training.progress import StageMeter
from tuneserve.progress_display import JobView, ProgressDisplay


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line]


def test_the_job_eta_is_the_budget_left_or_the_stage_estimate_when_larger():
    view = JobView(started=0.0)
    assert view.eta_s(10.0) is None and view.line(10.0) == "[   10s] starting · job eta ?"
    view.update({"event": "budget", "budget_s": 900.0}, 0.0)
    view.update({"event": "phase", "phase": "training"}, 1.0)
    view.update({"event": "stage", "stage": "features", "done": 21440, "total": 60000, "eta_s": 252.0}, 300.0)
    assert view.line(312.0) == ("[  312s] training · features 21,440/60,000 images · stage eta 240s · "
                                "job eta 588s of 900s budget")
    assert view.total_s(312.0) == 900.0
    # a stage that will run past the plan moves the end out, and the bar's total with it
    view.update({"event": "stage", "stage": "features", "done": 21440, "total": 60000, "eta_s": 2000.0}, 312.0)
    assert view.eta_s(312.0) == 2000.0 and view.total_s(312.0) == 2312.0
    # a new phase drops the stage; past the budget with nothing estimated, the ETA is 0
    assert view.update({"event": "phase", "phase": "exporting"}, 950.0)
    assert view.work is None and view.eta_s(950.0) == 0.0
    view.update({"event": "progress", "epoch": 2, "epochs": 3, "step": 10, "steps": 40, "eta_s": 160.0}, 950.0)
    assert "epoch 2/3 step 10/40 · training eta 160s" in view.line(950.0)


def test_a_log_gets_a_line_every_interval_with_the_stage_and_its_counts():
    stream = io.StringIO()
    display = ProgressDisplay(stream=stream, tty=False, interval=0.05)
    assert display.interval == 0.05 and not display.tty
    with display:
        progress = Progress(display)
        progress.budget(900)
        progress.phase("training")
        progress.stage("features", 21440, 60000, eta_s=240.0)
        before = len(_lines(stream))
        time.sleep(0.3)
        assert display.running
    ticked = _lines(stream)[before:]
    assert len([line for line in ticked if "features 21,440/60,000 images" in line]) >= 2
    assert "job eta" in ticked[0] and "of 900s budget" in ticked[0]
    assert not display.running and ticked[-1].startswith("[") and " done after " in ticked[-1]
    written = stream.getvalue()
    time.sleep(0.15)
    assert stream.getvalue() == written  # the ticker is gone: nothing after close


def test_every_phase_change_prints_a_line_at_once():
    stream = io.StringIO()
    with ProgressDisplay(stream=stream, tty=False, interval=60.0) as display:
        progress = Progress(display)
        progress.phase("loading")
        progress.phase("training")
        progress.stage("heads", 1, 4)  # inside a phase: waits for the next tick
        progress.phase("exporting")
    lines = _lines(stream)
    assert [line.split(" · ")[0].split("] ")[1] for line in lines[:3]] == ["loading", "training", "exporting"]
    assert len(lines) == 4 and "done after" in lines[3]


def test_the_ticker_stops_when_the_run_raises():
    stream = io.StringIO()
    with pytest.raises(RuntimeError, match="boom"):
        with ProgressDisplay(stream=stream, tty=False, interval=0.02) as display:
            Progress(display).phase("training")
            raise RuntimeError("boom")
    assert not display.running and _lines(stream)[-1].split("] ")[1].startswith("stopped after")


def test_a_terminal_gets_one_bar_for_the_job():
    stream = io.StringIO()
    with ProgressDisplay(stream=stream, tty=True, interval=0.02) as display:
        assert display.interval == 0.02 and display.tty
        progress = Progress(display)
        progress.phase("training")  # no budget yet: elapsed seconds, no percentage
        progress.budget(900)
        progress.stage("int8", 1, 3, eta_s=20.0, method="entropy")
        time.sleep(0.05)
    assert not display.running
    drawn = stream.getvalue().split("\r")[-1]
    assert drawn.startswith("training:") and "%|" in drawn and "/900s" in drawn
    assert "int8 1/3 methods (entropy)" in drawn and "stage eta 20s" in drawn and "eta 900s" in drawn


def test_the_default_interval_keeps_a_log_line_within_30_s():
    from tuneserve import progress_display

    assert progress_display.TICK_S <= 30.0
    assert ProgressDisplay(stream=io.StringIO(), tty=False).interval == progress_display.TICK_S


def test_stage_meter_estimates_from_its_own_pace_and_does_not_flood():
    events, clock = [], FakeClock(0.0)
    meter = StageMeter(Progress(events.append), "evaluation", 100, every_s=1.0, clock=clock, unit="images")
    meter(0)
    clock.now = 0.5
    meter(10)  # within every_s of the last: skipped
    clock.now = 2.0
    meter(40)
    clock.now = 2.1
    meter(100)  # the last one always goes out
    assert [(e["done"], e["eta_s"]) for e in events] == [(0, None), (40, 3.0), (100, 0.0)]
    assert all(e["event"] == "stage" and e["stage"] == "evaluation" and e["unit"] == "images" for e in events)


def test_evaluation_reports_each_batch(tmp_path):
    from models.data.evaluate import evaluate
    from models.serving.runtime import OnnxClassifier
    from tests.tiny import noisy_colour_samples, write_tiny_model

    model = OnnxClassifier(write_tiny_model(tmp_path / "model"), "tiny", "1").load()
    samples = noisy_colour_samples(tmp_path / "data", 5, seed=0)  # 15 images
    batches = []
    report = evaluate(model, samples, top_k=1, batch_size=4, on_batch=lambda done, total: batches.append((done, total)))
    assert report["samples"] == 15 and batches == [(4, 15), (8, 15), (12, 15), (15, 15)]


def test_int8_search_reports_each_method(tmp_path):
    from models.artifact.manifest import read_manifest
    from models.artifact.quantize import choose_calibration
    from models.artifact.quantize_inputs import QuantizeConfig, data_from_samples
    from tests.tiny_conv import noisy_colour_images, write_tiny_conv_model

    directory = write_tiny_conv_model(tmp_path / "model")
    config = QuantizeConfig(methods=("minmax", "percentile"))
    data = data_from_samples(noisy_colour_images(tmp_path / "data"), read_manifest(directory), config)
    calls = []
    (tmp_path / "work").mkdir()
    _, _, tried = choose_calibration(directory / "model.onnx", data, read_manifest(directory), config,
                                     tmp_path / "work", on_method=lambda *call: calls.append(call))
    assert calls == [(i, 2, method) for i, method in enumerate(tried)]


def test_tuneserve_train_keeps_stdout_for_the_summary(monkeypatch, capsys):
    """`run_train` with a stand-in pipeline (no torch): progress on stderr, only the JSON on stdout."""
    from tuneserve import train_commands

    def run(config, progress, resume=False):
        progress.phase("loading")
        progress.budget(60)
        progress.phase("training")
        progress.stage("features", 8, 16, eta_s=1.0)
        return types.SimpleNamespace(summary=lambda: {"model": "fashion:v1"})

    monkeypatch.setitem(sys.modules, "training.pipeline", types.SimpleNamespace(run=run))
    monkeypatch.setattr(train_commands, "config_from_args", lambda args: object())
    assert train_commands.run_train(argparse.Namespace(progress=None, resume=False)) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"model": "fashion:v1"}
    assert "] training · features 8/16 images" not in captured.out
    assert "] training" in captured.err and "done after" in captured.err


def test_the_display_does_not_load_torch():
    from tests.test_boundaries import TORCH, loaded_at_run_time

    assert loaded_at_run_time(["tuneserve.progress_display", "training.progress"], TORCH) == []
