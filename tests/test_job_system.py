"""The job system as one piece: the kind registry, the event and exit-code contract the job child
and the runner share, the upload module that jobs and /evaluate share, the quantize kind end to
end, and the OpenAPI contract (security as enforced, links between operations)."""
import io
import json
import re
import zipfile

import pytest

from models.jobs.events import (
    ENDED_STATES, RESUMABLE_STATES, RUNNER_ENTRIES, STATES, STOPPED_BY_SIGNAL, Event, ExitCode, Progress, parse_line,
)
from service.finetune.outcome import Stopping, judge
from service.finetune.trace import JobTrace
from service.jobs.registry import KINDS
from service.jobs.router import JOB_ID


# -- the registry ------------------------------------------------------------------------------
def test_every_kind_has_its_own_ids_and_a_runnable_entry():
    from service.finetune.store import new_job_id

    prefixes = [kind.id_prefix for kind in KINDS.values()]
    assert len(set(prefixes)) == len(prefixes) == 3
    for kind in KINDS.values():
        assert re.match(JOB_ID, new_job_id(kind.id_prefix)), kind.name
        assert kind.entry is None or kind.entry == RUNNER_ENTRIES[kind.name]
        schema = kind.config_schema()
        assert "data" not in schema["properties"] and "output_dir" not in schema["properties"]
    assert set(RUNNER_ENTRIES) == {name for name, kind in KINDS.items() if kind.entry}


# -- the event contract ------------------------------------------------------------------------
def test_events_written_by_the_child_are_what_the_runner_folds():
    lines = []
    progress = Progress(lambda record: lines.append(json.dumps(record)))
    progress.phase("training")
    progress.recipe({"epochs": 2})
    progress.step(1, 2, 2, 2, train_loss=float("nan"), eta_s=1.0)
    progress.epoch_end(1, 2, 0.5, 0.75, 0.4)
    progress.succeeded("colours:v1", {"accuracy": 0.9})
    events = [parse_line(line) for line in [*lines, "not json", '{"event": "unknown"}', ""]]
    assert events[-3:] == [None, None, None] and events[2]["train_loss"] is None  # NaN is not JSON
    trace = JobTrace(progress={})
    assert trace.apply([e for e in events if e])
    assert trace.phase == "training" and trace.progress["recipe"] == {"epochs": 2}
    assert trace.progress["percent"] == 50.0 and trace.progress["history"][0]["val_accuracy"] == 0.75
    outcome = judge(ExitCode.OK, trace, Stopping(), log_path=None)
    assert outcome == ("succeeded", "colours:v1", {"accuracy": 0.9}, None)


def test_stage_and_budget_events_reach_the_job_status():
    events = []
    progress = Progress(events.append)
    progress.phase("training")
    progress.budget(899.96)
    progress.stage("features", 21440, 60000, eta_s=240.0)
    trace = JobTrace(progress={})
    assert trace.apply([parse_line(json.dumps(e)) for e in events])
    assert trace.progress == {"budget_s": 900.0, "stage": "features", "stage_done": 21440, "stage_total": 60000,
                              "stage_eta_s": 240.0}
    assert trace.apply([parse_line(json.dumps(progress.phase("exporting") or events[-1]))])
    assert trace.phase == "exporting" and trace.progress == {"budget_s": 900.0}  # a stage belongs to its phase


@pytest.mark.parametrize("code, state", [(ExitCode.TERMINATED, "interrupted"), (-15, "interrupted"),
                                          (ExitCode.INTERRUPTED, "interrupted"), (-9, "failed"), (ExitCode.BAD_INPUT, "failed")])
def test_exit_codes_are_judged_from_the_one_definition(code, state, tmp_path):
    trace = JobTrace(progress={})
    trace.apply([{"event": Event.FAILED.value, "reason": "bad data"}])
    outcome = judge(code, trace, Stopping(), tmp_path / "train.log")
    assert outcome.state == state and outcome.model is None
    assert (code in STOPPED_BY_SIGNAL) == (state == "interrupted")


