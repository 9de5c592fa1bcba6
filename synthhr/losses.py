"""The loss terms of a training step. Each reads ``LlavaFlexAttn.teacher_forward``'s output
(``return_activations=True``): no hooks, no state on the model's modules.

Selection is a hard threshold, so no gradient reaches "finding the box" through the answer:

- ``attention_loss``: cross-entropy between the attention of each answer row over the image
  tokens, in every layer whose selection is read, and the low-res tokens of the boxes the
  question is about (``data.attention_target``);
- ``contrast_loss``: layer s's attention on the named box against its attention on all boxes
  (or the selection lights every box);
- ``route_loss``: the layers before s attend from each answer row to the question's colour
  word (the colour must reach the query that selects);
- ``read_loss``: each pattern answer row's attention on the high-res tokens inside the named
  box's interior;
- ``presence_loss``: a training-only linear head (``Heads.presence``, dropped at export) asks
  the final hidden state which border colours the image holds (counting boxes is counting
  colours);
- ``feature_loss``: two more training-only heads ask the projected CLIP features for each
  low-res token's box colour and each encoded high-res token's pattern, so that the vision
  side learns what the answers need while the selection is still being found.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flexattn.config import FlexAttnConfig
from flexattn.generate import TeacherOutput
from flexattn.selection import to_blocks
from flexattn.tokenizer import PromptTokenizer

from . import task
from .data import Sample, asked_boxes, attention_target, colour_slots, highres_labels, lowres_labels


class Heads(nn.Module):
    """The training-only linear heads: which border colours an image holds, from the final
    hidden state of its first answer row (``presence``); the box colour of each low-res token
    (``colour``, 0 = none) and the pattern of each high-res token (``pattern``, 0 = none), from
    the projected CLIP features."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.presence = nn.Linear(hidden, len(task.COLOURS))
        self.colour = nn.Linear(hidden, 1 + len(task.COLOURS))
        self.pattern = nn.Linear(hidden, 1 + len(task.PATTERNS))


def answer_loss(out: TeacherOutput) -> torch.Tensor:
    """Cross-entropy of every answer token."""
    return F.cross_entropy(out.logits.flatten(0, 1), out.targets.flatten(), ignore_index=-100)


def attention_loss(samples: list[Sample], out: TeacherOutput, grid: int,
                   count_attention: str) -> torch.Tensor:
    """Mean over the maps of the layers whose selection is read (s .. L-2; the last one's is
    never used) of the cross-entropy against ``attention_target``."""
    valid = out.targets >= 0
    target = torch.stack([attention_target(s, grid, count_attention) for s in samples])[:, None]
    maps = out.activations.maps[:-1]  # [B, R, G*G] each
    att = 0.0
    for amap in maps:
        p = amap / amap.sum(-1, keepdim=True).clamp_min(1e-12)
        att = att + -(target * torch.log(p + 1e-8)).sum(-1)[valid].mean()
    return att / len(maps)


def contrast_loss(samples: list[Sample], out: TeacherOutput, grid: int) -> torch.Tensor | None:
    """Mean over the read maps and the answer rows of pattern questions about a scene with
    other boxes of -log(attention on the named box / attention on all boxes); None when the
    batch has no such row."""
    valid = out.targets >= 0
    named, boxes = [], []
    for s in samples:
        masks = [torch.from_numpy(task.box_mask(b, grid).reshape(-1)) for b in s.boxes]
        named.append(masks[s.question.target] if s.question.type == "pattern"
                     else torch.zeros(grid * grid, dtype=torch.bool))
        boxes.append(torch.stack(masks).any(0))
    named_t, boxes_t = torch.stack(named)[:, None].float(), torch.stack(boxes)[:, None].float()
    rows = valid & ((boxes_t - named_t).amax(-1) > 0) & (named_t.amax(-1) > 0)  # [B, R]
    if not rows.any():
        return None
    terms = []
    for amap in out.activations.maps[:-1]:
        on_named = (amap * named_t).sum(-1)
        on_boxes = (amap * boxes_t).sum(-1)
        terms.append(-torch.log(on_named[rows] / (on_boxes[rows] + 1e-12) + 1e-6).mean())
    return sum(terms) / len(terms)


