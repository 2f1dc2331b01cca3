"""models/ and service/ must never pull in torch or training/ (DESIGN.md: three rooms, one direction)."""
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import sys
import {modules}
bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.') or m == 'training' or m.startswith('training.'))
print(','.join(bad))
"""


def _imported(modules: list[str]) -> list[str]:
    code = CHECK.format(modules=", ".join(modules))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [m for m in result.stdout.strip().split(",") if m]


def test_models_does_not_import_torch():
    modules = ["models", "models.manifest", "models.store", "models.preprocess", "models.runtime",
               "models.datasets", "models.metrics", "models.evaluate", "models.errors", "models.train_config",
               "models.logme", "models.heads", "models.head_graph", "models.instant", "models.advise"]
    assert _imported(modules) == []


def test_train_config_is_importable_without_torch():
    # the service validates fine-tune configs at submit time without starting torch
    assert _imported(["models.train_config"]) == []


def test_service_does_not_import_torch():
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "service").rglob("*.py")
    )
    assert _imported(modules) == []
