"""`auto`'s second stage (training/spend.py): a budget that follows the data and stays a hard cap when
given, the cached partial fine-tune inside `run_auto`, and test-time averaging in the exported graph."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from models.data.datasets import Sample
from training.spend import BUDGET_CAP_S, FIXED_SECONDS, GOOD_ENOUGH, plan
from tests.test_invariance import blob_batch

SLOW_TARGET = dict(n_train=2000, n_val=350, per_image_s=0.05, step_s=0.2, batch_size=32, elapsed=115.0)


def test_a_given_budget_is_a_hard_cap_on_the_plan():
    for budget in (150.0, 300.0, 900.0):
        chosen = plan(**SLOW_TARGET, budget=budget, given=True, best_f1=0.6)
        assert chosen.budget_s == budget
        assert chosen.views == 0 or chosen.estimate_s <= budget - SLOW_TARGET["elapsed"] - FIXED_SECONDS
    assert plan(**SLOW_TARGET, budget=150.0, given=True, best_f1=0.6).views == 0  # nothing fits: nothing runs
    roomy = plan(**SLOW_TARGET, budget=3000.0, given=True, best_f1=0.6)
    assert roomy.views == 4 and roomy.epochs >= 3  # more budget buys more views before anything else


def test_the_default_budget_grows_only_when_the_cheap_heads_are_clearly_not_good_enough():
    weak = plan(**SLOW_TARGET, budget=120.0, given=False, best_f1=0.85)
    assert 120.0 < weak.budget_s <= BUDGET_CAP_S and weak.views >= 1 and "grows" in weak.why
    assert weak.estimate_s <= weak.budget_s - SLOW_TARGET["elapsed"] - FIXED_SECONDS
    good = plan(**SLOW_TARGET, budget=120.0, given=False, best_f1=GOOD_ENOUGH + 0.01)
    assert good.budget_s == 120.0 and good.views == 0


def write_counts(root, count: int, seed: int) -> list[Sample]:
    """One blob or two, anywhere: every flip and quarter turn keeps the class."""
    images, labels = blob_batch(count, np.random.default_rng(seed), "count")
    samples = []
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / ("one", "two")[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
        samples.append(Sample(folder / f"{i}.png", ("one", "two")[label]))
    return samples


@pytest.mark.slow
def test_auto_runs_the_cached_partial_fine_tune_with_measured_views(tmp_path, monkeypatch):
    import training.auto as auto
    from training.config import TrainConfig

    monkeypatch.setattr(auto, "ROOM", 1.01)  # the second stage runs even if the cheap heads are perfect here
    torch.manual_seed(0)
    splits = {"train": write_counts(tmp_path / "train", 48, 0), "val": write_counts(tmp_path / "val", 40, 1),
              "test": write_counts(tmp_path / "test", 20, 2)}
    config = TrainConfig(name="counts", source="simple_cnn", weights="none", data=str(tmp_path), image_size=32,
                         output_dir=str(tmp_path / "run"), budget_s=600.0, batch_size=16)
    result = auto.run_auto(config, splits, ["one", "two"])
    partial = next(c for c in result.candidates if c["strategy"] == "partial")
    invariance = partial["details"]["invariance"]
    assert invariance["kept"] == ["hflip", "vflip", "rot90"] and len(partial["details"]["views"]) == 4
    assert partial["details"]["estimate_s"] > 0 and "view(s)" in partial["details"]["plan"]
    assert partial["details"]["epochs_run"] >= 1 and result.budget_s == 600.0  # a given budget never grows
    chosen = result.checkpoint if result.strategy == "partial" else None
    assert chosen is None or not hasattr(chosen.model.classifier, "views")  # the checkpoint is never the TTA wrapper
    # the budget counts from the job's start: a job whose loading took it all trains no second stage
    late = auto.run_auto(config, splits, ["one", "two"], job_started=time.monotonic() - 600.0)
    assert {c["strategy"] for c in late.candidates} == {"prototype", "logistic", "multidepth"}


@pytest.mark.slow
def test_a_full_fine_tune_gets_the_measured_symmetries_and_no_partial_one_beside_it(tmp_path, monkeypatch):
    """When a full fine-tune is reserved, the invariances are still measured (they are its augmentation:
    without them the inspection job lost 0.044 test macro F1), and no partial fine-tune trains beside it,
    even with time left for one (on inspection data it won val and lost test twice)."""
    import training.auto as auto
    from training.config import TrainConfig

    monkeypatch.setattr(auto, "ROOM", 1.01)
    monkeypatch.setattr(auto, "full_reserve", lambda config, features, best, elapsed, after: (5.0, after[0]))  # 595 s left
    splits = {"train": write_counts(tmp_path / "train", 48, 0), "val": write_counts(tmp_path / "val", 40, 1),
              "test": write_counts(tmp_path / "test", 20, 2)}
    config = TrainConfig(name="counts", source="simple_cnn", weights="none", data=str(tmp_path), image_size=32,
                         output_dir=str(tmp_path / "run"), budget_s=600.0, batch_size=16, hflip=False)
    result = auto.run_auto(config, splits, ["one", "two"])
    strategies = [c["strategy"] for c in result.candidates]
    assert "partial" not in strategies and "full" in strategies
    full = next(c for c in result.candidates if c["strategy"] == "full")
    assert full["details"]["hflip"] is True and full["details"]["turns"] is True  # all 8 symmetries, as measured
    assert full["details"]["invariance"]["kept"] == ["hflip", "vflip", "rot90"]  # and why, in the recipe
    assert "full fine-tune runs" in full["details"]["partial"]


@pytest.mark.slow
def test_a_view_averaged_model_exports_with_parity(tmp_path):
    import onnxruntime as ort

    from training.backbones import ImageModel, build_backbone
    from training.export import export_onnx
    from training.invariance import ELEMENTS, ViewAveraged

    torch.manual_seed(0)
    built = build_backbone("simple_cnn", 2, weights="none", image_size=32)
    model = ImageModel(ViewAveraged(built.model.classifier, list(ELEMENTS)), built.preprocessing.mean,
                       built.preprocessing.std).eval()
    export_onnx(model, tmp_path / "model.onnx", 32)
    images, _ = blob_batch(5, np.random.default_rng(0), "count")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    probabilities, embedding = session.run(["probabilities", "embedding"], {"image": images})
    with torch.no_grad():
        _, expected, expected_embedding = model(torch.from_numpy(images))
    np.testing.assert_allclose(probabilities, expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(embedding, expected_embedding.numpy(), atol=1e-4)


def test_a_costlier_candidate_must_lead_by_more_than_val_noise():
    from training.auto import Candidate, choose

    def c(name, f1):
        return Candidate(name, {"macro_f1": f1}, 1.0)

    cheap = [c("prototype", 0.60), c("logistic", 0.68), c("multidepth", 0.70)]
    assert choose(cheap + [c("partial", 0.72)], 67).strategy == "multidepth"  # 0.02 < 0.5/sqrt(67) ≈ 0.061
    assert choose(cheap + [c("partial", 0.78), c("full", 0.80)], 67).strategy == "full"
    assert choose(cheap + [c("full", 0.715)], 10_000).strategy == "full"  # large val: a 0.015 lead is real
    assert choose([c("multidepth", 0.9)], 5).strategy == "multidepth"


def test_the_plan_leaves_what_the_job_spends_after_training():
    from models.serving.trust import OOD_TRAIN_IMAGES
    from training.recipe import FIXED_SECONDS as FIXED, after_training_s

    splits = {"train": [None] * 51_000, "val": [None] * 9_000, "test": [None] * 10_000}
    after = after_training_s(0.003, splits)
    passes = FIXED + 0.003 * (9_000 + 10_000 + OOD_TRAIN_IMAGES)
    assert after_training_s(0.003, splits, int8=False) == pytest.approx(passes)
    # INT8 loads 300 calibration, 2,000 val, 500 spare train and 2,000 test images and runs them 7 times
    assert after == pytest.approx(passes + 7 * 0.003 * 4_800)
    small = {"train": [None] * 100, "val": [None] * 20, "test": []}
    assert after_training_s(0.003, small, int8=False) == pytest.approx(FIXED + 0.003 * 120)
    assert after_training_s(0.003, small) == pytest.approx(FIXED + 0.003 * 120 + 7 * 0.003 * (100 + 20 + 20))
    args = dict(n_train=51_000, n_val=9_000, per_image_s=0.011, step_s=0.058, batch_size=32, elapsed=400.0,
                budget=800.0, given=True, best_f1=0.93, pass_s=0.0026)
    fixed, honest = plan(**args), plan(**args, after_s=after)
    # a fixed 20 s leaves room for one view (364 s) that the time after training (107 s) does not
    assert fixed.views == 1 and fixed.estimate_s > 800.0 - 400.0 - after
    assert honest.views == 0


def test_int8_runs_only_in_the_time_the_budget_leaves(tmp_path, monkeypatch):
    """The INT8 step is the job's last optional one: when the plan was wrong and too little is left,
    it is skipped with the reason in eval.json, and the quantizer never starts."""
    import json

    import models.artifact.manifest as manifest
    import models.artifact.quantize as quantize
    import models.artifact.quantize_inputs as inputs
    from models.artifact.quantize_inputs import QuantizeConfig
    from training.export import quantize_export

    ran = []
    monkeypatch.setattr(manifest, "read_manifest", lambda _path: None)
    monkeypatch.setattr(inputs, "data_from_splits", lambda *_args: None)
    monkeypatch.setattr(quantize, "quantize_version", lambda *_args, **_kwargs: ran.append(1))
    (tmp_path / "eval.json").write_text(json.dumps({"accuracy": 0.9}))
    splits = {"train": [None] * 5_000, "val": [None] * 750, "test": [None] * 10_000}
    needed = QuantizeConfig().estimate_s(0.003, 5_000, 750, 10_000)
    report = quantize_export(tmp_path, splits, time_left_s=needed - 1.0, per_image_s=0.003)
    skipped = json.loads((tmp_path / "eval.json").read_text())["variants"]["int8"]
    assert report["variants"]["int8"] == skipped and report["accuracy"] == 0.9
    assert skipped["estimate_s"] == pytest.approx(needed, abs=0.1) and "budget" in skipped["skipped"]
    assert not ran
    quantize_export(tmp_path, splits, time_left_s=needed + 1.0, per_image_s=0.003)  # with the time, it runs
    quantize_export(tmp_path, splits, time_left_s=None, per_image_s=0.003)  # no budget: no cap
    assert len(ran) == 2


def test_a_full_fine_tune_is_kept_its_epochs_when_the_cheap_heads_are_weak():
    """The partial fine-tune plans in what is left after the full one's epochs (when at least 3 fit the
    most the budget can be): on fine-detail targets only the full one adapts the early layers."""
    from training.auto import Features, full_reserve
    from training.config import TrainConfig

    def features(n_train: int, epoch_s: float) -> Features:
        rows = np.zeros((n_train, 4), np.float32)
        return Features(rows, np.zeros(n_train), rows[:67], np.zeros(67), 0.05, 4, full_epoch_s=epoch_s)

    config = TrainConfig(name="t", data="d", batch_size=32)
    inspection = features(383, 50.0)  # 383 train images at 256 px: epochs timed at 50 s
    kept = full_reserve(config, inspection, 0.70, elapsed_s=120.0, after_s=(60.0, 40.0))
    assert kept == (pytest.approx(14 * 50.0), 60.0)  # 14 of the 17 wanted fit 900 - 120 - 10 (invariances) - 60 s
    assert full_reserve(config, inspection, GOOD_ENOUGH + 0.01, 120.0, (60.0, 40.0)) == (0.0, 60.0)  # good heads
    assert full_reserve(config.replace(strategy="multidepth"), inspection, 0.70, 120.0, (60.0, 40.0))[0] == 0.0
    assert full_reserve(config, features(51_000, 400.0), 0.90, 400.0, (200.0, 100.0))[0] == 0.0  # not 3 in 900 s
    given = config.replace(budget_s=300.0)  # a given budget is the most: 110 s left fit 2 epochs, not 3
    assert full_reserve(given, inspection, 0.70, 120.0, (60.0, 60.0))[0] == 0.0
    # the optional INT8 step yields: 3 epochs fit only without its 50 s
    assert full_reserve(given, inspection, 0.70, 20.0, (160.0, 110.0)) == (pytest.approx(3 * 50.0), 110.0)


def test_a_large_dataset_gets_a_full_fine_tune_of_drawn_epochs_when_whole_ones_do_not_fit():
    """1,657 train images at 288 px: an epoch timed at 408 s, so 3 whole ones never fit 900 s. The plan is
    then 3 epochs that each draw part of the train set, sized to the time left, and never fewer than
    MIN_EPOCH_STEPS batches; with the step not timed, only whole epochs are planned (as before)."""
    from training.auto import MIN_EPOCH_STEPS, MIN_FINETUNE_EPOCHS, Features, finetune_plan, full_reserve
    from training.config import TrainConfig

    rows = np.zeros((1_657, 4), np.float32)
    step_s = 7.4  # 52 steps of 32 at 7.4 s, plus 23 s of val: 408 s
    large = Features(rows, np.zeros(1_657), rows[:293], np.zeros(293), 0.08, 4, full_epoch_s=408.0, full_step_s=step_s)
    config = TrainConfig(name="t", data="d", batch_size=32)
    planned = finetune_plan(config, large, 600.0)
    val_s = 408.0 - 52 * step_s
    steps = int((600.0 / MIN_FINETUNE_EPOCHS - val_s) // step_s)
    assert (planned.epochs, planned.epoch_images) == (MIN_FINETUNE_EPOCHS, steps * 32)
    assert 0 < planned.epoch_images < 1_657 and planned.seconds <= 600.0
    assert "fresh random draw" in planned.why
    measuring = 3 * 293 * 0.08  # the invariance passes over val come first
    # the INT8 step (250 s of the 400 after training) yields to drawn epochs: they fit 600 s, not 350 s
    assert full_reserve(config, large, 0.70, elapsed_s=150.0 - measuring, after_s=(400.0, 150.0)) == (
        pytest.approx(planned.seconds), 150.0)
    too_short = 3 * (val_s + (MIN_EPOCH_STEPS - 1) * step_s)  # 11 steps an epoch: no fine-tune at all
    assert finetune_plan(config, large, too_short).epochs == 0
    untimed = Features(rows, np.zeros(1_657), rows[:293], np.zeros(293), 0.08, 4, full_epoch_s=408.0)
    many_val = Features(rows, np.zeros(1_657), rows[:9_000], np.zeros(9_000), 0.01, 4, full_epoch_s=52 * 1.0 + 88.0,
                        full_step_s=1.0)  # 88 s of val an epoch; 310 s leave 3 epochs of 15 steps: mostly validating
    assert finetune_plan(config, many_val, 310.0).epochs == 0 and "validating" in finetune_plan(config, many_val, 310.0).why
    big_rows = np.zeros((51_000, 4), np.float32)  # the 60,000-image job: 3 x 2,400 drawn images, 14 % of train
    big = Features(big_rows, np.zeros(51_000), rows[:293], np.zeros(293), 0.002, 4, full_epoch_s=1_594 * 0.64 + 30.0,
                   full_step_s=0.64)
    assert finetune_plan(config, big, 281.0).epochs == 0 and "would see less" in finetune_plan(config, big, 281.0).why
    whole = finetune_plan(config, untimed, 600.0)
    assert whole.epochs == 1 and whole.epoch_images is None
    small = Features(rows[:383], np.zeros(383), rows[:67], np.zeros(67), 0.08, 4, full_epoch_s=50.0, full_step_s=3.9)
    assert finetune_plan(config, small, 600.0).epoch_images is None  # whole epochs fit: all images each epoch


def test_a_drawn_epoch_is_a_fresh_subset_without_repeats(tmp_path):
    """`epoch_images`: each epoch of the training loader draws that many distinct images, a different set each
    time, and the training loop counts its steps from it."""
    from models.artifact.manifest import Preprocessing
    from training.data import ImageDataset, make_loader

    samples = []
    for i in range(40):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 8), (i, i, i)).save(path)
        samples.append(Sample(path, "a" if i % 2 else "b"))
    spec = Preprocessing(size=8, resize=8, interpolation="nearest", mean=(0, 0, 0), std=(1, 1, 1))
    dataset = ImageDataset(samples, ["a", "b"], spec, train=False)
    loader = make_loader(dataset, 4, True, num_workers=0, seed=0, epoch_images=12)
    assert len(loader) == 3
    epochs = [torch.cat([x[:, 0, 0, 0] for x, _ in loader]).tolist() for _ in range(2)]
    assert all(len(e) == 12 and len(set(e)) == 12 for e in epochs)
    assert set(epochs[0]) != set(epochs[1])
    assert len(make_loader(dataset, 4, True, num_workers=0, seed=0)) == 10  # default: every image


def test_the_fine_tune_trains_the_epochs_and_draws_it_was_planned(monkeypatch):
    """`run_finetune` hands the plan to the training loop: a full fine-tune of 3 epochs drawing 640 images each."""
    from training import auto
    from training.config import TrainConfig
    from training.progress import Progress

    seen = {}

    def training_loop(config, *_args, **_kwargs):
        seen["config"] = config
        raise RuntimeError("stop before training")

    monkeypatch.setattr(auto, "train", training_loop)
    with pytest.raises(RuntimeError, match="stop before training"):
        auto.run_finetune(TrainConfig(name="t", data="d"), {"val": []}, ["a", "b"],
                          auto.FinetunePlan(3, 640, 300.0, "drawn"), Progress(), None, False)
    assert (seen["config"].strategy, seen["config"].epochs, seen["config"].epoch_images) == ("full", 3, 640)
