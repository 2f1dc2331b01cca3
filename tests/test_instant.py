"""Instant heads: fitting, the ONNX head against its numpy reference, and a published version (torch-free)."""
import numpy as np
import onnxruntime as ort
import pytest

from models.artifact import store
from models.errors import EmbeddingUnavailable
from models.transfer.head_graph import attach_head
from models.transfer.heads import fit_head, fit_logistic, fit_prototype, leave_one_out_cosines, l2_normalise
from models.artifact.manifest import read_eval
from models.serving.runtime import OnnxClassifier
from models.jobs.train_config import ConfigError, TrainConfig
from tests.finetune_support import make_dataset
from tests.tiny import tiny_graph, write_tiny_model


def clusters(per_class=8, classes=3, dim=5, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 4
    targets = np.repeat(np.arange(classes), per_class)
    return centres[targets] + rng.normal(size=(len(targets), dim)), targets


def test_prototype_head_is_cosine_to_normalised_class_means_over_t():
    x, y = clusters()
    head = fit_prototype(x, y, 3)
    means = np.stack([l2_normalise(x[y == c]).mean(axis=0) for c in range(3)])
    cosine = l2_normalise(x) @ l2_normalise(means).T
    temperature = head.details["temperature"]
    np.testing.assert_allclose(head.logits(x), cosine / temperature, rtol=1e-5, atol=1e-5)
    assert 1e-3 < temperature < 0.5  # well separated clusters: sharp, not the uniform upper bound
    assert (head.logits(x).argmax(1) == y).all()


def test_leave_one_out_leaves_the_sample_out_of_its_own_class_mean():
    x = l2_normalise(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, -1.0]]))
    y = np.array([0, 0, 1, 1])
    cosines = leave_one_out_cosines(x, y, 2)
    assert cosines[0, 0] == pytest.approx(float(x[0] @ x[1]))  # its class mean is the other sample
    assert cosines[0, 1] == pytest.approx(float(x[0] @ l2_normalise(x[2:].sum(0, keepdims=True))[0]))


def test_logistic_head_folds_standardisation_into_the_weights():
    from sklearn.linear_model import LogisticRegression

    x, y = clusters(seed=1)
    head = fit_logistic(x, y, 3)
    mean, std = x.mean(0), x.std(0)
    reference = LogisticRegression(C=1.0, max_iter=2000).fit((x - mean) / std, y)
    np.testing.assert_allclose(head.probabilities(x), reference.predict_proba((x - mean) / std), atol=1e-5)
    binary = fit_logistic(x[y < 2], y[y < 2], 2)  # scikit-learn's one-column binary form becomes two logits
    assert binary.weight.shape == (2, 5) and (binary.logits(x[y < 2]).argmax(1) == y[y < 2]).all()


