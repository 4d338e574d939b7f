"""The house rules of docs/architecture.md, checked on the source: no import cycle between our modules (imports
inside functions count: a lazy import that only hides a cycle is still one), and the layers point one way:
data_shards imports nothing of ours, trainer nothing of tune, deploy or bench."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("data_shards", "trainer", "tune", "deploy")
# what each package may import of ours (besides itself)
ALLOWED = {"data_shards": set(), "trainer": {"data_shards"}, "tune": {"data_shards", "trainer"},
           "deploy": {"data_shards", "trainer"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Our modules that `path` imports anywhere in the file (top level or inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            if target in modules and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p) for p in files}
    graph = {module_name(p): imports_of(p, modules) for p in files}
    for mod in graph:  # a package's __init__ is not an edge target of its own modules
        graph[mod] = {t for t in graph[mod] if not (mod.startswith(t + ".") and t in PACKAGES)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_anywhere():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_layers_point_one_way():
    wrong = [f"{mod} imports {target}" for mod, targets in import_graph().items() for target in targets
             if target.split(".")[0] != mod.split(".")[0]
             and target.split(".")[0] not in ALLOWED[mod.split(".")[0]]]
    assert not wrong, "imports against the layering: " + "; ".join(sorted(wrong))


def test_the_checker_sees_a_cycle_and_a_lazy_import(tmp_path, monkeypatch):
    """The checker itself: a cycle closed by an import inside a function is found; a chain is not a cycle."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from trainer import weights\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert imports_of(src, {"trainer.weights", "trainer", "trainer.files"}) == {"trainer", "trainer.weights"}
