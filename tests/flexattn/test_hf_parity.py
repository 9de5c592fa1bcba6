"""With nothing selected, LLaVA-FlexAttn is plain LLaVA-1.5 on its own f_LR: checked against
transformers' LlavaForConditionalGeneration built from the same weights (the HF layout written by
tests/flexattn/checkpoints.py) and fed the same 336-px pixels."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from flexattn import load_model
from flexattn.image import lowres_view, normalise, prepare_image
from flexattn.tokenizer import IMAGE_TOKEN_INDEX

from .checkpoints import build_tiny_hf
from .conftest import CASES, GOLDEN_MODEL, PROMPT, golden_case


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return build_tiny_hf(tmp_path_factory.mktemp("hf") / "llava-1.5-tiny-hf", source=GOLDEN_MODEL)


@pytest.mark.parametrize("name", CASES)
def test_nothing_selected_equals_transformers_llava(golden_model_nohr, hf_dir, name):
    model = golden_model_nohr
    hf = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    image, _ = golden_case(name)
    cfg = model.config
    square, _ = prepare_image(image, cfg.highres_size, cfg.image_mean)
    pixels = lowres_view(normalise([square], cfg.image_mean, cfg.image_std), cfg.lowres_size)
    ids = model.tokenizer.encode_prompt(PROMPT)
    at = ids.index(IMAGE_TOKEN_INDEX)
    hf_ids = ids[:at] + [hf.config.image_token_id] * 576 + ids[at + 1:]
    with torch.inference_mode():
        out = hf.generate(input_ids=torch.tensor([hf_ids]), pixel_values=pixels,
                          attention_mask=torch.ones(1, len(hf_ids), dtype=torch.long),
                          max_new_tokens=12, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, pad_token_id=0)
    hf_tokens = out.sequences[0, len(hf_ids):].tolist()
    hf_logits = torch.stack(out.logits)[:, 0, :cfg.vocab_size].float()
    [ours] = model.generate([image], [PROMPT], max_new_tokens=12, return_logits=True)
    assert ours.token_ids == hf_tokens
    torch.testing.assert_close(ours.logits, hf_logits, atol=1e-4, rtol=0)


def test_hf_layout_loads_with_untrained_projection_warning(golden_model_nohr, hf_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="flexattn.loading"):
        m = load_model(hf_dir, device="cpu", threshold=255)
    assert "UNTRAINED" in caplog.text
    assert m.config.vocab_size == 321 and m.config.flex_layers == [9, 10, 11]
    sa = m.module.model.layers[9].self_attn
    assert torch.equal(sa.k_proj_hd.weight, sa.k_proj.weight)
    assert torch.equal(sa.v_proj_hd.weight, sa.v_proj.weight)
    # an HF folder sees images and prompts as LLaVA-1.5 / transformers do
    # (tests/flexattn/test_hf_llava_exact.py); seen the FlexAttention checkpoints' way, the same
    # weights give the original layout's answers
    assert (m.config.lowres_view, m.config.prefix_after_image) == ("direct", False)
    m.module.config = m.config.replace(lowres_view="highres", prefix_after_image=True)
    m.tokenizer.prefix_after_image = True
    image, _ = golden_case(CASES[1])
    [a] = m.generate([image], [PROMPT], max_new_tokens=8, return_logits=True)
    [b] = golden_model_nohr.generate([image], [PROMPT], max_new_tokens=8, return_logits=True)
    assert a.token_ids == b.token_ids
    torch.testing.assert_close(a.logits[:, :320], b.logits, atol=1e-5, rtol=0)
    # and it runs FlexAttention once selection is on
    flex = load_model(hf_dir, device="cpu")
    [c] = flex.generate([image], [PROMPT], max_new_tokens=2)
    assert sum(c.hr_selected_per_layer) > 0
