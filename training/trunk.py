"""Partial fine-tunes on a cached trunk: the frozen part of the network runs once per view, the last
block(s) and the head then train for many epochs on what it wrote.

A `partial` fine-tune of the last N blocks spends most of each step in the frozen trunk, which
gives the same output every epoch (its BatchNorm statistics are frozen, nothing in it learns). Its
output is cached once per augmentation view (training/invariance.py), and each step runs the tail
alone: the same optimiser, schedule, batch order and early stopping as `training/train.py`, so on a
model without stochastic layers in its trunk the result equals the uncached run (tested). On
EfficientNet-Lite the uncached run also drops residual branches at random in the frozen blocks
(stochastic depth in train mode); the cached trunk runs them as evaluation does.

The tail is the body's own modules: training it updates the model that is exported, whole.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training.backbones import ImageModel
from training.config import TrainConfig
from training.data import class_weights, make_loader
from training.multidepth import tail_of
from training.strategies import configure_strategy, set_train_mode

CACHE_BYTES_FP32 = 2**30  # a larger cache is kept in float16 (half the memory; the tail computes in float32)


@dataclass
class Split:
    """Where a body splits into a frozen trunk and a trained tail."""

    last_frozen: nn.Module  # its output is the trunk's (an output of the feature pass, training/feature_pass.py)
    trunk: Callable[[torch.Tensor], torch.Tensor]  # normalised NCHW image → trunk output
    tail: Callable[[torch.Tensor], torch.Tensor]  # trunk output → what the head reads


def _lite_split(net: nn.Module, first: int) -> Split:
    count = len(net._blocks)

    def rate(index: int) -> float | None:  # the package's own stochastic-depth schedule
        base = net._global_params.drop_connect_rate
        return base * float(index) / count if base else base

    def trunk(x: torch.Tensor) -> torch.Tensor:
        x = net._swish(net._bn0(net._conv_stem(x)))
        for index in range(first):
            x = net._blocks[index](x)
        return x

    after = tail_of(net)  # pooling, dropout and the (identity) head: the body's own forward

    def tail(x: torch.Tensor) -> torch.Tensor:
        for index in range(first, count):
            x = net._blocks[index](x, drop_connect_rate=rate(index))
        return after(net._swish(net._bn1(net._conv_head(x))))

    return Split(net._blocks[first - 1], trunk, tail)


def _sequential_split(net: nn.Module, first: int) -> Split:
    after = tail_of(net)

    def tail(x: torch.Tensor) -> torch.Tensor:
        for stage in net.features[first:]:
            x = stage(x)
        return after(x)

    return Split(net.features[first - 1], lambda x: net.features[:first](x), tail)


def split_for(model: ImageModel, trained_blocks: int) -> Split | None:
    """The split that trains the last `trained_blocks` of the registry's blocks, or None where it is not
    supported (a backbone other than EfficientNet-Lite or simple_cnn, or nothing left to freeze)."""
    body = model.classifier.body
    first = len(model.classifier.blocks) - trained_blocks
    if all(hasattr(body, n) for n in ("_conv_stem", "_blocks", "_conv_head")):
        first = min(first, len(body._blocks))  # the registry's last block is the head conv
        return _lite_split(body, first) if first >= 1 else None
    if isinstance(getattr(body, "features", None), nn.Sequential) and 1 <= first:
        return _sequential_split(body, first)
    return None


def compact(x: torch.Tensor) -> torch.Tensor:
    return x.half() if x.numel() * 4 > CACHE_BYTES_FP32 else x.float()


@torch.no_grad()
def trunk_outputs(model: ImageModel, split: Split, batches, view: Callable[[torch.Tensor], torch.Tensor],
                  device: torch.device, stop=None) -> torch.Tensor:
    """The trunk's output for every image of `batches` (uint8 NHWC) under `view`, in order."""
    from models.errors import Cancelled

    model.eval()
    outputs = []
    for x, _ in batches:
        if stop is not None and stop.is_set():
            raise Cancelled("cancelled while caching the trunk")
        outputs.append(split.trunk(model.normalise(view(x).to(device))).float().cpu())
    return compact(torch.cat(outputs))


