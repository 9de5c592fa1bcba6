"""Make the small inputs of the OCR and RSVQA demos (`jobs/ocr_documents.py`,
`jobs/score_rsvqa.py`). Drawn, not downloaded; deterministic.

- `samples/documents/`: a two-page PDF (fpdf2, the `test` extra), a two-page bilevel
  (1-bit, CCITT G4) TIFF, a grey PNG, and `ground_truth.jsonl` (id, page, text) for all five
  pages.
- `samples/rsvqa/`: a tiny split in the original RSVQA layout (`LR_split_test_*.json` with
  inactive stubs, `Images_LR/<id>.tif` at 256x256 cut from the remote-sensing samples).

    python samples/make_job_samples.py
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent

PDF_PAGES = [
    ["Quarterly report", "Revenue grew by 12 percent.", "Costs were flat."],
    ["Outlook", "We expect steady growth next year."],
]
TIFF_PAGES = [
    ["INVOICE 2041", "Total due: 310.50 EUR"],
    ["Thank you for your order."],
]
PNG_LINES = ["Receipt", "Coffee 3.20", "Bread 2.10"]


def text_page(lines: list[str], size: tuple[int, int], mode: str) -> Image.Image:
    img = Image.new("L", size, 255)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=36)
    for i, line in enumerate(lines):
        draw.text((60, 60 + 60 * i), line, fill=0, font=font)
    return img.convert(mode)


def make_documents(out: Path) -> None:
    from fpdf import FPDF

    out.mkdir(parents=True, exist_ok=True)
    pdf = FPDF(unit="pt", format="A4")
    pdf.set_creation_date(datetime(2024, 1, 1, tzinfo=UTC))
    pdf.set_font("Helvetica", size=18)
    for lines in PDF_PAGES:
        pdf.add_page()
        for line in lines:
            pdf.cell(0, 30, line, new_x="LMARGIN", new_y="NEXT")
    pdf.output(str(out / "report.pdf"))
    pages = [text_page(lines, (850, 1100), "1") for lines in TIFF_PAGES]
    pages[0].save(out / "invoice_scan.tif", save_all=True, append_images=pages[1:],
                  compression="group4")
    text_page(PNG_LINES, (700, 400), "L").save(out / "receipt.png", optimize=True)
    truth = [("report.pdf", i, "\n".join(p)) for i, p in enumerate(PDF_PAGES)]
    truth += [("invoice_scan.tif", i, "\n".join(p)) for i, p in enumerate(TIFF_PAGES)]
    truth += [("receipt.png", 0, "\n".join(PNG_LINES))]
    with open(out / "ground_truth.jsonl", "w") as f:
        f.writelines(json.dumps({"id": doc, "page": page, "text": text}) + "\n" for doc, page, text in truth)


# (image id, source sample, crop box); questions: (img id, type, question, answer)
RSVQA_IMAGES = [
    (0, "farmland_2400x1600.jpg", (0, 0, 1600, 1600)),
    (2, "village_1800x1800.jpg", (0, 0, 1800, 1800)),
]
RSVQA_QUESTIONS = [
    (0, "presence", "Is a road present?", "yes"),
    (0, "comp", "Are there more buildings than roads?", "no"),
    (0, "count", "How many buildings are there?", "0"),
    (0, "rural_urban", "Is it a rural or an urban area?", "rural"),
    (2, "presence", "Is there a water area?", "no"),
    (2, "count", "How many roads are there?", "12"),
    (2, "comp", "Is the number of buildings equal to the number of roads?", "no"),
    (2, "rural_urban", "Is it a rural or an urban area?", "urban"),
]


def make_rsvqa(out: Path) -> None:
    images_dir = out / "Images_LR"
    images_dir.mkdir(parents=True, exist_ok=True)
    for img_id, name, box in RSVQA_IMAGES:
        img = Image.open(HERE / "remote_sensing" / name).convert("RGB").crop(box)
        img.resize((256, 256), Image.Resampling.LANCZOS).save(
            images_dir / f"{img_id}.tif", compression="tiff_adobe_deflate")
    questions: list[dict] = []
    answers: list[dict] = []
    images = [{"id": 0, "active": True, "original_name": "farmland.tif", "questions_ids": []},
              {"id": 1, "active": False},  # outside the split: a stub
              {"id": 2, "active": True, "original_name": "village.tif", "questions_ids": []}]
    for img_id, qtype, text, answer in RSVQA_QUESTIONS:
        if len(questions) == 3:  # an inactive question (and answer) stub in the middle
            questions.append({"id": 3, "active": False})
            answers.append({"id": 3, "active": False})
        qid = len(questions)
        questions.append({"id": qid, "date_added": 1.0, "img_id": img_id, "people_id": 1,
                          "type": qtype, "question": text, "answers_ids": [qid],
                          "active": True})
        answers.append({"id": qid, "date_added": 1.0, "question_id": qid, "people_id": 1,
                        "answer": answer, "active": True})
        images[img_id]["questions_ids"].append(qid)
    for key, data in (("questions", questions), ("answers", answers), ("images", images)):
        with open(out / f"LR_split_test_{key}.json", "w") as f:
            json.dump({key: data}, f)


if __name__ == "__main__":
    make_documents(HERE / "documents")
    make_rsvqa(HERE / "rsvqa")
    print(f"wrote {HERE / 'documents'} and {HERE / 'rsvqa'}")
