"""The package's layering (docs/architecture.md): no import cycles, and no import from a higher layer into a lower one.

Imports are read with `ast` from every module, including function-level and `TYPE_CHECKING` imports, so a lazy
import cannot hide a cycle. The layer order is written once, here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qwenkit"

# Lowest first. A module may import its own subpackage and any subpackage of a lower layer; subpackages that
# share a layer are independent of each other. "" is qwenkit/__init__.py and __main__.py: the public API on top.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("tokenizer", "kernels"),
    ("generation",),
    ("model",),
    ("quant",),
    ("checkpoints",),
    ("bench", "server", "eval", "train"),
    ("cli",),
    ("",),
)
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The qwenkit modules `name` imports anywhere in its source (resolved to existing modules)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from pkg import sub` imports the submodule when there is one, else a name from pkg.
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("qwenkit") and target != name:
                found.add(target)
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_subpackage_has_a_layer():
    unknown = sorted({_layer(m) for m in _modules()} - set(LEVEL) - {"__main__"})
    assert not unknown, f"add {unknown} to LAYERS (and to docs/architecture.md)"


def test_no_import_from_a_higher_layer():
    bad = []
    for module, targets in _graph().items():
        own = _layer(module)
        own_level = LEVEL[own if own != "__main__" else ""]
        for target in targets:
            other = _layer(target)
            if other != own and LEVEL[other] >= own_level:
                bad.append(f"{module} -> {target}")
    assert not bad, "imports that go up or sideways between layers:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("source", ["from . import b", "from .b import x", "from ..model import y"])
def test_the_walker_sees_relative_imports(tmp_path, monkeypatch, source):
    # A fake package: qwenkit/sub/a.py imports `source`; the walker must resolve it to a module.
    root = tmp_path / "qwenkit"
    (root / "sub").mkdir(parents=True)
    (root / "model").mkdir()
    for f in ("__init__.py", "sub/__init__.py", "sub/b.py", "model/__init__.py"):
        (root / f).write_text("")
    (root / "sub" / "a.py").write_text(f"def f():\n    {source}\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", root)
    found = _imports("qwenkit.sub.a", root / "sub" / "a.py", _modules())
    assert found == ({"qwenkit.model"} if "model" in source else {"qwenkit.sub.b"})
