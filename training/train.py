"""The training loop: AdamW + cosine over the strategy's parameter groups (`training/strategies.py`),
early stopping, per-epoch checkpoints and resume."""
from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.data.datasets import Sample
from models.errors import Cancelled  # in models/ so torch-free jobs (instant heads) raise the same one
from training.backbones import Built, ImageModel, build_source
from training.config import ConfigError, TrainConfig
from training.data import ImageDataset, class_weights, make_loader
from training.progress import Progress
from training.strategies import configure_strategy, set_train_mode

log = logging.getLogger("tuneserve.training")

LAST = "last.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"


@dataclass
class TrainResult:
    built: Built
    labels: list[str]
    history: list[dict[str, Any]]
    best_epoch: int
    device: str
    seconds: float
    stopped_early: bool = False
    strategy: str | None = None  # what `auto` chose; None: the config's own
    candidates: list[dict[str, Any]] | None = None  # auto: every candidate's val scores and seconds
    budget_s: float | None = None
    checkpoint: Built | None = None  # what checkpoint.pt holds when it differs from the exported model
    pass_s: float | None = None  # auto: the feature pass's seconds per image, what the time after training is planned from


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# ---------------------------------------------------------------------------------------------
# Checkpoints.


def _save_atomic(payload: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Evaluation helpers.


@torch.no_grad()
def _evaluate_batches(forward, batches, criterion, device) -> tuple[float, float]:
    total, correct, loss_sum = 0, 0, 0.0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)
        logits = forward(x).float()
        loss_sum += float(criterion(logits, y)) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
    return loss_sum / max(total, 1), correct / max(total, 1)


@torch.no_grad()
def _features(model: ImageModel, loader, device, stop) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    feats, targets = [], []
    for x, y in loader:
        if stop is not None and stop.is_set():
            raise Cancelled("cancelled while caching features")
        feats.append(model.features(x.to(device)).float().cpu())
        targets.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(targets)


def _tensor_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator | None,
                    limit: int | None = None):
    order = torch.randperm(len(y), generator=generator) if generator is not None else torch.arange(len(y))
    order = order[:limit]
    for start in range(0, len(y), batch_size):
        index = order[start : start + batch_size]
        yield x[index], y[index]


# ---------------------------------------------------------------------------------------------


@dataclass
class Parts:
    """The torch objects one run trains with, assembled once."""

    built: Built
    device: torch.device
    amp_dtype: torch.dtype | None
    train_ds: ImageDataset
    train_loader: Any
    val_loader: Any
    loader_kwargs: dict[str, Any]
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    steps: int  # per epoch
    features: tuple[torch.Tensor, ...] | None = None  # cached (train_x, train_y, val_x, val_y): linear, no augment

    @property
    def model(self) -> ImageModel:
        return self.built.model


