"""The SynthHR training command on tiny shapes, with the committed config's format: a short run
lowers the loss, writes its curve and exports a calibrated model that load_model reads; a run
stopped after k steps and started again with the same command ends with the same weights as
an uninterrupted one; a changed config is refused on resume."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch

from flexattn import load_model
from synthhr.config import ConfigError, parse_config
from synthhr.train import Trainer, main

pytestmark = pytest.mark.slow

MINI = Path(__file__).resolve().parents[2] / "synthhr" / "configs" / "mini.toml"
TINY_MODEL = {"hidden": 32, "heads": 2, "intermediate": 64, "layers": 3, "select_layer": 1,
              "vocab": 700, "clip_hidden": 16, "clip_heads": 2, "clip_intermediate": 32,
              "clip_layers": 1}


def tiny(steps: int, **top) -> dict:
    """The committed mini config with tiny shapes and a short run (the same format)."""
    data = tomllib.loads(MINI.read_text())
    data.update(model=TINY_MODEL, steps=steps, batch_size=4, lr=3e-3, warmup=2, threads=1,
                checkpoint_every=3, eval_every=1000, eval_images=1)
    data.update(top)
    data["oracle"] = {"steps": steps // 2, "floor": 0.15}
    data["calibrate"] = {"seed": 1, "images": 1, "max_frac": 1.0, "min_hit": 0.0}
    data["phase"][1]["from_step"] = int(0.9 * steps)
    return data


def write_toml(path: Path, data: dict) -> Path:
    def value(v):
        return json.dumps(v) if not isinstance(v, dict) else "{" + ", ".join(
            f"{k} = {value(x)}" for k, x in v.items()) + "}"

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, (dict, list))]
    for name, table in data.items():
        if isinstance(table, dict):
            lines += [f"[{name}]", *(f"{k} = {value(v)}" for k, v in table.items())]
    for phase in data["phase"]:
        lines += ["[[phase]]", *(f"{k} = {value(v)}" for k, v in phase.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_committed_config_parses():
    config = parse_config(tomllib.loads(MINI.read_text()))
    assert config.phase(0).pattern_share == 0.5 and config.phase(config.steps - 1).pattern_share == 0.3
    assert config.phase(config.steps - 1).read_weight == 1.0  # carried over
    assert config.learning_rate(config.warmup) == pytest.approx(config.lr)
    assert config.learning_rate(config.steps) == pytest.approx(0.1 * config.lr)
    assert config.oracle_share(0) == 1.0 and config.oracle_share(10**6) == 0.15


@pytest.mark.parametrize("change, key", [
    (lambda d: d.update(lr_rate=1.0), "lr_rate"),
    (lambda d: d.update(steps="many"), "steps"),
    (lambda d: d.update(batch_size=0), "batch_size"),
    (lambda d: d["model"].pop("heads"), "model.heads"),
    (lambda d: d["model"].update(colour=1), "model.colour"),
    (lambda d: d["phase"][1].update(read_weigth=1.0), "phase[1].read_weigth"),
    (lambda d: d["phase"][0].pop("route_weight"), "phase[0].route_weight"),
    (lambda d: d["phase"][1].update(from_step=10**6), "phase[1].from_step"),
    (lambda d: d["phase"][1].update(pattern_share=1.5), "phase[1].pattern_share"),
    (lambda d: d["oracle"].update(floor=2), "oracle.floor"),
    (lambda d: d.update(count_attention="middle"), "count_attention"),
])
def test_config_errors_name_the_key(change, key):
    data = tomllib.loads(MINI.read_text())
    change(data)
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        parse_config(data)


def test_the_command_lowers_the_loss_and_exports_a_calibrated_model(tmp_path):
    steps = 40
    config = write_toml(tmp_path / "tiny.toml", tiny(steps, eval_every=20))
    out, model_dir = tmp_path / "run", tmp_path / "model"
    assert main(["--config", str(config), "--out", str(out), "--export", str(model_dir)]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in log]
    assert len(loss) == steps
    assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5, loss
    assert {"ce", "att", "presence", "t_data", "t_forward", "t_backward"} <= set(log[0])
    curve = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == [20, 40]
    assert curve[1]["wall_seconds"] > curve[0]["wall_seconds"] > 0
    assert {"pattern_acc", "count_acc"} <= set(curve[0])
    model = load_model(model_dir, device="cpu", dtype="float32")
    assert model.config.select_layer == 1
    training = json.loads((model_dir / "training.json").read_text())
    assert training["command"].startswith("python -m synthhr.train --config")
    assert training["config"]["steps"] == steps and training["seed"] == 0
    assert training["calibration"]["command"].startswith("python -m synthhr.calibrate")
    assert float(json.loads((model_dir / "config.json").read_text())["extra"]["threshold"]) \
        == training["calibration"]["chosen"]


def test_a_stopped_run_resumes_to_the_same_weights(tmp_path):
    data = tiny(6)
    config = parse_config(data)
    whole = Trainer(config, tmp_path / "whole")
    whole.run(progress=False)
    Trainer(config, tmp_path / "part").run(until=3, progress=False)  # killed after step 3
    path = write_toml(tmp_path / "tiny.toml", data)
    again = Trainer(config, tmp_path / "part")
    assert again.step == 3  # resumed, not restarted
    assert main(["--config", str(path), "--out", str(tmp_path / "part"), "--export",
                 str(tmp_path / "model")]) == 0
    state = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 6
    for name, value in whole.module.state_dict().items():
        assert torch.equal(value, state["model"][name]), name
    with pytest.raises(ConfigError, match="differs in lr"):
        Trainer(parse_config({**data, "lr": 1e-3}), tmp_path / "part")
    second = Trainer(config.with_seed(5), tmp_path / "seed5")
    assert second.config.seed == 5


def test_route_and_contrast_losses_target_the_named_colour_and_box(tmp_path):
    from flexattn.tokenizer import IMAGE_TOKEN_INDEX
    from synthhr.data import attention_target, colour_slots, question_prompt

    data = tiny(2)
    data["phase"] = [{**data["phase"][0], "pattern_share": 0.75}]
    trainer = Trainer(parse_config({**data, "count_attention": "corner"}), tmp_path / "run")
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
    assert metrics["route"] > 0 and metrics["contrast"] >= 0 and metrics["read"] > 0
