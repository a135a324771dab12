"""The package's shape: an import graph without cycles, no private names across modules, docs that match."""

from __future__ import annotations

import re
from pathlib import Path

import import_graph

ROOT = Path(__file__).resolve().parents[1]


def test_import_graph_has_no_cycle():
    graph = import_graph.read_graph()
    assert graph.modules and any(graph.edges.values())  # the reader found the package and its imports
    assert import_graph.cycles(graph) == []


def test_no_module_imports_a_private_name_of_another():
    assert import_graph.read_graph().private == []


def test_cycle_finder_finds_a_cycle():
    graph = import_graph.ImportGraph({"a": Path("a.py"), "b": Path("b.py"), "c": Path("c.py")})
    graph.edges = {"a": {"b"}, "b": {"a", "c"}, "c": set()}
    assert import_graph.cycles(graph) == [["a", "b"]]


def test_architecture_page_shows_the_current_import_graph():
    text = import_graph.ARCHITECTURE.read_text()
    expected = import_graph.diagram_block(import_graph.read_graph())
    assert import_graph.documented_block(text) == expected, "run `python tests/import_graph.py --write`"


_SECTION_REFERENCE = re.compile(r"docs/([\w-]+\.md) §(\d+)")


def test_every_design_section_cited_in_the_code_exists():
    cited = []
    for path in [
        *ROOT.glob("tg_kernels/**/*.py"),
        *ROOT.glob("csrc/**/*.c*"),
        *ROOT.glob("bench/*.py"),
        *ROOT.glob("tests/*.py"),
    ]:
        cited += [(path, page, number) for page, number in _SECTION_REFERENCE.findall(path.read_text())]
    assert cited, "the code cites design sections; the pattern must find them"
    for path, page, number in cited:
        doc = ROOT / "docs" / page
        assert doc.exists(), f"{path} cites {page}, which does not exist"
        has_section = re.search(rf"^## {number}\. ", doc.read_text(), re.M)
        assert has_section, f"{path} cites {page} §{number}, which has no such section"
    assert "DESIGN.md" not in "".join(p.read_text() for p in ROOT.glob("tg_kernels/**/*.py"))
