"""Fine-tune quotas (service/finetune/quotas.py) in process: queued + running jobs per key and in
total (429 + Retry-After), the disk budget (507 before the upload is stored), retention of finished
jobs' scratch, the submitting key recorded on the job, and job-database writes that fail."""
from __future__ import annotations

import io
import sqlite3
import zipfile

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.finetune import JobManager
from service.routes.finetune import build_router
from service.finetune.quotas import expire_scratch
from models.data.datasets import MIB
from service.config import Settings
from service.finetune.store import JobStore
from tests.finetune_support import FAKE_COMMAND, make_dataset, submit, wait_for, zip_dir

KEYS = {"alice": "alice-key-0123456789abcdef", "bob": "bob-key-0123456789abcdefgh", "carol": "carol-key-0123456789abcdef"}


@pytest.fixture
def settings(tmp_path, bento_home):
    return Settings.of(
        home=tmp_path / "home", api_keys=tuple(KEYS.items()), job_grace_seconds=2.0, poll_seconds=0.1,
        training_command=FAKE_COMMAND, finetune_min_per_class=3, max_jobs_per_key=1, max_jobs_total=2,
    )


@pytest.fixture
def dataset(tmp_path):
    return zip_dir(make_dataset(tmp_path / "colours"))


@pytest.fixture
def serve():
    managers = []

    def make(settings, start=False):
        manager = JobManager(settings)
        if start:
            manager.start()
        managers.append(manager)
        app = FastAPI()
        app.include_router(build_router(manager, settings))
        return TestClient(app), manager

    yield make
    for manager in managers:
        manager.stop(timeout=10)


