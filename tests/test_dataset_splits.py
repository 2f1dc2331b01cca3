"""Dataset splits: every documented layout, given or carved splits, and their record.

- the whole layout matrix (folder per class; train/val/test, train/test and train-only folders;
  CSV and JSONL manifests with no split, train+test, train+val, train+val+test; each plain and
  inside a zip) through training's `load_dataset` + `prepare_splits`: given splits kept as they
  are, the missing val/test carved from train, sizes adding up;
- a representative subset end to end through `tuneserve train` (simple_cnn, 16 px, 1 epoch), and
  a train+test zip through `POST /finetune` with the real trainer: the published manifest says
  which splits were given and which carved;
- clear refusals naming the class and its counts (also as a 422 at submit time);
- a hypothesis property test of `split_samples`.
"""
from __future__ import annotations

import csv
import io
import json
import sys
import zipfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.data.datasets import SPLITS, Sample, split_origins, split_samples
from models.errors import DatasetError
from tests.tiny import solid_png

SHADES = {"dark": (30, 30, 30), "light": (225, 225, 225)}
PER_SPLIT = {"train": 6, "val": 2, "test": 3}  # images per class in each split the data gives
UNSPLIT = 10  # images per class when the data gives no split
FOLDER_LAYOUTS = {"classes": (), "train_val_test": ("train", "val", "test"), "train_test": ("train", "test"), "train_only": ("train",)}
MANIFEST_SPLITS = {"none": (), "train_test": ("train", "test"), "train_val": ("train", "val"), "train_val_test": ("train", "val", "test")}
LAYOUTS = [f"folders-{name}" for name in FOLDER_LAYOUTS] + [
    f"{kind}-{name}" for kind in ("csv", "jsonl") for name in MANIFEST_SPLITS
]


