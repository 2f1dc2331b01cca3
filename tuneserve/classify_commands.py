"""`tuneserve classify --server URL IMAGE...`: classify images with a running tuneserve server."""
import argparse
import json
import os
import sys
from pathlib import Path

CHUNK = 16  # images per /classify_batch request


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("classify", help="classify images with a running tuneserve server (tuneserve.client)")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--server", default=os.environ.get("TUNESERVE_SERVER", "http://127.0.0.1:3000"),
                   help="server URL (default $TUNESERVE_SERVER or http://127.0.0.1:3000)")
    p.add_argument("--api-key", help="API key (default $TUNESERVE_API_KEY, else the server's key file when it runs here)")
    p.add_argument("--model", help="stored model name or name:version (default: the server's default model)")
    p.add_argument("--top-k", type=int, help="labels per image, most probable first")
    p.add_argument("--json", action="store_true", help="one JSON object per image instead of a table")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from tuneserve.client import Client, ClientError

    failed = 0
    try:
        with Client(args.server, args.api_key) as client:
            for start in range(0, len(args.images), CHUNK):
                chunk = args.images[start: start + CHUNK]
                result = client.classify_batch(chunk, model=args.model, top_k=args.top_k)
                for path, item in zip(chunk, result.results):
                    failed += _print(path, item.model_dump(), args.json)
    except (ClientError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 1 if failed else 0


def _print(path: Path, item: dict, as_json: bool) -> int:
    """One line per image; → 1 if the server could not classify it."""
    if as_json:
        print(json.dumps({"image": str(path), **{k: v for k, v in item.items() if k != "filename"}}))
    elif "error" in item:
        print(f"{path}\terror {item['status']}: {item['error']}")
    else:
        ranked = ", ".join(f"{p['label']} {p['probability']:.3f}" for p in item["predictions"])
        print(f"{path}\t{item['label'] or '(abstained)'}\t{ranked}\t{item['model']}:{item['version']}")
    return int("error" in item)
