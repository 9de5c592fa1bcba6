"""OCR pieces without a cluster: page expansion, per-page error rows, error rates, scoring."""

from __future__ import annotations

import functools
import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.decode import DecodeConfig, decode_batch
from pipeline.ocr import (
    RenderConfig,
    cer,
    error_counts,
    expand_document,
    normalize_text,
    ocr_task,
    read_ground_truth,
    score_pages,
    summarize,
    wer,
)
from pipeline.resume import pending

SMALL = DecodeConfig(image_size=64)


def pdf_bytes(page_sizes, encrypt: bool = False) -> bytes:
    """A PDF with one line of text per page (fpdf2), sizes in points."""
    from fpdf import FPDF

    pdf = FPDF(unit="pt")
    pdf.set_font("Helvetica", size=24)
    for i, size in enumerate(page_sizes):
        pdf.add_page(format=size)
        pdf.cell(0, 40, f"Page {i + 1} of the test document")
    if encrypt:
        pdf.set_encryption(owner_password="owner", user_password="user")
    return bytes(pdf.output())


def tiff_bytes(modes=("1", "L", "1")) -> bytes:
    pages = []
    for i, mode in enumerate(modes):
        img = Image.new("L", (300 + 10 * i, 400), 255)
        img.paste(0, (20, 20 + 30 * i, 200, 40 + 30 * i))
        pages.append(img.convert(mode))
    buf = io.BytesIO()
    pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:])
    return buf.getvalue()


def expand(data, render=None, config=SMALL):
    return list(expand_document(data, "doc", config, render=render or RenderConfig()))


def test_pdf_pages_render_at_the_dpi_with_the_long_edge_capped():
    data = pdf_bytes([(612, 792), (792, 612), (1440, 720)])
    pages = expand(data, RenderConfig(dpi=72, max_long_edge=1000))
    assert [p for p, _ in pages] == [0, 1, 2]
    assert [im.size for _, im in pages] == [(612, 792), (792, 612), (1000, 500)]
    assert all(im.mode == "RGB" for _, im in pages)
    # The text made it onto the page: not a blank render.
    assert np.asarray(pages[0][1].convert("L")).min() < 100
    doubled = expand(data, RenderConfig(dpi=144, max_long_edge=5000))
    assert doubled[0][1].size == (1224, 1584)


def test_multi_page_tiff_gives_one_page_per_frame_including_bilevel():
    pages = expand(tiff_bytes())
    assert [p for p, _ in pages] == [0, 1, 2]
    assert [im.size for _, im in pages] == [(300, 400), (310, 400), (320, 400)]
    assert [im.mode for _, im in pages] == ["1", "L", "1"]


def test_single_images_are_page_zero():
    buf = io.BytesIO()
    Image.new("L", (50, 70), 200).save(buf, format="JPEG")
    [(page, img)] = expand(buf.getvalue())
    assert page == 0 and img.size == (50, 70)


@pytest.mark.parametrize("data,message", [
    (pdf_bytes([(300, 300)], encrypt=True), "password"),
    (b"%PDF-1.4\n this is not a PDF", "format"),
])
def test_encrypted_and_broken_pdfs_raise(data, message):
    with pytest.raises(Exception, match=message):
        expand(data)


def test_one_bad_page_is_an_error_row_and_the_others_decode(tmp_path):
    # Page 2 renders above --max-pixels; pages 1 and 3 are fine.
    doc = tmp_path / "mixed.pdf"
    doc.write_bytes(pdf_bytes([(300, 300), (3000, 3000), (300, 300)]))
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7\n\x00\x01 truncated")
    config = DecodeConfig(image_size=64, max_pixels=1_000_000, expand=functools.partial(
        expand_document, render=RenderConfig(dpi=72, max_long_edge=10_000)))
    batch = pa.table({"id": ["mixed.pdf", "broken.pdf"],
                      "source_uri": [str(doc), str(broken)]})
    rows = decode_batch(batch, config).drop_columns(["image"]).to_pylist()
    assert [(r["id"], r["page"], r["error_stage"]) for r in rows] == [
        ("mixed.pdf", 0, None), ("mixed.pdf", 1, "decode"), ("mixed.pdf", 2, None),
        ("broken.pdf", None, "decode")]
    assert "ImageTooLargeError" in rows[1]["error"]
    assert "PdfiumError" in rows[3]["error"]
    assert (rows[0]["width"], rows[0]["height"]) == (300, 300)


