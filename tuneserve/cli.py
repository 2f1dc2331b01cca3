"""`tuneserve` command line. Each area registers its own sub-commands; heavy imports stay inside them."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules exposing `register(subparsers)`. They must be cheap to import (no torch at top level).
COMMAND_MODULES = [
    "tuneserve.model_commands",
    "tuneserve.finetune_commands",
    "tuneserve.classify_commands",
    "tuneserve.train_commands",
    "tuneserve.serve_commands",
    "tuneserve.score_commands",
    "tuneserve.quantize_commands",
    "tuneserve.advise_commands",
    "tuneserve.loop_commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuneserve",
        description="Fine-tune image classifiers from a source model, export them to ONNX, serve and score them.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from models.errors import TuneserveError

    try:
        return int(args.handler(args) or 0)
    except TuneserveError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