def test_states_have_one_source():
    from service.finetune import job_record
    from tuneserve import client

    assert client.ENDED_STATES is ENDED_STATES and job_record.ENDED_STATES is ENDED_STATES
    assert RESUMABLE_STATES < ENDED_STATES < set(STATES)


# -- uploads -----------------------------------------------------------------------------------
def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, data in entries.items():
            bundle.writestr(name, data)
    return buffer.getvalue()


def test_upload_is_saved_within_its_limit_then_unpacked(tmp_path):
    from models.data.datasets import ZipLimits
    from service.jobs.uploads import UploadTooLarge, save_upload, unpack_upload, unpacked_bytes

    archive = _zip({"red/a.png": b"x" * 100, "green/b.png": b"y" * 50})
    with pytest.raises(UploadTooLarge, match="exceeds the upload limit of 10 bytes") as refused:
        save_upload(io.BytesIO(archive), tmp_path / "big.zip", 10)
    assert refused.value.status == 413
    budget = []
    folder = unpack_upload(io.BytesIO(archive), tmp_path / "a.zip", tmp_path / "out", ZipLimits(), budget.append)
    assert budget == [150] and unpacked_bytes(tmp_path / "a.zip") == 150
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png")) == ["green/b.png", "red/a.png"]


def test_upload_that_is_no_zip_is_named(tmp_path):
    from models.data.datasets import ZipLimits
    from models.errors import DatasetError
    from service.jobs.uploads import unpack_upload

    with pytest.raises(DatasetError, match="not a valid zip"):
        unpack_upload(io.BytesIO(b"plain text"), tmp_path / "a.zip", tmp_path / "out", ZipLimits())


def test_streamed_body_is_cut_at_the_limit():
    import asyncio

    from service.jobs.uploads import UploadTooLarge, limited_receive

    chunks = iter([{"body": b"x" * 6}, {"body": b"x" * 6}])

    async def receive():
        return next(chunks)

    limited = limited_receive(receive, 10, lambda received: None)
    assert asyncio.run(limited())["body"] == b"x" * 6
    with pytest.raises(UploadTooLarge):
        asyncio.run(limited())


# -- quantize as a job -------------------------------------------------------------------------
@pytest.fixture
def jobs_app(tmp_path, bento_home):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from service.finetune import JobManager
    from service.config import Settings
    from service.jobs.router import build_router

    (tmp_path / "root").mkdir()
    settings = Settings.of(home=tmp_path / "home", data_root=(tmp_path / "root").resolve(), auth=False, poll_seconds=0.1,
                           finetune_min_per_class=3)
    manager = JobManager(settings).start()
    app = FastAPI()
    for kind in KINDS.values():
        app.include_router(build_router(kind, manager, settings))
    yield TestClient(app)
    manager.stop(timeout=10)


def _post_quantize(client, config, dataset: bytes):
    return client.post("/quantize", data={"config": json.dumps(config)},
                       files={"dataset": ("data.zip", dataset, "application/zip")})


@pytest.mark.parametrize("config, status, message", [
    ({"model": "nowhere"}, 404, "model: "),
    ({"model": "tinyq", "methods": ["bogus"]}, 422, "methods"),
    ({"model": "tinyq", "calibration_images": 0}, 422, "calibration_images"),
    ({"model": "tinyq", "data": "/etc"}, 422, "set by the server"),
])
def test_quantize_submission_is_checked_before_it_is_queued(jobs_app, tmp_path, config, status, message):
    from models.artifact import store
    from tests.tiny_conv import write_tiny_conv_model

    store.publish("tinyq", write_tiny_conv_model(tmp_path / "model"))
    response = _post_quantize(jobs_app, config, _zip({"a.png": b"x"}))
    assert response.status_code == status and message in response.json()["error"], response.text
    assert jobs_app.get("/quantize").json()["jobs"] == []


