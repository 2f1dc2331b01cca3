"""`strategy: auto` (the default) and `multidepth`: cheap candidates first, then the budget left.

1. One forward pass over train and val (serving preprocessing, no augmentation) gives every
   stage's pooled features (training/multidepth.py).
2. Cheap candidates, fitted in seconds on those features, cheapest first: `prototype` (nearest
   class mean on the usual embedding), `logistic` (a head on it) and `multidepth` (a head on every
   depth). Each is scored on val.
3. A full fine-tune joins when the cheap candidates leave room on val and the budget left fits at
   least `MIN_FINETUNE_EPOCHS` epochs (timed on a few real training steps), whole ones or, on a large
   dataset, each a fresh random draw of part of it (`finetune_plan`); it augments with the symmetries
   measured to keep the label and keeps its best epoch on val.
4. The candidate with the best val macro F1 (it does not ignore a minority class) is exported; a
   costlier one (a partial or full fine-tune) only when it leads the best cheap head by more than
   val's noise (`choose`);
   every candidate's val scores and seconds are recorded in the recipe.
A user who fixes `strategy: multidepth` gets that candidate only.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from models.data.datasets import Sample
from models.transfer.recipe import default_budget_s, fit_epochs, steps_per_epoch
from training.backbones import Built, Classifier, ImageModel, build_source
from training.config import ConfigError, TrainConfig
from training.data import ImageDataset, make_loader
from training.crossfit import crossfit_logits, with_calibration
from training.multidepth import FittedHead, classifier_for, embedding_gap, fit_head, stages_for, val_scores
from training.progress import Progress
from training.recipe import after_training_s
from training.invariance import GENERATORS
from training.spend import BUDGET_CAP_S, GOOD_ENOUGH, PARTIAL_BLOCKS, Spent, spend
from training.train import TrainResult, pick_device, train
from training.trunk import split_for

log = logging.getLogger("tuneserve.training")

ROOM = 0.99  # a val macro F1 at or above this leaves too little to win for a fine-tune's cost
MIN_FINETUNE_EPOCHS = 3
MIN_EPOCH_STEPS = 12  # a drawn epoch's fewest batches: 383 train images of the 450-image inspection target
EMBEDDING_GAP = 1e-4  # relative; the tap runs the body's own modules, so only float noise separates them


@dataclass
class Candidate:
    strategy: str
    val: dict[str, float]
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "val": {k: round(v, 4) for k, v in self.val.items()}, "seconds": round(self.seconds, 2)}


@dataclass
class Features:
    train_x: np.ndarray  # float16 rows of one array (training/feature_pass.py)
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    per_image_s: float  # torch's forward per image, measured: what fine-tunes are planned from
    embedding_dim: int  # the last columns are the usual embedding: the model's own features(), what its head reads
    pass_s: float = 0.0  # the feature pass per image (ONNX Runtime on a CPU): what more passes are planned from
    runner: Any = None  # the tap ready to run more views (training/spend.py)
    full_epoch_s: float = 0.0  # a full fine-tune's epoch (train steps and the val pass), `timed_full`; 0: not timed
    full_step_s: float = 0.0  # one of its training steps; 0: not timed (then only whole epochs are planned)


def compute_features(built: Built, splits: dict[str, list[Sample]], labels: list[str], config: TrainConfig,
                     stop: threading.Event | None, split=None,
                     progress: Progress | None = None) -> tuple[torch.nn.Module, Features, torch.Tensor | None]:
    """Multi-depth features of train and val (and the trunk's output when `split` is given) in one pass."""
    from training.feature_pass import Tap, feature_pass, make_runner, torch_cost, trunk_index

    body = built.model.classifier.body
    stages = stages_for(body)
    if stages is None:
        raise ValueError(f"multi-depth features are not available for backbone {built.backbone}")
    size = built.preprocessing.size
    gap = embedding_gap(stages, body, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)))
    if not gap <= EMBEDDING_GAP:  # heads fitted on other columns than the exported head reads would be published
        raise ValueError(f"{built.backbone}: the stage tap's embedding differs from the model's features() ({gap:.3g})")
    loaders = [make_loader(ImageDataset(splits[name], labels, built.preprocessing, train=False), 64, False,
                           num_workers=config.num_workers, seed=config.seed) for name in ("train", "val")]
    tap = Tap(built.model.normalise, stages, trunk_index(stages, split.last_frozen if split is not None else None))
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    runner = make_runner(tap, example, pick_device(config.device))
    n_train, n_val = len(splits["train"]), len(splits["val"])
    done = feature_pass(runner, (batch for loader in loaders for batch in loader), n_train + n_val, progress, stop)
    per_image = torch_cost(runner, done, loaders[0])
    log.info("auto: feature pass %.2f ms per image on %s; a torch forward %.2f ms per image", 1000 * done.seconds /
             max(n_train + n_val, 1), done.engine, 1000 * per_image)
    x, y = done.features, done.targets
    return stages, Features(x[:n_train], y[:n_train], x[n_train:], y[n_train:], per_image,
                            built.model.classifier.head.in_features, done.seconds / max(n_train + n_val, 1),
                            runner), done.trunk


