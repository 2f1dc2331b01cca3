"""Training: config validation, each strategy on a tiny model, export parity, resume, lineage, the job entry point."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.config import ConfigError, TrainConfig

ROOT = Path(__file__).resolve().parent.parent
COLORS = [(230, 30, 30), (30, 200, 30), (40, 40, 230)]


def make_dataset(root: Path, per_class: int = 10, classes: int = 3, size: int = 20) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size, size + 4, 3)).astype(np.uint8)
            pixels[3 : size - 3, 3 : size] = COLORS[c]
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture
def tiny_data(tmp_path):
    return make_dataset(tmp_path / "data")


def tiny_config(tmp_path, data, **overrides) -> TrainConfig:
    values = dict(name="tiny", source="simple_cnn", data=str(data), strategy="full", epochs=2, batch_size=8,
                  image_size=16, learning_rate=3e-3, output_dir=str(tmp_path / "run"), progress_every=1,
                  int8=False)  # the int8 variant is tested once, with the full strategy
    values.update(overrides)
    return TrainConfig(**values)


# ---- config (no torch needed) ------------------------------------------------------------------


def test_config_validation_names_every_problem(tmp_path):
    with pytest.raises(ConfigError) as error:  # the model checks itself when built
        TrainConfig(name="Bad Name", source="resnet1000:x:y", data=str(tmp_path / "nope"), strategy="most",
                    epochs=0, class_balance="magic", device="tpu")
    text = str(error.value)
    for fragment in ("name:", "strategy: 'most'", "epochs:", "class_balance", "device"):
        assert fragment in text
    with pytest.raises(ConfigError, match="data: path does not exist"):  # what depends on this machine
        TrainConfig(name="a", data=str(tmp_path / "nope")).validate()
    with pytest.raises(ConfigError, match="epochs: Input should be a valid integer"):  # never coerced
        TrainConfig.from_dict({"name": "a", "data": "d", "epochs": "3"})
    with pytest.raises(ConfigError, match="efficientnet_lite0"):
        TrainConfig(name="a", source="Not A Model!", data=str(tmp_path)).validate()


def test_config_roundtrip_and_unknown_fields(tmp_path):
    config = TrainConfig(name="a", data=str(tmp_path), output_dir=str(tmp_path / "out"))
    path = config.validate().save()
    assert TrainConfig.load(path) == config
    assert config.source == "efficientnet_lite0" and config.bn_momentum == 0.1
    with pytest.raises(ConfigError, match="unknown training config fields"):
        TrainConfig.from_dict({"name": "a", "learning_rat": 1})
    with pytest.raises(ConfigError, match="multiple of its patch size"):
        TrainConfig(name="a", data=str(tmp_path), source="vit_b_16", image_size=40).validate()
    with pytest.raises(ConfigError, match="simple_cnn has no pretrained"):
        TrainConfig(name="a", data=str(tmp_path), source="simple_cnn:IMAGENET1K_V1").validate()


# ---- data ----------------------------------------------------------------------------------------


def test_unreadable_images_are_listed(tiny_data):
    from models.data.datasets import load_samples
    from models.errors import DatasetError
    from training.data import check_readable

    broken = tiny_data / "class0" / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(DatasetError) as error:
        check_readable(load_samples(tiny_data))
    assert str(broken) in str(error.value)


def test_train_augmentation_keeps_uint8_size(tiny_data):
    import torch

    from models.data.datasets import load_samples
    from models.artifact.manifest import Preprocessing
    from training.data import ImageDataset

    spec = Preprocessing(size=16, resize=16, mean=(0, 0, 0), std=(1, 1, 1))
    samples = load_samples(tiny_data)
    x, y = ImageDataset(samples, ["class0", "class1", "class2"], spec, train=True)[0]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (16, 16, 3) and y == 0


# ---- strategies, export, publish -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["linear", "partial", "full"])
def test_each_strategy_trains_exports_and_publishes(strategy, tmp_path, tiny_data, bento_home):
    from models.artifact import store
    from models.artifact.manifest import read_eval
    from training.pipeline import run

    config = tiny_config(tmp_path, tiny_data, strategy=strategy, partial_blocks=1, int8=strategy == "full",
                         epochs=3 if strategy == "linear" else 2, learning_rate=1e-2 if strategy == "linear" else 3e-3)
    result = run(config)
    version = store.resolve("tiny")
    assert version.tag == result.version.tag
    manifest = version.manifest()
    assert manifest.labels == ["class0", "class1", "class2"]
    assert manifest.backbone == "simple_cnn" and manifest.source == "simple_cnn:none"
    assert manifest.lineage == ["simple_cnn:none"]
    assert manifest.training["strategy"] == strategy and len(manifest.training["history"]) == config.epochs
    assert manifest.dataset.fingerprint and manifest.dataset.num_test == 6
    assert manifest.parity_max_abs_diff <= 1e-4 and manifest.opset
    report = read_eval(version.path)
    assert report["samples"] == 6
    # trust sections: T fitted on val and baked, thresholds, in-domain data; eval has before/after
    assert manifest.calibration.fitted_on == "val" and manifest.calibration.samples == manifest.dataset.num_val
    assert set(manifest.thresholds) == set(manifest.labels) and (version.path / manifest.ood.file).is_file()
    assert report["calibration"]["temperature"] == manifest.temperature
    assert {"ece", "nll", "brier", "reliability"} <= set(report["calibration"]["before"])
    assert "auto" in report and "share_in_domain" in report["in_domain"]
    page = (Path(config.output_dir) / "report.html").read_text()  # the HTML report of the run
    assert result.report_path.name == "report.html" and f"tuneserve report: {version.tag}" in page
    assert (version.path / "checkpoint.pt").is_file()
    out = Path(config.output_dir)
    assert json.loads((out / "config.json").read_text())["strategy"] == strategy
    assert len((out / "metrics.jsonl").read_text().splitlines()) == config.epochs
    if strategy == "full":
        assert result.report["accuracy"] >= 0.66
        # the static int8 variant: calibrated on train, compared with fp32 on the same 6 test images
        int8 = manifest.variants["int8"]
        assert (version.path / int8.file).is_file() and int8.evaluated_on == "test" and int8.samples == 6
        assert int8.calibration_images == manifest.dataset.num_train and 0 <= int8.agreement <= 1
        entry = read_eval(version.path)["variants"]["int8"]
        assert entry["accuracy_delta"] == pytest.approx(entry["accuracy"] - result.report["accuracy"])
        # methods are tried in this order and the first that passes the gate on validation ends the search
        tried = list(entry["validation"])
        assert tried and tried == ["minmax", "percentile", "entropy"][:len(tried)]
    else:
        assert manifest.variants == {}


@pytest.mark.slow
def test_linear_strategy_freezes_backbone(tmp_path, tiny_data):

    from training.backbones import build_backbone
    from training.strategies import configure_strategy

    built = build_backbone("simple_cnn", 3, "none")
    groups = configure_strategy(built.model, tiny_config(tmp_path, tiny_data, strategy="linear"))
    assert [g["name"] for g in groups] == ["head"]
    assert not any(p.requires_grad for p in built.model.classifier.body.parameters())
    groups = configure_strategy(built.model, tiny_config(tmp_path, tiny_data, strategy="partial", partial_blocks=1))
    trained = {id(p) for p in groups[0]["params"]}
    assert trained == {id(p) for p in built.model.classifier.blocks[-1].parameters()}
    groups = configure_strategy(built.model, tiny_config(tmp_path, tiny_data, strategy="full", backbone_lr_scale=0.1))
    assert groups[0]["lr"] == pytest.approx(groups[1]["lr"] * 0.1)


@pytest.mark.slow
def test_export_parity_and_dynamic_batch(tmp_path):
    import onnxruntime as ort
    import torch

    from training.backbones import build_backbone
    from training.export import ExportError, export_onnx, parity_check

    built = build_backbone("simple_cnn", 4, "none", image_size=16)
    path = tmp_path / "model.onnx"
    assert export_onnx(built.model, path, 16) >= 17
    assert not list(tmp_path.glob("*.data"))  # one self-contained file
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    assert parity_check(built.model, path, images) <= 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "image" and session.get_inputs()[0].type == "tensor(uint8)"
    logits, probs, embedding = session.run(None, {"image": images[:3]})
    assert probs.shape == (3, 4)
    with torch.no_grad():  # the embedding is the features the head reads, as torch computes them
        features = built.model.features(torch.from_numpy(images[:3])).numpy()
    assert embedding.shape == (3, built.model.classifier.head.in_features) == features.shape
    np.testing.assert_allclose(embedding, features, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(embedding @ built.model.classifier.head.weight.detach().numpy().T
                               + built.model.classifier.head.bias.detach().numpy(), logits, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # a torch model that disagrees with the graph must fail the gate
        built.model.classifier.head.bias += 1.0 + torch.arange(4.0)
    with pytest.raises(ExportError, match="parity"):
        parity_check(built.model, path, images)


def test_drawn_epochs_train_on_part_of_the_data_each(tmp_path, tiny_data):
    """`epoch_images`: each epoch is that many images (here 2 batches of the 21 train images), so the
    loop's steps and its progress events count 2 steps an epoch."""
    from models.data.datasets import load_dataset, prepare_splits
    from training.progress import Progress
    from training.train import train

    config = tiny_config(tmp_path, tiny_data, epochs=2, epoch_images=16, test_fraction=0.0, val_fraction=0.3)
    splits, labels = prepare_splits(load_dataset(str(tiny_data)), config.val_fraction, config.test_fraction, config.seed, 2)
    events = []
    result = train(config, splits, labels, Progress(events.append))
    steps = [(e["epoch"], e["step"], e["steps"]) for e in events if e["event"] == "progress"]
    assert len(splits["train"]) > 16 and steps == [(1, 1, 2), (1, 2, 2), (2, 1, 2), (2, 2, 2)]
    assert [h["epoch"] for h in result.history] == [1, 2]


