"""Bulk OCR of document scans: pages in, transcriptions and error rates out.

- `expand_document` is the decode hook (`Task.expand`): PDFs render page by page with pdfium
  (`pypdfium2`) at `--dpi`, the long edge capped at `--max-long-edge` pixels; multi-page TIFFs
  give one row per page; PNG / JPEG / single-page TIFF give page 0. Grey and bilevel scans are
  converted to RGB by decode like any other image. Pages are numbered from 0. A document that
  cannot be opened (broken or password-protected PDF, unreadable file) becomes one error row
  with a null `page`; a single page that fails to render becomes an error row for that page
  while the other pages of the document are still read.
- `read_ground_truth` reads an optional manifest (`id`, `page`, `text`); `score_pages` (the
  task's `finalize`) adds per-page character and word error rates, computed with rapidfuzz's
  Levenshtein distance; `summarize` aggregates a whole output for the job's summary table.

Error rates compare texts after Unicode NFC normalisation and collapsing every run of white
space (newlines included) to one space; case and punctuation count. CER = character edits /
reference characters, WER = word edits / reference words (words split on white space). A page
with an empty reference has null rates (its edits still count in the corpus figures).
"""

from __future__ import annotations

import functools
import io
import logging
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
from PIL import Image

from pipeline.columns import schema_fields
from pipeline.decode import DecodeConfig, check_pixels, open_image
from pipeline.inputs import read_table_file
from pipeline.predict import PREDICT_EXTRA_FIELDS
from pipeline.tasks import Report, Task

logger = logging.getLogger(__name__)

OCR_PROMPT = (
    "Transcribe all of the text in this image exactly as it is written, in reading order. "
    "Reply with the text only."
)
DOCUMENT_EXTENSIONS = (".pdf", ".tif", ".tiff", ".png", ".jpg", ".jpeg")
DEFAULT_DPI = 150.0
DEFAULT_MAX_LONG_EDGE = 2048  # rendered pixels; the model sees 1008 px anyway
PDF_MAGIC = b"%PDF-"

SCORE_FIELDS = schema_fields(ground_truth=pa.string(), cer=pa.float64(), wer=pa.float64(),
                             char_edits=pa.int64(), ref_chars=pa.int64(),
                             word_edits=pa.int64(), ref_words=pa.int64())
# What the OCR report reads back from a finished output.
SUMMARY_COLUMNS = ("id", "page", "error", "error_stage", "generated_tokens", "cer", "wer",
                   "char_edits", "ref_chars", "word_edits", "ref_words")
OCR_FIELDS = (pa.field("page", pa.int32()), *SCORE_FIELDS, *PREDICT_EXTRA_FIELDS)


@dataclass(frozen=True)
class RenderConfig:
    dpi: float = DEFAULT_DPI
    max_long_edge: int = DEFAULT_MAX_LONG_EDGE

    def __post_init__(self) -> None:
        if not self.dpi > 0:
            raise ValueError(f"--dpi must be positive, got {self.dpi}")
        if self.max_long_edge < 1:
            raise ValueError(f"--max-long-edge must be >= 1, got {self.max_long_edge}")

    def scale(self, width_pt: float, height_pt: float) -> float:
        """pdfium scale (pixels per point): `dpi / 72`, lowered so the long edge fits."""
        return min(self.dpi / 72.0, self.max_long_edge / max(width_pt, height_pt, 1e-6))


# --------------------------------------------------------------------------------------------
# decode hook


def is_pdf(data: bytes) -> bool:
    return PDF_MAGIC in data[:1024]  # the header may follow some junk bytes


def render_pdf(data: bytes, render: RenderConfig, max_pixels: int
               ) -> Iterator[tuple[int, Image.Image | Exception]]:
    """(page, RGB image) per page; a page that fails gives (page, exception). Opening the
    document raises (broken, encrypted with a user password): the caller's error row."""
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(data)
    try:
        for index in range(len(pdf)):
            try:
                page = pdf[index]
                try:
                    width_pt, height_pt = page.get_size()
                    scale = render.scale(width_pt, height_pt)
                    check_pixels((round(width_pt * scale), round(height_pt * scale)), max_pixels)
                    bitmap = page.render(scale=scale)
                    image = bitmap.to_pil().convert("RGB")  # a copy: the bitmap is freed below
                    bitmap.close()
                finally:
                    page.close()
            except Exception as exc:  # noqa: BLE001 - this page's error row
                yield index, exc
                continue
            yield index, image
    finally:
        pdf.close()


