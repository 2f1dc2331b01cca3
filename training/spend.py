"""`auto`'s second stage: when the cheap heads leave room, spend the budget where it pays.

The plan, estimated from the timed forward pass before anything runs, and recorded with why:
1. which flips and quarter turns keep the label, measured on val (training/invariance.py);
2. the frozen trunk's output for the views those make (the untransformed one was captured during
   the first forward pass), cached once (training/trunk.py);
3. the last blocks and the head trained on those rows for many epochs (a partial fine-tune at a
   fraction of a full one's cost), warm-started from the fitted logistic head (linear probe, then
   fine-tune: the head does not tear the features apart while it is still random);
4. test-time averaging over the label-keeping views, served only when it pays on val.

Budget: a user's `budget_s` is a hard cap (a deadline stops training, keeping the best epoch). With
no `budget_s`, the default grows to what the plan needs (within BUDGET_CAP_S) when the cheap heads
are clearly not good enough (val macro F1 below GOOD_ENOUGH): a slow target then gets the strategy
its estimates favour instead of nothing.
"""
from __future__ import annotations

import copy
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from models.data.datasets import Sample
from models.transfer.recipe import BUDGET_RANGE_S
from training.backbones import Built, ImageModel
from training.config import TrainConfig
from training.data import ImageDataset, make_loader
from training.invariance import GENERATORS, TTA_MIN_GAIN, Invariance, ViewAveraged, apply_view, averaged_gain, decide
from training.multidepth import FittedHead, val_scores
from training.progress import Progress
from training.recipe import FIXED_SECONDS
from training.train import pick_device
from training.trunk import Cached, Deadline, Split, split_for, train_tail, trunk_outputs

log = logging.getLogger("tuneserve.training")

GOOD_ENOUGH = 0.95  # below this best cheap val macro F1 the default budget grows to fit the plan
BUDGET_CAP_S = BUDGET_RANGE_S[1]  # the most a default budget grows to (15 minutes)
PARTIAL_BLOCKS = 2  # EfficientNet-Lite: the last MBConv block and the head conv
MAX_VIEWS = 4  # train views cached (the untransformed one included)
TAIL_STEPS = 600  # optimiser steps a cached partial fine-tune aims at, within TAIL_EPOCHS
TAIL_EPOCHS = (3, 20)
TAIL_PATIENCE = 3


@dataclass
class Plan:
    views: int
    epochs: int
    estimate_s: float
    budget_s: float
    why: str


@dataclass
class Spent:
    """What the second stage adds: candidates (name → (TrainResult args, Candidate dict)), the budget, notes."""

    results: dict[str, Any] = field(default_factory=dict)
    candidates: list[Any] = field(default_factory=list)
    budget_s: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)


def tail_epochs(rows: int, batch_size: int) -> int:
    steps = max(1, math.ceil(rows / batch_size))
    return min(TAIL_EPOCHS[1], max(TAIL_EPOCHS[0], math.ceil(TAIL_STEPS / steps)))


