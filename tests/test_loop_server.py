"""The production loop on the real server (`bentoml serve`, two workers): request ids and feedback,
feedback sent right after the answer (on either worker), capture within its limits under load,
the review queue's order, drift that fires on a shifted stream and stays quiet on a like one in
windows that never overlap, rollback after a plain publish, compare-and-set promote and rollback,
a canary split, shadow mode that never changes an answer, and promote/rollback under load without
a failed request."""
from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.artifact import store
from tests.serving import bento_store, running_server
from tests.tiny import write_tiny_model, write_trusted_tiny_model

pytestmark = pytest.mark.slow
KEY = "loop-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
CAPTURE_ITEMS, CAPTURE_MB = 40, 0.05


def png(rgb) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), tuple(int(v) for v in rgb)).save(buffer, format="PNG")
    return buffer.getvalue()


def like_training(rng) -> tuple[bytes, str]:
    """An image drawn as the training data was (tests/tiny.py: noisy_colour_samples)."""
    c = int(rng.integers(0, 3))
    rgb = rng.integers(0, 150, 3)
    rgb[c] = rng.integers(110, 256)
    return png(rgb), ("red", "green", "blue")[c]


def shifted(rng) -> bytes:
    """Bright two-channel colours: nothing like the training data."""
    rgb = rng.integers(200, 256, 3)
    rgb[int(rng.integers(0, 3))] = rng.integers(0, 40)
    return png(rgb)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import httpx

    root = tmp_path_factory.mktemp("loop-server")
    with bento_store(root / "bentoml"):
        v1 = store.publish("colours", write_trusted_tiny_model(root / "stage" / "v1", root / "fit1")).version
        v2 = store.publish("colours", write_trusted_tiny_model(root / "stage" / "v2", root / "fit2")).version
        store.publish("other", write_trusted_tiny_model(root / "stage" / "o", root / "fit3"))
        for i in (1, 2):  # published one after the other, never rolled out: a plain publish
            store.publish("plain", write_tiny_model(root / "stage" / f"p{i}"))
        swapped = np.zeros((3, 3), np.float32)
        swapped[0, 0] = swapped[1, 2] = swapped[2, 1] = 0.05  # sees green as blue and blue as green
        store.publish("mixed", write_tiny_model(root / "stage" / "mixed", weights=swapped, embedding=True))
        env = {"TUNESERVE_HOME": str(root / "home"), "TUNESERVE_DEFAULT_MODEL": "colours", "TUNESERVE_API_KEY": KEY,
               "TUNESERVE_WORKERS": "2", "TUNESERVE_PRELOAD": f"colours:{v1}", "TUNESERVE_POLL_SECONDS": "1",
               "TUNESERVE_CAPTURE_MODELS": "colours", "TUNESERVE_CAPTURE_FRACTION": "0.5",
               "TUNESERVE_CAPTURE_MAX_ITEMS": str(CAPTURE_ITEMS), "TUNESERVE_CAPTURE_MAX_MB": str(CAPTURE_MB),
               "TUNESERVE_CAPTURE_MIN_FREE_MB": "0", "TUNESERVE_DRIFT_FRACTION": "1", "TUNESERVE_DRIFT_WINDOW": "60",
               "TUNESERVE_DRIFT_INTERVAL_S": "0.5", "TUNESERVE_ACCESS_LOG": "off",
               "TUNESERVE_FINETUNE_MIN_PER_CLASS": "3"}
        with running_server(env, root / "server.log") as url, httpx.Client(base_url=url, timeout=60) as http:
            # v2 was published last, so it is `latest`; rolled out at 0 % it waits as a candidate beside v1
            held = http.post("/models/colours/rollout", json={"version": v2, "percent": 0}, headers=AUTH)
            assert held.status_code == 200 and held.json()["stable"] == v1, held.text
            time.sleep(1.5)
            yield http, url, v1, v2, root


