"""Who may import whom (docs/architecture.md, "Who imports whom"), read from the source of every .py file with `ast`.

Imports inside functions count: a lazy import is still a dependency. Only `if TYPE_CHECKING:`
blocks are skipped, since they never run.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ponder", "runtime", "training", "server", "exporters", "loadtests", "benchmarks", "scripts", "tests")

# package -> the packages of ours it must not import, and why.
FORBIDDEN: dict[str, tuple[set[str], str]] = {
    "runtime": ({"training", "server", "exporters", "benchmarks", "loadtests"}, "runtime is the bottom layer"),
    "server": ({"training", "loadtests", "benchmarks"}, "the server needs the runtime only"),
    "training": ({"benchmarks", "loadtests"}, "nothing but the ponder command and tests imports benchmarks"),
    "exporters": ({"benchmarks", "loadtests"}, "nothing but the ponder command and tests imports benchmarks"),
    "loadtests": (set(PACKAGES) - {"loadtests"}, "loadtests talks HTTP only and imports nothing of ours"),
}
NOT_TESTS = "only tests import tests"

# Files that must load without torch (plain-Python scheduling, testable without a model).
TORCH_FREE = ("runtime/engine/scheduler.py", "runtime/engine/request.py", "runtime/engine/kv_blocks.py")


@dataclass(frozen=True)
class Import:
    path: Path  # relative to ROOT
    line: int
    module: str  # absolute dotted name
    top_level: bool  # runs when the file is imported (not inside a function)

    def where(self) -> str:
        return f"{self.path}:{self.line}: imports {self.module}"


def python_files() -> list[Path]:
    return sorted(p.relative_to(ROOT) for pkg in PACKAGES if (ROOT / pkg).is_dir() for p in (ROOT / pkg).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path) -> list[Import]:
    """Every import statement in the file, relative ones made absolute, `from a import b` as a.b
    when a.b is a module of ours (so `from runtime import bench` names runtime.bench)."""
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, top_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.orelse:
                    visit_stmt(stmt, top_level)
                continue
            visit_stmt(child, top_level)

    def visit_stmt(node: ast.AST, top_level: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(path, node.lineno, a.name, top_level) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append(Import(path, node.lineno, sub if _is_module(sub) else base, top_level))
        inner = top_level and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        visit(node, inner)

    visit(tree, True)
    return found


def _is_module(dotted: str) -> bool:
    p = ROOT.joinpath(*dotted.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _file_of(module: str) -> Path | None:
    p = Path(*module.split("."))
    for candidate in (p.with_suffix(".py"), p / "__init__.py"):
        if (ROOT / candidate).is_file():
            return candidate
    return None


def package_violations(files: list[Path]) -> list[str]:
    bad = []
    for path in files:
        pkg = path.parts[0]
        forbidden, why = FORBIDDEN.get(pkg, (set(), ""))
        for imp in imports_of(path):
            target = imp.module.split(".")[0]
            if target == "tests" and pkg != "tests":
                bad.append(f"{imp.where()} ({NOT_TESTS})")
            elif target in forbidden:
                bad.append(f"{imp.where()} ({pkg} must not import {target}: {why})")
    return bad


def loads_torch(module: str, seen: set[str] | None = None) -> list[str] | None:
    """The chain of our modules through which importing `module` loads torch, or None. Follows the
    imports that run at import time, and the parent packages' __init__ files, which run first."""
    seen = set() if seen is None else seen
    if module.split(".")[0] == "torch":
        return [module]
    if module in seen or module.split(".")[0] not in PACKAGES:
        return None
    seen.add(module)
    parents = [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
    path = _file_of(module)
    nexts = parents + ([i.module for i in imports_of(path) if i.top_level] if path else [])
    for nxt in nexts:
        chain = loads_torch(nxt, seen)
        if chain:
            return [module, *chain]
    return None


def torch_violations(files: list[str]) -> list[str]:
    bad = []
    for name in files:
        path = Path(name)
        for imp in imports_of(path):  # any import in the file itself, top-level or not
            chain = loads_torch(imp.module)
            if chain:
                bad.append(f"{imp.where()}, which loads torch ({' -> '.join(chain)}); {name} must stay torch-free")
    return bad


def test_packages_import_only_what_the_layering_allows():
    bad = package_violations(python_files())
    if bad:
        pytest.fail("forbidden imports:\n" + "\n".join(bad), pytrace=False)


def test_scheduler_request_and_kv_blocks_never_load_torch():
    missing = [f for f in TORCH_FREE if not (ROOT / f).is_file()]
    assert not missing, f"{missing} moved: update TORCH_FREE"
    bad = torch_violations(list(TORCH_FREE))
    if bad:
        pytest.fail("torch reaches a torch-free file:\n" + "\n".join(bad), pytrace=False)


def test_the_checker_finds_a_forbidden_import_in_a_function(tmp_path, monkeypatch):
    """The rules are only as good as the parser: a lazy import, a relative import and a torch import
    through one of our modules must all be caught, with file and line."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "loadtests").mkdir()
    (tmp_path / "loadtests" / "__init__.py").write_text("")
    (tmp_path / "loadtests" / "cli.py").write_text("import json\n\ndef main():\n    from ponder.cli import main\n")
    (tmp_path / "runtime" / "engine").mkdir(parents=True)
    for f in ("runtime/__init__.py", "runtime/engine/__init__.py"):
        (tmp_path / f).write_text("")
    (tmp_path / "runtime" / "engine" / "helpers.py").write_text("import torch\n")
    (tmp_path / "runtime" / "engine" / "scheduler.py").write_text("from . import helpers\n")
    (tmp_path / "runtime" / "bench.py").write_text("from server import app\n")
    assert package_violations(python_files()) == [
        "loadtests/cli.py:4: imports ponder.cli (loadtests must not import ponder: "
        "loadtests talks HTTP only and imports nothing of ours)",
        "runtime/bench.py:1: imports server (runtime must not import server: runtime is the bottom layer)",
    ]
    (bad,) = torch_violations(["runtime/engine/scheduler.py"])
    assert bad.startswith("runtime/engine/scheduler.py:1: imports runtime.engine.helpers, which loads torch "
                          "(runtime.engine.helpers -> torch)")
