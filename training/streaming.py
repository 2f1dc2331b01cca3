"""A logistic head fitted a chunk of rows at a time: memory that does not grow with the data.

scikit-learn's lbfgs needs the standardised feature matrix in float64 beside the raw one (51,000 ×
10,320 Fashion-MNIST features: 4.2 GB each, 13 GB at the refit) and took most of a 1,891 s job.
This solver minimises the same objective — scikit-learn's multinomial logistic regression,

    ½‖W‖² + C · Σᵢ sᵢ · CE(yᵢ, softmax(W zᵢ + b)),   zᵢ = (xᵢ − mean) / scale,

with sᵢ the balanced class weights when asked for (for two classes, ‖W‖² with rows ±w/2: the binary
model's ½‖w‖²) — with torch's L-BFGS over full-batch gradients that are summed chunk by chunk from
the float16 features. The standardisation is folded into the weights (W / scale), so a chunk is only
converted to float32, never copied standardised. Memory: one chunk plus the weights. Equal to the
in-memory fit on small problems (tests/test_streaming_head.py).
"""
from __future__ import annotations

import time

import numpy as np
import torch

CHUNK_ROWS = 4096
MAX_ITER = 200
SEARCH_ITER = 100  # per C on the sample: it only chooses C, the full fit (warm-started from it) refines
FULL_ITER = 40  # L-BFGS steps of the one fit on all rows, warm-started from the sample's (see multidepth)
TOLERANCE = 1e-6  # on the mean objective's gradient (max abs), L-BFGS's own stop
STREAM_ABOVE = 40_000_000  # rows × columns above which heads stream (the in-memory fit copies in float64)


def streams(rows: int, columns: int) -> bool:
    return rows * columns > STREAM_ABOVE


def moments(x: np.ndarray, chunk: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and std (+1e-6, as training/multidepth.standardiser), in float64, a chunk at a time."""
    total = np.zeros(x.shape[1])
    squares = np.zeros(x.shape[1])
    for start in range(0, len(x), chunk):
        block = x[start:start + chunk].astype(np.float64)
        total += block.sum(0)
        squares += np.square(block).sum(0)
    mean = total / len(x)
    variance = np.maximum(squares / len(x) - mean**2, 0.0)
    return mean, np.sqrt(variance) + 1e-6


def sample_weights(y: np.ndarray, num_classes: int, balanced: bool) -> np.ndarray:
    """scikit-learn's `class_weight="balanced"`: n / (classes present × count of the row's class)."""
    if not balanced:
        return np.ones(len(y))
    present, counts = np.unique(y, return_counts=True)
    per_class = np.zeros(num_classes)
    per_class[present] = len(y) / (len(present) * counts)
    return per_class[y]


def chunk_gradients(x: np.ndarray, chunks, target: torch.Tensor, weight_of: torch.Tensor, folded: torch.Tensor,
                    shift: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Σᵢ sᵢ·CE(yᵢ, softmax(folded xᵢ + shift)) and its gradients in (folded, shift), summed a chunk at a time;
    written out (softmax − one-hot), not through autograd: one product forward, one back, nothing kept."""
    total = torch.zeros((), dtype=torch.float64)
    grad_w, grad_b = torch.zeros(folded.shape, dtype=torch.float64), torch.zeros(shift.shape, dtype=torch.float64)
    for start, end in chunks:
        rows = torch.from_numpy(np.ascontiguousarray(x[start:end])).float()
        logits = rows @ folded.T + shift
        log_p = torch.log_softmax(logits, 1)
        picked = torch.arange(end - start)
        weights = weight_of[start:end]
        total += -(log_p[picked, target[start:end]].double() * weights).sum()
        residual = log_p.exp_()
        residual[picked, target[start:end]] -= 1.0
        residual *= weights.float()[:, None]
        grad_w += (residual.T @ rows).double()
        grad_b += residual.sum(0).double()
    return total, [grad_w, grad_b]


def fit_streaming(x: np.ndarray, y: np.ndarray, c: float, num_classes: int, balanced: bool,
                  mean: np.ndarray, scale: np.ndarray, warm: tuple[np.ndarray, np.ndarray] | None = None,
                  max_iter: int = MAX_ITER, chunk: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray, dict]:
    """→ (W [C, D], b [C]) on standardised features, as scikit-learn's LogisticRegression(C=c) would fit
    them, and how the fit went. Classes absent from `y` get zero weights and bias −1e4 (never predicted)."""
    started = time.monotonic()
    present = np.unique(y)
    index = {int(k): i for i, k in enumerate(present)}
    target = torch.from_numpy(np.array([index[int(k)] for k in y], dtype=np.int64))
    weight_of = torch.from_numpy(sample_weights(y, num_classes, balanced)).double()
    k, d = len(present), x.shape[1]
    mean_t, scale_t = torch.from_numpy(np.asarray(mean, np.float64)), torch.from_numpy(np.asarray(scale, np.float64))
    w = torch.zeros(k, d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    if warm is not None:
        with torch.no_grad():
            w.copy_(torch.from_numpy(np.asarray(warm[0], np.float64)[present]))
            b.copy_(torch.from_numpy(np.asarray(warm[1], np.float64)[present]))
    penalty = 1.0 if k == 2 else 0.5  # two classes: the binary model's ½‖w‖² (see the module docstring)
    norm = c * float(weight_of.sum())  # the objective over this: same minimiser, gradients of order one
    chunks = [(s, min(s + chunk, len(x))) for s in range(0, len(x), chunk)]
    evaluations = 0

    def closure() -> torch.Tensor:
        nonlocal evaluations
        evaluations += 1
        optimiser.zero_grad()
        folded = w / scale_t  # z @ W.T = x @ (W / scale).T − mean @ (W / scale).T
        shift = b - folded @ mean_t
        total, grads = chunk_gradients(x, chunks, target, weight_of, folded.detach().float(),
                                       shift.detach().float())
        objective = c * total + penalty * (w * w).sum()
        # ∂/∂(w, b) of c·Σ loss, by the chain rule through the fold, from the chunks' summed gradients
        surrogate = c * ((folded * grads[0].double()).sum() + (shift * grads[1].double()).sum())
        (surrogate + penalty * (w * w).sum()).div(norm).backward()
        return objective.detach() / norm

    optimiser = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=TOLERANCE,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")
    objective = optimiser.step(closure)
    weight = np.zeros((num_classes, d))
    bias = np.full(num_classes, -1e4)
    weight[present], bias[present] = w.detach().numpy(), b.detach().numpy()
    return weight, bias, {"evaluations": evaluations, "objective": float(objective),
                          "seconds": round(time.monotonic() - started, 2)}
