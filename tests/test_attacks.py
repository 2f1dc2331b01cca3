"""An attacker's corpus against the real server (REST and gRPC, one worker, capture on): no caller
string names a file or replaces another caller's record, and overload is refused at once.

Hostile names (traversal, absolute paths, NUL, very long, unicode, separators) go to every place a
caller names something: the OIP request id (REST and gRPC), model names and versions, capture ids,
feedback ids, X-Client-Id. Each is a 4xx, and nothing appears outside the store. Then admission: a
request held open (its body not yet sent) fills the worker's one place, and the next inference
request, REST or gRPC, is refused 503 / RESOURCE_EXHAUSTED with Retry-After while /livez and
/readyz still answer."""
from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from tests.serving import bento_store, free_port, running_server
from tests.tiny import solid_png, write_tiny_model

pytestmark = pytest.mark.slow
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

KEY = "attack-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
SERVER_ID = re.compile(r"^[0-9a-f]{32}(-[0-9]+)?$")


def hostile(target: Path) -> list[str]:
    """Names an attacker sends: each would write to or read from `target` (or elsewhere) if trusted."""
    return [str(target), "../" * 12 + str(target).lstrip("/"), "..", "../x", "a/b", "a\\b", "a\x00b",
            "x" * 500, "ünïcödé", "a b", "%2e%2e%2f" + target.name, ".hidden", "-dash-first"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import httpx

    base = tmp_path_factory.mktemp("attacks")
    grpc_port = free_port()
    with bento_store(base / "bento"):
        from models.artifact import store

        version = store.publish("colours", write_tiny_model(base / "v1")).version
        env = {"TUNESERVE_API_KEY": KEY, "TUNESERVE_HOME": str(base / "home"), "TUNESERVE_WORKERS": "1",
               "TUNESERVE_DEFAULT_MODEL": "colours", "TUNESERVE_GRPC_PORT": str(grpc_port),
               "TUNESERVE_CAPTURE_MODELS": "colours", "TUNESERVE_CAPTURE_FRACTION": "1",
               "TUNESERVE_CAPTURE_MIN_FREE_MB": "0", "TUNESERVE_MAX_INFLIGHT_REQUESTS": "1",
               "TUNESERVE_RETRY_AFTER_S": "2", "TUNESERVE_ACCESS_LOG": "off"}
        with running_server(env, base / "server.log") as url, httpx.Client(base_url=url, timeout=30) as http:
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
            yield {"http": http, "url": url, "grpc": client, "version": version, "base": base}
            client.close()


def _pixels_body(request_id: str | None) -> dict:
    pixels = np.zeros((1, 16, 16, 3), np.uint8)
    pixels[..., 0] = 220
    body = {"inputs": [{"name": "pixels", "shape": [1, 16, 16, 3], "datatype": "UINT8", "data": pixels.ravel().tolist()}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}]}
    return body if request_id is None else {**body, "id": request_id}


def _files_outside(base: Path, marker: str) -> list[Path]:
    """Anything named after the attack's marker anywhere under the test's folder or /tmp."""
    found = [p for p in base.rglob(f"*{marker}*")]
    return found + [p for p in Path("/tmp").glob(f"*{marker}*")]


def test_hostile_request_ids_are_refused_over_rest_and_grpc_and_write_nothing(served):
    http, client, base = served["http"], served["grpc"], served["base"]
    marker = f"pwned-{time.time_ns()}"
    for name in hostile(base / marker):
        answer = http.post("/v2/models/colours/infer", json=_pixels_body(name))
        assert answer.status_code == 400 and "request id" in answer.json()["error"], (name, answer.text)
        inputs = grpcclient.InferInput("pixels", [1, 16, 16, 3], "UINT8")
        inputs.set_data_from_numpy(np.zeros((1, 16, 16, 3), np.uint8))
        if "\x00" in name or not name.isascii():
            continue  # gRPC metadata-free string fields still carry these; the REST case covered them
        with pytest.raises(InferenceServerException) as refused:
            client.infer("colours", [inputs], request_id=name)
        assert "INVALID_ARGUMENT" in str(refused.value.status()) and "request id" in refused.value.message()
    time.sleep(0.6)  # the loop's flush: captures would be written by now
    assert _files_outside(base, marker) == []
    captured = list((base / "home" / "capture").rglob("*")) if (base / "home" / "capture").exists() else []
    assert all(p.is_dir() or SERVER_ID.match(p.name) for p in captured)