@pytest.mark.slow
def test_resume_after_interrupted_run(tmp_path, tiny_data, bento_home):
    import torch

    from training.pipeline import run
    from training.progress import Progress
    from training.train import Cancelled

    config = tiny_config(tmp_path, tiny_data, epochs=3)
    stop = threading.Event()
    events = []

    def interrupt(event):
        events.append(event)
        if event["event"] == "epoch" and event["epoch"] == 1:
            stop.set()

    with pytest.raises(Cancelled):
        run(config, Progress(interrupt), stop)
    from models.artifact import store

    assert store.list_models() == {}  # nothing published
    assert torch.load(Path(config.output_dir) / "last.pt", weights_only=False)["epoch"] == 1
    resumed = []
    result = run(config, Progress(resumed.append), resume=True)
    epochs = [e["epoch"] for e in resumed if e["event"] == "epoch"]
    assert epochs == [2, 3]
    assert [h["epoch"] for h in result.history] == [1, 2, 3]


@pytest.mark.slow
def test_chaining_from_a_stored_model_keeps_lineage(tmp_path, tiny_data, bento_home):
    from models.artifact import store
    from training.pipeline import run

    first = run(tiny_config(tmp_path / "a", tiny_data, name="parent")).version
    more = make_dataset(tmp_path / "more", classes=2)
    second = run(tiny_config(tmp_path / "b", more, name="child", source="parent", epochs=1)).version
    manifest = store.resolve("child").manifest()
    assert manifest.source == first.tag
    assert manifest.lineage == ["simple_cnn:none", first.tag]
    assert manifest.backbone == "simple_cnn" and manifest.labels == ["class0", "class1"]
    assert manifest.preprocessing == store.resolve(first.tag).manifest().preprocessing  # kept from the source
    third = run(tiny_config(tmp_path / "c", more, name="grandchild", source=second.tag, epochs=1)).version
    assert store.resolve(third.tag).manifest().lineage == ["simple_cnn:none", first.tag, second.tag]