def test_resume_counts_a_document_error_row_with_a_null_page_as_written():
    inputs = pa.table({"id": ["a", "a", "b", "c"], "page": pa.array([0, 1, None, None], pa.int32())})
    done = pa.table({"id": ["a", "b"], "page": pa.array([0, None], pa.int32())})
    left = pending(inputs, done, ("id", "page")).to_pylist()
    assert left == [{"id": "a", "page": 1}, {"id": "c", "page": None}]


def test_render_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--dpi"):
        RenderConfig(dpi=0)
    with pytest.raises(ValueError, match="--max-long-edge"):
        RenderConfig(max_long_edge=0)


# --- error rates ------------------------------------------------------------------------------

def test_cer_and_wer_of_known_pairs():
    # kitten -> sitting: k->s, e->i, +g = 3 edits over 6 reference characters.
    assert cer("sitting", "kitten") == pytest.approx(3 / 6)
    # Reference "the cat sat on the mat" (6 words); hypothesis drops "the", changes sat->sit:
    # 1 deletion + 1 substitution = 2 word edits. Characters: "the " deleted (4) + a->i (1).
    assert wer("cat sit on the mat", "the cat sat on the mat") == pytest.approx(2 / 6)
    assert cer("cat sit on the mat", "the cat sat on the mat") == pytest.approx(5 / 22)
    assert cer("same text", "same text") == 0.0
    assert cer("", "abc") == 1.0  # all deleted
    assert cer("abc", "") is None  # no reference characters: undefined


def test_whitespace_is_normalised_before_comparing():
    assert normalize_text("  Total:\n\n310.50\tEUR ") == "Total: 310.50 EUR"
    assert error_counts("Total: 310.50 EUR", "Total:\n310.50   EUR")["char_edits"] == 0
    assert cer("total", "Total") == pytest.approx(1 / 5)  # case counts


def test_ground_truth_manifest_and_page_scoring(tmp_path):
    path = tmp_path / "truth.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a.pdf", "page": 0, "text": "kitten"},
        {"id": "a.pdf", "page": 1, "text": "hello world"},
        {"id": "b.png", "page": 0, "text": "x"},
    ]))
    truths = read_ground_truth(str(path))
    assert truths[("a.pdf", 1)] == "hello world"
    batch = pa.table({
        "id": ["a.pdf", "a.pdf", "a.pdf", "b.png"],
        "page": pa.array([0, 1, 2, None], pa.int32()),
        "answer": ["sitting", "hello there world", "no truth", None],
    })
    rows = score_pages(batch, truths).to_pylist()
    assert rows[0]["cer"] == pytest.approx(0.5) and rows[0]["char_edits"] == 3
    assert rows[1]["wer"] == pytest.approx(1 / 2) and rows[1]["ref_words"] == 2
    assert rows[2]["ground_truth"] is None and rows[2]["cer"] is None
    assert rows[3]["cer"] is None  # a document error row: no page, no score
    table = score_pages(batch, truths).append_column(
        "error", pa.array([None, None, None, "boom"])).append_column(
        "error_stage", pa.array([None, None, None, "decode"])).append_column(
        "generated_tokens", pa.array([3, 4, 2, None], pa.int32()))
    s = summarize(table, truths)
    assert (s["documents"], s["pages"], s["pages_ok"]) == (2, 4, 3)
    assert s["errors_by_stage"] == {"decode": 1} and s["documents_with_errors"] == 1
    assert s["pages_scored"] == 2 and s["ground_truth_pages_unanswered"] == 1  # b.png
    assert s["cer"] == pytest.approx((3 + 6) / (6 + 11))  # "hello world" -> +"there " = 6
    assert s["mean_page_cer"] == pytest.approx((3 / 6 + 6 / 11) / 2)
    assert s["documents_detail"]["a.pdf"]["pages"] == 3


def test_ground_truth_manifest_is_validated(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,text\na,b\n")
    with pytest.raises(ValueError, match="page"):
        read_ground_truth(str(bad))
    dup = tmp_path / "dup.csv"
    dup.write_text("id,page,text\na,0,x\na,0,y\n")
    with pytest.raises(ValueError, match="duplicate"):
        read_ground_truth(str(dup))


def test_ocr_task_lists_pdfs_and_keys_on_pages():
    task = ocr_task()
    assert task.key_columns == ("id", "page") and ".pdf" in task.extensions
    names = [f.name for f in task.extra_fields]
    assert names[0] == "page" and {"cer", "wer", "selection_map"} <= set(names)
