"""A LLaVA-FlexAttn with random weights built directly in memory, at any shape (the 7B one
included), for benchmarks: no checkpoint is written or read. Tests use ``flexattn.demo_model``,
which saves real checkpoint layouts instead."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from .config import FlexAttnConfig
from .generate import LlavaFlexAttn
from .model import LlavaFlexAttnForCausalLM
from .tokenizer import PromptTokenizer


@torch.no_grad()
def _init_(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Scales like a trained model's: linears ~ 1/sqrt(fan_in) (q/k twice that, so attention
    maps are peaked rather than flat), embeddings ~ 1, norms 1."""
    for name, p in module.named_parameters():
        if p.dim() == 1:
            if name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
            continue
        if "embed" in name or "embedding" in name:
            std = 1.0 if "embed_tokens" in name else 0.02
        else:
            std = p.shape[-1] ** -0.5
            if any(k in name for k in ("q_proj", "k_proj")):
                std *= 2.0
        p.normal_(0.0, std, generator=gen)


def random_model(cfg: FlexAttnConfig, vision_config: CLIPVisionConfig, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0,
                 tokenizer_dir: str | Path | None = None) -> LlavaFlexAttn:
    """Random weights at the shapes of ``cfg`` / ``vision_config`` on ``device``."""
    dev = torch.device(device)
    with torch.device("meta"):
        clip = CLIPVisionModel(vision_config)
        module = LlavaFlexAttnForCausalLM(cfg, vision_config, vision_tower=clip)
    module = module.to_empty(device=dev)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    _init_(module, gen)
    emb = getattr(module.vision_tower, "vision_model", module.vision_tower).embeddings
    emb.register_buffer("position_ids", torch.arange(emb.num_positions, device=dev)
                        .expand((1, -1)), persistent=False)
    module.rotary = type(module.rotary)(cfg.llama_config()).to(dev)
    module = module.to(dtype)
    if tokenizer_dir is None:
        from .demo_model import train_tiny_tokenizer

        tokenizer_dir = Path(tempfile.mkdtemp(prefix="flexattn-tok-"))
        train_tiny_tokenizer(Path(tokenizer_dir))
    tok = PromptTokenizer.from_dir(tokenizer_dir, cfg.bos_token_id, cfg.eos_token_id)
    return LlavaFlexAttn(module, tok, model_id=f"random-{cfg.hidden_size}x{cfg.num_hidden_layers}")
