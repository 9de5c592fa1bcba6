"""A freshly initialised LLaVA-FlexAttn of a config's ``[model]`` shapes, with a sentencepiece
tokenizer in which every SynthHR colour and answer is a single piece."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from flexattn.config import FlexAttnConfig
from flexattn.demo_model import CORPUS, train_tiny_tokenizer
from flexattn.generate import LlavaFlexAttn
from flexattn.model import LlavaFlexAttnForCausalLM
from flexattn.tokenizer import PromptTokenizer

from . import task
from .data import question_prompt

FEATURE_SCALE = 4.0


def tokenizer_corpus() -> tuple[str, ...]:
    """The English corpus of the demo tokenizer plus every SynthHR prompt and answer, so that
    colours and answers are single pieces."""
    lines = list(CORPUS)
    questions = [task.PATTERN_QUESTION.format(colour=c) for c in task.COLOURS]
    questions.append(task.COUNT_QUESTION)
    answers = [*task.PATTERNS, *task.COUNT_WORDS.values()]
    for q in questions:
        lines += [question_prompt(q).replace("<image>", "") + f" {a}" for a in answers]
    lines += [" ".join(answers)] * 20
    return tuple(lines)


def build_model(shape: dict, seed: int, workdir: Path, name: str = "synthhr") -> LlavaFlexAttn:
    """A model of ``shape`` (``config.MODEL_KEYS``) initialised from ``seed``, its tokenizer
    trained on ``tokenizer_corpus`` (written under ``workdir``).

    High-resolution features reach ``k_proj_hd`` / ``v_proj_hd`` without a norm, so the
    projector's output starts at the scale of a normalised hidden state (norm ~ sqrt(hidden)),
    not ~3, or the high-res keys and values are too small for the answer's gradient to find
    them."""
    from transformers import CLIPVisionConfig

    p = shape
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
        with torch.no_grad():
            module.model.mm_projector[2].weight.mul_(FEATURE_SCALE)
            module.model.mm_projector[2].bias.mul_(FEATURE_SCALE)
    return LlavaFlexAttn(module, tok, model_id=name)
