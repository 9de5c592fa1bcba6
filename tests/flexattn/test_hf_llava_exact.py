"""A plain Hugging Face LLaVA-1.5 folder in ``mode="lowres"`` answers exactly as transformers'
own ``LlavaForConditionalGeneration.generate`` fed by its own ``LlavaProcessor``
(``LlavaImageProcessor(do_pad=True)`` and the folder's Llama tokenizer): same prompt ids, same
pixels bit for bit, same greedy tokens on 16 images of varied sizes and aspects.

The checkpoint is a small random LLaVA-1.5 (4 Llama layers, which also shows that an HF folder
of 8 or fewer layers loads) written by ``save_pretrained``, with the processor saved beside it
by ``LlavaProcessor.save_pretrained``.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from flexattn import load_model
from flexattn.image import direct_view
from flexattn.tokenizer import IMAGE_TOKEN, IMAGE_TOKEN_INDEX

from .checkpoints import build_tiny_hf
from .conftest import PROMPT

SIZES = [(336, 336), (640, 480), (480, 640), (1000, 200), (200, 1000), (337, 335), (100, 100),
         (1500, 900), (50, 400), (800, 801), (17, 9), (1008, 1008), (2000, 1000), (300, 700),
         (999, 333), (64, 2048)]
PROMPTS = [PROMPT, PROMPT.replace("Describe this image in detail.", "How many fields are there?")]
NEW_TOKENS = 16
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.26, 0.27)


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    """Coarse random colour blocks with a gradient: detail that survives the 336 view."""
    rng = np.random.default_rng(seed)
    blocks = Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8))
    base = np.asarray(blocks.resize(size, Image.Resampling.NEAREST), dtype=np.float32)
    ramp = np.linspace(0, 60, size[0], dtype=np.float32)[None, :, None]
    return Image.fromarray(np.clip(base * 0.8 + ramp, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def hf_llava(tmp_path_factory):
    folder = build_tiny_hf(tmp_path_factory.mktemp("hf") / "llava-1.5-4layers", seed=0,
                           llm_layers=4)
    # the image processor of llava-hf's LLaVA-1.5 folders, with LLaVA-1.5's padding on, and a
    # mean and std of its own (the padding colour follows the mean): transformers 5 saves it in
    # processor_config.json, beside build_tiny_hf's CLIP preprocessor_config.json, and reads it
    # from there
    image_processor = LlavaImageProcessorPil(
        do_pad=True, size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
        image_mean=list(MEAN), image_std=list(STD))
    LlavaProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(folder),
                   patch_size=14, vision_feature_select_strategy="default",
                   image_token=IMAGE_TOKEN, num_additional_image_tokens=1).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def transformers_side(hf_llava):
    """transformers' generate, one image at a time, from its own processor's inputs."""
    processor = LlavaProcessor.from_pretrained(hf_llava)
    model = LlavaForConditionalGeneration.from_pretrained(hf_llava, dtype=torch.float32).eval()
    out = []
    for i, size in enumerate(SIZES):
        inputs = processor(images=[_image(i, size)], text=[PROMPTS[i % 2]], return_tensors="pt")
        with torch.inference_mode():
            gen = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        n = inputs["input_ids"].shape[1]
        out.append({"input_ids": inputs["input_ids"][0].tolist(),
                    "pixels": inputs["pixel_values"][0], "tokens": gen.sequences[0, n:].tolist(),
                    "logits": torch.stack(gen.logits)[:, 0].float()})
    return out, model.config.image_token_id


def test_shallow_hf_folder_loads(hf_llava, caplog):
    with caplog.at_level(logging.WARNING, logger="flexattn.loading"):
        model = load_model(hf_llava, device="cpu", dtype="float32", mode="lowres")
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.select_layer, cfg.flex_layers) == (4, 3, [])
    assert (cfg.lowres_view, cfg.prefix_after_image) == ("direct", False)
    assert (cfg.image_mean, cfg.image_std) == (MEAN, STD)
    assert "none above select_layer 3" in caplog.text
    with pytest.raises(ValueError, match="lowres_view must be one of"):
        cfg.replace(lowres_view="square")
    # flexattn mode has no FlexAttention layer to run, so it answers as lowres does
    image = _image(0, SIZES[1])
    [flex] = model.generate([image], [PROMPT], max_new_tokens=4, mode="flexattn")
    [low] = model.generate([image], [PROMPT], max_new_tokens=4)
    assert flex.token_ids == low.token_ids and flex.hr_selected_frac == 0.0


def test_lowres_equals_transformers_with_its_own_processor(hf_llava, transformers_side):
    expected, image_token_id = transformers_side
    model = load_model(hf_llava, device="cpu", dtype="float32", mode="lowres")
    cfg = model.config
    images = [_image(i, size) for i, size in enumerate(SIZES)]
    prompts = [PROMPTS[i % 2] for i in range(len(SIZES))]
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        ids = model.tokenizer.encode_prompt(prompt)
        at = ids.index(IMAGE_TOKEN_INDEX)
        assert ids[:at] + [image_token_id] * cfg.lr_tokens + ids[at + 1:] == \
            expected[i]["input_ids"], f"prompt ids of image {i}"
        pixels = direct_view([image], cfg.lowres_size, cfg.image_mean, cfg.image_std)[0]
        assert torch.equal(pixels, expected[i]["pixels"]), f"pixels of image {i} {SIZES[i]}"
    ours = model.generate(images, prompts, max_new_tokens=NEW_TOKENS, return_logits=True)
    same = [g.token_ids == e["tokens"] for g, e in zip(ours, expected)]
    diff = max(float((g.logits - e["logits"][:len(g.token_ids), :cfg.vocab_size]).abs().max())
               for g, e in zip(ours, expected))
    print(f"HF parity: tokens identical on {sum(same)}/{len(same)} images, max |logit diff|"
          f" {diff:.2e}")
    assert all(same), [i for i, s in enumerate(same) if not s]
    assert diff < 1e-4
    assert len({tuple(e["tokens"]) for e in expected}) > 1  # the images lead to different answers

    # the FlexAttention checkpoints' view (downsampled from the 1008 square) is not HF's
    model.module.config = cfg.replace(lowres_view="highres")
    other = model.generate(images, prompts, max_new_tokens=1, return_logits=True)
    assert max(float((g.logits[0] - e["logits"][0, :cfg.vocab_size]).abs().max())
               for g, e in zip(other, expected)) > 1e-3


def test_converted_hf_folder_keeps_its_view_and_tokenisation(hf_llava, transformers_side,
                                                             tmp_path):
    from flexattn.loading import convert

    expected, _ = transformers_side
    own = load_model(convert(hf_llava, tmp_path / "own", dtype="float32"), device="cpu",
                     dtype="float32", mode="lowres")
    assert (own.config.lowres_view, own.tokenizer.prefix_after_image) == ("direct", False)
    [g] = own.generate([_image(3, SIZES[3])], [PROMPTS[1]], max_new_tokens=NEW_TOKENS)
    assert g.token_ids == expected[3]["tokens"]
