"""The per-worker bound on loaded model versions (service/pool/registry.py), in process: one LRU over
followed `latest`s, pinned versions and canaries; the default model is never evicted; evicted sessions
are freed once the requests holding them are done; the readiness body says what is held."""
import asyncio
import gc
import weakref

import numpy as np

from tests.tiny import write_tiny_model


def _labels(i: int) -> list[str]:
    return [f"red{i}", f"green{i}", f"blue{i}"]


def _publish(tmp_path, count: int) -> list:
    from models.artifact import store

    return [store.publish(f"m{i}", write_tiny_model(tmp_path / f"m{i}", labels=_labels(i))) for i in range(count)]


def _settings(tmp_path, bound: int, default: str = "m0"):
    from service.config import Settings

    return Settings.of(home=tmp_path / "home", auth=False, default_model=default, workers=1, device="cpu",
                       max_loaded_models=bound)


def _run(settings, scenario):
    from service.dataplane import DataPlane
    from service.pool import ModelPool

    async def main():
        pool = ModelPool(settings)
        plane = DataPlane(pool, settings)
        try:
            return await scenario(pool, plane)
        finally:
            await pool.stop()
            await plane.close()

    return asyncio.run(main())


def test_one_lru_bounds_latest_pinned_and_canary_versions(bento_home, tmp_path):
    from models.artifact import store

    versions = _publish(tmp_path, 8)
    canary = store.publish("m1", write_tiny_model(tmp_path / "m1-next", labels=_labels(1)))  # m1 has two versions now
    held = []

    async def scenario(pool, plane):
        for ref in ["m0", "m1", "m2", versions[1].tag, "m3", "m2", canary.tag, "m4", "m5", "m2", "m6", "m7"]:
            classifier = await pool.get(ref)
            assert classifier.tag.split(":")[0] == store.split_ref(ref)[0]
            held.append(len(pool.loaded()))
        return pool.readiness()

    state = _run(_settings(tmp_path, 3), scenario)
    assert max(held) == 3 and state["peak_loaded"] == 3  # never more than the bound, however the traffic mixes
    assert [(e["model"], e["follows_latest"]) for e in state["loaded"]] == [("m7", True), ("m6", True), ("m0", True)]
    assert state["ready"] and state["evictions"] == state["loads"] - 3 and state["max_loaded_models"] == 3


def test_recently_used_versions_stay_and_the_default_is_never_evicted(bento_home, tmp_path):
    _publish(tmp_path, 5)

    async def scenario(pool, plane):
        default, hot = await pool.get("m0"), await pool.get("m1")
        for ref in ["m2", "m1", "m3", "m1", "m4", "m1"]:
            await pool.get(ref)
        return default, hot, await pool.get("m0"), await pool.get("m1"), pool.readiness()

    default, hot, default_again, again, state = _run(_settings(tmp_path, 3), scenario)
    assert again is hot and default_again is default  # m1: used between every other load; m0: the default
    assert [e["model"] for e in state["loaded"]] == ["m1", "m0", "m4"] and state["loads"] == 5


def test_a_bound_of_one_still_answers_other_models(bento_home, tmp_path):
    _publish(tmp_path, 3)

    async def scenario(pool, plane):
        names = [(await pool.get(ref)).name for ref in ["m0", "m1", "m2", "m1"]]
        return names, pool.readiness()

    names, state = _run(_settings(tmp_path, 1), scenario)
    assert names == ["m0", "m1", "m2", "m1"]
    assert [e["model"] for e in state["loaded"]] == ["m1", "m0"]  # the default stays, plus the one being asked


def test_latest_reuses_the_pinned_session_of_the_same_version(bento_home, tmp_path):
    versions = _publish(tmp_path, 2)

    async def scenario(pool, plane):
        await pool.get("m0")
        pinned = await pool.get(versions[1].tag)
        return pinned, await pool.get("m1"), pool.readiness()

    pinned, latest, state = _run(_settings(tmp_path, 4), scenario)
    assert latest is pinned and state["loads"] == 2  # m0 and one session for m1
    assert [(e["model"], e["follows_latest"]) for e in state["loaded"]] == [("m1", True), ("m0", True)]


def test_evicted_sessions_are_freed_after_their_requests(bento_home, tmp_path):
    from service.dataplane import InferenceRequest

    _publish(tmp_path, 6)
    red = np.full((1, 16, 16, 3), (230, 20, 20), np.uint8)
    seen: dict[str, weakref.ref] = {}

    async def scenario(pool, plane):
        answers = []
        for i in [1, 2, 3, 4, 5, 1]:
            result = await plane.infer(InferenceRequest(model=f"m{i}", pixels=red, top_k=1))
            answers.append(result.images[0].prediction.label)
            seen.setdefault(f"m{i}", weakref.ref(result.classifier))
            del result
        gc.collect()
        return answers, {name: ref() is not None for name, ref in seen.items()}

    answers, alive = _run(_settings(tmp_path, 2), scenario)
    assert answers == ["red1", "red2", "red3", "red4", "red5", "red1"]
    assert alive == {"m1": False, "m2": False, "m3": False, "m4": False, "m5": True}  # m1's first session too


def test_a_reload_does_not_bring_back_an_evicted_model(bento_home, tmp_path):
    from models.artifact import store

    _publish(tmp_path, 3)

    async def scenario(pool, plane):
        for ref in ["m0", "m1", "m2"]:  # m2 evicts m1 (bound 2, m0 is the default)
            await pool.get(ref)
        store.publish("m1", write_tiny_model(tmp_path / "m1-v2", labels=_labels(1)))
        return await pool.check_for_updates(), pool.readiness()

    swapped, state = _run(_settings(tmp_path, 2), scenario)
    assert swapped == [] and [e["model"] for e in state["loaded"]] == ["m2", "m0"]
