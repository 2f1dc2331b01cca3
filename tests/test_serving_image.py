"""The CPU serving image's bento (`tuneserve build --serve-only --cpu`, offline): the serve-only
dependency set (no torch, CUDA, Ray or pyarrow unless asked) and a Dockerfile without build tools,
rendered by BentoML from the bento as `bentoml containerize` would (no Docker daemon needed)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuneserve.serve_commands import TRAINING_PACKAGES, bento_spec, requirement_name

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
RENDER = """
import sys, bentoml
from bentoml._internal.container import construct_containerfile
with construct_containerfile(bentoml.get(sys.argv[1]), enable_buildkit=True, add_header=False) as (_, path):
    print(open(path).read())
"""


def _bento(env: dict[str, str], *options: str) -> tuple[Path, str]:
    """Build with `options`; the bento's folder and its Dockerfile."""
    done = subprocess.run([sys.executable, "-m", "tuneserve", "build", "--serve-only", "--cpu", *options], env=env, cwd=ROOT,
                          timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    latest = Path(env["BENTOML_HOME"]) / "bentos" / "tuneserve-serve-cpu" / "latest"
    folder = latest.parent / latest.read_text().strip()
    # from /: BentoML re-reads the template from a temporary folder it must find under the working directory
    rendered = subprocess.run([sys.executable, "-c", RENDER, f"tuneserve-serve-cpu:{folder.name}"], env=env, cwd="/",
                              timeout=300, capture_output=True, text=True)
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    return folder, rendered.stdout


def _requirements(bento: Path) -> set[str]:
    lines = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    return {requirement_name(line) for line in lines if line.strip() and not line.startswith(("#", "-"))}


def test_the_cpu_serving_bento_installs_the_serve_set_without_build_tools(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    bento, dockerfile = _bento(env)
    installed = _requirements(bento)
    assert {"onnxruntime", "bentoml", "fastapi", "grpcio", "scikit-learn"} <= installed
    left_out = TRAINING_PACKAGES | {"ray", "pyarrow", "onnxruntime-gpu"}
    assert not installed & left_out and not any(name.startswith("nvidia-") for name in installed)
    assert not (bento / "src" / "training").exists()
    assert "FROM python:3.11-slim" in dockerfile and "libgomp1" in dockerfile  # only when the base lacks it
    for tool in ("build-essential", "git", "gcc"):
        assert tool not in dockerfile.split(), tool


def test_a_job_controller_keeps_the_ray_client(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    bento, _ = _bento(env, "--ray-client")
    assert "ray" in _requirements(bento) and "pyarrow" not in _requirements(bento)


def test_ray_client_and_templates_are_checked():
    from models.errors import TuneserveError

    spec = {"name": "tuneserve", "include": [], "python": {"packages": ["torch", "pyarrow", "onnxruntime-gpu==1.31.*"]}}
    with pytest.raises(TuneserveError, match="--ray-client"):
        bento_spec(spec, [], serve_only=True, ray_client=True)
    with pytest.raises(TuneserveError, match="inside"):
        bento_spec(spec, [], serve_only=True, cpu=True, dockerfile_template=Path("/etc/hostname"))
    gpu = bento_spec(spec, [], serve_only=True)["python"]["packages"]
    assert [requirement_name(p) for p in gpu] == ["onnxruntime-gpu", "ray"]  # the GPU serve-only image keeps Ray
