"""Evidence maps: where in the image each class's logit comes from, exactly, as a graph output.

Every head tuneserve trains on a tapped backbone reads means of feature maps through a linear map:

    logit_c = bias_c + s · Σ_stages Σ_k Σ_d W[c, k, d] · Σ_xy mask_k(x, y) · F_d(x, y)

where `mask_k` is a pooling mask (1/HW everywhere for a global mean, 1/|cell| inside one cell of the
multi-depth head's 2×2 grid), s = 1 (a last-layer logistic head or a full fine-tune) or 1/‖embedding‖
(the prototype head: one scalar per image). So the per-position terms
`s · Σ_k mask_k(x, y) Σ_d W[c, k, d] F_d(x, y)` sum to `logit_c − bias_c` exactly: class activation
mapping without approximation. `bias_c` is what the logit is on an all-zero feature map (for the
multi-depth head, its bias minus the standardisation mean pushed through the head).

Each stage's map is resampled onto one `side`×`side` grid by area weights (every coarse cell's mass
spread over the fine cells it covers, columns summing to one), which keeps the sum. `side` is the
finest tapped stage's resolution that carries weight, at most MAX_SIDE: the output is
`evidence [N, C, side, side]`, every class at once, so a caller can ask for any class and the graph
needs no extra input; it is C·side² floats per image (10 classes at 56² are 125 kB), a small cost
beside the backbone (measured in docs/explain.md).

Heads that are not linear over pooled maps (MobileNetV3's Linear + Hardswish and ConvNeXt's LayerNorm
between pooling and head, backbones without a stage tap) get no evidence output, and the manifest
says why (`explained(...)` returns the reason; training/export.py records it).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from models.serving.evidence import area_weights
from training.backbones import ImageModel
from training.multidepth import MultiDepthClassifier, stages_for

EVIDENCE_TOLERANCE = 1e-4  # max |Σ map − (logit − bias)| / max(1, max |logit − bias|)
MAX_SIDE = 56


def mean_mask(height: int, width: int) -> torch.Tensor:
    return torch.full((1, height, width), 1.0 / (height * width))


def cell_masks(height: int, width: int, grid: int) -> torch.Tensor:
    """[grid², h, w]: 1/|cell| inside each cell, with multidepth.grid_means's bounds (cells may overlap)."""
    masks = torch.zeros((grid * grid, height, width))
    for i in range(grid):
        top, bottom = (i * height) // grid, -(-((i + 1) * height) // grid)
        for j in range(grid):
            left, right = (j * width) // grid, -(-((j + 1) * width) // grid)
            masks[i * grid + j, top:bottom, left:right] = 1.0 / ((bottom - top) * (right - left))
    return masks


def area_matrix(fine: int, coarse: int) -> torch.Tensor:
    """[fine, coarse]: the share of coarse cell i that lands in fine cell r (each column sums to 1)."""
    return torch.from_numpy(area_weights(fine, coarse)).float()


def linear_terms(weight: torch.Tensor, shapes: list[tuple[int, int, int]]) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """A head on the last map's global mean: one term (stage, W [C, 1, D], masks [1, h, w])."""
    _, height, width = shapes[-1]
    return [(len(shapes) - 1, weight[:, None, :], mean_mask(height, width))]


def multidepth_terms(classifier: MultiDepthClassifier, shapes) -> tuple[list, torch.Tensor]:
    """The multi-depth head split by stage (global mean and grid cells; the embedding last), with the
    standardisation folded in: (terms, bias)."""
    weight = classifier.head.weight / classifier.scale  # [C, D_total]
    bias = classifier.head.bias - (weight * classifier.mean).sum(1)
    cells, terms, offset = classifier.grid ** 2, [], 0
    for stage, (depth, height, width) in enumerate(shapes[:-1]):
        pooled = weight[:, offset:offset + depth]
        gridded = weight[:, offset + depth:offset + depth * (1 + cells)].reshape(-1, depth, cells).transpose(1, 2)
        masks = torch.cat([mean_mask(height, width), cell_masks(height, width, classifier.grid)])
        terms.append((stage, torch.cat([pooled[:, None, :], gridded], 1), masks))
        offset += depth * (1 + cells)
    terms += [(stage, w, m) for stage, w, m in linear_terms(weight[:, offset:], shapes)]
    if offset + shapes[-1][0] != weight.shape[1]:
        raise ValueError(f"multi-depth head reads {weight.shape[1]} features, the stages give {offset + shapes[-1][0]}")
    return terms, bias