def plan(n_train: int, n_val: int, per_image_s: float, step_s: float, batch_size: int, elapsed: float,
         budget: float, given: bool, best_f1: float, pass_s: float | None = None,
         after_s: float = FIXED_SECONDS) -> Plan:
    """Views and epochs that fit; with no budget given and weak cheap heads, the budget that fits them.
    `pass_s`: a frozen pass per image (the feature pass's engine), where it differs from torch's forward;
    `after_s`: what the job spends after training (training/recipe.after_training_s)."""
    pass_s = per_image_s if pass_s is None else pass_s
    measure = len(GENERATORS) * n_val * pass_s

    def cost(views: int, epochs: int) -> float:
        steps = math.ceil(n_train * views / batch_size)
        return measure + (views - 1) * n_train * pass_s + epochs * (steps + math.ceil(n_val / batch_size) / 3) * step_s

    wanted = Plan(MAX_VIEWS, tail_epochs(n_train * MAX_VIEWS, batch_size), 0.0, budget, "")
    wanted.estimate_s = cost(wanted.views, wanted.epochs)
    room = budget - elapsed - after_s
    grown = ""
    if not given and best_f1 < GOOD_ENOUGH and wanted.estimate_s > room:
        budget = min(BUDGET_CAP_S, max(budget, elapsed + after_s + wanted.estimate_s * 1.1))
        room = budget - elapsed - after_s
        grown = (f"; no budget given and the best cheap head's val macro F1 {best_f1:.3f} < {GOOD_ENOUGH}: "
                 f"the default budget grows to {budget:.0f}s (at most {BUDGET_CAP_S:.0f}s)")
    for views in range(MAX_VIEWS, 0, -1):  # fewer views before fewer epochs: each view costs a forward pass
        epochs = tail_epochs(n_train * views, batch_size)
        while epochs > TAIL_EPOCHS[0] and cost(views, epochs) > room:
            epochs -= 1
        if cost(views, epochs) <= room:
            return Plan(views, epochs, cost(views, epochs), budget, (
                f"estimated {cost(views, epochs):.0f}s for {views} view(s) x {epochs} epoch(s) of the cached partial "
                f"fine-tune ({per_image_s * 1000:.1f} ms per image forward, {step_s * 1000:.0f} ms per tail step); "
                f"{room:.0f}s left{grown}"))
    return Plan(0, 0, wanted.estimate_s, budget, f"the cached partial fine-tune needs about {wanted.estimate_s:.0f}s "
                                                 f"and {room:.0f}s are left{grown}")


def time_tail_step(model: ImageModel, split: Split, rows: torch.Tensor, batch_size: int) -> float:
    """Seconds of one tail training step (forward, backward), measured on a copy so nothing learns."""
    probe = copy.deepcopy(model)
    tail_split = split_for(probe, PARTIAL_BLOCKS)
    x = rows[:batch_size].float()
    started = time.perf_counter()
    for _ in range(2):
        probe.classifier.head(tail_split.tail(x)).sum().backward()
    return (time.perf_counter() - started) / 2


def views_of(loader, view: str):
    return ((apply_view(x, view), y) for x, y in loader)


def measure_invariance(runner, loader, n_val: int, predict, val_x: np.ndarray, val_y: np.ndarray,
                       stop) -> tuple[Invariance, dict[str, torch.Tensor]]:
    """Each generator's val features (for the decision) and trunk outputs (for test-time averaging), from
    the feature pass's own tap (training/feature_pass.py)."""
    from training.feature_pass import feature_pass

    features, trunks = {"identity": val_x}, {}
    for view in GENERATORS:
        done = feature_pass(runner, views_of(loader, view), n_val, stop=stop, stage=f"features ({view})")
        features[view], trunks[view] = done.features, done.trunk
    return decide(predict, features, val_y), trunks


def view_trunks(built: Built, split: Split, runner, loader, n_train: int, view: str, stop) -> torch.Tensor:
    """The trunk's output for every train image under `view`: the tap on ONNX Runtime where it runs there
    (its whole pass is faster than torch's trunk alone), else torch's trunk."""
    if runner.engine == "onnxruntime":
        from training.feature_pass import feature_pass

        return feature_pass(runner, views_of(loader, view), n_train, stop=stop, stage=f"partial ({view})").trunk
    return trunk_outputs(built.model, split, loader, lambda x: apply_view(x, view),
                         next(built.model.parameters()).device, stop)


