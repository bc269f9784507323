"""The layers of DESIGN.md, checked on the source: the library never imports the orchestrator,
and the pipeline's step modules stay small rooms rather than one corridor."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "loram_core"


def _imports(file: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_core_never_imports_prefect() -> None:
    offenders = {
        str(f.relative_to(REPO)): sorted(n for n in _imports(f) if n.split(".")[0] == "prefect")
        for f in CORE.rglob("*.py")
    }
    assert {f: n for f, n in offenders.items() if n} == {}


def test_the_core_never_imports_the_orchestration_layers() -> None:
    offenders = {
        str(f.relative_to(REPO)): sorted(n for n in _imports(f) if n.startswith("loram_provider"))
        for f in CORE.rglob("*.py")
    }
    assert {f: n for f, n in offenders.items() if n} == {}


def test_each_step_module_is_one_room() -> None:
    sizes = {f.name: len(f.read_text().splitlines()) for f in (CORE / "steps").glob("*.py")}
    assert {
        "inputs.py",
        "pruning.py",
        "alignment.py",
        "quantization.py",
        "evaluation.py",
        "publishing.py",
    } <= set(sizes)
    assert {name: n for name, n in sizes.items() if n > 250} == {}


def _public_functions(root: Path) -> list[tuple[str, bool]]:
    """(place, has a docstring) for every public function and method under `root`."""
    found: list[tuple[str, bool]] = []

    def walk(node: ast.AST, file: Path) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) and not child.name.startswith("_"):
                found.append(
                    (f"{file.relative_to(REPO)}:{child.lineno} {child.name}", bool(ast.get_docstring(child)))
                )
            elif isinstance(child, ast.ClassDef) and not child.name.startswith("_"):
                walk(child, file)

    for file in root.rglob("*.py"):
        walk(ast.parse(file.read_text()), file)
    return found


def test_public_functions_have_docstrings() -> None:
    # Prefect shows a task's docstring as its description; the next reader needs the rest.
    found = [f for root in ("loram_core", "flows", "tasks") for f in _public_functions(REPO / root)]
    share = sum(has for _, has in found) / len(found)
    missing = [place for place, has in found if not has]
    assert share >= 0.9, f"{share:.1%} of public functions have a docstring; missing: {missing}"
