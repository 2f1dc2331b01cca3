"""What every peer service shares: the model, its preprocessing and the answer's shape.

Only ONNX Runtime, Pillow and numpy, so the peers' own venvs need nothing from tuneserve.
The preprocessing follows the version's manifest.json (shorter side to `resize` with its
interpolation, centre crop `size`, uint8 NHWC: normalisation is inside the graph), by default
with the same decode and resize savings as tuneserve (see `prepare`).
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

RESAMPLING = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
              "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def setting(name: str, default: str) -> str:
    """Peers are configured by environment, so one launcher drives four frameworks."""
    return os.environ.get(f"PEER_{name}", default)


def prepare(image: Image.Image, spec: dict, same_as_tuneserve: bool = True) -> np.ndarray:
    """Shorter side to `resize`, centre crop `size` → uint8 HWC (the manifest's preprocessing).

    With `same_as_tuneserve` (the default), the two savings models/serving/preprocess.py makes, so
    every server does the same work per image: a JPEG decodes at 1/2, 1/4 or 1/8 scale when that
    still covers `resize` (Pillow's draft), and only the crop window is resampled. Without, the plain
    way a docs example writes it: decode in full, resize the whole image, crop.
    """
    size, resize = spec["size"], spec["resize"]
    if same_as_tuneserve and image.format == "JPEG":
        scale = resize / min(image.size)
        image.draft("RGB", (max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    image = image.convert("RGB")
    scale = resize / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    left, top = (width - size) // 2, (height - size) // 2
    if same_as_tuneserve:
        sx, sy = image.width / width, image.height / height
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return np.asarray(image.resize((size, size), RESAMPLING[spec["interpolation"]], box=box, reducing_gap=None),
                          dtype=np.uint8)
    image = image.resize((width, height), RESAMPLING[spec["interpolation"]])
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


class Classifier:
    """The model file tuneserve serves, with 1 intra-op thread (one replica per core)."""

    def __init__(self, model_dir: str | None = None, threads: int | None = None):
        folder = Path(model_dir or setting("MODEL_DIR", "."))
        manifest = json.loads((folder / "manifest.json").read_text())
        self.spec = manifest["preprocessing"]
        self.labels = manifest["labels"]
        self.input_name = manifest["input_name"]
        self.output_name = manifest["output_names"][1]  # probabilities
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or int(setting("THREADS", "1"))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return prepare(image, self.spec, setting("SAME_DECODE", "1") == "1")

    def decode(self, data: bytes) -> np.ndarray:
        return self.preprocess(Image.open(io.BytesIO(data)))

    def predict(self, batch: list[np.ndarray]) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: np.stack(batch)})[0]

    def top5(self, probabilities: np.ndarray) -> list[dict]:
        best = np.argsort(probabilities)[::-1][:5]
        return [{"label": self.labels[i], "probability": float(probabilities[i])} for i in best]
