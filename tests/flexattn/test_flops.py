"""The analytical cost model against torch's own FLOP counter on the tiny model."""

from __future__ import annotations

import pytest
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from flexattn.flops import image_cost

from .conftest import CASES, PROMPT, golden_case


@pytest.mark.parametrize("mode, reuse", [("lowres", True), ("fullres", True),
                                         ("flexattn", True), ("flexattn", False)])
def test_cost_model_matches_counted_flops(golden_model, mode, reuse):
    image, _ = golden_case(CASES[0])
    new = 4
    golden_model.configure(hr_kv_reuse=reuse)
    counter = FlopCounterMode(display=False)
    # the math backend decomposes attention into matmuls the counter sees (and computes the
    # whole square, hence attention="dense" below)
    with sdpa_kernel(SDPBackend.MATH), counter:
        [out] = golden_model.generate([image], [PROMPT], max_new_tokens=new, mode=mode)
    golden_model.configure(hr_kv_reuse=True)
    counted = counter.get_total_flops()
    text = len(golden_model.tokenizer.encode_prompt(PROMPT)) - 1
    vc = golden_model.module.vision_config
    cost = image_cost(golden_model.config, vc, mode, text, new,
                      selected_frac=out.hr_selected_frac, tiles=out.tiles_encoded,
                      blocks_projected=out.hr_blocks_projected, attention="dense", reuse=reuse)
    assert cost.prefill_tokens == out.prompt_tokens
    # everything left out (norms, softmax, selection, explicit last rows) is small
    assert cost.total == pytest.approx(counted, rel=0.03)


def test_flexattn_costs_less_than_fullres_at_7b_shapes():
    from transformers import CLIPVisionConfig

    from flexattn.config import FlexAttnConfig

    cfg = FlexAttnConfig()  # LLaVA-1.5-7B defaults
    vc = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                          num_attention_heads=16, image_size=336, patch_size=14)
    low = image_cost(cfg, vc, "lowres", 60, 16).total
    flex = image_cost(cfg, vc, "flexattn", 60, 16, selected_frac=0.15).total
    full = image_cost(cfg, vc, "fullres", 60, 16).total
    assert low < flex < full
    assert full / flex > 4  # ~5800 vs ~640 sequence tokens
    assert flex / low < 1.6  # nine more CLIP crops and the high-res projections


def test_each_generation_carries_its_cost(golden_model):
    """`Generation.tflops` (the pipeline's `tflops` column) is the cost model applied to that
    input's own prompt length, answer length, selection, tiles and projected blocks."""
    image, _ = golden_case(CASES[1])
    text = len(golden_model.tokenizer.encode_prompt(PROMPT)) - 1
    cfg, vc = golden_model.config, golden_model.module.vision_config
    got = {}
    for mode in ("lowres", "flexattn", "fullres"):
        [out] = golden_model.generate([image], [PROMPT], max_new_tokens=3, mode=mode)
        want = image_cost(cfg, vc, mode, text, out.generated_tokens,
                          selected_frac=out.hr_selected_frac, tiles=out.tiles_encoded,
                          blocks_projected=out.hr_blocks_projected).total / 1e12
        assert out.tflops == pytest.approx(want, rel=1e-9)
        got[mode] = out.tflops
    assert got["lowres"] < got["flexattn"] < got["fullres"]
    [text_only] = golden_model.generate([None], ["Hello there"], max_new_tokens=2)
    assert text_only.tflops is None
