"""Fine-tune jobs against a real `bentoml serve` of service.service:TuneServe.

- two workers, two jobs at once: each runs exactly once; progress advances; the new versions
  answer /classify and appear in /models; kill -9 of a child → failed with a reason while the
  server keeps serving; cancel while running → no version published (fake trainer)
- a server killed during a job → the job is `interrupted` after restart, then resumed to success
- chaining with REAL training (simple_cnn at 16 px): the second job's source is the first job's
  model, and the manifest records the lineage
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from models.serving.api_keys import client_key
from service.config import key_settings
from tests.finetune_support import FAKE_COMMAND, make_dataset, png, wait_for, zip_dir
from tests.serving import free_port
from tests.tiny import write_tiny_model

pytestmark = pytest.mark.slow
httpx = pytest.importorskip("httpx")
ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def serve(env_extra: dict[str, str], log_path: Path, kill_at_exit=True):
    port = free_port()
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "TUNESERVE_POLL_SECONDS": "0.5", **env_extra}
    log = log_path.open("a")
    process = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "service.service:TuneServe", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get("/readyz").status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready: {log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        # keys are on by default: the server created one under TUNESERVE_HOME; read it as a local client does
        key = client_key(str(client.base_url), key_settings(env))
        assert key, "the server should have written its default key file"
        client.headers["Authorization"] = f"Bearer {key}"
        yield client, process
    finally:
        client.close()
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        log.close()


@pytest.fixture
def home(tmp_path, bento_home):
    from models.artifact import store

    store.publish("imagenet", write_tiny_model(tmp_path / "stage", accuracy=0.9))
    return {
        "BENTOML_HOME": str(bento_home),
        "TUNESERVE_HOME": str(tmp_path / "home"),
        "TUNESERVE_DATA_ROOT": str(tmp_path / "data"),
        "TUNESERVE_JOB_GRACE_SECONDS": "2",
        "TUNESERVE_FINETUNE_MIN_PER_CLASS": "3",
    }


def _submit(client, data: bytes, config: dict) -> str:
    response = client.post("/finetune", data={"config": json.dumps(config)}, files={"dataset": ("d.zip", data, "application/zip")})
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def _job(client, job_id):
    return client.get(f"/finetune/{job_id}").json()


def _wait_state(client, job_id, states, timeout=60):
    return wait_for(lambda: (j := _job(client, job_id)) and j["state"] in states and j, timeout, 0.2, f"{job_id} in {states}")


def test_jobs_on_real_server(home, tmp_path):
    data = zip_dir(make_dataset(tmp_path / "colours"))
    env = {**home, "TUNESERVE_WORKERS": "2", "TUNESERVE_MAX_CONCURRENT_JOBS": "2",
           "TUNESERVE_TRAINING_COMMAND": FAKE_COMMAND, "TUNESERVE_FAKE_TRAIN_STEP_S": "0.15"}
    with serve(env, tmp_path / "server.log") as (client, _):
        ids = [_submit(client, data, {"name": f"colours{i}", "source": "simple_cnn:none", "epochs": 3}) for i in range(2)]
        percents = set()
        wait_for(lambda: percents.add(_job(client, ids[0])["progress"].get("percent")) or len(percents - {None}) >= 3,
                 30, 0.05, "advancing progress")
        finals = [_wait_state(client, i, {"succeeded", "failed"}) for i in ids]
        assert [f["state"] for f in finals] == ["succeeded", "succeeded"], finals
        assert [f["attempts"] for f in finals] == [1, 1]
        for i in ids:  # exactly one training process per job, however many workers
            log = client.get(f"/finetune/{i}/log", params={"lines": 500}).text
            assert log.count("fake training pid") == 1, log
        name, version = finals[0]["model"].split(":")
        answer = wait_for(lambda: (r := client.post("/classify", data={"model": name}, files={"image": ("r.png", png((230, 10, 10)), "image/png")}))
                          .status_code == 200 and r.json(), 20, 0.3, "the new model answering /classify")
        assert answer["version"] == version and answer["model"] == name
        models = client.get("/models").json()["models"]
        assert version in [v["version"] for v in models[name]["versions"]]
        assert [j["job_id"] for j in client.get("/finetune", params={"state": "succeeded"}).json()["jobs"]] == ids[::-1]

        # kill -9 of the training child: the job fails with a reason, the server keeps serving
        victim = _submit(client, data, {"name": "victim", "source": "simple_cnn:none", "epochs": 100})
        wait_for(lambda: _job(client, victim)["progress"].get("step"), 30, 0.1, "victim training")
        pids = subprocess.run(["pgrep", "-f", f"jobs/{victim}/config.json"], capture_output=True, text=True).stdout.split()
        assert pids
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        failed = _wait_state(client, victim, {"failed", "succeeded", "cancelled", "interrupted"}, 30)
        assert failed["state"] == "failed" and "signal 9" in failed["error"], failed
        assert client.get("/readyz").status_code == 200
        assert client.post("/classify", files={"image": ("r.png", png((230, 10, 10)), "image/png")}).status_code == 200

        # cancel while running: no version published
        doomed = _submit(client, data, {"name": "doomed", "source": "simple_cnn:none", "epochs": 100})
        wait_for(lambda: _job(client, doomed)["progress"].get("step"), 30, 0.1, "doomed training")
        assert client.post(f"/finetune/{doomed}/cancel").status_code == 202
        cancelled = _wait_state(client, doomed, {"cancelled", "failed", "succeeded"}, 30)
        assert cancelled["state"] == "cancelled"
        assert "doomed" not in client.get("/models").json()["models"]

        # the CLI client: zips the folder, submits, follows with a progress bar to the end
        server = str(client.base_url)
        cli = [sys.executable, "-m", "tuneserve", "finetune", "--server", server]
        cli_env = {**os.environ, **home}  # the server's home: the CLI finds the key file there by itself
        cli_env.pop("TUNESERVE_API_KEY", None)
        done = subprocess.run([*cli, "--data", str(tmp_path / "colours"), "--name", "viacli", "--source", "simple_cnn:none",
                               "--epochs", "1", "--set", "hflip=false", "--follow", "--interval", "0.3"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120, env=cli_env)
        assert done.returncode == 0, done.stderr
        assert "succeeded → viacli:" in done.stdout and "100%" in done.stderr
        listing = subprocess.run([*cli, "list", "--state", "cancelled"], cwd=ROOT, capture_output=True, text=True, timeout=60, env=cli_env)
        assert doomed in listing.stdout
        status = subprocess.run([*cli, "status", victim], cwd=ROOT, capture_output=True, text=True, timeout=60, env=cli_env)
        assert json.loads(status.stdout)["state"] == "failed"
        again = subprocess.run([*cli, "cancel", victim], cwd=ROOT, capture_output=True, text=True, timeout=60, env=cli_env)
        assert again.returncode == 2 and "409" in again.stderr


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_server_stopped_during_job_then_resumed(home, tmp_path, how):
    data = zip_dir(make_dataset(tmp_path / "colours"))
    env = {**home, "TUNESERVE_TRAINING_COMMAND": FAKE_COMMAND, "TUNESERVE_FAKE_TRAIN_STEP_S": "0.25"}
    with serve(env, tmp_path / "server1.log") as (client, process):
        job_id = _submit(client, data, {"name": "phoenix", "source": "simple_cnn:none", "epochs": 6})
        wait_for(lambda: (_job(client, job_id)["progress"].get("epochs_done") or 0) >= 2, 30, 0.1, "two epochs")
        if how == "sigterm":  # a graceful stop: each worker ends its jobs and marks them interrupted
            process.terminate()
        else:  # the whole server (arbiter and its workers, which run in their own sessions), no
            # shutdown hooks; the training child is left to the kernel's parent-death signal
            import psutil

            def command_line(proc) -> str:  # a child that just exited is a zombie: no command line
                try:
                    return " ".join(proc.cmdline())
                except psutil.Error:
                    return ""

            arbiter = psutil.Process(process.pid)
            workers = [p for p in arbiter.children(recursive=True) if "_bentoml_impl" in command_line(p)]
            for proc in [arbiter, *workers]:
                proc.kill()
        process.wait(30)
    time.sleep(1.0)
    assert not subprocess.run(["pgrep", "-f", f"jobs/{job_id}/config.json"], capture_output=True).stdout  # child ended too
    with serve(env, tmp_path / "server2.log") as (client, _):
        interrupted = _wait_state(client, job_id, {"interrupted"}, 20)
        assert "resume" in interrupted["error"]
        assert client.post(f"/finetune/{job_id}/resume").status_code == 202
        final = _wait_state(client, job_id, {"succeeded", "failed"}, 60)
        assert final["state"] == "succeeded" and final["attempts"] == 2
        resumed_from = int((Path(home["TUNESERVE_HOME"]) / "finetune" / "jobs" / job_id / "output" / "resumed_from.txt").read_text())
        assert resumed_from >= 2
        assert "phoenix" in client.get("/models").json()["models"]


def test_chained_real_training(home, tmp_path):
    from models.artifact import store

    data = zip_dir(make_dataset(tmp_path / "colours", per_class=8))
    env = {**home, "TUNESERVE_TRAINING_COMMAND": f"nice -n 5 {sys.executable} -m training.run"}
    base = {"strategy": "full", "epochs": 2, "batch_size": 8, "image_size": 16}
    with serve(env, tmp_path / "server.log") as (client, _):
        first = _submit(client, data, {"name": "stage1", "source": "simple_cnn:none", **base})
        one = _wait_state(client, first, {"succeeded", "failed"}, 150)
        assert one["state"] == "succeeded", client.get(f"/finetune/{first}/log").text
        second = _submit(client, data, {"name": "stage2", "source": "stage1", **base, "epochs": 1})
        two = _wait_state(client, second, {"succeeded", "failed"}, 150)
        assert two["state"] == "succeeded", client.get(f"/finetune/{second}/log").text
        manifest = store.resolve(two["model"]).manifest()
        assert manifest.source == one["model"]
        assert one["model"] in manifest.lineage
        answer = client.post("/classify", data={"model": "stage2"}, files={"image": ("g.png", png((10, 220, 10)), "image/png")})
        assert answer.status_code == 200 and answer.json()["version"] == two["model"].split(":")[1]


def test_real_training_interrupted_then_resumed(tmp_path, bento_home):
    """The real trainer under the job manager: stopped after two of five epochs (a shutdown),
    then resumed; training.run --resume continues from last.pt at epoch 3."""

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from service.finetune import JobManager
    from service.routes.finetune import build_router
    from service.config import Settings

    settings = Settings.of(home=tmp_path / "home", auth=False, job_grace_seconds=10, poll_seconds=0.2,
                           training_command=f"nice -n 5 {sys.executable} -m training.run", finetune_min_per_class=3)
    data = zip_dir(make_dataset(tmp_path / "colours", per_class=8))
    config = {"name": "resumed", "source": "simple_cnn:none", "strategy": "full", "epochs": 5, "batch_size": 8, "image_size": 16}
    manager = JobManager(settings).start()
    app = FastAPI()
    app.include_router(build_router(manager, settings))
    with TestClient(app) as client:
        job_id = _submit(client, data, config)
        wait_for(lambda: (_job(client, job_id)["progress"].get("epochs_done") or 0) >= 2, 120, 0.2, "two real epochs")
        manager.stop(timeout=30)
        assert _job(client, job_id)["state"] == "interrupted"
    manager = JobManager(settings).start()
    app = FastAPI()
    app.include_router(build_router(manager, settings))
    try:
        with TestClient(app) as client:
            assert client.post(f"/finetune/{job_id}/resume").status_code == 202
            final = _wait_state(client, job_id, {"succeeded", "failed"}, 150)
            log = client.get(f"/finetune/{job_id}/log", params={"lines": 500}).text
            assert final["state"] == "succeeded", log
            assert "resuming from" in log and "at epoch 1\n" not in log.split("=== attempt 2")[1]
            assert [h["epoch"] for h in final["progress"]["history"]][-1] == 5
    finally:
        manager.stop(timeout=30)
