"""Training recipe of the SynthHR mini LLaVA-FlexAttn (``models/synthhr-mini``).

    python -m flexattn.train --out runs/synthhr-mini --export models/synthhr-mini

Every step is one batch of SynthHR questions (``flexattn.synthhr``; images drawn on the fly,
sample ``i`` a function of ``(seed, i)``) through ``LlavaFlexAttn.teacher_forward``: prompt
plus answer in one forward that predicts each answer token exactly as ``generate``'s decode
step does, selection included. Selection is a hard threshold, so these signals teach the
two halves of the task:

- **finding the box** (no gradient reaches it through the answer): a cross-entropy between
  the attention of each answer row over the 576 image tokens in every layer whose selection
  is read (summed over heads, renormalised) and the low-res tokens of the named box (pattern
  questions) or of all boxes (count questions; ``--count-attention corner``: the first
  low-res token, so that a count question selects one cell). That alone taught "look at
  boxes", not "look at the named one": the question's colour never reached the query that
  selects. Two more terms fix that (``--route-weight``, ``--contrast-weight``): the layers
  before s attend from each answer row to the colour word, and layer s's attention on the
  named box is pushed up against its attention on the other boxes;
- **reading it**: for a share of the samples that falls from 1 to ``oracle_floor`` over
  ``oracle_steps``, the box's own cells are put in place of the model's selection, so the
  answer's gradient reaches the high-res path before the model finds boxes on its own;
- **features**: linear probes, dropped after training, ask the CLIP features for each low-res
  token's box colour and each high-res token's pattern, and the decoder's last hidden state
  for the border colours the image holds (the number of boxes is the number of colours).

High-resolution features reach ``k_proj_hd`` / ``v_proj_hd`` without a norm, so the projector
starts at the scale of a normalised hidden state and the two projections learn faster than
the rest (``--hd-lr-scale``).

Checkpoints (``OUT/checkpoint.pt``, every ``--checkpoint-every`` steps and at the end) hold
the model, probes, optimiser and step, so a stopped run resumes where it stopped with the same
data. ``export`` writes the original LLaVA-FlexAttn layout with the CLIP tower beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from . import synthhr
from .config import FlexAttnConfig
from .conversation import llava_v1_prompt
from .generate import LlavaFlexAttn
from .model import LlavaFlexAttnForCausalLM
from .selection import to_blocks
from .tokenizer import PromptTokenizer

log = logging.getLogger(__name__)

FEATURE_SCALE = 4.0
ANSWER_SUFFIX = "Answer the question using a single word or phrase."
CHECKPOINT = "checkpoint.pt"

# model shapes: the real 336/1008 geometry, 24x24 and 72x72 grids, 9x9 cells
PRESETS = {
    "mini": {"hidden": 128, "heads": 4, "intermediate": 352, "layers": 3, "select_layer": 1,
             "vocab": 700, "clip_hidden": 64, "clip_heads": 4, "clip_intermediate": 256,
             "clip_layers": 1},
    "tiny": {"hidden": 32, "heads": 2, "intermediate": 64, "layers": 3, "select_layer": 1,
             "vocab": 700, "clip_hidden": 16, "clip_heads": 2, "clip_intermediate": 32,
             "clip_layers": 1},
}


def question_prompt(question: str) -> str:
    """A SynthHR question the way the RSVQA job asks it."""
    return llava_v1_prompt(f"{question}\n{ANSWER_SUFFIX}")


def tokenizer_corpus() -> tuple[str, ...]:
    """The English corpus of the demo tokenizer plus every SynthHR prompt and answer, so that
    colours and answers are single pieces."""
    from .demo_model import _CORPUS

    lines = list(_CORPUS)
    questions = [synthhr.PATTERN_QUESTION.format(colour=c) for c in synthhr.COLOURS]
    questions.append(synthhr.COUNT_QUESTION)
    answers = [*synthhr.PATTERNS, *synthhr.COUNT_WORDS.values()]
    for q in questions:
        lines += [question_prompt(q).replace("<image>", "") + f" {a}" for a in answers]
    lines += [" ".join(answers)] * 20
    return tuple(lines)


def build_model(preset: str, seed: int, workdir: Path) -> LlavaFlexAttn:
    """A freshly initialised model of ``preset`` with a sentencepiece tokenizer trained on
    ``tokenizer_corpus`` (written under ``workdir``)."""
    from transformers import CLIPVisionConfig

    from .demo_model import train_tiny_tokenizer

    p = PRESETS[preset]
    train_tiny_tokenizer(workdir, vocab_size=p["vocab"], corpus=tokenizer_corpus())
    tok = PromptTokenizer.from_dir(workdir)
    cfg = FlexAttnConfig(
        vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["intermediate"],
        num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
        num_key_value_heads=p["heads"], mm_hidden_size=p["clip_hidden"],
        mm_vision_select_layer=-1, select_layer=p["select_layer"])
    vc = CLIPVisionConfig(hidden_size=p["clip_hidden"], intermediate_size=p["clip_intermediate"],
                          num_hidden_layers=p["clip_layers"], num_attention_heads=p["clip_heads"],
                          projection_dim=p["clip_hidden"], image_size=cfg.lowres_size,
                          patch_size=cfg.patch_size, hidden_act="quick_gelu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = LlavaFlexAttnForCausalLM(cfg, vc)
        nn.init.normal_(module.model.embed_tokens.weight, std=0.5)
        # high-res features reach k_proj_hd / v_proj_hd without a norm: start them at the
        # scale of a normalised hidden state (norm ~ sqrt(hidden)), not ~3, or the high-res
        # keys and values are too small for the answer's gradient to find them
        with torch.no_grad():
            module.model.mm_projector[2].weight.mul_(FEATURE_SCALE)
            module.model.mm_projector[2].bias.mul_(FEATURE_SCALE)
    return LlavaFlexAttn(module, tok, model_id=f"synthhr-{preset}")


# ------------------------------------------------------------------------------------------
# data

@dataclass
class Sample:
    image: Image.Image
    question: synthhr.Question
    boxes: tuple[synthhr.Box, ...]


class SceneStream:
    """Training sample ``i`` of ``seed``: a SynthHR scene and one of its two questions. A
    background (the costly part of a scene) serves ``reuse`` consecutive samples under new
    boxes, patterns and questions."""

    def __init__(self, seed: int, reuse: int = 4, pattern_share: float = 0.5) -> None:
        self.seed, self.reuse, self.pattern_share = seed, reuse, pattern_share
        self._bg: tuple[int, np.ndarray] | None = None

    def background(self, k: int) -> np.ndarray:
        if self._bg is None or self._bg[0] != k:
            rng = np.random.default_rng([self.seed, 1, k])
            self._bg = (k, np.clip(np.rint(synthhr.background(rng)), 30, 225).astype(np.uint8))
        return self._bg[1]

    def sample(self, i: int) -> Sample:
        rng = np.random.default_rng([self.seed, 2, i])
        scene = synthhr.draw_boxes(self.background(i // self.reuse).copy(), rng)
        pattern, count = synthhr.scene_questions(scene, f"train-{i}")
        q = pattern if rng.random() < self.pattern_share else count
        return Sample(Image.fromarray(scene.image), q, scene.boxes)


def lowres_labels(boxes, grid: int) -> torch.Tensor:
    """[grid * grid] class per low-res token: 1 + colour index of a box it overlaps, else 0."""
    labels = np.zeros((grid, grid), dtype=np.int64)
    names = list(synthhr.COLOURS)
    for box in boxes:
        labels[synthhr.box_mask(box, grid)] = 1 + names.index(box.colour)
    return torch.from_numpy(labels.reshape(-1))


def highres_labels(boxes, grid: int) -> torch.Tensor:
    """[grid * grid] per high-res token: 1 + pattern index when the token lies inside a box's
    interior, -100 (ignored) when it only overlaps one, 0 elsewhere."""
    labels = np.zeros((grid, grid), dtype=np.int64)
    cell = synthhr.SIZE / grid
    for box in boxes:
        labels[synthhr.box_mask(box, grid, inset=synthhr.BORDER)] = -100
        a = box.x0 + synthhr.BORDER
        b = box.y0 + synthhr.BORDER
        n = box.side - 2 * synthhr.BORDER
        c0, c1 = math.ceil(a / cell), math.floor((a + n) / cell)  # tokens fully inside
        r0, r1 = math.ceil(b / cell), math.floor((b + n) / cell)
        if c1 > c0 and r1 > r0:
            labels[r0:r1, c0:c1] = 1 + synthhr.PATTERNS.index(box.pattern)
    return torch.from_numpy(labels.reshape(-1))


def asked_boxes(sample: Sample) -> tuple[synthhr.Box, ...]:
    """The boxes a question is about: the named one, or all of them (count)."""
    if sample.question.type == "pattern":
        return (sample.boxes[sample.question.target],)
    return sample.boxes


COUNT_ATTENTION = ("boxes", "corner", "corner-boxes")


def attention_target(sample: Sample, grid: int, count_attention: str = "boxes") -> torch.Tensor:
    """[grid * grid] distribution layer s's attention is pulled toward: evenly over the low-res
    tokens of the boxes the question is about; for a count question with ``count_attention``
    "corner", the first low-res token alone (a fixed spot: one cell, one tile), with
    "corner-boxes" half there and half over the boxes."""
    t = np.zeros((grid, grid))
    corner = sample.question.type == "count" and count_attention != "boxes"
    if not corner or count_attention == "corner-boxes":
        for box in asked_boxes(sample):
            t[synthhr.box_mask(box, grid)] = 1
    if corner:
        t = t / max(t.sum(), 1.0)
        t[0, 0] += 1.0
    return torch.from_numpy(t.reshape(-1) / t.sum()).float()


def colour_slots(samples: list[Sample], answers: list[list[int]], tok: PromptTokenizer,
                 width: int) -> torch.Tensor:
    """[B] the slot of each pattern question's colour word in the teacher-forced sequence of
    ``width`` slots (left padding, the prompt with its image token expanded, the answer but
    its last token); -1 for count questions."""
    slots = torch.full((len(samples),), -1)
    for i, s in enumerate(samples):
        if s.question.type != "pattern":
            continue
        ids = tok.encode_prompt(question_prompt(s.question.question))
        colour = tok.encode_text(s.boxes[s.question.target].colour)
        at = [k for k in range(len(ids)) if ids[k:k + len(colour)] == colour]
        if not at:
            raise ValueError(f"{s.question.question!r}: the colour is not a token run of"
                             " its prompt")
        slots[i] = width - (len(ids) - at[-1] + len(answers[i]) - 1)
    return slots


def oracle_cells(sample: Sample, grid: int = 9) -> torch.Tensor:
    """[grid * grid] bool: the cells put in place of the model's selection: the interiors of
    the boxes the question is about."""
    m = np.zeros((grid, grid), dtype=bool)
    for box in asked_boxes(sample):
        m |= synthhr.box_mask(box, grid, inset=synthhr.BORDER)
    return torch.from_numpy(m.reshape(-1))


# ------------------------------------------------------------------------------------------
# the recipe

@dataclass
class Recipe:
    out: str  # run folder: checkpoint.pt, log.jsonl, tokenizer
    seed: int = 0
    preset: str = "mini"
    steps: int = 6000
    batch_size: int = 8
    lr: float = 2e-3
    warmup: int = 100
    attn_weight: float = 1.0
    probe_weight: float = 0.5
    oracle_steps: int = 1500  # the forced share falls from 1 to oracle_floor over these steps
    oracle_floor: float = 0.15
    checkpoint_every: int = 100  # steps between checkpoints (a stopped run resumes there)
    eval_every: int = 500
    eval_images: int = 16  # scenes per evaluation, two questions each
    eval_seed: int = 1  # validation scenes; training draws from `seed`
    threads: int = 2
    reuse: int = 4  # samples drawn on one background
    clip: float = 1.0  # gradient norm clipping
    pattern_share: float = 0.5  # pattern questions among the samples (the rest: count)
    presence_weight: float = 1.0  # the colours-present probe on the last hidden state
    hd_lr_scale: float = 3.0  # learning rate of k_proj_hd / v_proj_hd relative to --lr
    # -log of each pattern answer row's attention, in every FlexAttention layer, on the
    # high-res tokens inside the named box's interior: pulls the reading onto the pattern
    # (0: off)
    read_weight: float = 0.0
    # -log of the named box's share of the attention layer s gives to all boxes, per pattern
    # answer row: the attention must tell the named box from the others, or the selection
    # lights every box (0: off)
    contrast_weight: float = 0.0
    # a linear probe asks the hidden state entering layer s, at each pattern answer row, for
    # the colour the question names: the query that selects must carry it (0: off)
    query_weight: float = 0.0
    # where layer s looks for a count question: "boxes" (all of them), "corner" (the first
    # low-res token only; counting reads no high-res detail, so one cell is all it costs) or
    # "corner-boxes" (half on that token, half spread over the boxes: the selection, which
    # keeps what is near the map's peak, takes the corner cell, and layer s still reads every
    # box, which counting needs)
    count_attention: str = "boxes"
    # -log of each pattern answer row's attention (mean over heads) on the colour word of the
    # question, in every layer before s: the colour must reach the query that selects, and a
    # loss on the attention itself still has a gradient where the softmax saturated (0: off)
    route_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for name in ("steps", "batch_size", "checkpoint_every", "eval_every", "threads",
                     "reuse"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got"
                                 f" {getattr(self, name)}")
        if self.count_attention not in COUNT_ATTENTION:
            raise ValueError(f"--count-attention must be one of {COUNT_ATTENTION}, got"
                             f" {self.count_attention!r}")
        if not 0 <= self.oracle_floor <= 1:
            raise ValueError(f"--oracle-floor must be within [0, 1], got {self.oracle_floor}")

    def oracle_share(self, step: int) -> float:
        if step >= self.oracle_steps:
            return self.oracle_floor
        return 1.0 - (1.0 - self.oracle_floor) * step / self.oracle_steps

    def learning_rate(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        done = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))


class FeatureProbes(nn.Module):
    """Training-only linear probes on the projected CLIP features: box colour per low-res
    token (7 classes, 0 = none), pattern per high-res token (5 classes, 0 = none), and which
    border colours the image holds from the decoder's last hidden state at the first answer
    row (counting boxes is counting the colours present), and the colour a pattern question
    names from the hidden state entering layer s."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.colour = nn.Linear(hidden, 1 + len(synthhr.COLOURS))
        self.pattern = nn.Linear(hidden, 1 + len(synthhr.PATTERNS))
        self.presence = nn.Linear(hidden, len(synthhr.COLOURS))
        self.query = nn.Linear(hidden, len(synthhr.COLOURS))  # added with --query-weight

    def first_params(self) -> list[nn.Parameter]:
        """Every probe but the query probe (the optimiser's first group; checkpoints from
        before the query probe hold no state for it)."""
        return [p for n, p in self.named_parameters() if not n.startswith("query.")]


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
    """A run: model, probes, optimiser and data stream of ``recipe``, resumed from
    ``OUT/checkpoint.pt`` when there is one. ``stages`` records each command the run was
    started or resumed with under a different recipe: the step it took over at, the command
    and the commit of the code (a run resumed with a changed flag is a new stage)."""

    def __init__(self, recipe: Recipe, command: str = "") -> None:
        self.recipe = recipe
        self.out = Path(recipe.out)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(recipe.threads)
        self.model = build_model(recipe.preset, recipe.seed, self.out / "tokenizer")
        self.module = self.model.module
        self.probes = FeatureProbes(self.model.config.hidden_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed + 1)
            for p in self.probes.parameters():
                nn.init.normal_(p, std=0.02)
        hd = [p for n, p in self.module.named_parameters() if "_proj_hd." in n]
        rest = [p for n, p in self.module.named_parameters() if "_proj_hd." not in n]
        self.opt = torch.optim.AdamW(
            [{"params": rest + self.probes.first_params(), "scale": 1.0},
             {"params": hd, "scale": recipe.hd_lr_scale}],
            lr=recipe.lr, weight_decay=0.0, betas=(0.9, 0.98))
        query_group = {"params": list(self.probes.query.parameters()), "scale": 1.0}
        self.step = 0
        self.elapsed = 0.0
        self.stream = SceneStream(recipe.seed, recipe.reuse, recipe.pattern_share)
        self.eval_log: list[dict] = []
        self.commit = git_commit()  # of the code the run started with
        self.stages = [{"from_step": 0, "command": command, "commit": self.commit}]
        ckpt = self.out / CHECKPOINT
        if ckpt.is_file():
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            self.module.load_state_dict(state["model"])
            missing = self.probes.load_state_dict(state["probes"], strict=False).missing_keys
            if any(not k.startswith("query.") for k in missing):
                raise RuntimeError(f"{ckpt}: probes missing {missing}")
            if len(state["opt"]["param_groups"]) == 2:  # from before the query probe
                self.opt.load_state_dict(state["opt"])
                self.opt.add_param_group(query_group)
            else:
                self.opt.add_param_group(query_group)
                self.opt.load_state_dict(state["opt"])
            self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
            self.eval_log = json.loads(state["eval_log"])
            self.commit = state["commit"]
            before = json.loads(state["recipe"])
            self.stages = json.loads(state.get("stages") or "null") or [
                {"from_step": 0, "command": "", "commit": self.commit}]
            changed = {k: v for k, v in asdict(recipe).items()
                       if k not in ("out", "threads") and before.get(k) != v}
            if changed:
                self.stages.append({"from_step": self.step, "command": command,
                                    "commit": git_commit(), "changed": changed})
            log.info("resumed %s at step %d (%.0f s trained)", ckpt, self.step, self.elapsed)
        else:
            self.opt.add_param_group(query_group)

    # one step ------------------------------------------------------------------------------
    def batch(self, step: int) -> list[Sample]:
        b = self.recipe.batch_size
        return [self.stream.sample(step * b + k) for k in range(b)]

    def train_step(self, step: int) -> dict[str, float]:
        recipe, cfg, tok = self.recipe, self.model.config, self.model.tokenizer
        samples = self.batch(step)
        rng = np.random.default_rng([recipe.seed, 3, step])
        forced_on = torch.from_numpy(rng.random(len(samples)) < recipe.oracle_share(step))
        answers = [tok.encode_text(s.question.answer) + [tok.eos_id] for s in samples]
        rows = max(len(a) for a in answers)
        forced = torch.stack([oracle_cells(s, cfg.pool_grid) for s in samples])
        final: list[torch.Tensor] = []
        readers = [layer.self_attn for layer in self.module.model.layers
                   if layer.self_attn.is_flex]
        for attn in readers:
            attn.hr_read = None
        entering: list[torch.Tensor] = []  # the hidden state entering layer s
        attn_inputs: list[tuple] = []  # (x, cos, sin, key_valid) of the layers before s
        hooks = [self.module.model.norm.register_forward_hook(
            lambda _m, args, _out: final.append(args[0]))]
        if recipe.query_weight:
            hooks.append(self.module.model.layers[cfg.select_layer - 1].register_forward_hook(
                lambda _m, _args, out: entering.append(out[0][:, -rows:])))
        if recipe.route_weight:
            for layer in self.module.model.layers[:cfg.select_layer]:
                hooks.append(layer.self_attn.register_forward_pre_hook(
                    lambda _m, args: attn_inputs.append((args[0], args[1], args[2], args[6]))))
        try:
            out = self.model.teacher_forward(
                [s.image for s in samples],
                [question_prompt(s.question.question) for s in samples],
                answers, forced=forced[:, None].expand(-1, rows, -1), forced_on=forced_on)
        finally:
            for hook in hooks:
                hook.remove()
        valid = out.targets >= 0  # [B, R]
        ce = F.cross_entropy(out.logits.flatten(0, 1), out.targets.flatten(), ignore_index=-100)
        # every selection some layer reads: layers s .. L-2 (the last one's is never used)
        target = torch.stack([attention_target(s, cfg.lr_grid, recipe.count_attention)
                              for s in samples])[:, None]
        att = 0.0
        for amap in out.record.maps[:-1]:  # [B, R, 576]
            p = amap / amap.sum(-1, keepdim=True).clamp_min(1e-12)
            att = att + -(target * torch.log(p + 1e-8)).sum(-1)[valid].mean()
        att = att / (len(out.record.maps) - 1)
        probe = self.probe_loss(samples, out)
        if recipe.presence_weight:
            first = valid.float().argmax(1)  # each sample's first answer row
            h = final[0][torch.arange(len(samples)), first]  # [B, hidden]
            names = list(synthhr.COLOURS)
            present = torch.zeros(len(samples), len(names))
            for i, s in enumerate(samples):
                present[i, [names.index(b.colour) for b in s.boxes]] = 1.0
            probe = probe + recipe.presence_weight * F.binary_cross_entropy_with_logits(
                self.probes.presence(h), present)
        read = self.read_loss(samples, readers, valid) if recipe.read_weight else None
        contrast = (self.contrast_loss(samples, out.record.maps[:-1], valid)
                    if recipe.contrast_weight else None)
        query = self.query_loss(samples, entering[0], valid) if entering else None
        route = self.route_loss(samples, answers, attn_inputs, valid) if attn_inputs else None
        loss = ce + recipe.attn_weight * att + recipe.probe_weight * probe
        for weight, term in ((recipe.read_weight, read), (recipe.contrast_weight, contrast),
                             (recipe.query_weight, query), (recipe.route_weight, route)):
            if term is not None:
                loss = loss + weight * term
        for group in self.opt.param_groups:
            group["lr"] = recipe.learning_rate(step) * group["scale"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), recipe.clip)
        self.opt.step()
        metrics = self.step_metrics(samples, out, forced_on, ce, att, probe)
        for name, term in (("read", read), ("contrast", contrast), ("query", query),
                           ("route", route)):
            if term is not None:
                metrics[name] = float(term.detach())
        return metrics

    def contrast_loss(self, samples: list[Sample], maps: list[torch.Tensor],
                      valid: torch.Tensor) -> torch.Tensor | None:
        """Mean over the maps ([B, R, G*G], one per layer whose selection is read) and the
        answer rows of pattern questions about a scene with other boxes of -log(attention on
        the named box / attention on all boxes); None when the batch has no such row."""
        grid = self.model.config.lr_grid
        named, boxes = [], []
        for s in samples:
            masks = [torch.from_numpy(synthhr.box_mask(b, grid).reshape(-1)) for b in s.boxes]
            named.append(masks[s.question.target] if s.question.type == "pattern"
                         else torch.zeros(grid * grid, dtype=torch.bool))
            boxes.append(torch.stack(masks).any(0))
        named_t, boxes_t = torch.stack(named)[:, None].float(), torch.stack(boxes)[:, None].float()
        rows = valid & ((boxes_t - named_t).amax(-1) > 0) & (named_t.amax(-1) > 0)  # [B, R]
        if not rows.any():
            return None
        terms = []
        for amap in maps:
            on_named = (amap * named_t).sum(-1)
            on_boxes = (amap * boxes_t).sum(-1)
            terms.append(-torch.log(on_named[rows] / (on_boxes[rows] + 1e-12) + 1e-6).mean())
        return sum(terms) / len(terms)

    def route_loss(self, samples: list[Sample], answers: list[list[int]], inputs: list[tuple],
                   valid: torch.Tensor) -> torch.Tensor | None:
        """Mean over the layers before s (``inputs``: each one's attention input, rotary
        tables and key mask) and the pattern answer rows of -log(the row's attention, mean over
        heads, on the question's colour word)."""
        r = valid.shape[1]
        width = inputs[0][0].shape[1]
        target = colour_slots(samples, answers, self.model.tokenizer, width)
        rows = valid & (target >= 0)[:, None]
        if not rows.any():
            return None
        terms = []
        for (x, cos, sin, key_valid), layer in zip(inputs, self.module.model.layers):
            attn = layer.self_attn
            b, h, d = x.shape[0], attn.num_heads, attn.head_dim
            hkv = attn.num_kv_heads
            q = attn.q_proj(x[:, -r:]).view(b, r, h, d).transpose(1, 2)
            k = attn.k_proj(x).view(b, width, hkv, d).transpose(1, 2)
            q, _ = apply_rotary_pos_emb(q, q, cos[:, -r:], sin[:, -r:])
            _, k = apply_rotary_pos_emb(k, k, cos, sin)
            k = k.repeat_interleave(h // hkv, dim=1)
            scores = torch.matmul(q, k.transpose(-1, -2)).float() * d ** -0.5  # [B, H, R, S]
            slot = torch.arange(width).view(1, -1)
            row_slot = torch.arange(width - r, width).view(-1, 1)
            allowed = key_valid[:, None, None, :] & (slot <= row_slot)[None, None]
            probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
            on = probs.mean(1).gather(-1, target.clamp_min(0).view(-1, 1, 1).expand(-1, r, 1))
            terms.append(-torch.log(on[..., 0][rows] + 1e-6).mean())
        return sum(terms) / len(terms)

    def query_loss(self, samples: list[Sample], hidden: torch.Tensor,
                   valid: torch.Tensor) -> torch.Tensor | None:
        """Cross-entropy of the query probe on the hidden state entering layer s ([B, R,
        hidden], the answer rows) against the colour each pattern question names."""
        names = list(synthhr.COLOURS)
        colour = torch.tensor([names.index(s.boxes[s.question.target].colour)
                               if s.question.type == "pattern" else -100 for s in samples])
        labels = torch.where(valid, colour[:, None], torch.full_like(valid, -100, dtype=torch.long))
        if not (labels >= 0).any():
            return None
        return F.cross_entropy(self.probes.query(hidden).flatten(0, 1), labels.flatten(),
                               ignore_index=-100)

    def read_loss(self, samples: list[Sample], readers: list, valid: torch.Tensor
                  ) -> torch.Tensor | None:
        """Mean over FlexAttention layers and pattern answer rows of -log(the row's attention
        on the high-res tokens inside the named box); None when no row read any of them."""
        cfg = self.model.config
        inside = torch.stack([
            highres_labels(asked_boxes(s), cfg.hr_grid) > 0 if s.question.type == "pattern"
            else torch.zeros(cfg.hr_tokens, dtype=torch.bool) for s in samples])
        inside = to_blocks(inside, cfg.hr_grid, cfg.pool_grid)  # [B, P*P, 64]
        terms = []
        for attn in readers:
            if attn.hr_read is None:
                continue
            probs, order = attn.hr_read  # [B, R, N], [B, N / 64]
            b = torch.arange(len(samples)).view(-1, 1)
            target = inside[b, order].flatten(1)  # [B, N]
            mass = (probs * target[:, None, :]).sum(-1)  # [B, R]
            rows = valid & target.any(1, keepdim=True)
            if rows.any():
                terms.append(-torch.log(mass[rows] + 1e-6).mean())
        return sum(terms) / len(terms) if terms else None

    def probe_loss(self, samples: list[Sample], out) -> torch.Tensor:
        cfg = self.model.config
        lr_labels = torch.stack([lowres_labels(s.boxes, cfg.lr_grid) for s in samples])
        loss = F.cross_entropy(self.probes.colour(out.vision.f_lr).flatten(0, 1),
                               lr_labels.flatten())
        done = out.hr.tile_done  # [B, Z*Z] -> the blocks of encoded tiles
        b, z = done.shape[0], cfg.zoom_ratio
        per = cfg.pool_grid // z
        enc = done.view(b, z, 1, z, 1).expand(b, z, per, z, per).reshape(b, -1)
        if enc.any():
            hr_labels = torch.stack([highres_labels(s.boxes, cfg.hr_grid) for s in samples])
            labels = to_blocks(hr_labels, cfg.hr_grid, cfg.pool_grid)[enc]  # [n, 64]
            logits = self.probes.pattern(out.hr.blocks[enc])  # [n, 64, 5]
            if (labels >= 0).any():
                loss = loss + F.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                              ignore_index=-100)
        return loss

    def step_metrics(self, samples, out, forced_on, ce, att, probe) -> dict[str, float]:
        cfg = self.model.config
        first = (out.targets >= 0).float().argmax(1)  # each sample's first answer row
        b = len(samples)
        pred = out.logits[torch.arange(b), first].argmax(-1)
        right = (pred == out.targets[torch.arange(b), first]).tolist()
        own = out.record.masks[0][torch.arange(b), first]  # [B, 81] layer s's own selection
        ce, att, probe = float(ce.detach()), float(att.detach()), float(probe.detach())
        m = {"loss": ce + att + probe, "ce": ce, "att": att, "probe": probe,
             "frac": float(own.float().mean())}
        for kind in ("pattern", "count"):
            for regime, on in (("own", False), ("forced", True)):
                idx = [i for i, s in enumerate(samples)
                       if s.question.type == kind and bool(forced_on[i]) == on]
                if idx:
                    m[f"{kind}_{regime}"] = sum(right[i] for i in idx) / len(idx)
        hits = [bool(own[i, synthhr.centre_cell(s.boxes[s.question.target], cfg.pool_grid)])
                for i, s in enumerate(samples) if s.question.type == "pattern"]
        if hits:
            m["hit"] = sum(hits) / len(hits)
        return m

    # evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, images: int | None = None, batch: int = 8) -> dict[str, float]:
        """Generate (greedy, the model's own selection) on ``images`` scenes of the eval seed,
        both questions each, in flexattn and lowres mode."""
        return evaluate_model(self.model, self.recipe.eval_seed,
                              images or self.recipe.eval_images, batch)

    # the loop -------------------------------------------------------------------------------
    def save(self) -> None:
        state = {"model": self.module.state_dict(), "probes": self.probes.state_dict(),
                 "opt": self.opt.state_dict(), "step": self.step, "elapsed": self.elapsed,
                 "recipe": json.dumps(asdict(self.recipe)), "eval_log": json.dumps(self.eval_log),
                 "commit": self.commit, "stages": json.dumps(self.stages)}
        tmp = self.out / f".{CHECKPOINT}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.out / CHECKPOINT)

    def run(self) -> None:
        from tqdm import tqdm

        recipe = self.recipe
        bar = tqdm(total=recipe.steps, initial=self.step, desc="train", unit="step",
                   dynamic_ncols=True, mininterval=2.0)
        window = Metrics()
        with (self.out / "log.jsonl").open("a") as logf:
            while self.step < recipe.steps:
                t0 = time.perf_counter()
                self.module.train()
                m = self.train_step(self.step)
                self.step += 1
                self.elapsed += time.perf_counter() - t0
                window.add(**m)
                logf.write(json.dumps({"step": self.step, "elapsed": round(self.elapsed, 1),
                                       **{k: round(v, 4) for k, v in m.items()}}) + "\n")
                if self.step % 20 == 0:
                    avg = window.mean()
                    bar.set_postfix({k: f"{avg[k]:.2f}" for k in (
                        "ce", "att", "contrast", "route", "pattern_own", "pattern_forced",
                        "count_own", "hit", "frac")
                        if k in avg})
                    window = Metrics()
                bar.update(1)
                if self.step % recipe.eval_every == 0 or self.step == recipe.steps:
                    t1 = time.perf_counter()
                    self.module.eval()
                    ev = {"step": self.step, "elapsed": round(self.elapsed, 1), **self.evaluate()}
                    self.eval_log.append(ev)
                    logf.write(json.dumps({"eval": ev}) + "\n")
                    bar.write(f"eval at step {self.step}: " + ", ".join(
                        f"{k} {v:.3f}" for k, v in ev.items() if k not in ("step", "elapsed")))
                    self.elapsed += time.perf_counter() - t1
                if self.step % recipe.checkpoint_every == 0 or self.step == recipe.steps:
                    self.save()
                logf.flush()
        bar.close()
        self.module.eval()


