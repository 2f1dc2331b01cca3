"""Admission control and caller names, in process: the batch queue's bound and deadline refuse at once
(service/batching.py), the middleware counts only inference routes (service/admission.py), paths are
built from checked parts (service/names.py), and job children get no secrets (service/finetune/backends.py)."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from service.admission import Admission, AdmissionMiddleware, Overloaded
from service.batching import Batchers, QueueLimits
from service.finetune.backends import asked_for, child_environment
from service.names import InvalidName, OutsideRoot, caller_id, path_under


class SlowClassifier:
    """A stand-in classifier whose every ONNX Runtime pass takes `seconds` (threads: a real sleep)."""

    name, tag, ood = "slow", "slow:v1", None

    def __init__(self, seconds: float):
        self.seconds, self.batches = seconds, []

    def predict_scored(self, batch: np.ndarray):
        time.sleep(self.seconds)
        self.batches.append(len(batch))
        return np.full((len(batch), 2), 0.5, np.float32), None


def _image() -> np.ndarray:
    return np.zeros((4, 4, 3), np.uint8)


def test_a_full_queue_refuses_at_once_and_the_queued_still_run():
    async def scenario():
        batchers = Batchers(max_size=1, max_latency_s=0, limits=QueueLimits(max_queued=3, deadline_s=60, retry_after_s=7))
        model = SlowClassifier(0.2)
        first = asyncio.ensure_future(batchers.submit(model, _image()))
        await asyncio.sleep(0.05)  # the first is running: the queue is empty again
        queued = [asyncio.ensure_future(batchers.submit(model, _image())) for _ in range(3)]
        await asyncio.sleep(0)
        started = time.perf_counter()
        with pytest.raises(Overloaded) as refused:
            await batchers.submit(model, _image())
        refused_after = time.perf_counter() - started
        rows = await asyncio.gather(first, *queued)
        await batchers.close()
        return refused.value, refused_after, rows, model.batches

    refused, refused_after, rows, batches = asyncio.run(scenario())
    assert refused.status == 503 and refused.retry_after_s == 7 and "TUNESERVE_MAX_QUEUED_IMAGES=3" in str(refused)
    assert refused_after < 0.1  # not queued behind the 0.8 s of work ahead of it
    assert len(rows) == 4 and sum(batches) == 4  # every admitted image ran, none twice


def test_an_image_past_its_deadline_is_answered_503_and_never_runs():
    async def scenario():
        batchers = Batchers(max_size=1, max_latency_s=0, limits=QueueLimits(max_queued=100, deadline_s=0.15))
        model = SlowClassifier(0.3)
        first = asyncio.ensure_future(batchers.submit(model, _image()))
        await asyncio.sleep(0.01)
        late = asyncio.ensure_future(batchers.submit(model, _image()))  # waits 0.3 s > 0.15 s
        outcomes = await asyncio.gather(first, late, return_exceptions=True)
        await batchers.close()
        return outcomes, model.batches

    (first, late), batches = asyncio.run(scenario())
    assert not isinstance(first, Exception)
    assert isinstance(late, Overloaded) and "TUNESERVE_REQUEST_DEADLINE_S" in str(late)
    assert batches == [1]  # the late image never reached ONNX Runtime


def test_an_image_expected_to_wait_past_the_deadline_is_refused_before_it_queues():
    async def scenario():
        batchers = Batchers(max_size=1, max_latency_s=0, limits=QueueLimits(max_queued=100, deadline_s=1.0))
        model = SlowClassifier(0.05)
        await batchers.submit(model, _image())  # creates the model's batcher
        batcher = batchers._by_name["slow"]
        batcher.task.cancel()  # hold the queue still: what waits is what the check sees
        for _ in range(3):
            batcher.queue.put_nowait(object())
        batcher.seconds_per_image = 0.5  # 4 × 0.5 s > 1 s
        with pytest.raises(Overloaded, match="would wait about 2.0 s"):
            await batcher.submit(model, _image())
        batcher.seconds_per_image = 0.2  # 4 × 0.2 s < 1 s: it queues
        assert batcher._refusal() is None and batcher.expected_wait_s() == pytest.approx(0.8)

    asyncio.run(scenario())


def test_the_middleware_counts_inference_routes_only():
    release = asyncio.Event()
    sent: list[tuple[str, int]] = []

    async def app(scope, receive, send):
        if scope["path"] == "/classify":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    def call(middleware, path: str, method: str = "POST"):
        async def send(message):
            if message["type"] == "http.response.start":
                sent.append((path, message["status"], dict(message["headers"]).get(b"retry-after")))
        return middleware({"type": "http", "path": path, "method": method, "headers": []}, None, send)

    async def scenario():
        middleware = AdmissionMiddleware(app, admission=Admission(1, retry_after_s=3))
        held = asyncio.ensure_future(call(middleware, "/classify"))
        await asyncio.sleep(0.01)
        for path, method in (("/v2/models/m/versions/v1/infer", "POST"), ("/classify_batch", "POST"), ("/evaluate", "POST"),
                             ("/readyz", "GET"), ("/models/m/rollout", "POST"), ("/finetune", "POST")):
            await call(middleware, path, method)
        release.set()
        await held
        await call(middleware, "/classify")  # the place was given back

    asyncio.run(scenario())
    statuses = {(path, status) for path, status, _ in sent}
    assert {("/v2/models/m/versions/v1/infer", 503), ("/classify_batch", 503), ("/evaluate", 503)} <= statuses
    assert {("/readyz", 200), ("/models/m/rollout", 200), ("/finetune", 200)} <= statuses
    assert all(retry == b"3" for _, status, retry in sent if status == 503)
    assert [status for path, status, _ in sent if path == "/classify"] == [200, 200]


@pytest.mark.parametrize("hostile", ["../etc/passwd", "/etc/passwd", "a/b", "a\x00b", "x" * 129, "ünï", "..", "", " a"])
def test_hostile_caller_ids_and_path_parts_are_refused(tmp_path, hostile):
    if hostile:
        with pytest.raises(InvalidName):
            caller_id(hostile)
    if hostile in ("../etc/passwd", "/etc/passwd", "a/b", "a\x00b", "..", ""):
        with pytest.raises(OutsideRoot):
            path_under(tmp_path, "model", hostile)


def test_path_under_refuses_a_symlink_out_of_its_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "model").mkdir(parents=True)
    outside.mkdir()
    (root / "model" / "link").symlink_to(outside)
    with pytest.raises(OutsideRoot):
        path_under(root, "model", "link")
    assert path_under(root, "model", "0123abcd") == (root / "model" / "0123abcd").resolve()
    assert caller_id("client-1:run@x+1=2") == "client-1:run@x+1=2" and caller_id(None) is None


def test_job_children_get_no_keys_or_unrelated_secrets():
    environ = {"PATH": "/usr/bin", "HOME": "/root", "TUNESERVE_API_KEY": "secret-1", "TUNESERVE_API_KEYS": "a:secret-2",
               "TUNESERVE_HOME": "/srv/ts", "AWS_SECRET_ACCESS_KEY": "secret-3", "GITHUB_TOKEN": "secret-4",
               "CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "1", "LC_ALL": "C.UTF-8"}
    env = child_environment({"TUNESERVE_JOB_ID": "ft-1"}, environ)
    assert not any(value.startswith("secret") or "secret-2" in value for value in env.values())
    assert {"PATH", "HOME", "TUNESERVE_HOME", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "LC_ALL", "TUNESERVE_JOB_ID"} <= set(env)
    assert env["PYTHONPATH"].split(":")[0] == str(Path(__file__).resolve().parents[1])


def test_variables_a_deployment_asks_for_reach_job_children_but_keys_never_do():
    environ = {"HF_HOME": "/cache", "MY_A": "1", "MY_B": "2", "OTHER": "x", "TUNESERVE_API_KEY": "secret"}
    assert asked_for(environ, ("HF_HOME", "MY_*", "TUNESERVE_API_KEY")) == {"HF_HOME": "/cache", "MY_A": "1", "MY_B": "2"}
    assert asked_for(environ, ()) == {}
