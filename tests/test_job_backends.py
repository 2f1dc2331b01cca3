"""Job backends without a cluster: the Ray translation (entrypoint, environment, exit codes,
resources), the choice of backend from the settings, and the 501 that a server which cannot
train answers on every /finetune route. The Ray cluster itself: tests/test_ray_jobs.py (slow)."""
from __future__ import annotations

import importlib.util
import shlex
import signal
import subprocess
import sys

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.config import Settings, SettingsError, load_settings
from service.finetune import backends
from service.finetune.backends import Launch, LocalBackend, RayBackend, make_backend, ray_entrypoint, ray_env_vars, ray_exit_code
from service.finetune.outcome import judge
from service.finetune.runner import JobManager, JobTrace, Stopping
from service.finetune.job_record import Job


def _launch(tmp_path, **extra) -> Launch:
    return Launch(job_id="ft-1", attempt=2, command=[sys.executable, "-m", "training.run", "--config", str(tmp_path / "my dir" / "c.json")],
                  cwd=tmp_path / "my dir", log_path=tmp_path / "train.log", env={"TUNESERVE_JOB_ID": "ft-1"}, **extra)


def test_ray_entrypoint_runs_in_the_job_folder_and_survives_spaces(tmp_path):
    launch = _launch(tmp_path)
    launch.cwd.mkdir()
    probe = Launch(job_id="ft-1", attempt=1, command=["sh", "-c", 'pwd; printf "%s\\n" "$1"', "sh", "two words; rm -rf x"],
                   cwd=launch.cwd, log_path=launch.log_path, env={})
    done = subprocess.run(["sh", "-c", ray_entrypoint(probe)], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == [str(launch.cwd), "two words; rm -rf x"]
    assert ray_entrypoint(launch).startswith(f"cd {shlex.quote(str(launch.cwd))} && exec ")


def test_ray_job_environment_forwards_the_store_never_the_api_key(tmp_path):
    environ = {"BENTOML_HOME": "/store", "TUNESERVE_HOME": "/state", "TUNESERVE_API_KEY": "secret",
               "HOME": "/root", "PYTHONPATH": "/extra"}
    env = ray_env_vars(_launch(tmp_path), environ)
    assert env["BENTOML_HOME"] == "/store" and env["TUNESERVE_HOME"] == "/state" and env["TUNESERVE_JOB_ID"] == "ft-1"
    assert "TUNESERVE_API_KEY" not in env and "HOME" not in env
    assert env["PYTHONPATH"].split(":") == [str(backends.PROJECT_ROOT), "/extra"]


@pytest.mark.parametrize("status, code, ours, expected", [
    ("SUCCEEDED", 0, False, 0),
    ("JobStatus.SUCCEEDED", None, False, 0),
    ("FAILED", 2, False, 2),  # the trainer's own exit code: bad data
    ("FAILED", None, False, 1),  # e.g. the runtime environment could not be set up
    ("STOPPED", None, True, -signal.SIGTERM),  # our cancel or shutdown
    ("STOPPED", None, False, -signal.SIGTERM),  # someone stopped it through Ray: treated as an outside SIGTERM
])
def test_ray_status_becomes_an_exit_code(status, code, ours, expected):
    assert ray_exit_code(status, code, ours) == expected


def test_outside_stop_is_interrupted_not_failed(tmp_path):
    """A Ray job stopped by someone else ends like a local child SIGTERMed from outside: resumable."""
    code = ray_exit_code("STOPPED", None, False)
    state, model, _, error = judge(code, JobTrace(progress={}), Stopping(), tmp_path / "none.log")
    assert state == "interrupted" and model is None and "resume" in error


def test_lost_ray_node_is_interrupted_not_failed(tmp_path):
    """The node running the trainer died (Ray: the job's supervisor actor died with it): resumable."""
    code = ray_exit_code("FAILED", None, False, "JobErrorType.JOB_SUPERVISOR_ACTOR_DIED")
    state, _, _, error = judge(code, JobTrace(progress={}), Stopping(), tmp_path / "none.log")
    assert state == "interrupted" and "resume" in error
    assert ray_exit_code("FAILED", 2, False, "JOB_ENTRYPOINT_COMMAND_ERROR") == 2  # the trainer's own failure stays one


def _settings(tmp_path, **changes) -> Settings:
    return Settings.of(home=tmp_path / "home", **changes)  # the job child: this Python -m training.run


@pytest.mark.parametrize("device, setting, gpus", [("auto", 0.0, 0.0), ("auto", 2.0, 2.0), ("cuda", 0.0, 1.0), ("cpu", 1.0, 0.0)])
def test_launch_asks_for_the_gpus_the_job_needs(tmp_path, device, setting, gpus):
    manager = JobManager(_settings(tmp_path, job_backend="ray", ray_address="http://head:8265", ray_num_gpus=setting, ray_num_cpus=3))
    job_dir = tmp_path / "job"
    job = Job(id="ft-9", state="running", config={"name": "n", "device": device}, dataset_dir=str(tmp_path / "data"),
              job_dir=str(job_dir), created=0.0, attempts=1, resume=True)
    launch = manager.launch(job)
    assert (launch.num_gpus, launch.num_cpus) == (gpus, 3)
    assert launch.command[-1] == "--resume" and launch.cwd == job_dir and (job_dir / "config.json").exists()
    assert isinstance(manager.backend, RayBackend) and manager.backend.address == "http://head:8265"


def test_backend_choice_and_bad_values():
    assert isinstance(make_backend("local"), LocalBackend)
    assert load_settings({"TUNESERVE_JOB_BACKEND": "RAY", "TUNESERVE_RAY_NUM_GPUS": "1"}).job_backend == "ray"
    with pytest.raises(SettingsError, match="TUNESERVE_JOB_BACKEND='k8s': expected one of local, ray, none"):
        load_settings({"TUNESERVE_JOB_BACKEND": "k8s"})
    with pytest.raises(ValueError, match="known: local, ray, none"):
        make_backend("k8s")


def test_unreachable_ray_fails_the_job_with_the_address(tmp_path):
    backend = RayBackend("http://127.0.0.1:9")  # nothing listens on the discard port
    (tmp_path / "my dir").mkdir()
    with pytest.raises(backends.BackendError, match="127.0.0.1:9"):
        backend.start(_launch(tmp_path))


def _app(settings):
    from service.app import mount_jobs

    app = FastAPI()
    return app, mount_jobs(app, settings)


def test_jobs_off_answer_501_naming_the_backend(tmp_path):
    settings = load_settings({"TUNESERVE_HOME": str(tmp_path / "home"), "TUNESERVE_JOB_BACKEND": "none"})
    app, manager = _app(settings)
    assert manager is None
    client = TestClient(app)
    for method, path in [("post", "/finetune"), ("get", "/finetune"), ("get", "/finetune/ft-1"), ("post", "/finetune/ft-1/cancel"),
                         ("delete", "/finetune/ft-1")]:
        answer = getattr(client, method)(path)
        assert answer.status_code == 501, (method, path)
        assert "TUNESERVE_JOB_BACKEND=ray" in answer.json()["error"] and "TUNESERVE_RAY_ADDRESS" in answer.json()["error"]


def test_serve_only_server_without_training_answers_501(tmp_path, monkeypatch):
    """What a serve-only image looks like to the service: no `training`, no torch."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("training", "torch") else real(name, *a))
    settings = load_settings({"TUNESERVE_HOME": str(tmp_path / "home")})
    app, manager = _app(settings)
    answer = TestClient(app).post("/finetune")
    assert manager is None and answer.status_code == 501
    assert "serve-only" in answer.json()["error"] and "TUNESERVE_JOB_BACKEND=ray" in answer.json()["error"]
    # with Ray configured the same server hands jobs to the cluster instead
    ray_settings = load_settings({"TUNESERVE_HOME": str(tmp_path / "home"), "TUNESERVE_JOB_BACKEND": "ray"})
    app, manager = _app(ray_settings)
    assert isinstance(manager.backend, RayBackend)
    assert TestClient(app).get("/finetune").status_code == 200


def test_service_imports_ray_only_for_the_ray_backend(tmp_path):
    """A serving worker with the local backend never loads Ray (import cost, memory)."""
    code = (
        "import sys\n"
        "from service.app import create_app, mount_jobs\n"
        "from service.config import load_settings\n"
        f"settings = load_settings({{'TUNESERVE_HOME': {str(tmp_path / 'home')!r}}})\n"
        "manager = mount_jobs(create_app(settings), settings)\n"
        "assert manager is not None\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=backends.PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
