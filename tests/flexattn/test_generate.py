"""Batching, sampling, stopping and modes on the golden tiny checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flexattn import llava_v1_prompt

from .conftest import CASES, PROMPT, golden_case


def mixed_inputs():
    rng = np.random.default_rng(0)
    images = [golden_case(n)[0] for n in CASES]
    images.append(Image.fromarray(rng.integers(0, 255, (300, 1200), dtype=np.uint8), "L"))
    rgba = rng.integers(0, 255, (777, 333, 4), dtype=np.uint8)
    images.append(Image.fromarray(rgba, "RGBA"))
    images.append(Image.fromarray(rng.integers(0, 255, (1008, 1008, 3), dtype=np.uint8))
                  .convert("P"))
    prompts = [PROMPT, llava_v1_prompt("What is here?"),
               llava_v1_prompt("Count the white squares in this satellite tile, please."),
               llava_v1_prompt("Road?"), llava_v1_prompt("Read the text line by line."),
               "USER: <image>\nShort. ASSISTANT:"]
    return images, prompts


def test_batch_of_six_equals_one_at_a_time(golden_model):
    images, prompts = mixed_inputs()
    batch = golden_model.generate(images, prompts, max_new_tokens=8, return_logits=True)
    assert len({len(golden_model.tokenizer.encode_prompt(p)) for p in prompts}) == 6
    for image, prompt, got in zip(images, prompts, batch):
        [alone] = golden_model.generate([image], [prompt], max_new_tokens=8, return_logits=True)
        assert got.token_ids == alone.token_ids
        torch.testing.assert_close(got.logits, alone.logits, atol=1e-4, rtol=0)
        assert got.hr_selected_per_layer == alone.hr_selected_per_layer
        assert got.hr_cells == alone.hr_cells
        assert got.hr_selected_frac == pytest.approx(alone.hr_selected_frac, abs=1e-6)
        assert got.prompt_tokens == alone.prompt_tokens
    # the batch really is ragged: different selections per sample
    assert len({tuple(g.hr_selected_per_layer) for g in batch}) > 2


def test_eos_stops_each_sample_on_its_own(golden_model):
    images, prompts = mixed_inputs()
    free = golden_model.generate(images[:3], prompts[:3], max_new_tokens=10)
    eos = free[0].token_ids[3]  # pretend this token is EOS
    model = golden_model
    old = model.config.eos_token_id
    model.configure(eos_token_id=eos)
    try:
        stopped = model.generate(images[:3], prompts[:3], max_new_tokens=10)
    finally:
        model.configure(eos_token_id=old)
    for f, s in zip(free, stopped):
        if eos in f.token_ids:
            cut = f.token_ids.index(eos) + 1
            assert s.token_ids == f.token_ids[:cut] and s.finish_reason == "eos"
        else:
            assert s.token_ids == f.token_ids and s.finish_reason == "length"
    assert stopped[0].token_ids == free[0].token_ids[:4]


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(golden_model):
    image, _ = golden_case(CASES[0])
    greedy = golden_model.generate([image], [PROMPT], max_new_tokens=6)[0].token_ids
    nucleus = golden_model.generate([image], [PROMPT], max_new_tokens=6, do_sample=True,
                                    top_p=1e-6, seed=1)[0].token_ids
    assert nucleus == greedy
    a = golden_model.generate([image], [PROMPT], max_new_tokens=6, do_sample=True,
                              temperature=5.0, seed=7)[0].token_ids
    b = golden_model.generate([image], [PROMPT], max_new_tokens=6, do_sample=True,
                              temperature=5.0, seed=7)[0].token_ids
    c = golden_model.generate([image], [PROMPT], max_new_tokens=6, do_sample=True,
                              temperature=5.0, seed=8)[0].token_ids
    assert a == b and a != greedy and a != c


def test_modes(golden_model, golden_model_nohr):
    image, _ = golden_case(CASES[2])
    kw = dict(max_new_tokens=6, return_logits=True)
    flex = golden_model.generate([image], [PROMPT], **kw)[0]
    nohr = golden_model_nohr.generate([image], [PROMPT], **kw)[0]
    low = golden_model.generate([image], [PROMPT], mode="lowres", **kw)[0]
    full = golden_model.generate([image], [PROMPT], mode="fullres", **kw)[0]
    # lowres = plain LLaVA-1.5 on f_LR = FlexAttention with nothing selected
    assert low.token_ids == nohr.token_ids
    torch.testing.assert_close(low.logits, nohr.logits, atol=1e-4, rtol=0)
    assert full.prompt_tokens == low.prompt_tokens + 5184 == flex.prompt_tokens + 5184
    assert (full.logits - low.logits).abs().max() > 1e-3  # high-res tokens changed the answer
    assert (flex.logits - low.logits).abs().max() > 1e-3
    assert low.hr_selected_frac == full.hr_selected_frac == 0.0
    assert flex.hr_selected_frac > 0


def test_prompt_without_image_is_a_plain_decoder(golden_model):
    text = llava_v1_prompt("Say something.", with_image=False)
    image, _ = golden_case(CASES[0])
    mixed = golden_model.generate([None, image], [text, PROMPT], max_new_tokens=5,
                                  return_logits=True)
    [alone] = golden_model.generate([None], [text], max_new_tokens=5, return_logits=True)
    assert mixed[0].token_ids == alone.token_ids
    torch.testing.assert_close(mixed[0].logits, alone.logits, atol=1e-4, rtol=0)
    assert mixed[0].hr_selected_per_layer == [0, 0, 0] and not any(mixed[0].hr_cells)
    assert mixed[1].hr_selected_frac > 0


def test_pre_padded_image_with_original_size_gives_same_answer(golden_model):
    from flexattn.image import prepare_image

    image, _ = golden_case(CASES[1])
    square, size = prepare_image(image, 1008, golden_model.config.image_mean)
    [a] = golden_model.generate([image], [PROMPT], max_new_tokens=6, return_logits=True)
    [b] = golden_model.generate([square], [PROMPT], max_new_tokens=6, return_logits=True,
                                image_sizes=[size])
    assert a.token_ids == b.token_ids and a.hr_cells == b.hr_cells
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(images=[None], prompts=[PROMPT]), "no image was given"),
    (dict(images=["x"], prompts=[PROMPT]), "must be a PIL image"),
    (dict(prompts=["USER: no placeholder"]), "no <image> placeholder"),
    (dict(prompts=["<image> and <image>"]), "one <image>"),
    (dict(prompts=[PROMPT, PROMPT]), "2 prompts"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(mode="hires"), "mode must be one of"),
    (dict(top_p=0.0), "top_p"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
])
def test_bad_generate_arguments(golden_model, kwargs, message):
    image, _ = golden_case(CASES[0])
    args = dict(images=[image], prompts=[PROMPT], max_new_tokens=2)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        golden_model.generate(**args)


def test_lazy_tiles_and_kv_reuse_do_not_change_outputs():
    from flexattn import load_model

    from .conftest import GOLDEN_MODEL

    images, prompts = mixed_inputs()
    kw = dict(max_new_tokens=8, return_logits=True, return_trace=True)
    variants = {}
    for lazy in (True, False):
        for reuse in (True, False):
            m = load_model(GOLDEN_MODEL, device="cpu", lazy_tiles=lazy, hr_kv_reuse=reuse)
            variants[lazy, reuse] = m.generate(images, prompts, **kw)
    prefetch = load_model(GOLDEN_MODEL, device="cpu", hr_kv_prefetch=True)
    variants["prefetch"] = prefetch.generate(images, prompts, **kw)
    base = variants[False, False]  # eager tiles, projections recomputed at every step
    for key, outs in variants.items():
        for a, b in zip(base, outs):
            assert a.token_ids == b.token_ids, key
            assert torch.equal(a.trace["block_masks"], b.trace["block_masks"]), key
            torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=0)
    for a, b in zip(variants[True, False], variants[True, True]):
        assert b.hr_blocks_projected < a.hr_blocks_projected  # reuse projects each block once
        # with reuse: each (layer, block) at most once
        assert b.hr_blocks_projected <= 3 * 81
    assert all(o.tiles_encoded == 9 for o in variants[False, True])
    # prefetch: every (layer, block) of every image projected exactly once
    assert all(o.hr_blocks_projected == 3 * 81 and o.tiles_encoded == 9
               for o in variants["prefetch"])
    with pytest.raises(ValueError, match="hr_kv_prefetch needs hr_kv_reuse"):
        prefetch.configure(hr_kv_reuse=False)
    lazy = variants[True, True]
    for o in lazy:  # exactly the tiles holding a used cell were encoded
        cells = o.trace["block_masks"][:, :3].any(0).any(0).view(3, 3, 3, 3)
        assert o.tiles_encoded == int(cells.any(3).any(1).sum())
