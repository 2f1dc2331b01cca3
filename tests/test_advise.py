"""The transfer advisor on tiny torch-free sources whose feature spaces differ in quality."""
import json

import numpy as np
import pytest

from models.artifact import store
from models.jobs.advise import AdviseConfig, AdviseConfigError
from models.transfer.advise import RANKED_BY, Candidate, advise, rank_candidates, recommend
from models.errors import EmbeddingUnavailable
from tests.finetune_support import make_dataset
from tests.tiny import write_tiny_model

SEEING = np.eye(3)  # all three colour channels: red, green and blue are apart
RED_ONLY = np.array([[1.0], [0.0], [0.0]])  # green and blue look the same


@pytest.fixture
def sources(tmp_path, bento_home):
    good = store.publish("sees-colour", write_tiny_model(tmp_path / "good", embedding=SEEING))
    poor = store.publish("sees-red", write_tiny_model(tmp_path / "poor", embedding=RED_ONLY))
    old = store.publish("old", write_tiny_model(tmp_path / "old"))  # exported before the embedding output
    return good, poor, old


@pytest.fixture
def colours(tmp_path):
    return make_dataset(tmp_path / "data", classes=("red", "green", "blue"), per_class=12)


def test_ranks_the_source_that_separates_the_classes_first(sources, colours):
    good, poor, old = sources
    advice = advise(AdviseConfig(data=str(colours), folds=3))
    ranked = advice["candidates"]
    assert [c["model"] for c in ranked] == [good.tag, poor.tag] and [c["rank"] for c in ranked] == [1, 2]
    assert ranked[0]["logme"] > ranked[1]["logme"]
    assert ranked[0]["sfda"] > ranked[1]["sfda"] and 0 <= ranked[1]["sfda"] <= ranked[0]["sfda"] <= 1
    assert ranked[0]["knn_accuracy"] == 1.0 and ranked[1]["knn_accuracy"] < 0.9
    assert [c["mean_rank"] for c in ranked] == [1.0, 2.0]  # every score agrees
    assert ranked[0]["probe_accuracy"] == 1.0 and ranked[1]["probe_accuracy"] < 0.9
    assert ranked[0]["recommended_strategy"] == "linear" and ranked[1]["recommended_strategy"] == "full"
    assert ranked[0]["dimensions"] == 3 and ranked[1]["dimensions"] == 1 and ranked[0]["embed_seconds"] >= 0
    assert advice["best"] == good.tag and advice["recommended_strategy"] == "linear"
    assert [s["model"] for s in advice["skipped"]] == [old.tag] and "re-export" in advice["skipped"][0]["reason"]
    curve = advice["learning_curve"]
    assert [p["fraction"] for p in curve] == [0.1, 0.25, 0.5, 1.0]
    assert [p["images"] for p in curve] == sorted(p["images"] for p in curve) and curve[0]["images"] >= 3
    assert curve[-1]["images"] == advice["dataset"]["train"] and curve[-1]["accuracy"] == 1.0
    json.dumps(advice)  # what advice.json and the HTTP job hold


def test_candidates_by_name_and_old_exports_refused_by_name(sources, colours):
    good, poor, old = sources
    advice = advise(AdviseConfig(data=str(colours), candidates=["sees-red"], folds=3))
    assert [c["model"] for c in advice["candidates"]] == [poor.tag]
    with pytest.raises(EmbeddingUnavailable, match="old.*re-export"):
        advise(AdviseConfig(data=str(colours), candidates=["old"], folds=3))


def test_config_problems_are_named():
    with pytest.raises(AdviseConfigError, match="data: required.*folds.*curve"):
        AdviseConfig(folds=1, curve=[0, 2]).validate()
    with pytest.raises(AdviseConfigError, match="unknown advise config fields: \\['epochs'\\]"):
        AdviseConfig.from_dict({"data": "x", "epochs": 3})
    assert AdviseConfig.from_dict({"kind": "advise", "data": "x"}).to_dict()["kind"] == "advise"


def candidate(model: str, logme: float, sfda: float | None, knn: float) -> Candidate:
    return Candidate(model=model, logme=logme, sfda=sfda, knn_accuracy=knn, probe_accuracy=0.5, embed_seconds=0.1,
                     images=10, dimensions=4)


def test_candidates_are_ranked_by_the_agreement_of_their_scores():
    assert RANKED_BY == ("logme", "sfda", "knn_accuracy")
    # LogME alone would put "loud" first; SFDA and k-NN both prefer "quiet"
    ranked = rank_candidates([candidate("loud", 2.0, 0.4, 0.6), candidate("quiet", 1.0, 0.9, 0.8),
                              candidate("flat", 0.0, None, 0.8)])
    assert [(c.model, c.rank, c.mean_rank) for c in ranked] == [("quiet", 1, 1.5), ("loud", 2, 2.0), ("flat", 3, 2.5)]


def test_recommendation_rule():
    assert recommend(1.0) == recommend(0.99) == "linear"
    assert recommend(0.98) == "full"


