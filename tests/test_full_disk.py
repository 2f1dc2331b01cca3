"""A full disk loses nothing: the model store and the service home on a real, size-limited tmpfs.

A real `bentoml serve` runs a fine-tune (the fake trainer, whose version carries a 2 MiB file)
that stops before publishing while the test fills the disk. Then: the publish fails cleanly (job
`failed` naming the full disk, no partial version, `latest` unchanged, the old version still
served); on a completely full disk the job database cannot be written and a resume is refused
with 507, changing nothing; once space is freed the job resumes to success and the new version
is served. Needs root (mount); skipped with the reason otherwise. A second test runs anywhere:
the copy into the store fails with ENOSPC part-way and the store stays as it was.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.finetune_support import FAKE_COMMAND, make_dataset, png, wait_for, zip_dir
from tests.test_finetune_server import _job, _submit, serve
from tests.tiny import write_tiny_model

pytestmark = pytest.mark.slow
DISK_MB = 48
PAD_KB = 2048  # the new version's size; the disk keeps less than this free when the publish runs


@pytest.fixture
def disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    yield mount
    if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(path: Path, leave: int = 0) -> None:
    """Write `path` until the disk is full, then give back `leave` bytes (0: completely full)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for chunk in (1024**2, 4096, 512):
            try:
                while os.write(descriptor, b"\1" * chunk):
                    pass
            except OSError:  # ENOSPC: next, smaller pieces
                pass
    finally:
        os.close(descriptor)
    os.truncate(path, max(0, path.stat().st_size - leave))


def _classify(client) -> dict:
    answer = client.post("/classify", data={"model": "colours"}, files={"image": ("r.png", png((230, 10, 10)), "image/png")})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_full_disk_publish_fails_cleanly_and_resumes(disk, tmp_path, monkeypatch):
    from models.artifact import store
    from tests.conftest import _point_bentoml_at

    bento_home = disk / "bentoml"
    monkeypatch.setenv("BENTOML_HOME", str(bento_home))
    _point_bentoml_at(bento_home)
    try:
        first = store.publish("colours", write_tiny_model(tmp_path / "v1", labels=["green", "red"], accuracy=0.9))
        # BentoML keeps Prometheus' multiprocess files (mmapped) in $BENTOML_HOME/prometheus_multiproc_dir;
        # on a completely full disk a worker touching a new page of them dies mid-response (seen here
        # before this line existed). That folder is BentoML's, not the store or the job home: keep it
        # off the disk under test, as docs/security.md advises for deployments.
        (tmp_path / "prometheus").mkdir()
        (bento_home / "prometheus_multiproc_dir").symlink_to(tmp_path / "prometheus")
        gate = tmp_path / "publish-gate"  # outside the tmpfs
        env = {
            "BENTOML_HOME": str(bento_home), "TUNESERVE_HOME": str(disk / "home"), "TUNESERVE_WORKERS": "1",
            "TUNESERVE_DEFAULT_MODEL": "colours", "TUNESERVE_FINETUNE_MIN_PER_CLASS": "3", "TUNESERVE_JOB_GRACE_SECONDS": "2",
            "TUNESERVE_TRAINING_COMMAND": FAKE_COMMAND, "TUNESERVE_FAKE_TRAIN_STEP_S": "0.02", "TUNESERVE_FAKE_TRAIN_PAD_KB": str(PAD_KB),
            "TUNESERVE_FAKE_TRAIN_PUBLISH_GATE": str(gate),
            # no free-space floor: this test is about a publish that meets a full disk (the floor,
            # which would stop the job first, is tested in tests/test_quotas.py)
            "TUNESERVE_FINETUNE_MIN_FREE_MB": "0",
        }
        with serve(env, tmp_path / "server.log") as (client, _):
            job_id = _submit(client, zip_dir(make_dataset(tmp_path / "colours")), {"name": "colours", "source": "simple_cnn:none", "epochs": 1})
            wait_for(lambda: _job(client, job_id)["phase"] == "publishing", 60, 0.1, "the job waiting to publish")

            filler = disk / "filler"
            fill(filler, leave=512 * 1024)  # room for logs and the job database, not for the new version
            gate.touch()
            failed = wait_for(lambda: (j := _job(client, job_id))["state"] not in ("queued", "running") and j, 60, 0.2, "the job to end")
            assert failed["state"] == "failed", failed
            assert "no space left" in failed["error"] and "nothing was published" in failed["error"], failed["error"]
            assert f"colours:latest is still {first.version}" in failed["error"]
            versions = sorted(p.name for p in (bento_home / "models" / "colours").iterdir())
            assert versions == sorted([first.version, "latest"])  # no partial version folder
            assert store.latest_version("colours") == first.version
            assert _classify(client)["version"] == first.version  # still served

            fill(filler)  # completely full: the job database cannot take a write
            refused = client.post(f"/finetune/{job_id}/resume")
            assert refused.status_code == 507 and "cannot be written" in refused.json()["error"], refused.text
            assert _job(client, job_id)["state"] == "failed"  # the refused write changed nothing
            assert _classify(client)["version"] == first.version

            filler.unlink()  # space is back: the same job resumes and publishes
            assert client.post(f"/finetune/{job_id}/resume").status_code == 202
            done = wait_for(lambda: (j := _job(client, job_id))["state"] not in ("queued", "running") and j, 60, 0.2, "the resumed job")
            assert done["state"] == "succeeded", (done, client.get(f"/finetune/{job_id}/log").text[-2000:])
            second = done["model"].split(":")[1]
            assert store.latest_version("colours") == second != first.version
            wait_for(lambda: _classify(client)["version"] == second, 30, 0.3, "the new version served")
    finally:
        _point_bentoml_at(None)


def test_publish_out_of_space_keeps_the_store_as_it_was(bento_home, tmp_path, monkeypatch):
    """Without a tmpfs (any user): the copy into the store fails with ENOSPC part-way, and the
    store is as before: no version folder, `latest` where it was, an error that says so."""
    import errno
    import shutil

    from models.artifact import store
    from models.errors import StorageFull

    first = store.publish("colours", write_tiny_model(tmp_path / "v1"))
    real_copytree = shutil.copytree

    def copytree_until_full(source, target, *args, **kwargs):
        if not str(target).startswith(str(bento_home / "models")):
            return real_copytree(source, target, *args, **kwargs)
        (Path(target) / "manifest.json").write_text("{")  # a partial copy, then the disk is full
        error = OSError(errno.ENOSPC, "No space left on device")
        raise shutil.Error([(str(Path(source) / "model.onnx"), str(Path(target) / "model.onnx"), str(error))])

    monkeypatch.setattr(shutil, "copytree", copytree_until_full)
    with pytest.raises(StorageFull, match=f"nothing was published; colours:latest is still {first.version}"):
        store.publish("colours", write_tiny_model(tmp_path / "v2"))
    assert sorted(p.name for p in (bento_home / "models" / "colours").iterdir()) == sorted([first.version, "latest"])
    assert store.latest_version("colours") == first.version
    assert [v.version for v in store.list_models()["colours"]] == [first.version]