def folded(head: FittedHead) -> torch.nn.Linear:
    """The head with its feature standardisation folded in: reads the raw embedding."""
    weight = head.weight / head.scale
    bias = head.bias - weight @ head.mean
    return FittedHead(weight, bias, np.zeros_like(head.mean), np.ones_like(head.scale), head.c, head.val,
                      head.seconds).linear()


class NormalisedLinear(torch.nn.Module):
    """A prototype head: cosine to each class's mean embedding, over a fitted temperature."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray):
        super().__init__()
        self.linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(torch.from_numpy(weight).float())
            self.linear.bias.copy_(torch.from_numpy(bias).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.nn.functional.normalize(x, dim=1, eps=1e-12))


def prototype_candidate(features: Features, num_classes: int) -> tuple[torch.nn.Module, Candidate]:
    """Nearest class mean on the embedding (models/transfer/heads.py), scored on val, refitted on train + val."""
    from models.transfer.heads import fit_prototype

    started, dim = time.monotonic(), features.embedding_dim
    scored = fit_prototype(features.train_x[:, -dim:], features.train_y, num_classes)
    scores = val_scores(features.val_y, scored.logits(features.val_x[:, -dim:]).argmax(1))
    final = fit_prototype(np.concatenate([features.train_x[:, -dim:], features.val_x[:, -dim:]]),
                          np.concatenate([features.train_y, features.val_y]), num_classes)
    return NormalisedLinear(final.weight, final.bias), Candidate("prototype", scores, time.monotonic() - started,
                                                               {"temperature": round(final.details["temperature"], 4)})


def with_classifier(built: Built, classifier: Classifier) -> Built:
    model = ImageModel(classifier, built.preprocessing.mean, built.preprocessing.std).eval()
    return replace(built, model=model)


def timed_full(config: TrainConfig, splits: dict[str, list[Sample]], labels: list[str]) -> tuple[float, float]:
    """(a full fine-tune's epoch, one of its steps) from TIMED_STEPS real training steps (decoding and
    augmentation included) and an evaluated batch. The forward pass alone misjudged it: the inspection
    job's torch forward was timed at 81 and 112 ms per image in two runs, and its epochs took 53 and
    47–55 s, where 3 and 2.5 forward passes per image planned 99 and 115 s, so the full fine-tune got
    half the epochs that fitted."""
    from training.recipe import time_steps

    step_s, per_image_s = time_steps(config.replace(strategy="full"), splits["train"], labels)
    epoch_s = steps_per_epoch(len(splits["train"]), config.batch_size) * step_s + len(splits["val"]) * per_image_s
    return epoch_s, step_s


def full_reserve(config: TrainConfig, features: Features, best_f1: float, elapsed_s: float,
                 after_s: tuple[float, float]) -> tuple[float, float]:
    """(seconds kept for a full fine-tune, what is kept after training beside them), when the cheap heads
    are clearly not good enough and at least MIN_FINETUNE_EPOCHS (whole or drawn, `finetune_plan`) fit the
    most the budget can be (as given, else its cap), after the invariance passes over val. A reserve
    replaces the partial fine-tune (training/spend.py `for_full`); the invariances are still measured for it.
    Only a full fine-tune adapts the early layers, where a thin defect is still resolved: on a 300 px
    inspection target (383 train images at 256 px) it reached val accuracy 0.91 in 6 epochs, the
    frozen-feature heads 0.70, and the cached partial fine-tune, which had taken the budget, 0.72.

    `after_s`: what the job spends after training with the INT8 step and without it. The INT8 variant is
    optional (it runs after publishing only when the budget still fits it), so it yields to a fine-tune that
    whole epochs do not fit, which would see less of the data for each second it keeps: on the inspection
    target at 1,950 images its estimate (466 s) left 212 s of the 900 s cap for training."""
    with_int8, without = after_s
    if config.strategy != "auto" or best_f1 >= GOOD_ENOUGH:
        return 0.0, with_int8
    left = (config.budget_s or BUDGET_CAP_S) - elapsed_s - len(GENERATORS) * len(features.val_y) * (
        features.pass_s or features.per_image_s)  # the invariance passes over val come first
    planned = finetune_plan(config, features, left - with_int8)
    if planned.epochs >= MIN_FINETUNE_EPOCHS and planned.epoch_images is None:
        return planned.seconds, with_int8
    planned = finetune_plan(config, features, left - without)
    return (planned.seconds, without) if planned.epochs >= MIN_FINETUNE_EPOCHS else (0.0, with_int8)


def augmented(config: TrainConfig, kept: list[str]) -> TrainConfig:
    """The full fine-tune augments with what the invariance test measured to keep the label: flips (the
    recipe's guess from colour is overruled) and quarter turns (unless the user set `turns`). On the
    inspection target all three were kept, and a full fine-tune with flips alone had trained on a quarter of
    the views the label allows."""
    turns = "rot90" in kept if config.turns is None else config.turns
    return config.replace(hflip=True if "hflip" in kept else config.hflip, turns=turns)


@dataclass
class FinetunePlan:
    epochs: int
    epoch_images: int | None  # train images drawn per epoch; None: all of them
    seconds: float
    why: str


def finetune_plan(config: TrainConfig, features: Features, remaining_s: float) -> FinetunePlan:
    """A full fine-tune that fits `remaining_s`, at the epoch and step `timed_full` measured: whole epochs
    when MIN_FINETUNE_EPOCHS of them fit; else MIN_FINETUNE_EPOCHS epochs that each draw a fresh random
    part of the train set, when that part is at least MIN_EPOCH_STEPS batches, takes longer to train on
    than the val pass after it (or the epochs would mostly validate), and the epochs together see at least
    as many images as the train set has (the cheap heads saw all of them). On the 300 px inspection
    target at 1,950 images an epoch was timed at 408 s, so no whole epochs fitted and the job was left with heads on
    frozen features; at 450 images (383 train), 5 whole epochs, 1,900 images seen, had beaten them."""
    cost, n_train, batch = features.full_epoch_s, len(features.train_y), config.batch_size
    fitting = int(remaining_s // cost) if cost > 0 else 0
    wanted, _ = fit_epochs(n_train, batch)
    epochs = min(wanted, fitting)
    timed = (f"about {cost:.0f}s per epoch (timed on training steps): "
             f"{fitting} epoch(s) fit the {remaining_s:.0f}s left, {wanted} wanted")
    if epochs >= MIN_FINETUNE_EPOCHS or features.full_step_s <= 0:
        return FinetunePlan(epochs, None, epochs * cost, timed)
    val_s = max(cost - steps_per_epoch(n_train, batch) * features.full_step_s, 0.0)
    steps = int((remaining_s / MIN_FINETUNE_EPOCHS - val_s) // features.full_step_s)
    if steps < MIN_EPOCH_STEPS:
        return FinetunePlan(0, None, 0.0,
                            f"{timed}; {MIN_FINETUNE_EPOCHS} epochs of {MIN_EPOCH_STEPS} steps do not fit either")
    if steps * features.full_step_s < val_s:  # a large val set beside a few steps: the epochs would mostly validate
        return FinetunePlan(0, None, 0.0, f"{timed}; a drawn epoch of {steps} steps would spend less time training "
                                          f"than validating ({val_s:.0f}s)")
    images = steps * batch
    if MIN_FINETUNE_EPOCHS * images < n_train:  # the 60,000-image job: 3 x 2,400 of 51,000 lost val, 0.881 to 0.929
        return FinetunePlan(0, None, 0.0, f"{timed}; {MIN_FINETUNE_EPOCHS} drawn epochs of {images} images would see "
                                          f"less than the {n_train} the cheap heads were fitted on")
    if images >= n_train:  # whole epochs after all (the timed epoch rounds its last batch up)
        return FinetunePlan(MIN_FINETUNE_EPOCHS, None, MIN_FINETUNE_EPOCHS * cost, timed)
    seconds = MIN_FINETUNE_EPOCHS * (steps * features.full_step_s + val_s)
    return FinetunePlan(MIN_FINETUNE_EPOCHS, images, seconds, (
        f"{timed}; instead {MIN_FINETUNE_EPOCHS} epochs of {images} of the {n_train} train images (a fresh random draw "
        f"each, {features.full_step_s:.2f}s per step of {batch}): about {seconds:.0f}s"))


@torch.no_grad()
def predict(model: ImageModel, samples: list[Sample], labels: list[str], spec) -> np.ndarray:
    """Predicted class indices of `samples` through the serving preprocessing `spec`."""
    dataset = ImageDataset(samples, labels, spec, train=False, cache=False)
    model.eval()
    return np.concatenate([model(x)[0].argmax(1).numpy() for x, _ in make_loader(dataset, 64, False, 0, 0)])


def run_finetune(config: TrainConfig, splits: dict[str, list[Sample]], labels: list[str], planned: FinetunePlan,
                 progress: Progress, stop: threading.Event | None, resume: bool) -> tuple[TrainResult, Candidate]:
    started = time.monotonic()
    # No early stopping unless the user asks: the budget already chose the epochs, the cosine schedule needs all
    # of them to anneal, and the best epoch on val is kept anyway. Patience 2 on 67 val images stopped the
    # inspection job after 4 of 6 epochs; 12 epochs gave +0.04 test macro F1.
    tuned = config.replace(strategy="full", epochs=planned.epochs, epoch_images=planned.epoch_images)
    result = train(tuned, splits, labels, progress, stop, resume)
    targets = np.array([labels.index(s.label) for s in splits["val"]])
    scores = val_scores(targets, predict(result.built.model, splits["val"], labels, result.built.preprocessing))
    return result, Candidate("full", scores, time.monotonic() - started, {"epochs": planned.epochs,
                                                                           "epoch_images": planned.epoch_images,
                                                                           "hflip": bool(config.hflip),
                                                                           "turns": bool(config.turns),
                                                                           "best_epoch": result.best_epoch})


def run_auto(config: TrainConfig, splits: dict[str, list[Sample]], labels: list[str], progress: Progress | None = None,
             stop: threading.Event | None = None, resume: bool = False, job_started: float | None = None) -> TrainResult:
    """Fit the cheap candidates, maybe a fine-tune, and return the best on val as a TrainResult.

    `job_started` (time.monotonic): when the job began, so the budget counts its loading too (45 s of
    the 60,000-image job); by default, now."""
    progress = progress or Progress()
    started = time.monotonic()
    job_started = started if job_started is None else job_started
    budget = config.budget_s or default_budget_s(len(splits["train"]))
    built = build_source(config, len(labels), labels)
    if stages_for(built.model.classifier.body) is None:
        if config.strategy == "multidepth":
            raise ConfigError(f"strategy multidepth needs a backbone whose stages can be tapped "
                              f"(EfficientNet-Lite, MobileNetV3, EfficientNet-B0, ConvNeXt, simple_cnn); "
                              f"{built.backbone} has none")
        log.info("auto: no multi-depth features for %s; a full fine-tune", built.backbone)
        return replace(train(config.replace(strategy="full"), splits, labels, progress, stop, resume), strategy="full")
    split = split_for(built.model, PARTIAL_BLOCKS) if config.strategy == "auto" else None
    # the first forward pass also caches the frozen trunk's output for a partial fine-tune
    progress.budget(budget)
    stages, features, trunk = compute_features(built, splits, labels, config, stop, split, progress)
    balanced = config.class_balance != "none"
    dim = features.embedding_dim
    progress.stage("heads", 0, 3)
    logistic = fit_head(features.train_x[:, -dim:], features.train_y, features.val_x[:, -dim:], features.val_y,
                        len(labels), balanced)
    progress.stage("heads", 1, 3)
    multi = fit_head(features.train_x, features.train_y, features.val_x, features.val_y, len(labels), balanced)
    progress.stage("heads", 2, 3)
    blocks = built.model.classifier.blocks
    standard = with_classifier(built, Classifier(built.model.classifier.body, folded(logistic), blocks))
    multidepth = with_classifier(built, classifier_for(stages, multi, blocks))
    proto_head, proto = prototype_candidate(features, len(labels))
    models = {"prototype": with_classifier(built, Classifier(built.model.classifier.body, proto_head, blocks)),
              "logistic": standard, "multidepth": multidepth}
    progress.stage("heads", 3, 3)
    candidates = [proto] + [Candidate(name, head.val, head.seconds, {"c": head.c, "features": int(head.weight.shape[1]),
                                                                     "refitted_on_val": head.refitted})
                            for name, head in (("logistic", logistic), ("multidepth", multi))]
    if config.strategy == "multidepth":
        candidates = candidates[-1:]
    results = {name: TrainResult(model_built, labels, [], 0, "cpu", 0.0) for name, model_built in models.items()}
    best = max(candidates, key=lambda c: c.val["macro_f1"])
    tuning, measured = config, {}
    pass_s = features.pass_s or features.per_image_s
    after = after_training_s(pass_s, splits, config.int8)
    if config.strategy == "auto" and best.val["macro_f1"] < ROOM:
        epoch_s, step_s = timed_full(config, splits, labels)
        features = replace(features, full_epoch_s=epoch_s, full_step_s=step_s)
    if config.strategy == "auto" and best.val["macro_f1"] < ROOM and trunk is not None:
        heads = (multi, True, logistic) if multi.val["macro_f1"] > logistic.val["macro_f1"] else (logistic, False, logistic)
        reserved, after = full_reserve(config, features, best.val["macro_f1"], time.monotonic() - job_started,
                                       (after, after_training_s(pass_s, splits, False)))
        spent = spend(config, built, stages, split, trunk, heads, features, splits, labels, job_started, budget,
                      best.val["macro_f1"], progress, stop, after + reserved,
                      for_full=reserved > 0)
        measured = {k: spent.notes[k] for k in ("invariance", "partial") if k in spent.notes}
        tuning = augmented(tuning, measured.get("invariance", {}).get("kept", []))
        budget, trunk = spent.budget_s, None
        progress.budget(budget)
        candidates += add_spent(spent, results, labels)
    remaining = budget - (time.monotonic() - job_started) - after
    if config.strategy == "auto" and best.val["macro_f1"] < ROOM:
        planned = finetune_plan(config, features, remaining)
        log.info("auto: best cheap candidate %s (val macro F1 %.4f); fine-tune: %s", best.strategy,
                 best.val["macro_f1"], planned.why)
        if planned.epochs >= MIN_FINETUNE_EPOCHS:
            results["full"], tuned = run_finetune(tuning, splits, labels, planned, progress, stop, resume)
            candidates.append(replace(tuned, details={**tuned.details, **measured}))
    chosen = choose(candidates, len(features.val_y))
    log.info("auto: chose %s; candidates %s", chosen.strategy,
             {c.strategy: round(c.val["macro_f1"], 4) for c in candidates})
    result = results[chosen.strategy]
    calibration = crossfit_logits(chosen.strategy, chosen.details, features, len(labels), balanced)
    return with_calibration(replace(result, seconds=time.monotonic() - started, strategy=chosen.strategy,
                                    candidates=[c.to_dict() for c in candidates], budget_s=round(budget, 1),
                                    pass_s=features.pass_s or features.per_image_s,
                                    checkpoint=result.checkpoint or (None if chosen.strategy == "full" else standard)),
                            calibration)


CHEAP = ("prototype", "logistic", "multidepth")


def choose(candidates: list[Candidate], val_images: int) -> Candidate:
    """The best cheap head, unless a costlier candidate (a partial or full fine-tune) beats it on val by
    more than val's own noise (half of 1/sqrt(n), at least 0.01): on a few dozen val images a 0.02 lead
    is chance, and the costlier model then tends to be the worse one on test. Ties keep the cheaper."""
    cheap = [c for c in candidates if c.strategy in CHEAP] or candidates
    best = max(cheap, key=lambda c: c.val["macro_f1"])
    margin = max(0.01, 0.5 / max(val_images, 1) ** 0.5)
    costlier = [c for c in candidates if c not in cheap and c.val["macro_f1"] > best.val["macro_f1"] + margin]
    return max(costlier, key=lambda c: c.val["macro_f1"]) if costlier else best


def add_spent(spent: Spent, results: dict[str, TrainResult], labels: list[str]) -> list[Candidate]:
    """The second stage's candidates (training/spend.py) as results and candidates; its plan in their details
    (a plan that did not fit is logged)."""
    added = []
    for name, scores, details in spent.candidates:
        served, tuned, tail, seconds = spent.results[name]
        results[name] = TrainResult(served, labels, tail.history, tail.best_epoch, "cpu", seconds, checkpoint=tuned)
        added.append(Candidate(name, scores, seconds, {**details, **spent.notes}))
    return added


def should_run_auto(config: TrainConfig) -> bool:
    return config.strategy in ("auto", "multidepth")