def expand_document(data: bytes, uri: str, config: DecodeConfig, render: RenderConfig
                    ) -> Iterator[tuple[int, Image.Image | Exception]]:
    """`Task.expand` hook for documents (bind `render` with `functools.partial`)."""
    if is_pdf(data):
        yield from render_pdf(data, render, config.max_pixels)
        return
    try:
        img = Image.open(io.BytesIO(data))
        frames = getattr(img, "n_frames", 1)
    except Exception:  # noqa: BLE001 - let open_image decide (tifffile fallback, or raise)
        frames = 1
    if frames == 1:
        yield 0, open_image(data, config.max_pixels)
        return
    for index in range(frames):
        try:
            img.seek(index)
            check_pixels(img.size, config.max_pixels)
            frame = img.copy()
            frame.load()
        except Exception as exc:  # noqa: BLE001 - this page's error row
            yield index, exc
            continue
        yield index, frame


# --------------------------------------------------------------------------------------------
# error rates


def normalize_text(text: str) -> str:
    """NFC, every white-space run to one space, stripped."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip()


def error_counts(hypothesis: str, reference: str) -> dict[str, int]:
    """Levenshtein edits (rapidfuzz) between normalised texts, by characters and by words."""
    from rapidfuzz.distance import Levenshtein

    hyp, ref = normalize_text(hypothesis), normalize_text(reference)
    return {
        "char_edits": Levenshtein.distance(ref, hyp),
        "ref_chars": len(ref),
        "word_edits": Levenshtein.distance(ref.split(), hyp.split()),
        "ref_words": len(ref.split()),
    }


def rate(edits: int, total: int) -> float | None:
    return edits / total if total else None


def cer(hypothesis: str, reference: str) -> float | None:
    counts = error_counts(hypothesis, reference)
    return rate(counts["char_edits"], counts["ref_chars"])


def wer(hypothesis: str, reference: str) -> float | None:
    counts = error_counts(hypothesis, reference)
    return rate(counts["word_edits"], counts["ref_words"])


# --------------------------------------------------------------------------------------------
# ground truth and scoring


def read_ground_truth(uri: str) -> dict[tuple[str, int], str]:
    """`(id, page) -> text` from a Parquet / CSV / JSONL manifest with `id`, `page`, `text`."""
    table = read_table_file(uri, ("id", "text"), "--ground-truth")
    missing = [c for c in ("id", "page", "text") if c not in table.column_names]
    if missing:
        raise ValueError(f"--ground-truth {uri!r}: missing column(s) {missing}, "
                         f"has {table.column_names}")
    truths: dict[tuple[str, int], str] = {}
    ids = table.column("id").cast(pa.string()).to_pylist()
    pages = table.column("page").cast(pa.int64()).to_pylist()
    texts = table.column("text").cast(pa.string()).to_pylist()
    for doc, page, text in zip(ids, pages, texts):
        if doc is None or page is None:
            raise ValueError(f"--ground-truth {uri!r}: 'id' and 'page' must not be empty")
        key = (doc, int(page))
        if key in truths:
            raise ValueError(f"--ground-truth {uri!r}: duplicate entry for id {doc!r} page {page}")
        truths[key] = text or ""
    return truths


def score_pages(batch: pa.Table, truths: dict[tuple[str, int], str] | None = None) -> pa.Table:
    """`finalize`: the ground truth and error rates of each page that has one (else nulls).
    Rows without an answer (errors) get their ground truth but no rates."""
    values: dict[str, list] = {f.name: [] for f in SCORE_FIELDS}
    ids = batch.column("id").to_pylist()
    pages = batch.column("page").to_pylist() if "page" in batch.column_names else [0] * len(ids)
    answers = batch.column("answer").to_pylist()
    for doc, page, answer in zip(ids, pages, answers):
        truth = None if page is None or not truths else truths.get((doc, int(page)))
        counts = error_counts(answer, truth) if truth is not None and answer is not None else {}
        values["ground_truth"].append(truth)
        values["cer"].append(rate(counts["char_edits"], counts["ref_chars"]) if counts else None)
        values["wer"].append(rate(counts["word_edits"], counts["ref_words"]) if counts else None)
        for name in ("char_edits", "ref_chars", "word_edits", "ref_words"):
            values[name].append(counts.get(name))
    for field in SCORE_FIELDS:
        if field.name in batch.column_names:
            batch = batch.drop_columns([field.name])
        batch = batch.append_column(field, pa.array(values[field.name], field.type))
    return batch


def ocr_task(render: RenderConfig | None = None,
             truths: dict[tuple[str, int], str] | None = None) -> Task:
    """The OCR task: one row per page, keyed on (`id`, `page`)."""
    return Task(
        name="ocr",
        default_prompt=OCR_PROMPT,
        extra_fields=OCR_FIELDS,
        expand=functools.partial(expand_document, render=render or RenderConfig()),
        finalize=functools.partial(score_pages, truths=truths or {}),
        key_columns=("id", "page"),
        extensions=DOCUMENT_EXTENSIONS,
        report=Report(name="ocr_summary", title="OCR summary", columns=SUMMARY_COLUMNS,
                      summarize=functools.partial(summarize, truths=truths),
                      rows=summary_rows, markdown=format_markdown),
    )


# --------------------------------------------------------------------------------------------
# summary


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(table: pa.Table, truths: dict[tuple[str, int], str] | None = None) -> dict:
    """Figures over every row of an OCR output (all runs, not only the last)."""
    rows = table.to_pylist()
    ok = [r for r in rows if r["error"] is None]
    errors: dict[str, int] = {}
    for r in rows:
        if r["error_stage"] is not None:
            errors[r["error_stage"]] = errors.get(r["error_stage"], 0) + 1
    scored = [r for r in rows if r.get("char_edits") is not None]
    char_edits = sum(r["char_edits"] for r in scored)
    ref_chars = sum(r["ref_chars"] for r in scored)
    word_edits = sum(r["word_edits"] for r in scored)
    ref_words = sum(r["ref_words"] for r in scored)
    written = {(r["id"], r["page"]) for r in ok}
    summary = {
        "documents": len({r["id"] for r in rows}),
        "pages": len(rows),
        "pages_ok": len(ok),
        "errors_by_stage": dict(sorted(errors.items())),
        "documents_with_errors": len({r["id"] for r in rows if r["error"] is not None}),
        "generated_tokens": sum(r["generated_tokens"] or 0 for r in ok),
        "ground_truth_pages": len(truths) if truths else 0,
        "pages_scored": len(scored),
        "ground_truth_pages_unanswered": len(set(truths) - written) if truths else 0,
        "cer": rate(char_edits, ref_chars),
        "wer": rate(word_edits, ref_words),
        "mean_page_cer": _mean([r["cer"] for r in scored]),
        "mean_page_wer": _mean([r["wer"] for r in scored]),
        "char_edits": char_edits,
        "ref_chars": ref_chars,
        "word_edits": word_edits,
        "ref_words": ref_words,
    }
    per_doc: dict[str, dict] = {}
    for r in rows:
        d = per_doc.setdefault(r["id"], {"pages": 0, "errors": 0, "char_edits": 0,
                                         "ref_chars": 0, "word_edits": 0, "ref_words": 0})
        d["pages"] += 1
        d["errors"] += r["error"] is not None
        if r.get("char_edits") is not None:
            for k in ("char_edits", "ref_chars", "word_edits", "ref_words"):
                d[k] += r[k]
    summary["documents_detail"] = {
        doc: {"pages": d["pages"], "errors": d["errors"],
              "cer": rate(d["char_edits"], d["ref_chars"]),
              "wer": rate(d["word_edits"], d["ref_words"])}
        for doc, d in sorted(per_doc.items())
    }
    return summary


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    errors = ", ".join(f"{k}={v}" for k, v in summary["errors_by_stage"].items()) or "none"
    rows = [
        ("documents", str(summary["documents"])),
        ("pages (rows)", str(summary["pages"])),
        ("pages ok", str(summary["pages_ok"])),
        ("error rows", f"{sum(summary['errors_by_stage'].values())} ({errors})"),
        ("generated tokens", str(summary["generated_tokens"])),
    ]
    if summary["ground_truth_pages"]:
        rows += [
            ("ground-truth pages", str(summary["ground_truth_pages"])),
            ("pages scored", str(summary["pages_scored"])),
            ("ground-truth pages unanswered", str(summary["ground_truth_pages_unanswered"])),
            ("CER (corpus)", _fmt(summary["cer"])),
            ("WER (corpus)", _fmt(summary["wer"])),
            ("CER (mean of pages)", _fmt(summary["mean_page_cer"])),
            ("WER (mean of pages)", _fmt(summary["mean_page_wer"])),
        ]
    return rows


MAX_MARKDOWN_DOCUMENTS = 100


def format_markdown(summary: dict, title: str = "OCR summary") -> str:
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(summary)]
    docs = list(summary["documents_detail"].items())
    lines += ["", "| document | pages | errors | CER | WER |", "|---|---|---|---|---|"]
    for doc, d in docs[:MAX_MARKDOWN_DOCUMENTS]:
        lines.append(f"| {doc} | {d['pages']} | {d['errors']} | {_fmt(d['cer'])} "
                     f"| {_fmt(d['wer'])} |")
    if len(docs) > MAX_MARKDOWN_DOCUMENTS:
        lines.append(f"\n({len(docs) - MAX_MARKDOWN_DOCUMENTS} more documents in the JSON)")
    return "\n".join(lines) + "\n"