# ---- the job entry point -------------------------------------------------------------------------


def _job(tmp_path, config: dict, *extra, wait=True):
    config_path = tmp_path / "job.json"
    config_path.write_text(json.dumps(config))
    progress = tmp_path / "progress.jsonl"
    command = [sys.executable, "-m", "training.run", "--config", str(config_path), "--progress", str(progress), *extra]
    env = {**os.environ, "BENTOML_HOME": os.environ["BENTOML_HOME"]}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if wait:
        process.wait(timeout=300)
    return process, progress


def _events(path):
    from training.progress import read_events

    return read_events(path) if path.exists() else []


@pytest.mark.slow
def test_training_run_writes_progress_events(tmp_path, tiny_data, bento_home):
    config = tiny_config(tmp_path, tiny_data).to_dict()
    process, progress = _job(tmp_path, config)
    events = _events(progress)
    assert process.returncode == 0, process.stdout.read().decode()[-3000:]
    phases = [e["phase"] for e in events if e["event"] == "phase"]
    assert phases == ["loading", "training", "exporting", "parity", "calibrating", "evaluating", "publishing"]
    progress_event = next(e for e in events if e["event"] == "progress")
    for key in ("epoch", "epochs", "step", "steps", "train_loss", "val_accuracy", "val_loss", "eta_s", "time"):
        assert key in progress_event
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2]
    assert events[-1]["event"] == "succeeded" and events[-1]["model"].startswith("tiny:")
    assert set(events[-1]["eval"]) >= {"accuracy", "top_k_accuracy", "samples", "macro_f1"}


