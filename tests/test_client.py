"""tuneserve.client and `tuneserve classify` against the real server: typed answers for paths, bytes
and PIL images, batches, evaluate, models, fine-tune jobs (a fake trainer) with wait() and cancel()."""
import os

import pytest

from tests.finetune_support import FAKE_COMMAND, make_dataset, zip_dir
from tests.serving import bento_store, running_server
from tests.tiny import solid_png, write_tiny_model

pytestmark = pytest.mark.slow
KEY = "client-key"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("client")
    with bento_store(base / "bento"):
        from models.artifact import store

        version = store.publish("imagenet", write_tiny_model(base / "v1"))
        env = {"TUNESERVE_API_KEY": KEY, "TUNESERVE_HOME": str(base / "home"), "TUNESERVE_WORKERS": "1",
               "TUNESERVE_DATA_ROOT": str(base / "data"), "TUNESERVE_TRAINING_COMMAND": FAKE_COMMAND,
               "TUNESERVE_FINETUNE_MIN_PER_CLASS": "3", "TUNESERVE_FAKE_TRAIN_STEP_S": "0.02"}
        make_dataset(base / "data" / "colours", classes=("red", "green", "blue"))
        with running_server(env, base / "server.log") as url:
            yield url, version, base


def test_classify_any_image_kind_and_batches(served, tmp_path):
    from PIL import Image

    from tuneserve.client import Client, ClientError

    url, version, _ = served
    path = tmp_path / "red.png"
    path.write_bytes(solid_png("red"))
    with Client(url) as client:  # reading routes need no key
        for image in (path, str(path), solid_png("red"), Image.new("RGB", (20, 20), (255, 0, 0))):
            answer = client.classify(image, top_k=2)
            assert (answer.label, answer.model, answer.version, answer.variant) == ("red", "imagenet", version.version, "fp32")
            assert len(answer.predictions) == 2 and answer.abstained is False
        batch = client.classify_batch([solid_png("blue"), b"not an image"], model="imagenet")
        assert batch.succeeded == 1 and batch.results[0].label == "blue" and batch.results[1].status == 400
        with pytest.raises(ClientError, match="unknown model 'nope'") as refused:
            client.classify(path, model="nope")
        assert refused.value.status == 404


def test_evaluate_and_models(served, tmp_path):
    from tuneserve.client import Client

    url, version, base = served
    with Client(url) as client:
        report = client.evaluate(base / "data" / "colours")  # a folder: zipped and uploaded
        assert report.accuracy == 1.0 and report.samples == 18
        assert client.evaluate(data_path="colours", top_k=1).model == version.tag
        listing = client.models()
        assert listing.default_model == "imagenet" and listing.models["imagenet"].latest == version.version
        assert client.model("imagenet").versions[0].version == version.version


def test_finetune_wait_and_cancel(served, tmp_path):
    from tuneserve.client import Client, ClientError

    url, _, base = served
    archive = tmp_path / "colours.zip"
    archive.write_bytes(zip_dir(make_dataset(tmp_path / "colours", classes=("red", "green"))))
    with Client(url) as anonymous, pytest.raises(ClientError) as refused:
        anonymous.finetune(name="nokey", source="simple_cnn:none", data=archive)
    assert refused.value.status == 401
    with Client(url, api_key=KEY) as client:
        job = client.finetune({"name": "colours", "source": "simple_cnn:none", "epochs": 2}, data=archive)
        assert job.submitted.dataset["images"] == 12
        seen = []
        final = job.wait(timeout=120, interval=0.2, on_progress=lambda j: seen.append(j.state))
        assert final.state == "succeeded" and final.model.startswith("colours:") and seen[-1] == "succeeded"
        slow = client.finetune(name="slower", source="simple_cnn:none", epochs=50, data_path="colours")
        cancelled = slow.cancel()
        assert cancelled.state in ("queued", "running", "cancelled")
        assert slow.wait(timeout=60, interval=0.2).state == "cancelled"


def test_classify_command(served, tmp_path, capsys):
    from tuneserve.cli import main

    url, version, _ = served
    images = []
    for colour in ("red", "green"):
        images.append(tmp_path / f"{colour}.png")
        images[-1].write_bytes(solid_png(colour))
    assert main(["classify", "--server", url, "--top-k", "1", *map(str, images)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[1] for line in lines] == ["red", "green"]
    assert lines[0].endswith(f"imagenet:{version.version}") and os.path.basename(lines[0].split("\t")[0]) == "red.png"


def test_swagger_page_uploads_an_image(served, tmp_path):
    """/api/docs in a real browser (Debian's chromium): "Try it out" on POST /classify, choose a file,
    "Execute", and the typed answer is shown. The Swagger UI comes from the server itself (no CDN)."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("needs Debian's chromium and chromium-driver")
    url, version, _ = served
    image = tmp_path / "red.png"
    image.write_bytes(solid_png("red"))
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    os.environ.setdefault("SE_AVOID_STATS", "true")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(f"{url}/api/docs")
        block = wait.until(EC.element_to_be_clickable((By.ID, "operations-classify-classify_classify_post")))
        block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
        wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#operations-classify-classify_classify_post .try-out__btn"))).click()
        block.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(image))
        block.find_element(By.CSS_SELECTOR, ".execute").click()
        shown = wait.until(EC.visibility_of_element_located(
            (By.CSS_SELECTOR, "#operations-classify-classify_classify_post .live-responses-table .response-col_description pre")))
        wait.until(lambda _: '"label"' in shown.text)
        assert '"label": "red"' in shown.text and f'"version": "{version.version}"' in shown.text
        assert "200" in block.find_element(By.CSS_SELECTOR, ".live-responses-table tr.response .response-col_status").text
    except Exception:
        driver.save_screenshot(str(tmp_path / "swagger.png"))  # what the page showed, to look at
        raise
    finally:
        driver.quit()
