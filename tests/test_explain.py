"""Evidence maps served: in process, only asked requests fetch the `evidence` output; against the real
server, /classify and /classify_batch with `explain`, and the OIP `evidence` output over REST and gRPC
(tritonclient)."""
import asyncio
import base64
import io

import numpy as np
import pytest

from models.serving.evidence import area_weights, summarise
from tests.serving import bento_store, free_port, running_server
from tests.tiny import write_tiny_model
from tests.tiny_evidence import half_red_png, write_explained_tiny_model

LABELS = ["red", "green", "blue"]


def test_summary_keeps_the_sum_and_normalises():
    cells = np.random.default_rng(0).normal(size=(5, 7))
    summary = summarise(cells, 14)
    assert summary.grid.shape == (14, 14) and np.abs(summary.grid).max() == pytest.approx(1.0)
    assert (summary.grid * summary.scale).sum() == pytest.approx(cells.sum()) == pytest.approx(summary.total)
    np.testing.assert_allclose(area_weights(14, 5).sum(0), 1.0)


def test_only_requests_that_ask_fetch_the_evidence_output(bento_home, tmp_path):
    from models.artifact import store
    from service.config import Settings
    from service.dataplane import DataPlane, InferenceRequest
    from service.pool import ModelPool

    store.publish("explained", write_explained_tiny_model(tmp_path / "v"))
    settings = Settings.of(home=tmp_path / "home", auth=False, default_model="explained", workers=1, device="cpu")
    pixels = np.zeros((2, 16, 16, 3), np.uint8)
    pixels[:, :, :8, 0] = 255

    async def main():
        pool, seen = ModelPool(settings), []
        plane = DataPlane(pool, settings)
        try:
            classifier = await plane.resolve("explained")
            run = classifier.run
            classifier.run = lambda batch, outputs: seen.append(tuple(outputs)) or run(batch, outputs)
            plain = await plane.infer(InferenceRequest(model=classifier, pixels=pixels, outputs=frozenset(), top_k=1))
            with_logits = await plane.infer(InferenceRequest(model=classifier, pixels=pixels, outputs=frozenset({"logits"}), top_k=1))
            asked = await plane.infer(InferenceRequest(model=classifier, pixels=pixels, outputs=frozenset({"evidence", "logits"}), top_k=1))
            return seen, plain, with_logits, asked
        finally:
            await pool.stop()
            await plane.close()

    seen, plain, with_logits, asked = asyncio.run(main())
    assert all("evidence" not in outputs for outputs in seen[:2]) and "evidence" in seen[2]
    assert plain.images[0].evidence is None and with_logits.images[0].evidence is None
    evidence, logits = asked.stacked("evidence"), asked.stacked("logits")
    assert evidence.shape == (2, 3, 16, 16)
    np.testing.assert_allclose(evidence.sum((2, 3)), logits, atol=1e-5)  # this model's bias is 0
    assert (asked.images[0].pixels == pixels[0]).all()  # kept for overlays only when evidence was asked
    assert plain.images[0].pixels is None


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import httpx

    base = tmp_path_factory.mktemp("explain")
    grpc_port = free_port()
    with bento_store(base / "bento"):
        from models.artifact import store

        store.publish("explained", write_explained_tiny_model(base / "v1"))
        store.publish("plain", write_tiny_model(base / "v2"))
        env = {"TUNESERVE_HOME": str(base / "home"), "TUNESERVE_WORKERS": "1", "TUNESERVE_DEFAULT_MODEL": "explained",
               "TUNESERVE_GRPC_PORT": str(grpc_port)}
        with running_server(env, base / "server.log") as url:
            with httpx.Client(base_url=url, timeout=30) as http:
                yield url, http, grpc_port


def classify(http, route: str = "/classify", **fields):
    files = {"image": ("x.png", half_red_png(), "image/png")} if route == "/classify" else \
        [("images", ("a.png", half_red_png(), "image/png")), ("images", ("b.png", half_red_png(), "image/png"))]
    return http.post(route, files=files, data={key: str(value) for key, value in fields.items()})


