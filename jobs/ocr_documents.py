"""Bulk OCR of document scans (PDF, multi-page TIFF, PNG, JPEG) with LLaVA-FlexAttn on Ray Data.

PDFs render page by page (pdfium) at --dpi with the long edge capped at --max-long-edge;
multi-page TIFFs give one row per page; every row carries `page` (from 0) and the
transcription in `answer`. With --ground-truth (a manifest with id, page, text) each page gets
its character and word error rates (`cer`, `wer`) and the summary their totals. Broken or
password-protected PDFs and unreadable pages become error rows.

    python jobs/ocr_documents.py                 # the demo: samples/documents, tiny model
    python jobs/ocr_documents.py --ground-truth samples/documents/ground_truth.jsonl
    ray job submit --working-dir . -- python jobs/ocr_documents.py \\
        --input s3://bucket/scans/ --output s3://bucket/ocr/ --model s3://bucket/models/7b

Prints the run summary and an OCR summary, also written as OUTPUT/_ocr_summary.json and .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # a plain checkout, not pip-installed
    sys.path.insert(0, str(REPO))

from jobs.common import finish, job_config, job_parser, start
from pipeline import JobConfig, run
from pipeline.ocr import (
    DEFAULT_DPI,
    DEFAULT_MAX_LONG_EDGE,
    OCR_PROMPT,
    RenderConfig,
    ocr_task,
    read_ground_truth,
)

DEFAULT_INPUT = str(REPO / "samples" / "documents")
DEFAULT_OUTPUT = "outputs/ocr_documents"


def build_parser() -> argparse.ArgumentParser:
    p = job_parser(
        "ocr_documents.py", __doc__, default_input=DEFAULT_INPUT, default_output=DEFAULT_OUTPUT,
        input_help="folder, glob, s3:// or gs:// prefix, document file, or manifest "
                   "(.parquet/.csv/.jsonl with id, image_uri) of PDF/TIFF/PNG/JPEG files",
        prompt_help=f"transcription prompt (default: {OCR_PROMPT!r})",
        max_new_tokens=512, decode_rows_per_task=1,
    )
    p.add_argument("--dpi", type=float, default=DEFAULT_DPI,
                   help="PDF rendering resolution (default: %(default)s)")
    p.add_argument("--max-long-edge", type=int, default=DEFAULT_MAX_LONG_EDGE,
                   help="cap on a rendered PDF page's long edge in pixels; the DPI is lowered "
                        "to fit (default: %(default)s)")
    p.add_argument("--ground-truth", default=None,
                   help="manifest (.parquet/.csv/.jsonl) with id, page (from 0), text: adds "
                        "per-page CER/WER and their totals")
    return p


def parse_config(argv: list[str] | None = None) -> tuple[JobConfig, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        render = RenderConfig(dpi=args.dpi, max_long_edge=args.max_long_edge)
        truths = read_ground_truth(args.ground_truth) if args.ground_truth else None
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    return job_config(parser, args, ocr_task(render, truths)), args


def main(argv: list[str] | None = None) -> int:
    config, args = parse_config(argv)
    start(args)
    return finish(config, args, run(config))


if __name__ == "__main__":
    sys.exit(main())