@pytest.mark.slow
def test_quantize_job_adds_the_int8_variant(jobs_app, tmp_path):
    from models.artifact import store
    from tests.finetune_support import wait_for, zip_dir
    from tests.tiny_conv import noisy_colour_images, write_tiny_conv_model

    version = store.publish("tinyq", write_tiny_conv_model(tmp_path / "model"))
    noisy_colour_images(tmp_path / "images", per_class=8)
    response = _post_quantize(jobs_app, {"model": "tinyq", "methods": ["minmax"]}, zip_dir(tmp_path / "images"))
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert job_id.startswith("qz-") and response.json()["config"]["model"] == version.tag  # pinned
    done = {}
    wait_for(lambda: done.update(jobs_app.get(f"/quantize/{job_id}").json()) or done["state"] in ENDED_STATES, 120, 0.5, "quantize job")
    assert done["state"] == "succeeded", (done, jobs_app.get(f"/quantize/{job_id}/log").text)
    assert done["model"] == version.tag and done["eval"]["file"] == "model.int8.onnx"
    assert store.resolve(version.tag).manifest().variants["int8"].calibration == "minmax"
    assert jobs_app.get(f"/finetune/{job_id}").status_code == 404  # kinds do not see each other's jobs


# -- the OpenAPI contract ----------------------------------------------------------------------
def _spec(tmp_path, monkeypatch, **env):
    from service.app import create_app, mount_jobs
    from service.config import load_settings

    monkeypatch.setenv("TUNESERVE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TUNESERVE_API_KEY", "k")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    app = create_app(settings)
    manager = mount_jobs(app, settings)
    spec = app.openapi()
    if manager is not None:
        manager.store.close()
    return spec


OPTIONAL, REQUIRED = [{}, {"HTTPBearer": []}], [{"HTTPBearer": []}]


@pytest.mark.parametrize("protect_reads, reads", [("0", OPTIONAL), ("1", REQUIRED)])
def test_openapi_declares_the_key_as_enforced(tmp_path, monkeypatch, protect_reads, reads):
    paths = _spec(tmp_path, monkeypatch, TUNESERVE_PROTECT_READS=protect_reads)["paths"]
    assert paths["/finetune/{job_id}"]["get"]["security"] == reads
    assert paths["/models"]["get"]["security"] == reads
    assert paths["/finetune"]["post"]["security"] == REQUIRED
    assert paths["/quantize/{job_id}"]["delete"]["security"] == REQUIRED


def test_openapi_links_ids_to_their_uses_and_errors_are_json(tmp_path, monkeypatch):
    spec = _spec(tmp_path, monkeypatch)
    paths = spec["paths"]
    ids = {op["operationId"]: (method, path) for path, item in paths.items() for method, op in item.items()}
    for kind in KINDS:
        links = paths[f"/{kind}"]["post"]["responses"]["202"]["links"]
        assert {ids[link["operationId"]] for link in links.values()} == {
            ("get", f"/{kind}/{{job_id}}"), ("get", f"/{kind}/{{job_id}}/log"), ("post", f"/{kind}/{{job_id}}/cancel"),
            ("post", f"/{kind}/{{job_id}}/resume"), ("delete", f"/{kind}/{{job_id}}")}
        assert all(link["parameters"] == {"job_id": "$response.body#/job_id"} for link in links.values())
    assert ids[paths["/models"]["get"]["responses"]["200"]["links"]["detail"]["operationId"]] == ("get", "/models/{name}")
    log = paths["/finetune/{job_id}/log"]["get"]["responses"]
    assert list(log["200"]["content"]) == ["text/plain"] and list(log["422"]["content"]) == ["application/json"]
    assert list(log["404"]["content"]) == ["application/json", "text/plain"]  # text: BentoML's, for a path no route takes
    body = spec["components"]["schemas"][paths["/finetune"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]]
    assert body["properties"]["dataset"]["contentMediaType"] == "application/zip"
    # exactly one, counted as the server counts: a text field sent empty is absent
    assert body["oneOf"] == [
        {"required": ["dataset"], "properties": {"dataset": {}, "data_path": {"maxLength": 0}}},
        {"required": ["data_path"], "properties": {"data_path": {"minLength": 1}, "dataset": False}},
    ]
