"""The short-answer rule every user of the model shares: the suffix a question gets so the
model answers in a word or phrase (`ANSWER_SUFFIX`, as LLaVA's VQA evaluations ask), and the
normalisation an answer goes through before it is compared with the ground truth
(`normalize_answer`: the RSVQA scoring in `pipeline.rsvqa`, the SynthHR evaluation in
`synthhr.evaluate`)."""

from __future__ import annotations

import re
import unicodedata

ANSWER_SUFFIX = "Answer the question using a single word or phrase."

ARTICLES = {"a", "an", "the"}
YES_WORDS = {"yes", "yeah", "yep", "true", "correct"}
NO_WORDS = {"no", "nope", "false", "incorrect"}
UNITS = {w: i for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
     "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
     "nineteen"])}
TENS = {w: 10 * i for i, w in enumerate(
    ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"], start=2)}
SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000}
NUMBER_WORDS = set(UNITS) | set(TENS) | set(SCALES)


def words_to_number(words: list[str]) -> int:
    """["two", "hundred", "five"] -> 205; ["twenty", "five"] -> 25; ["thousand"] -> 1000."""
    total, current = 0, 0
    for w in words:
        if w in UNITS:
            current += UNITS[w]
        elif w in TENS:
            current += TENS[w]
        elif w == "hundred":
            current = max(current, 1) * 100
        else:
            total += max(current, 1) * SCALES[w]
            current = 0
    return total + current


def _numbers_to_digits(tokens: list[str]) -> list[str]:
    """Replace each run of number words ("and" allowed inside a run) by its digits."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        if tokens[i] not in NUMBER_WORDS:
            out.append(tokens[i])
            i += 1
            continue
        run = []
        while i < len(tokens) and (tokens[i] in NUMBER_WORDS or (
                tokens[i] == "and" and run and i + 1 < len(tokens)
                and tokens[i + 1] in NUMBER_WORDS)):
            if tokens[i] != "and":
                run.append(tokens[i])
            i += 1
        out.append(str(words_to_number(run)))
    return out


def normalize_answer(text: str | None) -> str:
    """Lower case; punctuation to spaces (thousands separators and decimal points inside
    numbers kept); articles dropped; an answer opening with yes / no (or yeah, true, nope,
    false, ...) becomes exactly "yes" / "no"; number words become digits ("twenty-five" ->
    "25"); white space collapsed."""
    if text is None:
        return ""
    s = unicodedata.normalize("NFKC", text).lower().strip()
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)  # 1,000 -> 1000
    s = re.sub(r"\.(?!\d)|(?<!\d)\.", " ", s)  # periods, except decimal points
    s = re.sub(r"[^\w\s.]|_", " ", s)  # other punctuation ("m2" and digits stay)
    tokens = [t for t in s.split() if t not in ARTICLES]
    if tokens and tokens[0] in YES_WORDS:
        return "yes"
    if tokens and tokens[0] in NO_WORDS:
        return "no"
    return " ".join(_numbers_to_digits(tokens))
