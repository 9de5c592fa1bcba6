"""jobs/ocr_documents.py on a real local Ray with the tiny demo model: PDFs (several pages, one
page too large, broken, password-protected), a multi-page bilevel TIFF, PNG and JPEG; one row
per page, error rows, CER/WER against a ground-truth manifest, resume, overlays."""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.ocr_documents import main, parse_config
from pipeline.ocr import error_counts
from tests.pipeline.test_ocr import pdf_bytes, tiff_bytes

TRUTH = {("report.pdf", 0): "Page 1 of the test document",
         ("report.pdf", 2): "Page 3 of the test document",
         ("scan.tif", 1): "INVOICE\n2041",
         ("grey.png", 0): "receipt"}


def _documents(root):
    root.mkdir()
    (root / "report.pdf").write_bytes(pdf_bytes([(612, 792), (612, 792), (792, 612)]))
    (root / "poster.pdf").write_bytes(pdf_bytes([(300, 400), (3000, 3000)]))  # page 1 too big
    (root / "broken.pdf").write_bytes(b"%PDF-1.7\n1 0 obj << broken")
    (root / "locked.pdf").write_bytes(pdf_bytes([(300, 300)], encrypt=True))
    (root / "scan.tif").write_bytes(tiff_bytes(("1", "1", "L")))
    Image.new("L", (500, 300), 230).save(root / "grey.png")
    Image.new("RGB", (400, 600), (200, 190, 180)).save(root / "photo.jpg")
    (root / "notes.txt").write_text("not a document")  # not listed
    truth = root.parent / "truth.jsonl"
    truth.write_text("\n".join(json.dumps({"id": d, "page": p, "text": t})
                               for (d, p), t in TRUTH.items()))
    return truth


EXPECTED_ROWS = {  # (id, page) -> error stage
    ("report.pdf", 0): None, ("report.pdf", 1): None, ("report.pdf", 2): None,
    ("poster.pdf", 0): None, ("poster.pdf", 1): "decode",
    ("broken.pdf", None): "decode", ("locked.pdf", None): "decode",
    ("scan.tif", 0): None, ("scan.tif", 1): None, ("scan.tif", 2): None,
    ("grey.png", 0): None, ("photo.jpg", 0): None,
}


def test_ocr_job_pages_errors_scores_resume_and_overlays(ray_local, demo_model, tmp_path,
                                                         capsys):
    truth = _documents(tmp_path / "docs")
    out = tmp_path / "out"
    argv = ["--input", str(tmp_path / "docs"), "--output", str(out), "--model", str(demo_model),
            "--ground-truth", str(truth), "--max-new-tokens", "3", "--batch-size", "3",
            "--dpi", "72", "--max-long-edge", "10000", "--max-pixels", "4000000",
            "--memory-per-actor-gb", "0.5", "--save-overlays", "2", "--decode-rows-per-task", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    table = pq.read_table(out)
    rows = {(r["id"], r["page"]): r for r in table.to_pylist()}
    assert len(rows) == table.num_rows == len(EXPECTED_ROWS)  # one row per page, once
    assert {k: r["error_stage"] for k, r in rows.items()} == EXPECTED_ROWS
    assert "PdfiumError" in rows[("locked.pdf", None)]["error"]
    assert "ImageTooLargeError" in rows[("poster.pdf", 1)]["error"]
    for key, r in rows.items():
        if EXPECTED_ROWS[key] is None:
            assert r["answer"] is not None and r["generated_tokens"] >= 1, key
            assert len(r["hr_cells"]) == 81 and len(r["selection_map"]) == 576
            assert r["task"] == "ocr" and "Transcribe" in r["prompt"]
    # Page sizes: a 612x792 pt page at 72 dpi, a landscape third page, TIFF frames, images.
    assert (rows[("report.pdf", 0)]["width"], rows[("report.pdf", 0)]["height"]) == (612, 792)
    assert (rows[("report.pdf", 2)]["width"], rows[("report.pdf", 2)]["height"]) == (792, 612)
    assert rows[("scan.tif", 2)]["width"] == 320 and rows[("photo.jpg", 0)]["height"] == 600

    # Error rates: each scored page's figures are its own transcript pair's.
    scored = {k: r for k, r in rows.items() if r["cer"] is not None}
    assert set(scored) == set(TRUTH)
    for key, r in scored.items():
        counts = error_counts(r["answer"], TRUTH[key])
        assert r["ground_truth"] == TRUTH[key]
        assert r["cer"] == pytest.approx(counts["char_edits"] / counts["ref_chars"])
        assert r["wer"] == pytest.approx(counts["word_edits"] / counts["ref_words"])
    summary = json.loads((out / "_ocr_summary.json").read_text())
    assert (summary["documents"], summary["pages"], summary["pages_ok"]) == (7, 12, 9)
    assert summary["errors_by_stage"] == {"decode": 3}
    assert summary["pages_scored"] == 4 and summary["ground_truth_pages_unanswered"] == 0
    edits = sum(r["char_edits"] for r in scored.values())
    chars = sum(len(TRUTH[k].replace("\n", " ")) for k in scored)
    assert summary["cer"] == pytest.approx(edits / chars)
    assert re.search(rf"CER \(corpus\) +{summary['cer']:.4f}", printed)
    assert "| report.pdf | 3 | 0 |" in (out / "_ocr_summary.md").read_text()

    overlays = sorted(p.name for p in (out / "_overlays").iterdir())
    assert overlays == ["grey.png_p0.png", "photo.jpg_p0.png"]  # first two answered, by id
    assert Image.open(out / "_overlays" / "photo.jpg_p0.png").size == (400, 600)

    # Rerun: every page (error rows included) is already written.
    assert main(argv[:-2] + ["--save-overlays", "0"]) == 0
    again = pq.read_table(out)
    assert again.num_rows == len(EXPECTED_ROWS)
    run_summary = json.loads((out / "_summary.json").read_text())
    assert run_summary["rows_written"] == 0


def test_ocr_flags(tmp_path):
    config, _ = parse_config(["--dpi", "200", "--max-long-edge", "1600"])
    assert config.task.name == "ocr" and config.max_new_tokens == 512
    assert config.decode_rows_per_task == 1
    assert config.task.report.summarize.keywords["truths"] is None
    assert config.task.expand.keywords["render"].dpi == 200


@pytest.mark.parametrize("argv,flag", [
    (["--dpi", "0"], "--dpi"), (["--max-long-edge", "-5"], "--max-long-edge"),
    (["--batch-size", "0"], "--batch-size"), (["--ground-truth", "/no/such.jsonl"], "such"),
    (["--save-overlays", "-1"], "--save-overlays"),
])
def test_bad_ocr_flags_exit_2(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(argv)
    assert exc.value.code == 2 and flag in capsys.readouterr().err
