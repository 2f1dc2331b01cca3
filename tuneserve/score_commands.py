"""`tuneserve score`: arguments here; the scoring in score_core.py and its engines (score.py, ray_score.py)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tuneserve.score_output import FORMATS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "score",
        help="score a folder or manifest of images with a stored model, to CSV, JSONL or Parquet",
        description="Score images with a stored model. Resumable: rerun with the same --output to continue.",
    )
    p.add_argument("--model", required=True, help="name or name:version (default version: latest)")
    p.add_argument("--input", required=True, type=Path, help="folder of images (plain, recursive; or one folder per class), or a .csv/.jsonl manifest with path[,label]")
    p.add_argument("--output", required=True, type=Path, help="output file: .csv, .jsonl or .parquet")
    p.add_argument("--top-k", type=int, default=5, help="labels per image (default 5)")
    p.add_argument("--min-confidence", metavar="P|auto",
                   help="abstain (empty label, abstained=true) below this top probability; 'auto': the model's "
                        "per-label best-F1 thresholds, and abstain on out-of-domain images too")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="local: decode workers (default: cores); ray: actors (default 1)")
    p.add_argument("--pool", choices=["thread", "process"], default="thread", help="local decode pool (default thread)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "int8", "fp16"], default="auto",
                   help="graph variant: auto = int8 on CPU when it passed its accuracy gate, fp16 on GPU (default auto)")
    p.add_argument("--engine", choices=["local", "ray"], default="local")
    p.add_argument("--num-gpus", type=float, default=0.0, help="ray: GPUs per actor (e.g. 1, or 0.5 to share)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="ray: CPUs per actor (also its ONNX Runtime threads)")
    p.add_argument("--ray-address", help="ray: cluster address (ray://host:10001 or auto); default $RAY_ADDRESS, else a local Ray")
    p.add_argument("--no-eval", action="store_true", help="ignore labels in the input; do not write the evaluation report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--evidence", type=Path, metavar="DIR",
                   help="also write an evidence overlay per image to DIR/<path>.png (docs/explain.md); a pass of its own")
    p.set_defaults(handler=run_score)


def run_score(args: argparse.Namespace) -> int:
    from models.errors import DatasetError

    if args.output.suffix.lower() not in FORMATS:
        raise DatasetError(f"output must end in .csv, .jsonl or .parquet, got {args.output.name}")
    if args.top_k < 1 or args.batch_size < 1:
        raise DatasetError("--top-k and --batch-size must be at least 1")
    from models.serving.decision import parse_min_confidence

    if args.evidence:
        from tuneserve.score_evidence import check_explainable

        check_explainable(args.model)
    options = dict(
        top_k=args.top_k, batch_size=args.batch_size, use_labels=not args.no_eval, progress=not args.no_progress,
        min_confidence=parse_min_confidence(args.min_confidence),
    )
    if args.engine == "ray":
        from tuneserve.ray_score import score_ray

        result = score_ray(
            args.model, args.input, args.output, concurrency=args.workers or 1, num_gpus=args.num_gpus,
            cpus_per_actor=args.cpus_per_actor, address=args.ray_address, device=args.device,
            precision=args.precision, **options,
        )
    else:
        from tuneserve.score import score

        result = score(
            args.model, args.input, args.output, workers=args.workers, pool=args.pool, device=args.device,
            precision=args.precision, **options
        )
    print(result.summary_line(), file=sys.stderr)
    if result.report is not None:
        from models.artifact.manifest import eval_summary

        print(json.dumps({"eval": eval_summary(result.report), "report": str(result.report_path)}, indent=2))
    if args.evidence:
        from tuneserve.score_evidence import write_overlays

        written = write_overlays(args.model, args.input, args.evidence, args.batch_size, args.device)
        print(f"wrote {written} evidence overlays under {args.evidence}", file=sys.stderr)
    return 0
