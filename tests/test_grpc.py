"""The OIP over gRPC with the real tritonclient.grpc against the real server (two workers sharing
the port): health, metadata, BYTES JPEG and UINT8 inputs, the classification extension, answers
equal to /classify; API keys (reads protected here), the message size limit and refusals mapped to
gRPC status codes."""
import io
import time

import numpy as np
import pytest

from tests.serving import bento_store, free_port, running_server
from tests.tiny import write_tiny_model

pytestmark = pytest.mark.slow
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

LABELS = ["red", "green", "blue"]
WEIGHTS = np.array([[0.03, -0.01, 0.0], [0.0, 0.02, -0.01], [-0.01, 0.0, 0.025]], np.float32)
KEY = {"authorization": "Bearer k"}
MAX_BODY_MB = 6  # above gRPC's 4 MB default


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (23, 31, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


IMAGES = [_jpeg(seed) for seed in (1, 2, 3)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import httpx

    base = tmp_path_factory.mktemp("grpc")
    port = free_port()
    with bento_store(base / "bento"):
        from models.artifact import store

        version = store.publish("imagenet", write_tiny_model(base / "v1", weights=WEIGHTS))
        env = {"TUNESERVE_API_KEY": "k", "TUNESERVE_PROTECT_READS": "1", "TUNESERVE_HOME": str(base / "home"),
               "TUNESERVE_WORKERS": "2", "TUNESERVE_MAX_BATCH": "4", "TUNESERVE_GRPC_PORT": str(port),
               "TUNESERVE_MAX_BODY_MB": str(MAX_BODY_MB)}
        with running_server(env, base / "server.log") as url:
            with httpx.Client(base_url=url, timeout=30, headers=KEY) as http:
                client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
                yield client, http, version, base / "server.log"
                client.close()


def _classify(http, image: bytes) -> dict[str, float]:
    answer = http.post("/classify", files={"image": ("x.jpg", image, "image/jpeg")}, data={"top_k": "3"})
    assert answer.status_code == 200, answer.text
    return {p["label"]: p["probability"] for p in answer.json()["predictions"]}


def _bytes_input(images: list[bytes]):
    tensor = grpcclient.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def _status(call) -> str:
    with pytest.raises(InferenceServerException) as refused:
        call()
    return f"{refused.value.status()} {refused.value.message()}"


def test_health_and_metadata_on_every_worker(served):
    client, _, version, log = served
    assert client.is_server_live(headers=KEY)
    deadline = time.monotonic() + 60  # a connection may reach the second worker while it still loads its models
    while not client.is_server_ready(headers=KEY) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert client.is_server_ready(headers=KEY)
    assert client.is_model_ready("imagenet", headers=KEY) and client.is_model_ready("imagenet", version.version, headers=KEY)
    assert not client.is_model_ready("nope", headers=KEY)
    server = client.get_server_metadata(headers=KEY)
    assert server.name == "tuneserve" and {"classification", "binary_tensor_data"} <= set(server.extensions)
    metadata = client.get_model_metadata("imagenet", headers=KEY)
    assert metadata.platform == "onnxruntime_onnx" and version.version in metadata.versions
    assert {(t.name, t.datatype, tuple(t.shape)) for t in metadata.inputs} == {("image", "BYTES", (-1,)), ("pixels", "UINT8", (-1, 16, 16, 3))}
    assert {(t.name, t.datatype, tuple(t.shape)) for t in metadata.outputs} == {("probabilities", "FP32", (-1, 3)), ("logits", "FP32", (-1, 3))}
    deadline = time.monotonic() + 60  # /readyz answers once one worker is ready; the other may still be starting
    while log.read_text().count("gRPC (Open Inference Protocol) on port") < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert log.read_text().count("gRPC (Open Inference Protocol) on port") == 2  # both workers bound the shared port


def test_bytes_jpeg_equal_to_classify(served):
    client, http, version, _ = served
    outputs = [grpcclient.InferRequestedOutput("probabilities"), grpcclient.InferRequestedOutput("logits")]
    result = client.infer("imagenet", [_bytes_input(IMAGES)], outputs=outputs, model_version=version.version,
                          request_id="r-1", headers=KEY)
    response = result.get_response()
    assert response.id == "r-1" and response.model_version == version.version
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (3, 3)
    for row, image in zip(probabilities, IMAGES):
        expected = _classify(http, image)
        assert row == pytest.approx([expected[label] for label in LABELS], abs=1e-6)
    logits = result.as_numpy("logits")
    assert np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True) == pytest.approx(probabilities, abs=1e-6)


def test_uint8_pixels_and_classification_extension(served):
    from PIL import Image

    from models.serving.preprocess import resize_and_crop
    from models.artifact.store import resolve

    client, http, _, _ = served
    spec = resolve("imagenet").manifest().preprocessing
    pixels = np.stack([resize_and_crop(Image.open(io.BytesIO(image)).convert("RGB"), spec) for image in IMAGES])
    tensor = grpcclient.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    top = grpcclient.InferRequestedOutput("probabilities", class_count=2)
    ranked = client.infer("imagenet", [tensor], outputs=[top], headers=KEY).as_numpy("probabilities")
    assert ranked.shape == (3, 2)
    for row, image in zip(ranked, IMAGES):
        expected = _classify(http, image)
        entries = [entry.decode().split(":") for entry in row]
        assert [label for _, _, label in entries] == sorted(expected, key=expected.get, reverse=True)[:2]
        for value, index, label in entries:
            assert LABELS[int(index)] == label and float(value) == pytest.approx(expected[label], abs=1e-6)


def test_keys_limits_and_refusals(served):
    client, _, _, _ = served
    infer = client.infer
    assert _status(lambda: client.is_server_live()).startswith("StatusCode.UNAUTHENTICATED")
    assert _status(lambda: infer("imagenet", [_bytes_input(IMAGES[:1])], headers={"authorization": "Bearer nope"})).startswith(
        "StatusCode.UNAUTHENTICATED invalid or revoked API key")
    assert _status(lambda: infer("nope", [_bytes_input(IMAGES[:1])], headers=KEY)).startswith("StatusCode.NOT_FOUND unknown model")
    assert _status(lambda: infer("imagenet", [_bytes_input(IMAGES + IMAGES)], headers=KEY)).startswith(
        "StatusCode.RESOURCE_EXHAUSTED too many images")
    assert _status(lambda: infer("imagenet", [_bytes_input([IMAGES[0], b"not an image"])], headers=KEY)).startswith(
        "StatusCode.INVALID_ARGUMENT image 1 of the batch")
    # 5 MB passes the transport (above gRPC's 4 MB default) and is refused as what it is: not an image
    big = _status(lambda: infer("imagenet", [_bytes_input([b"x" * (5 << 20)])], headers=KEY))
    assert big.startswith("StatusCode.INVALID_ARGUMENT image 0 of the batch")
    too_big = _status(lambda: infer("imagenet", [_bytes_input([b"x" * ((MAX_BODY_MB + 1) << 20)])], headers=KEY))
    assert too_big.startswith("StatusCode.RESOURCE_EXHAUSTED")
    assert client.is_server_ready(headers=KEY)  # the server is still fine


PORT_HELD = """
import asyncio, socket
from service.config import Settings
from service.oip.grpc_server import start_grpc
with socket.socket() as holder:  # no SO_REUSEPORT: the port cannot be shared
    holder.bind(("0.0.0.0", 0))
    holder.listen()
    assert asyncio.run(start_grpc(None, Settings.of(grpc_port=holder.getsockname()[1], auth=False))) is None
assert asyncio.run(start_grpc(None, Settings.of(grpc_port=0, auth=False))) is None  # 0: gRPC off
"""


def test_a_port_held_by_another_process_leaves_http_serving():
    import subprocess
    import sys

    from tests.serving import ROOT

    # its own process: tritonclient.grpc, imported here, registers the same `inference.*` protobuf names
    done = subprocess.run([sys.executable, "-c", PORT_HELD], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "no gRPC: cannot bind port" in done.stderr and "TUNESERVE_GRPC_PORT" in done.stderr
