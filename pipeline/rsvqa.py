"""Offline RSVQA scoring: read the questions, normalise answers, score per question type.

Inputs (`read_questions`), both turned into one table with `id` (question id), `image_uri`,
`question` (with the short-answer suffix), `ground_truth`, `question_type` and `image_id`:

- the original RSVQA release layout (Lobry et al., 2020): a folder (local or object storage)
  holding `<split>_questions.json`, `<split>_answers.json` and optionally
  `<split>_images.json` (e.g. `LR_split_test_*`, `USGS_split_test_*`), and the images as
  `<img_id>.tif` in a folder (`Images_LR/`, `Images_HR/` or `Data/` beside the JSON by
  default). Each file holds one list (`questions`, `answers`, `images`) whose position is the
  entry's id. Questions carry `id`, `img_id`, `type`, `question`, `answers_ids`, `active`;
  answers `id`, `question_id`, `answer`, `active`; images `id`, `questions_ids`, `active`.
  `active: false` marks entries outside the split; they may be stubs missing every other field
  and are skipped, as are questions whose image is inactive. The ground truth of a question is
  its first active answer in `answers_ids`. Missing fields in an *active* entry are an error.
- a plain manifest (Parquet / CSV / JSONL) with `id`, an image URI column (`image_uri`,
  `image`, `uri`, `path`), `question`, `answer` (or `ground_truth`) and `type` (or
  `question_type`; null types score as `other`).

Scoring (`score_answers`, the task's `finalize`): both the prediction and the ground truth go
through `normalize_answer`; with `count_bins` (RSVQA-LR's count classes) numeric counts of
`count` questions are mapped to the bins 0, 1-10, 11-100, 101-1000, >1000 first. A row that
was not answered (an error row) counts as wrong. `summarize` gives the accuracy per type,
the average accuracy (mean of the per-type accuracies) and the overall accuracy.
"""

from __future__ import annotations

import functools
import json
import logging
import posixpath
import re

import pyarrow as pa

# the short-answer rule lives in flexattn (the SynthHR evaluation shares it); re-exported here
from flexattn.answers import ANSWER_SUFFIX, normalize_answer, words_to_number  # noqa: F401
from pipeline.columns import schema_fields
from pipeline.inputs import read_manifest
from pipeline.predict import PREDICT_EXTRA_FIELDS
from pipeline.storage import open_fs, to_uri
from pipeline.tasks import Report, Task

logger = logging.getLogger(__name__)

QUESTION_TYPES = ("presence", "comp", "count", "area", "rural_urban")
IMAGE_FOLDERS = ("Images_LR", "Images_HR", "Data", "Images", "images")
COUNT_BINS = ((0, 0, "0"), (1, 10, "between 1 and 10"), (11, 100, "between 11 and 100"),
              (101, 1000, "between 101 and 1000"))
COUNT_BIN_MORE = "more than 1000"
OTHER_TYPE = "other"

INPUT_COLUMNS = ("id", "image_uri", "question", "ground_truth", "question_type", "image_id")
RSVQA_FIELDS = (
    *schema_fields(question_type=pa.string(), image_id=pa.string(), ground_truth=pa.string(),
                   answer_normalized=pa.string(), truth_normalized=pa.string(),
                   correct=pa.bool_()),
    *PREDICT_EXTRA_FIELDS,
)


def count_bin(normalized: str) -> str | None:
    """The RSVQA-LR count bin of a normalised whole number ("37" -> "between 11 and 100"), or
    None if the text is not a whole number."""
    if not re.fullmatch(r"\d+", normalized):
        return None
    n = int(normalized)
    for low, high, label in COUNT_BINS:
        if low <= n <= high:
            return label
    return COUNT_BIN_MORE


def compare_form(answer: str | None, question_type: str | None, count_bins: bool) -> str:
    """What gets compared: the normalised answer, binned for counts when asked."""
    norm = normalize_answer(answer)
    if count_bins and question_type == "count":
        return count_bin(norm) or norm
    return norm


# --------------------------------------------------------------------------------------------
# reading questions


def _load_json(fs, path: str) -> dict:
    with fs.open(path, "rb") as f:
        return json.load(f)


def find_splits(root: str) -> list[str]:
    """Split prefixes (`LR_split_test`, ...) with a `*_questions.json` under `root`."""
    fs, path = open_fs(root)
    names = [posixpath.basename(p) for p in fs.glob(posixpath.join(path, "*_questions.json"))]
    return sorted(n[: -len("_questions.json")] for n in names)


def _entries(data: dict, key: str, source: str) -> list:
    entries = data.get(key)
    if not isinstance(entries, list):
        raise ValueError(f"{source}: expected a JSON object with a {key!r} list")  # noqa: TRY004
    return entries