def _as(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def test_jobs_per_key_and_in_total(serve, settings, dataset):
    client, manager = serve(settings)  # not started: jobs stay queued, and queued jobs count
    first = submit(client, dataset, headers=_as("alice"))
    assert first.status_code == 202 and first.json()["state"] == "queued"
    assert manager.store.get(first.json()["job_id"]).submitted_by == "alice"
    assert client.get(f"/finetune/{first.json()['job_id']}").json()["submitted_by"] == "alice"

    again = submit(client, dataset, headers=_as("alice"))
    assert again.status_code == 429 and "TUNESERVE_MAX_JOBS_PER_KEY" in again.json()["error"]
    assert int(again.headers["retry-after"]) > 0 and again.headers["x-tuneserve-limit"] == "TUNESERVE_MAX_JOBS_PER_KEY"

    assert submit(client, dataset, headers=_as("bob")).status_code == 202
    full = submit(client, dataset, headers=_as("carol"))
    assert full.status_code == 429 and full.headers["x-tuneserve-limit"] == "TUNESERVE_MAX_JOBS_TOTAL"
    assert "2 queued or running jobs" in full.json()["error"]
    assert len(manager.store.list()) == 2 and not list(settings.uploads_dir.iterdir())

    # a finished job frees its slot; resuming it takes one again
    assert client.post(f"/finetune/{first.json()['job_id']}/cancel", headers=_as("alice")).status_code == 200
    assert submit(client, dataset, headers=_as("carol")).status_code == 202
    resumed = client.post(f"/finetune/{first.json()['job_id']}/resume", headers=_as("alice"))
    assert resumed.status_code == 429 and resumed.headers["x-tuneserve-limit"] == "TUNESERVE_MAX_JOBS_TOTAL"


def test_disk_budget_refuses_before_storing(serve, settings, dataset, tmp_path):
    tight = settings.replace(finetune_disk_budget_mb=len(dataset) // 2 / MIB)
    client, manager = serve(tight)
    refused = submit(client, dataset, headers=_as("alice"))
    assert refused.status_code == 507 and "TUNESERVE_FINETUNE_DISK_BUDGET_MB" in refused.json()["error"]
    assert manager.store.list() == [] and not list(tight.uploads_dir.iterdir()) and not list(tight.jobs_dir.iterdir())

    # the zip fits but what it unpacks to does not: refused after the upload, before extraction
    buffer = io.BytesIO(dataset)
    with zipfile.ZipFile(buffer, "a", compression=zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("notes.txt", b"0" * 1024**2)  # compresses to about 1 KB
    bomb = buffer.getvalue()
    roomy = settings.replace(finetune_disk_budget_mb=(len(bomb) + 256 * 1024) / MIB)
    client, manager = serve(roomy)
    unpacked = submit(client, bomb, headers=_as("alice"))
    assert unpacked.status_code == 507 and "budget" in unpacked.json()["error"]
    assert manager.store.list() == [] and not list(roomy.uploads_dir.iterdir()) and not list(roomy.jobs_dir.iterdir())


def test_retention_removes_scratch_of_ended_jobs_only(serve, settings, dataset, monkeypatch):
    from models.artifact import store as model_store

    monkeypatch.setenv("TUNESERVE_FAKE_TRAIN_STEP_S", "0.01")
    client, manager = serve(settings, start=True)
    failed = submit(client, dataset, {"name": "fail-me", "source": "simple_cnn:none", "epochs": 1}, headers=_as("alice")).json()["job_id"]
    done = submit(client, dataset, {"name": "kept", "source": "simple_cnn:none", "epochs": 1}, headers=_as("bob")).json()["job_id"]
    for job_id in (failed, done):
        wait_for(lambda: manager.store.get(job_id).state in ("failed", "succeeded"), 30, what=f"{job_id} ends")
    failed_dir = settings.jobs_dir / failed
    assert (failed_dir / "dataset").is_dir()  # a failed job keeps its data: it can be resumed
    published = manager.store.get(done).model

    first, ended = sorted(manager.store.get(j).finished for j in (failed, done))
    assert expire_scratch(manager.store, settings, now=first + settings.retention_seconds - 1) == []
    assert sorted(expire_scratch(manager.store, settings, now=ended + settings.retention_seconds + 1)) == sorted([failed, done])
    assert not (failed_dir / "dataset").exists() and (failed_dir / "train.log").exists()
    assert client.get(f"/finetune/{failed}").json()["scratch_removed"] is not None
    assert model_store.resolve(published).path.is_dir()  # published versions are never removed
    assert expire_scratch(manager.store, settings, now=ended + 10 * settings.retention_seconds) == []  # once each
    gone = client.post(f"/finetune/{failed}/resume", headers=_as("alice"))
    assert gone.status_code == 409 and "dataset is gone" in gone.json()["error"]


def test_job_database_full_at_submit_is_507_and_leaves_nothing(serve, settings, dataset, monkeypatch):
    client, manager = serve(settings)

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(manager.store, "create", full)
    refused = submit(client, dataset, headers=_as("alice"))
    assert refused.status_code == 507 and "nothing was queued" in refused.json()["error"]
    assert not list(settings.uploads_dir.iterdir()) and not list(settings.jobs_dir.iterdir())


def test_failed_outcome_write_is_retried_not_lost(serve, settings, dataset, monkeypatch):
    """The job database refuses writes (a full disk) when the job ends: progress updates are
    skipped, the outcome is retried until the database takes it, and the job never sticks in `running`."""
    monkeypatch.setenv("TUNESERVE_FAKE_TRAIN_STEP_S", "0.01")
    client, manager = serve(settings)
    refusals = {"finish": 2, "update_progress": 1}
    for name in refusals:
        original = getattr(JobStore, name)

        def failing(self, *args, _name=name, _original=original, **kwargs):
            if refusals[_name] > 0:
                refusals[_name] -= 1
                raise sqlite3.OperationalError("database or disk is full")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(JobStore, name, failing)
    job_id = submit(client, dataset, {"name": "stubborn", "source": "simple_cnn:none", "epochs": 1}, headers=_as("alice")).json()["job_id"]
    manager.start()
    final = wait_for(lambda: (j := manager.store.get(job_id)).state != "running" and j.state != "queued" and j, 30, what="outcome")
    assert final.state == "succeeded" and final.model and refusals == {"finish": 0, "update_progress": 0}


def test_running_job_stops_below_the_free_space_floor(serve, settings, dataset, monkeypatch):
    """Job scratch never fills the disk: below TUNESERVE_FINETUNE_MIN_FREE_MB a running job is
    stopped and failed (resumable), nothing published; with room again it resumes to success."""
    import shutil

    monkeypatch.setenv("TUNESERVE_FAKE_TRAIN_STEP_S", "0.05")
    client, manager = serve(settings)
    job_id = submit(client, dataset, {"name": "roomy", "source": "simple_cnn:none", "epochs": 2}, headers=_as("alice")).json()["job_id"]
    floor = shutil.disk_usage(settings.jobs_root).free + 1024**3  # for this worker the disk is already too full
    _, cramped = serve(settings.replace(finetune_min_free_mb=floor / MIB), start=True)
    stopped = wait_for(lambda: (j := manager.store.get(job_id)).state not in ("queued", "running") and j, 30, what="the stop")
    assert stopped.state == "failed" and "free-space floor" in stopped.error and stopped.model is None
    cramped.stop(timeout=10)

    assert client.post(f"/finetune/{job_id}/resume", headers=_as("alice")).status_code == 202
    manager.start()
    done = wait_for(lambda: (j := manager.store.get(job_id)).state not in ("queued", "running") and j, 30, what="the resume")
    assert done.state == "succeeded" and done.model.startswith("roomy:")


def test_finetune_from_feedback_is_charged_to_the_disk_budget(tmp_path, bento_home, monkeypatch):
    """The feedback dataset a retrain builds counts in the budget, as an upload to /finetune does: over
    it, 507 and the job folder is gone."""
    from types import SimpleNamespace

    from service.finetune.quotas import InsufficientStorage
    from service.loop import retrain
    from service.routes import loop_retrain

    def prepare(db, model, version, destination, with_training_data):
        (destination / "cat").mkdir(parents=True)
        (destination / "cat" / "0.png").write_bytes(bytes(2 * MIB))  # 2 MiB of feedback images
        return {"source": f"{model}:{version}", "feedback": 1, "training_images": 0}

    monkeypatch.setattr(retrain, "prepare", prepare)
    kind = SimpleNamespace(id_prefix="ft", validate=lambda config: config)  # no stored source model needed here
    monkeypatch.setattr(loop_retrain, "kind_named", lambda name: kind)
    settings = Settings.of(home=tmp_path / "home", finetune_disk_budget_mb=1.0, finetune_min_free_mb=0)
    manager = SimpleNamespace(settings=settings)
    body = loop_retrain.RetrainIn(with_training_data=False)
    with pytest.raises(InsufficientStorage, match="budget"):
        loop_retrain.submit_retrain(manager, SimpleNamespace(db=None), "pets", "v1", body, "alice")
    assert not settings.jobs_dir.exists() or not any(settings.jobs_dir.iterdir())
