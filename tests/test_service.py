"""Integration tests against a real `bentoml serve` of service.service:TuneServe (tiny ONNX models).

One server per module, on a free loopback port, with a private BentoML store. The hot reload
test publishes a new version into that store while a client keeps sending requests; it runs last
because it moves `latest`.
"""
from __future__ import annotations

import io
import os
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.serving import bento_store, running_server
from tests.tiny import solid_png, write_tiny_model

pytestmark = pytest.mark.slow

httpx = pytest.importorskip("httpx")
KEY = "test-key-123"


@pytest.fixture(scope="module")
def store_home(tmp_path_factory):
    with bento_store(tmp_path_factory.mktemp("bentoml")) as home:
        yield home


@pytest.fixture(scope="module")
def server(store_home, tmp_path_factory):
    from models.artifact import store

    stage = tmp_path_factory.mktemp("stage")
    v1 = store.publish("imagenet", write_tiny_model(stage / "v1", accuracy=0.9))
    weak = np.full((3, 3), 0.001, np.float32)  # a second model with the same labels, barely confident
    store.publish("weak", write_tiny_model(stage / "weak", weights=weak))
    data_root = tmp_path_factory.mktemp("data")
    _write_dataset(data_root / "colours")
    log = tmp_path_factory.mktemp("log") / "server.log"
    env = {
        "TUNESERVE_API_KEY": KEY,
        "TUNESERVE_MAX_BODY_MB": "1",
        "TUNESERVE_MAX_PIXELS": "1000000",
        "TUNESERVE_MAX_BATCH": "4",
        "TUNESERVE_MAX_TOP_K": "10",
        "TUNESERVE_POLL_SECONDS": "0.5",
        "TUNESERVE_DATA_ROOT": str(data_root),
        "TUNESERVE_HOME": str(tmp_path_factory.mktemp("home")),
    }
    with running_server(env, log) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield {"client": client, "v1": v1, "stage": stage, "log": log, "data_root": data_root}