def classify(http, data: bytes, model: str | None = None, headers=None) -> dict:
    fields = {"model": model} if model else {}
    answer = http.post("/classify", files={"image": ("x.png", data, "image/png")}, data=fields, headers=headers or {})
    assert answer.status_code == 200, answer.text
    return answer.json()


def many(url: str, jobs, threads: int = 8) -> list:
    import httpx

    local = threading.local()

    def run(job):
        if not hasattr(local, "http"):
            local.http = httpx.Client(base_url=url, timeout=60)
        return job(local.http)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(run, jobs))


def wait_for(check, timeout=30.0, interval=0.3):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def test_request_id_and_feedback_give_live_accuracy(server):
    http, _, v1, _, _ = server
    rng = np.random.default_rng(0)
    answers = [(classify(http, data), truth) for data, truth in (like_training(rng) for _ in range(12))]
    assert all(len(a["request_id"]) >= 16 for a, _ in answers) and len({a["request_id"] for a, _ in answers}) == 12
    assert http.post("/feedback", json={"request_id": answers[0][0]["request_id"], "label": "red"}).status_code == 401
    time.sleep(0.6)  # records are written after the response
    for i, (answer, truth) in enumerate(answers):
        label = truth if i < 9 else next(x for x in ("red", "green", "blue") if x != answer["label"])
        body = {"request_id": answer["request_id"], "label": label}
        sent = http.post("/feedback", json=body, headers=AUTH) if i % 2 else http.post("/feedback", data=body, headers=AUTH)
        assert sent.status_code == 200, sent.text
        assert sent.json()["version"] == v1
    assert http.post("/feedback", json={"request_id": "nope", "label": "red"}, headers=AUTH).status_code == 404
    bad = http.post("/feedback", json={"request_id": answers[0][0]["request_id"], "label": "mauve"}, headers=AUTH)
    assert bad.status_code == 422 and "mauve" in bad.json()["error"]
    batch = http.post("/classify_batch", files=[("images", ("a.png", like_training(rng)[0], "image/png"))] * 3).json()
    assert [r["request_id"].rsplit("-", 1)[1] for r in batch["results"]] == ["0", "1", "2"]
    live = http.get("/models/colours/monitor").json()["versions"][v1]
    correct = sum(a["label"] == t for a, t in answers[:9])
    assert live["live"]["count"] == 12 and live["live"]["correct"] == correct
    assert live["live"]["interval"][0] <= correct / 12 <= live["live"]["interval"][1]
    assert live["eval_accuracy"] is None or 0 <= live["eval_accuracy"] <= 1


def test_v2_classification_carries_request_ids_that_feedback_takes(server):
    http, _, v1, _, _ = server
    pixels = np.zeros((2, 16, 16, 3), np.uint8)
    pixels[0, ..., 0] = pixels[1, ..., 2] = 220
    body = {"inputs": [{"name": "pixels", "shape": [2, 16, 16, 3], "datatype": "UINT8", "data": pixels.ravel().tolist()}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}]}
    answer = http.post(f"/v2/models/colours/versions/{v1}/infer", json=body)
    assert answer.status_code == 200, answer.text
    ids = answer.json()["parameters"]["request_ids"]
    assert len(ids) == 2 and ids[0].endswith("-0") and answer.json()["id"] == ids[0][:-2]
    raw = http.post(f"/v2/models/colours/versions/{v1}/infer", json={**body, "outputs": [{"name": "probabilities"}]})
    assert "parameters" not in raw.json()  # a tensor call is not a classification: no record, no id
    time.sleep(0.6)
    sent = http.post("/feedback", json={"request_id": ids[1], "label": "blue"}, headers=AUTH)
    assert sent.status_code == 200 and sent.json()["version"] == v1, sent.text