def spend(config: TrainConfig, built: Built, stages, split: Split, trunk: torch.Tensor,
          heads: tuple[FittedHead, bool, FittedHead], features, splits: dict[str, list[Sample]], labels: list[str], started: float, budget: float, best_f1: float,
          progress: Progress, stop: threading.Event | None, after_s: float, for_full: bool = False) -> Spent:
    """Measure invariances, cache the trunk's views and train the tail; the `partial` candidate if it fits.
    `after_s`: what the budget keeps after the partial fine-tune (the time after training, and the full
    fine-tune's epochs when `auto.full_reserve` kept them): the plan fits in what is left, and a default
    budget grows to it. `for_full`: a full fine-tune will run, so the invariances are measured (three
    passes over val; they are its augmentation) and no partial fine-tune trains. It would get what the
    full one's whole epochs leave (under one of them: 3 epochs in 39 s on the inspection target), and on
    val crops cut from the train photos such a partial fine-tune won val twice and lost test twice
    (macro F1 0.533 and 0.590 against the frozen head's 0.649 and 0.702), with the same shift towards the
    minority class: a noisy extra candidate, not a better model.

    `heads`: the best cheap linear head, whether it reads every column (multi-depth) or the embedding's, and
    the logistic head on the embedding (the tail's warm start)."""
    head, every_column, warm = heads
    per_image_s = features.per_image_s
    n_train, n_val = len(splits["train"]), len(splits["val"])
    trunk = trunk[len(trunk) - n_train - n_val:]  # the pass's rows are the last ones (a check may run the tap first)
    cached = Cached(trunk[:n_train], torch.tensor([labels.index(s.label) for s in splits["train"]]),
                    trunk[n_train:], torch.tensor([labels.index(s.label) for s in splits["val"]]))
    step_s = time_tail_step(built.model, split, cached.train_x, config.batch_size)
    the_plan = plan(n_train, n_val, per_image_s, step_s, config.batch_size, time.monotonic() - started, budget,
                    bool(config.budget_s), best_f1, pass_s=features.pass_s or per_image_s,
                    after_s=after_s)
    log.info("auto: cached partial fine-tune: %s", the_plan.why)
    spent = Spent(budget_s=the_plan.budget_s, notes={"plan": the_plan.why, "estimate_s": round(the_plan.estimate_s, 1)})
    if the_plan.views == 0 and not for_full:
        return spent
    loaders = {name: make_loader(ImageDataset(splits[name], labels, built.preprocessing, train=False), 64, False,
                                 num_workers=config.num_workers, seed=config.seed) for name in ("train", "val")}
    columns = slice(None) if every_column else slice(-features.embedding_dim, None)
    invariance, val_trunks = measure_invariance(features.runner, loaders["val"], n_val,
                                                judge(features, columns, head, config.class_balance != "none"),
                                                features.val_x, cached.val_y.numpy(), stop)
    spent.notes["invariance"] = invariance.to_dict()
    if for_full:
        spent.notes["partial"] = "not trained: a full fine-tune runs (the partial one would get its leftover seconds)"
        return spent
    if the_plan.views == 0:
        return spent
    deadline = Deadline(started + the_plan.budget_s - after_s - time.monotonic())
    views = invariance.views[:the_plan.views]
    started_tail = time.monotonic()
    train_x = [cached.train_x] + [view_trunks(built, split, features.runner, loaders["train"], n_train, v, stop)
                                  for v in views[1:]]
    cached = Cached(torch.cat(train_x), cached.train_y.repeat(len(views)), cached.val_x, cached.val_y)
    tuned, tail = tuned_copy(built, warm)
    epochs = the_plan.epochs
    tuned.model.to(pick_device(config.device))  # the tail trains where the device is; export reads it on the CPU
    result = train_tail(tuned.model, tail, cached, config.replace(epochs=epochs, patience=TAIL_PATIENCE), len(labels),
                        deadline, on_step=pacer(progress, epochs, math.ceil(len(cached.train_y) / config.batch_size)))
    tuned.model.cpu()
    if not result.epochs_run:
        spent.notes["partial"] = "stopped by the deadline before one epoch"
        return spent
    served, tta = with_tta(tuned, tail, cached, val_trunks, invariance)
    scores = val_scores(cached.val_y.numpy(), tail_logits(tuned.model, tail, cached.val_x).argmax(1))
    details = {"blocks": PARTIAL_BLOCKS, "views": views, "epochs": epochs, "epochs_run": result.epochs_run,
               "best_epoch": result.best_epoch, "stopped_by": result.stopped_by, "estimate_s": round(the_plan.estimate_s, 1),
               "tail_step_s": round(step_s, 4), "tta": tta}
    spent.results["partial"] = (served, tuned, result, time.monotonic() - started_tail)
    spent.candidates.append(("partial", scores if not tta["served"] else tta["scores"], details))
    return spent


