"""min_confidence and in_domain over HTTP: the real app and model pool (in process), tiny torch-free models.

`trusted` is calibrated the way export does it (temperature, per-label thresholds, ood.npz);
`old` was "exported" before any of that and must keep being served.
"""
import pytest
from fastapi.testclient import TestClient

from models.artifact import store
from tests.tiny import solid_png, write_tiny_model, write_trusted_tiny_model

RED = (220, 40, 60)
YELLOW = (250, 250, 0)  # two channels high: no training image looks like it
BLUE = (40, 70, 210)
MURKY = (120, 100, 110)  # no channel dominates: a doubtful red


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from service.app import create_app
    from service.config import load_settings
    from service.pool import ModelPool
    from tests.conftest import _point_bentoml_at

    root = tmp_path_factory.mktemp("trust-http")
    _point_bentoml_at(root / "bentoml")
    try:
        trusted = store.publish("trusted", write_trusted_tiny_model(root / "stage" / "trusted", root / "fit"))
        old = store.publish("old", write_tiny_model(root / "stage" / "old"))
        settings = load_settings({"TUNESERVE_AUTH": "off", "TUNESERVE_DEFAULT_MODEL": "trusted",
                                  "TUNESERVE_HOME": str(root / "home"), "TUNESERVE_WORKERS": "1"})
        app = create_app(settings)
        app.state.pool = ModelPool(settings)
        with TestClient(app) as http:
            yield http, trusted, old
    finally:
        _point_bentoml_at(None)


def _classify(http, colour, **fields):
    answer = http.post("/classify", files={"image": ("x.png", solid_png(colour), "image/png")}, data=fields)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_in_domain_on_every_prediction(client):
    http, trusted, _ = client
    red = _classify(http, RED)
    assert red["label"] == "red" and red["abstained"] is False and red["version"] == trusted.version
    assert red["in_domain"] >= 0.05 and _classify(http, YELLOW)["in_domain"] < 0.05


def test_auto_abstains_on_low_confidence_and_out_of_domain(client):
    http, trusted, _ = client
    thresholds = trusted.manifest().thresholds
    red = _classify(http, RED, min_confidence="auto")
    assert red["label"] == "red" and red["probability"] >= thresholds["red"]
    yellow = _classify(http, YELLOW, min_confidence="auto")
    assert yellow["label"] is None and yellow["abstained"] is True
    assert yellow["predictions"] and yellow["predictions"][0]["label"] in thresholds  # ranking still listed
    murky = _classify(http, MURKY, min_confidence="auto", top_k="3")
    assert murky["abstained"] is True and len(murky["predictions"]) == 3


def test_numeric_threshold_and_batch(client):
    http, _, _ = client
    plain = _classify(http, MURKY)
    assert plain["abstained"] is False and plain["label"] == plain["predictions"][0]["label"]
    cut = plain["probability"]
    assert _classify(http, MURKY, min_confidence=str(cut))["label"] == plain["label"]  # at the cut-off: answered
    assert _classify(http, MURKY, min_confidence=str(min(1.0, cut + 0.01)))["label"] is None
    files = [("images", (f"{i}.png", solid_png(c), "image/png")) for i, c in enumerate((RED, YELLOW, BLUE))]
    batch = http.post("/classify_batch", files=files, data={"min_confidence": "auto"}).json()
    assert [r["label"] for r in batch["results"]] == ["red", None, "blue"]
    assert [r["abstained"] for r in batch["results"]] == [False, True, False]
    assert all(r["in_domain"] is not None for r in batch["results"])


@pytest.mark.parametrize("value, words", [("sure", "number in [0, 1] or 'auto'"), ("1.5", "between 0 and 1")])
def test_bad_min_confidence_is_422(client, value, words):
    http, _, _ = client
    answer = http.post("/classify", files={"image": ("x.png", solid_png(RED), "image/png")}, data={"min_confidence": value})
    assert answer.status_code == 422 and words in answer.json()["error"]


def test_versions_before_calibration_still_served(client):
    http, _, old = client
    answer = _classify(http, RED, model="old")
    assert answer["label"] == "red" and answer["in_domain"] is None and answer["abstained"] is False
    assert _classify(http, RED, model="old", min_confidence="0.2")["label"] == "red"
    refused = http.post("/classify", files={"image": ("x.png", solid_png(RED), "image/png")},
                        data={"model": "old", "min_confidence": "auto"})
    assert refused.status_code == 422 and "no per-label thresholds" in refused.json()["error"]


def _v2_body(colours):
    import io

    import numpy as np
    from PIL import Image

    pixels = np.stack([np.asarray(Image.open(io.BytesIO(solid_png(c, (16, 16))))) for c in colours])
    return {"inputs": [{"name": "pixels", "shape": list(pixels.shape), "datatype": "UINT8", "data": pixels.ravel().tolist()}]}


def _v2(http, colours, parameters=None):
    body = _v2_body(colours)
    if parameters is not None:
        body["parameters"] = parameters
    return http.post("/v2/models/trusted/infer", json=body)


def test_v2_min_confidence_adds_the_decision_outputs(client):
    http, _, _ = client
    plain = _v2(http, [RED, YELLOW])
    assert plain.status_code == 200, plain.text
    assert [o["name"] for o in plain.json()["outputs"]] == ["probabilities", "logits"]
    answer = _v2(http, [RED, YELLOW, BLUE], {"min_confidence": "auto"})
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    assert outputs["label"]["data"] == ["red", "", "blue"] and outputs["label"]["datatype"] == "BYTES"
    assert outputs["abstained"]["data"] == [False, True, False] and outputs["abstained"]["shape"] == [3]
    by_classify = [_classify(http, c, min_confidence="auto") for c in (RED, YELLOW, BLUE)]
    assert outputs["in_domain"]["data"] == pytest.approx([p["in_domain"] for p in by_classify], abs=1e-6)
    refused = _v2(http, [RED], {"min_confidence": "sure"})
    assert refused.status_code == 422 and "auto" in refused.json()["error"]
    old = http.post("/v2/models/old/infer", json={**_v2_body([RED]), "parameters": {"min_confidence": "auto"}})
    assert old.status_code == 422 and "number" in old.json()["error"]
    assert http.post("/v2/models/old/infer", json={**_v2_body([RED]), "parameters": {"min_confidence": 0.2}}).status_code == 200
