"""The declared HTTP contract (/api/openapi.json) without a server: every form field, constraint and
status is declared, and the declared constraints are the ones the code enforces."""
import re

import pytest
from fastapi.testclient import TestClient

from models.artifact import store
from service.app import create_app, mount_jobs
from service.config import load_settings
from service.routes.finetune import JOB_ID
from service.routes.forms import MODEL_REF

FORM = "multipart/form-data"


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    settings = load_settings({"TUNESERVE_HOME": str(home), "TUNESERVE_MAX_TOP_K": "7", "TUNESERVE_MAX_BATCH": "3"})
    app = create_app(settings)
    mount_jobs(app, settings)
    app.state.pool = object()  # refusals below happen before any model is used
    with TestClient(app) as client:
        yield client, client.get("/api/openapi.json").json()


def _body(spec, path):
    media = spec["paths"][path]["post"]["requestBody"]["content"][FORM]
    return spec["components"]["schemas"][media["schema"]["$ref"].rsplit("/", 1)[-1]], media


def test_every_post_with_a_body_declares_its_form_fields(api):
    _, spec = api
    classify, _ = _body(spec, "/classify")
    assert classify["required"] == ["image"] and classify["properties"]["image"]["contentMediaType"]
    top_k, model = (classify["properties"][name]["anyOf"][0] for name in ("top_k", "model"))
    assert (top_k["minimum"], top_k["maximum"]) == (1, 7) and model["pattern"] == MODEL_REF
    batch, _ = _body(spec, "/classify_batch")
    assert batch["properties"]["images"]["type"] == "array" and batch["properties"]["images"]["maxItems"] == 3
    evaluate, evaluate_media = _body(spec, "/evaluate")
    # exactly one of the two, as the server counts them (a text field sent empty is absent)
    assert [branch["required"] for branch in evaluate["oneOf"]] == [["dataset"], ["data_path"]]
    assert evaluate["oneOf"][1]["properties"] == {"data_path": {"minLength": 1}, "dataset": False}
    assert evaluate["properties"]["dataset"]["contentMediaType"] == evaluate_media["encoding"]["dataset"]["contentType"] == "application/zip"
    assert evaluate["properties"]["split"]["anyOf"][0]["enum"] == ["train", "val", "test"]
    finetune, media = _body(spec, "/finetune")
    config = finetune["properties"]["config"]
    assert media["encoding"]["config"]["contentType"] == "application/json"
    assert config["required"] == ["name"] and config["additionalProperties"] is False
    assert {"epochs", "source", "strategy"} <= set(config["properties"]) and "output_dir" not in config["properties"]


def test_every_status_a_route_returns_is_documented_with_the_error_schema(api):
    _, spec = api
    expected = {
        ("/classify", "post"): {"200", "400", "401", "404", "413", "415", "422", "503"},
        ("/evaluate", "post"): {"200", "400", "401", "403", "404", "413", "415", "422", "429", "503", "507"},
        ("/models/{name}", "get"): {"200", "401", "404", "422", "503"},
        ("/finetune", "post"): {"202", "400", "401", "403", "404", "413", "415", "422"},
        ("/finetune/{job_id}/cancel", "post"): {"200", "202", "401", "404", "409", "422"},
    }
    for (path, method), statuses in expected.items():
        responses = spec["paths"][path][method]["responses"]
        assert statuses <= set(responses), (path, set(responses))
        for status in statuses - {"200", "202"}:
            assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith("/Error")


@pytest.mark.parametrize(
    "ref, valid",
    [("imagenet", True), ("a", True), ("digits:abc123", True), ("my.model-1_x:v2", True), ("Imagenet", False),
     ("a:", False), (":v", False), ("a b", False), ("³¡", False), ("-a", False), ("a:b:c", False), ("a\n", False)],
)
def test_model_pattern_accepts_only_what_the_store_resolves(ref, valid):
    ecma = MODEL_REF.replace("$", r"\Z")  # in JSON Schema (ECMA) `$` never matches before a final newline
    assert bool(re.search(ecma, ref)) == valid
    if valid:
        name, _, version = ref.partition(":")
        assert store.split_ref(ref) == (name, version or "latest")


def test_job_ids_match_the_declared_pattern():
    from service.finetune.store import new_job_id

    assert re.match(JOB_ID, new_job_id())


def test_refusals_name_the_problem_and_405_lists_every_method(api):
    client, _ = api
    refused = client.post("/classify", data={"top_k": "3"})
    assert refused.status_code == 422 and refused.json() == {"error": "missing 'image'"}
    assert client.post("/classify", json={}).status_code == 415
    not_allowed = client.put("/finetune/ft-20260101-000000-abcdef")
    assert not_allowed.status_code == 405 and not_allowed.headers["allow"] == "DELETE, GET, HEAD"


def test_undeclared_and_repeated_form_fields_are_refused_and_empty_means_default(api):
    client, spec = api
    image = {"image": ("x.png", b"\x89PNG", "image/png")}
    unknown = client.post("/classify", files=image, data={"topk": "3"})
    assert unknown.status_code == 422 and "unknown form fields ['topk']" in unknown.json()["error"]
    twice = client.post("/classify", files=[("image", image["image"]), ("top_k", (None, "1")), ("top_k", (None, "2"))])
    assert twice.status_code == 422 and "['top_k'] were sent more than once" in twice.json()["error"]
    classify, _ = _body(spec, "/classify")
    assert {"type": "string", "maxLength": 0} in classify["properties"]["top_k"]["anyOf"]  # Swagger UI sends empty fields
