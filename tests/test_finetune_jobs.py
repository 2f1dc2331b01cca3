"""Fine-tune jobs end to end in process: FastAPI routes + JobManager + a fake trainer child
process (tests/finetune_fake_train.py). Covers success with advancing progress, cancel
(queued and running), kill -9 of the child, failure reasons, stop → interrupted → resume,
two workers, the API key, and every bad upload refused at submit time."""
from __future__ import annotations

import io
import json
import os
import signal
import stat
import zipfile

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.finetune import JobManager
from service.routes.finetune import build_router
from service.config import Settings
from tests.finetune_support import FAKE_COMMAND, make_dataset, png, submit, wait_for, zip_dir


@pytest.fixture
def ft_settings(tmp_path, bento_home):
    (tmp_path / "data").mkdir()
    return Settings.of(
        home=tmp_path / "home",
        data_root=(tmp_path / "data").resolve(),
        auth=False,  # keys are tested in test_api_key_guards_mutating_routes and tests/test_auth.py
        job_grace_seconds=2.0,
        poll_seconds=0.1,
        training_command=FAKE_COMMAND,
        finetune_min_per_class=3,
        finetune_max_upload_mb=2,
        max_zip_entries=200,
        max_unpacked_mb=4,
    )


@pytest.fixture
def make_client(ft_settings):
    managers, clients = [], []

    def make(settings=None, start=True):
        settings = settings or ft_settings
        manager = JobManager(settings)
        if start:
            manager.start()
        app = FastAPI()
        app.include_router(build_router(manager, settings))
        client = TestClient(app)
        managers.append(manager)
        clients.append(client)
        return client, manager

    yield make
    for manager in managers:
        manager.stop(timeout=10)
    for client in clients:
        client.close()


@pytest.fixture
def dataset_zip(tmp_path):
    return zip_dir(make_dataset(tmp_path / "colours"))


