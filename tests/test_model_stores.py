"""One model store for the service and its jobs in every layout.

Unit level: a bento's baked store (read-only) next to the writable `$BENTOML_HOME/models` —
found the way a bento worker sees it (BentoML points its model store at the bento) and the way a
job's child process sees it (`$BENTO_PATH`, `TUNESERVE_BAKED_MODELS`); listing, resolving,
`latest` across both, publish always to the writable one, baked versions refuse deletion; the
container volume warning from /proc/self/mountinfo text.

End to end (slow): `tuneserve build` → `bentoml export` → unpacked as a container lays it out →
`bentoml serve` from the bento folder with the container's environment; a real fine-tune job
from a baked model, and /classify with the new version within one poll interval.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from models.artifact import store
from models.errors import ReadOnlyModel
from service.storage import ephemeral_state, mount_point_of, mount_points, state_paths
from tests.tiny import solid_png, write_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def _fake_bento(root: Path) -> Path:
    """A bento folder as a container holds it: bento.yaml and a `models/` BentoML store."""
    (root / "models").mkdir(parents=True)
    (root / "bento.yaml").write_text("service: service.service:TuneServe\n")
    return root


@contextlib.contextmanager
def _publishing_into(path: Path):
    """Publish into `path` as if it were the writable store (to fill a fake bento's store)."""
    original = store.stores
    store.stores = lambda: [store.StoreLocation(path.resolve(), store.WRITABLE)]
    try:
        yield
    finally:
        store.stores = original


@pytest.fixture
def baked(tmp_path, bento_home, monkeypatch):
    """A bento with `colours` baked in, found through BENTO_PATH (what a job child sees)."""
    bento = _fake_bento(tmp_path / "bento")
    with _publishing_into(bento / "models"):
        version = store.publish("colours", write_tiny_model(tmp_path / "stage-baked", accuracy=0.8))
    monkeypatch.delenv(store.BAKED_ENV, raising=False)
    monkeypatch.setenv("BENTO_PATH", str(bento))
    return bento, version


def test_baked_and_writable_both_listed_and_resolved(baked, tmp_path):
    bento, baked_version = baked
    assert [(s.kind, s.path) for s in store.stores()] == [
        (store.WRITABLE, (tmp_path / "bentoml" / "models").resolve()), (store.BAKED, (bento / "models").resolve())]
    assert store.resolve("colours").store == store.BAKED  # a baked model resolves (usable as a source)
    assert store.describe(store.resolve("colours"))["store"] == "baked"

    trained = store.publish("colours", write_tiny_model(tmp_path / "stage-new"))  # what a job publishes
    assert trained.store == store.WRITABLE and trained.path.is_relative_to(tmp_path / "bentoml" / "models")
    assert not (bento / "models" / "colours" / trained.version).exists()  # the baked store is never written
    listed = store.list_models()["colours"]
    assert [(v.version, v.store) for v in listed] == [(trained.version, "writable"), (baked_version.version, "baked")]
    assert store.latest_version("colours") == trained.version == store.resolve("colours:latest").version
    assert store.resolve(baked_version.tag).store == store.BAKED


def test_latest_is_the_newest_across_stores(baked, tmp_path):
    bento, _ = baked
    older = store.publish("colours", write_tiny_model(tmp_path / "stage-w"))
    with _publishing_into(bento / "models"):  # a newer image baked with a newer version
        newer = store.publish("colours", write_tiny_model(tmp_path / "stage-b2"))
    assert store.latest_version("colours") == newer.version
    assert store.resolve("colours").tag == newer.tag and store.resolve(older.tag).store == store.WRITABLE


def test_baked_versions_cannot_be_deleted(baked):
    _, version = baked
    with pytest.raises(ReadOnlyModel, match="baked into the bento") as refused:
        store.delete(version.tag)
    assert refused.value.status == 409
    assert store.resolve(version.tag).path.is_dir()


def test_a_bento_worker_sees_both_and_children_inherit(tmp_path, bento_home, monkeypatch):
    """In a bento worker BentoML points its model store at the bento (no BENTO_PATH when served
    from a bento folder outside a container); publish must still go to $BENTOML_HOME/models and
    the job children must be told where the baked models are."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    bento = _fake_bento(tmp_path / "bento")
    with _publishing_into(bento / "models"):
        store.publish("colours", write_tiny_model(tmp_path / "stage-baked"))
    monkeypatch.delenv("BENTO_PATH", raising=False)
    monkeypatch.setenv(store.BAKED_ENV, "")  # recorded, so export_for_children's value is undone after the test
    monkeypatch.delenv(store.BAKED_ENV)
    BentoMLContainer.model_store.set(ModelStore(str(bento / "models")))  # what bentoml's loader does
    assert store.baked_root() == (bento / "models").resolve()
    version = store.publish("fresh", write_tiny_model(tmp_path / "stage-fresh"))
    assert version.store == store.WRITABLE and version.path.is_relative_to(bento_home / "models")
    store.export_for_children()
    assert os.environ[store.BAKED_ENV] == str((bento / "models").resolve())


def test_plain_checkout_has_one_store(bento_home, monkeypatch):
    monkeypatch.delenv("BENTO_PATH", raising=False)
    monkeypatch.delenv(store.BAKED_ENV, raising=False)
    assert [s.kind for s in store.stores()] == [store.WRITABLE]


MOUNTINFO = """\
22 1 0:21 / / rw,relatime - overlay overlay rw
23 22 0:22 / /proc rw - proc proc rw
30 22 8:1 /var/lib/docker/volumes/m/_data /home/bentoml/models rw - ext4 /dev/sda1 rw
31 22 8:1 /srv/state /home/bentoml/tune\\040serve rw - ext4 /dev/sda1 rw
"""


def test_mount_points_and_holders():
    points = mount_points(MOUNTINFO)
    assert Path("/home/bentoml/tune serve") in points  # octal escapes undone
    assert mount_point_of(Path("/home/bentoml/models/x/y"), points) == Path("/home/bentoml/models")
    assert mount_point_of(Path("/home/bentoml/bento/models"), points) == Path("/")
    assert mount_point_of(Path("/home/bentoml/tune serve/finetune"), points) == Path("/home/bentoml/tune serve")


def test_container_warns_when_state_is_not_on_a_volume(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "writable_root", lambda: Path("/home/bentoml/models"))
    container = {"BENTOML_CONTAINERIZED": "true"}
    bare = "22 1 0:21 / / rw,relatime - overlay overlay rw\n"
    warnings = ephemeral_state(Path("/home/bentoml/tuneserve"), container, bare)
    assert len(warnings) == 2
    assert "model store (new model versions) at /home/bentoml/models" in warnings[0] and "docker rm" in warnings[0]
    assert "fine-tune jobs (database and job folders) at /home/bentoml/tuneserve/finetune" in warnings[1]
    assert ephemeral_state(Path("/home/bentoml/tune serve"), container, MOUNTINFO) == []  # both on volumes
    assert ephemeral_state(Path("/home/bentoml/tuneserve"), {}, bare) == []  # not a container: silent
    assert list(state_paths(Path("/x"))) == ["model store (new model versions)", "fine-tune jobs (database and job folders)"]


# ---- end to end: a built bento served the way the container serves it -----------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command: list[str], env: dict[str, str], cwd: Path, timeout: int = 300) -> str:
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done.stdout


def _train_source(tmp_path: Path, env: dict[str, str]) -> str:
    """A real tiny model (simple_cnn, 16 px) to bake: fine-tune jobs need a checkpoint to start from."""
    data = tmp_path / "data"
    for label, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        (data / label).mkdir(parents=True)
        for i in range(6):
            (data / label / f"{i}.png").write_bytes(solid_png(tuple(max(0, c - 3 * i) for c in colour), (18, 18)))
    out = _run([sys.executable, "-m", "tuneserve", "train", "--name", "dur3", "--source", "simple_cnn", "--weights", "none",
                "--data", str(data), "--image-size", "16", "--epochs", "1", "--batch-size", "8",
                "--output-dir", str(tmp_path / "run"), "--int8", "false"], env, ROOT)
    lines = out.splitlines()  # the summary is the JSON object at the end (ONNX Runtime's quantizer prints too)
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))["model"]


def _container_layout(tmp_path: Path, env: dict[str, str]) -> Path:
    """`tuneserve build`, then the bento exactly as `bentoml containerize` copies it (models inside)."""
    _run([sys.executable, "-m", "tuneserve", "build"], env, ROOT)
    archive = tmp_path / "tuneserve.bento"
    _run([sys.executable, "-m", "bentoml", "export", "tuneserve:latest", str(archive)], env, ROOT)
    bento = tmp_path / "container" / "home" / "bento"
    bento.mkdir(parents=True)
    with tarfile.open(archive) as bundle:
        bundle.extractall(bento, filter="data")
    return bento


@contextlib.contextmanager
def _serve_bento(bento: Path, env: dict[str, str], log_path: Path):
    port = _free_port()
    with log_path.open("a") as log:
        process = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", str(bento), "--port", str(port)],
                                   env=env, cwd=bento, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    import httpx

    key = env.get("TUNESERVE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, headers=headers)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log_path.read_text()[-4000:]
            with contextlib.suppress(httpx.HTTPError):
                if client.get("/readyz").status_code == 200:
                    break
            assert time.monotonic() < deadline, log_path.read_text()[-4000:]
            time.sleep(0.5)
        yield client
    finally:
        client.close()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


@pytest.mark.slow
def test_bento_served_like_the_container_trains_from_a_baked_model_and_serves_it(tmp_path):
    build_env = {**os.environ, "BENTOML_HOME": str(tmp_path / "build-home"), "BENTOML_DO_NOT_TRACK": "true",
                 "PYTHONPATH": str(ROOT)}
    baked_tag = _train_source(tmp_path, build_env)
    bento = _container_layout(tmp_path, build_env)
    assert (bento / "models" / "dur3" / baked_tag.split(":")[1] / "model.onnx").is_file()

    home = tmp_path / "container" / "home"  # /home/bentoml in the image
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # the bento's own code only
    poll = 1.0
    env.update({"BENTOML_HOME": str(home), "BENTO_PATH": str(bento), "BENTOML_CONTAINERIZED": "true",
                "TUNESERVE_HOME": str(home / "tuneserve"), "TUNESERVE_DEFAULT_MODEL": "dur3", "TUNESERVE_WORKERS": "1",
                "TUNESERVE_POLL_SECONDS": str(poll), "TUNESERVE_FINETUNE_MIN_PER_CLASS": "2", "BENTOML_DO_NOT_TRACK": "true",
                "TUNESERVE_TRAINING_COMMAND": f"nice -n 5 {sys.executable} -m training.run",
                "TUNESERVE_API_KEY": "container-test-key"})
    for key in ("TUNESERVE_API_KEYS", "TUNESERVE_API_KEYS_FILE", "TUNESERVE_AUTH"):
        env.pop(key, None)
    log_path = tmp_path / "server.log"
    with _serve_bento(bento, env, log_path) as client:
        # the state sits on the "container's" own filesystem here, unless this machine mounts tmp_path
        on_root = mount_point_of(home, mount_points(Path("/proc/self/mountinfo").read_text())) == Path("/")
        assert ("not a mounted volume" in log_path.read_text()) == on_root
        listed = client.get("/models").json()["models"]
        assert [(v["version"], v["store"]) for v in listed["dur3"]["versions"]] == [(baked_tag.split(":")[1], "baked")]

        data = tmp_path / "data"
        archive = tmp_path / "data.zip"
        subprocess.run([sys.executable, "-m", "zipfile", "-c", str(archive), *(str(p) for p in data.iterdir())], check=True)
        config = {"name": "tuned", "source": "dur3", "strategy": "full", "epochs": 1, "batch_size": 8, "image_size": 16,
                  "int8": False}
        submitted = client.post("/finetune", data={"config": json.dumps(config)},
                                files={"dataset": ("d.zip", archive.read_bytes(), "application/zip")})
        assert submitted.status_code == 202, submitted.text
        assert submitted.json()["config"]["source"] == baked_tag  # the baked source, pinned
        job_id = submitted.json()["job_id"]
        deadline = time.monotonic() + 240
        while (job := client.get(f"/finetune/{job_id}").json())["state"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        assert job["state"] == "succeeded", client.get(f"/finetune/{job_id}/log", params={"lines": 200}).text
        name, version = job["model"].split(":")
        finished = time.monotonic()
        assert (home / "models" / name / version / "model.onnx").is_file()  # the writable store, not the bento

        answer = None
        while time.monotonic() - finished < poll + 5:  # within one poll interval (plus the load itself)
            answer = client.post("/classify", data={"model": name}, files={"image": ("r.png", solid_png("red"), "image/png")})
            if answer.status_code == 200:
                break
            time.sleep(0.2)
        assert answer.status_code == 200, answer.text
        assert answer.json()["version"] == version and answer.json()["predictions"][0]["label"] in ("red", "blue")
        tuned = client.get("/models/tuned").json()["versions"][0]
        assert tuned["store"] == "writable" and tuned["manifest"]["source"] == baked_tag
        stores = {name: [v["store"] for v in entry["versions"]] for name, entry in client.get("/models").json()["models"].items()}
        assert stores == {"dur3": ["baked"], "tuned": ["writable"]}