def evaluate_model(model: LlavaFlexAttn, seed: int, images: int, batch: int = 8,
                   modes: tuple[str, ...] = ("flexattn", "lowres")) -> dict[str, float]:
    """Accuracy per question type and mode, how often the named box's centre cell was among
    the cells used, and the mean selected fraction, on SynthHR scenes 0..images-1 of
    ``seed``."""
    def normalize_answer(text: str) -> str:  # single-word answers
        return text.strip().strip(".").lower()

    questions, pictures = [], []
    for index in range(images):
        scene = synthhr.draw_scene(seed, index)
        for q in synthhr.scene_questions(scene, f"eval-{index}"):
            questions.append((q, scene))
            pictures.append(Image.fromarray(scene.image))
    result: dict[str, float] = {}
    for mode in modes:
        right = {"pattern": [], "count": []}
        hits, fracs = [], []
        for k in range(0, len(questions), batch):
            chunk = questions[k:k + batch]
            gens = model.generate(pictures[k:k + batch],
                                  [question_prompt(q.question) for q, _ in chunk],
                                  max_new_tokens=4, mode=mode)
            for (q, scene), g in zip(chunk, gens):
                right[q.type].append(normalize_answer(g.text) == normalize_answer(q.answer))
                if mode == "flexattn":
                    fracs.append(g.hr_selected_frac)
                    if q.type == "pattern":
                        box = scene.boxes[q.target]
                        hits.append(g.hr_cells[synthhr.centre_cell(box)])
        for kind, values in right.items():
            result[f"{mode}_{kind}"] = sum(values) / len(values)
        if mode == "flexattn":
            result["hit"] = sum(hits) / len(hits)
            result["frac"] = sum(fracs) / len(fracs)
    return result


