"""The dependency runs one way: synthhr uses flexattn, and nothing in flexattn/ or pipeline/
imports synthhr (read from every file's import statements with ast, not by importing)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_flexattn_and_pipeline_never_import_synthhr():
    files = sorted([*(ROOT / "flexattn").rglob("*.py"), *(ROOT / "pipeline").rglob("*.py")])
    assert len(files) > 20
    offenders = {str(f.relative_to(ROOT)): sorted(m for m in imported_modules(f)
                                                  if m == "synthhr" or m.startswith("synthhr."))
                 for f in files}
    assert {f: m for f, m in offenders.items() if m} == {}


def test_the_import_reader_sees_every_form(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import synthhr.task\nfrom synthhr import train\n"
                 "def g():\n    from synthhr.data import Sample\n")
    found = imported_modules(f)
    assert {"synthhr.task", "synthhr", "synthhr.data"} <= found
