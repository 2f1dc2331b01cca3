"""Multi-depth head: a linear head on pooled features from every stage of a frozen backbone.

Where the last layer's ImageNet features do not fit the target (scans, digits, surfaces), a head on
them alone is weak; earlier stages still describe strokes, edges and textures. Following Head2Toe
(Evci et al., ICML 2022), every block's output is pooled (globally, and over a 2×2 grid so the
coarse layout survives: where a stroke is matters for a digit), concatenated, standardised, and a
logistic head is fitted on it with scikit-learn. The features are computed once (no augmentation),
so fitting costs one forward pass over the data; the result exports as one ONNX graph like any
other model (`MultiDepthClassifier`), so serving stays torch-free.

Measured on scikit-learn's digits split by writer (64 px, EfficientNet-Lite0 ImageNet): a logistic
head on the last layer 0.92, on all depths with global pooling 0.96, with the 2×2 grid added 0.98;
an RBF SVC on the raw pixels 0.96 in the same run.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from torch import nn

from training.backbones import Classifier

log = logging.getLogger("tuneserve.training")

GRID = 2  # each stage is also pooled over a GRID×GRID grid of cells
SEARCH_ROWS = 8192  # a streamed head's C is chosen on this many train rows (training/streaming.py)
C_VALUES = (0.03, 0.1, 0.3)  # inverse L2 strength, chosen on val; wide features want strong regularisation
MAX_ITER = 1000


def tail_of(body: nn.Module) -> nn.Module:
    """The body's own forward from its last feature map on (pooling, and whatever the backbone puts
    before its head: MobileNetV3's Linear + Hardswish, ConvNeXt's LayerNorm), sharing its parameters.

    A shallow copy whose trunk is an identity: the embedding is the model's own `features()`, not a
    re-implementation of it, so a head fitted on it reads what the exported head reads."""
    tail = copy.copy(body)
    if isinstance(getattr(body, "features", None), nn.Sequential):
        tail._modules = {**body._modules, "features": nn.Identity()}
    else:  # EfficientNet-Lite: forward = extract_features → pooling → dropout → head
        tail.extract_features = lambda x: x
    return tail


class LiteStages(nn.Module):
    """EfficientNet-Lite body → (the feature map after each MBConv block and after the head conv, the embedding)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self._tail = (tail_of(net),)  # a tuple: not registered twice

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        maps = []
        for block in net._blocks:
            x = block(x)
            maps.append(x)
        maps.append(net._swish(net._bn1(net._conv_head(x))))
        return maps, self._tail[0](maps[-1])


