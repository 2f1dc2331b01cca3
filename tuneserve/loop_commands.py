"""`tuneserve review | feedback | monitor | rollout | promote | rollback`: the production loop of a
running server (docs/production-loop.md)."""
import argparse
import json
import os
import sys


def _server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=os.environ.get("TUNESERVE_SERVER", "http://127.0.0.1:3000"),
                   help="server URL (default $TUNESERVE_SERVER or http://127.0.0.1:3000)")
    p.add_argument("--api-key", help="API key (default $TUNESERVE_API_KEY, else the server's key file when it runs here)")
    p.add_argument("--json", action="store_true", help="print the server's JSON answer")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("review", help="the review queue of a model: captured images, most informative first")
    p.add_argument("model")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--label", nargs=2, metavar=("CAPTURE_ID", "LABEL"), help="label one image instead of listing")
    p.add_argument("--skip", metavar="CAPTURE_ID", help="take one image out of the queue without a label")
    _server_flags(p)
    p.set_defaults(handler=review)
    p = subparsers.add_parser("feedback", help="record the true label of a served request (its request_id)")
    p.add_argument("request_id")
    p.add_argument("label")
    _server_flags(p)
    p.set_defaults(handler=lambda a: _show(a, "POST", "/feedback", json={"request_id": a.request_id, "label": a.label}))
    p = subparsers.add_parser("monitor", help="live accuracy, drift and rollout of a model")
    p.add_argument("model")
    _server_flags(p)
    p.set_defaults(handler=monitor)
    p = subparsers.add_parser("rollout", help="make a version a canary or shadow of the stable one")
    p.add_argument("model")
    p.add_argument("version")
    p.add_argument("--mode", choices=("canary", "shadow"), default="canary")
    p.add_argument("--percent", type=float, default=10.0, help="canary: share of un-pinned traffic (default 10)")
    _server_flags(p)
    p.set_defaults(handler=lambda a: _show(a, "POST", f"/models/{a.model}/rollout",
                                           json={"version": a.version, "mode": a.mode, "percent": a.percent}))
    for action, text in (("promote", "the candidate becomes stable"), ("rollback", "drop the candidate, or undo the last promotion")):
        p = subparsers.add_parser(action, help=text)
        p.add_argument("model")
        _server_flags(p)
        p.set_defaults(handler=lambda a, action=action: _show(a, "POST", f"/models/{a.model}/{action}"))


def _call(args: argparse.Namespace, method: str, path: str, **kwargs) -> dict | None:
    from tuneserve.client import Client, ClientError

    try:
        with Client(args.server, args.api_key) as client:
            return client.request(method, path, **kwargs).json()
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return None


def _show(args: argparse.Namespace, method: str, path: str, **kwargs) -> int:
    answer = _call(args, method, path, **kwargs)
    if answer is None:
        return 2
    print(json.dumps(answer, indent=None if args.json else 2))
    return 0


def review(args: argparse.Namespace) -> int:
    if args.label:
        return _show(args, "POST", "/feedback", json={"request_id": args.label[0], "label": args.label[1]})
    if args.skip:
        return _show(args, "POST", f"/models/{args.model}/review/{args.skip}/skip")
    answer = _call(args, "GET", f"/models/{args.model}/review", params={"limit": args.limit})
    if answer is None:
        return 2
    if args.json:
        print(json.dumps(answer))
        return 0
    print(f"{answer['waiting']} waiting; the {len(answer['items'])} most informative first:")
    for item in answer["items"]:
        in_domain = "-" if item["in_domain"] is None else f"{item['in_domain']:.2f}"
        print(f"{item['capture_id']}\t{item['label'] or '(abstained)'}\tconf {item['confidence']:.3f}\t"
              f"in-domain {in_domain}\tuncertainty {item['uncertainty']:.3f}\t{item['reason']}\t{args.server}{item['image_url']}")
    return 0


def monitor(args: argparse.Namespace) -> int:
    answer = _call(args, "GET", f"/models/{args.model}/monitor")
    if answer is None:
        return 2
    if args.json:
        print(json.dumps(answer))
        return 0
    rollout = answer["serving"]["rollout"]
    print(f"{answer['model']}: latest {answer['serving']['latest']}"
          + (f"; stable {rollout['stable']}, candidate {rollout['candidate']} ({rollout['mode']} {rollout['percent']:g}%)"
             if rollout else ""))
    for version, v in answer["versions"].items():
        live, drift = v["live"], v["drift"] or {}
        accuracy = "-" if live["accuracy"] is None else f"{live['accuracy']:.3f} [{live['interval'][0]:.3f}, {live['interval'][1]:.3f}]"
        p_value = (drift.get("embedding") or {}).get("p_value")
        print(f"  {version}: eval {v['eval_accuracy']}, live {accuracy} n={live['count']}, answered {v['answered']}, "
              f"drift p={'-' if p_value is None else f'{p_value:.3f}'}, in-domain {drift.get('in_domain_rate')}, "
              f"abstained {drift.get('abstention_rate')}")
    return 0
