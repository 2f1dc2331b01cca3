"""The training loop: strategies, AdamW + cosine, early stopping, per-epoch checkpoints and resume."""
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

from models.datasets import Sample
from models.errors import Cancelled  # in models/ so torch-free jobs (instant heads) raise the same one
from training.backbones import Built, ImageModel, build_source
from training.config import ConfigError, TrainConfig
from training.data import ImageDataset, class_weights, make_loader
from training.progress import Progress

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
# Strategies.


def configure_strategy(model: ImageModel, config: TrainConfig) -> list[dict[str, Any]]:
    """Set requires_grad per strategy and return AdamW parameter groups."""
    classifier = model.classifier
    head = list(classifier.head.parameters())
    body_named = list(classifier.body.named_parameters())
    for _, p in body_named:
        p.requires_grad = config.strategy == "full"
    for p in head:
        p.requires_grad = True
    lr = config.learning_rate
    if config.strategy == "linear":
        return [{"params": head, "lr": lr, "name": "head"}]
    if config.strategy == "full":
        body = [p for _, p in body_named]
        return [
            {"params": body, "lr": lr * config.backbone_lr_scale, "name": "backbone"},
            {"params": head, "lr": lr, "name": "head"},
        ]
    # partial: the last N blocks, plus whatever follows the last block in the body (final norms, pre-logits)
    blocks = classifier.blocks
    if config.partial_blocks > len(blocks):
        raise ConfigError(f"partial_blocks={config.partial_blocks} but {len(blocks)} blocks exist in this backbone")
    in_block: dict[int, int] = {}
    for index, block in enumerate(blocks):
        for p in block.parameters():
            in_block[id(p)] = index
    first_trained = len(blocks) - config.partial_blocks
    last_block_param = max((i for i, (_, p) in enumerate(body_named) if id(p) in in_block), default=-1)
    trained = []
    for position, (_, p) in enumerate(body_named):
        block = in_block.get(id(p))
        if (block is not None and block >= first_trained) or (block is None and position > last_block_param):
            p.requires_grad = True
            trained.append(p)
    return [
        {"params": trained, "lr": lr * config.backbone_lr_scale, "name": "backbone"},
        {"params": head, "lr": lr, "name": "head"},
    ]


