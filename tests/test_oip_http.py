"""The OIP over REST exactly as Triton speaks it, with the real tritonclient.http (sync and aio)
against the real server: every output type (FP32, BYTES, BOOL) as binary data and as JSON, the
request id echoed, `binary_data_output`, and errors as `{"error": ...}` with their status."""
import asyncio
import json

import numpy as np
import pytest

from tests.serving import bento_store, running_server
from tests.tiny import solid_png, write_tiny_model, write_trusted_tiny_model

pytestmark = pytest.mark.slow
httpclient = pytest.importorskip("tritonclient.http")
aioclient = pytest.importorskip("tritonclient.http.aio")
from tritonclient.utils import InferenceServerException  # noqa: E402

LABELS = ["red", "green", "blue"]
WEIGHTS = np.array([[0.03, -0.01, 0.0], [0.0, 0.02, -0.01], [-0.01, 0.0, 0.025]], np.float32)
COLOURS = [(220, 40, 60), (250, 250, 0), (40, 70, 210)]
IMAGES = [solid_png(colour, fmt=fmt) for colour, fmt in zip(COLOURS, ("PNG", "JPEG", "PNG"))]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import httpx

    base = tmp_path_factory.mktemp("oip-http")
    with bento_store(base / "bento"):
        from models.artifact import store

        store.publish("imagenet", write_tiny_model(base / "plain", weights=WEIGHTS))
        store.publish("trusted", write_trusted_tiny_model(base / "trusted", base / "fit"))
        env = {"TUNESERVE_API_KEY": "k", "TUNESERVE_HOME": str(base / "home"), "TUNESERVE_WORKERS": "1"}
        with running_server(env, base / "server.log") as url:
            with httpx.Client(base_url=url, timeout=30) as http:
                yield url.removeprefix("http://"), http


def _inputs():
    tensor = httpclient.InferInput("image", [len(IMAGES)], "BYTES")
    tensor.set_data_from_numpy(np.array(IMAGES, dtype=np.object_))
    return [tensor]


def _classify(http, image: bytes, **fields) -> dict:
    answer = http.post("/classify", files={"image": ("x", image, "application/octet-stream")}, data={"top_k": "3", **fields})
    assert answer.status_code == 200, answer.text
    return answer.json()


def _outputs(binary: bool):
    return [httpclient.InferRequestedOutput("probabilities", binary_data=binary),
            httpclient.InferRequestedOutput("logits", binary_data=binary, class_count=2)]


@pytest.mark.parametrize("binary", [True, False])
def test_fp32_and_bytes_outputs_binary_and_json(served, binary):
    address, http = served
    triton = httpclient.InferenceServerClient(address)
    result = triton.infer("imagenet", _inputs(), outputs=_outputs(binary), request_id=f"req-{binary}")
    assert result.get_response()["id"] == f"req-{binary}"
    described = {o["name"]: o for o in result.get_response()["outputs"]}
    assert ("binary_data_size" in (described["probabilities"].get("parameters") or {})) is binary
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (3, 3)
    ranked = result.as_numpy("logits")
    assert ranked.shape == (3, 2) and described["logits"]["datatype"] == "BYTES"
    for row, top, image in zip(probabilities, ranked, IMAGES):
        expected = {p["label"]: p["probability"] for p in _classify(http, image)["predictions"]}
        assert row == pytest.approx([expected[label] for label in LABELS], abs=1e-6)
        if binary:  # as Triton answers: bytes, so the usual e.decode() works
            assert all(isinstance(entry, bytes) for entry in top)
        entries = [(entry.decode() if binary else entry).split(":") for entry in top]
        assert [label for _, _, label in entries] == sorted(expected, key=expected.get, reverse=True)[:2]
        assert all(LABELS[int(index)] == label for _, index, label in entries)