def test_advise_command_prints_the_ranking_and_writes_json(sources, colours, tmp_path, capsys):
    from tuneserve.cli import main

    good, poor, _ = sources
    assert main(["advise", "--data", str(colours), "--folds", "3", "--output", str(tmp_path / "advice.json")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:2] == ["1", good.tag] and table[2].split()[:2] == ["2", poor.tag]
    assert table[0].split()[2:8] == ["mean", "rank", "LogME", "SFDA", "k-NN", "probe"] and table[1].split()[2] == "1.00"
    assert "skipped" in table[3] and table[-1].startswith(f"best: {good.tag} (linear)")
    assert json.loads((tmp_path / "advice.json").read_text())["best"] == good.tag
    assert main(["advise", "--data", str(tmp_path / "missing")]) == 2  # a clear error, not a traceback
    assert "data: path does not exist" in capsys.readouterr().err
    assert main(["advise", str(tmp_path / "missing")]) == 2  # the positional form: deprecated, still read
    err = capsys.readouterr().err
    assert "use `tuneserve advise --data DIR`" in err and "data: path does not exist" in err
    assert main(["advise"]) == 2 and "tuneserve advise --data DIR" in capsys.readouterr().err


# ---- over HTTP: a durable job in the fine-tune job store ------------------------------------------


@pytest.fixture
def jobs_client(tmp_path, bento_home):

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from service.finetune import JobManager
    from service.config import Settings
    from service.routes import advise as advise_routes
    from service.routes import finetune as finetune_routes

    (tmp_path / "root").mkdir()
    settings = Settings.of(home=tmp_path / "home", data_root=(tmp_path / "root").resolve(), auth=False, poll_seconds=0.1,
                           finetune_min_per_class=3)
    managers = []

    def make(start=True):
        manager = JobManager(settings)
        if start:
            manager.start()
        app = FastAPI()
        app.include_router(finetune_routes.build_router(manager, settings))
        app.include_router(advise_routes.build_router(manager, settings))
        managers.append(manager)
        return TestClient(app)

    yield make
    for manager in managers:
        manager.stop(timeout=10)


def post_advise(client, data_dir, config):
    from tests.finetune_support import zip_dir

    return client.post("/advise", data={"config": json.dumps(config)},
                       files={"dataset": ("data.zip", zip_dir(data_dir), "application/zip")})


@pytest.mark.slow
def test_advise_job_over_http_ranks_and_keeps_the_advice(jobs_client, sources, colours):
    from tests.finetune_support import wait_for

    good, poor, old = sources
    client = jobs_client()
    response = post_advise(client, colours, {"folds": 3})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["kind"] == "advise" and body["job_id"].startswith("adv-") and body["dataset"]["classes"] == 3
    job_id = body["job_id"]
    done = wait_for(lambda: (j := client.get(f"/advise/{job_id}").json())["state"] in ("succeeded", "failed") and j,
                    timeout=120, what="the advise job")
    assert done["state"] == "succeeded", done
    assert done["progress"]["percent"] == 100.0 and done["model"] is None
    assert done["eval"]["ranking"] == [good.tag, poor.tag] and done["eval"]["best"] == good.tag
    scores = done["eval"]["scores"]  # the job result carries every score and the rank
    assert [(s["model"], s["rank"], s["mean_rank"]) for s in scores] == [(good.tag, 1, 1.0), (poor.tag, 2, 2.0)]
    assert set(scores[0]) == {"model", "rank", "mean_rank", "logme", "sfda", "knn_accuracy", "probe_accuracy"}
    advice = done["advice"]
    assert [c["model"] for c in advice["candidates"]] == [good.tag, poor.tag]
    assert advice["skipped"][0]["model"] == old.tag and len(advice["learning_curve"]) == 4
    assert [j["job_id"] for j in client.get("/advise").json()["jobs"]] == [job_id]
    assert client.get("/finetune").json()["jobs"] == []  # one store, listed by kind
    assert client.get(f"/finetune/{job_id}").status_code == 404


@pytest.mark.parametrize("case,config,status,message", [
    ("one class", {}, 422, "at least 2 classes"),
    ("unknown candidate", {"candidates": ["nope"]}, 422, "'nope' is not a stored model"),
    ("old export", {"candidates": ["old"]}, 409, "without an 'embedding' output"),
    ("unknown field", {"epochs": 3}, 422, "unknown advise config fields"),
    ("server field", {"output_dir": "/tmp"}, 422, "set by the server"),
])
def test_bad_advise_requests_are_refused_at_submit(case, config, status, message, jobs_client, sources, tmp_path):
    classes = ("red",) if case == "one class" else ("red", "green")
    data = make_dataset(tmp_path / "bad", classes=classes, per_class=4)
    response = post_advise(jobs_client(start=False), data, config)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_queued_advise_job_can_be_cancelled(jobs_client, sources, colours):
    client = jobs_client(start=False)  # no worker: the job stays queued
    job_id = post_advise(client, colours, {"candidates": ["sees-colour"]}).json()["job_id"]
    cancelled = client.post(f"/advise/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert client.post(f"/advise/{job_id}/cancel").status_code == 409
    assert client.get(f"/advise/{job_id}").json()["advice"] is None


def test_job_databases_from_before_kinds_read_as_fine_tunes(tmp_path):
    import sqlite3

    from service.finetune.job_record import SCHEMA
    from service.finetune.store import JobStore

    old = SCHEMA.replace(",\n    kind TEXT NOT NULL DEFAULT 'finetune'", "")
    assert "kind" not in old.split("CREATE INDEX")[0]
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        conn.executescript(old)
        conn.execute("INSERT INTO jobs (id, seq, state, config, dataset_dir, job_dir, created, updated)"
                     " VALUES ('ft-1', 1, 'succeeded', '{}', '/d', '/j', 0, 0)")
    store = JobStore(tmp_path / "jobs.db")
    assert store.get("ft-1").kind == "finetune"
    store.create({"name": "a"}, "/d", "/j", "adv-1", kind="advise")
    assert [j.id for j in store.list(kind="advise")] == ["adv-1"] and [j.id for j in store.list(kind="finetune")] == ["ft-1"]