class SequentialStages(nn.Module):
    """A body whose `features` is a Sequential of stages (torchvision's MobileNetV3, EfficientNet and
    ConvNeXt, the tiny test CNN) → (each stage's output, the embedding)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self._tail = (tail_of(net),)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        maps = []
        for stage in self.net.features:
            x = stage(x)
            maps.append(x)
        return maps, self._tail[0](maps[-1])


def stages_for(body: nn.Module) -> nn.Module | None:
    """The stage tap for a backbone body, or None when multi-depth features are not supported for it."""
    if all(hasattr(body, name) for name in ("_conv_stem", "_blocks", "_conv_head", "extract_features")):
        return LiteStages(body)
    if isinstance(getattr(body, "features", None), nn.Sequential):
        return SequentialStages(body)
    return None


@torch.no_grad()
def embedding_gap(stages: nn.Module, body: nn.Module, x: torch.Tensor) -> float:
    """max |tap's embedding − the body's own output| relative to its scale, on normalised images `x`:
    a backbone whose forward does not start with its stages would give the heads the wrong columns."""
    stages.eval()
    _, embedding = stages(x)
    own = body(x)
    if own.shape != embedding.shape:
        return float("inf")
    return float((embedding - own).abs().max()) / max(1.0, float(own.abs().max()))


def grid_means(x: torch.Tensor, grid: int) -> torch.Tensor:
    """Mean over each cell of a grid×grid split (adaptive-pooling cell bounds, written out for export)."""
    height, width = int(x.shape[-2]), int(x.shape[-1])
    cells = []
    for i in range(grid):
        top, bottom = (i * height) // grid, -(-((i + 1) * height) // grid)
        for j in range(grid):
            left, right = (j * width) // grid, -(-((j + 1) * width) // grid)
            cells.append(x[:, :, top:bottom, left:right].mean((2, 3)))
    return torch.stack(cells, 2).flatten(1)


def pool_stages(maps: list[torch.Tensor], embedding: torch.Tensor | None = None, grid: int = GRID) -> torch.Tensor:
    """Global mean and grid cells of every stage but the last, then the embedding (the model's own
    `features()`; the last stage's global mean where none is given). The last stage gets no grid: it
    would add the most dimensions and, measured, nothing. The embedding's columns come last."""
    parts = []
    for stage in maps[:-1]:
        parts += [stage.mean((2, 3)), grid_means(stage, grid)]
    parts.append(maps[-1].mean((2, 3)) if embedding is None else embedding)
    return torch.cat(parts, 1)


class MultiDepthClassifier(Classifier):
    """Stages → standardised multi-depth features → the linear head.

    The exported `embedding` stays the source's usual one (what its own head reads): the
    in-domain score, drift reference, advisor and instant heads keep working on a compact vector
    instead of ten thousand dimensions."""

    def __init__(self, stages: nn.Module, head: nn.Linear, blocks: list[nn.Module], mean: torch.Tensor,
                 scale: torch.Tensor, grid: int = GRID):
        super().__init__(stages, head, blocks)
        self.grid = grid
        self.register_buffer("mean", mean.float().view(1, -1))
        self.register_buffer("scale", scale.float().view(1, -1))

    def standardised(self, maps: list[torch.Tensor], embedding: torch.Tensor) -> torch.Tensor:
        return (pool_stages(maps, embedding, self.grid) - self.mean) / self.scale

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.standardised(*self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def logits_and_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps, embedding = self.body(x)
        return self.head(self.standardised(maps, embedding)), embedding


@torch.no_grad()
def extract(stages: nn.Module, normalise: Callable[[torch.Tensor], torch.Tensor], batches,
            stop=None) -> tuple[np.ndarray, np.ndarray]:
    """Raw (unstandardised) multi-depth features and targets of every batch, in order."""
    from models.errors import Cancelled

    stages.eval()
    feats, targets = [], []
    for x, y in batches:
        if stop is not None and stop.is_set():
            raise Cancelled("cancelled while computing multi-depth features")
        feats.append(pool_stages(*stages(normalise(x))).float().numpy())
        targets.append(np.asarray(y))
    return np.concatenate(feats), np.concatenate(targets).astype(np.int64)


@dataclass
class FittedHead:
    """A logistic head on standardised features, with how it scored on val."""

    weight: np.ndarray  # [C, D]
    bias: np.ndarray  # [C]
    mean: np.ndarray  # [D] feature standardisation
    scale: np.ndarray  # [D]
    c: float
    val: dict[str, float]
    seconds: float
    refitted: bool = True  # refitted on train + val (small data); a streamed head keeps val unseen

    def logits(self, features: np.ndarray) -> np.ndarray:
        """In chunks of rows: float16 features are converted a chunk at a time, never all at once."""
        weight, shift = self.weight / self.scale, self.bias - (self.weight / self.scale) @ self.mean
        out = [np.asarray(features[i:i + 4096], np.float32) @ weight.T + shift for i in range(0, len(features), 4096)]
        return np.concatenate(out) if out else np.zeros((0, len(self.bias)), np.float32)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        from models.serving.calibration import softmax

        return softmax(self.logits(features))

    def linear(self) -> nn.Linear:
        layer = nn.Linear(self.weight.shape[1], self.weight.shape[0])
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(self.weight).float())
            layer.bias.copy_(torch.from_numpy(self.bias).float())
        return layer


def val_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Macro F1 (what candidates are chosen by: it does not ignore a minority class), accuracy, balanced accuracy."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    return {"macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred))}


