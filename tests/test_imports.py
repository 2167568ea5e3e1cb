"""Imports go one way: no circle among tandem's own modules, whether the import is at the top of a
module or inside a function (an import inside a function is for an optional heavy extra, never to
dodge a circle). Importing `tandem.a.b` also runs `tandem/a/__init__.py`, so a package counts too."""

import ast
from pathlib import Path

import tandem

ROOT = Path(tandem.__file__).parent


def module_name(path: Path) -> str:
    parts = ("tandem",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str], top_level: bool = False) -> set[str]:
    """The tandem modules `path` imports anywhere in its body (`top_level`: only those importing it runs),
    with the packages each import runs."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in (ast.iter_child_nodes(tree) if top_level else ast.walk(tree)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import mod` imports the submodule; `from mod import name` the module itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import tandem.lm.base.x` style: its nearest module
                target = target.rpartition(".")[0]
            parts = target.split(".")
            found.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))  # packages run on the way
    return {m for m in found if m in modules and m != name and not name.startswith(m + ".")}


def graph(top_level: bool = False) -> dict[str, set[str]]:
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: imports_of(path, set(paths), top_level) for name, path in paths.items()}


def find_circle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle as a path (a -> b -> ... -> a), or None: depth-first search with colours."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (circle := visit(node)):
            return circle
    return None


def test_no_import_circle_among_tandems_modules():
    circle = find_circle(graph())
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_circle_finder_sees_function_level_imports_and_packages(tmp_path):
    """The check itself: a circle closed by an import inside a function, or through a package's
    __init__, is found; a one-way chain is not."""
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_circle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    modules = {"tandem", "tandem.x", "tandem.pkg", "tandem.pkg.y"}
    (tmp_path / "x.py").write_text("def f():\n    from .pkg.y import g\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "y.py").write_text("from .. import x\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert imports_of(tmp_path / "x.py", modules) == {"tandem.pkg", "tandem.pkg.y"}
        assert imports_of(tmp_path / "pkg" / "y.py", modules) == {"tandem.x"}
    finally:
        ROOT = saved


def test_training_imports_no_engine_and_reports_no_optimizer():
    """The layering the layout promises: engines lend a model and training imports none of them; the
    step kinds and the reports sit below the optimizers. What importing a module runs counts here (the
    LM factory `load_lm` imports the engine it is asked for when it is called)."""
    edges = graph(top_level=True)
    engines = {"tandem.lm.local", "tandem.lm.vllm", "tandem.lm.openai_server"}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    for module in [m for m in edges if m.startswith("tandem.training")]:
        assert not reach(module) & engines, f"{module} imports an engine"
    assert not {m for m in reach("tandem.lm.base")} & {m for m in edges if m.startswith("tandem.training")}
    for module in ("tandem.kinds", "tandem.report", "tandem.charts", "tandem.answers"):
        assert not {m for m in reach(module) if m.startswith("tandem.optimizers")}, f"{module} imports an optimizer"
