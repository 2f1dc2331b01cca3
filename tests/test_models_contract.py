"""The models/ contract: manifest, store, preprocessing, metrics, datasets (no torch needed)."""
import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from models.artifact import store
from models.data.datasets import (
    Sample,
    ZipLimits,
    check_trainable,
    fingerprint,
    load_samples,
    safe_extract_zip,
    split_samples,
)
from models.errors import DatasetError, ImageTooLarge, InvalidImage, ManifestError, ModelNotFound, UnsupportedImageFormat
from models.artifact.manifest import Preprocessing, parse_manifest, read_manifest, write_manifest
from models.data.metrics import compare_reports, evaluation_report
from models.serving.preprocess import decode_image, prepare, resize_and_crop
from tests.tiny import solid_png, write_tiny_model


def _manifest(**overrides):
    data = {
        "labels": ["cat", "dog"],
        "preprocessing": {"size": 32, "resize": 36, "mean": [0, 0, 0], "std": [1, 1, 1]},
        "backbone": "resnet18",
        "source": "resnet18:IMAGENET1K_V1",
    }
    data.update(overrides)
    return data


# --- manifest -------------------------------------------------------------------------------


def test_manifest_round_trip(tmp_path):
    manifest = parse_manifest(_manifest(lineage=["imagenet:abc"]))
    write_manifest(manifest, tmp_path)
    again = read_manifest(tmp_path)
    assert again == manifest
    assert again.num_classes == 2


@pytest.mark.parametrize(
    "override, field",
    [
        ({"labels": []}, "labels"),
        ({"labels": ["a", "a"]}, "labels"),
        ({"preprocessing": {"size": 64, "resize": 32, "mean": [0, 0, 0], "std": [1, 1, 1]}}, "preprocessing"),
        ({"preprocessing": {"size": 32, "resize": 32, "mean": [0, 0, 0], "std": [1, 0, 1]}}, "preprocessing"),
        ({"schema_version": 99}, "schema_version"),
        ({"unexpected": 1}, "unexpected"),
    ],
)
def test_manifest_validation_names_the_field(override, field):
    with pytest.raises(ManifestError) as error:
        parse_manifest(_manifest(**override))
    assert field in str(error.value)


def test_missing_manifest_is_clear(tmp_path):
    with pytest.raises(ManifestError, match="no manifest.json"):
        read_manifest(tmp_path)


# --- store ----------------------------------------------------------------------------------


def test_publish_resolve_and_latest(bento_home, tmp_path):
    first = store.publish("colours", write_tiny_model(tmp_path / "a", accuracy=0.5))
    second = store.publish("colours", write_tiny_model(tmp_path / "b", accuracy=0.9))
    assert first.version != second.version
    assert store.latest_version("colours") == second.version
    assert store.resolve("colours").version == second.version
    assert store.resolve(f"colours:{first.version}").version == first.version
    listing = store.list_models()
    assert [v.version for v in listing["colours"]] == [second.version, first.version]
    described = store.describe(second)
    assert described["labels"] == 3 and described["eval"]["accuracy"] == 0.9
    # BentoML's own listing sees the same models
    import bentoml

    assert {m.tag.version for m in bentoml.models.list("colours")} == {first.version, second.version}


def test_unknown_model_lists_known(bento_home, tmp_path):
    store.publish("colours", write_tiny_model(tmp_path / "a"))
    with pytest.raises(ModelNotFound, match=r"known models: \['colours'\]"):
        store.resolve("shapes")
    with pytest.raises(ModelNotFound, match="has no version"):
        store.resolve("colours:nope")


def test_incomplete_version_is_never_published(bento_home, tmp_path):
    staging = write_tiny_model(tmp_path / "a")
    (staging / "model.onnx").unlink()
    with pytest.raises(ManifestError, match="model.onnx"):
        store.publish("colours", staging)
    assert store.list_models() == {}
    assert store.latest_version("colours") is None


@pytest.mark.parametrize("name", ["Bad Name", "-x", "", "a/b", "x" * 80])
def test_invalid_names(name):
    with pytest.raises(ManifestError, match="invalid model name"):
        store.validate_name(name)


# --- preprocessing --------------------------------------------------------------------------


def test_prepare_resizes_shorter_side_and_center_crops():
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 40, 100))  # white strip on the left is cropped away
    spec = Preprocessing(size=50, resize=50, mean=(0, 0, 0), std=(1, 1, 1))
    array = resize_and_crop(image, spec)
    assert array.shape == (50, 50, 3) and array.dtype == np.uint8
    assert array.max() == 0


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    decoded = decode_image(buffer.getvalue())
    assert decoded.size == (20, 40)