def standardiser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(0), x.std(0) + 1e-6


def row_space(z: np.ndarray) -> np.ndarray | None:
    """An orthonormal basis [D, R] of the rows of `z` when there are fewer rows than columns, else None.

    An L2-regularised linear model's weights lie in the span of its training rows (representer
    theorem), so fitting on `z @ basis` and mapping back is exact and, with ten images per class
    and ten thousand features, a hundred times cheaper. The basis comes from the N×N Gram matrix
    (two matrix products and a small eigendecomposition), not an SVD of the wide matrix: measured
    78 s against a few for 1,257 × 10,320 on 2 loaded cores."""
    if len(z) >= z.shape[1]:
        return None
    gram = z @ z.T
    values, vectors = np.linalg.eigh(gram)
    keep = values > values.max() * 1e-10
    return (z.T @ vectors[:, keep]) / np.sqrt(values[keep])


def logistic(c: float, balanced: bool):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=MAX_ITER, class_weight="balanced" if balanced else None)


def fit_logistic(z: np.ndarray, y: np.ndarray, c: float, balanced: bool, basis: np.ndarray | None):
    """A logistic model on `z` (in `basis` coordinates when given) → (classes, [C', D] coef, intercept);
    scikit-learn's binary form (one row: the logit of the second class) where two classes are present."""
    model = logistic(c, balanced).fit(z @ basis if basis is not None else z, y)
    coef = model.coef_ @ basis.T if basis is not None else model.coef_
    return model.classes_, coef, model.intercept_


