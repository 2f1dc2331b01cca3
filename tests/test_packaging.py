"""`tuneserve build` and `tuneserve build --serve-only` make real bentos (offline, `bentoml build`):
the full one carries training and torch for local fine-tune jobs; the serve-only one has neither
(its /finetune answers 501 naming the backend to configure: tests/test_job_backends.py;
in a real image: bench/container.sh)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tuneserve.serve_commands import TRAINING_PACKAGES, requirement_name

ROOT = Path(__file__).resolve().parent.parent


def _build(env: dict[str, str], *options: str) -> Path:
    done = subprocess.run([sys.executable, "-m", "tuneserve", "build", *options], env=env, cwd=ROOT, timeout=300,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    name = "tuneserve-serve" if "--serve-only" in options else "tuneserve"
    return Path(env["BENTOML_HOME"]) / "bentos" / name / "latest"


def _bento_dir(latest: Path) -> Path:
    return latest.parent / latest.read_text().strip()


def test_serve_only_bento_has_no_torch_and_no_training(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    full = _bento_dir(_build(env, "--base-image", "localbase:1"))
    serve = _bento_dir(_build(env, "--serve-only"))

    def requirements(bento: Path) -> set[str]:
        lines = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
        return {requirement_name(line) for line in lines if line.strip() and not line.startswith(("#", "-"))}

    assert TRAINING_PACKAGES <= requirements(full) and (full / "src" / "training" / "run.py").exists()
    assert not requirements(serve) & TRAINING_PACKAGES
    assert {"onnxruntime-gpu", "bentoml", "ray"} <= requirements(serve)
    assert not (serve / "src" / "training").exists() and (serve / "src" / "service" / "finetune" / "backends.py").exists()
    assert "localbase:1" in (full / "bento.yaml").read_text()
