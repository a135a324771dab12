"""The import graph of ``tg_kernels/``, read from the source (no import is executed).

Used by ``tests/test_architecture.py`` (no cycles, no private names across modules, the diagram in
``docs/architecture.md`` up to date) and runnable to refresh that diagram::

    python tests/import_graph.py --write
"""

from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tg_kernels"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
BEGIN, END = "<!-- import-graph:begin -->", "<!-- import-graph:end -->"


@dataclass
class ImportGraph:
    modules: dict[str, Path]
    edges: dict[str, set[str]] = field(default_factory=dict)
    private: list[tuple[str, str, str]] = field(default_factory=list)  # (importer, module, name)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_graph() -> ImportGraph:
    """Every ``tg_kernels`` import of every module, wherever it sits (lazy imports count too)."""
    modules = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph = ImportGraph(modules)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = graph.edges.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.split(".")[0] == "tg_kernels")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] != "tg_kernels":
                    continue
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    if submodule in modules:
                        targets.add(submodule)
                        continue
                    targets.add(source)
                    if alias.name.startswith("_") and source != name:
                        graph.private.append((name, source, alias.name))
        targets.discard(name)
    return graph


def cycles(graph: ImportGraph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.edges.get(v, ())):
            if w not in graph.modules:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph.modules:
        if v not in index:
            visit(v)
    return found


def _is_package(graph: ImportGraph, name: str) -> bool:
    return graph.modules[name].name == "__init__.py"


def mermaid(graph: ImportGraph) -> str:
    """A Mermaid diagram of module -> module imports, one box per package.

    Package ``__init__`` modules only re-export, so they and the edges into them are left out.
    """
    shown = sorted(n for n in graph.modules if not _is_package(graph, n))
    ids = {n: n.removeprefix("tg_kernels.").replace(".", "_") or "tg_kernels" for n in shown}
    by_package: dict[str, list[str]] = {}
    for n in shown:
        by_package.setdefault(n.rpartition(".")[0], []).append(n)
    lines = ["```mermaid", "flowchart LR"]
    for package, members in sorted(by_package.items()):
        lines.append(f'  subgraph {package.replace(".", "_")}["{package}"]')
        lines.extend(f'    {ids[n]}["{n.rpartition(".")[2]}"]' for n in members)
        lines.append("  end")
    for n in shown:
        lines.extend(f"  {ids[n]} --> {ids[t]}" for t in sorted(graph.edges.get(n, ())) if t in ids)
    lines.append("```")
    return "\n".join(lines)


def diagram_block(graph: ImportGraph) -> str:
    return f"{BEGIN}\n{mermaid(graph)}\n{END}"


def documented_block(text: str) -> str:
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[start:end]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="refresh the diagram in docs/architecture.md")
    args = parser.parse_args()
    graph = read_graph()
    for component in cycles(graph):
        print("cycle:", " <-> ".join(component))
    for importer, module, name in graph.private:
        print(f"private import: {importer} imports {name} from {module}")
    if args.write:
        text = ARCHITECTURE.read_text()
        ARCHITECTURE.write_text(text.replace(documented_block(text), diagram_block(graph)))
        print(f"wrote {ARCHITECTURE.relative_to(ROOT)}")
    else:
        print(mermaid(graph))


if __name__ == "__main__":
    main()
