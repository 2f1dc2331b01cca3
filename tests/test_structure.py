"""Project rules checked from the source (with `ast`, nothing is imported): no import cycle between the
project's modules, no function longer than 80 lines outside bench/, no module longer than 400 lines
outside tests/ and bench/, no private name (`_x`) used across packages, and BentoML's internals
imported by one module only."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "service", "training", "tuneserve", "tests")
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 400


def module_files() -> dict[str, Path]:
    """Dotted module name → file, for every module of the project's packages."""
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            files[name] = path
    return files


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `module` imports anywhere in its file: lazy imports inside functions too,
    and the names importlib imports (an `import_module("...")` argument, a `*MODULES` list)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        found |= _imported_by_name(node)
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node, path.name == "__init__.py")
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from package import submodule`
    return {name for name in found if name in known and name != module}


def _imported_by_name(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module":
        values = node.args[:1]
    elif isinstance(node, ast.Assign) and any(getattr(t, "id", "").endswith("MODULES") for t in node.targets):
        values = list(ast.walk(node.value))
    else:
        return set()
    return {v.value for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {module: imports_of(module, path, set(files)) for module, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return [
        f"{where}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit
    ]


def long_modules(limit: int = MAX_MODULE_LINES) -> dict[str, int]:
    """Project modules (not tests/) longer than `limit` lines, by path."""
    return {
        str(path.relative_to(ROOT)): lines
        for name, path in module_files().items()
        if not name.startswith("tests.") and (lines := len(path.read_text().splitlines())) > limit
    }


def _package(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(module: str, path: Path, files: dict[str, Path]) -> list[str]:
    """Private names `module` takes from another package: `from a.b import _x`, or `b._x` where `b` is
    a module of another package. Packages are compared whole (`service.routes` is not `service`)."""
    tree = ast.parse(path.read_text(), str(path))
    mine = _package(module, path)
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    modules_by_alias: dict[str, str] = {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules_by_alias |= {alias.asname: alias.name for alias in node.names if alias.asname and alias.name in files}
        if not isinstance(node, ast.ImportFrom):
            continue
        base = _absolute(module, node, path.name == "__init__.py")
        for alias in node.names:
            if f"{base}.{alias.name}" in files:  # `from package import submodule`
                modules_by_alias[alias.asname or alias.name] = f"{base}.{alias.name}"
                owner = base
            else:
                owner = _package(base, files[base]) if base in files else base.rpartition(".")[0]
            if _is_private(alias.name) and owner != mine:
                found.append(f"{where}:{node.lineno} from {base} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _is_private(node.attr):
            target = modules_by_alias.get(node.value.id)
            if target and _package(target, files[target]) != mine:
                found.append(f"{where}:{node.lineno} {node.value.id}.{node.attr} ({target})")
    return found


def test_no_import_cycles_between_project_modules():
    assert cycles(import_graph()) == []


def test_no_function_over_80_lines_outside_bench():
    assert [line for path in module_files().values() for line in long_functions(path)] == []


def test_no_module_over_400_lines_outside_tests_and_bench():
    assert long_modules() == {}


def test_only_one_module_reaches_into_bentoml_internals():
    # BentoML 1.4 has no public accessor for a store's folder or a second store; that gap is filled in
    # one file, so an upgrade has one place to check (the tests may use the internals to isolate stores)
    users = sorted({
        str(path.relative_to(ROOT))
        for name, path in module_files().items()
        if not name.startswith("tests.")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and any(module.startswith("bentoml._internal") for module in _import_targets(node))
    })
    assert users == ["models/artifact/bentoml_stores.py"]


def _import_targets(node: ast.Import | ast.ImportFrom) -> list[str]:
    return [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]


def test_no_private_name_imported_across_packages():
    files = module_files()
    assert [line for module, path in files.items() for line in private_imports(module, path, files)] == []


def test_the_checks_can_fail(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}) == [["a", "b", "c"]]
    source = tmp_path / "mod.py"
    source.write_text("import os\nfrom models import store\n\n\ndef late():\n    from service.finetune import runner\n"
                      "    return runner, store, os, importlib.import_module('tuneserve.cli')\n")
    known = {"models", "models.store", "service.finetune", "service.finetune.runner", "tuneserve.cli"}
    assert imports_of("tests.mod", source, known) == known  # lazy, submodules, by name
    registry = tmp_path / "registry.py"
    registry.write_text("COMMAND_MODULES = ['tuneserve.cli', 'models']\nlog = 'models.store'\n")
    assert imports_of("tests.registry", registry, known) == {"tuneserve.cli", "models"}
    long = tmp_path / "long.py"
    long.write_text("def short():\n    return 1\n\n\ndef long():\n" + "    x = 1\n" * 80 + "    return x\n")
    assert long_functions(long) == [f"{long}:5 long (82 lines)"]
    assert long_modules(limit=0) and not [path for path in long_modules(limit=0) if path.startswith(("tests/", "bench/"))]


def test_the_private_name_check_can_fail(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    files = {"pkg": tmp_path / "pkg" / "__init__.py", "pkg.a": tmp_path / "pkg" / "a.py",
             "pkg.sub": tmp_path / "pkg" / "sub" / "__init__.py", "pkg.sub.b": tmp_path / "pkg" / "sub" / "b.py",
             "pkg.sub.c": tmp_path / "pkg" / "sub" / "c.py"}
    for path in files.values():
        path.write_text("")
    files["pkg.sub.c"].write_text(
        "from pkg.a import _hidden, shown\nfrom pkg import a as alias\nfrom pkg.sub.b import _same_package\n"
        "from .b import _relative\nfrom pkg.sub import b\n\n\ndef f():\n    return alias._inner, b._fine, alias.__name__\n")
    assert private_imports("pkg.sub.c", files["pkg.sub.c"], files) == [
        f"{files['pkg.sub.c']}:1 from pkg.a import _hidden", f"{files['pkg.sub.c']}:9 alias._inner (pkg.a)"]