@pytest.mark.slow
def test_classify_explain_answers_a_grid_that_sums_to_the_logit(served):
    _, http, _ = served
    plain = classify(http).json()
    assert plain["evidence"] is None  # asked for, never paid for otherwise
    answer = classify(http, explain="true").json()
    evidence = answer["evidence"]
    assert answer["label"] == evidence["label"] == "red"
    grid = np.array(evidence["grid"])
    assert grid.shape == (14, 14) and np.abs(grid).max() == pytest.approx(1.0)
    assert grid.sum() * evidence["scale"] == pytest.approx(evidence["logit"] - evidence["bias"], abs=1e-3)
    assert evidence["bias"] == pytest.approx(0.0, abs=1e-4)
    assert grid[:, :7].min() > 0.99 and np.abs(grid[:, 7:]).max() < 1e-6  # red evidence only on the red half
    assert evidence["overlay_png"] is None
    blue = classify(http, explain_label="blue", explain_overlay="true").json()["evidence"]
    assert blue["label"] == "blue" and blue["logit"] == pytest.approx(0.0, abs=1e-6)
    from PIL import Image

    overlay = Image.open(io.BytesIO(base64.b64decode(blue["overlay_png"])))
    assert overlay.format == "PNG" and overlay.size == (224, 224)


@pytest.mark.slow
def test_classify_explain_refusals_and_batch(served):
    _, http, _ = served
    unknown = classify(http, explain="true", explain_label="purple")
    assert unknown.status_code == 422 and "purple" in unknown.json()["error"]
    without = classify(http, explain="true", model="plain")
    assert without.status_code == 409 and "no evidence maps" in without.json()["error"]
    batch = classify(http, "/classify_batch", explain="true").json()
    assert [item["evidence"]["label"] for item in batch["results"]] == ["red", "red"]


@pytest.mark.slow
def test_oip_evidence_output_over_rest_and_grpc(served):
    url, _, grpc_port = served
    httpclient = pytest.importorskip("tritonclient.http")
    grpcclient = pytest.importorskip("tritonclient.grpc")
    pixels = np.zeros((2, 16, 16, 3), np.uint8)
    pixels[:, :, :8, 0] = 255
    results = []
    for module, address in ((httpclient, url.removeprefix("http://")), (grpcclient, f"127.0.0.1:{grpc_port}")):
        client = module.InferenceServerClient(address)
        tensor = module.InferInput("pixels", list(pixels.shape), "UINT8")
        tensor.set_data_from_numpy(pixels)
        outputs = [module.InferRequestedOutput("evidence"), module.InferRequestedOutput("logits")]
        answer = client.infer("explained", [tensor], outputs=outputs)
        results.append((answer.as_numpy("evidence"), answer.as_numpy("logits")))
        metadata = client.get_model_metadata("explained")
        names = [o["name"] for o in metadata["outputs"]] if isinstance(metadata, dict) else [o.name for o in metadata.outputs]
        assert "evidence" in names
        client.close()
    for evidence, logits in results:
        assert evidence.shape == (2, 3, 16, 16)
        np.testing.assert_allclose(evidence.sum((2, 3)), logits, atol=1e-5)
    np.testing.assert_array_equal(results[0][0], results[1][0])


def test_score_evidence_writes_an_overlay_per_image_and_refuses_models_without_maps(bento_home, tmp_path, capsys):
    from PIL import Image

    from models.artifact import store
    from tuneserve.cli import main

    store.publish("explained", write_explained_tiny_model(tmp_path / "v"))
    store.publish("plain", write_tiny_model(tmp_path / "p"))
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "a.png").write_bytes(half_red_png())
    (images / "sub" / "b.png").write_bytes(half_red_png())
    (images / "broken.png").write_bytes(b"not an image")
    code = main(["score", "--model", "explained", "--input", str(images), "--output", str(tmp_path / "s.csv"),
                 "--no-progress", "--evidence", str(tmp_path / "maps")])
    assert code == 0 and "wrote 2 evidence overlays" in capsys.readouterr().err
    overlay = np.asarray(Image.open(tmp_path / "maps" / "sub" / "b.png").convert("RGB"), np.int64)
    assert overlay.shape == (224, 224, 3)
    assert overlay[:, :100, 1].mean() > 20  # the red half gets the orange-red overlay (green channel raised)
    assert np.abs(overlay[:, 130:]).max() == 0  # no evidence on the black half: left untouched
    code = main(["score", "--model", "plain", "--input", str(images), "--output", str(tmp_path / "t.csv"),
                 "--no-progress", "--evidence", str(tmp_path / "none")])
    assert code != 0
    assert "no evidence maps" in capsys.readouterr().err and not (tmp_path / "t.csv").exists()
