"""The teacher-forced training pass computes, for every answer token, what generate's matching
decode step computes: the same selection from that token's own attention at layer s, the same
high-res keys, the same logits."""

from __future__ import annotations

import pytest
import torch

from .conftest import CASES, PROMPT, golden_case
from .test_generate import mixed_inputs


def test_teacher_forced_logits_and_selections_equal_generate_steps(golden_model):
    images, prompts = mixed_inputs()
    images, prompts = images[:4], prompts[:4]
    steps = [8, 5, 3, 6]  # answers of different lengths: rows of the shorter ones are prompt
    gens = [golden_model.generate([im], [p], max_new_tokens=n, return_logits=True,
                                  return_trace=True)[0]
            for im, p, n in zip(images, prompts, steps)]
    answers = [g.token_ids for g in gens]
    with torch.no_grad():
        out = golden_model.teacher_forward(images, prompts, answers)
    r = max(steps)
    assert out.logits.shape == (4, r, golden_model.config.vocab_size)
    for i, (g, n) in enumerate(zip(gens, steps)):
        torch.testing.assert_close(out.logits[i, r - n:], g.logits, atol=1e-4, rtol=0)
        assert out.targets[i, r - n:].tolist() == g.token_ids
        assert (out.targets[i, :r - n] == -100).all()
        # every selecting layer's mask, row by row, is the one generate made at that step
        made = torch.stack(out.record.masks, 1)[i, :, r - n:].transpose(0, 1)  # [n, layers, 81]
        assert torch.equal(made, g.trace["block_masks"])
        maps = torch.stack(out.record.maps, 1)[i, :, r - n:].transpose(0, 1)
        torch.testing.assert_close(maps, g.trace["maps"], atol=1e-5, rtol=1e-4)
    # the selections really differ between rows, so each row used its own
    first = torch.stack(out.record.masks, 1)[0, 0]  # [rows, 81] of layer s, sample 0
    assert len({tuple(m.tolist()) for m in first}) > 1


def test_teacher_forward_has_gradients_and_takes_a_forced_selection(golden_model):
    image, _ = golden_case(CASES[0])
    [g] = golden_model.generate([image], [PROMPT], max_new_tokens=3)
    forced = torch.zeros(1, 3, 81, dtype=torch.bool)
    forced[0, :, 40] = True  # one block for every row
    module = golden_model.module
    try:
        module.train()
        out = golden_model.teacher_forward([image], [PROMPT], [g.token_ids], forced=forced,
                                           forced_on=torch.tensor([True]))
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1),
                                                 out.targets.flatten())
        loss.backward()
        flex_layer = module.model.layers[module.config.select_layer + 1].self_attn
        assert flex_layer.k_proj_hd.weight.grad.abs().sum() > 0  # the high-res path trains
        assert module.vision_tower.parameters().__next__().grad is not None
        # every FlexAttention layer read the forced block, whatever the model selected
        for used in out.record.used:
            assert torch.equal(used, forced)
        assert out.hr.tile_done.sum() == 1  # only the tile holding block 40 was encoded
    finally:
        module.zero_grad(set_to_none=True)
        module.eval()


def test_teacher_forward_refuses_empty_answers(golden_model):
    image, _ = golden_case(CASES[0])
    with pytest.raises(ValueError, match="non-empty answer"):
        golden_model.teacher_forward([image], [PROMPT], [[]])