def _image(path: Path, label: str, index: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(solid_png(tuple(c + index for c in SHADES[label]), (18, 18)))


def _plan(given_splits: tuple[str, ...]) -> list[tuple[str, str | None]]:
    """(split or None, label) for every image of a layout."""
    if not given_splits:
        return [(None, label) for label in SHADES for _ in range(UNSPLIT)]
    return [(split, label) for split in given_splits for label in SHADES for _ in range(PER_SPLIT[split])]


def write_layout(root: Path, layout: str) -> tuple[Path, tuple[str, ...]]:
    """Write a documented layout under root; → (the dataset folder, the splits it gives)."""
    kind, name = layout.split("-", 1)
    given_splits = FOLDER_LAYOUTS[name] if kind == "folders" else MANIFEST_SPLITS[name]
    rows = []
    for index, (split, label) in enumerate(_plan(given_splits)):
        if kind == "folders":
            _image(root / (split or "") / label / f"{index}.png", label, index % 20)
        else:
            relative = f"images/{label}_{index}.png"
            _image(root / relative, label, index % 20)
            rows.append({"path": relative, "label": label, **({"split": split} if split else {})})
    if kind == "csv":
        with (root / "manifest.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "label", "split"] if given_splits else ["path", "label"])
            writer.writeheader()
            writer.writerows(rows)
    elif kind == "jsonl":
        (root / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root, given_splits


def zip_folder(folder: Path, archive: Path, wrap: str | None = "data") -> Path:
    """A zip as `zip -r data.zip data/` makes it (one top folder), or flat with wrap=None."""
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                inner = path.relative_to(folder).as_posix()
                bundle.write(path, f"{wrap}/{inner}" if wrap else inner)
    return archive


def _prepared(data: Path, scratch: Path):
    from training.data import load_dataset, prepare_splits

    samples = load_dataset(data, scratch)
    splits, labels = prepare_splits(samples, val_fraction=0.2, test_fraction=0.2, seed=3, min_per_class=2)
    return samples, splits, labels


def _expected_derived(given_splits: tuple[str, ...]) -> list[str]:
    return [name for name in ("val", "test") if name not in given_splits]


@pytest.mark.parametrize("zipped", [False, True], ids=["plain", "zip"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_splits_as_given_or_carved(tmp_path, layout, zipped):
    folder, given_splits = write_layout(tmp_path / "data", layout)
    data = zip_folder(folder, tmp_path / "data.zip") if zipped else folder
    samples, splits, labels = _prepared(data, tmp_path / "scratch")

    assert labels == ["dark", "light"]
    assert split_origins(samples, splits) == {"given": list(given_splits), "derived": _expected_derived(given_splits)}
    assert sorted(s.path for group in splits.values() for s in group) == sorted(s.path for s in samples)
    for name in ("val", "test"):
        if name in given_splits:
            assert len(splits[name]) == PER_SPLIT[name] * len(SHADES) and all(s.split == name for s in splits[name])
        else:  # carved from train, stratified: both classes, never a given val/test image
            assert {s.label for s in splits[name]} == set(SHADES)
            assert all(s.split in (None, "train") for s in splits[name])
    assert {s.label for s in splits["train"]} == set(SHADES)


def test_the_reported_case_train_and_test_only(tmp_path):
    """The issue's reproduction: a CSV whose split column holds only train and test."""
    folder, _ = write_layout(tmp_path / "data", "csv-train_test")
    samples, splits, _ = _prepared(folder / "manifest.csv", tmp_path / "scratch")
    # val: max(1, round(6 * 0.2)) = 1 per class out of the given train; the given test untouched
    assert {name: len(group) for name, group in splits.items()} == {"train": 10, "val": 2, "test": 6}


# ---- refusals name the class and its counts -------------------------------------------------------


def _samples(spec: dict[tuple[str, str | None], int]) -> list[Sample]:
    out = []
    for (label, split), count in spec.items():
        out += [Sample(Path(f"{label}-{split}-{i}.png"), label, split) for i in range(count)]
    return out


def test_a_given_split_without_some_class_is_refused():
    samples = _samples({("cat", "train"): 4, ("dog", "train"): 4, ("cat", "test"): 2})
    with pytest.raises(DatasetError, match=r"given test split has no images of class 'dog' \(train 4, val 0, test 0\)"):
        split_samples(samples)
    only_test = _samples({("cat", "train"): 4, ("dog", "test"): 2, ("cat", "test"): 2})
    with pytest.raises(DatasetError, match=r"train split has no images of class 'dog' \(train 0, val 0, test 2\)"):
        split_samples(only_test)


def test_too_few_train_images_to_carve_is_refused():
    samples = _samples({("cat", None): 5, ("dog", None): 2})
    with pytest.raises(DatasetError, match=r"class 'dog' has 2 train image\(s\): too few to carve val and test .*at least 3.*test_fraction to 0"):
        split_samples(samples, 0.15, 0.15)
    carved = split_samples(samples, 0.15, 0.0)  # without a test split two images are enough
    assert [s.label for s in carved["val"]].count("dog") == 1 and not carved["test"]
    given_test = _samples({("cat", "train"): 3, ("dog", "train"): 1, ("cat", "test"): 1, ("dog", "test"): 1})
    with pytest.raises(DatasetError, match=r"class 'dog' has 1 train image\(s\): too few to carve val "):
        split_samples(given_test)


# ---- property: split_samples over random labels and given-split patterns ---------------------------

_rows = st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from([None, "train", "val", "test"])), max_size=40)


@settings(max_examples=300, deadline=None)
@given(rows=_rows, val_fraction=st.floats(0.01, 0.6), test_fraction=st.sampled_from([0.0, 0.1, 0.15, 0.3]),
       seed=st.integers(0, 2**32))
def test_split_samples_properties(rows, val_fraction, test_fraction, seed):
    samples = [Sample(Path(f"{i}.png"), label, split) for i, (label, split) in enumerate(rows)]
    try:
        splits = split_samples(samples, val_fraction, test_fraction, seed)
    except DatasetError as error:  # refused: it says which class
        assert "class" in str(error)
        return
    placed = [s for name in SPLITS for s in splits[name]]
    assert sorted(placed, key=lambda s: s.path) == sorted(samples, key=lambda s: s.path)  # sizes add up, no dupes
    for name in ("val", "test"):  # a given val/test image never moves
        assert all(s in splits[name] for s in samples if s.split == name)
    assert all(s.split in (None, "train") for s in splits["train"])
    labels = {s.label for s in samples}
    assert {s.label for s in splits["train"]} == labels  # every class keeps train images
    given_splits = {s.split for s in samples}
    if "val" not in given_splits:
        assert {s.label for s in splits["val"]} == labels
    assert split_samples(samples, val_fraction, test_fraction, seed) == splits  # seeded


# ---- end to end: `tuneserve train` ----------------------------------------------------------------

E2E = ["folders-train_test", "csv-train_test", "jsonl-none", "folders-train_only"]  # the matrix above covers the rest


@pytest.mark.slow
@pytest.mark.parametrize("layout", E2E)
def test_tuneserve_train_records_given_and_carved_splits(tmp_path, bento_home, capsys, layout):
    from models.artifact import store
    from tuneserve.cli import main

    folder, given_splits = write_layout(tmp_path / "data", layout)
    data = zip_folder(folder, tmp_path / "data.zip") if layout.startswith("csv") else folder
    code = main([
        "train", "--name", "splits", "--source", "simple_cnn", "--weights", "none", "--data", str(data),
        "--image-size", "16", "--epochs", "1", "--batch-size", "8", "--output-dir", str(tmp_path / "run"), "--int8", "false",
    ])
    assert code == 0, capsys.readouterr().err
    dataset = store.resolve("splits").manifest().dataset
    assert dataset.splits_given == list(given_splits)
    assert dataset.splits_derived == _expected_derived(given_splits)
    assert dataset.num_train + dataset.num_val + dataset.num_test == len(_plan(given_splits))
    if "test" in given_splits:
        assert dataset.num_test == PER_SPLIT["test"] * len(SHADES)


@pytest.mark.slow
def test_tuneserve_train_refuses_a_test_split_missing_a_class(tmp_path, bento_home, capsys):
    from tuneserve.cli import main

    folder, _ = write_layout(tmp_path / "data", "folders-train_test")
    for image in (folder / "test" / "light").iterdir():
        image.unlink()
    (folder / "test" / "light").rmdir()
    code = main(["train", "--name", "splits", "--source", "simple_cnn", "--weights", "none", "--data", str(folder),
                 "--image-size", "16", "--epochs", "1", "--output-dir", str(tmp_path / "run")])
    assert code == 2
    assert "given test split has no images of class 'light' (train 6, val 0, test 0)" in capsys.readouterr().err


# ---- over HTTP: POST /finetune -----------------------------------------------------------------------


def _finetune_client(tmp_path, command: str):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from service.finetune import JobManager
    from service.routes.finetune import build_router
    from service.config import Settings

    settings = Settings.of(home=tmp_path / "home", auth=False, job_grace_seconds=10, poll_seconds=0.2,
                           training_command=command, finetune_min_per_class=2)
    manager = JobManager(settings)
    app = FastAPI()
    app.include_router(build_router(manager, settings))
    return TestClient(app), manager


def _submit(client, archive: Path, config: dict):
    files = {"dataset": ("data.zip", io.BytesIO(archive.read_bytes()), "application/zip")}
    return client.post("/finetune", data={"config": json.dumps(config)}, files=files)


def test_finetune_submit_reports_the_split_and_refuses_a_bad_one(tmp_path, bento_home):
    client, _ = _finetune_client(tmp_path, "false")  # the manager is never started: nothing runs
    folder, _ = write_layout(tmp_path / "good", "jsonl-train_test")
    config = {"name": "splits", "source": "simple_cnn:none", "val_fraction": 0.2}
    with client:
        accepted = _submit(client, zip_folder(folder, tmp_path / "good.zip", wrap=None), config)
        assert accepted.status_code == 202, accepted.text
        summary = accepted.json()["dataset"]
        assert summary["splits"] == ["train", "test"] and summary["splits_derived"] == ["val"]
        assert summary["split_sizes"] == {"train": 10, "val": 2, "test": 6}

        bad, _ = write_layout(tmp_path / "bad", "folders-train_val_test")
        for image in (bad / "val" / "dark").iterdir():
            image.unlink()
        (bad / "val" / "dark").rmdir()
        refused = _submit(client, zip_folder(bad, tmp_path / "bad.zip"), config)
        assert refused.status_code == 422
        assert "given val split has no images of class 'dark' (train 6, val 0, test 3)" in refused.json()["error"]


@pytest.mark.slow
def test_finetune_job_trains_on_train_and_test_folders(tmp_path, bento_home):
    """The HTTP form of the bug: a train/ + test/ zip through the real job path and trainer."""
    from models.artifact import store
    from tests.finetune_support import wait_for

    client, manager = _finetune_client(tmp_path, f"nice -n 5 {sys.executable} -m training.run")
    folder, _ = write_layout(tmp_path / "data", "folders-train_test")
    config = {"name": "splits", "source": "simple_cnn:none", "strategy": "full", "epochs": 1, "batch_size": 8,
              "image_size": 16, "int8": False}
    manager.start()
    try:
        with client:
            response = _submit(client, zip_folder(folder, tmp_path / "data.zip"), config)
            assert response.status_code == 202, response.text
            job_id = response.json()["job_id"]
            final = wait_for(lambda: (j := client.get(f"/finetune/{job_id}").json())["state"] in ("succeeded", "failed") and j,
                             180, 0.3, "the job to finish")
            assert final["state"] == "succeeded", client.get(f"/finetune/{job_id}/log").text
    finally:
        manager.stop(timeout=30)
    dataset = store.resolve(final["model"]).manifest().dataset
    assert (dataset.splits_given, dataset.splits_derived) == (["train", "test"], ["val"])
    assert (dataset.num_train, dataset.num_val, dataset.num_test) == (10, 2, 6)
