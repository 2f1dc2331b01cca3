"""The console's evidence toggle in the real browser: with "Evidence map" ticked, the card shows the
overlay on the image and a button switches it off and on; a version without evidence maps still answers
and says why."""
from __future__ import annotations

import pytest

from tests.test_console import By, Select, _open, console, screenshots  # noqa: F401 - the module's server and browser
from tests.tiny_evidence import half_red_png, write_explained_tiny_model

pytestmark = pytest.mark.slow


def tick(driver) -> None:
    box = driver.find_element(By.ID, "classify-explain")
    if not box.is_selected():  # the page may be the one an earlier test left ticked
        box.click()


def test_classify_view_toggles_the_evidence_overlay(console):  # noqa: F811
    from models.artifact import store

    store.publish("explained", write_explained_tiny_model(console["tmp"] / "explained"))
    (console["tmp"] / "half.png").write_bytes(half_red_png())
    driver = console["driver"]
    wait = _open(console, "classify")
    with screenshots(console, "classify-evidence"):
        wait.until(lambda d: "explained" in [o.get_attribute("value") for o in Select(d.find_element(By.ID, "classify-model")).options])
        Select(driver.find_element(By.ID, "classify-model")).select_by_value("explained")
        tick(driver)
        driver.find_element(By.ID, "classify-files").send_keys(str(console["tmp"] / "half.png"))
        driver.find_element(By.ID, "classify-submit").click()
        toggle = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".card .evidence-toggle"))
        image = driver.find_element(By.CSS_SELECTOR, ".card img")
        assert image.get_attribute("src").startswith("data:image/png;base64,")
        assert toggle.text == "Evidence for red: on" and toggle.get_attribute("aria-pressed") == "true"
    toggle.click()
    assert image.get_attribute("src").startswith("blob:") and toggle.text.endswith("off")
    toggle.click()
    assert image.get_attribute("src").startswith("data:image/png") and toggle.text.endswith("on")


def test_a_version_without_evidence_maps_answers_and_says_why(console):  # noqa: F811
    (console["tmp"] / "half.png").write_bytes(half_red_png())
    driver = console["driver"]
    wait = _open(console, "classify")
    wait.until(lambda d: Select(d.find_element(By.ID, "classify-model")).options)
    Select(driver.find_element(By.ID, "classify-model")).select_by_value("colours")
    tick(driver)
    driver.find_element(By.ID, "classify-files").send_keys(str(console["tmp"] / "half.png"))
    driver.find_element(By.ID, "classify-submit").click()
    note = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".card .no-evidence"))
    assert "evidence maps" in note.text
    assert driver.find_element(By.CSS_SELECTOR, ".card .top-label").text == "red"
    assert driver.find_elements(By.CSS_SELECTOR, ".card .evidence-toggle") == []
