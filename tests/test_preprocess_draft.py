"""Reduced-scale JPEG decoding (`models.serving.preprocess.draft_scale`): the scale chosen, the size
decoded, and how close the prepared crop and a model's answer stay to full-size decoding."""
from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from models.artifact.manifest import Preprocessing
from models.serving.preprocess import decode_image, draft_scale, prepare, resize_and_crop, stack
from tests.tiny_conv import tiny_conv_graph

SPEC = Preprocessing(size=224, resize=256, mean=(127,) * 3, std=(128,) * 3)
# Measured with bench/decode.py on five upscaled photos: mean 0.5 levels, 99th percentile 3-4.
MAX_MEAN_PIXEL_DIFF = 1.0
MAX_P99_PIXEL_DIFF = 8


def _photos(size: tuple[int, int]) -> list[bytes]:
    """scikit-image's bundled photos upscaled to `size` (bicubic), JPEG quality 90."""
    from skimage import data as skdata

    out = []
    for name in ("chelsea", "astronaut", "coffee", "rocket"):
        photo = Image.fromarray(getattr(skdata, name)()).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        photo.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def _jpeg(size: tuple[int, int], fmt: str = "JPEG", exif: Image.Exif | None = None) -> bytes:
    image = Image.new("RGB", size, "orange")
    buffer = io.BytesIO()
    if fmt == "MPO":
        image.save(buffer, format="MPO", save_all=True, append_images=[image.resize((64, 48))])
    else:
        image.save(buffer, format="JPEG", exif=exif or Image.Exif())
    return buffer.getvalue()


@pytest.mark.parametrize("width, height, target, scale", [
    (4032, 3024, 256, 8), (2048, 1536, 256, 4), (1024, 768, 256, 2), (768, 1024, 256, 2),
    (683, 512, 256, 2),  # the shorter side alone decides: 512 / 2 covers 256 exactly
    (600, 511, 256, 1),  # 511 / 2 would be 255.5 < 256: decoded full size
    (640, 480, 64, 4), (256, 256, 256, 1),
])
def test_draft_scale_is_the_largest_that_still_covers_the_shorter_side(width, height, target, scale):
    assert draft_scale(width, height, target) == scale


def test_draft_scale_never_undershoots_and_never_leaves_a_larger_scale_unused():
    for short in range(1, 3000, 7):
        for target in (32, 64, 224, 256):
            r = draft_scale(short + 100, short, target)
            assert r == 1 or short // r >= target
            assert r == 8 or short // (r * 2) < target


@pytest.mark.parametrize("fmt", ["JPEG", "MPO"])
def test_large_jpeg_and_mpo_decode_at_the_reduced_scale(fmt):
    image = decode_image(_jpeg((2048, 1536), fmt), draft_size=256)
    assert image.size == (512, 384) and image.mode == "RGB"
    assert decode_image(_jpeg((2048, 1536), fmt)).size == (2048, 1536)  # no draft size: full decode


def test_drafted_jpeg_is_still_turned_upright():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    image = decode_image(_jpeg((2048, 1536), exif=exif), draft_size=256)
    assert image.size == (384, 512)


def test_reduced_scale_crop_matches_full_decoding_on_pixels():
    for data in _photos((2048, 1536)) + _photos((1600, 1200)):  # drafted at 1/4
        drafted = prepare(data, SPEC)
        full = resize_and_crop(decode_image(data), SPEC)
        diff = np.abs(drafted.astype(np.int16) - full.astype(np.int16))
        assert drafted.shape == full.shape == (224, 224, 3)
        assert diff.mean() <= MAX_MEAN_PIXEL_DIFF and np.percentile(diff, 99) <= MAX_P99_PIXEL_DIFF


def test_reduced_scale_decoding_keeps_a_models_answers():
    session = ort.InferenceSession(tiny_conv_graph().SerializeToString(), providers=["CPUExecutionProvider"])
    photos = _photos((4032, 3024))  # drafted at 1/8
    drafted = stack([prepare(data, SPEC) for data in photos])
    full = stack([resize_and_crop(decode_image(data), SPEC) for data in photos])
    p_drafted, p_full = (session.run(["probabilities"], {"image": batch})[0] for batch in (drafted, full))
    assert (p_drafted.argmax(1) == p_full.argmax(1)).all()
    assert np.abs(p_drafted - p_full).max() < 0.02
