"""`tuneserve advise`: which stored model to start from, and would more labels help (local, torch-free)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    advise = subparsers.add_parser(
        "advise", help="rank stored models as fine-tune sources for a dataset (LogME, SFDA, k-NN, probe, learning curve)")
    advise.add_argument("--data", type=Path, help="the dataset: folder per class, CSV/JSONL manifest, or zip of either")
    # the dataset as a positional argument: deprecated (every command takes a dataset as --data)
    advise.add_argument("positional_data", nargs="?", type=Path, metavar="DATA", help=argparse.SUPPRESS)
    advise.add_argument("--candidates", nargs="+", metavar="MODEL", default=[],
                        help="stored models (name or name:version) to compare; default: every stored model")
    advise.add_argument("--folds", type=int, default=5, help="cross-validation folds of the probe (capped by the smallest class)")
    advise.add_argument("--seed", type=int, default=0)
    advise.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    advise.add_argument("--output", type=Path, help="also write the advice here (JSON)")
    advise.add_argument("--json", action="store_true", help="print the full advice as JSON instead of a table")
    advise.set_defaults(handler=run_advise)


def table(advice: dict[str, Any]) -> str:
    rows = [f"{'rank':>4}  {'model':<40} {'mean rank':>9} {'LogME':>8} {'SFDA':>6} {'k-NN':>6} {'probe':>6} "
            f"{'embed s':>8}  strategy"]
    for c in advice["candidates"]:
        sfda = "-" if c["sfda"] is None else f"{c['sfda']:.3f}"
        rows.append(f"{c['rank']:>4}  {c['model']:<40} {c['mean_rank']:>9.2f} {c['logme']:>8.3f} {sfda:>6} "
                    f"{c['knn_accuracy']:>6.3f} {c['probe_accuracy']:>6.3f} {c['embed_seconds']:>8.2f}  "
                    f"{c['recommended_strategy']}")
    for skipped in advice["skipped"]:
        rows.append(f"   -  {skipped['model']:<40} skipped: {skipped['reason']}")
    curve = ", ".join(f"{p['images']} img → {p['accuracy']:.3f}" for p in advice["learning_curve"])
    rows.append(f"best: {advice['best']} ({advice['recommended_strategy']}); learning curve: {curve or 'no held-out images'}")
    return "\n".join(rows)


def dataset_argument(args: argparse.Namespace) -> Path:
    """`--data DIR`; a positional DIR still works, with a deprecation note, for one release."""
    from models.errors import TuneserveError

    if args.data and args.positional_data:
        raise TuneserveError("give the dataset once, as --data DIR")
    if args.positional_data:
        print("note: `tuneserve advise DIR` is deprecated; use `tuneserve advise --data DIR`", file=sys.stderr)
    if not (args.data or args.positional_data):
        raise TuneserveError("the dataset is required: tuneserve advise --data DIR")
    return args.data or args.positional_data


def run_advise(args: argparse.Namespace) -> int:
    from models.jobs.advise import AdviseConfig
    from models.transfer.advise import advise

    config = AdviseConfig(data=str(dataset_argument(args)), candidates=list(args.candidates), folds=args.folds, seed=args.seed,
                          device=args.device)
    advice = advise(config)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(advice, indent=2))
    print(json.dumps(advice, indent=2) if args.json else table(advice))
    return 0
