"""Uploaded dataset archives, for every route that takes one (job submissions, /evaluate): the
body kept within its byte limit while it streams in, the zip saved in blocks, its unpacked size
read from the central directory, and its entries extracted under the zip limits
(models/data/datasets.py `safe_extract_zip`: no path escapes, no links, bounded entries and bytes).
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Awaitable, BinaryIO, Callable

from models.data.datasets import ZipLimits, safe_extract_zip
from models.errors import TuneserveError

BLOCK_BYTES = 1024 * 1024
ZIP_MEDIA_TYPE = "application/zip"
DATASET_HELP = "A zip of labelled images (`label/image.jpg` or `split/label/image.jpg`)"
Receive = Callable[[], Awaitable[dict[str, Any]]]


class UploadTooLarge(TuneserveError):
    """The body or the archive is over its byte limit (413)."""

    status = 413


def limited_receive(receive: Receive, max_bytes: int, over_limit: Callable[[int], Exception | None]) -> Receive:
    """An ASGI `receive` that counts the body as it streams in: UploadTooLarge past `max_bytes`,
    and `over_limit(received)`'s error when it names one (e.g. a disk budget), before more is read."""
    received = 0

    async def limited() -> dict[str, Any]:
        nonlocal received
        message = await receive()
        received += len(message.get("body", b""))
        if received > max_bytes:
            raise UploadTooLarge(f"upload exceeds the limit of {max_bytes} bytes")
        error = over_limit(received)
        if error is not None:
            raise error
        return message

    return limited


def save_upload(source: BinaryIO, target: Path, max_bytes: int, what: str = "dataset") -> int:
    """Copy an uploaded file to `target` in blocks; UploadTooLarge past `max_bytes`; → bytes written."""
    if hasattr(source, "seek"):
        source.seek(0)
    written = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as out:
        while block := source.read(BLOCK_BYTES):
            written += len(block)
            if written > max_bytes:
                raise UploadTooLarge(f"{what} exceeds the upload limit of {max_bytes} bytes")
            out.write(block)
    return written


def unpacked_bytes(archive: Path) -> int:
    """What the zip's entries add up to unpacked (0 for a file that is no zip: extracting names that)."""
    try:
        with zipfile.ZipFile(archive) as bundle:
            return sum(info.file_size for info in bundle.infolist())
    except (zipfile.BadZipFile, OSError):
        return 0


def unpack_upload(source: BinaryIO, archive: Path, destination: Path, limits: ZipLimits,
                  before_extract: Callable[[int], None] | None = None) -> Path:
    """An uploaded zip saved as `archive` and extracted to `destination` within `limits`;
    `before_extract(unpacked bytes)` may refuse first (a disk budget). → the extracted folder."""
    save_upload(source, archive, limits.max_archive_bytes)
    if before_extract is not None:
        before_extract(unpacked_bytes(archive))
    return safe_extract_zip(archive, destination, limits)
