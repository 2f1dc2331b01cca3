"""Decode and prepare images exactly once, from the manifest, for serving, evaluation and scoring.

The graph takes uint8 `[N, size, size, 3]`; casting and normalisation happen inside it.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.errors import ImageTooLarge, InvalidImage, UnsupportedImageFormat
from models.artifact.manifest import Preprocessing

DEFAULT_MAX_PIXELS = 40_000_000
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"})

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

# JPEG and MPO (a JPEG with more pictures after it, as cameras and phones write) decode through
# libjpeg, which can scale by 1/2, 1/4 or 1/8 inside the inverse DCT.
DRAFT_FORMATS = frozenset({"JPEG", "MPO"})
DRAFT_SCALES = (8, 4, 2)

# We enforce our own pixel limit before decoding; Pillow's global limit would otherwise
# raise a warning-or-error at a threshold we do not control.
Image.MAX_IMAGE_PIXELS = None


def decode_image(
    data: bytes | str | Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_formats: frozenset[str] = ALLOWED_FORMATS,
    draft_size: int | None = None,
) -> Image.Image:
    """Bytes or a path → RGB PIL image, upright per EXIF. Refuses non-images and pixel bombs.

    `draft_size` lets a JPEG decode at a reduced scale (`draft_scale`) whose shorter side still
    covers it, which is several times faster for large photos.
    """
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        image = Image.open(source)
    except UnidentifiedImageError:
        raise InvalidImage("not a recognised image file") from None
    except OSError as error:
        raise InvalidImage(f"cannot read image: {error}") from None
    if image.format not in allowed_formats:
        raise UnsupportedImageFormat(
            f"image format {image.format} is not allowed; allowed: {sorted(allowed_formats)}"
        )
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels; limit is {max_pixels}")
    if width == 0 or height == 0:
        raise InvalidImage("image has zero width or height")
    try:
        if draft_size and image.format in DRAFT_FORMATS:
            reduce = draft_scale(width, height, draft_size)
            if reduce > 1:
                # Pillow picks the largest of 8/4/2/1 not above min(width // w, height // h), which
                # for (width // reduce, height // reduce) is exactly `reduce`
                image.draft("RGB", (width // reduce, height // reduce))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
        if image.getexif().get(0x0112, 1) != 1:  # EXIF orientation; skip the copy when upright
            image = ImageOps.exif_transpose(image)
        return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as error:
        raise InvalidImage(f"corrupt or truncated image: {error}") from None


def draft_scale(width: int, height: int, shorter_side: int) -> int:
    """The largest libjpeg reduction (8, 4, 2, else 1) whose decoded shorter side is still at least
    `shorter_side`, so the resize that follows only ever shrinks (no upsampling of a drafted image).
    Only the shorter side matters: resize scales it to `shorter_side` and the crop is square."""
    short = min(width, height)
    return next((r for r in DRAFT_SCALES if short // r >= shorter_side), 1)


def resize_and_crop(image: Image.Image, spec: Preprocessing) -> np.ndarray:
    """Shorter side to `spec.resize`, center crop `spec.size` → uint8 HWC.

    Resamples only the source region that the crop keeps (`box=`), which gives the same pixels
    (within one intensity level) as resizing the whole image then cropping, for less work.
    """
    width, height = image.size
    if (width, height) == (spec.size, spec.size):
        return np.asarray(image, dtype=np.uint8)
    scale = spec.resize / min(width, height)
    new_width = max(spec.size, round(width * scale))
    new_height = max(spec.size, round(height * scale))
    left = (new_width - spec.size) // 2
    top = (new_height - spec.size) // 2
    # the crop window, mapped back into source pixels per axis as a full resize would map it
    sx, sy = width / new_width, height / new_height
    box = (left * sx, top * sy, (left + spec.size) * sx, (top + spec.size) * sy)
    resized = image.resize((spec.size, spec.size), RESAMPLING[spec.interpolation], box=box, reducing_gap=None)
    return np.asarray(resized, dtype=np.uint8)


def prepare(
    data: bytes | str | Path | Image.Image,
    spec: Preprocessing,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_formats: frozenset[str] = ALLOWED_FORMATS,
) -> np.ndarray:
    """Whatever an image arrives as → the graph's uint8 `[size, size, 3]` input for one image."""
    if isinstance(data, Image.Image):
        image = data
    else:
        image = decode_image(data, max_pixels, allowed_formats, draft_size=spec.resize)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return resize_and_crop(image, spec)


def stack(images: list[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(np.stack(images, axis=0))