@dataclass(frozen=True)
class Standing:
    """Where the run is after `epoch` epochs: what resume restores and early stopping reads."""

    epoch: int = 0
    history: tuple[dict[str, Any], ...] = ()
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False

    def last_val(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {"val_accuracy": last.get("val_accuracy"), "val_loss": last.get("val_loss")}


class Pace:
    """Time left, from the mean of the last 50 step times."""

    def __init__(self, total_steps: int, done_steps: int):
        self.total_steps, self.done_steps = total_steps, done_steps
        self.step_times: list[float] = []
        self.tick = time.monotonic()

    def restart(self) -> None:
        self.tick = time.monotonic()

    def step(self) -> float:
        """Count one step; returns the estimated seconds left."""
        now = time.monotonic()
        self.step_times.append(now - self.tick)
        self.tick = now
        self.done_steps += 1
        recent = self.step_times[-50:]
        return (sum(recent) / len(recent)) * (self.total_steps - self.done_steps)


def train(
    config: TrainConfig,
    splits: dict[str, list[Sample]],
    labels: list[str],
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    resume: bool = False,
) -> TrainResult:
    """Fine-tune per `config` on `splits`; returns the best (lowest val loss) model and the metrics."""
    progress = progress or Progress()
    out = config.resolved_output_dir()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    seed_everything(config.seed)
    parts = _assemble(config, splits, labels)
    standing = _resume(out / LAST, config, labels, parts) if resume else Standing()
    if config.strategy == "linear" and not config.use_augment() and standing.epoch < config.epochs:
        parts.features = _cached_features(config, parts, stop)
    pace = Pace(parts.steps * config.epochs, standing.epoch * parts.steps)
    for epoch in range(standing.epoch, config.epochs):
        train_loss = _train_epoch(config, parts, epoch, standing.last_val(), pace, progress, stop)
        val_loss, val_acc = _validate(config, parts)
        record = {"epoch": epoch + 1, "epochs": config.epochs, "train_loss": train_loss,
                  "val_loss": val_loss, "val_accuracy": val_acc, "lr": parts.scheduler.get_last_lr()[-1],
                  "seconds": round(time.monotonic() - started, 2)}
        standing = _end_epoch(config, labels, parts, out, standing, record)
        progress.epoch_end(epoch + 1, config.epochs, train_loss, val_acc, val_loss)
        log.info("epoch %d/%d train_loss %.4f val_loss %.4f val_accuracy %.4f", epoch + 1, config.epochs,
                 train_loss, val_loss, val_acc)
        if standing.stopped_early:
            log.info("early stopping: no val improvement for %d epochs", standing.bad_epochs)
            break
    if (out / BEST).is_file():
        parts.model.load_state_dict(torch.load(out / BEST, map_location=parts.device, weights_only=False)["model"])
    parts.model.eval()
    return TrainResult(built=parts.built, labels=labels, history=list(standing.history), best_epoch=standing.best_epoch,
                       device=str(parts.device), seconds=time.monotonic() - started,
                       stopped_early=standing.stopped_early)


def _assemble(config: TrainConfig, splits: dict[str, list[Sample]], labels: list[str]) -> Parts:
    """Source model on its device, datasets and loaders, loss, optimiser, cosine schedule, AMP scaler."""
    device = pick_device(config.device)
    cuda = device.type == "cuda"
    built = build_source(config, len(labels), labels)
    groups = configure_strategy(built.model, config)
    if cuda:
        built.model = built.model.to(device, memory_format=torch.channels_last)
    else:
        built.model.to(device)

    spec = built.preprocessing
    train_ds = ImageDataset(splits["train"], labels, spec, train=config.use_augment(), hflip=bool(config.hflip),
                            seed=config.seed, crop_scale=config.crop_scale or 0.5, turns=bool(config.turns))
    val_ds = ImageDataset(splits["val"], labels, spec, train=False)
    num_classes = len(labels)
    weight = class_weights(train_ds.targets, num_classes).to(device) if config.class_balance == "loss" else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
    loader_kwargs = dict(num_workers=config.num_workers, seed=config.seed, pin_memory=cuda)
    train_loader = make_loader(train_ds, config.batch_size, True, balance=config.class_balance,
                               num_classes=num_classes, epoch_images=config.epoch_images, **loader_kwargs)
    val_loader = make_loader(val_ds, config.batch_size, False, **loader_kwargs)
    steps = len(train_loader)

    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps * config.epochs, 1))
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp_dtype == torch.float16)
    return Parts(built=built, device=device, amp_dtype=amp_dtype, train_ds=train_ds, train_loader=train_loader,
                 val_loader=val_loader, loader_kwargs=loader_kwargs, criterion=criterion, optimizer=optimizer,
                 scheduler=scheduler, scaler=scaler, steps=steps)


def _resume(last_path: Path, config: TrainConfig, labels: list[str], parts: Parts) -> Standing:
    """Restore model, optimiser, schedule, scaler and RNGs from `last_path`; a fresh start when it is absent."""
    if not last_path.is_file():
        log.info("no %s to resume from; starting at epoch 1", last_path)
        return Standing()
    state = torch.load(last_path, map_location=parts.device, weights_only=False)
    if state.get("source") != config.source or state.get("strategy") != config.strategy or state.get("labels") != labels:
        raise ConfigError(f"{last_path} was written by a different run (source/strategy/labels differ); cannot resume")
    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    parts.scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    epoch = config.epochs if state.get("stopped_early") else state["epoch"]
    log.info("resuming from %s at epoch %d", last_path, epoch + 1)
    return Standing(epoch=epoch, history=tuple(state["history"]), best_loss=state["best_loss"],
                    best_epoch=state["best_epoch"], bad_epochs=state["bad_epochs"],
                    stopped_early=bool(state.get("stopped_early")))


