"""data_shards has no import cycle (function-level imports count too, so none can hide one) and imports
nothing of the trainer, tune, bench or deploy."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "data_shards"


def _imports(path: Path) -> set[str]:
    """Every module of data_shards and every top-level package that `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # from . import s3 / from .errors import DataError
                found.update([node.module] if node.module else [a.name for a in node.names])
            elif node.module.startswith("data_shards."):
                found.add(node.module.split(".")[1])
            else:
                found.add("<ext>" + node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update("<ext>" + a.name.split(".")[0] for a in node.names)
    return found


def test_no_cycles_and_no_arrow_up():
    modules = {p.stem: _imports(p) for p in PACKAGE.glob("*.py")}
    for name, deps in modules.items():
        assert not deps & {"<ext>trainer", "<ext>tune", "<ext>bench", "<ext>deploy"}, name
    graph = {name: {d for d in deps if d in modules} for name, deps in modules.items()}
    assert "manifest" not in graph["s3"] and graph["errors"] == set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join(path + (name,))}"
        for dep in graph[name]:
            visit(dep, path + (name,))

    for name in graph:
        visit(name, ())