@pytest.mark.slow
def test_training_run_bad_data_exits_2(tmp_path, bento_home):
    one_class = make_dataset(tmp_path / "one", classes=1)
    process, progress = _job(tmp_path, tiny_config(tmp_path, one_class).to_dict())
    assert process.returncode == 2
    assert _events(progress)[-1]["event"] == "failed" and "2 classes" in _events(progress)[-1]["reason"]

    data = make_dataset(tmp_path / "broken")
    (data / "class1" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    process, progress = _job(tmp_path, tiny_config(tmp_path, data).to_dict())
    assert process.returncode == 2
    assert "bad.jpg" in _events(progress)[-1]["reason"]


@pytest.mark.slow
def test_training_run_sigterm_publishes_nothing(tmp_path, tiny_data, bento_home):
    from models.artifact import store

    config = tiny_config(tmp_path, tiny_data, epochs=200).to_dict()
    process, progress = _job(tmp_path, config, wait=False)
    deadline = time.monotonic() + 120
    while not any(e["event"] == "progress" for e in _events(progress)):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    assert _events(progress)[-1]["event"] == "failed"
    assert store.list_models() == {}


# ---- the embedded default ------------------------------------------------------------------------


@pytest.mark.slow
def test_bootstrap_imagenet_model_sees_a_cat(bento_home):
    from skimage import data as skdata

    from models.serving.preprocess import prepare
    from models.serving.runtime import OnnxClassifier
    from training.bootstrap import bootstrap

    version = bootstrap("imagenet")
    manifest = version.manifest()
    assert len(manifest.labels) == 1000 and manifest.parity_max_abs_diff <= 1e-4
    model = OnnxClassifier(version.path, version.name, version.version).load()
    image = prepare(Image.fromarray(skdata.chelsea()), manifest.preprocessing)
    top5 = [entry["label"] for entry in model.top_k(model.predict(image[None]), 5)[0]]
    assert any(label in top5 for label in ("tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat")), top5
    assert manifest.embedding_output == "embedding"
    embedding = model.embed(np.stack([image, image[::-1]]))
    assert embedding.shape == (2, 1280) and embedding.dtype == np.float32
    assert np.isfinite(embedding).all() and not np.allclose(embedding[0], embedding[1])