@pytest.mark.parametrize("strategy", ["prototype", "logistic"])
def test_onnx_head_matches_numpy_reference(strategy):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    embedding = images.reshape(12, -1, 3).astype(np.float64).mean(1)  # what the tiny graph's body computes
    head = fit_head(strategy, embedding, np.arange(12) % 4, 4)
    graph = attach_head(tiny_graph(3, embedding=True), head)
    assert [o.name for o in graph.graph.output] == ["logits", "probabilities", "embedding"]
    assert "w" not in {i.name for i in graph.graph.initializer}  # the source's head is pruned, not left dangling
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, probabilities, got_embedding = session.run(None, {"image": images})
    np.testing.assert_allclose(got_embedding, embedding, atol=1e-3)
    np.testing.assert_allclose(logits, head.logits(embedding), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(probabilities, head.probabilities(embedding), atol=1e-5)


def test_source_graph_without_embedding_is_refused():
    head = fit_prototype(*clusters(dim=3), 3)
    with pytest.raises(ValueError, match="no 'embedding' output"):
        attach_head(tiny_graph(3), head)


def instant_config(tmp_path, data, **overrides) -> TrainConfig:
    values = dict(name="instant", source="colours", data=str(data), strategy="prototype",
                  output_dir=str(tmp_path / "run"), val_fraction=0.2, test_fraction=0.3)
    return TrainConfig(**{**values, **overrides})


@pytest.mark.parametrize("strategy", ["prototype", "logistic"])
def test_instant_model_is_published_with_lineage_eval_and_parity(strategy, tmp_path, bento_home):
    from models.transfer.instant import run_instant

    source = store.publish("colours", write_tiny_model(tmp_path / "src", embedding=True))
    data = make_dataset(tmp_path / "data", classes=("red", "green", "blue"), per_class=10)
    result = run_instant(instant_config(tmp_path, data, strategy=strategy))
    version = store.resolve("instant")
    manifest = version.manifest()
    assert version.tag == result.version.tag and manifest.labels == ["blue", "green", "red"]
    assert manifest.source == source.tag and manifest.lineage == [source.tag]
    assert manifest.training["strategy"] == strategy and manifest.embedding_output == "embedding"
    assert manifest.parity_max_abs_diff <= 1e-4 and manifest.calibration is not None
    report = read_eval(version.path)
    assert report["accuracy"] == 1.0 and report["samples"] == result.report["samples"] == 9
    model = OnnxClassifier(version.path, version.name, version.version).load()
    red = np.zeros((1, 16, 16, 3), np.uint8)
    red[..., 0] = 220
    assert model.top_k(model.predict(red), 1)[0][0]["label"] == "red"
    assert model.embed(red).shape == (1, 3)
    assert not (version.path / "checkpoint.pt").exists()


def test_instant_refuses_old_sources_and_backbones(tmp_path, bento_home):
    from models.transfer.instant import run_instant

    store.publish("colours", write_tiny_model(tmp_path / "src"))  # exported before the embedding output
    data = make_dataset(tmp_path / "data", per_class=4)
    with pytest.raises(EmbeddingUnavailable, match="re-export"):
        run_instant(instant_config(tmp_path, data))
    with pytest.raises(ConfigError, match="is a backbone, not a stored model"):
        instant_config(tmp_path, data, source="efficientnet_lite0").validate()
    assert instant_config(tmp_path, data, min_images_per_class=1).validate()  # one image is enough for a prototype
    with pytest.raises(ConfigError, match="min_images_per_class"):
        instant_config(tmp_path, data, strategy="full", source="simple_cnn:none", min_images_per_class=1).validate()


@pytest.mark.slow
def test_instant_strategy_through_the_fine_tune_job_api(tmp_path, bento_home):

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from service.finetune import JobManager
    from service.routes.finetune import build_router
    from service.config import Settings
    from tests.finetune_support import submit, wait_for, zip_dir

    source = store.publish("colours", write_tiny_model(tmp_path / "src", embedding=True))
    (tmp_path / "root").mkdir()
    settings = Settings.of(home=tmp_path / "home", data_root=(tmp_path / "root").resolve(), auth=False, poll_seconds=0.1,
                           finetune_min_per_class=3)
    manager = JobManager(settings)
    manager.start()
    app = FastAPI()
    app.include_router(build_router(manager, settings))
    try:
        with TestClient(app) as client:
            data = zip_dir(make_dataset(tmp_path / "data", classes=("red", "green", "blue"), per_class=6))
            response = submit(client, data, {"name": "quick", "source": "colours", "strategy": "logistic"})
            assert response.status_code == 202, response.text
            job_id = response.json()["job_id"]
            done = wait_for(lambda: (j := client.get(f"/finetune/{job_id}").json())["state"] in ("succeeded", "failed") and j,
                            timeout=120, what="the instant job to finish")
            assert done["state"] == "succeeded", (done, client.get(f"/finetune/{job_id}/log").text[-2000:])
            assert done["model"].startswith("quick:") and done["eval"]["accuracy"] == 1.0
    finally:
        manager.stop(timeout=10)
    manifest = store.resolve("quick").manifest()
    assert manifest.training["strategy"] == "logistic" and manifest.lineage == [source.tag]


def test_one_image_per_class_is_enough(tmp_path, bento_home):
    from models.transfer.instant import run_instant
    from tests.finetune_support import make_dataset as folders

    store.publish("colours", write_tiny_model(tmp_path / "src", embedding=True))
    folders(tmp_path / "data", classes=("red", "green", "blue"), per_class=1, split="train")
    folders(tmp_path / "data", classes=("red", "green", "blue"), per_class=2, split="val", seed=1)
    folders(tmp_path / "data", classes=("red", "green", "blue"), per_class=3, split="test", seed=2)
    config = instant_config(tmp_path, tmp_path / "data", min_images_per_class=1)
    result = run_instant(config)
    manifest = result.version.manifest()
    assert result.report["accuracy"] == 1.0 and manifest.dataset.num_train == 3
    assert manifest.ood is not None and np.isfinite(manifest.ood.threshold_distance)  # no spread: still finite
