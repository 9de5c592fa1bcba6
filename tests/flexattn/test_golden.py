"""The original implementation's outputs on the tiny checkpoint (tests/data/golden) reproduced
through the original-layout loader, float32 on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexattn.selection import blocks_to_tokens
from flexattn.tokenizer import IMAGE_TOKEN_INDEX

from .conftest import CASES, PROMPT, golden_case


def test_prompt_tokens_match_original(golden_model):
    _, g = golden_case(CASES[0])
    ids = golden_model.tokenizer.encode_prompt(PROMPT)
    assert ids == g["input_ids"].tolist()
    assert ids.index(IMAGE_TOKEN_INDEX) == g["image_range"][0]


@pytest.mark.parametrize("name", CASES)
def test_flexattn_matches_original(golden_model, name):
    image, g = golden_case(name)
    assert list(image.size) == g["image_wh"].tolist()
    [out] = golden_model.generate([image], [PROMPT], max_new_tokens=12, return_logits=True,
                                  return_trace=True)
    assert out.token_ids == g["generated_ids"][1:].tolist()
    assert out.hr_selected_per_layer == g["hr_keys_used_per_step_layer"][0][9:12].tolist()
    torch.testing.assert_close(out.logits, torch.from_numpy(g["step_last_logits"]),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(out.logits[0], torch.from_numpy(g["prefill_last_logits"]),
                               atol=1e-4, rtol=0)
    # every selection made at every step by layers 8..11, over the 72x72 grid
    masks = blocks_to_tokens(out.trace["block_masks"].reshape(-1, 81), 72).view(12, 4, 5184)
    assert np.array_equal(masks.numpy(), g["step_select_masks"])
    torch.testing.assert_close(out.trace["maps"], torch.from_numpy(g["selection_attn"]),
                               atol=2e-4, rtol=1e-4)
    # high-res keys used per step in layers 9..11 are the masks of layers 8..10
    used = g["hr_keys_used_per_step_layer"][:, 9:12]
    assert np.array_equal(used, g["step_select_masks"][:, :3].sum(-1))
    # statistics derived from the same masks
    frac = used.sum() / (12 * 3 * 5184)
    assert out.hr_selected_frac == pytest.approx(frac, abs=1e-6)
    cells = out.trace["block_masks"][:, :3].any(0).any(0)
    assert out.hr_cells == cells.tolist()


@pytest.mark.parametrize("name", CASES)
def test_without_high_res_matches_original(golden_model_nohr, name):
    image, g = golden_case(name)
    [out] = golden_model_nohr.generate([image], [PROMPT], max_new_tokens=12, return_logits=True)
    assert out.token_ids == g["nohr_generated_ids"][1:].tolist()
    torch.testing.assert_close(out.logits, torch.from_numpy(g["nohr_step_last_logits"]),
                               atol=1e-4, rtol=0)
    assert out.hr_selected_per_layer == [0, 0, 0]
    assert out.hr_selected_frac == 0.0
    assert not any(out.hr_cells)


@pytest.mark.parametrize("name", CASES)
def test_vision_features_and_rope_tables(golden_model, name):
    image, g = golden_case(name)
    f_lr, f_hr = golden_model.encode_images([image], with_hr=True)
    torch.testing.assert_close(f_lr[0], torch.from_numpy(g["lr_image_features"]), atol=2e-5,
                               rtol=0)
    torch.testing.assert_close(f_hr[0], torch.from_numpy(g["hd_features"]), atol=2e-5, rtol=0)
    # rotary tables of the high-res keys: bicubic 24x24 -> 72x72 of the image tokens' tables
    from flexattn.selection import hr_rope_tables

    start = int(g["image_range"][0])
    pos = torch.arange(start, start + 576).view(1, -1)
    cos, sin = golden_model.module.rotary(torch.zeros(1), pos)
    hr_cos, hr_sin = hr_rope_tables(cos, sin, 72)
    torch.testing.assert_close(hr_cos[0], torch.from_numpy(g["hr_rope_cos"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(hr_sin[0], torch.from_numpy(g["hr_rope_sin"]), atol=1e-5, rtol=0)
    assert float(hr_cos.max()) > 1.0  # bicubic overshoot is kept, not clamped