def _write_dataset(root: Path, extra_label: str | None = None) -> Path:
    for label in ("red", "green", "blue"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            (root / label / f"{i}.png").write_bytes(solid_png(label, (20 + i, 20)))
    if extra_label:
        (root / extra_label).mkdir(exist_ok=True)
        (root / extra_label / "0.png").write_bytes(solid_png((128, 0, 128)))
    return root


def _zip_of(root: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for path in sorted(root.rglob("*.png")):
            bundle.write(path, path.relative_to(root.parent).as_posix())
    return buffer.getvalue()


def _classify(client, data: bytes, **fields):
    return client.post("/classify", files={"image": ("x.png", data, "image/png")}, data=fields)


def _assert_refused(response, status: int, *words: str):
    assert response.status_code == status, response.text
    message = response.json()["error"]
    for word in words:
        assert word in message, message


# ---- health ----------------------------------------------------------------------------------
def test_health_routes(server):
    client = server["client"]
    for route in ("/healthz", "/livez", "/readyz"):
        assert client.get(route).status_code == 200


# ---- classify --------------------------------------------------------------------------------
def test_classify(server):
    response = _classify(server["client"], solid_png("red"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "imagenet" and body["version"] == server["v1"].version
    assert body["predictions"][0]["label"] == "red" and len(body["predictions"]) == 3
    two = _classify(server["client"], solid_png("blue", fmt="JPEG"), top_k="2", model="imagenet").json()
    assert [p["label"] for p in two["predictions"]][:1] == ["blue"] and len(two["predictions"]) == 2
    pinned = _classify(server["client"], solid_png("green"), model=f"imagenet:{server['v1'].version}")
    assert pinned.status_code == 200 and pinned.json()["predictions"][0]["label"] == "green"


def test_classify_other_model_loads_lazily(server):
    body = _classify(server["client"], solid_png("red"), model="weak").json()
    assert body["model"] == "weak" and body["predictions"][0]["probability"] < 0.5


@pytest.mark.parametrize("top_k", ["0", "11", "two"])
def test_classify_refuses_bad_top_k(server, top_k):
    _assert_refused(_classify(server["client"], solid_png("red"), top_k=top_k), 422, "top_k")


def test_classify_refuses_unknown_model(server):
    _assert_refused(_classify(server["client"], solid_png("red"), model="nope"), 404, "unknown model 'nope'")
    _assert_refused(
        _classify(server["client"], solid_png("red"), model="imagenet:nosuchversion"), 404, "no version"
    )
    for bad in ("imagenet:a/b", "imagenet:-x", "Bad Name"):
        response = _classify(server["client"], solid_png("red"), model=bad)
        assert response.status_code == 422, response.text
    assert server["client"].get("/models/imagenet:a%2Fb").status_code in (404, 422)


def test_classify_refuses_bad_images(server):
    client = server["client"]
    _assert_refused(_classify(client, b"this is not an image"), 400, "not a recognised image")
    truncated = solid_png("red", (64, 64), fmt="JPEG")[:200]
    _assert_refused(_classify(client, truncated), 400, "image")
    ppm = b"P6\n4 4\n255\n" + bytes(48)
    _assert_refused(_classify(client, ppm), 415, "format PPM is not allowed")
    bomb = solid_png("red", (1100, 1000))  # 1.1 Mpx, a few KB compressed; limit is 1 Mpx
    _assert_refused(_classify(client, bomb), 413, "pixels")
    _assert_refused(client.post("/classify", data={"top_k": "1"}), 422, "missing 'image'")
    _assert_refused(client.post("/classify", data={"image": "http://example.com/cat.jpg"}), 422, "URLs are not accepted")
    _assert_refused(client.post("/classify", json={"image": "x"}), 415, "multipart")


def test_body_limit(server):
    client = server["client"]
    big = os.urandom(1024 * 1024 + 10)
    _assert_refused(_classify(client, big), 413, "limit is 1048576 bytes")

    def chunks():  # no Content-Length: counted while streaming
        yield b'--abc\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'
        for _ in range(20):
            yield b"x" * 65536

    response = client.post(
        "/classify", content=chunks(), headers={"content-type": "multipart/form-data; boundary=abc"}
    )
    _assert_refused(response, 413, "limit")
    assert _classify(client, solid_png("red")).status_code == 200  # the server is fine afterwards


# ---- classify_batch --------------------------------------------------------------------------
def test_classify_batch_with_a_bad_image(server):
    files = [
        ("images", ("r.png", solid_png("red"), "image/png")),
        ("images", ("bad.png", b"garbage", "image/png")),
        ("images", ("b.jpg", solid_png("blue", fmt="JPEG"), "image/jpeg")),
    ]
    response = server["client"].post("/classify_batch", files=files, data={"top_k": "1"})
    assert response.status_code == 200, response.text
    body = response.json()
    results = body["results"]
    assert [r["filename"] for r in results] == ["r.png", "bad.png", "b.jpg"]
    assert results[0]["predictions"] == [{"label": "red", "probability": pytest.approx(1, abs=1e-3)}]
    assert results[1]["status"] == 400 and "not a recognised image" in results[1]["error"]
    assert results[2]["predictions"][0]["label"] == "blue"
    assert body["succeeded"] == 2 and body["failed"] == 1


def test_classify_batch_refusals(server):
    client = server["client"]
    files = [("images", (f"{i}.png", solid_png("red"), "image/png")) for i in range(5)]
    _assert_refused(client.post("/classify_batch", files=files), 422, "at most 4 items")
    many = [("images", (f"{i}.png", solid_png("red"), "image/png")) for i in range(12)]
    _assert_refused(client.post("/classify_batch", files=many), 413, "too many files")
    _assert_refused(client.post("/classify_batch", data={"model": "imagenet"}), 422, "missing 'images'")


# ---- evaluate --------------------------------------------------------------------------------
def test_evaluate_zip_and_compare(server, tmp_path):
    archive = _zip_of(_write_dataset(tmp_path / "colours"))
    client = server["client"]
    response = client.post("/evaluate", files={"dataset": ("d.zip", archive, "application/zip")}, data={"top_k": "2"})
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["accuracy"] == 1.0 and report["samples"] == 6 and report["model"].startswith("imagenet:")
    compared = client.post(
        "/evaluate", files={"dataset": ("d.zip", archive, "application/zip")}, data={"compare_with": "weak"}
    ).json()
    assert compared["compare_with"]["model"].startswith("weak:") and "difference" in compared
    assert compared["accuracy"] == 1.0 and compared["compared_on"]["samples"] == 6  # same labels: every image
    assert compared["difference"]["accuracy"] == pytest.approx(1.0 - compared["compare_with"]["accuracy"])


def test_evaluate_data_path(server):
    client = server["client"]
    report = client.post("/evaluate", data={"data_path": "colours"}).json()
    assert report["accuracy"] == 1.0
    _assert_refused(client.post("/evaluate", data={"data_path": "../etc"}), 403, "outside the data root")
    _assert_refused(client.post("/evaluate", data={"data_path": "/etc"}), 403, "outside the data root")
    _assert_refused(client.post("/evaluate", data={"data_path": "missing"}), 404, "does not exist")
    _assert_refused(client.post("/evaluate", data={"model": "imagenet"}), 400, "exactly one of 'dataset'")


def test_evaluate_refusals(server, tmp_path):
    client = server["client"]
    unknown = _zip_of(_write_dataset(tmp_path / "more", extra_label="purple"))
    _assert_refused(
        client.post("/evaluate", files={"dataset": ("d.zip", unknown, "application/zip")}), 422, "purple"
    )
    _assert_refused(
        client.post("/evaluate", files={"dataset": ("d.zip", b"not a zip", "application/zip")}), 422, "not a valid zip"
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr("../evil/red/0.png", solid_png("red"))
    _assert_refused(
        client.post("/evaluate", files={"dataset": ("d.zip", buffer.getvalue(), "application/zip")}), 422, "unsafe path"
    )
    corrupt = bytearray(_zip_of(_write_dataset(tmp_path / "corrupt")))
    start = corrupt.index(b"PK\x03\x04") + 30 + len("corrupt/blue/0.png")
    corrupt[start + 5 : start + 25] = b"\xff" * 20  # damage the first entry's data: CRC mismatch
    _assert_refused(
        client.post("/evaluate", files={"dataset": ("d.zip", bytes(corrupt), "application/zip")}), 422, "cannot extract"
    )


# ---- models, metrics, API key ----------------------------------------------------------------
def test_models_routes(server):
    client = server["client"]
    listing = client.get("/models").json()
    assert listing["default_model"] == "imagenet"
    assert {"imagenet", "weak"} <= set(listing["models"])
    entry = listing["models"]["imagenet"]
    assert entry["latest"] == server["v1"].version and entry["versions"][0]["labels"] == 3
    assert entry["versions"][0]["eval"]["accuracy"] == 0.9
    loaded = listing["loaded"][server["v1"].tag]
    assert loaded["providers"] == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider" in loaded["skipped_providers"]
    assert 1 <= listing["runtime"]["worker_index"] <= len(os.sched_getaffinity(0))  # one worker per core by default
    one = client.get("/models/imagenet").json()
    assert one["versions"][0]["manifest"]["labels"] == ["red", "green", "blue"]
    _assert_refused(client.get("/models/nope"), 404, "unknown model")


def test_metrics(server):
    _classify(server["client"], solid_png("red"))
    text = server["client"].get("/metrics").text
    assert 'tuneserve_requests_total{model="imagenet",outcome="ok",route="classify"}' in text
    _classify(server["client"], b"not an image")  # refused after the model was chosen
    _classify(server["client"], solid_png("red"), model="nope")  # refused before
    text = server["client"].get("/metrics").text
    assert 'tuneserve_requests_total{model="imagenet",outcome="refused",route="classify"}' in text
    assert 'tuneserve_requests_total{model="-",outcome="refused",route="classify"}' in text
    assert 'tuneserve_batch_size_count{model="imagenet"}' in text
    assert 'tuneserve_inference_seconds_bucket' in text
    assert "bentoml_service_request_total" in text


def test_api_key_guards_mutating_route(server):
    client = server["client"]
    _assert_refused(client.post("/models/imagenet/reload"), 401, "API key")
    _assert_refused(client.post("/models/imagenet/reload", headers={"Authorization": "Bearer wrong"}), 401, "invalid")
    ok = client.post("/models/imagenet/reload", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json()["model"] == "imagenet"
    assert _classify(client, solid_png("red")).status_code == 200  # reading routes stay open


def test_provider_choice_is_logged(server):
    text = server["log"].read_text()
    assert "skipped CUDAExecutionProvider" in text and "on ['CPUExecutionProvider']" in text


# ---- hot reload (last: it moves `latest`) ------------------------------------------------------
def test_zz_hot_reload_under_traffic(server):
    from models.artifact import store

    client = server["client"]
    seen: list[tuple[str, int]] = []
    stop = threading.Event()

    def traffic():
        with httpx.Client(base_url=client.base_url, timeout=30) as own:
            while not stop.is_set():
                response = _classify(own, solid_png("red"))
                seen.append((response.json().get("version", ""), response.status_code))

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    v2 = store.publish("imagenet", write_tiny_model(server["stage"] / "v2"))
    published = time.monotonic()
    try:
        while time.monotonic() - published < 10 and not any(v == v2.version for v, _ in seen):
            time.sleep(0.1)
        switched_after = time.monotonic() - published
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert seen and all(status == 200 for _, status in seen), [s for s in seen if s[1] != 200][:5]
    assert any(v == v2.version for v, _ in seen), f"new version not served within 10 s; saw {set(v for v, _ in seen)}"
    assert switched_after < 5
    assert {v for v, _ in seen} <= {server["v1"].version, v2.version}
    assert seen[-1][0] == v2.version
