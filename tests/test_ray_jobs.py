"""Fine-tune jobs on a real Ray cluster (TUNESERVE_JOB_BACKEND=ray), started by the test.

A real `bentoml serve` (two workers) hands each claimed job to Ray's Job Submission API; the job
database stays the source of truth. End to end with real training: submit over HTTP → the
trainer runs as a Ray job → publishes into the store both sides see → the replica serves it.
With the fake trainer: exactly one Ray submission per job attempt with two workers, cancel
(the Ray job is stopped, nothing published), a trainer failure, a server stopped mid-job →
`interrupted` (its Ray job stopped) → resumed as a second attempt, and a server killed (-9)
during that attempt: the Ray job finishes on its own and the restarted server records it.
"""
from __future__ import annotations

import signal
import sys
import time

import pytest

from tests.finetune_support import FAKE_COMMAND, make_dataset, png, wait_for, zip_dir
from tests.ray_cluster import local_ray
from tests.test_finetune_server import _job, _submit, _wait_state, home, serve  # noqa: F401 (home is a fixture)

pytestmark = pytest.mark.slow
pytest.importorskip("ray.job_submission")


@pytest.fixture(scope="module")
def ray_url():
    with local_ray(num_cpus=2) as url:
        yield url


def _ray_jobs(url: str, job_id: str) -> dict[str, str]:
    """submission id → Ray status, for the submissions of one tuneserve job."""
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(url).list_jobs()
    return {j.submission_id: str(j.status).rsplit(".", 1)[-1] for j in jobs if (j.metadata or {}).get("tuneserve_job") == job_id}


def _env(home, ray_url, **extra):
    return {**home, "TUNESERVE_JOB_BACKEND": "ray", "TUNESERVE_RAY_ADDRESS": ray_url, "TUNESERVE_WORKERS": "2", **extra}


def _timeline(job: dict) -> str:
    created = job["created"]
    marks = [f"queued 0.0 s", f"running {job['started'] - created:.1f} s", f"{job['state']} {job['finished'] - created:.1f} s"]
    return ", ".join(marks)


def test_real_training_runs_on_ray_and_is_served(home, ray_url, tmp_path):
    data = zip_dir(make_dataset(tmp_path / "colours", per_class=8))
    env = _env(home, ray_url, TUNESERVE_TRAINING_COMMAND=f"{sys.executable} -m training.run")
    config = {"name": "onray", "source": "simple_cnn:none", "strategy": "full", "epochs": 1, "batch_size": 8, "image_size": 16}
    with serve(env, tmp_path / "server.log") as (client, _):
        job_id = _submit(client, data, config)
        job = _wait_state(client, job_id, {"succeeded", "failed", "cancelled", "interrupted"}, 240)
        log = client.get(f"/finetune/{job_id}/log", params={"lines": 400}).text
        assert job["state"] == "succeeded", log
        # it ran as a Ray job: one submission, the Ray driver's own log lines copied into train.log
        assert _ray_jobs(ray_url, job_id) == {f"tuneserve-{job_id}-1": "SUCCEEDED"}
        assert f"[ray] submitted tuneserve-{job_id}-1" in log and "Running entrypoint for job" in log
        name, version = job["model"].split(":")
        answer = wait_for(
            lambda: (r := client.post("/classify", data={"model": name}, files={"image": ("g.png", png((20, 200, 20)), "image/png")}))
            .status_code == 200 and r.json(), 20, 0.3, "the replica serving the Ray-trained model")
        assert answer["version"] == version
        assert version in [v["version"] for v in client.get("/models").json()["models"][name]["versions"]]
        print(f"\nRay job timeline ({job_id}): {_timeline(job)}; phases in train.log; eval {job['eval']}")