def job(client, job_id):
    response = client.get(f"/finetune/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def wait_state(client, job_id, states, timeout=30):
    states = {states} if isinstance(states, str) else set(states)
    return wait_for(lambda: (j := job(client, job_id)) and j["state"] in states and j, timeout, what=f"{job_id} in {states}")


def test_submit_progress_success(make_client, dataset_zip, monkeypatch, ft_settings):
    from models.artifact import store

    monkeypatch.setenv("TUNESERVE_FAKE_TRAIN_STEP_S", "0.15")
    client, _ = make_client()
    response = submit(client, dataset_zip, {"name": "colours", "source": "simple_cnn:none", "epochs": 2})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["dataset"]["classes"] == 2 and body["dataset"]["images"] == 12
    job_id = body["job_id"]
    seen = set()
    wait_for(lambda: seen.add(job(client, job_id)["progress"].get("percent")) or len(seen - {None}) >= 3, 20, 0.05, "advancing progress")
    final = wait_state(client, job_id, {"succeeded", "failed"})
    assert final["state"] == "succeeded", final
    assert final["model"].startswith("colours:") and final["eval"]["accuracy"] == 0.9
    assert final["progress"]["percent"] == 100.0 and final["progress"]["epochs_done"] == 2
    assert final["started"] and final["finished"] >= final["started"]
    version = store.resolve(final["model"])
    assert version.manifest().labels == ["green", "red"]
    work = ft_settings.jobs_dir / job_id  # the upload copy and checkpoints go after success; logs stay
    # the runner removes them right after it records `succeeded`, so a poll can see the state first
    wait_for(lambda: not (work / "dataset").exists() and not any((work / "output").glob("*")), 10, 0.05,
             "the dataset copy and checkpoints removed after success")
    assert (work / "output").is_dir() and sorted(p.name for p in (work / "output").iterdir()) == []  # epoch-N.pt, staging/
    assert (work / "train.log").exists() and (work / "config.json").exists()
    listing = client.get("/finetune", params={"state": "succeeded"}).json()["jobs"]
    assert [j["job_id"] for j in listing] == [job_id]
    assert "fake training pid" in client.get(f"/finetune/{job_id}/log").text
    # chaining: the new model is a valid source for the next job (pinned to its version)
    second = submit(client, dataset_zip, {"name": "colours2", "source": "colours", "epochs": 1})
    assert second.status_code == 202, second.text
    assert second.json()["config"]["source"] == final["model"]
    done = wait_state(client, second.json()["job_id"], {"succeeded", "failed"})
    assert done["state"] == "succeeded"
    assert store.resolve(done["model"]).manifest().lineage == [final["model"]]


def test_cancel_running_and_queued(make_client, dataset_zip, monkeypatch, ft_settings):
    from models.artifact import store

    monkeypatch.setenv("TUNESERVE_FAKE_TRAIN_STEP_S", "0.3")
    client, _ = make_client()
    first = submit(client, dataset_zip, {"name": "slow", "source": "simple_cnn:none", "epochs": 20}).json()["job_id"]
    second = submit(client, dataset_zip, {"name": "later", "source": "simple_cnn:none", "epochs": 1}).json()["job_id"]
    wait_for(lambda: job(client, first)["progress"].get("step"), 20, what="first job training")
    assert job(client, second)["state"] == "queued"  # max_concurrent_jobs = 1
    queued = client.post(f"/finetune/{second}/cancel")
    assert queued.status_code == 200 and queued.json()["state"] == "cancelled"
    assert client.delete(f"/finetune/{first}").status_code == 409  # still running
    running = client.post(f"/finetune/{first}/cancel")
    assert running.status_code == 202 and running.json()["cancel_requested"]
    final = wait_state(client, first, {"cancelled", "failed", "succeeded"}, 15)
    assert final["state"] == "cancelled" and "no model version" in final["error"]
    assert client.post(f"/finetune/{first}/cancel").status_code == 409
    assert "slow" not in store.list_models() and "later" not in store.list_models()
    job_dirs = {p.name for p in ft_settings.jobs_dir.iterdir()}
    assert first in job_dirs
    deleted = client.delete(f"/finetune/{first}")
    assert deleted.status_code == 200 and deleted.json()["deleted"]
    assert first not in {p.name for p in ft_settings.jobs_dir.iterdir()}
    assert client.get(f"/finetune/{first}").status_code == 404


def test_kill_9_of_child_fails_with_reason(make_client, dataset_zip, monkeypatch):
    monkeypatch.setenv("TUNESERVE_FAKE_TRAIN_STEP_S", "0.3")
    client, manager = make_client()
    job_id = submit(client, dataset_zip, {"name": "victim", "source": "simple_cnn:none", "epochs": 20}).json()["job_id"]
    wait_for(lambda: job(client, job_id)["progress"].get("step"), 20, what="training")
    pid = manager.store.get(job_id).pid
    os.kill(pid, signal.SIGKILL)
    final = wait_state(client, job_id, {"failed", "cancelled", "succeeded"}, 15)
    assert final["state"] == "failed" and "signal 9" in final["error"] and "SIGKILL" in final["error"]
    # the manager keeps working: the next job runs
    monkeypatch.setenv("TUNESERVE_FAKE_TRAIN_STEP_S", "0.01")
    nxt = submit(client, dataset_zip, {"name": "after", "source": "simple_cnn:none", "epochs": 1}).json()["job_id"]
    assert wait_state(client, nxt, {"succeeded", "failed"})["state"] == "succeeded"


def test_training_failure_reason(make_client, dataset_zip):
    client, _ = make_client()
    job_id = submit(client, dataset_zip, {"name": "fail-me", "source": "simple_cnn:none", "epochs": 1}).json()["job_id"]
    final = wait_state(client, job_id, {"failed", "succeeded"})
    assert final["state"] == "failed" and "every image is unreadable" in final["error"]


def test_stop_interrupts_and_resume_continues(make_client, dataset_zip, ft_settings, monkeypatch):
    monkeypatch.setenv("TUNESERVE_FAKE_TRAIN_STEP_S", "0.1")
    client, manager = make_client()
    job_id = submit(client, dataset_zip, {"name": "resumable", "source": "simple_cnn:none", "epochs": 4}).json()["job_id"]
    wait_for(lambda: (job(client, job_id)["progress"].get("epochs_done") or 0) >= 2, 20, what="two epochs")
    manager.stop(timeout=10)  # a server shutdown
    interrupted = job(client, job_id)
    assert interrupted["state"] == "interrupted" and "resume" in interrupted["error"]
    client2, _ = make_client()  # the restarted server
    assert client2.post("/finetune/ft-20260101-000000-abcdef/resume").status_code == 404
    assert client2.post("/finetune/nope/resume").status_code == 422  # not a job id at all
    response = client2.post(f"/finetune/{job_id}/resume")
    assert response.status_code == 202, response.text
    final = wait_state(client2, job_id, {"succeeded", "failed"})
    assert final["state"] == "succeeded" and final["attempts"] == 2
    resumed_from = int((ft_settings.jobs_dir / job_id / "output" / "resumed_from.txt").read_text())
    assert resumed_from >= 2  # continued after the last finished epoch, not from scratch
    assert client2.post(f"/finetune/{job_id}/resume").status_code == 409


def test_dead_worker_job_becomes_interrupted(make_client, dataset_zip, ft_settings):
    import subprocess
    import sys

    from service.finetune.store import hostname

    client, manager = make_client(start=False)
    job_id = submit(client, dataset_zip).json()["job_id"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    manager.store.register_worker("old", hostname(), dead.pid)
    assert manager.store.claim("old", hostname(), 1).id == job_id
    manager.start()  # start-up recovery
    final = job(client, job_id)
    assert final["state"] == "interrupted"


def test_dead_worker_job_that_published_is_succeeded(make_client, dataset_zip, ft_settings):
    """A trainer that published before its worker was found gone (a Ray job runs on without it):
    recovery records the published version, not `interrupted`."""
    import subprocess
    import sys
    from pathlib import Path

    from service.finetune.store import hostname

    client, manager = make_client(start=False)
    job_id = submit(client, dataset_zip).json()["job_id"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    manager.store.register_worker("old", hostname(), dead.pid)
    claimed = manager.store.claim("old", hostname(), 1)
    progress = Path(claimed.job_dir) / f"progress-{claimed.attempts}.jsonl"
    progress.parent.mkdir(parents=True, exist_ok=True)
    progress.write_text(json.dumps({"event": "succeeded", "model": "colours:abc", "eval": {"accuracy": 1.0}}) + "\n")
    manager.start()  # start-up recovery
    final = job(client, job_id)
    assert final["state"] == "succeeded" and final["model"] == "colours:abc" and final["eval"] == {"accuracy": 1.0}
    assert "published on its own" in final["error"]


def test_two_workers_each_job_once(make_client, dataset_zip, ft_settings, monkeypatch):
    monkeypatch.setenv("TUNESERVE_FAKE_TRAIN_STEP_S", "0.05")
    settings = ft_settings.replace(max_concurrent_jobs=2)
    client_a, a = make_client(settings, start=False)
    client_b, b = make_client(settings, start=False)
    ids = [submit(client_a, dataset_zip, {"name": f"two{i}", "source": "simple_cnn:none", "epochs": 1}).json()["job_id"] for i in range(2)]
    a.start()
    b.start()
    finals = [wait_state(client_b, i, {"succeeded", "failed"}) for i in ids]
    assert [f["state"] for f in finals] == ["succeeded", "succeeded"]
    assert [f["attempts"] for f in finals] == [1, 1]
    for i in ids:  # each ran exactly one training process
        log = (settings.jobs_dir / i / "train.log").read_text()
        assert log.count("=== attempt") == 1 and log.count("fake training pid") == 1


def test_api_key_guards_mutating_routes(make_client, ft_settings, dataset_zip):
    client, _ = make_client(ft_settings.replace(auth=True, api_key="sekrit"), start=False)
    missing = submit(client, dataset_zip)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"  # service/auth.py's check
    assert submit(client, dataset_zip, headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = submit(client, dataset_zip, headers={"Authorization": "Bearer sekrit"})
    assert ok.status_code == 202
    job_id = ok.json()["job_id"]
    assert client.get(f"/finetune/{job_id}").status_code == 200  # reads stay open
    assert client.post(f"/finetune/{job_id}/cancel").status_code == 401
    assert client.post(f"/finetune/{job_id}/cancel", headers={"Authorization": "Bearer sekrit"}).status_code == 200
    guarded, _ = make_client(ft_settings.replace(auth=True, api_key="sekrit", protect_reads=True), start=False)
    assert guarded.get(f"/finetune/{job_id}").status_code == 401  # TUNESERVE_PROTECT_READS guards reads too
    assert guarded.get("/finetune", headers={"Authorization": "Bearer sekrit"}).status_code == 200


# ---- bad uploads: every one refused at submit time with a 4xx naming the problem ---------------
def _zip(entries: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for name, data in entries.items():
            bundle.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            bundle.writestr(info, target)
    return buffer.getvalue()


def _classes(n_classes=2, per_class=4, prefix=""):
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200)]
    return {f"{prefix}c{c}/{i}.png": png(colours[c]) for c in range(n_classes) for i in range(per_class)}


GOOD_CONFIG = {"name": "bad", "source": "simple_cnn:none", "epochs": 1}


@pytest.mark.parametrize(
    "case, data, config, status, message",
    [
        ("not a zip", b"this is not a zip", GOOD_CONFIG, 422, "not a valid zip"),
        ("zip-slip", _zip({**_classes(), "../evil.png": png((1, 2, 3))}), GOOD_CONFIG, 422, "unsafe path"),
        ("absolute path", _zip({**_classes(), "/etc/evil.png": png((1, 2, 3))}), GOOD_CONFIG, 422, "unsafe path"),
        ("link", _zip(_classes(), {"c0/link.png": "/etc/passwd"}), GOOD_CONFIG, 422, "links are not allowed"),
        ("too many entries", _zip({f"c{i % 2}/{i}.png": png((i, 0, 0)) for i in range(210)}), GOOD_CONFIG, 422, "entries; limit"),
        ("unpacked too large", _zip({**_classes(), "c0/big.bin": b"\0" * (5 * 1024**2)}), GOOD_CONFIG, 422, "unpacks to"),
        ("single class", _zip(_classes(1, 6)), GOOD_CONFIG, 422, "at least 2 classes"),
        ("too few per class", _zip({**_classes(2, 4), "c2/0.png": png((9, 9, 9))}), GOOD_CONFIG, 422, "too few"),
        ("undecodable image", _zip({**_classes(), "c1/broken.png": b"\x89PNG\r\n\x1a\nnot really"}), GOOD_CONFIG, 422, "c1/broken.png"),
        ("labels differ between splits", _zip({**_classes(2, 4, "train/"), **_classes(3, 4, "val/")}), GOOD_CONFIG, 422, "not in train"),
        ("empty archive", _zip({"readme.txt": b"hi"}), GOOD_CONFIG, 422, "no images found"),
        ("config not json", _zip(_classes()), "{nope", 422, "not valid JSON"),
        ("bad name", _zip(_classes()), {**GOOD_CONFIG, "name": "Bad Name!"}, 422, "name"),
        ("missing name", _zip(_classes()), {"source": "simple_cnn:none"}, 422, "name"),
        ("unknown source", _zip(_classes()), {**GOOD_CONFIG, "source": "nosuchmodel"}, 422, "neither a known backbone nor a stored model"),
        ("bad strategy", _zip(_classes()), {**GOOD_CONFIG, "strategy": "all"}, 422, "strategy"),
        ("epochs range", _zip(_classes()), {**GOOD_CONFIG, "epochs": 0}, 422, "epochs"),
        ("epochs type", _zip(_classes()), {**GOOD_CONFIG, "epochs": "3"}, 422, "epochs"),
        ("batch size", _zip(_classes()), {**GOOD_CONFIG, "batch_size": -1}, 422, "batch_size"),
        ("learning rate", _zip(_classes()), {**GOOD_CONFIG, "learning_rate": 0}, 422, "learning_rate"),
        ("image size", _zip(_classes()), {**GOOD_CONFIG, "image_size": 4}, 422, "image_size"),
        ("fractions", _zip(_classes()), {**GOOD_CONFIG, "val_fraction": 1.5}, 422, "val_fraction"),
        ("unknown field", _zip(_classes()), {**GOOD_CONFIG, "epoch": 3}, 422, "unknown"),
        ("server-owned field", _zip(_classes()), {**GOOD_CONFIG, "output_dir": "/tmp/x"}, 422, "set by the server"),
        ("config not an object", _zip(_classes()), [1, 2], 422, "JSON object"),
        ("weights file path", _zip(_classes()), {**GOOD_CONFIG, "source": "resnet18", "weights": "/etc/passwd"}, 422, "not a weights name"),
        ("weights path in source", _zip(_classes()), {**GOOD_CONFIG, "source": "resnet18:../../x.pt"}, 422, "not a weights name"),
        ("bad source version", _zip(_classes()), {**GOOD_CONFIG, "source": "digits:a/b"}, 422, "invalid model version"),
    ],
)
def test_bad_uploads_refused(make_client, case, data, config, status, message, ft_settings):
    client, manager = make_client(start=False)
    files = {"dataset": ("d.zip", data, "application/zip")}
    form = {"config": config if isinstance(config, str) else json.dumps(config)}
    response = client.post("/finetune", data=form, files=files)
    assert response.status_code == status, (case, response.text)
    assert message in response.json()["error"], (case, response.json())
    assert manager.store.list() == []  # nothing queued
    assert not any(ft_settings.jobs_dir.iterdir()) and not any(ft_settings.uploads_dir.iterdir())


def test_upload_size_and_request_shape(make_client, ft_settings, tmp_path):
    client, _ = make_client(start=False)
    huge = b"0" * (3 * 1024**2)
    response = client.post("/finetune", data={"config": json.dumps(GOOD_CONFIG)}, files={"dataset": ("d.zip", huge)})
    assert response.status_code == 413
    assert client.post("/finetune", json=GOOD_CONFIG).status_code == 415
    neither = submit(client, None, GOOD_CONFIG)
    assert neither.status_code == 400 and "exactly one" in neither.json()["error"]
    assert client.get("/finetune", params={"state": "bogus"}).status_code == 422
    assert client.get("/finetune/ft-20260101-000000-abcdef").status_code == 404
    assert client.get("/finetune/nope").status_code == 422


def test_data_path_inside_root_only(make_client, ft_settings, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESERVE_FAKE_TRAIN_STEP_S", "0.01")
    client, _ = make_client()
    make_dataset(ft_settings.data_root / "colours")
    make_dataset(tmp_path / "outside")
    for path, status in [("../outside", 403), (str(tmp_path / "outside"), 403), ("/etc", 403), ("missing", 404)]:
        response = submit(client, None, GOOD_CONFIG, data_path=path)
        assert response.status_code == status, (path, response.text)
    ok = submit(client, None, {**GOOD_CONFIG, "name": "frompath"}, data_path="colours")
    assert ok.status_code == 202, ok.text
    assert wait_state(client, ok.json()["job_id"], {"succeeded", "failed"})["state"] == "succeeded"
    assert (ft_settings.data_root / "colours" / "red").is_dir()  # a data_path dataset is never removed


def test_cancel_during_publish_reports_what_happened(make_client, ft_settings, dataset_zip, monkeypatch):
    """A cancel that races the publish: the worker lets the publish finish (within the grace
    period) and the job says `succeeded` with a note, never `cancelled` for a served model."""

    from models.artifact import store

    monkeypatch.setenv("TUNESERVE_FAKE_TRAIN_STEP_S", "0.01")
    monkeypatch.setenv("TUNESERVE_FAKE_TRAIN_PUBLISH_S", "1.0")
    # a grace period far longer than the publish, however busy the machine (the first publish imports bentoml)
    client, _ = make_client(ft_settings.replace(job_grace_seconds=60.0))
    job_id = submit(client, dataset_zip, {"name": "racy", "source": "simple_cnn:none", "epochs": 1}).json()["job_id"]
    wait_for(lambda: job(client, job_id)["phase"] == "publishing", 20, 0.02, "publishing phase")
    assert client.post(f"/finetune/{job_id}/cancel").status_code == 202
    final = wait_state(client, job_id, {"succeeded", "cancelled", "failed"})
    assert final["state"] == "succeeded" and "after the model version was published" in final["error"]
    assert final["model"] and store.resolve(final["model"])