def test_feedback_right_after_the_answer_is_accepted_on_either_worker(server):
    import httpx

    http, url, v1, _, _ = server
    rng = np.random.default_rng(5)
    for i in range(20):
        data, truth = like_training(rng)
        answer = classify(http, data)
        body = {"request_id": answer["request_id"], "label": truth}
        if i % 2:  # a fresh connection: with two workers it may land on the one that did not answer
            with httpx.Client(base_url=url, timeout=60) as other:
                sent = other.post("/feedback", json=body, headers=AUTH)
        else:  # the same connection: the answering worker, before its periodic write
            sent = http.post("/feedback", json=body, headers=AUTH)
        assert sent.status_code == 200, (i, sent.text)
        assert sent.json()["version"] == answer["version"] == v1 and sent.json()["predicted"] == answer["label"]
    started = time.monotonic()
    assert http.post("/feedback", json={"request_id": "0" * 32, "label": "red"}, headers=AUTH).status_code == 404
    print(f"an unknown request id answered 404 after {time.monotonic() - started:.2f} s")


def test_capture_stays_within_its_limits_under_load(server):
    http, url, _, _, root = server
    rng = np.random.default_rng(1)
    images = [like_training(rng)[0] if i % 3 else shifted(rng) for i in range(300)]
    answers = many(url, [lambda h, d=d: classify(h, d) for d in images])
    assert len(answers) == 300
    time.sleep(1.0)
    counts = http.get("/models/colours/monitor").json()["captures"]
    folder = root / "home" / "capture" / "colours"
    on_disk = sum(p.stat().st_size for p in folder.iterdir())
    print(f"captured {counts['images']} images, {counts['bytes']} bytes ({on_disk} on disk); {counts['by_reason']}")
    assert 0 < counts["images"] <= CAPTURE_ITEMS and on_disk <= CAPTURE_MB * 1024 * 1024
    assert counts["by_reason"].get("out_of_domain", 0) > 0
    assert http.get("/models/other/monitor").json()["captures"]["images"] == 0  # capture is per model


def test_review_queue_is_ordered_by_uncertainty(server):
    http, _, _, _, _ = server
    queue = http.get("/models/colours/review", params={"limit": 10}).json()
    items = queue["items"]
    assert items and queue["waiting"] >= len(items)
    assert items[0]["uncertainty"] == max(i["uncertainty"] for i in items)
    assert items[0]["uncertainty"] > items[-1]["uncertainty"]
    image = http.get(items[0]["image_url"])
    assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (16, 16)
    labelled = http.post("/feedback", json={"request_id": items[0]["capture_id"], "label": "red"}, headers=AUTH)
    assert labelled.status_code == 200 and labelled.json()["captured"] is True
    assert http.post(f"/models/colours/review/{items[1]['capture_id']}/skip", headers=AUTH).status_code == 200
    after = [i["capture_id"] for i in http.get("/models/colours/review", params={"limit": 50}).json()["items"]]
    assert items[0]["capture_id"] not in after and items[1]["capture_id"] not in after


def _next_report(http, model, version, after_id=0, timeout=30.0):
    """The first drift report of `model:version` past sample id `after_id`."""
    def newest():
        report = http.get(f"/models/{model}/monitor").json()["versions"].get(version, {}).get("drift")
        return report if report and report["oldest_id"] > after_id else None
    return wait_for(newest, timeout)


def test_drift_quiet_on_a_like_stream_and_fires_on_a_shifted_one_in_windows_that_never_overlap(server):
    http, url, _, _, _ = server
    version = http.get("/models/other/monitor").json()["serving"]["latest"]  # no sample of it yet
    rng = np.random.default_rng(2)
    many(url, [lambda h, d=like_training(rng)[0]: classify(h, d, "other") for _ in range(60)])  # one window
    quiet = _next_report(http, "other", version)
    assert quiet["window"] == 60 and quiet["embedding"]["drifted"] is False, quiet
    many(url, [lambda h, d=shifted(rng): classify(h, d, "other") for _ in range(60)])  # the next window
    fired = _next_report(http, "other", version, quiet["newest_id"])
    assert fired["window"] == 60 and fired["oldest_id"] > quiet["newest_id"]  # no sample tested twice
    assert fired["embedding"]["drifted"] is True and fired["in_domain_rate"] < quiet["in_domain_rate"], fired
    history = http.get("/models/other/monitor").json()["versions"][version]["history"]
    assert len(history) == 2  # one report per window, however many workers and passes
    metrics = wait_for(lambda: (m := http.get("/metrics").text) and f'model="other",version="{version}"' in m and m)
    assert f'tuneserve_drift_p_value{{model="other",version="{version}"}}' in metrics


