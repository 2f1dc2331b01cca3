"""Loop decisions that hold (service/loop/): compare-and-set promote and rollback, rollback after a
plain publish, auto-promote on Wilson intervals in the one worker that holds the duties lease, and
drift windows that never overlap (each sample tested once), on a temporary database."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest

from models.artifact.reference import build_reference
from service.loop import drift, records, rollout
from service.loop.db import LoopDb
from service.loop.settings import LoopSettings
from service.loop.worker import LoopWorker


@pytest.fixture
def db(tmp_path):
    return LoopDb(tmp_path)


def test_promote_and_rollback_refuse_an_unexpected_candidate_and_name_the_actual_one(db):
    rollout.start(db, "pets", "v2", "canary", 10, serving="v1", by="alice")
    with pytest.raises(rollout.RolloutError, match="expected the candidate 'v3', but it is v2"):
        rollout.promote(db, "pets", by="bob", expected="v3")
    assert rollout.current(db, "pets").candidate == "v2"  # nothing changed
    with pytest.raises(rollout.RolloutError, match="but it is v2"):
        rollout.rollback(db, "pets", by="bob", versions=["v2", "v1"], expected="v1")
    promoted = rollout.promote(db, "pets", by="bob", expected="v2")
    assert (promoted.stable, promoted.candidate) == ("v2", None)
    with pytest.raises(rollout.RolloutError, match="expected the candidate 'v2', but it is none"):
        rollout.promote(db, "pets", by="carol", expected="v2")  # a second operator's promote of the same one
    with pytest.raises(rollout.RolloutError, match="but it is v2"):
        rollout.rollback(db, "pets", by="carol", versions=["v2", "v1"], expected="v3")
    back, rolled = rollout.rollback(db, "pets", by="carol", versions=["v2", "v1"], expected="v2")
    assert (back.stable, rolled) == ("v1", "v2")


def test_rollback_after_a_plain_publish_returns_to_the_version_before(db):
    versions = ["v3", "v2", "v1"]  # latest first: v3 was published last and serves (no rollout yet)
    back, rolled = rollout.rollback(db, "pets", by="alice", versions=versions)
    assert (back.stable, back.candidate, rolled) == ("v2", None, "v3")
    event = rollout.events(db, "pets")[0]
    assert (event["action"], event["version"], event["by"]) == ("rollback", "v2", "alice") and "v3" in event["detail"]
    again, rolled = rollout.rollback(db, "pets", by="alice", versions=versions)
    assert (again.stable, rolled) == ("v1", "v2")
    with pytest.raises(rollout.RolloutError, match="nothing to roll back to"):
        rollout.rollback(db, "pets", by="alice", versions=versions)
    with pytest.raises(rollout.RolloutError, match="nothing to roll back to"):
        rollout.rollback(db, "cats", by="alice", versions=["only"])
    # the rolled-back version stays a valid candidate: roll it out again, promote, roll back to v1
    rollout.start(db, "pets", "v3", "canary", 50, serving="v1", by="alice")
    rollout.promote(db, "pets", by="alice", expected="v3")
    assert rollout.rollback(db, "pets", by="alice", versions=versions)[0].stable == "v1"


def test_rollback_never_returns_to_a_version_deleted_since(db):
    rollout.start(db, "pets", "v2", "canary", 10, serving="v1", by="alice")
    rollout.promote(db, "pets", by="alice")
    back, rolled = rollout.rollback(db, "pets", by="alice", versions=["v2", "v0"])  # v1 was deleted
    assert (back.stable, rolled) == ("v0", "v2")


def _live(n_stable, right_stable, n_candidate, right_candidate):
    return {"v1": {"count": n_stable, "correct": right_stable}, "v2": {"count": n_candidate, "correct": right_candidate}}


def test_auto_promote_decides_on_wilson_intervals_with_a_minimum_count():
    state = rollout.Rollout("pets", "v1", "v2", "canary", 10)
    assert rollout.auto_promote_decision(_live(5, 4, 5, 5), state, 50, 0.0)["decision"] == "wait"
    # a better point estimate is not enough: 0.84 vs 0.80 on 200 labels each overlap
    close = rollout.auto_promote_decision(_live(200, 160, 200, 168), state, 50, 0.0)
    assert close["decision"] == "hold" and close["candidate"]["lower"] < close["stable"]["upper"]
    clear = rollout.auto_promote_decision(_live(300, 240, 300, 285), state, 50, 0.0)
    assert clear["decision"] == "promote" and clear["candidate"]["lower"] > clear["stable"]["upper"]
    assert clear["candidate"]["count"] == 300 and clear["stable"]["correct"] == 240
    assert rollout.auto_promote_decision(_live(200, 160, 200, 168), state, 50, 0.2)["decision"] == "promote"


def test_one_worker_holds_the_duties_lease_until_it_lapses(db):
    assert rollout.hold_lease(db, "duties", "a", 30)
    assert not rollout.hold_lease(db, "duties", "b", 30)
    assert rollout.hold_lease(db, "duties", "a", -1)  # renewed, already lapsed
    assert rollout.hold_lease(db, "duties", "b", 30) and not rollout.hold_lease(db, "duties", "a", 30)


def _feedback(db, version, count, right):
    rows = [records.PredictionRecord(f"{version}-{i}", "pets", version, "cat", 0.9, 0.5, 0.3, 0.5, False, time.time())
            for i in range(count)]
    records.write_predictions(db, rows, 100_000)
    for i in range(count):
        records.record_feedback(db, f"{version}-{i}", "cat" if i < right else "dog", None, by="alice")


def test_auto_promote_runs_in_the_lease_holder_only_and_logs_the_decision_with_its_numbers(db):
    settings = LoopSettings(auto_promote=True, auto_promote_min_feedback=50)
    plane = SimpleNamespace(db=db, settings=settings)
    first, second = LoopWorker(plane, None, None, None), LoopWorker(plane, None, None, None)
    rollout.start(db, "pets", "v2", "canary", 10, serving="v1", by="alice")
    first.drift_pass()  # takes the lease; too few labels: waits
    _feedback(db, "v1", 100, 70)
    _feedback(db, "v2", 100, 97)
    second.drift_pass()  # not the lease holder: decides nothing
    assert rollout.current(db, "pets").candidate == "v2"
    first.drift_pass()
    assert (rollout.current(db, "pets").stable, rollout.current(db, "pets").candidate) == ("v2", None)
    log = rollout.events(db, "pets")
    assert [(e["action"], e["by"]) for e in log[:4]] == [
        ("promote", "auto-promote"), ("auto-promote", "auto-promote"), ("auto-promote", "auto-promote"),
        ("rollout", "alice")]
    decided, waited = json.loads(log[1]["detail"]), json.loads(log[2]["detail"])
    assert waited["decision"] == "wait" and decided["decision"] == "promote"
    assert decided["candidate"]["lower"] > decided["stable"]["upper"] and decided["candidate"]["count"] == 100
    first.drift_pass()  # nothing left to decide: no new events
    assert len(rollout.events(db, "pets")) == len(log)


def _cloud(rng, n, shift=0.0, dims=16):
    points = np.eye(dims)[:4][rng.integers(0, 4, n)] * 3 + rng.normal(size=(n, dims))
    points[:, 5] += shift
    return points


def _stream(db, rng, count, shift=0.0):
    drift.write_samples(db, [drift.Sample("pets", "v1", "a", 0.5, False, row, time.time())
                             for row in _cloud(rng, count, shift)], max_per_version=2000)


def test_drift_windows_never_overlap_and_a_window_is_reported_once(db):
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c", "d"]
    ref = build_reference(_cloud(rng, 300), rng.integers(0, 4, 300), rng.integers(0, 4, 300), labels)
    _stream(db, rng, 150)
    first = drift.window_report(db, "pets", "v1", ref, labels, window=100, alpha=0.01)
    assert drift.record(db, "pets", "v1", first) and not drift.record(db, "pets", "v1", first)  # once only
    assert drift.unreported(db, "pets", "v1") == 0
    _stream(db, rng, 60)
    assert drift.unreported(db, "pets", "v1") == 60  # not a full window yet: the worker waits
    _stream(db, rng, 60)
    second = drift.window_report(db, "pets", "v1", ref, labels, window=100, alpha=0.01)
    assert second["window"] == 100 and second["oldest_id"] > first["newest_id"]
    assert drift.record(db, "pets", "v1", second) and len(drift.history(db, "pets", "v1")) == 2


def test_false_alarms_over_many_windows_of_undrifted_traffic_stay_near_alpha(db):
    """Each window is a fresh test, so over repeated windows the false alarms are alpha × windows."""
    rng = np.random.default_rng(1)
    labels = ["a", "b", "c", "d"]
    ref = build_reference(_cloud(rng, 300), rng.integers(0, 4, 300), rng.integers(0, 4, 300), labels)
    alpha, windows, alarms, seen = 0.05, 80, 0, set()
    for _ in range(windows):
        _stream(db, rng, 50)
        report = drift.window_report(db, "pets", "v1", ref, labels, window=50, alpha=alpha, permutations=100)
        assert drift.record(db, "pets", "v1", report)
        ids = set(range(report["oldest_id"], report["newest_id"] + 1))
        assert not ids & seen  # no sample is tested twice
        seen |= ids
        alarms += bool(report["embedding"]["drifted"])
    print(f"false alarms {alarms}/{windows} = {alarms / windows:.3f} at alpha {alpha}")
    assert alarms / windows <= 0.12  # alpha plus sampling slack over 80 independent windows
    _stream(db, rng, 50, shift=2.0)
    shifted = drift.window_report(db, "pets", "v1", ref, labels, window=50, alpha=alpha, permutations=100)
    assert shifted["embedding"]["drifted"] is True


BLOCKING = {"read", "write", "rmtree", "resolve", "latest_version", "list_models", "create", "refresh", "set_capture",
            "prepare", "check_dataset", "monitor", "_known", "_serving", "_record", "_versions", "_submit", "image"}


def _blocking_calls(function) -> list[str]:
    """Calls in an async route body that would block its event loop: a blocking name called
    directly (not awaited, not handed to asyncio.to_thread, not inside a lambda run there)."""
    import ast

    found, stack = [], [(function, False)]
    while stack:
        node, awaited = stack.pop()
        if isinstance(node, ast.Lambda):
            continue
        if isinstance(node, ast.Call) and not awaited:
            callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if callee in BLOCKING:
                found.append(f"{function.name}:{node.lineno} {callee}")
        stack.extend((child, isinstance(node, ast.Await)) for child in ast.iter_child_nodes(node))
    return found


def test_loop_routes_keep_sqlite_store_and_file_calls_off_the_event_loop():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "service" / "routes"
    routes = [node for name in ("loop.py", "loop_retrain.py")
              for node in ast.walk(ast.parse((root / name).read_text())) if isinstance(node, ast.AsyncFunctionDef)]
    assert len(routes) > 8
    assert [call for route in routes for call in _blocking_calls(route)] == []