def set_train_mode(model: nn.Module) -> None:
    """Train mode, except frozen BatchNorm layers keep their running statistics."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if not any(p.requires_grad for p in module.parameters(recurse=False)):
                module.eval()


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


def _tensor_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator | None):
    order = torch.randperm(len(y), generator=generator) if generator is not None else torch.arange(len(y))
    for start in range(0, len(y), batch_size):
        index = order[start : start + batch_size]
        yield x[index], y[index]


# ---------------------------------------------------------------------------------------------


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
    device = pick_device(config.device)
    cuda = device.type == "cuda"

    built = build_source(config, len(labels), labels)
    model = built.model
    spec = built.preprocessing
    groups = configure_strategy(model, config)
    if cuda:
        model = model.to(device, memory_format=torch.channels_last)
        built.model = model
    else:
        model.to(device)

    augment = config.use_augment()
    cache_features = config.strategy == "linear" and not augment
    train_ds = ImageDataset(splits["train"], labels, spec, train=augment, hflip=config.hflip, seed=config.seed)
    val_ds = ImageDataset(splits["val"], labels, spec, train=False)
    num_classes = len(labels)
    weight = class_weights(train_ds.targets, num_classes).to(device) if config.class_balance == "loss" else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
    val_criterion = nn.CrossEntropyLoss()
    loader_kwargs = dict(num_workers=config.num_workers, seed=config.seed, pin_memory=cuda)
    train_loader = make_loader(train_ds, config.batch_size, True, balance=config.class_balance,
                               num_classes=num_classes, **loader_kwargs)
    val_loader = make_loader(val_ds, config.batch_size, False, **loader_kwargs)
    steps = math.ceil(len(train_ds) / config.batch_size)
    total_steps = steps * config.epochs

    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp_dtype == torch.float16)

    history: list[dict[str, Any]] = []
    start_epoch, best_loss, best_epoch, bad_epochs = 0, math.inf, 0, 0
    last_path, best_path = out / LAST, out / BEST
    if resume and last_path.is_file():
        state = torch.load(last_path, map_location=device, weights_only=False)
        if state.get("source") != config.source or state.get("strategy") != config.strategy or state.get("labels") != labels:
            raise ConfigError(f"{last_path} was written by a different run (source/strategy/labels differ); cannot resume")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        start_epoch, history = state["epoch"], state["history"]
        if state.get("stopped_early"):
            start_epoch = config.epochs
        best_loss, best_epoch, bad_epochs = state["best_loss"], state["best_epoch"], state["bad_epochs"]
        log.info("resuming from %s at epoch %d", last_path, start_epoch + 1)
    elif resume:
        log.info("no %s to resume from; starting at epoch 1", last_path)

    features = None
    if cache_features and start_epoch < config.epochs:
        # train_ds does not augment here: its images are the evaluation preprocessing
        train_x, train_y = _features(model, make_loader(train_ds, config.batch_size, False, **loader_kwargs), device, stop)
        val_x, val_y = _features(model, val_loader, device, stop)
        features = (train_x.to(device), train_y.to(device), val_x.to(device), val_y.to(device))

    head = model.classifier.head
    stopped_early = False
    step_times: list[float] = []
    last_val: dict[str, Any] = {"val_accuracy": history[-1]["val_accuracy"] if history else None,
                                "val_loss": history[-1]["val_loss"] if history else None}
    done_steps = start_epoch * steps
    for epoch in range(start_epoch, config.epochs):
        train_ds.set_epoch(epoch)
        set_train_mode(model)
        if features is not None:
            generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
            batches = _tensor_batches(features[0], features[1], config.batch_size, generator)
        else:
            batches = train_loader
        loss_sum, seen = 0.0, 0
        bar = tqdm(batches, total=steps, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=None)
        tick = time.monotonic()
        for step, (x, y) in enumerate(bar, start=1):
            if stop is not None and stop.is_set():
                raise Cancelled(f"cancelled during epoch {epoch + 1}")
            x = x.to(device, non_blocking=True)
            y = torch.as_tensor(y).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = head(x) if features is not None else model.classifier(model.normalise(x))
                loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
            done_steps += 1
            now = time.monotonic()
            step_times.append(now - tick)
            tick = now
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
            if step % config.progress_every == 0 or step == steps:
                recent = step_times[-50:]
                eta = (sum(recent) / len(recent)) * (total_steps - done_steps)
                progress.emit("progress", epoch=epoch + 1, epochs=config.epochs, step=step, steps=steps,
                              train_loss=loss_sum / seen, eta_s=round(eta, 1), **last_val)
        bar.close()

        model.eval()
        if features is not None:
            val_loss, val_acc = _evaluate_batches(head, _tensor_batches(features[2], features[3], config.batch_size, None),
                                                  val_criterion, device)
        else:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                val_loss, val_acc = _evaluate_batches(lambda t: model(t)[0], val_loader, val_criterion, device)
        record = {"epoch": epoch + 1, "epochs": config.epochs, "train_loss": loss_sum / max(seen, 1),
                  "val_loss": val_loss, "val_accuracy": val_acc, "lr": scheduler.get_last_lr()[-1],
                  "seconds": round(time.monotonic() - started, 2)}
        history.append(record)
        last_val = {"val_accuracy": val_acc, "val_loss": val_loss}
        with (out / METRICS).open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if val_loss < best_loss - 1e-6:
            best_loss, best_epoch, bad_epochs = val_loss, epoch + 1, 0
            _save_atomic({"model": model.state_dict(), "epoch": epoch + 1}, best_path)
        else:
            bad_epochs += 1
        if config.patience and bad_epochs >= config.patience:
            stopped_early = True
        _save_atomic(
            {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": _rng_state(), "epoch": epoch + 1, "history": history,
                "best_loss": best_loss, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                "source": config.source, "strategy": config.strategy, "labels": labels,
                "stopped_early": stopped_early,
            },
            last_path,
        )
        progress.emit("epoch", **{k: record[k] for k in ("epoch", "epochs", "train_loss", "val_accuracy", "val_loss")})
        log.info("epoch %d/%d train_loss %.4f val_loss %.4f val_accuracy %.4f", epoch + 1, config.epochs,
                 record["train_loss"], val_loss, val_acc)
        if stopped_early:
            log.info("early stopping: no val improvement for %d epochs", bad_epochs)
            break

    if best_path.is_file():
        model.load_state_dict(torch.load(best_path, map_location=device, weights_only=False)["model"])
    model.eval()
    return TrainResult(built=built, labels=labels, history=history, best_epoch=best_epoch,
                       device=str(device), seconds=time.monotonic() - started, stopped_early=stopped_early)
