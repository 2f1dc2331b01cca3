"""The web console in a real browser (Debian's chromium + chromedriver, driven by selenium)
against a real `bentoml serve`: every view is used the way a person would use it.

Screenshots of each view land in the test's tmp folder; with TUNESERVE_SCREENSHOTS=DIR they are
also written to DIR (docs/console.md's images come from `TUNESERVE_SCREENSHOTS=docs/console`).
A failing test saves a screenshot of the page as it was.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from models.artifact.manifest import write_eval
from models.data.metrics import evaluation_report
from tests.finetune_support import make_dataset, zip_dir
from tests.test_finetune_server import serve
from tests.tiny import solid_png, write_tiny_model

pytestmark = pytest.mark.slow
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

KEY = "console-test-key"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("needs Debian's chromium and chromium-driver (make test installs them)", allow_module_level=True)


def _colours_model(stage: Path) -> Path:
    """The tiny colour model with a full eval.json (a real report from models.data.metrics)."""
    directory = write_tiny_model(stage, embedding=True)  # the advisor ranks models with an embedding
    rng = np.random.default_rng(0)
    y_true = np.repeat(np.arange(3), 8)
    probabilities = np.eye(3)[y_true] * 0.6 + rng.random((24, 3)) * 0.5
    write_eval(evaluation_report(y_true, probabilities, ["red", "green", "blue"], top_k=2), directory)
    return directory


def _fifty_class_model(stage: Path) -> Path:
    labels = [f"class_{i:02d}" for i in range(50)]
    directory = write_tiny_model(stage, labels=labels, weights=np.random.default_rng(1).random((3, 50)).astype(np.float32))
    rng = np.random.default_rng(2)
    y_true = np.repeat(np.arange(50), 6)
    probabilities = np.eye(50)[y_true] * 0.3 + rng.random((300, 50))
    write_eval(evaluation_report(y_true, probabilities, labels), directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["training"] = {"epochs": 3, "history": [
        {"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.2 / e, "val_accuracy": 0.3 * e} for e in (1, 2, 3)]}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    from models.artifact import store
    from tests.conftest import _point_bentoml_at

    tmp = tmp_path_factory.mktemp("console")
    home = tmp / "bentoml"
    old = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(home)
    _point_bentoml_at(home)
    store.publish("colours", _colours_model(tmp / "colours"))
    store.publish("weak", write_tiny_model(tmp / "weak", weights=np.full((3, 3), 0.001, np.float32)))
    store.publish("fifty", _fifty_class_model(tmp / "fifty"))
    env = {"BENTOML_HOME": str(home), "TUNESERVE_HOME": str(tmp / "home"), "TUNESERVE_DATA_ROOT": str(tmp / "data"),
           "TUNESERVE_API_KEY": KEY, "TUNESERVE_DEFAULT_MODEL": "colours", "TUNESERVE_FINETUNE_MIN_PER_CLASS": "3"}
    with serve(env, tmp / "server.log") as (client, _):
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for the error check
        os.environ.setdefault("SE_AVOID_STATS", "true")
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
        try:
            yield {"driver": driver, "url": str(client.base_url), "client": client, "tmp": tmp, "home": home}
        finally:
            driver.quit()
    _point_bentoml_at(None)
    if old is None:
        os.environ.pop("BENTOML_HOME", None)
    else:
        os.environ["BENTOML_HOME"] = old


@contextlib.contextmanager
def screenshots(console, name: str, keep: bool = True):
    """Save the page on failure (to look at), and with `keep` on success as docs/console.md's picture of the view."""
    driver = console["driver"]
    try:
        yield
    except BaseException:
        driver.save_screenshot(str(console["tmp"] / f"FAILED-{name}.png"))
        print(f"screenshot of the failure: {console['tmp'] / f'FAILED-{name}.png'}")
        raise
    if not keep:
        return
    shot = console["tmp"] / f"{name}.png"
    driver.save_screenshot(str(shot))
    if target := os.environ.get("TUNESERVE_SCREENSHOTS"):
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / f"{name}.png")


def _open(console, fragment: str):
    driver = console["driver"]
    driver.get(f"{console['url']}/#{fragment}")
    return WebDriverWait(driver, 30, ignored_exceptions=(StaleElementReferenceException,))


def _set_key(console, key: str | None):
    driver = console["driver"]
    field = driver.find_element(By.ID, "api-key")
    field.clear()
    if key:
        field.send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#key-form button").click()