class Rows(torch.utils.data.Dataset):
    """Row indices with their targets: the train loader's sampler and order, over cached rows."""

    def __init__(self, targets: torch.Tensor):
        self.targets = [int(t) for t in targets]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return i, self.targets[i]


@dataclass
class Cached:
    train_x: torch.Tensor  # trunk outputs, every view's rows one after another
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor


@dataclass
class TailResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    epochs_run: int = 0
    stopped_by: str = "epochs"  # epochs | patience | deadline
    seconds: float = 0.0


class Deadline:
    """A hard end: `left()` seconds remain; the clock is injectable so tests need not sleep."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.clock, self.end = clock, clock() + seconds

    def left(self) -> float:
        return self.end - self.clock()


def _forward(model: ImageModel, split: Split, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    amp = device.type == "cuda"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        return model.classifier.head(split.tail(x.to(device).float())).float()


@torch.no_grad()
def _validate(model: ImageModel, split: Split, cached: Cached, batch_size: int, device) -> tuple[float, np.ndarray]:
    model.eval()
    losses, logits = [], []
    for start in range(0, len(cached.val_y), batch_size):
        out = _forward(model, split, cached.val_x[start:start + batch_size], device)
        y = cached.val_y[start:start + batch_size].to(device)
        losses.append(float(nn.functional.cross_entropy(out, y, reduction="sum")))
        logits.append(out.cpu().numpy())
    return sum(losses) / max(len(cached.val_y), 1), np.concatenate(logits) if logits else np.zeros((0, 0))


def train_tail(model: ImageModel, split: Split, cached: Cached, config: TrainConfig, num_classes: int,
               deadline: Deadline | None = None, on_step: Callable[[int, int, float], None] | None = None) -> TailResult:
    """Train the tail and head on cached trunk outputs like `train()` trains a `partial` strategy
    (AdamW groups, cosine schedule, the loader's order, best val loss kept, patience); stops early,
    keeping the best epoch, when `deadline` leaves less than one more step."""
    started, device = time.monotonic(), next(model.parameters()).device
    groups = configure_strategy(model, config.replace(strategy="partial"))
    weight = class_weights(cached.train_y.tolist(), num_classes).to(device) if config.class_balance == "loss" else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
    loader = make_loader(Rows(cached.train_y), config.batch_size, True, num_workers=0, seed=config.seed,
                         balance=config.class_balance, num_classes=num_classes)
    steps = math.ceil(len(cached.train_y) / config.batch_size)
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps * config.epochs, 1))
    result, best_loss, best_state, bad, step_s, done = TailResult(), math.inf, None, 0, 0.0, 0
    bar = tqdm(total=steps * config.epochs, desc="partial (cached trunk)", leave=False, disable=None)
    for epoch in range(config.epochs):
        set_train_mode(model)
        for rows, y in loader:
            if deadline is not None and deadline.left() < step_s * 1.5:
                result.stopped_by = "deadline"
                break
            tick = time.monotonic()
            loss = criterion(_forward(model, split, cached.train_x[rows], device), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step_s = max(step_s * 0.9, time.monotonic() - tick)  # a cautious (slow-decaying) step time
            bar.update(1)  # the bar shows the ETA on a terminal; on_step reports it to a job
            done += 1
            if on_step is not None:
                on_step(epoch + 1, done, float(loss.detach()))
        if result.stopped_by == "deadline":
            break
        val_loss, _ = _validate(model, split, cached, config.batch_size, device)
        result.history.append({"epoch": epoch + 1, "val_loss": val_loss, "seconds": round(time.monotonic() - started, 2)})
        result.epochs_run = epoch + 1
        if val_loss < best_loss - 1e-6:
            best_loss, best_state, result.best_epoch, bad = val_loss, copy.deepcopy(model.state_dict()), epoch + 1, 0
        else:
            bad += 1
        if config.patience and bad >= config.patience:
            result.stopped_by = "patience"
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.monotonic() - started
    return result