def _cached_features(config: TrainConfig, parts: Parts, stop: threading.Event | None) -> tuple[torch.Tensor, ...]:
    """Backbone features of train and val, computed once (linear strategy without augmentation)."""
    # train_ds does not augment here: its images are the evaluation preprocessing
    in_order = make_loader(parts.train_ds, config.batch_size, False, **parts.loader_kwargs)
    train_x, train_y = _features(parts.model, in_order, parts.device, stop)
    val_x, val_y = _features(parts.model, parts.val_loader, parts.device, stop)
    return tuple(t.to(parts.device) for t in (train_x, train_y, val_x, val_y))


def _train_epoch(config: TrainConfig, parts: Parts, epoch: int, last_val: dict[str, Any], pace: Pace,
                 progress: Progress, stop: threading.Event | None) -> float:
    """One pass over the training data; emits progress events; returns the mean training loss."""
    parts.train_ds.set_epoch(epoch)
    set_train_mode(parts.model)
    if parts.features is not None:
        generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        batches = _tensor_batches(parts.features[0], parts.features[1], config.batch_size, generator,
                                   config.epoch_images)
    else:
        batches = parts.train_loader
    loss_sum, seen = 0.0, 0
    bar = tqdm(batches, total=parts.steps, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=None)
    pace.restart()
    for step, (x, y) in enumerate(bar, start=1):
        if stop is not None and stop.is_set():
            raise Cancelled(f"cancelled during epoch {epoch + 1}")
        loss = _optimiser_step(parts, x, y)
        loss_sum += loss * len(y)
        seen += len(y)
        eta = pace.step()
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        if step % config.progress_every == 0 or step == parts.steps:
            progress.step(epoch + 1, config.epochs, step, parts.steps, loss_sum / seen, round(eta, 1), **last_val)
    bar.close()
    return loss_sum / max(seen, 1)


def _optimiser_step(parts: Parts, x: Any, y: Any) -> float:
    """Forward (on cached features: the head only), backward, step; returns the batch loss."""
    model, device = parts.model, parts.device
    x = x.to(device, non_blocking=True)
    y = torch.as_tensor(y).to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=parts.amp_dtype, enabled=parts.amp_dtype is not None):
        logits = model.classifier.head(x) if parts.features is not None else model.classifier(model.normalise(x))
        loss = parts.criterion(logits.float(), y)
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.scheduler.step()
    return float(loss.detach())


def _validate(config: TrainConfig, parts: Parts) -> tuple[float, float]:
    """Validation (unweighted) loss and accuracy."""
    model = parts.model
    model.eval()
    criterion = nn.CrossEntropyLoss()
    if parts.features is not None:
        batches = _tensor_batches(parts.features[2], parts.features[3], config.batch_size, None)
        return _evaluate_batches(model.classifier.head, batches, criterion, parts.device)
    with torch.autocast(parts.device.type, dtype=parts.amp_dtype, enabled=parts.amp_dtype is not None):
        return _evaluate_batches(lambda t: model(t)[0], parts.val_loader, criterion, parts.device)


def _end_epoch(config: TrainConfig, labels: list[str], parts: Parts, out: Path, standing: Standing,
               record: dict[str, Any]) -> Standing:
    """Log the epoch's metrics, keep the best weights, checkpoint everything resume needs; the new standing."""
    with (out / METRICS).open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    best_loss, best_epoch, bad_epochs = standing.best_loss, standing.best_epoch, standing.bad_epochs + 1
    if record["val_loss"] < standing.best_loss - 1e-6:
        best_loss, best_epoch, bad_epochs = record["val_loss"], record["epoch"], 0
        _save_atomic({"model": parts.model.state_dict(), "epoch": record["epoch"]}, out / BEST)
    stopped_early = bool(config.patience and bad_epochs >= config.patience)
    standing = Standing(epoch=record["epoch"], history=(*standing.history, record), best_loss=best_loss,
                        best_epoch=best_epoch, bad_epochs=bad_epochs, stopped_early=stopped_early)
    _save_atomic(
        {
            "model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(), "scaler": parts.scaler.state_dict(), "rng": _rng_state(),
            "epoch": standing.epoch, "history": list(standing.history), "best_loss": best_loss,
            "best_epoch": best_epoch, "bad_epochs": bad_epochs, "source": config.source,
            "strategy": config.strategy, "labels": labels, "stopped_early": stopped_early,
        },
        out / LAST,
    )
    return standing
