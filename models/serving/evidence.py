"""What a caller sees of an evidence map (the graph's `evidence [C, side, side]`, training/evidence.py):
a small grid that keeps the sum, and an overlay on the image the model saw. numpy and Pillow only.

The graph's cells sum to the class's logit minus its bias; `summarise` pools them onto GRID_SIDE²
cells by area weights (so the sum is still that), and divides by the largest magnitude so the grid
is in [-1, 1] with that `scale` beside it: grid × scale are each cell's share of logit − bias.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from models.errors import TuneserveError

GRID_SIDE = 14
OVERLAY_ALPHA = 0.6  # the strongest cell covers the image this much
POSITIVE, NEGATIVE = np.array([255.0, 40.0, 0.0]), np.array([0.0, 110.0, 255.0])  # evidence for / against


def area_weights(fine: int, coarse: int) -> np.ndarray:
    """[fine, coarse]: the share of coarse cell i that lands in fine cell r (each column sums to 1), so
    resampling with it keeps a map's sum whatever the two sizes."""
    r, i = np.arange(fine)[:, None], np.arange(coarse)[None, :]
    overlap = np.minimum((r + 1) / fine, (i + 1) / coarse) - np.maximum(r / fine, i / coarse)
    return np.clip(overlap, 0, None) * coarse


def resampled(cells: np.ndarray, side: int) -> np.ndarray:
    """[h, w] → [side, side], the sum kept."""
    cells = np.asarray(cells, np.float64)
    return area_weights(side, cells.shape[0]) @ cells @ area_weights(side, cells.shape[1]).T


@dataclass
class Summary:
    grid: np.ndarray  # [side, side] in [-1, 1]
    scale: float  # max |cell| before normalising (0 for an all-zero map)
    total: float  # the map's sum: the class's logit minus its bias


def summarise(cells: np.ndarray, side: int = GRID_SIDE) -> Summary:
    """One class's map as a normalised `side`×`side` grid with its scale and sum."""
    small = resampled(cells, side)
    scale = float(np.abs(small).max())
    return Summary(small / scale if scale > 0 else small, scale, float(np.asarray(cells, np.float64).sum()))


def overlay(pixels: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """uint8 [S, S, 3]: the image with positive evidence in orange-red and negative in blue, each as
    opaque as its share of the strongest cell (the grid smoothed up to the image by bilinear resizing)."""
    from PIL import Image

    height, width = pixels.shape[:2]
    field = np.asarray(Image.fromarray(np.asarray(grid, np.float32), mode="F").resize((width, height), Image.BILINEAR))
    alpha = (OVERLAY_ALPHA * np.clip(np.abs(field), 0, 1))[..., None]
    colour = np.where(field[..., None] >= 0, POSITIVE, NEGATIVE)
    return (pixels.astype(np.float64) * (1 - alpha) + colour * alpha).round().astype(np.uint8)


def overlay_png(pixels: np.ndarray, grid: np.ndarray, scale_to: int = 0) -> bytes:
    """`overlay` as PNG bytes, enlarged to `scale_to` pixels a side when the crop is smaller (a 32 px
    crop is too small to look at)."""
    from PIL import Image

    image = Image.fromarray(overlay(pixels, grid))
    if scale_to > image.width:
        image = image.resize((scale_to, scale_to * image.height // image.width), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class EvidenceUnavailable(TuneserveError):
    """A version whose graph gives no evidence maps (its head is not linear over pooled maps, or it was
    exported before they existed): it still classifies."""

    status = 409


def evidence_output(manifest, tag: str, graph_outputs: set[str] | None) -> str:
    """The graph's evidence output name, or EvidenceUnavailable saying why there is none.
    `graph_outputs`: the loaded session's outputs (None before loading)."""
    section = manifest.evidence
    if section is None:
        raise EvidenceUnavailable(f"model {tag} has no evidence maps: it was exported before they existed, or is an "
                                  "instant head on a source's embedding (it still classifies); fine-tune it with this "
                                  "tuneserve to add them")
    if not section.available:
        raise EvidenceUnavailable(f"model {tag} has no evidence maps: {section.reason}")
    if graph_outputs is not None and section.output not in graph_outputs:
        raise EvidenceUnavailable(f"model {tag}: the graph that answers (a quantized variant?) has no {section.output!r} output")
    return section.output
