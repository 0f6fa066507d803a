"""The house rules of the package layout (ARCHITECTURE.md), checked on the source itself."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qlimage"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def head_modules() -> dict[str, Path]:
    return {
        module_name(p): p
        for p in sorted(PACKAGE.rglob("*.py"))
        if "node" not in p.relative_to(PACKAGE).parts[:1]
    }


def is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def module_level_imports(path: Path) -> set[str]:
    """qlimage modules imported when `path` is imported (not inside functions, not for typing)."""
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and not is_type_checking(node):
                visit(node.body + node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("qlimage"))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qlimage"):
                assert node.module is not None
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)

    visit(ast.parse(path.read_text()).body)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = head_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {t for t in module_level_imports(path) if t in modules}
        # Importing a submodule runs its packages' __init__ first (unless we are inside it).
        for t in list(targets):
            parts = t.split(".")
            targets.update(".".join(parts[:i]) for i in range(2, len(parts)))
        graph[name] = {t for t in targets if not name.startswith(t + ".") and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_no_import_cycle_between_head_modules() -> None:
    assert find_cycle(import_graph()) is None


def test_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def sources_mentioning(text: str) -> set[str]:
    return {name for name, path in head_modules().items() if text in path.read_text()}


def test_only_tasks_run_starts_doit() -> None:
    assert sources_mentioning("DoitMain") == {"qlimage.tasks.run"}


def test_hidden_state_files_are_spelled_only_by_the_layout() -> None:
    for name in (
        ".build.lock",
        ".build.running",
        ".validated.json",
        ".pool-control.json",
        ".doit-state.json",
        ".apt-hook-pending",
        ".host-pieces",
        "cache/modules",
    ):
        assert sources_mentioning(name) <= {"qlimage.layout"}, name


def test_one_jinja_environment() -> None:
    assert sources_mentioning("jinja2.Environment(") == {"qlimage.templates"}


def test_commands_hold_no_logic() -> None:
    """A verb module wires argparse and prints: it registers itself and defines no classes."""
    from qlimage.commands import VERBS

    for verb in VERBS:
        tree = ast.parse((PACKAGE / "commands" / f"{verb}.py").read_text())
        functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
        assert "register" in {f.name for f in functions}, verb
        assert not [n for n in tree.body if isinstance(n, ast.ClassDef)], verb


def test_tests_share_code_through_helpers_not_through_each_other() -> None:
    """A test module imported by another runs its module-level code and fixtures twice and
    ties the two together: shared code lives in helpers.py, fake_node.py or conftest.py."""
    offenders = {}
    for path in Path(__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        offenders[path.name] = sorted(n for n in names if n.split(".")[0].startswith("test_"))
    assert {k: v for k, v in offenders.items() if v} == {}


BENCH = PACKAGE.parent / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("bench_*.py")))
def test_bench_script_starts(script: str) -> None:
    """Benchmarks run by hand, not in CI: each must at least import what it uses (a name moved
    between bench modules once left bench_compressors.py unable to start)."""
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