# ------------------------------------------------------------------------------------------
# export

TOWER_DIR = "vision_tower"


def git_commit(start: Path | None = None) -> str:
    """The commit checked out in the repository around ``start`` (this file's folder), read from
    ``.git`` directly; "unknown" outside a repository."""
    here = (start or Path(__file__)).resolve()
    for folder in (here, *here.parents):
        git = folder / ".git"
        if git.is_file():  # a worktree: "gitdir: PATH"
            git = Path(git.read_text().split(":", 1)[1].strip())
        if not git.is_dir():
            continue
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        common = git / "commondir"
        roots = [git] + ([git / common.read_text().strip()] if common.is_file() else [])
        for root in roots:
            if (root / ref).is_file():
                return (root / ref).read_text().strip()
            packed = root / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
        return "unknown"
    return "unknown"


def export(model: LlavaFlexAttn, out_dir: str | Path, provenance: dict) -> Path:
    """Write ``model`` in the original LLaVA-FlexAttn layout (float32 safetensors), its CLIP
    tower in ``OUT/vision_tower`` (``mm_vision_tower`` relative to the model folder), and
    ``provenance`` as ``OUT/training.json``."""
    from .original_layout import export_original

    out = Path(out_dir)
    export_original(model, out, tower_dir=TOWER_DIR)
    (out / "training.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flexattn.train", description=__doc__.split("\n\n")[0])
    defaults = Recipe(out="")
    p.add_argument("--out", required=True, help="run folder (checkpoint, log); resumes if present")
    for name in ("seed", "steps", "batch_size", "lr", "warmup", "attn_weight", "probe_weight",
                 "oracle_steps", "oracle_floor", "checkpoint_every", "eval_every",
                 "eval_images", "eval_seed", "threads", "reuse", "clip", "pattern_share",
                 "hd_lr_scale", "presence_weight", "read_weight", "contrast_weight",
                 "query_weight", "count_attention", "route_weight"):
        value = getattr(defaults, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value,
                       help=f"(default: {value})")
    p.add_argument("--preset", default=defaults.preset, choices=sorted(PRESETS))
    p.add_argument("--export", default=None, help="write the trained model here at the end")
    p.add_argument("--eval-after", type=int, default=0, metavar="N",
                   help="evaluate on N eval scenes at the end (default: none)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    fields = {k: v for k, v in vars(args).items() if k in Recipe.__dataclass_fields__}
    try:
        recipe = Recipe(**fields)
    except ValueError as exc:
        p.error(str(exc))
    command = "python -m flexattn.train " + " ".join(argv if argv is not None else sys.argv[1:])
    trainer = Trainer(recipe, command)
    started = time.perf_counter()
    trainer.run()
    final = trainer.evaluate(args.eval_after) if args.eval_after else None
    if final:
        print("final evaluation:", json.dumps(final))
    if args.export:
        export(trainer.model, args.export, {
            "command": command, "recipe": asdict(recipe), "commit": trainer.commit,
            "stages": trainer.stages,
            "steps": trainer.step, "samples": trainer.step * recipe.batch_size,
            "train_seconds": round(trainer.elapsed, 1),
            "this_run_seconds": round(time.perf_counter() - started, 1),
            "threads": recipe.threads, "torch": torch.__version__,
            "evaluations": trainer.eval_log, "final_evaluation": final,
            "date": time.strftime("%Y-%m-%d")})
        print(f"exported to {args.export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
