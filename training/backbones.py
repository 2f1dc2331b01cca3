"""From a config's `source` to the model training trains and export wraps.

`Classifier` (a backbone's body with its head split off) inside `ImageModel` (uint8 image in, logits,
probabilities and embedding out). `build_source(...)` turns a config's `source` (+ `weights`) into a
ready `Built` for N classes, from a registry backbone (`training/backbone_zoo.py`) or from a stored
tuneserve model's `checkpoint.pt` (keeping its lineage); `checkpoint_payload` writes that file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.artifact.manifest import CHECKPOINT_FILE, Preprocessing
from training.backbone_zoo import (BackboneSpec, Defaults, WeightsError, fit_vit_state, get_backbone, list_backbones,
                                   load_matching, load_state_file, submodule)
from training.config import ConfigError

CHECKPOINT_FORMAT = 1


# ---------------------------------------------------------------------------------------------
# The classifier every strategy trains and every export wraps.


def _set(module: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, last = path.rpartition(".")
    owner = submodule(module, parent) if parent else module
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
    head = submodule(net, spec.head)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{spec.name}: {spec.head} is {type(head).__name__}, expected Linear")
    _set(net, spec.head, nn.Identity())
    return Classifier(net, head, spec.blocks(net))


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
        state = load_state_file(path)
        if name == "vit_b_16":
            state = fit_vit_state(state, size)
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
    if base in list_backbones():
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