def test_page_weight_is_small():
    static = Path(__file__).resolve().parent.parent / "service" / "console" / "static"
    total = sum(p.stat().st_size for p in static.rglob("*") if p.is_file())
    print(f"console page weight: {total / 1024:.1f} KB")
    assert total < 300 * 1024


def test_page_loads_without_console_errors(console):
    """A fresh load logs nothing at error level in the browser's console: the page names its icon, so the
    browser does not ask for a /favicon.ico that is not there (it asks a second or two after the load)."""
    driver = console["driver"]
    driver.get("about:blank")
    driver.get_log("browser")  # drop what earlier pages logged
    wait = _open(console, "classify")
    wait.until(lambda d: Select(d.find_element(By.ID, "classify-model")).options)
    icon = driver.find_element(By.CSS_SELECTOR, "link[rel='icon']").get_attribute("href")
    assert console["client"].get(icon).status_code == 200
    logged, deadline = [], time.monotonic() + 4
    while time.monotonic() < deadline:
        logged += driver.get_log("browser")
        time.sleep(0.2)
    assert [entry["message"] for entry in logged if entry["level"] == "SEVERE"] == []


def test_classify_view_shows_the_top_label(console):
    image = console["tmp"] / "red.png"
    image.write_bytes(solid_png("red"))
    (console["tmp"] / "blue.png").write_bytes(solid_png("blue"))
    wait = _open(console, "classify")
    driver = console["driver"]
    with screenshots(console, "classify"):
        wait.until(lambda d: Select(d.find_element(By.ID, "classify-model")).options)
        Select(driver.find_element(By.ID, "classify-model")).select_by_value("colours")
        driver.find_element(By.ID, "classify-files").send_keys(f"{image}\n{console['tmp'] / 'blue.png'}")
        driver.find_element(By.ID, "classify-submit").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card .top-label")) == 2)
        labels = {card.get_attribute("data-file"): card.find_element(By.CSS_SELECTOR, ".top-label").text
                  for card in driver.find_elements(By.CSS_SELECTOR, ".card")}
        assert labels == {"red.png": "red", "blue.png": "blue"}
        version = console["client"].get("/models/colours").json()["latest"]
        assert f"colours:{version}" in driver.find_element(By.CSS_SELECTOR, ".card .meta").text
        assert len(driver.find_elements(By.CSS_SELECTOR, ".card .bar-row")) == 2 * 3


def test_models_view_matches_eval_json(console):
    driver = console["driver"]
    version = console["client"].get("/models/colours").json()["latest"]
    report = json.loads(next((console["home"] / "models" / "colours").glob(f"{version}/eval.json")).read_text())
    wait = _open(console, f"models/colours:{version}")
    with screenshots(console, "models"):
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#model-detail .heatmap rect.cell")))
        cells = {(c.get_attribute("data-row"), c.get_attribute("data-col")): int(c.get_attribute("data-count"))
                 for c in driver.find_elements(By.CSS_SELECTOR, "#model-detail rect.cell")}
        labels, matrix = report["confusion_matrix"]["labels"], report["confusion_matrix"]["matrix"]
        assert cells == {(t, p): matrix[i][j] for i, t in enumerate(labels) for j, p in enumerate(labels)}
        assert "colours:" in driver.find_element(By.CSS_SELECTOR, "#model-detail .lineage").text
        # the per-class table sorts by F1, descending on the second click
        header = driver.find_element(By.CSS_SELECTOR, "table.per-class th[data-key='f1'] button")
        header.click()
        header.click()
        shown = [float(row.find_elements(By.TAG_NAME, "td")[3].text) for row in driver.find_elements(By.CSS_SELECTOR, "table.per-class tbody tr")]
        assert shown == sorted(shown, reverse=True)
        assert shown == sorted((round(m["f1"], 3) for m in report["per_class"].values()), reverse=True)


def test_models_view_of_fifty_classes_renders(console):
    driver = console["driver"]
    started = time.perf_counter()
    wait = _open(console, "models/fifty")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model-detail rect.cell")) == 2500)
    wall = time.perf_counter() - started
    render_ms = float(driver.find_element(By.ID, "model-detail").get_attribute("data-render-ms"))
    print(f"50-class Models view: rendered in {render_ms:.0f} ms in the page, {wall * 1000:.0f} ms from navigation")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#model-detail .row-label")) == 50
    assert driver.find_elements(By.CSS_SELECTOR, "#model-detail .training svg polyline")


