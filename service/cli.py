"""`tuneserve serve` and `tuneserve build`: start the BentoML service, or package it as a bento."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICE = "service.service:TuneServe"


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="serve models over HTTP (bootstraps the default model if missing)")
    serve.add_argument("--port", type=int, default=int(os.environ.get("BENTOML_PORT", 3000)))
    serve.add_argument("--host", default=os.environ.get("BENTOML_HOST", "0.0.0.0"))
    serve.add_argument("--workers", type=int, help="worker processes (TUNESERVE_WORKERS; default one per GPU, else one per core)")
    serve.add_argument("--threads", type=int, help="ONNX Runtime threads per worker (TUNESERVE_THREADS)")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], help="TUNESERVE_DEVICE")
    serve.add_argument("--default-model", help="TUNESERVE_DEFAULT_MODEL (default imagenet)")
    serve.add_argument("--no-bootstrap", action="store_true", help="do not create the default model when missing")
    serve.set_defaults(handler=run_serve)

    build = subparsers.add_parser("build", help="bentoml build with the chosen models baked into the bento")
    build.add_argument("models", nargs="*", help="name or name:version (default: every stored tuneserve model)")
    build.add_argument("--version", help="bento version (default: generated)")
    build.set_defaults(handler=run_build)


def _env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    for option, variable in (
        ("workers", "TUNESERVE_WORKERS"),
        ("threads", "TUNESERVE_THREADS"),
        ("device", "TUNESERVE_DEVICE"),
        ("default_model", "TUNESERVE_DEFAULT_MODEL"),
    ):
        value = getattr(args, option, None)
        if value is not None:
            env[variable] = str(value)
    return env


def run_serve(args: argparse.Namespace) -> int:
    from models import store
    from models.errors import ModelNotFound
    from service.config import load_settings

    env = _env(args)
    settings = load_settings(env)  # fail fast on a bad TUNESERVE_* value
    try:
        store.resolve(settings.default_model)
    except ModelNotFound:
        if args.no_bootstrap or store.split_ref(settings.default_model)[0] != "imagenet":
            # only the embedded ImageNet model can be created here; any other default comes from a fine-tune
            print(f"warning: default model {settings.default_model!r} is not in the store; /readyz stays 503", file=sys.stderr)
        else:
            print(f"default model {settings.default_model!r} not in the store: bootstrapping it", file=sys.stderr)
            # a child process: exporting needs torch, which this (serving) process never imports
            done = subprocess.run([sys.executable, "-m", "training.bootstrap"], env=env, cwd=ROOT)
            if done.returncode != 0:
                print("bootstrap failed; serving anyway (/readyz stays 503 until the model exists)", file=sys.stderr)
    command = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--port", str(args.port), "--host", args.host]
    os.chdir(ROOT)
    os.execve(sys.executable, command, env)  # the server replaces this process: signals reach it directly
    return 0  # pragma: no cover


def bentofile_with_models(text: str, tags: list[str]) -> str:
    """The bentofile text with its `models:` section replaced by `tags`."""
    lines = text.splitlines()
    out, skipping = [], False
    for line in lines:
        if line.startswith("models:"):
            skipping = True
            continue
        if skipping and (line.startswith((" ", "-", "\t")) or not line.strip()):
            continue
        skipping = False
        out.append(line)
    if not tags:
        out.append("models: []")
    else:
        out.append("models:")
        out.extend(f'  - "{tag}"' for tag in tags)
    return "\n".join(out) + "\n"


def run_build(args: argparse.Namespace) -> int:
    import tempfile

    from models import store

    if args.models:
        tags = [store.resolve(ref).tag for ref in args.models]
    else:
        tags = [versions[0].tag for versions in store.list_models().values() if versions]
    if not tags:
        print("warning: no tuneserve models in the store; the bento will serve nothing until models are added", file=sys.stderr)
    text = bentofile_with_models((ROOT / "bentofile.yaml").read_text(), tags)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=ROOT, prefix=".bentofile-", delete=False) as handle:
        handle.write(text)
        path = Path(handle.name)
    try:
        command = [sys.executable, "-m", "bentoml", "build", "-f", str(path), str(ROOT)]
        if args.version:
            command += ["--version", args.version]
        print("models in the bento:", ", ".join(tags) or "none", file=sys.stderr)
        return subprocess.run(command, cwd=ROOT).returncode
    finally:
        path.unlink(missing_ok=True)