def test_rollback_after_a_plain_publish_and_compare_and_set(server):
    http, _, _, _, _ = server
    described = http.get("/models/plain").json()
    versions = [v["version"] for v in described["versions"]]
    newest = described["latest"]  # published last: it serves, with no rollout
    before = next(v for v in versions if v != newest)
    assert classify(http, png((200, 30, 30)), "plain")["version"] == newest
    wrong = http.post("/models/plain/rollback", json={"expected": before}, headers=AUTH)
    assert wrong.status_code == 409 and newest in wrong.json()["error"], wrong.text
    back = http.post("/models/plain/rollback", json={"expected": newest}, headers=AUTH)
    assert back.status_code == 200, back.text
    assert (back.json()["returned_to"], back.json()["rolled_back"], back.json()["stable"]) == (before, newest, before)
    assert wait_for(lambda: all(classify(http, png((1, 2, 3)), "plain")["version"] == before for _ in range(5)), 5)
    assert {v["version"] for v in http.get("/models/plain").json()["versions"]} == set(versions)  # nothing lost
    assert classify(http, png((1, 2, 3)), f"plain:{newest}")["version"] == newest
    again = http.post("/models/plain/rollback", headers=AUTH)
    assert again.status_code == 409 and "nothing to roll back to" in again.json()["error"]
    rolled_out = http.post("/models/plain/rollout", json={"version": newest, "percent": 50}, headers=AUTH)
    assert rolled_out.status_code == 200 and rolled_out.json()["stable"] == before
    stale = http.post("/models/plain/promote", json={"expected": before}, headers=AUTH)
    assert stale.status_code == 409 and newest in stale.json()["error"]
    promoted = http.post("/models/plain/promote", json={"expected": newest}, headers=AUTH)
    assert promoted.status_code == 200 and promoted.json()["stable"] == newest
    assert http.post("/models/plain/promote", json={"expected": newest}, headers=AUTH).status_code == 409


def test_canary_split_and_pinned_requests(server):
    http, url, v1, v2, _ = server
    assert http.post("/models/colours/rollout", json={"version": v2, "mode": "canary", "percent": 30}).status_code == 401
    started = http.post("/models/colours/rollout", json={"version": v2, "mode": "canary", "percent": 30}, headers=AUTH)
    assert started.status_code == 200 and started.json()["stable"] == v1, started.text
    time.sleep(1.5)  # every worker re-reads the rollout within loop_refresh_s
    data = png((200, 30, 30))
    versions = many(url, [lambda h: classify(h, data)["version"] for _ in range(2000)])
    share = versions.count(v2) / len(versions)
    print(f"canary share {share:.3f} of 2000 (set 30 %)")
    assert abs(share - 0.30) < 0.04 and set(versions) == {v1, v2}
    sticky = {classify(http, data, headers={"X-Client-Id": "camera-7"})["version"] for _ in range(20)}
    assert len(sticky) == 1
    assert {classify(http, data, f"colours:{v1}")["version"] for _ in range(30)} == {v1}