def test_finetune_view_runs_a_real_job(console):
    driver = console["driver"]
    data = console["tmp"] / "colours.zip"
    data.write_bytes(zip_dir(make_dataset(console["tmp"] / "ds", classes=("red", "green", "blue"), per_class=6, size=(16, 16))))
    wait = _open(console, "finetune")
    with screenshots(console, "finetune"):
        _set_key(console, None)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#ft-source option[value='simple_cnn']"))
        driver.find_element(By.ID, "ft-dataset").send_keys(str(data))
        driver.find_element(By.ID, "ft-name").send_keys("console-colours")
        Select(driver.find_element(By.ID, "ft-source")).select_by_value("simple_cnn")
        Select(driver.find_element(By.ID, "ft-strategy")).select_by_value("linear")
        epochs = driver.find_element(By.ID, "ft-epochs")
        epochs.clear()
        epochs.send_keys("1")
        driver.find_element(By.ID, "ft-size").send_keys("16")
        driver.find_element(By.ID, "ft-advise").click()  # reading routes are open, /advise needs the key
        error = wait.until(EC.visibility_of_element_located((By.ID, "finetune-error")))
        assert "401" in error.text and "API key" in error.text
        driver.find_element(By.ID, "ft-submit").click()
        error = wait.until(EC.visibility_of_element_located((By.ID, "finetune-error")))
        assert "401" in error.text and "API key" in error.text

        _set_key(console, KEY)
        driver.find_element(By.ID, "ft-advise").click()
        WebDriverWait(driver, 120, 0.5).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".advice-table tbody tr"))
        ranked = [row.get_attribute("data-model") for row in driver.find_elements(By.CSS_SELECTOR, ".advice-table tbody tr")]
        assert ranked and all(model.split(":")[0] == "colours" for model in ranked)  # the one stored model with an embedding
        assert driver.find_elements(By.CSS_SELECTOR, "#advice svg polyline")  # the learning curve
        assert not driver.find_element(By.ID, "finetune-error").is_displayed()
        Select(driver.find_element(By.ID, "ft-source")).select_by_value("simple_cnn")
        Select(driver.find_element(By.ID, "ft-strategy")).select_by_value("linear")
        driver.find_element(By.ID, "ft-submit").click()
        done = "#jobs-table tr[data-state='succeeded'] a.model-link"
        # the job table re-renders while it polls, so read and click through the DOM in one step
        model = WebDriverWait(driver, 240, 0.5).until(
            lambda d: d.execute_script(f"const a = document.querySelector(\"{done}\"); return a && a.textContent"))
        assert model.startswith("console-colours:")
        WebDriverWait(driver, 10, ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda d: d.find_element(By.CSS_SELECTOR, "#job-detail h3").text.endswith("succeeded"))
    with screenshots(console, "finetune-new-model", keep=False):
        driver.execute_script(f"document.querySelector(\"{done}\").click()")
        # the Models view keeps the last model it showed until the new one has rendered
        wait.until(lambda d: d.find_element(By.ID, "model-detail").get_attribute("data-ref") == model)
        assert driver.find_element(By.CSS_SELECTOR, "#model-detail h3").text == model


def test_evaluate_view_compares_and_reports_errors(console):
    driver = console["driver"]
    good = console["tmp"] / "eval.zip"
    good.write_bytes(zip_dir(make_dataset(console["tmp"] / "eval", classes=("red", "green", "blue"), per_class=3)))
    broken = console["tmp"] / "broken.zip"
    broken.write_bytes(b"this is not a zip archive")
    wait = _open(console, "evaluate")
    with screenshots(console, "evaluate"):
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#ev-compare option[value='weak']"))
        driver.find_element(By.ID, "ev-dataset").send_keys(str(broken))
        driver.find_element(By.ID, "ev-submit").click()
        error = wait.until(EC.visibility_of_element_located((By.ID, "evaluate-error")))
        assert error.text.startswith("4") and "zip" in error.text.lower()

        driver.find_element(By.ID, "ev-dataset").send_keys(str(good))
        Select(driver.find_element(By.ID, "ev-model")).select_by_value("colours")
        Select(driver.find_element(By.ID, "ev-compare")).select_by_value("weak")
        driver.find_element(By.ID, "ev-submit").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#evaluate-results .report")) == 2)
        assert not driver.find_element(By.ID, "evaluate-error").is_displayed()
        headline = driver.find_element(By.CSS_SELECTOR, "#evaluate-results .report .headline").text
        assert headline.startswith("accuracy 1.000")
        assert driver.find_element(By.CSS_SELECTOR, "#evaluate-results .difference").text
