"""The production loop's torch-free core (service/loop/): statistics, records and feedback, the
capture store's limits, review order, drift windows and rollouts, on a temporary database."""
from __future__ import annotations

import random
import time

import numpy as np
import pytest

from models.artifact.reference import build_reference, load_reference
from service.loop import capture, drift, records, review, rollout
from service.loop.db import LoopDb
from service.loop.stats import chi_square, mmd_test, psi, wilson


@pytest.fixture
def db(tmp_path):
    return LoopDb(tmp_path)


def test_wilson_interval_contains_the_rate_and_narrows_with_count():
    low, high = wilson(8, 10)
    assert 0.44 < low < 0.8 < high < 0.98
    wide, narrow = wilson(8, 10), wilson(800, 1000)
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 5
    assert wilson(0, 0) == (0.0, 1.0) and wilson(5, 5)[1] == 1.0


def _cloud(rng, n, shift=0.0, dims=32):
    centres = np.eye(dims)[:4] * 3
    points = centres[rng.integers(0, 4, n)] + rng.normal(size=(n, dims))
    points[:, 5] += shift
    return points


def test_mmd_fires_on_a_shift_and_false_alarms_at_about_alpha():
    rng = np.random.default_rng(1)
    reference = _cloud(rng, 200)
    alpha, windows = 0.05, 60
    quiet = [mmd_test(reference, _cloud(rng, 100), permutations=100, seed=i).p_value < alpha for i in range(windows)]
    shifted = [mmd_test(reference, _cloud(rng, 100, shift=1.5), permutations=100, seed=i).p_value < alpha
               for i in range(20)]
    false_alarm_rate = sum(quiet) / windows
    print(f"false alarms {sum(quiet)}/{windows} = {false_alarm_rate:.3f} at alpha {alpha}; detected {sum(shifted)}/20")
    assert false_alarm_rate <= 0.12  # alpha plus sampling slack over 60 windows
    assert sum(shifted) >= 19


def test_psi_and_chi_square_see_a_changed_label_mix():
    expected = np.array([0.25, 0.25, 0.25, 0.25])
    assert psi(expected, expected) == pytest.approx(0.0)
    assert psi(expected, np.array([0.7, 0.1, 0.1, 0.1])) > 0.25
    assert chi_square(expected, np.array([25, 25, 25, 25.0]))[1] > 0.9
    assert chi_square(expected, np.array([70, 10, 10, 10.0]))[1] < 1e-6
    from scipy.stats import chi2, chisquare  # the reference the service's lighter import must agree with

    observed = np.array([31, 22, 27, 20.0])
    statistic, p_value = chi_square(expected, observed)
    assert (statistic, p_value) == pytest.approx(tuple(chisquare(observed)), rel=1e-12)
    assert p_value == pytest.approx(chi2.sf(statistic, 3), rel=1e-12)


def _record(request_id, version="v1", label="cat", confidence=0.9):
    return records.PredictionRecord(request_id, "pets", version, label, confidence, 0.8, 0.3, 0.5, False, time.time())


def test_feedback_scores_live_accuracy_per_version_and_bounds_the_records(db):
    records.write_predictions(db, [_record(f"a{i}") for i in range(10)] + [_record("b0", "v2")], max_records=100)
    for i in range(10):
        records.record_feedback(db, f"a{i}", "cat" if i < 7 else "dog", ["cat", "dog"], by="alice")
    records.record_feedback(db, "b0", "cat", ["cat", "dog"], by="bob")
    accuracy = records.live_accuracy(db, "pets")
    assert accuracy["v1"]["count"] == 10 and accuracy["v1"]["accuracy"] == pytest.approx(0.7)
    assert accuracy["v1"]["interval"][0] < 0.7 < accuracy["v1"]["interval"][1]
    assert accuracy["v2"] == {"count": 1, "correct": 1, "accuracy": 1.0, "interval": pytest.approx([0.2065, 1.0], abs=1e-3)}
    with pytest.raises(records.UnknownRequest):
        records.record_feedback(db, "nope", "cat", None, by=None)
    with pytest.raises(records.BadFeedback, match="not one of"):
        records.record_feedback(db, "a1", "horse", ["cat", "dog"], by=None)
    with pytest.raises(records.FeedbackTaken):  # bob cannot replace alice's label
        records.record_feedback(db, "a0", "dog", ["cat", "dog"], by="bob")
    assert records.record_feedback(db, "a0", "cat", ["cat", "dog"], by="alice")["label"] == "cat"  # alice may
    records.write_predictions(db, [_record(f"c{i}") for i in range(200)], max_records=50)
    assert db.read("SELECT COUNT(*) AS n FROM predictions")[0]["n"] == 50
    assert records.prediction(db, "c199") is not None and records.prediction(db, "a0") is None