class EvidenceHead(nn.Module):
    """(maps, embedding) → evidence [N, C, side, side]: the terms' per-position contributions, maps of one
    resolution summed first, then each resolution resampled once."""

    def __init__(self, terms: list, shapes: list, bias: torch.Tensor, normalised: bool, side: int):
        super().__init__()
        self.stages = [stage for stage, _, _ in terms]
        self.sizes = sorted({shapes[stage][1:] for stage in self.stages})
        self.classes, self.side, self.normalised = int(bias.shape[0]), side, normalised
        self.register_buffer("bias", bias.detach().float().clone())
        for index, (_, weight, masks) in enumerate(terms):
            self.register_buffer(f"w{index}", weight.detach().float().reshape(-1, weight.shape[2], 1, 1).clone())
            self.register_buffer(f"m{index}", masks.float())
        for index, (height, width) in enumerate(self.sizes):
            self.register_buffer(f"rows{index}", area_matrix(side, height))
            self.register_buffer(f"cols{index}", area_matrix(side, width).t().contiguous())

    def forward(self, maps: list[torch.Tensor], embedding: torch.Tensor) -> torch.Tensor:
        summed: dict[tuple[int, int], torch.Tensor] = {}
        for index, stage in enumerate(self.stages):
            feature = maps[stage].float()
            masks = getattr(self, f"m{index}")
            y = nn.functional.conv2d(feature, getattr(self, f"w{index}"))
            y = (y.reshape(y.shape[0], self.classes, masks.shape[0], masks.shape[1], masks.shape[2]) * masks).sum(2)
            key = tuple(masks.shape[1:])
            summed[key] = summed[key] + y if key in summed else y
        out = None
        for index, size in enumerate(self.sizes):
            part = torch.matmul(torch.matmul(getattr(self, f"rows{index}"), summed[size]), getattr(self, f"cols{index}"))
            out = part if out is None else out + part
        if self.normalised:  # the prototype head reads e / max(‖e‖, eps): one scalar per image
            out = out / embedding.float().norm(dim=1).clamp_min(1e-12)[:, None, None, None]
        return out


class ExplainedModel(nn.Module):
    """An `ImageModel` whose graph also gives `evidence`: the same logits from one pass through the tap."""

    def __init__(self, model: ImageModel, tap: nn.Module, evidence: EvidenceHead):
        super().__init__()
        self.model, self.tap, self.evidence = model, tap, evidence

    def logits_of(self, maps: list[torch.Tensor], embedding: torch.Tensor) -> torch.Tensor:
        classifier = self.model.classifier
        if isinstance(classifier, MultiDepthClassifier):
            return classifier.head(classifier.standardised(maps, embedding))
        return classifier.head(embedding)

    def forward(self, image: torch.Tensor):
        maps, embedding = self.tap(self.model.normalise(image))
        logits = self.logits_of(maps, embedding)
        return logits, torch.softmax(logits.float(), dim=1), embedding.float(), self.evidence(maps, embedding)


def resolution(terms: list, shapes: list) -> int:
    """The finest tapped stage's side that carries any weight, at most MAX_SIDE."""
    used = [max(shapes[stage][1:]) for stage, weight, _ in terms if bool(weight.abs().sum() > 0)]
    return min(max(used or [shapes[-1][1]]), MAX_SIDE)


def head_terms(model: ImageModel, shapes: list) -> tuple[list, torch.Tensor, bool] | str:
    """(terms, bias, normalised) for the model's head, or why it is not linear over pooled maps."""
    classifier, head = model.classifier, model.classifier.head
    if isinstance(classifier, MultiDepthClassifier):
        return (*multidepth_terms(classifier, shapes), False)
    if type(classifier).__name__ != "Classifier":
        return f"the classifier ({type(classifier).__name__}) is not a single head on pooled maps"
    if isinstance(head, nn.Linear):
        return linear_terms(head.weight, shapes), head.bias, False
    if isinstance(getattr(head, "linear", None), nn.Linear):  # a prototype head: normalise, then linear (checked below)
        return linear_terms(head.linear.weight, shapes), head.linear.bias, True
    return f"the head ({type(head).__name__}) is not linear over pooled maps"


def evidence_error(logits: np.ndarray, evidence: np.ndarray, bias: np.ndarray) -> float:
    """max |Σ_xy evidence − (logit − bias)| over images and classes, relative to max(1, max |logit − bias|)."""
    target = np.asarray(logits, np.float64) - np.asarray(bias, np.float64)
    gap = np.abs(np.asarray(evidence, np.float64).sum((2, 3)) - target).max()
    return float(gap / max(1.0, float(np.abs(target).max())))


@torch.no_grad()
def explained(model: ImageModel, size: int, images: np.ndarray) -> tuple[ExplainedModel | None, str | None]:
    """`model` with an exact evidence output (checked on `images`, uint8 NHWC), or None and why not."""
    model = model.cpu().eval()
    classifier = model.classifier
    tap = classifier.body if isinstance(classifier, MultiDepthClassifier) else stages_for(classifier.body)
    if tap is None:
        return None, f"no stage tap for this backbone ({type(classifier.body).__name__}): its feature maps are not reachable"
    maps, embedding = tap(model.normalise(torch.zeros((1, size, size, 3), dtype=torch.uint8)))
    shapes = [tuple(int(s) for s in m.shape[1:]) for m in maps]
    if embedding.shape[1] != shapes[-1][0]:
        return None, (f"the embedding ({embedding.shape[1]} features) is not the mean of the last feature map "
                      f"({shapes[-1][0]} channels): the backbone puts layers between pooling and head")
    planned = head_terms(model, shapes)
    if isinstance(planned, str):
        return None, planned
    terms, bias, normalised = planned
    candidate = ExplainedModel(model, tap, EvidenceHead(terms, shapes, bias, normalised, resolution(terms, shapes))).eval()
    logits, _, _, evidence = (t.numpy() for t in candidate(torch.from_numpy(images)))
    own = model(torch.from_numpy(images))[0].numpy()
    if not np.allclose(logits, own, rtol=1e-4, atol=1e-4):
        return None, "the stage tap does not reproduce the model's logits"
    error = evidence_error(logits, evidence, candidate.evidence.bias.numpy())
    if not np.isfinite(error) or error > EVIDENCE_TOLERANCE:
        return None, (f"the evidence maps do not sum to the logits (relative error {error:.2g} > {EVIDENCE_TOLERANCE}): "
                      "the head is not linear over the mean of the last feature map")
    return candidate, None