def _active(entry) -> bool:
    """`active: false` marks an entry outside the split; an entry without the flag counts."""
    return isinstance(entry, dict) and bool(entry.get("active", True))


def _by_id(entries: list) -> dict[int, dict]:
    """Active entries by `id` (their position when the id field is missing)."""
    return {int(e.get("id", pos)): e for pos, e in enumerate(entries) if _active(e)}


def read_original_layout(root: str, split: str | None = None,
                         images: str | None = None) -> pa.Table:
    """The questions of one split of an RSVQA release folder, as the input table."""
    fs, path = open_fs(root)
    splits = find_splits(root)
    if split is None:
        if len(splits) != 1:
            raise ValueError(f"--input {root!r}: found splits {splits}; pick one with --split"
                             if splits else f"--input {root!r}: no *_questions.json found")
        split = splits[0]
    elif split not in splits:
        raise ValueError(f"--split {split!r}: not under {root!r} (found {splits})")
    base = posixpath.join(path, split)
    q_src, a_src, i_src = (f"{base}_{k}.json" for k in ("questions", "answers", "images"))
    questions = _entries(_load_json(fs, q_src), "questions", q_src)
    answers = _by_id(_entries(_load_json(fs, a_src), "answers", a_src))
    image_entries = (_by_id(_entries(_load_json(fs, i_src), "images", i_src))
                     if fs.exists(i_src) else None)
    image_root = images or _default_image_folder(fs, path, root)
    image_fs, image_path = open_fs(image_root)

    rows: dict[str, list] = {c: [] for c in INPUT_COLUMNS}
    skipped = 0
    for pos, q in enumerate(questions):
        if not _active(q):
            skipped += 1
            continue
        missing = [k for k in ("img_id", "type", "question", "answers_ids") if k not in q]
        if missing:
            raise ValueError(f"{q_src}: active question at position {pos} lacks {missing}")
        image_id = int(q["img_id"])
        if image_entries is not None and image_id not in image_entries:
            skipped += 1  # its image is outside the split
            continue
        truth = next((answers[int(a)]["answer"] for a in q["answers_ids"]
                      if int(a) in answers and "answer" in answers[int(a)]), None)
        if truth is None:
            raise ValueError(f"{q_src}: active question {q.get('id', pos)} has no active answer"
                             f" in {a_src}")
        rows["id"].append(str(q.get("id", pos)))
        rows["image_uri"].append(to_uri(image_fs, posixpath.join(image_path, f"{image_id}.tif")))
        rows["question"].append(str(q["question"]))
        rows["ground_truth"].append(str(truth))
        rows["question_type"].append(str(q["type"]))
        rows["image_id"].append(str(image_id))
    logger.info("RSVQA %s: %d questions (%d inactive or outside the split skipped)",
                split, len(rows["id"]), skipped)
    if not rows["id"]:
        raise ValueError(f"--input {root!r}: split {split!r} has no active questions")
    return pa.table({c: pa.array(v, pa.string()) for c, v in rows.items()})


def _default_image_folder(fs, path: str, root: str) -> str:
    for name in IMAGE_FOLDERS:
        candidate = posixpath.join(path, name)
        if fs.isdir(candidate):
            return to_uri(fs, candidate)
    raise ValueError(f"--input {root!r}: no image folder ({', '.join(IMAGE_FOLDERS)}) beside the"
                     " JSON files; pass --images")


def read_question_manifest(uri: str) -> pa.Table:
    """A plain manifest (id, image URI, question, answer, type) as the input table."""
    table = read_manifest(uri)
    names = table.column_names

    def column(*candidates: str, required: bool = True):
        name = next((c for c in candidates if c in names), None)
        if name is None and required:
            raise ValueError(f"--input manifest {uri!r}: needs a column {' or '.join(candidates)}"
                             f", has {names}")
        return table.column(name).cast(pa.string()) if name else None

    question = column("question")
    truth = column("answer", "ground_truth")
    qtype = column("type", "question_type", required=False)
    image_id = column("image_id", "img_id", required=False)
    n = table.num_rows
    if question.null_count or truth.null_count:
        raise ValueError(f"--input manifest {uri!r}: 'question' and the answer must not be empty")
    return pa.table({
        "id": table.column("id"),
        "image_uri": table.column("source_uri"),
        "question": question,
        "ground_truth": truth,
        "question_type": qtype.fill_null(OTHER_TYPE) if qtype is not None
        else pa.array([OTHER_TYPE] * n, pa.string()),
        "image_id": image_id if image_id is not None else pa.nulls(n, pa.string()),
    })


