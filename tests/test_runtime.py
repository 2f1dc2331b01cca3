"""Runtime: provider selection (the GPU logic, tested on CPU) and the loaded classifier."""
import numpy as np
import pytest

from models.artifact import store
from models.data.evaluate import evaluate, evaluate_compare
from models.data.datasets import load_samples
from models.errors import DatasetError, EmbeddingUnavailable
from models.serving.preprocess import prepare, stack
from models.serving.runtime import CPU, CUDA, TENSORRT, OnnxClassifier, RuntimeOptions, select_providers
from tests.tiny import solid_png, write_tiny_model

ALL = [TENSORRT, CUDA, CPU]


def test_cpu_only_build():
    plan = select_providers([CPU], gpu_count=0, options=RuntimeOptions())
    assert plan.names == [CPU]
    assert "not in this onnxruntime build" in plan.skipped[CUDA]


def test_gpu_build_without_device_falls_back_with_reason():
    plan = select_providers(ALL, gpu_count=0, options=RuntimeOptions(enable_tensorrt=True))
    assert plan.names == [CPU]
    assert plan.skipped[CUDA] == "no CUDA device visible to the driver"
    assert plan.skipped[TENSORRT] == "no CUDA device visible to the driver"


def test_cuda_preferred_and_tensorrt_opt_in():
    plan = select_providers(ALL, gpu_count=2, options=RuntimeOptions(device_id=1))
    assert plan.names == [CUDA, CPU]
    assert plan.providers[0][1] == {"device_id": 1}
    assert "not enabled" in plan.skipped[TENSORRT]
    trt = select_providers(ALL, gpu_count=1, options=RuntimeOptions(enable_tensorrt=True, fp16=True, trt_cache_dir="/c"))
    assert trt.names == [TENSORRT, CUDA, CPU]
    assert trt.providers[0][1]["trt_fp16_enable"] is True
    assert trt.providers[0][1]["trt_engine_cache_path"] == "/c"


def test_device_selection_rules():
    assert select_providers(ALL, 1, RuntimeOptions(device="cpu")).names == [CPU]
    assert "only 1 GPU" in select_providers(ALL, 1, RuntimeOptions(device_id=3)).skipped[CUDA]
    with pytest.raises(RuntimeError, match="device=cuda requested"):
        select_providers(ALL, 0, RuntimeOptions(device="cuda"))