def judge(features, columns: slice, head: FittedHead, balanced: bool):
    """The cheap head fitted on the train rows alone: a refitted head has seen val, so it would score
    untransformed val images perfectly and every transform would look like it changes the label. A
    streamed head never saw val and is its own judge."""
    if not head.refitted:
        return lambda x: head.logits(x[:, columns]).argmax(1)
    from training.multidepth import fit_logistic, predicted, row_space, standardiser

    train_x = np.asarray(features.train_x[:, columns], np.float32)
    mean, scale = standardiser(train_x)
    z = (train_x - mean) / scale
    classes, coef, intercept = fit_logistic(z, features.train_y, head.c, balanced, row_space(z))
    return lambda x: predicted(classes, ((np.asarray(x[:, columns], np.float32) - mean) / scale) @ coef.T + intercept)


def tuned_copy(built: Built, head: FittedHead) -> tuple[Built, Split]:
    """A copy of the source to train (the cheap candidates share the original's body), its head the fitted
    logistic head with the standardisation folded in (a warm start)."""
    tuned = copy.deepcopy(built)
    weight = head.weight / head.scale  # the standardisation folded in: the head reads the raw embedding
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight).float())
        linear.bias.copy_(torch.from_numpy(head.bias - weight @ head.mean).float())
    tuned.model.classifier.head = linear
    return tuned, split_for(tuned.model, PARTIAL_BLOCKS)


@torch.no_grad()
def tail_logits(model: ImageModel, split: Split, rows: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    out = [model.classifier.head(split.tail(rows[i:i + batch_size].to(device).float())).float().cpu().numpy()
           for i in range(0, len(rows), batch_size)]
    return np.concatenate(out)


def with_tta(tuned: Built, split: Split, cached: Cached, val_trunks: dict[str, torch.Tensor],
             invariance: Invariance) -> tuple[Built, dict[str, Any]]:
    """The tuned model, wrapped to average its logits over the kept views when that pays on val."""
    views = ["identity", *invariance.kept]
    if len(views) == 1:
        return tuned, {"served": False, "why": "no view keeps the label"}
    by_view = {"identity": cached.val_x, **{v: val_trunks[v] for v in invariance.kept}}
    y = cached.val_y.numpy()
    gain = averaged_gain(lambda rows: tail_logits(tuned.model, split, rows), by_view, y, views,
                         lambda t, p: val_scores(t, p)["macro_f1"])
    invariance.tta_gain = round(gain, 4)
    if gain < TTA_MIN_GAIN:
        return tuned, {"served": False, "views": views, "gain": round(gain, 4),
                       "why": f"averaging {len(views)} views adds {gain:+.3f} val macro F1 (< {TTA_MIN_GAIN}): not worth "
                              f"{len(views)}x the serving cost"}
    invariance.tta = True
    mean = np.mean([tail_logits(tuned.model, split, by_view[v]) for v in views], 0)
    served = copy.copy(tuned)
    served.model = ImageModel(ViewAveraged(tuned.model.classifier, views), tuned.preprocessing.mean,
                              tuned.preprocessing.std).eval()
    return served, {"served": True, "views": views, "gain": round(gain, 4), "scores": val_scores(y, mean.argmax(1)),
                    "why": f"averaging {len(views)} views adds {gain:+.3f} val macro F1: the served graph averages them "
                           f"({len(views)}x the serving cost)"}


def pacer(progress: Progress, epochs: int, steps: int):
    """Progress events with an ETA from the mean step time so far."""
    started = time.monotonic()

    def on_step(epoch: int, done: int, loss: float) -> None:
        if done % 10 == 0 or done == epochs * steps:
            eta = (time.monotonic() - started) / done * (epochs * steps - done)
            progress.step(epoch, epochs, done - (epoch - 1) * steps, steps, loss, round(eta, 1))

    return on_step
