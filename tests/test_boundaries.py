"""The rooms' one direction (docs/architecture.md): training/ → models/ ← service/, tuneserve/ on top.
Inside models/, the service may use every sub-package but transfer/ (artifact, serving, data, jobs):
the transfer tools run in job children and the CLI, never in a serving worker.

Every forbidden direction is checked twice: statically (every import statement in a room's files,
including the lazy ones inside functions) and at run time (importing every module of the room in a
fresh interpreter, which also catches a third-party package that drags torch in).
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TORCH = ("torch", "torchvision")

# room → the packages its code must never import (a package forbids its sub-modules too)
FORBIDDEN = {
    "models": (*TORCH, "training", "service", "tuneserve"),
    "service": (*TORCH, "training", "tuneserve", "models.transfer"),
    "training": ("service", "tuneserve"),
}
SERVICE_MAY_IMPORT = ("models", "models.errors", "models.artifact", "models.serving", "models.data", "models.jobs")


def is_under(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == package or name.startswith(package + ".") for package in packages)

CHECK = """
import sys
import {modules}
forbidden = {forbidden!r}
print(','.join(sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in forbidden))))
"""


def modules_of(room: str) -> list[str]:
    return sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in (ROOT / room).rglob("*.py")
    )


def imported_names(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import statement in `path`, at any depth; relative imports skipped."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
    return found


def loaded_at_run_time(modules: list[str], forbidden: tuple[str, ...]) -> list[str]:
    code = CHECK.format(modules=", ".join(modules), forbidden=set(forbidden))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    return [m for m in result.stdout.strip().split(",") if m]


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_no_import_statement_points_the_wrong_way(room):
    forbidden = FORBIDDEN[room]
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in sorted((ROOT / room).rglob("*.py"))
        for line, name in imported_names(path)
        if is_under(name, forbidden)
    ]
    assert wrong == []


@pytest.mark.parametrize("room", ["models", "service"])
def test_importing_the_room_loads_nothing_forbidden(room):
    assert loaded_at_run_time(modules_of(room), FORBIDDEN[room]) == []


def test_training_does_not_load_the_service():
    # training imports torch at module level, so this one starts torch (a few seconds)
    assert loaded_at_run_time(modules_of("training"), FORBIDDEN["training"]) == []


def test_job_contract_modules_are_torch_free():
    # the service validates fine-tune configs at submit time without starting torch, and the fast job
    # tests' fake trainer writes its events through training/progress.py
    assert loaded_at_run_time(["models.jobs.train_config", "training.progress"], TORCH) == []


def test_the_static_check_sees_lazy_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import os\n\ndef late():\n    from torch import nn\n    import service.api as api\n")
    assert imported_names(sample) == [(1, "os"), (4, "torch"), (5, "service.api")]


def test_the_service_imports_only_the_models_sub_packages_it_may():
    used = {
        ".".join(name.split(".")[:2])
        for path in (ROOT / "service").rglob("*.py")
        for _, name in imported_names(path)
        if name.split(".")[0] == "models"
    }
    assert used <= set(SERVICE_MAY_IMPORT), sorted(used - set(SERVICE_MAY_IMPORT))
    assert {"models.artifact", "models.serving", "models.jobs"} <= used  # the rule is about real imports


def test_every_models_module_sits_in_a_named_sub_package():
    # one level deep: models/<sub-package>/<module>.py, with errors.py the one shared top-level module
    top_level = sorted(p.name for p in (ROOT / "models").glob("*.py"))
    sub_packages = sorted(p.name for p in (ROOT / "models").iterdir() if (p / "__init__.py").is_file())
    deeper = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "models").glob("*/*/*.py"))
    assert top_level == ["__init__.py", "errors.py"]
    assert sub_packages == ["artifact", "data", "jobs", "serving", "transfer"]
    assert deeper == []
