"""Train the SynthHR mini LLaVA-FlexAttn from a config, calibrate its threshold, export it.

    python -m synthhr.train --config synthhr/configs/mini.toml --out runs/mini \\
        --export models/synthhr-mini

One command runs every phase of the config (``synthhr.config``), then the threshold
calibration (``synthhr.calibrate``, the config's ``[calibrate]``) on the exported model.
Running it again resumes from ``OUT/checkpoint.pt`` (written every ``checkpoint_every`` steps
and at the end) with the same data and the same schedule: a config that differs from the
checkpoint's is refused, never re-stretched. ``--seed N`` replaces the config's seed (a
second-seed run, in its own ``--out``).

Every step is one batch of SynthHR questions through ``LlavaFlexAttn.teacher_forward`` (prompt
plus answer in one forward that predicts each answer token exactly as ``generate``'s decode
step does, selection included) with the losses of ``synthhr.losses``. For a share of the
samples that falls from 1 to ``oracle.floor`` over ``oracle.steps``, the box's own cells are
put in place of the model's selection, so the answer's gradient reaches the high-res path
before the model finds boxes on its own.

Written under OUT: ``checkpoint.pt``; ``log.jsonl`` (one line per step: losses, accuracies
of the first answer token, and the seconds spent in data, forward, each loss, backward and the
optimiser); ``curve.jsonl`` (one line per evaluation: ``step``, ``wall_seconds`` since the
start of the run, resumed time included, ``pattern_acc``, ``count_acc``, ``hit``, ``frac``);
``tokenizer/``. The export holds the model in the original layout and ``training.json``: the
config inline, the command, the seed, the git commit(s), the curve and the calibration.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import losses, task
from .config import Config, ConfigError, differences, load_config, parse_config
from .data import Sample, SceneStream, oracle_cells, question_prompt
from .evaluate import evaluate_model
from .export import export, git_commit
from .model import build_model

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
COMMAND = "python -m synthhr.train"


@dataclass
class Metrics:
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, **kv: float) -> None:
        for k, v in kv.items():
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                self.values.setdefault(k, []).append(float(v))

    def mean(self) -> dict[str, float]:
        return {k: sum(v) / len(v) for k, v in self.values.items() if v}


class Trainer:
    """A run: model, training heads, optimiser and data stream of ``config``, resumed from
    ``OUT/checkpoint.pt`` when there is one (which must hold the same config)."""

    def __init__(self, config: Config, out: str | Path, command: str = COMMAND) -> None:
        self.config = config
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(config.threads)
        self.model = build_model(config.model, config.seed, self.out / "tokenizer")
        self.module = self.model.module
        self.heads = losses.Heads(self.model.config.hidden_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 1)
            for p in self.heads.parameters():
                nn.init.normal_(p, std=0.02)
        hd = [p for n, p in self.module.named_parameters() if "_proj_hd." in n]
        rest = [p for n, p in self.module.named_parameters() if "_proj_hd." not in n]
        self.opt = torch.optim.AdamW(
            [{"params": rest + list(self.heads.parameters()), "scale": 1.0},
             {"params": hd, "scale": config.hd_lr_scale}],
            lr=config.lr, weight_decay=0.0, betas=(0.9, 0.98))
        self.step = 0
        self.wall = 0.0  # seconds of the run so far, over every resume
        self.stream = SceneStream(config.seed, config.reuse)
        self.curve: list[dict] = []
        self.commits = [{"from_step": 0, "commit": git_commit(), "command": command}]
        ckpt = self.out / CHECKPOINT
        if ckpt.is_file():
            self._resume(ckpt, command)
        self._started = time.perf_counter()
        self._wall_at_start = self.wall

    def _resume(self, ckpt: Path, command: str) -> None:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        before = parse_config(json.loads(state["config"]))
        changed = differences(before, self.config)
        if changed:
            raise ConfigError(f"{ckpt} was trained with another config (differs in"
                              f" {', '.join(changed)}); use a new --out")
        self.module.load_state_dict(state["model"])
        self.heads.load_state_dict(state["heads"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.wall = int(state["step"]), float(state["wall"])
        self.curve = json.loads(state["curve"])
        self.commits = json.loads(state["commits"])
        commit = git_commit()
        if commit != self.commits[-1]["commit"]:
            self.commits.append({"from_step": self.step, "commit": commit, "command": command})
        # drop what a stopped run logged after its last checkpoint: it is done again
        for name in ("log.jsonl", "curve.jsonl"):
            path = self.out / name
            if path.is_file():
                lines = [line for line in path.read_text().splitlines()
                         if json.loads(line).get("step", 0) <= self.step]
                path.write_text("".join(line + "\n" for line in lines))
        log.info("resumed %s at step %d (%.0f s of run)", ckpt, self.step, self.wall)

    def wall_seconds(self) -> float:
        return self._wall_at_start + time.perf_counter() - self._started

    # one step --------------------------------------------------------------------------------
    def batch(self, step: int) -> list[Sample]:
        b, share = self.config.batch_size, self.config.phase(step).pattern_share
        return [self.stream.sample(step * b + k, share) for k in range(b)]

    def train_step(self, step: int) -> dict[str, float]:
        config, cfg, tok = self.config, self.model.config, self.model.tokenizer
        phase = config.phase(step)
        seconds: dict[str, float] = {}
        t = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal t
            now = time.perf_counter()
            seconds[name] = seconds.get(name, 0.0) + now - t
            t = now

        samples = self.batch(step)
        rng = np.random.default_rng([config.seed, 3, step])
        forced_on = torch.from_numpy(rng.random(len(samples)) < config.oracle_share(step))
        answers = [tok.encode_text(s.question.answer) + [tok.eos_id] for s in samples]
        rows = max(len(a) for a in answers)
        forced = torch.stack([oracle_cells(s, cfg.pool_grid) for s in samples])
        lap("t_data")
        out = self.model.teacher_forward(
            [s.image for s in samples], [question_prompt(s.question.question) for s in samples],
            answers, forced=forced[:, None].expand(-1, rows, -1), forced_on=forced_on,
            return_activations=True)
        lap("t_forward")
        terms: dict[str, torch.Tensor | None] = {"ce": losses.answer_loss(out)}
        lap("t_ce")
        weights = {"ce": 1.0, "att": phase.attn_weight, "presence": phase.presence_weight,
                   "feature": phase.feature_weight,
                   "read": phase.read_weight, "contrast": phase.contrast_weight,
                   "route": phase.route_weight}
        compute = {
            "att": lambda: losses.attention_loss(samples, out, cfg.lr_grid,
                                                 config.count_attention),
            "presence": lambda: losses.presence_loss(samples, out, self.heads),
            "feature": lambda: losses.feature_loss(samples, out, self.heads, cfg),
            "read": lambda: losses.read_loss(samples, out, cfg),
            "contrast": lambda: losses.contrast_loss(samples, out, cfg.lr_grid),
            "route": lambda: losses.route_loss(samples, answers, out, tok),
        }
        for name, fn in compute.items():
            if weights[name]:
                terms[name] = fn()
                lap(f"t_{name}")
        loss = sum(weights[k] * v for k, v in terms.items() if v is not None)
        lr = config.learning_rate(step)
        for group in self.opt.param_groups:
            group["lr"] = lr * group["scale"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        lap("t_backward")
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), config.clip)
        self.opt.step()
        lap("t_optimizer")
        metrics = {"loss": float(loss.detach()), "lr": lr,
                   **{k: float(v.detach()) for k, v in terms.items() if v is not None}}
        metrics.update(self.step_metrics(samples, out, forced_on))
        return {**metrics, **seconds}

    def step_metrics(self, samples, out, forced_on) -> dict[str, float]:
        """Accuracy of each sample's first answer token per question type, with the model's
        own selection or a forced one; how often layer s's own selection holds the named box's
        centre cell (``hit``); its selected fraction (``frac``)."""
        cfg = self.model.config
        first = (out.targets >= 0).float().argmax(1)
        b = len(samples)
        pred = out.logits[torch.arange(b), first].argmax(-1)
        right = (pred == out.targets[torch.arange(b), first]).tolist()
        own = out.record.masks[0][torch.arange(b), first]  # [B, 81] layer s's own selection
        m = {"frac": float(own.float().mean())}
        for kind in ("pattern", "count"):
            for regime, on in (("own", False), ("forced", True)):
                idx = [i for i, s in enumerate(samples)
                       if s.question.type == kind and bool(forced_on[i]) == on]
                if idx:
                    m[f"{kind}_{regime}"] = sum(right[i] for i in idx) / len(idx)
        hits = [bool(own[i, task.centre_cell(s.boxes[s.question.target], cfg.pool_grid)])
                for i, s in enumerate(samples) if s.question.type == "pattern"]
        if hits:
            m["hit"] = sum(hits) / len(hits)
        return m

    # evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The curve's point now: generation (greedy, the model's own selection) on
        ``eval_images`` scenes of ``eval_seed``, both questions each."""
        wall = self.wall_seconds()
        self.module.eval()
        ev = evaluate_model(self.model, self.config.eval_seed, self.config.eval_images,
                            modes=("flexattn",))
        return {"step": self.step, "wall_seconds": round(wall, 1),
                "pattern_acc": ev["flexattn_pattern"], "count_acc": ev["flexattn_count"],
                "hit": ev["hit"], "frac": ev["frac"]}

    # the loop --------------------------------------------------------------------------------
    def save(self) -> None:
        state = {"model": self.module.state_dict(), "heads": self.heads.state_dict(),
                 "opt": self.opt.state_dict(), "step": self.step, "wall": self.wall_seconds(),
                 "config": self.config.to_json(), "curve": json.dumps(self.curve),
                 "commits": json.dumps(self.commits)}
        tmp = self.out / f".{CHECKPOINT}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.out / CHECKPOINT)

    def run(self, until: int | None = None, progress: bool = True) -> None:
        """Train to the config's last step (or stop after step ``until``, as a killed run
        would after its checkpoint)."""
        from tqdm import tqdm

        config = self.config
        end = min(config.steps, until) if until is not None else config.steps
        bar = tqdm(total=config.steps, initial=self.step, desc="train", unit="step",
                   dynamic_ncols=True, mininterval=2.0, disable=not progress)
        window = Metrics()
        with (self.out / "log.jsonl").open("a") as logf, \
                (self.out / "curve.jsonl").open("a") as curvef:
            while self.step < end:
                self.module.train()
                m = self.train_step(self.step)
                self.step += 1
                window.add(**m)
                logf.write(json.dumps({"step": self.step,
                                       **{k: round(v, 5) for k, v in m.items()}}) + "\n")
                if self.step % 20 == 0:
                    avg = window.mean()
                    bar.set_postfix({k: f"{avg[k]:.2f}" for k in (
                        "ce", "att", "contrast", "route", "read", "pattern_own",
                        "pattern_forced", "count_own", "hit", "frac") if k in avg})
                    window = Metrics()
                bar.update(1)
                if self.step % config.eval_every == 0 or self.step == config.steps:
                    ev = self.evaluate()
                    self.curve.append(ev)
                    curvef.write(json.dumps(ev) + "\n")
                    curvef.flush()
                    bar.write(f"eval at step {self.step}: " + ", ".join(
                        f"{k} {v:.3f}" for k, v in ev.items() if k != "step"))
                if self.step % config.checkpoint_every == 0 or self.step == config.steps:
                    self.save()
                logf.flush()
        bar.close()
        self.module.eval()

    def provenance(self, command: str, config_path: str | None) -> dict:
        return {"command": command, "config_file": config_path, "config": self.config.to_dict(),
                "seed": self.config.seed, "commit": self.commits[-1]["commit"],
                "commits": self.commits, "steps": self.step,
                "samples": self.step * self.config.batch_size,
                "wall_seconds": round(self.wall_seconds(), 1), "threads": self.config.threads,
                "torch": torch.__version__, "curve": self.curve,
                "date": time.strftime("%Y-%m-%d")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the recipe (synthhr/configs/mini.toml)")
    p.add_argument("--out", required=True,
                   help="run folder (checkpoint, logs, curve); the run resumes if present")
    p.add_argument("--export", default=None,
                   help="the trained, calibrated model's folder (default: OUT/model)")
    p.add_argument("--seed", type=int, default=None, help="replaces the config's seed")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = load_config(args.config)
        if args.seed is not None:
            config = config.with_seed(args.seed)
    except (ConfigError, OSError) as exc:
        p.error(str(exc))
    words = argv if argv is not None else sys.argv[1:]
    command = " ".join([COMMAND, *words])
    try:
        trainer = Trainer(config, args.out, command)
    except ConfigError as exc:
        p.error(str(exc))
    trainer.run()
    from .calibrate import run as calibrate

    target = Path(args.export) if args.export else Path(args.out) / "model"
    export(trainer.model, target, trainer.provenance(command, args.config))
    c = config.calibrate
    record = calibrate(target, c["seed"], c["images"], c["max_frac"], c["min_hit"])
    if record["chosen"] is None:
        print("no candidate threshold passes; the model keeps its threshold", file=sys.stderr)
        return 1
    print(f"exported to {target} (threshold {record['chosen']:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
