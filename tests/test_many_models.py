"""Many models behind one real server (`bentoml serve`, two workers): 30 tiny models, each with its own
labels, and `TUNESERVE_MAX_LOADED_MODELS=4`. A replica starts with only the default model and the
preloads loaded; concurrent traffic over every model (latest and pinned versions) gets the right
model's answer every time, while no worker ever holds more than the bound (GET /readyz/models, metrics)."""
import random
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.serving import bento_store, running_server
from tests.tiny import solid_png, write_tiny_model

pytestmark = pytest.mark.slow
httpx = pytest.importorskip("httpx")
MODELS, BOUND = 30, 4
COLOURS = ("red", "green", "blue")


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    from models.artifact import store

    with bento_store(tmp_path_factory.mktemp("bentoml")):
        stage = tmp_path_factory.mktemp("stage")
        tags = [store.publish(f"m{i}", write_tiny_model(stage / f"m{i}", labels=[f"{c}{i}" for c in COLOURS])).tag
                for i in range(MODELS)]
        env = {"TUNESERVE_AUTH": "off", "TUNESERVE_WORKERS": "2", "TUNESERVE_DEFAULT_MODEL": "m0",
               "TUNESERVE_PRELOAD": "m1", "TUNESERVE_MAX_LOADED_MODELS": str(BOUND),
               "TUNESERVE_HOME": str(tmp_path_factory.mktemp("home"))}
        log = tmp_path_factory.mktemp("log") / "server.log"
        with running_server(env, log) as url, httpx.Client(base_url=url, timeout=60) as client:
            yield client, tags


def _readiness(client, tries: int = 20) -> dict[int, dict]:
    """GET /readyz/models until both workers answered (or `tries` ran out), by worker index."""
    seen = {}
    for _ in range(tries):
        body = client.get("/readyz/models").json()
        seen[body["worker"]] = body
        if len(seen) == 2:
            break
    return seen


def test_a_fresh_replica_holds_only_the_default_and_the_preloads(many):
    client, _ = many
    for body in _readiness(client).values():
        assert body["ready"] and body["default_model"] == "m0" and body["max_loaded_models"] == BOUND
        held = {(e["model"], e["follows_latest"]) for e in body["loaded"]}
        # the preload may still be loading when /readyz turns 200 (it waits for the default only)
        assert held in ({("m0", True)}, {("m0", True), ("m1", True)}), body
        assert body["evictions"] == 0


def test_traffic_over_more_models_than_the_bound_is_answered_right(many):
    client, tags = many
    requests = [(i, f"m{i}" if n % 3 else tags[i]) for n in range(3) for i in range(MODELS)]  # latest and pinned
    random.Random(7).shuffle(requests)
    images = {colour: solid_png(colour) for colour in COLOURS}

    def classify(job: tuple[int, str]) -> tuple[int, str, dict, dict]:
        i, ref = job
        colour = COLOURS[(i + len(ref)) % 3]
        answer = client.post("/classify", files={"image": ("x.png", images[colour], "image/png")}, data={"model": ref})
        assert answer.status_code == 200, answer.text
        return i, colour, answer.json(), client.get("/readyz/models").json()

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(classify, requests))
    for i, colour, answer, _ in results:
        assert (answer["model"], answer["label"]) == (f"m{i}", f"{colour}{i}")
    for _, _, _, state in results:  # read while the traffic ran, from either worker
        assert len(state["loaded"]) <= BOUND and state["peak_loaded"] <= BOUND, state
    after = _readiness(client)
    assert sum(body["evictions"] for body in after.values()) > 0
    for body in after.values():
        assert body["peak_loaded"] <= BOUND and "m0" in {e["model"] for e in body["loaded"]}  # the default stays

    metrics = client.get("/metrics").text
    assert float(re.search(r"^tuneserve_models_loaded (\S+)$", metrics, re.M).group(1)) <= BOUND
    cold = re.search(r'^tuneserve_model_load_seconds_count\{reason="request"\} (\S+)$', metrics, re.M)
    assert cold and float(cold.group(1)) >= MODELS - 2  # every model but the default and the preload loaded cold
    assert re.search(r"^tuneserve_model_evictions_total (\S+)$", metrics, re.M)