def predicted(classes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Class labels from `fit_logistic` scores (one column: the binary form)."""
    return classes[(scores[:, 0] > 0).astype(int)] if scores.shape[1] == 1 else classes[scores.argmax(1)]


def fit_head(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, num_classes: int,
             balanced: bool = True, c_values: tuple[float, ...] = C_VALUES) -> FittedHead:
    """Fit a logistic head per C on train, keep the best on val (macro F1; ties: stronger L2), then refit
    it on train + val: with ten images per class, the val images are too many to leave out. Large
    problems stream instead (`fit_head_streaming`)."""
    from training.streaming import streams

    if streams(*train_x.shape):
        return fit_head_streaming(train_x, train_y, val_x, val_y, num_classes, balanced, c_values)
    started = time.monotonic()
    train_x, val_x = np.asarray(train_x, np.float32), np.asarray(val_x, np.float32)
    mean, scale = standardiser(train_x)
    train_z, val_z = (train_x - mean) / scale, (val_x - mean) / scale
    basis = row_space(train_z)
    best = None
    for c in c_values:
        classes, coef, intercept = fit_logistic(train_z, train_y, c, balanced, basis)
        scores = val_scores(val_y, predicted(classes, val_z @ coef.T + intercept)) if len(val_y) else {"macro_f1": 0.0}
        if best is None or scores["macro_f1"] > best[1]["macro_f1"] + 1e-9:
            best = (c, scores)
    c, scores = best
    head = fit_fixed(np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y]), c, num_classes, balanced)
    return replace(head, val=scores, seconds=time.monotonic() - started)


def fit_head_streaming(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                       num_classes: int, balanced: bool, c_values: tuple[float, ...]) -> FittedHead:
    """C chosen on val from fits on a stratified sample of train (`SEARCH_ROWS`, in float32, each C
    warm-started from the last), then one fit on all of train at that C, warm-started from the sample's
    and cut at `FULL_ITER` L-BFGS steps, a chunk at a time (training/streaming.py): on 51,000 × 10,320
    features one full evaluation is about 2 s, so three fits to convergence took 1,600 s. No refit on
    train + val: with thousands of val rows the head loses little by not seeing them, and calibration
    then has honest val logits without cross-fitting (training/crossfit.py)."""
    from training.streaming import FULL_ITER, SEARCH_ITER, fit_streaming, moments

    started = time.monotonic()
    mean, scale = moments(train_x)
    sample = stratified_rows(train_y, SEARCH_ROWS)
    sample_x, sample_y = np.asarray(train_x[sample], np.float32), train_y[sample]
    best, warm = None, None
    for c in sorted(c_values):
        weight, bias, info = fit_streaming(sample_x, sample_y, c, num_classes, balanced, mean, scale, warm,
                                           max_iter=SEARCH_ITER)
        warm = (weight, bias)
        head = _streamed_head(weight, bias, mean, scale, c, val_x, val_y)
        log.info("streamed head: C=%g on a sample of %d x %d: val macro F1 %.4f (%d evaluations, %.0fs)", c,
                 *sample_x.shape, head.val["macro_f1"], info["evaluations"], info["seconds"])
        if best is None or head.val["macro_f1"] > best.val["macro_f1"] + 1e-9:
            best = head
    del sample_x
    weight, bias, info = fit_streaming(train_x, train_y, best.c, num_classes, balanced, mean, scale,
                                       (best.weight, best.bias), max_iter=FULL_ITER)
    head = _streamed_head(weight, bias, mean, scale, best.c, val_x, val_y)
    log.info("streamed head: C=%g on all %d x %d: val macro F1 %.4f (%d evaluations, %.0fs)", best.c, *train_x.shape,
             head.val["macro_f1"], info["evaluations"], info["seconds"])
    return replace(head, seconds=time.monotonic() - started)


def _streamed_head(weight, bias, mean, scale, c: float, val_x: np.ndarray, val_y: np.ndarray) -> FittedHead:
    head = FittedHead(weight.astype(np.float32), bias.astype(np.float32), mean.astype(np.float32),
                      scale.astype(np.float32), c, {}, 0.0, refitted=False)
    return replace(head, val=val_scores(val_y, head.logits(val_x).argmax(1)) if len(val_y) else {"macro_f1": 0.0})


def stratified_rows(y: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Up to `count` row indices (sorted) with each class in its share of `y`, at least one each."""
    if len(y) <= count:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    picked = []
    for label in np.unique(y):
        rows = np.flatnonzero(y == label)
        picked.append(rng.choice(rows, max(1, round(count * len(rows) / len(y))), replace=False))
    return np.sort(np.concatenate(picked))


def fit_fixed(x: np.ndarray, y: np.ndarray, c: float, num_classes: int, balanced: bool = True) -> FittedHead:
    """One logistic head at a chosen C on all of `x` (standardised on `x`): the refit, and each
    cross-fitted fold that calibration is fitted on (training/auto.py). Large problems stream."""
    from training.streaming import fit_streaming, moments, streams

    started = time.monotonic()
    if streams(*x.shape):
        mean, scale = moments(x)
        weight, bias, _ = fit_streaming(x, y, c, num_classes, balanced, mean, scale)
    else:
        x = np.asarray(x, np.float32)
        mean, scale = standardiser(x)
        z = (x - mean) / scale
        classes, coef, intercept = fit_logistic(z, y, c, balanced, row_space(z))
        weight, bias = _full_rank(classes, coef, intercept, num_classes, x.shape[1])
    return FittedHead(weight.astype(np.float32), bias.astype(np.float32), mean.astype(np.float32),
                      scale.astype(np.float32), c, {}, time.monotonic() - started)


def _full_rank(classes: np.ndarray, coef: np.ndarray, intercept: np.ndarray, num_classes: int,
               dim: int) -> tuple[np.ndarray, np.ndarray]:
    """[C, D] weights and [C] biases for every class index, also when training saw only two classes."""
    weight = np.zeros((num_classes, dim))
    bias = np.full(num_classes, -1e4)  # a class never seen in training is never predicted
    if coef.shape[0] == 1:  # scikit-learn stores one row for binary problems: logit of class 1
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    weight[classes] = coef
    bias[classes] = intercept
    return weight, bias


def classifier_for(stages: nn.Module, head: FittedHead, blocks: list[nn.Module]) -> MultiDepthClassifier:
    return MultiDepthClassifier(stages, head.linear(), blocks, torch.from_numpy(head.mean),
                                torch.from_numpy(head.scale))