def test_classifier_loads_on_cpu_and_reports_why(bento_home, tmp_path):
    version = store.publish("colours", write_tiny_model(tmp_path / "m"))
    model = OnnxClassifier(version.path, version.name, version.version)
    assert not model.ready
    model.load()
    assert model.ready and model.active_providers == [CPU]
    assert CUDA in model.skipped_providers
    spec = model.manifest.preprocessing
    batch = stack([prepare(solid_png(c), spec) for c in ("blue", "red")])
    probabilities = model.predict(batch)
    assert probabilities.shape == (2, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    top = model.top_k(probabilities, 2)
    assert [row[0]["label"] for row in top] == ["blue", "red"]
    assert len(top[0]) == 2
    with pytest.raises(ValueError, match="expected uint8"):
        model.predict(batch.astype(np.float32))


def test_evaluate_and_compare(bento_home, tmp_path):
    good = store.publish("colours", write_tiny_model(tmp_path / "good"))
    swapped = np.zeros((3, 3), np.float32)
    swapped[0, 1] = swapped[1, 0] = swapped[2, 2] = 0.05  # confuses red and green
    bad = store.publish("colours", write_tiny_model(tmp_path / "bad", weights=swapped))
    data = tmp_path / "data"
    for label in ("red", "green", "blue"):
        (data / label).mkdir(parents=True)
        for i in range(2):
            (data / label / f"{i}.png").write_bytes(solid_png(label))
    (data / "red" / "broken.png").write_bytes(b"not a png")
    samples = load_samples(data)
    load = lambda v: OnnxClassifier(v.path, v.name, v.version).load()
    report = evaluate_compare(load(good), load(bad), samples, top_k=2)
    assert report["accuracy"] == 1.0 and report["samples"] == 6
    assert report["compare_with"]["accuracy"] == pytest.approx(1 / 3)
    assert report["difference"]["accuracy"] == pytest.approx(2 / 3)
    assert list(report["unreadable"]) == [str(data / "red" / "broken.png")]
    (data / "purple").mkdir()
    (data / "purple" / "0.png").write_bytes(solid_png((128, 0, 128)))
    with pytest.raises(DatasetError, match="purple"):
        evaluate(load(good), load_samples(data))


def test_fp16_conversion_keeps_uint8_input_and_float_outputs(tmp_path):
    """The GPU fp16 path converts the graph at load; check the converted graph on CPU."""
    import onnxruntime as ort

    from models.artifact.manifest import read_manifest
    from models.serving.runtime import convert_fp16

    directory = write_tiny_model(tmp_path / "m")
    session = ort.InferenceSession(convert_fp16(directory / "model.onnx"), providers=[CPU])
    assert [i.type for i in session.get_inputs()] == ["tensor(uint8)"]
    assert [o.type for o in session.get_outputs()] == ["tensor(float)", "tensor(float)"]
    spec = read_manifest(directory).preprocessing
    batch = stack([prepare(solid_png(c), spec) for c in ("red", "green", "blue")])
    reference = OnnxClassifier(directory, "m", "1").load().predict(batch)
    converted = session.run(["probabilities"], {"image": batch})[0]
    np.testing.assert_allclose(converted, reference, atol=2e-3)
    assert (converted.argmax(1) == reference.argmax(1)).all()


def test_compare_with_a_model_of_other_labels_uses_the_shared_ones(bento_home, tmp_path):
    """A fine-tuned target compared with its source: only labels both know are compared."""
    target = store.publish("colours", write_tiny_model(tmp_path / "target"))
    source = store.publish("source", write_tiny_model(tmp_path / "source", labels=["red", "cat", "dog"]))
    other = store.publish("pets", write_tiny_model(tmp_path / "pets", labels=["cat", "dog"]))
    data = tmp_path / "data"
    for label in ("red", "green", "blue"):
        (data / label).mkdir(parents=True)
        (data / label / "0.png").write_bytes(solid_png(label))
    load = lambda v: OnnxClassifier(v.path, v.name, v.version).load()
    report = evaluate_compare(load(target), load(source), load_samples(data), top_k=1)
    assert report["samples"] == 3 and report["accuracy"] == 1.0
    assert report["compared_on"] == {"samples": 1, "labels": ["red"]}
    assert report["compare_with"]["samples"] == 1
    assert report["difference"]["accuracy"] == pytest.approx(1.0 - report["compare_with"]["accuracy"])
    with pytest.raises(DatasetError, match="knows none of the dataset's labels"):
        evaluate_compare(load(target), load(other), load_samples(data))


def test_embed_gives_the_features_the_head_reads(bento_home, tmp_path):
    version = store.publish("colours", write_tiny_model(tmp_path / "m", embedding=True))
    model = OnnxClassifier(version.path, version.name, version.version).load()
    batch = np.zeros((2, 16, 16, 3), np.uint8)
    batch[0, ..., 0] = 200  # red
    batch[1, ..., 2] = 100  # blue
    assert model.has_embedding and version.manifest().embedding_output == "embedding"
    embedding = model.embed(batch)
    np.testing.assert_allclose(embedding, [[200, 0, 0], [0, 0, 100]], atol=1e-4)
    assert model.top_k(model.predict(batch), 1)[0][0]["label"] == "red"
    with pytest.raises(ValueError, match="expected uint8"):
        model.embed(batch.astype(np.float32))


def test_version_without_embedding_still_classifies_but_refuses_embed(bento_home, tmp_path):
    version = store.publish("old", write_tiny_model(tmp_path / "m"))
    model = OnnxClassifier(version.path, version.name, version.version).load()
    batch = np.zeros((1, 16, 16, 3), np.uint8)
    batch[..., 1] = 255
    assert model.top_k(model.predict(batch), 1)[0][0]["label"] == "green"
    assert not model.has_embedding
    with pytest.raises(EmbeddingUnavailable, match="without an 'embedding' output.*re-export") as refused:
        model.embed(batch)
    assert refused.value.status == 409
