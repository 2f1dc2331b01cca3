"""Job entry point: `python -m training.run --config CONFIG.json --progress PROGRESS.jsonl [--resume]`.

A config with another `kind` ("advise", "quantize") runs that kind's entry instead of a fine-tune
(models/jobs/events.py RUNNER_ENTRIES; both are torch-free).

Exit codes (models/jobs/events.py ExitCode): 0 published; 2 bad config or bad data; 143 SIGTERM
(nothing published); 1 anything else.
Every outcome is also the last line of the progress file (`succeeded` or `failed`).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
import traceback

from models.jobs.events import RUNNER_ENTRIES, ExitCode


def _kind(config_path: str) -> str:
    """Which long task a job config is for (the job store's `kind`); unreadable files fail later, named."""
    import json

    try:
        return str(json.loads(open(config_path).read()).get("kind") or "finetune")
    except (OSError, ValueError, AttributeError):
        return "finetune"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="JSON file with TrainConfig fields")
    parser.add_argument("--progress", required=True, help="JSONL file to append progress events to")
    parser.add_argument("--resume", action="store_true", help="continue from output_dir/last.pt")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from training.progress import JsonlWriter, Progress

    writer = JsonlWriter(args.progress)
    progress = Progress(writer)
    stop = threading.Event()

    def on_term(signum, frame):  # noqa: ARG001
        logging.getLogger("tuneserve.training").warning("SIGTERM: stopping, nothing will be published")
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    try:
        from models.errors import DatasetError, ImageError
        from training.config import ConfigError, TrainConfig

        entry = RUNNER_ENTRIES.get(_kind(args.config))
        if entry is not None:  # another kind of job (the advisor, the quantizer): its own body
            module, function = entry.split(":")
            return getattr(importlib.import_module(module), function)(args.config, progress, stop)
        try:
            config = TrainConfig.load(args.config).validate()
        except ConfigError as error:
            progress.failed(str(error))
            return ExitCode.BAD_INPUT
        from training.pipeline import run
        from models.errors import Cancelled

        try:
            result = run(config, progress, stop, resume=args.resume)
        except Cancelled as error:
            progress.failed(f"cancelled (SIGTERM): {error}", cancelled=True)
            return ExitCode.TERMINATED
        except (DatasetError, ImageError, ConfigError) as error:
            progress.failed(str(error))
            return ExitCode.BAD_INPUT
        except Exception as error:  # noqa: BLE001 - the job must always end with a failed event
            traceback.print_exc()
            if stop.is_set():
                progress.failed(f"cancelled (SIGTERM): {error}", cancelled=True)
                return ExitCode.TERMINATED
            progress.failed(f"{type(error).__name__}: {error}")
            return ExitCode.FAILED
        from models.artifact.manifest import eval_summary

        progress.succeeded(result.version.tag, eval_summary(result.report))
        return ExitCode.OK
    finally:
        writer.close()


if __name__ == "__main__":
    sys.exit(main())
