"""MkDocs hook: publish the committed benchmark results (plots, CSV) under ``results/`` in the site.

The results live once, in ``bench/results/``, where the benchmarks write them; the docs pages link
to them as ``results/<device>/<file>``.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

_RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
_PUBLISHED = {".png", ".svg", ".csv", ".json", ".jsonl"}


def on_files(files: Files, config) -> Files:
    for path in sorted(_RESULTS.rglob("*")):
        if path.suffix in _PUBLISHED and "tmp" not in path.relative_to(_RESULTS).parts:
            uri = "results/" + path.relative_to(_RESULTS).as_posix()
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