def test_uncertainty_of_probabilities():
    margin, entropy = records.uncertainty_of(np.array([0.5, 0.5]))
    assert margin == 0 and entropy == pytest.approx(np.log(2))
    assert records.uncertainty_of(np.array([1.0, 0.0]))[1] == 0


def rid(i: int) -> str:
    """A request id as the server makes them (service/names.py): capture ids name files."""
    return f"{i:032x}"


def _captured(i, size=1000, **kw):
    values = dict(label="cat", confidence=0.9, margin=0.8, entropy=0.2, in_domain=0.5, abstained=False, reason="sampled")
    values.update(kw)
    return capture.Captured(rid(i), "pets", "v1", bytes(size), **values)


def test_capture_keeps_within_size_count_and_age_oldest_out_first(db, tmp_path):
    limits = capture.CaptureLimits(max_bytes=10_000, max_items=1000, max_age_seconds=3600, min_free_bytes=0)
    store = capture.CaptureStore(db, tmp_path, limits)
    assert store.write([_captured(i) for i in range(25)]) == 10  # the newest that fit
    counts = store.counts("pets")
    assert counts["images"] == 10 and counts["bytes"] == 10_000
    assert sorted(p.name for p in (tmp_path / "capture" / "pets").iterdir()) == sorted(rid(i) for i in range(15, 25))
    store.limits = capture.CaptureLimits(10_000, 4, 3600, 0)
    store.prune()
    assert store.counts()["images"] == 4 and store.image("pets", rid(24)) == bytes(1000)
    store.limits = capture.CaptureLimits(10_000, 4, 0.0, 0)
    store.prune()
    assert store.counts()["images"] == 0 and not list((tmp_path / "capture" / "pets").iterdir())
    huge = capture.CaptureLimits(10**9, 10, 3600, min_free_bytes=10**18)  # "keep more free than any disk has"
    assert capture.CaptureStore(db, tmp_path, huge).write([_captured(99)]) == 0


def test_capture_limit_holds_when_two_workers_write_at_once(tmp_path):
    """Each worker has its own connection. Worker A is slowed between making room and inserting; worker B
    writes meanwhile. Pruning and inserting in one transaction keeps the shared limit (it was 43 > 40)."""
    import threading
    limits = capture.CaptureLimits(max_bytes=10**9, max_items=40, max_age_seconds=3600, min_free_bytes=0)
    a, b = (capture.CaptureStore(LoopDb(tmp_path), tmp_path, limits) for _ in range(2))
    assert a.write([_captured(i, size=10) for i in range(40)]) == 40
    slowed = threading.Event()

    def slow_path(model, capture_id, plain=a._path):
        if not slowed.is_set():
            slowed.set()
            time.sleep(0.5)
        return plain(model, capture_id)

    a._path = slow_path
    worker_a = threading.Thread(target=a.write, args=([_captured(100 + j, size=10) for j in range(3)],))
    worker_a.start()
    slowed.wait(5)
    b.write([_captured(200 + j, size=10) for j in range(3)])
    worker_a.join()
    assert a.counts()["images"] == 40
    assert len(list((tmp_path / "capture" / "pets").iterdir())) == 40


def test_capture_rule_keeps_every_abstention_and_out_of_domain_plus_a_fraction():
    rng = random.Random(0)
    assert capture.capture_reason(True, 0.9, 0.0, rng) == "abstained"
    assert capture.capture_reason(False, 0.01, 0.0, rng) == "out_of_domain"
    kept = sum(capture.capture_reason(False, 0.9, 0.2, rng) == "sampled" for _ in range(5000))
    assert 900 < kept < 1100


