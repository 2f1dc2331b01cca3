"""The console's Review and Monitor views in a real browser against a real server (the fixtures of
tests/test_console.py): label a captured image, see live accuracy and the drift chart, promote and
roll back a candidate from the page."""
from __future__ import annotations

import time

import pytest

from tests.test_console import KEY, _open, _set_key, console, screenshots  # noqa: F401  (console: the fixture)
from tests.tiny import solid_png

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {KEY}"}


def _captured(console, count: int) -> list[dict]:
    client = console["client"]
    switched = client.post("/models/colours/capture", json={"enabled": True, "fraction": 1.0}, headers=AUTH)
    assert switched.status_code == 200, switched.text
    time.sleep(1.5)  # every worker re-reads the switch within a second
    answers = [client.post("/classify", files={"image": ("x.png", solid_png((200 - 10 * i, 90, 60 + 5 * i)), "image/png")}).json()
               for i in range(count)]
    deadline = time.monotonic() + 20
    while client.get("/models/colours/review").json()["waiting"] < count and time.monotonic() < deadline:
        time.sleep(0.3)
    return answers


def _choose(console, wait, select_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    wait.until(lambda d: any(o.get_attribute("value") == value for o in Select(d.find_element(By.ID, select_id)).options))
    Select(console["driver"].find_element(By.ID, select_id)).select_by_value(value)


def test_review_view_labels_the_most_informative_image(console):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    _captured(console, 3)
    client = console["client"]
    first = client.get("/models/colours/review", params={"limit": 1}).json()["items"][0]
    wait = _open(console, "review")
    _set_key(console, KEY)
    _choose(console, wait, "review-model", "colours")
    with screenshots(console, "review"):
        wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "#review-item img.review-image")))
        wait.until(lambda d: d.execute_script("const i = document.querySelector('#review-item img'); return i && i.naturalWidth > 0"))
        assert "3 waiting" in console["driver"].find_element(By.ID, "review-waiting").text
    console["driver"].find_element(By.CSS_SELECTOR, '#review-item button[data-label="blue"]').click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "review-waiting"), "2 waiting"))
    labelled = client.get("/models/colours/monitor").json()
    assert sum(v["live"]["count"] for v in labelled["versions"].values()) == 1
    console["driver"].find_element(By.CSS_SELECTOR, "#review-item button.skip").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "review-waiting"), "1 waiting"))
    remaining = [i["capture_id"] for i in client.get("/models/colours/review").json()["items"]]
    assert first["capture_id"] not in remaining and len(remaining) == 1


def test_monitor_view_shows_versions_and_rolls_out(console):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    from models.artifact import store
    from tests.tiny import write_tiny_model

    old = store.latest_version("colours")
    new = store.publish("colours", write_tiny_model(console["tmp"] / "colours-2", embedding=True)).version
    wait = _open(console, "monitor")
    _set_key(console, KEY)
    _choose(console, wait, "monitor-model", "colours")
    with screenshots(console, "monitor"):
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "table.monitor tr td")))
        time.sleep(1)  # the view may render twice (route, then the select's change); act on the last
        wait.until(lambda d: d.find_element(By.ID, "rollout-version").send_keys(new) or True)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "form.rollout button[type=submit]").click() or True)
        wait.until(EC.text_to_be_present_in_element((By.ID, "monitor-detail"), f"candidate {new}"))
    assert console["client"].get("/models/colours/monitor").json()["serving"]["rollout"]["stable"] == old
    wait.until(lambda d: d.find_element(By.ID, "promote").click() or True)
    wait.until(EC.text_to_be_present_in_element((By.ID, "monitor-detail"), f"stable {new}"))
    wait.until(lambda d: d.find_element(By.ID, "rollback").click() or True)
    wait.until(EC.text_to_be_present_in_element((By.ID, "monitor-detail"), f"stable {old}"))
    events = console["client"].get("/models/colours/monitor").json()["events"]
    assert [e["action"] for e in events[:3]] == ["rollback", "promote", "rollout"]
