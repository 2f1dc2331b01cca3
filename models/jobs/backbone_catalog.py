"""The backbones training can build, by name, with the facts a config is checked against.

Torch-free, so the service and the CLI validate a `source` without importing training/.
training/backbone_zoo.py registers one builder per entry and refuses a name that is not listed here.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackboneFacts:
    name: str
    pretrained: bool = True  # False: scratch only, so any weights but 'none' are refused
    size_multiple: int = 1  # image_size must be a multiple of this (a ViT's patch size)


CATALOG = (
    BackboneFacts("efficientnet_lite0"),
    BackboneFacts("efficientnet_lite1"),
    BackboneFacts("efficientnet_lite2"),
    BackboneFacts("simple_cnn", pretrained=False),
    BackboneFacts("resnet18"),
    BackboneFacts("resnet50"),
    BackboneFacts("mobilenet_v3_small"),
    BackboneFacts("mobilenet_v3_large"),
    BackboneFacts("efficientnet_b0"),
    BackboneFacts("convnext_tiny"),
    BackboneFacts("regnet_y_400mf"),
    BackboneFacts("vit_b_16", size_multiple=16),
)
BACKBONES = {facts.name: facts for facts in CATALOG}
BACKBONE_NAMES = tuple(BACKBONES)
NO_PRETRAINED = frozenset(f.name for f in CATALOG if not f.pretrained)
SIZE_MULTIPLES = {f.name: f.size_multiple for f in CATALOG if f.size_multiple > 1}