def test_a_callers_id_is_echoed_but_records_are_keyed_by_the_server(served):
    http = served["http"]
    first = http.post("/v2/models/colours/infer", json=_pixels_body("client-1")).json()
    second = http.post("/v2/models/colours/infer", json=_pixels_body("client-1")).json()
    assert first["id"] == second["id"] == "client-1"
    ids = first["parameters"]["request_ids"] + second["parameters"]["request_ids"]
    assert all(SERVER_ID.match(i) for i in ids) and len(set(ids)) == 2  # the same caller id twice: two records
    time.sleep(0.6)
    one = http.post("/feedback", json={"request_id": ids[0], "label": "red"}, headers=AUTH)
    two = http.post("/feedback", json={"request_id": ids[1], "label": "blue"}, headers=AUTH)
    assert one.status_code == two.status_code == 200, (one.text, two.text)
    assert one.json()["label"] == "red" and two.json()["label"] == "blue"


def test_hostile_names_in_paths_headers_and_bodies_are_4xx(served):
    http, base = served["http"], served["base"]
    marker = f"pwned-{time.time_ns()}"
    for name in hostile(base / marker):
        if name in ("..", "../x"):
            continue  # a client normalises dot segments away before sending; the bodies below carry them
        quoted = name.replace("/", "%2F").replace("\x00", "%00").replace(" ", "%20").replace("\\", "%5C")
        for method, path, kwargs in (
            ("get", f"/models/{quoted}", {}),
            ("post", f"/v2/models/{quoted}/infer", {"json": _pixels_body(None)}),
            ("post", f"/v2/models/colours/versions/{quoted}/infer", {"json": _pixels_body(None)}),
            ("get", f"/models/colours/captures/{quoted}", {}),
            ("post", "/feedback", {"json": {"request_id": name, "label": "red"}, "headers": AUTH}),
            ("post", "/classify", {"files": {"image": ("x.png", solid_png("red"), "image/png")}, "data": {"model": name}}),
        ):
            answer = getattr(http, method)(path, **kwargs)
            assert 400 <= answer.status_code < 500, (method, path, name, answer.status_code, answer.text[:200])
    for name in ("a/b", "x" * 300, "a b", "..", "a;b"):
        answer = http.post("/classify", files={"image": ("x.png", solid_png("red"), "image/png")},
                           headers={"X-Client-Id": name})
        assert answer.status_code == 400 and "X-Client-Id" in answer.json()["error"], (name, answer.text)
    assert _files_outside(base, marker) == []


def _hold_a_request_open(url: str) -> socket.socket:
    """An inference request whose headers arrived and whose body never does: it holds its place."""
    host, port = url.removeprefix("http://").split(":")
    held = socket.create_connection((host, int(port)))
    held.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                 b"Content-Length: 100000\r\n\r\n--b\r\n")
    return held


def test_overload_is_refused_at_once_and_health_stays_fast(served):
    http, client = served["http"], served["grpc"]
    held = _hold_a_request_open(served["url"])
    try:
        time.sleep(0.3)
        started = time.monotonic()
        refused = http.post("/classify", files={"image": ("x.png", solid_png("red"), "image/png")})
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "2", refused.text
        assert "TUNESERVE_MAX_INFLIGHT_REQUESTS" in refused.json()["error"]
        assert http.post("/v2/models/colours/infer", json=_pixels_body(None)).status_code == 503
        assert http.get("/readyz").status_code == 200 and http.get("/livez").status_code == 200
        assert http.get("/models").status_code == 200  # only inference is counted
        inputs = grpcclient.InferInput("pixels", [1, 16, 16, 3], "UINT8")
        inputs.set_data_from_numpy(np.zeros((1, 16, 16, 3), np.uint8))
        with pytest.raises(InferenceServerException) as shed:
            client.infer("colours", [inputs])
        assert "RESOURCE_EXHAUSTED" in str(shed.value.status())
        assert time.monotonic() - started < 10  # answered, not queued behind the held request
    finally:
        held.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the place is given back when the held request ends
        answer = http.post("/classify", files={"image": ("x.png", solid_png("red"), "image/png")})
        if answer.status_code == 200:
            break
        time.sleep(0.2)
    assert answer.status_code == 200, answer.text
    metrics = http.get("/metrics").text
    shed_lines = [line for line in metrics.splitlines() if line.startswith("tuneserve_shed_total{")
                  and 'surface="http"' in line and 'reason="inflight"' in line]
    assert shed_lines and float(shed_lines[0].rsplit(" ", 1)[1]) >= 1, metrics[-2000:]