def read_questions(source: str, split: str | None = None, images: str | None = None
                   ) -> pa.Table:
    """Either layout -> the input table, questions suffixed with `ANSWER_SUFFIX`."""
    fs, path = open_fs(source)
    if fs.isdir(path):
        table = read_original_layout(source, split, images)
    elif fs.isfile(path):
        if split is not None or images is not None:
            raise ValueError("--split and --images apply to the original RSVQA layout only")
        table = read_question_manifest(source)
    else:
        raise ValueError(f"--input {source!r}: neither an RSVQA folder nor a manifest")
    prompts = [f"{q}\n{ANSWER_SUFFIX}" for q in table.column("question").to_pylist()]
    return table.set_column(table.column_names.index("question"), "question",
                            pa.array(prompts, pa.string()))


# --------------------------------------------------------------------------------------------
# scoring


def score_answers(batch: pa.Table, count_bins: bool = False) -> pa.Table:
    """`finalize`: normalised answer and truth, and whether they match."""
    answers = batch.column("answer").to_pylist()
    truths = batch.column("ground_truth").to_pylist()
    types = batch.column("question_type").to_pylist()
    ans_norm = [compare_form(a, t, count_bins) if a is not None else None
                for a, t in zip(answers, types)]
    truth_norm = [compare_form(g, t, count_bins) for g, t in zip(truths, types)]
    correct = [a is not None and a == g for a, g in zip(ans_norm, truth_norm)]
    for name, values, kind in (("answer_normalized", ans_norm, pa.string()),
                               ("truth_normalized", truth_norm, pa.string()),
                               ("correct", correct, pa.bool_())):
        if name in batch.column_names:
            batch = batch.drop_columns([name])
        batch = batch.append_column(name, pa.array(values, kind))
    return batch


def rsvqa_task(count_bins: bool = False) -> Task:
    return Task(
        name="rsvqa",
        default_prompt=ANSWER_SUFFIX,  # every row has its own question
        extra_fields=RSVQA_FIELDS,
        finalize=functools.partial(score_answers, count_bins=count_bins),
        report=Report(name="rsvqa_scores", title="RSVQA scores",
                      columns=("question_type", "correct", "error"),
                      summarize=functools.partial(summarize, count_bins=count_bins),
                      rows=summary_rows, markdown=format_markdown),
    )


def summarize(table: pa.Table, count_bins: bool = False) -> dict:
    """Accuracy per question type (known types first), average accuracy (mean over the types
    present) and overall accuracy, from the written `question_type` and `correct` columns."""
    types = table.column("question_type").to_pylist()
    correct = table.column("correct").to_pylist()
    errors = table.column("error").to_pylist()
    per: dict[str, dict] = {}
    for t, c, e in zip(types, correct, errors):
        entry = per.setdefault(t or OTHER_TYPE, {"questions": 0, "correct": 0, "errors": 0})
        entry["questions"] += 1
        entry["correct"] += bool(c)
        entry["errors"] += e is not None
    order = [t for t in QUESTION_TYPES if t in per] + sorted(set(per) - set(QUESTION_TYPES))
    per_type = {t: {**per[t], "accuracy": per[t]["correct"] / per[t]["questions"]}
                for t in order}
    total = sum(p["questions"] for p in per_type.values())
    right = sum(p["correct"] for p in per_type.values())
    return {
        "questions": total,
        "correct": right,
        "errors": sum(p["errors"] for p in per_type.values()),
        "count_bins": count_bins,
        "per_type": per_type,
        "average_accuracy": (sum(p["accuracy"] for p in per_type.values()) / len(per_type)
                             if per_type else None),
        "overall_accuracy": right / total if total else None,
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    rows = [(f"{t} accuracy (%)", f"{_pct(p['accuracy'])}  ({p['correct']}/{p['questions']})")
            for t, p in summary["per_type"].items()]
    rows += [
        ("average accuracy (%)", _pct(summary["average_accuracy"])),
        ("overall accuracy (%)", (f"{_pct(summary['overall_accuracy'])}  "
                                  f"({summary['correct']}/{summary['questions']})")),
        ("unanswered (error rows)", str(summary["errors"])),
        ("count bins", "on" if summary["count_bins"] else "off"),
    ]
    return rows


def format_markdown(summary: dict, title: str = "RSVQA scores") -> str:
    lines = [f"# {title}", "", "| question type | questions | correct | errors | accuracy (%) |",
             "|---|---:|---:|---:|---:|"]
    for t, p in summary["per_type"].items():
        lines.append(f"| {t} | {p['questions']} | {p['correct']} | {p['errors']} "
                     f"| {_pct(p['accuracy'])} |")
    lines += [
        f"| **average accuracy** | | | | {_pct(summary['average_accuracy'])} |",
        (f"| **overall accuracy** | {summary['questions']} | {summary['correct']} "
         f"| {summary['errors']} | {_pct(summary['overall_accuracy'])} |"),
        "", f"Count bins: {'on' if summary['count_bins'] else 'off'}.",
    ]
    return "\n".join(lines) + "\n"
