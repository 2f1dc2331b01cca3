"""The docs stay true to the tree: every relative link in README.md and docs/*.md leads to a file (and,
with `#anchor`, to a heading in it), every project path, module and file name the docs name in code
exists, and the README stays short enough to read while linking every page that holds the reference."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 200
PACKAGES = ("models", "service", "training", "tuneserve", "tests", "bench")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# a path starts at a project folder and is not the tail of a longer path (`$HOME/models/...`, `/home/x/tests`)
PROJECT_PATH = re.compile(r"(?<![\w./~$-])((?:models|service|training|tuneserve|tests|bench|docs|\.ci)/[\w./-]*)")
MODULE = re.compile(r"(?<![\w./~$-])((?:%s)(?:\.[A-Za-z_]\w*)+)" % "|".join(PACKAGES))
# a bare file name (`runner.py`): some file of the project has that name
BARE_FILE = re.compile(r"(?<![\w./~$<>*-])([\w-]+\.py)\b")
FILE_SUFFIXES = {"py", "md", "json", "jsonl", "yaml", "toml", "onnx", "txt", "sh", "png", "csv", "html", "js", "css",
                 "pt", "npz", "sqlite3", "zip", "parquet"}


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def without_code(text: str) -> str:
    return INLINE_CODE.sub("", FENCE.sub("", text))


def code_spans(text: str) -> list[str]:
    """Inline code spans and fenced blocks: where the docs name files, modules and commands."""
    return [m.group(0) for m in FENCE.finditer(text)] + INLINE_CODE.findall(FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        if match := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line):
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in LINK.findall(without_code(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}: {target}"
        if not resolved.exists():
            broken.append(f"{where} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{where} (no heading with that anchor in {resolved.relative_to(ROOT)})")
    return broken


def module_exists(dotted: str) -> bool:
    """`models.artifact.store.latest_version` names a module if some prefix of two or more parts is a module or package."""
    parts = dotted.split(".")
    return any((ROOT.joinpath(*parts[:n]).with_suffix(".py")).is_file() or (ROOT.joinpath(*parts[:n]) / "__init__.py").is_file()
               for n in range(len(parts), 1, -1))


def project_file_names() -> set[str]:
    return {p.name for package in (*PACKAGES, "docs") for p in (ROOT / package).rglob("*.py")} | {p.name for p in ROOT.glob("*.py")}


def missing_paths(path: Path) -> list[str]:
    missing = []
    names = project_file_names()
    for span in code_spans(path.read_text()):
        for named in PROJECT_PATH.findall(span):
            named = named.rstrip(".,;:")
            if not (ROOT / named).exists():
                missing.append(f"{path.relative_to(ROOT)}: {named}")
        for dotted in MODULE.findall(span):
            if dotted.rsplit(".", 1)[-1] not in FILE_SUFFIXES and not module_exists(dotted):
                missing.append(f"{path.relative_to(ROOT)}: {dotted} (module)")
        missing += [f"{path.relative_to(ROOT)}: {name} (no file of that name)" for name in BARE_FILE.findall(span) if name not in names]
    return sorted(set(missing))


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert broken_links(path) == []


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_project_path_and_module_named_exists(path):
    assert missing_paths(path) == []


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; reference belongs in docs/"


def test_every_docs_page_is_linked_from_the_readme():
    readme = ROOT / "README.md"
    linked = {(readme.parent / target.partition("#")[0]).resolve() for target in LINK.findall(without_code(readme.read_text()))}
    assert [str(page.relative_to(ROOT)) for page in sorted((ROOT / "docs").glob("*.md")) if page.resolve() not in linked] == []


def test_readme_keeps_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "make serve" in text and "make test" in text


def test_the_checks_can_fail(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "store.py").write_text("")
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## Jobs on Ray (`TUNESERVE_JOB_BACKEND=ray`)\n\n## Jobs on Ray (`TUNESERVE_JOB_BACKEND=ray`)\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#jobs-on-ray-tuneserve_job_backendray) [second](other.md#jobs-on-ray-tuneserve_job_backendray-1)"
        " [self](#page) [web](https://example.org/x) [gone](missing.md) [bad anchor](other.md#nope)\n\n"
        "`models/store.py: publish` `models/gone.py` `$BENTOML_HOME/models/<name>` `models.store.publish`"
        " `models.gone.thing` `store.py` `gone_client.py`\n\n```bash\npython -m models.missing  # [not a link](nowhere.md)\n```\n")
    assert broken_links(page) == ["docs/page.md: missing.md (no such file)",
                                  "docs/page.md: other.md#nope (no heading with that anchor in docs/other.md)"]
    assert missing_paths(page) == ["docs/page.md: gone_client.py (no file of that name)", "docs/page.md: models.gone.thing (module)",
                                   "docs/page.md: models.missing (module)", "docs/page.md: models/gone.py"]
