"""Task reports: a job's own summary (accuracy, error rates) as a printed table, and as JSON
and Markdown beside the Parquet files (`<output>/_<name>.json`, `<output>/_<name>.md`; the
leading `_` keeps Parquet readers and resume away from them)."""

from __future__ import annotations

import json
import posixpath

from pipeline.storage import open_fs, to_uri


def format_table(title: str, rows: list[tuple[str, str]]) -> str:
    """Two aligned columns between rules, like `RunSummary.format_table`."""
    width = max(len(k) for k, _ in rows)
    rule = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([title, rule, *(f"{k:<{width}}  {v}" for k, v in rows), rule])


def write_report(output: str, name: str, summary: dict, markdown: str) -> tuple[str, str]:
    """Write `_<name>.json` and `_<name>.md` under `output`; returns their URIs."""
    fs, root = open_fs(output)
    fs.makedirs(root, exist_ok=True)
    uris = []
    for suffix, text in ((".json", json.dumps(summary, indent=2) + "\n"), (".md", markdown)):
        path = posixpath.join(root, f"_{name}{suffix}")
        with fs.open(path, "w") as f:
            f.write(text)
        uris.append(to_uri(fs, path))
    return uris[0], uris[1]