def test_review_ranks_by_uncertainty_and_spreads_near_duplicates(db, tmp_path):
    store = capture.CaptureStore(db, tmp_path, capture.CaptureLimits(10**9, 10**6, 3600, 0))
    direction = np.eye(8)
    items = [
        _captured(0, margin=0.9, in_domain=0.9, embedding=direction[0]),  # sure, typical: last
        _captured(1, margin=0.05, in_domain=0.9, embedding=direction[1]),  # close call
        _captured(2, margin=0.06, in_domain=0.9, embedding=direction[1] * 1.01),  # near-duplicate of 1
        _captured(3, margin=0.9, in_domain=0.2, embedding=direction[3]),  # sure but untypical
        _captured(4, margin=0.3, in_domain=0.9, embedding=direction[4]),
    ]
    store.write(items)
    order = [c.capture_id for c, _ in review.rank(review.candidates(db, "pets"), 10, diversity=0.0)]
    assert order == [rid(1), rid(2), rid(3), rid(4), rid(0)]
    spread = [c.capture_id for c, _ in review.rank(review.candidates(db, "pets"), 10)]
    assert spread[:2] == [rid(1), rid(3)] and spread.index(rid(2)) > spread.index(rid(4))
    assert review.skip(db, "pets", rid(1))
    records.record_feedback(db, rid(3), "dog", None, by="a", model="pets", version="v1", predicted="cat", capture_id=rid(3))
    assert [c.capture_id for c in review.candidates(db, "pets")] == [rid(4), rid(2), rid(0)]
    assert records.labelled(db, "pets")[0]["label"] == "dog"


def test_reference_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    ref = build_reference(rng.normal(size=(500, 16)), np.repeat([0, 1], 250), np.repeat([0, 1], 250), ["a", "b"])
    ref.save(tmp_path)
    loaded = load_reference(tmp_path)
    assert loaded.embeddings.shape == (300, 16) and loaded.label_counts == {"a": 250, "b": 250}
    assert load_reference(tmp_path / "missing") is None


def test_drift_window_fires_on_a_shifted_stream_and_not_on_a_like_one(db):
    rng = np.random.default_rng(3)
    labels = ["a", "b", "c", "d"]
    base = _cloud(rng, 300)
    ref = build_reference(base, rng.integers(0, 4, 300), rng.integers(0, 4, 300), labels)

    def stream(version, shift, label_of):
        samples = [drift.Sample("pets", version, label_of(i), 0.5, False, row, time.time())
                   for i, row in enumerate(_cloud(rng, 150, shift))]
        drift.write_samples(db, samples, max_per_version=100)

    stream("v1", 0.0, lambda i: labels[i % 4])
    stream("v2", 2.0, lambda i: "a")
    quiet = drift.window_report(db, "pets", "v1", ref, labels, window=100, alpha=0.01)
    fired = drift.window_report(db, "pets", "v2", ref, labels, window=100, alpha=0.01)
    assert quiet["window"] == 100 and db.read("SELECT COUNT(*) AS n FROM samples WHERE version='v1'")[0]["n"] == 100
    assert quiet["embedding"]["drifted"] is False and quiet["labels"]["psi"] < 0.1
    assert fired["embedding"]["drifted"] is True and fired["labels"]["psi"] > 0.25
    assert quiet["in_domain_rate"] == 1.0 and quiet["abstention_rate"] == 0.0
    drift.record(db, "pets", "v2", fired)
    assert drift.history(db, "pets", "v2")[0]["embedding"]["drifted"] is True


def test_canary_split_is_close_to_its_percent_and_sticky_per_client(db):
    state = rollout.start(db, "pets", "v2", "canary", 20, serving="v1", by="alice")
    rng = random.Random(0)
    answered = [rollout.choose(state, None, rng)[0] for _ in range(2000)]
    assert abs(answered.count("v2") / 2000 - 0.20) < 0.03
    by_client = [rollout.choose(state, f"client-{i}", rng)[0] for i in range(2000)]
    assert abs(by_client.count("v2") / 2000 - 0.20) < 0.03
    assert all(rollout.choose(state, "client-7", rng)[0] == by_client[7] for _ in range(20))


def test_shadow_promote_and_rollback_are_recorded_with_who(db):
    state = rollout.start(db, "pets", "v2", "shadow", 50, serving="v1", by="alice")
    assert rollout.choose(state, "x", random.Random()) == ("v1", "v2") and state.percent == 0
    with pytest.raises(rollout.RolloutError):
        rollout.start(db, "pets", "v1", "canary", 10, serving="v1", by="alice")
    promoted = rollout.promote(db, "pets", by="bob")
    assert (promoted.stable, promoted.candidate) == ("v2", None)
    back, rolled = rollout.rollback(db, "pets", by="carol")
    assert back.stable == "v1" and rolled == "v2"
    assert [(e["action"], e["by"]) for e in rollout.events(db, "pets")] == [
        ("rollback", "carol"), ("promote", "bob"), ("rollout", "alice")]
    with pytest.raises(rollout.RolloutError, match="no candidate"):
        rollout.promote(db, "pets", by="bob")