def route_loss(samples: list[Sample], answers: list[list[int]], out: TeacherOutput,
               tok: PromptTokenizer) -> torch.Tensor | None:
    """Mean over the layers before s and the pattern answer rows of -log(the row's attention,
    mean over heads, on the question's colour word); None when the batch has no pattern
    question."""
    valid = out.targets >= 0
    maps = out.activations.row_attention  # [B, R, S] each (attention.attention_probs)
    r, width = valid.shape[1], maps[0].shape[-1]
    target = colour_slots(samples, answers, tok, width)
    rows = valid & (target >= 0)[:, None]
    if not rows.any():
        return None
    index = target.clamp_min(0).view(-1, 1, 1).expand(-1, r, 1)
    terms = [-torch.log(probs.gather(-1, index)[..., 0][rows] + 1e-6).mean() for probs in maps]
    return sum(terms) / len(terms)


def read_loss(samples: list[Sample], out: TeacherOutput, cfg: FlexAttnConfig
              ) -> torch.Tensor | None:
    """Mean over FlexAttention layers and pattern answer rows of -log(the row's attention on
    the high-res tokens inside the named box); None when no row read any of them."""
    valid = out.targets >= 0
    inside = torch.stack([
        highres_labels(asked_boxes(s), cfg.hr_grid) > 0 if s.question.type == "pattern"
        else torch.zeros(cfg.hr_tokens, dtype=torch.bool) for s in samples])
    inside = to_blocks(inside, cfg.hr_grid, cfg.pool_grid)  # [B, P*P, 64]
    terms = []
    for probs, order in out.activations.hr_read:  # [B, R, N], [B, N / 64]
        b = torch.arange(len(samples)).view(-1, 1)
        target = inside[b, order].flatten(1)  # [B, N]
        mass = (probs * target[:, None, :]).sum(-1)  # [B, R]
        rows = valid & target.any(1, keepdim=True)
        if rows.any():
            terms.append(-torch.log(mass[rows] + 1e-6).mean())
    return sum(terms) / len(terms) if terms else None


def presence_loss(samples: list[Sample], out: TeacherOutput, heads: Heads) -> torch.Tensor:
    """Binary cross-entropy of ``head`` on the final hidden state of each sample's first answer
    row against the border colours its image holds."""
    first = (out.targets >= 0).float().argmax(1)
    h = out.activations.final[torch.arange(len(samples)), first]  # [B, hidden]
    names = list(task.COLOURS)
    present = torch.zeros(len(samples), len(names))
    for i, s in enumerate(samples):
        present[i, [names.index(b.colour) for b in s.boxes]] = 1.0
    return F.binary_cross_entropy_with_logits(heads.presence(h), present)


def feature_loss(samples: list[Sample], out: TeacherOutput, heads: Heads, cfg: FlexAttnConfig
                 ) -> torch.Tensor:
    """Cross-entropy of ``heads.colour`` on every low-res feature against its box colour, plus
    that of ``heads.pattern`` on the high-res features of the tiles this step encoded against
    their pattern (tokens that only overlap a box's interior are left out)."""
    lr_labels = torch.stack([lowres_labels(s.boxes, cfg.lr_grid) for s in samples])
    loss = F.cross_entropy(heads.colour(out.vision.f_lr).flatten(0, 1), lr_labels.flatten())
    done = out.hr.tile_done if out.hr is not None else None  # [B, Z*Z]
    if done is None or not done.any():
        return loss
    b, z = done.shape[0], cfg.zoom_ratio
    per = cfg.pool_grid // z
    encoded = done.view(b, z, 1, z, 1).expand(b, z, per, z, per).reshape(b, -1)  # [B, P*P]
    hr_labels = torch.stack([highres_labels(s.boxes, cfg.hr_grid) for s in samples])
    labels = to_blocks(hr_labels, cfg.hr_grid, cfg.pool_grid)[encoded]  # [n, 64]
    if (labels >= 0).any():
        logits = heads.pattern(out.hr.blocks[encoded])  # [n, 64, patterns + 1]
        loss = loss + F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    return loss
