"""Decode + resize + crop per image: full-size JPEG decoding against reduced-scale (draft) decoding.

    .venv/bin/python bench/decode.py [--sizes 4032x3024,2048x1536,1024x768] [--rounds 5] [--model imagenet]

Large JPEGs are made from scikit-image's photos (chelsea, astronaut, coffee, rocket, motorcycle),
upscaled with bicubic to each size and saved at quality 90. Each image is prepared the way serving
prepares it (`models.serving.preprocess.prepare`: decode with `draft_size=resize`, then one resize of
the crop window) and once with drafting off (full decode, same resize). Printed per size: the best
round's milliseconds per image, one thread, both ways; the draft scale chosen; the pixel difference
of the two 224 px crops; and, with `--model` (a stored version, e.g. the bootstrapped `imagenet`),
top-1 agreement and the largest probability difference of the model on the two.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "stereo_motorcycle")


def photos() -> list:
    from PIL import Image
    from skimage import data as skdata

    out = []
    for name in PHOTOS:
        array = getattr(skdata, name)()
        out.append(Image.fromarray(np.asarray(array[0] if isinstance(array, tuple) else array)).convert("RGB"))
    return out


def large_jpegs(size: tuple[int, int]) -> list[bytes]:
    """Each photo upscaled (bicubic) to `size`, landscape or portrait as the photo is, JPEG quality 90."""
    from PIL import Image

    encoded = []
    for photo in photos():
        target = size if photo.width >= photo.height else size[::-1]
        buffer = io.BytesIO()
        photo.resize(target, Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def prepare_all(jpegs: list[bytes], spec, draft: bool) -> tuple[np.ndarray, float]:
    """The prepared crops and the seconds per image (one thread)."""
    from models.serving.preprocess import decode_image, resize_and_crop

    started = time.perf_counter()
    crops = [resize_and_crop(decode_image(data, draft_size=spec.resize if draft else None), spec) for data in jpegs]
    return np.stack(crops), (time.perf_counter() - started) / len(jpegs)


def model_outputs(reference: str | None):
    """A function: uint8 batch → probabilities of the stored version `reference` (None: no model)."""
    if not reference:
        return None, None
    from models.artifact import store
    from models.serving.runtime import OnnxClassifier, RuntimeOptions

    version = store.resolve(reference)
    model = OnnxClassifier(version.path, version.name, version.version, RuntimeOptions(device="cpu", precision="fp32")).load()
    return model.predict, model.manifest.preprocessing


def measure(size: tuple[int, int], spec, rounds: int, predict) -> dict:
    from models.serving.preprocess import draft_scale

    jpegs = large_jpegs(size)
    full_times, draft_times = [], []
    for _ in range(rounds):  # alternating, so both see the same machine load
        full, seconds = prepare_all(jpegs, spec, draft=False)
        full_times.append(seconds)
        drafted, seconds = prepare_all(jpegs, spec, draft=True)
        draft_times.append(seconds)
    diff = np.abs(full.astype(np.int16) - drafted.astype(np.int16))
    row = {"size": f"{size[0]}x{size[1]}", "draft_scale": draft_scale(*size, spec.resize),
           "full_ms": round(min(full_times) * 1e3, 2), "draft_ms": round(min(draft_times) * 1e3, 2),
           "speedup": round(min(full_times) / min(draft_times), 2),
           "pixel_mean_abs_diff": round(float(diff.mean()), 2), "pixel_p99_abs_diff": int(np.percentile(diff, 99))}
    if predict is not None:
        p_full, p_draft = predict(full), predict(drafted)
        row.update(top1_agreement=float((p_full.argmax(1) == p_draft.argmax(1)).mean()),
                   max_probability_diff=round(float(np.abs(p_full - p_draft).max()), 4))
    return row


def main() -> None:
    from models.artifact.manifest import Preprocessing

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="4032x3024,2048x1536,1024x768")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default=None, help="a stored version to compare outputs on, e.g. imagenet")
    args = parser.parse_args()
    predict, spec = model_outputs(args.model)
    spec = spec or Preprocessing(size=224, resize=256, mean=(0.5,) * 3, std=(0.5,) * 3)
    print(json.dumps({"resize": spec.resize, "size": spec.size, "load_average": os.getloadavg()}))
    for text in args.sizes.split(","):
        width, height = (int(v) for v in text.split("x"))
        print(json.dumps(measure((width, height), spec, args.rounds, predict)), flush=True)
    print(json.dumps({"load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
