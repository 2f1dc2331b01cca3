"""Shared helpers for tests/test_finetune*.py: tiny datasets, zips, a fake trainer, polling."""
from __future__ import annotations

import io
import json
import random
import sys
import time
import zipfile
from pathlib import Path

from PIL import Image

FAKE_TRAIN = Path(__file__).with_name("finetune_fake_train.py")
FAKE_COMMAND = f"{sys.executable} {FAKE_TRAIN}"


def png(rgb, size=(20, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def make_dataset(root: Path, classes=("red", "green"), per_class=6, split=None, size=(20, 20), seed=0) -> Path:
    """Folder per class of solid-ish colour PNGs (optionally under a split folder)."""
    colours = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
    rng = random.Random(seed)
    base = root / split if split else root
    for label in classes:
        folder = base / label
        folder.mkdir(parents=True, exist_ok=True)
        r, g, b = colours.get(label, (128, 128, 128))
        for i in range(per_class):
            jitter = lambda c: max(0, min(255, c + rng.randint(-30, 30)))  # noqa: E731
            (folder / f"{label}_{i}.png").write_bytes(png((jitter(r), jitter(g), jitter(b)), size))
    return root


def zip_dir(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                bundle.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


def wait_for(predicate, timeout=30.0, interval=0.1, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value {last!r}")


def submit(client, data: bytes | None = None, config: dict | None = None, data_path: str | None = None, headers=None):
    files = {"dataset": ("data.zip", data, "application/zip")} if data is not None else None
    form = {"config": json.dumps(config if config is not None else {"name": "colours", "source": "simple_cnn:none", "epochs": 2})}
    if data_path is not None:
        form["data_path"] = data_path
    if files is None:  # multipart even without a file: the fields as parts without a filename
        return client.post("/finetune", files={key: (None, value) for key, value in form.items()}, headers=headers or {})
    return client.post("/finetune", data=form, files=files, headers=headers or {})
