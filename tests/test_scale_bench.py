"""bench/scale.py's pure parts: the per-stage spans from a job's progress events, the RSS samples counted
to them, the CLI's final summary read back from a log, the log-log slope, and the PNG subset."""
import json
import math

import numpy as np
import pytest

from bench.scale import GIB, STARTUP, final_summary, slope, slopes, spans, stage_table, subset


def phase(name, at):
    return {"event": "phase", "phase": name, "time": at}


def stage(name, at, done, total):
    return {"event": "stage", "stage": name, "done": done, "total": total, "time": at}


EVENTS = [
    phase("loading", 102.0),
    {"event": "budget", "budget_s": 300.0, "time": 103.0},
    phase("training", 110.0),
    stage("features", 112.0, 100, 1000),  # takes over the training phase's span from 110
    stage("features", 130.0, 1000, 1000),  # done: 130..135 is the training phase's, unnamed
    stage("heads", 135.0, 1, 3),
    stage("heads", 150.0, 3, 3),
    stage("finetune", 151.0, 1, 10),
    {"event": "progress", "epoch": 1, "epochs": 1, "step": 5, "steps": 10, "time": 160.0},  # not a span boundary
    stage("finetune", 170.0, 5, 10),
    phase("exporting", 200.0),  # finetune never reported done: it runs to the next phase
    phase("evaluating", 210.0),
    stage("evaluation", 215.0, 10, 20),
    phase("publishing", 230.0),
    {"event": "succeeded", "model": "m:1", "eval": {}, "time": 231.0},
]


def test_spans_follow_stages_and_phases():
    assert spans(EVENTS, 100.0, 240.0) == [
        (STARTUP, 100.0, 102.0), ("loading", 102.0, 110.0), ("features", 110.0, 130.0), ("training", 130.0, 135.0),
        ("heads", 135.0, 150.0), ("training", 150.0, 151.0), ("finetune", 151.0, 200.0), ("exporting", 200.0, 210.0),
        ("evaluation", 210.0, 230.0), ("publishing", 230.0, 240.0)]


def test_without_stage_events_the_phases_are_the_spans():
    only_phases = [e for e in EVENTS if e["event"] != "stage"]
    assert [label for label, _, _ in spans(only_phases, 100.0, 240.0)] == [
        STARTUP, "loading", "training", "exporting", "evaluating", "publishing"]
    assert spans([], 100.0, 105.0) == [(STARTUP, 100.0, 105.0)]


def test_a_stage_seen_twice_sums_its_spans_and_rss_samples_count_where_they_fall():
    events = [phase("training", 1.0), stage("heads", 2.0, 1, 3), stage("evaluation", 4.0, 1, 2),
              stage("evaluation", 5.0, 2, 2), stage("heads", 6.0, 2, 3), phase("publishing", 9.0)]
    job = spans(events, 0.0, 10.0)
    assert job == [(STARTUP, 0.0, 1.0), ("heads", 1.0, 4.0), ("evaluation", 4.0, 5.0), ("training", 5.0, 6.0),
                   ("heads", 6.0, 9.0), ("publishing", 9.0, 10.0)]
    samples = [(0.5, 1 * GIB), (1.5, 2 * GIB), (4.5, 5 * GIB), (5.0, 3 * GIB), (7.0, 4 * GIB), (9.5, GIB)]
    table = stage_table(job, samples)
    assert list(table) == [STARTUP, "heads", "evaluation", "training", "publishing"]  # stages, then phases
    assert table["heads"] == {"seconds": 6.0, "peak_rss_gib": 4.0}
    assert table["evaluation"] == {"seconds": 1.0, "peak_rss_gib": 5.0}
    assert table["training"] == {"seconds": 1.0, "peak_rss_gib": 3.0}  # after evaluation was done, before heads
    assert table[STARTUP] == {"seconds": 1.0, "peak_rss_gib": 1.0}
    assert stage_table([("parity", 0.0, 0.1)], samples)["parity"]["peak_rss_gib"] is None  # no sample in it


def test_a_finished_stage_right_before_a_phase_change_leaves_no_short_span():
    events = [phase("exporting", 1.0), stage("export", 1.0, 0, 3), stage("export", 3.0, 3, 3), phase("calibrating", 3.0),
              stage("calibration", 3.5, 1, 1), phase("evaluating", 3.6)]  # 0.1 s of bookkeeping stays calibration's
    assert spans(events, 0.0, 4.0) == [(STARTUP, 0.0, 1.0), ("export", 1.0, 3.0), ("calibration", 3.0, 3.6),
                                       ("evaluating", 3.6, 4.0)]


def test_the_final_summary_is_the_last_json_object_of_the_log():
    summary = {"model": "scale-1000:abc", "eval": {"accuracy": 0.81, "samples": 10000}, "seconds": 200.1}
    log = "INFO x: {'a': 1}\n{\n  \"not\": \"this\"\n}\nINFO more\n" + json.dumps(summary, indent=2) + "\n"
    assert final_summary(log) == summary
    assert final_summary("Traceback ...\n{\n  cut") is None


def test_slope_is_the_log_log_least_squares_fit():
    ns = [1000, 5000, 20000, 60000]
    assert slope(ns, [2.0 * n for n in ns]) == pytest.approx(1.0)
    assert slope(ns, [3.0 * n ** 0.5 for n in ns]) == pytest.approx(0.5)
    assert slope(ns, [7.0] * 4) == pytest.approx(0.0)
    noisy = [n ** 1.2 * f for n, f in zip(ns, (1.1, 0.9, 1.05, 0.97))]
    expected = np.polyfit(np.log(ns), np.log(noisy), 1)[0]
    assert slope(ns, noisy) == pytest.approx(expected, abs=1e-3)
    assert slope(ns, [None, 0, 5.0, None]) is None  # one usable point
    assert slope([1000, 1000], [1.0, 2.0]) is None


def test_slopes_cover_the_total_and_every_stage():
    def size(n):
        return {"total_s": n / 10, "peak_rss_gib": 1.0, "stages": {"features": {"seconds": n / 100, "peak_rss_gib": 1.0}}}

    fitted = slopes({"1000": size(1000), "4000": size(4000)})
    assert fitted["total"] == {"seconds": pytest.approx(1.0), "peak_rss": pytest.approx(0.0)}
    assert fitted["features"]["seconds"] == pytest.approx(1.0)
    assert math.isclose(fitted["features"]["peak_rss"], 0.0, abs_tol=1e-9)


def test_the_subset_is_stratified_and_seeded():
    labels = np.repeat(np.arange(10), 60)
    chosen = subset(labels, 100, seed=0)
    assert np.bincount(labels[chosen]).tolist() == [10] * 10
    assert chosen.tolist() == subset(labels, 100, seed=0).tolist() != subset(labels, 100, seed=1).tolist()
    with pytest.raises(ValueError):
        subset(labels, 105, seed=0)