def test_grey_and_alpha_images_become_rgb():
    for mode in ("L", "RGBA", "P"):
        buffer = io.BytesIO()
        Image.new(mode, (8, 8)).save(buffer, format="PNG")
        assert decode_image(buffer.getvalue()).mode == "RGB"


def test_refuses_non_images_and_bombs_and_formats():
    with pytest.raises(InvalidImage):
        decode_image(b"definitely not an image")
    with pytest.raises(InvalidImage):
        decode_image(solid_png("red")[:60])  # truncated
    with pytest.raises(ImageTooLarge, match="limit"):
        decode_image(solid_png("red", size=(400, 400)), max_pixels=100_000)
    with pytest.raises(UnsupportedImageFormat):
        decode_image(solid_png("red"), allowed_formats=frozenset({"JPEG"}))


def test_jpeg_draft_decoding_keeps_the_crop_close():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)).resize((800, 600))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=90)
    spec = Preprocessing(size=64, resize=73, mean=(0, 0, 0), std=(1, 1, 1))
    drafted = prepare(buffer.getvalue(), spec)
    full = resize_and_crop(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), spec)
    assert drafted.shape == full.shape == (64, 64, 3)
    assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 8


# --- metrics --------------------------------------------------------------------------------


def test_evaluation_report():
    probabilities = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.2, 0.7]])
    report = evaluation_report([0, 1, 1, 2], probabilities, ["a", "b", "c"], top_k=2)
    assert report["samples"] == 4
    assert report["accuracy"] == pytest.approx(0.75)
    assert report["top_k_accuracy"] == pytest.approx(1.0)
    assert report["per_class"]["b"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert report["confusion_matrix"]["matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert report["macro_avg"]["recall"] == pytest.approx((1 + 0.5 + 1) / 3)
    json.dumps(report)
    better = dict(report, accuracy=1.0)
    assert compare_reports(report, better)["accuracy"] == pytest.approx(0.25)


# --- datasets -------------------------------------------------------------------------------


def _write_class_folders(root, counts):
    for label, count in counts.items():
        (root / label).mkdir(parents=True)
        for i in range(count):
            (root / label / f"{i}.png").write_bytes(solid_png(label))


def test_folder_and_manifest_layouts(tmp_path):
    _write_class_folders(tmp_path / "folders", {"red": 3, "blue": 2})
    samples = load_samples(tmp_path / "folders")
    assert sorted((s.label, s.path.name) for s in samples)[0] == ("blue", "0.png")
    assert len(samples) == 5

    root = tmp_path / "manifest"
    root.mkdir()
    (root / "a.png").write_bytes(solid_png("red"))
    (root / "b.png").write_bytes(solid_png("blue"))
    (root / "manifest.csv").write_text("path,label,split\na.png,red,train\nb.png,blue,test\n")
    assert [(s.label, s.split) for s in load_samples(root)] == [("red", "train"), ("blue", "test")]
    (root / "manifest.jsonl").write_text('{"path": "a.png", "label": "red"}\n')
    assert [(s.label, s.split) for s in load_samples(root / "manifest.jsonl")] == [("red", None)]


def test_manifest_rows_must_stay_inside(tmp_path):
    (tmp_path / "manifest.csv").write_text("path,label\n../../etc/passwd,x\n")
    with pytest.raises(DatasetError, match="leaves the dataset folder"):
        load_samples(tmp_path)


def test_stratified_split_is_deterministic_and_covers_classes(tmp_path):
    _write_class_folders(tmp_path, {"red": 20, "blue": 10})
    samples = load_samples(tmp_path)
    a = split_samples(samples, 0.15, 0.15, seed=1)
    b = split_samples(samples, 0.15, 0.15, seed=1)
    assert a == b
    assert sum(len(v) for v in a.values()) == 30
    for split in ("train", "val", "test"):
        assert {s.label for s in a[split]} == {"red", "blue"}
    assert len(a["test"]) == 5


def test_check_trainable(tmp_path):
    one = [Sample(tmp_path / "x.png", "a")] * 5
    with pytest.raises(DatasetError, match="at least 2 classes"):
        check_trainable(one)
    few = [Sample(tmp_path / "x.png", "a")] * 5 + [Sample(tmp_path / "y.png", "b")]
    with pytest.raises(DatasetError, match="too few"):
        check_trainable(few, min_per_class=2)
    mismatched = [Sample(tmp_path / "x.png", "a", "train")] * 3 + [Sample(tmp_path / "y.png", "b", "train")] * 3
    mismatched += [Sample(tmp_path / "z.png", "c", "test")] * 3
    with pytest.raises(DatasetError, match="not in train"):
        check_trainable(mismatched)


def test_fingerprint_depends_on_content_not_location(tmp_path):
    _write_class_folders(tmp_path / "one", {"red": 2, "blue": 2})
    _write_class_folders(tmp_path / "two", {"red": 2, "blue": 2})
    assert fingerprint(load_samples(tmp_path / "one")) == fingerprint(load_samples(tmp_path / "two"))
    (tmp_path / "two" / "red" / "0.png").write_bytes(solid_png("green"))
    assert fingerprint(load_samples(tmp_path / "one")) != fingerprint(load_samples(tmp_path / "two"))


def _zip(path, entries):
    with zipfile.ZipFile(path, "w") as bundle:
        for name, data in entries.items():
            bundle.writestr(name, data)
    return path


def test_safe_extract_accepts_wrapped_folder(tmp_path):
    archive = _zip(tmp_path / "d.zip", {"data/red/0.png": solid_png("red"), "data/blue/0.png": solid_png("blue")})
    root = safe_extract_zip(archive, tmp_path / "out")
    assert {s.label for s in load_samples(root)} == {"red", "blue"}


@pytest.mark.parametrize(
    "entries, message",
    [
        ({"../evil.png": b"x"}, "unsafe path"),
        ({"/abs.png": b"x"}, "unsafe path"),
        ({f"{i}.png": b"x" for i in range(20)}, "entries"),
        ({"big.bin": b"0" * 5000}, "unpacks to"),
    ],
)
def test_safe_extract_refuses(tmp_path, entries, message):
    archive = _zip(tmp_path / "d.zip", entries)
    with pytest.raises(DatasetError, match=message):
        safe_extract_zip(archive, tmp_path / "out", ZipLimits(max_entries=10, max_unpacked_bytes=4000))
    assert not (tmp_path / "evil.png").exists()


def test_safe_extract_refuses_links_and_non_zips(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        info = zipfile.ZipInfo("red/link.png")
        info.external_attr = (0o120777 << 16)
        bundle.writestr(info, "/etc/passwd")
    with pytest.raises(DatasetError, match="links"):
        safe_extract_zip(archive, tmp_path / "out")
    (tmp_path / "no.zip").write_bytes(b"nope")
    with pytest.raises(DatasetError, match="not a valid zip"):
        safe_extract_zip(tmp_path / "no.zip", tmp_path / "out2")


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("shape", [(451, 300), (500, 375), (300, 451), (64, 64)])
def test_crop_window_resize_matches_full_resize_then_crop(shape, interpolation):
    """resize_and_crop resamples only the kept window; it must equal resize-whole-then-crop."""
    from skimage import data

    image = Image.fromarray(data.astronaut()).resize(shape)
    spec = Preprocessing(size=56, resize=64, interpolation=interpolation, mean=(0, 0, 0), std=(1, 1, 1))
    scale = spec.resize / min(shape)
    full = image.resize((round(shape[0] * scale), round(shape[1] * scale)), getattr(Image.Resampling, interpolation.upper()), reducing_gap=None)
    left, top = (full.width - 56) // 2, (full.height - 56) // 2
    expected = np.asarray(full.crop((left, top, left + 56, top + 56))).astype(int)
    assert np.abs(resize_and_crop(image, spec).astype(int) - expected).max() <= 1


@pytest.mark.parametrize("ref", ["colours:a/b", "colours:-x", "colours:UPPER", "colours:" + "v" * 80])
def test_invalid_version_is_a_clear_error(bento_home, tmp_path, ref):
    store.publish("colours", write_tiny_model(tmp_path / "a"))
    with pytest.raises(ManifestError, match="invalid model version"):
        store.resolve(ref)


def test_safe_extract_refuses_corrupt_entries(tmp_path):
    archive = _zip(tmp_path / "d.zip", {"red/0.png": solid_png("red") * 3})
    data = bytearray(archive.read_bytes())
    start = data.index(b"PK\x03\x04") + 30 + len("red/0.png")
    data[start + 10 : start + 40] = b"\xff" * 30
    archive.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="cannot extract 'red/0.png'"):
        safe_extract_zip(archive, tmp_path / "out")
