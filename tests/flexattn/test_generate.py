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
    kw = {"max_new_tokens": 6, "return_logits": True}
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
    ({"images": [None], "prompts": [PROMPT]}, "no image was given"),
    ({"images": ["x"], "prompts": [PROMPT]}, "must be a PIL image"),
    ({"prompts": ["USER: no placeholder"]}, "no <image> placeholder"),
    ({"prompts": ["<image> and <image>"]}, "one <image>"),
    ({"prompts": [PROMPT, PROMPT]}, "2 prompts"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"mode": "hires"}, "mode must be one of"),
    ({"top_p": 0.0}, "top_p"),
    ({"do_sample": True, "temperature": 0.0}, "temperature"),
])
def test_bad_generate_arguments(golden_model, kwargs, message):
    image, _ = golden_case(CASES[0])
    args = {"images": [image], "prompts": [PROMPT], "max_new_tokens": 2}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        golden_model.generate(**args)


def test_lazy_tiles_and_kv_reuse_do_not_change_outputs():
    from flexattn import load_model

    from .conftest import GOLDEN_MODEL

    images, prompts = mixed_inputs()
    kw = {"max_new_tokens": 8, "return_logits": True, "return_trace": True}
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


def test_vision_batch_splits_clip_forwards_and_changes_no_output():
    from flexattn import load_model

    from .conftest import GOLDEN_MODEL

    images, prompts = mixed_inputs()
    kw = {"max_new_tokens": 6, "return_logits": True, "return_trace": True}
    outs, forwards, models = {}, {}, {}
    for vb in (0, 1, 4):
        m = models[vb] = load_model(GOLDEN_MODEL, device="cpu", lazy_tiles=False, vision_batch=vb)
        sizes = []
        tower = getattr(m.module.vision_tower, "vision_model", m.module.vision_tower)
        hook = tower.embeddings.register_forward_hook(
            lambda mod, args, out, sizes=sizes: sizes.append(args[0].shape[0]))
        outs[vb] = m.generate(images, prompts, **kw)
        hook.remove()
        forwards[vb] = sizes

    def split(n, k):
        return [k] * (n // k) + ([n % k] if n % k else [])

    n_img = sum(im is not None for im in images)
    crops = n_img * 10  # a low-res view and nine tiles each, all encoded up front
    auto = models[0].module.vision_chunk(torch.zeros(crops, 3, 336, 336))
    assert auto < crops  # the tiny tower's CPU default does split this batch
    assert forwards[0] == split(crops, auto)
    assert forwards[1] == [1] * crops
    assert forwards[4] == split(crops, 4)
    for vb in (1, 4):
        for a, b in zip(outs[0], outs[vb]):
            assert a.token_ids == b.token_ids
            assert torch.equal(a.trace["block_masks"], b.trace["block_masks"])
            torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=0)


def test_vision_chunk_keeps_cpu_activations_small_and_gpu_batches_whole():
    from transformers import CLIPVisionConfig

    from flexattn.config import FlexAttnConfig
    from flexattn.model import LlavaFlexAttnForCausalLM

    def chunk(llm, clip, device="cpu", n=80, **cfg):
        with torch.device("meta"):  # shapes only, no weights allocated
            m = LlavaFlexAttnForCausalLM(FlexAttnConfig(**llm, **cfg), CLIPVisionConfig(
                image_size=336, patch_size=14, **clip))
        return m.vision_chunk(torch.empty(n, 3, 336, 336, device=device))

    seven_b = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
               "num_attention_heads": 32, "mm_hidden_size": 1024}
    clip_l = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
              "num_attention_heads": 16}
    mini = {"vocab_size": 8192, "hidden_size": 1024, "intermediate_size": 2752,
            "num_hidden_layers": 12, "num_attention_heads": 16, "num_key_value_heads": 16,
            "mm_hidden_size": 256}
    clip_mini = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 6,
                 "num_attention_heads": 4}
    # CPU: widest activation of a forward within 16 MiB (577 tokens x 4 bytes x widest layer)
    assert chunk(seven_b, clip_l) == 1  # 577 x 4096 x 4 = 9.0 MiB per crop
    assert chunk(mini, clip_mini) == 7  # 577 x 1024 x 4 = 2.3 MiB per crop
    # any other device: every crop of the call at once
    assert chunk(seven_b, clip_l, device="meta") == 80
    assert chunk(mini, clip_mini, device="meta", n=3) == 3
    # an explicit setting wins everywhere
    assert chunk(seven_b, clip_l, vision_batch=16) == 16
    assert chunk(seven_b, clip_l, device="meta", vision_batch=16) == 16


def test_replayed_selection_goes_through_the_same_path(golden_model):
    images, prompts = mixed_inputs()
    images, prompts = images[:3], prompts[:3]
    own = golden_model.generate(images, prompts, max_new_tokens=5, return_logits=True,
                                return_trace=True)
    n_read = len(golden_model.config.flex_layers)
    steps = max(len(o.token_ids) for o in own)
    replay = torch.zeros(3, steps, n_read, 81, dtype=torch.bool)
    for i, o in enumerate(own):
        masks = o.trace["block_masks"][:, :n_read]  # the selections layers s..L-2 handed on
        replay[i, :len(masks)] = masks
        replay[i, len(masks):] = masks[-1]
    again = golden_model.generate(images, prompts, max_new_tokens=5, return_logits=True,
                                  return_trace=True, selections=replay)
    for a, b in zip(own, again):
        assert a.token_ids == b.token_ids and a.hr_cells == b.hr_cells
        assert a.tiles_encoded == b.tiles_encoded
        assert a.hr_blocks_projected == b.hr_blocks_projected
        assert a.hr_selected_frac == pytest.approx(b.hr_selected_frac)
        torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=0)
    # one block for every layer and step: one tile encoded, one block per layer projected
    one = torch.zeros(3, 1, 81, dtype=torch.bool)
    one[:, :, 40] = True
    fixed = golden_model.generate(images, prompts, max_new_tokens=5, selections=one)
    for f in fixed:
        assert f.tiles_encoded == 1 and f.hr_blocks_projected == n_read
        assert f.hr_cells == [i == 40 for i in range(81)]
        assert f.hr_selected_frac == pytest.approx(64 / 5184)