def test_ray_backend_claims_once_cancels_fails_and_resumes(home, ray_url, tmp_path):
    data = zip_dir(make_dataset(tmp_path / "colours"))
    env = _env(home, ray_url, TUNESERVE_TRAINING_COMMAND=FAKE_COMMAND, TUNESERVE_MAX_CONCURRENT_JOBS="2")
    with serve(env, tmp_path / "server.log") as (client, _):
        ids = [_submit(client, data, {"name": f"twin{i}", "source": "simple_cnn:none", "epochs": 2}) for i in range(2)]
        finals = [_wait_state(client, i, {"succeeded", "failed", "cancelled", "interrupted"}, 90) for i in ids]
        assert [f["state"] for f in finals] == ["succeeded", "succeeded"], finals
        for job_id in ids:  # two workers poll the same database: one claim, one Ray submission each
            assert _ray_jobs(ray_url, job_id) == {f"tuneserve-{job_id}-1": "SUCCEEDED"}

        doomed = _submit(client, data, {"name": "doomed", "source": "simple_cnn:none", "epochs": 100})
        wait_for(lambda: _job(client, doomed)["progress"].get("step"), 60, 0.2, "doomed training on Ray")
        assert client.post(f"/finetune/{doomed}/cancel").status_code == 202
        cancelled = _wait_state(client, doomed, {"cancelled", "failed", "succeeded", "interrupted"}, 60)
        assert cancelled["state"] == "cancelled", cancelled
        assert _ray_jobs(ray_url, doomed) == {f"tuneserve-{doomed}-1": "STOPPED"}
        assert "doomed" not in client.get("/models").json()["models"]

        broken = _submit(client, data, {"name": "failing", "source": "simple_cnn:none", "epochs": 1})
        failed = _wait_state(client, broken, {"failed", "succeeded"}, 60)
        assert failed["state"] == "failed" and "bad data" in failed["error"], failed

        long_job = _submit(client, data, {"name": "phoenix", "source": "simple_cnn:none", "epochs": 60})
        wait_for(lambda: (_job(client, long_job)["progress"].get("epochs_done") or 0) >= 1, 60, 0.2, "an epoch on Ray")
    # the server stopped (SIGTERM) mid-job: the job is interrupted and its Ray job stopped
    with serve(env, tmp_path / "server2.log") as (client, process):
        interrupted = _wait_state(client, long_job, {"interrupted"}, 30)
        assert "resume" in interrupted["error"]
        wait_for(lambda: _ray_jobs(ray_url, long_job).get(f"tuneserve-{long_job}-1") == "STOPPED", 30, 0.5, "Ray job stopped")
        assert client.post(f"/finetune/{long_job}/resume").status_code == 202
        second = f"tuneserve-{long_job}-2"
        wait_for(lambda: _ray_jobs(ray_url, long_job).get(second) == "RUNNING", 60, 0.2, "attempt 2 running on Ray")
        _kill_server(process)  # kill -9: no shutdown hooks; the Ray job runs on without its worker
    wait_for(lambda: _ray_jobs(ray_url, long_job).get(second) == "SUCCEEDED", 120, 0.5, "attempt 2 finishing on Ray")
    with serve(env, tmp_path / "server3.log") as (client, _):
        # start-up recovery finds the job's worker gone and records what the trainer did: published
        resumed = _wait_state(client, long_job, {"succeeded", "failed", "cancelled", "interrupted"}, 30)
        assert resumed["state"] == "succeeded" and resumed["attempts"] == 2, resumed
        assert resumed["model"].startswith("phoenix:") and "published on its own" in resumed["error"]
        assert _ray_jobs(ray_url, long_job) == {f"tuneserve-{long_job}-1": "STOPPED", second: "SUCCEEDED"}


def _kill_server(process) -> None:
    import psutil

    arbiter = psutil.Process(process.pid)
    workers = [p for p in arbiter.children(recursive=True) if "_bentoml_impl" in " ".join(p.cmdline())]
    for proc in [arbiter, *workers]:
        proc.kill()
    process.wait(30)
