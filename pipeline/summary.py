"""The run summary: counts from the writes, as a table for people and JSON beside the
Parquet files (`<output>/_summary.json`) for machines."""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.resume import SUMMARY_NAME
from pipeline.storage import open_fs, retrying, to_uri


@dataclass
class RunSummary:
    task: str
    model: str
    output: str
    rows_listed: int  # inputs found (after --limit)
    rows_skipped: int  # already in the output (resume)
    rows_written: int  # rows written by this run
    rows_ok: int
    errors_by_stage: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    images_per_s: float = 0.0
    mean_selected_frac: float | None = None  # over this run's rows without error
    files_written: int = 0
    started_at: str = ""

    @classmethod
    def from_stats(cls, stats: dict[str, Any], *, elapsed_s: float, **fields) -> RunSummary:
        count = stats.get("selected_frac_count", 0)
        return cls(
            rows_written=stats.get("rows", 0),
            rows_ok=stats.get("rows_ok", 0),
            errors_by_stage=dict(sorted(stats.get("errors_by_stage", {}).items())),
            elapsed_s=round(elapsed_s, 3),
            images_per_s=round(stats.get("rows", 0) / elapsed_s, 3) if elapsed_s > 0 else 0.0,
            mean_selected_frac=stats["selected_frac_sum"] / count if count else None,
            files_written=len(stats.get("files", [])),
            **fields,
        )

    @property
    def errors(self) -> int:
        return sum(self.errors_by_stage.values())

    def failure(self, max_error_fraction: float = 1.0) -> str | None:
        """Why this run counts as failed, or None: every row it wrote is an error row, or
        more than `max_error_fraction` of them are (a run that wrote nothing has not
        failed: everything was already written)."""
        if not self.rows_written:
            return None
        stages = ", ".join(f"{k}={v}" for k, v in self.errors_by_stage.items())
        if self.errors >= self.rows_written:
            return f"all {self.rows_written} rows written by this run are errors ({stages})"
        fraction = self.errors / self.rows_written
        if fraction > max_error_fraction:
            return (f"{self.errors} of {self.rows_written} rows written by this run are errors"
                    f" ({fraction:.1%}; {stages}), above --max-error-fraction"
                    f" {max_error_fraction:g}")
        return None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    def write(self) -> str:
        """Write `_summary.json` beside the Parquet files; returns its URI."""
        fs, root = open_fs(self.output)
        path = posixpath.join(root, SUMMARY_NAME)

        def write() -> None:
            fs.makedirs(root, exist_ok=True)
            with fs.open(path, "w") as f:
                f.write(self.to_json())

        retrying(f"write {to_uri(fs, path)}", write)
        return to_uri(fs, path)

    def format_table(self) -> str:
        frac = "-" if self.mean_selected_frac is None else f"{self.mean_selected_frac:.4f}"
        errors = ", ".join(f"{k}={v}" for k, v in self.errors_by_stage.items()) or "none"
        rows = [
            ("task", self.task),
            ("model", self.model),
            ("output", self.output),
            ("inputs listed", str(self.rows_listed)),
            ("skipped (already written)", str(self.rows_skipped)),
            ("rows written", str(self.rows_written)),
            ("rows ok", str(self.rows_ok)),
            ("errors", f"{self.errors} ({errors})"),
            ("elapsed", f"{self.elapsed_s:.1f} s"),
            ("images/s", f"{self.images_per_s:.3f}"),
            ("mean selected fraction", frac),
            ("files written", str(self.files_written)),
        ]
        width = max(len(k) for k, _ in rows)
        rule = "-" * (width + 2 + max(len(v) for _, v in rows))
        lines = ["run summary", rule] + [f"{k:<{width}}  {v}" for k, v in rows] + [rule]
        return "\n".join(lines)
