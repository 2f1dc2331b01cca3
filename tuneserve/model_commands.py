"""`tuneserve models` and `tuneserve evaluate`: read-only commands over the model store."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    models = subparsers.add_parser("models", help="list stored models, or show one in full")
    models.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    models.add_argument("model", nargs="?", help="name or name:version (for show)")
    models.set_defaults(handler=run_models)

    evaluate = subparsers.add_parser(
        "evaluate", help="evaluate a model on labelled images and print the eval.json report"
    )
    evaluate.add_argument("--model", required=True, help="name or name:version")
    evaluate.add_argument("--data", required=True, type=Path, help="folder per class, manifest, or zip")
    evaluate.add_argument("--compare-with", help="a second model evaluated on the same images")
    evaluate.add_argument("--split", choices=["train", "val", "test"], help="only samples of this split")
    evaluate.add_argument("--top-k", type=int, default=5)
    evaluate.add_argument("--output", type=Path, help="also write the report here (JSON)")
    evaluate.add_argument("--report", type=Path, metavar="HTML",
                          help="also write a self-contained HTML page: confusion matrix, per-class bars, "
                               "reliability before/after calibration, risk-coverage, training curves")
    evaluate.set_defaults(handler=run_evaluate)


def run_models(args: argparse.Namespace) -> int:
    from models.artifact import store

    if args.action == "show":
        if not args.model:
            raise SystemExit("tuneserve models show NAME[:VERSION]")
        print(json.dumps(store.describe(store.resolve(args.model), full=True), indent=2))
        return 0
    listing = {
        name: [store.describe(v) for v in versions] for name, versions in store.list_models().items()
    }
    print(json.dumps(listing, indent=2))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    import tempfile

    from models.data.datasets import load_samples, safe_extract_zip
    from models.data.evaluate import evaluate, evaluate_compare
    from tuneserve.score import load_model

    with tempfile.TemporaryDirectory() as scratch:
        data = args.data
        if data.suffix.lower() == ".zip":
            data = safe_extract_zip(data, scratch)
        samples = load_samples(data)
        if args.split:
            samples = [s for s in samples if s.split == args.split]
        model = load_model(args.model)
        if args.compare_with:
            report = evaluate_compare(model, load_model(args.compare_with), samples, args.top_k)
        else:
            report = evaluate(model, samples, args.top_k)
    text = json.dumps(report, indent=2)
    if args.output:
        args.output.write_text(text)
    if args.report:
        from models.data.report import write_report

        write_report(args.report, report, model.manifest.training.get("history"))
    print(text)
    return 0
