"""The Open Inference Protocol (/v2) with the real tritonclient[http] against the real server:
health, metadata, BYTES images and UINT8 pixels, the classification extension, versions, refusals;
answers agree with /classify to 1e-5."""
import io

import numpy as np
import pytest

from tests.serving import bento_store, running_server
from tests.tiny import write_tiny_model

pytestmark = pytest.mark.slow
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

LABELS = ["red", "green", "blue"]
WEIGHTS = np.array([[0.03, -0.01, 0.0], [0.0, 0.02, -0.01], [-0.01, 0.0, 0.025]], np.float32)  # answers that are not ~1.0


def _image(seed: int, fmt: str) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (23, 31, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


IMAGES = [_image(1, "JPEG"), _image(2, "PNG"), _image(3, "JPEG")]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import httpx

    base = tmp_path_factory.mktemp("v2")
    with bento_store(base / "bento"):
        from models.artifact import store

        version = store.publish("imagenet", write_tiny_model(base / "v1", weights=WEIGHTS))
        env = {"TUNESERVE_API_KEY": "k", "TUNESERVE_HOME": str(base / "home"), "TUNESERVE_WORKERS": "1", "TUNESERVE_MAX_BATCH": "4"}
        with running_server(env, base / "server.log") as url:
            triton = httpclient.InferenceServerClient(url=url.removeprefix("http://"))
            with httpx.Client(base_url=url, timeout=30) as http:
                yield triton, http, version


def _classify(http, image: bytes) -> dict[str, float]:
    answer = http.post("/classify", files={"image": ("x", image, "application/octet-stream")}, data={"top_k": "3"})
    assert answer.status_code == 200, answer.text
    return {p["label"]: p["probability"] for p in answer.json()["predictions"]}


def _bytes_input(images: list[bytes]):
    tensor = httpclient.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))  # binary by default, as tritonclient sends it
    return tensor


def test_health_and_metadata(served):
    triton, _, version = served
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("imagenet") and triton.is_model_ready("imagenet", version.version)
    assert not triton.is_model_ready("nope")
    server = triton.get_server_metadata()
    assert server["name"] == "tuneserve" and {"classification", "binary_tensor_data"} <= set(server["extensions"])
    metadata = triton.get_model_metadata("imagenet")
    assert metadata["platform"] == "onnxruntime_onnx" and version.version in metadata["versions"]
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in metadata["inputs"]} == {
        ("image", "BYTES", (-1,)), ("pixels", "UINT8", (-1, 16, 16, 3))}
    assert {t["name"] for t in metadata["outputs"]} == {"probabilities", "logits"}


def test_infer_bytes_agrees_with_classify(served):
    triton, http, version = served
    outputs = [httpclient.InferRequestedOutput("probabilities"), httpclient.InferRequestedOutput("logits")]
    result = triton.infer("imagenet", [_bytes_input(IMAGES)], outputs=outputs, model_version=version.version)
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (3, 3) and result.get_response()["model_version"] == version.version
    for row, image in zip(probabilities, IMAGES):
        expected = _classify(http, image)
        assert row == pytest.approx([expected[label] for label in LABELS], abs=1e-5)
    logits = result.as_numpy("logits")
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert softmax == pytest.approx(probabilities, abs=1e-5)


def test_infer_uint8_pixels_and_classification_extension(served):
    from PIL import Image

    from models.serving.preprocess import resize_and_crop
    from models.artifact.store import resolve

    triton, http, version = served
    spec = resolve("imagenet").manifest().preprocessing
    pixels = np.stack([resize_and_crop(Image.open(io.BytesIO(image)).convert("RGB"), spec) for image in IMAGES])
    tensor = httpclient.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    top = httpclient.InferRequestedOutput("probabilities", binary_data=False, class_count=3)
    result = triton.infer("imagenet", [tensor], outputs=[top])
    ranked = result.as_numpy("probabilities")
    assert ranked.shape == (3, 3)
    for row, image in zip(ranked, IMAGES):
        expected = _classify(http, image)
        parsed = [str(entry if isinstance(entry, str) else entry.decode()).split(":") for entry in row]
        assert [label for _, _, label in parsed] == sorted(expected, key=expected.get, reverse=True)
        for probability, index, label in parsed:
            assert LABELS[int(index)] == label and float(probability) == pytest.approx(expected[label], abs=1e-5)


def test_refusals_name_the_problem(served):
    triton, http, _ = served
    with pytest.raises(InferenceServerException, match="image 1 of the batch"):
        triton.infer("imagenet", [_bytes_input([IMAGES[0], b"not an image"])])
    with pytest.raises(InferenceServerException, match="unknown model"):
        triton.infer("nope", [_bytes_input(IMAGES[:1])])
    with pytest.raises(InferenceServerException, match="too many images"):
        triton.infer("imagenet", [_bytes_input(IMAGES + IMAGES)])
    wrong = httpclient.InferInput("pixels", [1, 8, 8, 3], "UINT8")
    wrong.set_data_from_numpy(np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(InferenceServerException, match=r"shape \[N, 16, 16, 3\]"):
        triton.infer("imagenet", [wrong])
    refused = http.post("/v2/models/imagenet/infer", json={"inputs": []})
    assert refused.status_code == 400 and "inputs" in refused.json()["error"]