def test_binary_data_output_answers_every_output_in_binary(served):
    address, http = served
    triton = httpclient.InferenceServerClient(address)
    result = triton.infer("imagenet", _inputs())  # no outputs named: tritonclient asks binary_data_output
    assert {o["name"]: o["parameters"]["binary_data_size"] for o in result.get_response()["outputs"]} == {
        "probabilities": 3 * 3 * 4, "logits": 3 * 3 * 4}
    logits = result.as_numpy("logits")
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert softmax == pytest.approx(result.as_numpy("probabilities"), abs=1e-6)
    body = {"inputs": [{"name": "pixels", "shape": [1, 16, 16, 3], "datatype": "UINT8", "data": [0] * 768}],
            "parameters": {"binary_data_output": True}}
    raw = http.post("/v2/models/imagenet/infer", json=body)
    header = int(raw.headers["inference-header-content-length"])
    assert raw.headers["content-type"] == "application/octet-stream"
    sizes = [o["parameters"]["binary_data_size"] for o in json.loads(raw.content[:header])["outputs"]]
    assert len(raw.content) == header + sum(sizes)


@pytest.mark.parametrize("binary", [True, False])
def test_decision_outputs_bytes_bool_fp32(served, binary):
    address, http = served
    triton = httpclient.InferenceServerClient(address)
    outputs = None if binary else [httpclient.InferRequestedOutput("probabilities", binary_data=False)]
    result = triton.infer("trusted", _inputs(), outputs=outputs, parameters={"min_confidence": "auto"})
    label, abstained, in_domain = (result.as_numpy(name) for name in ("label", "abstained", "in_domain"))
    assert abstained.dtype == np.bool_ and in_domain.dtype == np.float32 and label.shape == (3,)
    for name, value, score, image in zip(label, abstained, in_domain, IMAGES):
        expected = _classify(http, image, model="trusted", min_confidence="auto")
        assert (name.decode() if binary else name) == (expected["label"] or "")
        assert bool(value) is expected["abstained"] and float(score) == pytest.approx(expected["in_domain"], abs=1e-4)


def test_aio_client_agrees_with_sync(served):
    address, _ = served

    async def both():
        client = aioclient.InferenceServerClient(address)
        try:
            ready = await client.is_server_ready() and await client.is_model_ready("imagenet")
            results = [await client.infer("imagenet", _inputs(), outputs=_outputs(binary)) for binary in (True, False)]
            with pytest.raises(InferenceServerException, match="unknown model"):
                await client.infer("nope", _inputs())
            return ready, results
        finally:
            await client.close()

    ready, (binary, plain) = asyncio.run(both())
    sync = httpclient.InferenceServerClient(address).infer("imagenet", _inputs(), outputs=_outputs(True))
    assert ready
    for result in (binary, plain):
        assert result.as_numpy("probabilities") == pytest.approx(sync.as_numpy("probabilities"), abs=1e-7)
    assert [e.decode() for e in binary.as_numpy("logits").ravel()] == list(plain.as_numpy("logits").ravel())


def test_errors_are_the_protocol_form(served):
    _, http = served
    cases = [
        (http.post("/v2/models/nope/infer", json={"inputs": []}), 404),
        (http.post("/v2/models/imagenet/infer", content=b"{not json", headers={"content-type": "application/json"}), 400),
        (http.post("/v2/models/imagenet/infer", content=b"{}", headers={"inference-header-content-length": "99"}), 400),
        (http.post("/v2/models/imagenet/infer", json={"inputs": [{"name": "pixels", "shape": [1, 16, 16, 3], "datatype": "UINT8",
                                                                  "data": [0] * 768}], "outputs": [{"name": "embedding"}]}), 400),
        (http.post("/v2/models/trusted/infer", json={"inputs": [{"name": "pixels", "shape": [1, 16, 16, 3], "datatype": "UINT8",
                                                                 "data": [0] * 768}], "parameters": {"min_confidence": "AUTO"}}), 422),
    ]
    for answer, status in cases:
        assert answer.status_code == status and answer.headers["content-type"] == "application/json", answer.text
        assert set(answer.json()) == {"error"} and answer.json()["error"]
    same_rule = http.post("/classify", files={"image": ("x", IMAGES[0], "image/png")}, data={"model": "trusted", "min_confidence": "AUTO"})
    assert same_rule.status_code == 422 and same_rule.json()["error"] == cases[-1][0].json()["error"]