def test_shadow_never_changes_an_answer(server):
    http, url, v1, v2, _ = server
    assert http.post("/models/colours/rollback", headers=AUTH).status_code == 200
    shadow = http.post("/models/colours/rollout", json={"version": v2, "mode": "shadow"}, headers=AUTH)
    assert shadow.status_code == 200 and shadow.json()["mode"] == "shadow"
    time.sleep(1.5)
    rng = np.random.default_rng(3)
    images = [like_training(rng)[0] for _ in range(100)]
    pinned = many(url, [lambda h, d=d: classify(h, d, f"colours:{v1}") for d in images])
    shadowed = many(url, [lambda h, d=d: classify(h, d) for d in images])
    strip = lambda a: {k: v for k, v in a.items() if k != "request_id"}  # noqa: E731
    assert [strip(a) for a in shadowed] == [strip(a) for a in pinned]
    summary = wait_for(lambda: (s := http.get("/models/colours/monitor").json()["shadow"]) and s["requests"] >= 100 and s)
    assert summary["agreement"] > 0.9 and summary["candidate_ms"] > 0


def test_promote_and_rollback_under_load_fail_no_request(server):
    http, url, v1, v2, _ = server
    stop, failures, seen = threading.Event(), [], set()

    def hammer():
        import httpx

        with httpx.Client(base_url=url, timeout=60) as h:
            while not stop.is_set():
                r = h.post("/classify", files={"image": ("x.png", png((30, 200, 30)), "image/png")})
                (seen.add(r.json()["version"]) if r.status_code == 200 else failures.append(r.status_code))

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        promoted = http.post("/models/colours/promote", json={"expected": v2}, headers=AUTH).json()
        assert promoted["stable"] == v2 and promoted["candidate"] is None
        time.sleep(2)
        assert wait_for(lambda: classify(http, png((1, 2, 3)))["version"] == v2, 5)
        back = http.post("/models/colours/rollback", headers=AUTH).json()
        assert back["stable"] == v1
        assert wait_for(lambda: all(classify(http, png((1, 2, 3)))["version"] == v1 for _ in range(5)), 5)
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == [] and seen == {v1, v2}
    events = http.get("/models/colours/monitor").json()["events"]
    assert [e["action"] for e in events[:3]] == ["rollback", "promote", "rollout"]
    assert all(e["by"] == "default" for e in events[:3])


def test_finetune_from_feedback_fixes_the_class_the_served_version_got_wrong(server):
    http, _, _, _, _ = server
    served = http.get("/models/mixed").json()["latest"]
    rng = np.random.default_rng(4)
    samples = [like_training(rng) for _ in range(60)]
    blue = [data for data, truth in samples if truth == "blue"]
    assert {classify(http, data, "mixed")["label"] for data in blue} == {"green"}  # the class it gets wrong
    for data, truth in samples[:30]:
        sent = http.post("/feedback", files={"image": ("x.png", data, "image/png")},
                         data={"label": truth, "model": "mixed"}, headers=AUTH)
        assert sent.status_code == 200 and sent.json()["captured"] is True, sent.text
    refused = http.post("/models/mixed/finetune_from_feedback", json={}, headers=AUTH)
    assert refused.status_code == 409 and "training data" in refused.json()["error"]  # tests/tiny.py models have none
    queued = http.post("/models/mixed/finetune_from_feedback", json={"with_training_data": False,
                       "config": {"strategy": "logistic"}}, headers=AUTH)
    assert queued.status_code == 202, queued.text
    job = queued.json()
    assert job["source"] == f"mixed:{served}" and set(job["feedback"]) == {"red", "green", "blue"}
    done = wait_for(lambda: (j := http.get(f"/finetune/{job['job_id']}").json())["state"] in ("succeeded", "failed") and j, 240)
    assert done and done["state"] == "succeeded", done
    fixed = done["model"].split(":")[1]
    assert http.get(f"/models/mixed:{fixed}").json()["versions"][0]["manifest"]["lineage"][-1] == f"mixed:{served}"
    answers = [classify(http, data, f"mixed:{fixed}")["label"] for data in blue]
    assert answers.count("blue") >= 0.9 * len(answers), answers
    events = http.get("/models/mixed/monitor").json()["events"]
    assert events[0]["action"] == "finetune_from_feedback" and job["job_id"] in events[0]["detail"]
