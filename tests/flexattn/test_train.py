"""The SynthHR training recipe on tiny shapes: a few steps lower the answer loss, a stopped run
resumes from its checkpoint at the step it stopped, a changed flag is recorded as a new stage,
and the export is the original layout that load_model reads."""

from __future__ import annotations

import json

import pytest

from flexattn import load_model
from flexattn.train import Recipe, Trainer, export

pytestmark = pytest.mark.slow


def tiny(out, steps: int, **kw) -> Recipe:
    return Recipe(out=str(out), preset="tiny", steps=steps, batch_size=4, lr=3e-3, warmup=2,
                  checkpoint_every=10, eval_every=1000, eval_images=1, threads=1, **kw)


def test_tiny_training_lowers_the_loss_resumes_and_exports(tmp_path):
    run = tmp_path / "run"
    first = Trainer(tiny(run, 20), command="python -m flexattn.train --preset tiny")
    first.run()
    assert first.step == 20 and (run / "checkpoint.pt").is_file()
    again = Trainer(tiny(run, 40, read_weight=1.0), command="... --read-weight 1")
    assert again.step == 20  # resumed, not restarted
    assert [s["from_step"] for s in again.stages] == [0, 20]
    assert again.stages[1]["changed"] == {"steps": 40, "read_weight": 1.0}
    again.run()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    ce = [r["ce"] for r in log if "ce" in r]
    assert len(ce) == 40
    assert sum(ce[-8:]) / 8 < 0.7 * sum(ce[:8]) / 8, ce
    out = export(again.model, tmp_path / "export", {"command": "test", "stages": again.stages})
    model = load_model(out, device="cpu", dtype="float32")
    assert model.config.select_layer == again.model.config.select_layer == 1
    assert json.loads((out / "training.json").read_text())["stages"] == again.stages


def test_route_and_contrast_losses_target_the_named_colour_and_box(tmp_path):
    from flexattn.tokenizer import IMAGE_TOKEN_INDEX
    from flexattn.train import attention_target, colour_slots, question_prompt

    trainer = Trainer(tiny(tmp_path / "run", 1, route_weight=1.0, contrast_weight=1.0,
                           count_attention="corner", pattern_share=0.75))
    tok, cfg = trainer.model.tokenizer, trainer.model.config
    samples = trainer.batch(0)
    kinds = [s.question.type for s in samples]
    assert "pattern" in kinds and "count" in kinds, kinds
    answers = [tok.encode_text(s.question.answer) + [tok.eos_id] for s in samples]
    # the teacher-forced sequence by hand: prompt with 576 image slots, answer but its last
    fed = []
    for s, a in zip(samples, answers):
        ids = tok.encode_prompt(question_prompt(s.question.question))
        at = ids.index(IMAGE_TOKEN_INDEX)
        fed.append(ids[:at] + [IMAGE_TOKEN_INDEX] * cfg.lr_tokens + ids[at + 1:] + a[:-1])
    width = max(len(f) for f in fed)
    slots = colour_slots(samples, answers, tok, width)
    for s, f, slot in zip(samples, fed, slots.tolist()):
        if s.question.type == "count":
            assert slot == -1
            continue
        padded = [-1] * (width - len(f)) + f
        assert padded[slot:slot + 1] == tok.encode_text(s.boxes[s.question.target].colour)
    count = next(s for s in samples if s.question.type == "count")
    corner = attention_target(count, cfg.lr_grid, "corner")
    assert corner[0] == 1 and corner.sum() == 1
    mixed = attention_target(count, cfg.lr_grid, "corner-boxes")  # half corner, half boxes
    assert mixed[0] >= 0.5 and (mixed > 0).sum() > 1 and abs(float(mixed.sum()) - 1) < 1e-6
    metrics = trainer.train_step(0)
    assert metrics["route"] > 0 and metrics["contrast"] >= 0
