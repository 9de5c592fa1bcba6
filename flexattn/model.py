"""LLaVA-FlexAttn modules: CLIP tower + mlp2x_gelu projector + Llama decoder whose layers above
``select_layer`` use hierarchical attention. Parameter names follow the original checkpoint
(``model.layers.N.self_attn.k_proj_hd``, ``model.mm_projector.0``, ``lm_head``) so its weights
load without renaming; the CLIP tower sits under ``vision_tower``."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from .attention import FlexState, HierarchicalAttention, KVCache
from .config import FlexAttnConfig


class DecoderLayer(nn.Module):
    def __init__(self, cfg: FlexAttnConfig, layer_idx: int) -> None:
        super().__init__()
        llama = cfg.llama_config()
        self.self_attn = HierarchicalAttention(cfg, layer_idx)
        self.mlp = LlamaMLP(llama)
        self.input_layernorm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                start: int, sdpa_mask: torch.Tensor | None, key_valid: torch.Tensor,
                flex: FlexState | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start, sdpa_mask,
                               key_valid, flex)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlavaFlexAttnModel(nn.Module):
    """The ``model.`` part of the original checkpoint: embeddings, layers, norm, projector."""

    def __init__(self, cfg: FlexAttnConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        # mlp2x_gelu: Linear -> exact (erf) GELU -> Linear
        self.mm_projector = nn.Sequential(nn.Linear(cfg.mm_hidden_size, cfg.hidden_size),
                                          nn.GELU(),
                                          nn.Linear(cfg.hidden_size, cfg.hidden_size))


class LlavaFlexAttnForCausalLM(nn.Module):
    def __init__(self, cfg: FlexAttnConfig, vision_config: CLIPVisionConfig,
                 vision_tower: CLIPVisionModel | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.vision_config = vision_config
        self.vision_tower = vision_tower if vision_tower is not None else CLIPVisionModel(
            vision_config)
        self.model = LlavaFlexAttnModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = LlamaRotaryEmbedding(cfg.llama_config())  # buffers only, not persistent

    # vision -------------------------------------------------------------------------------------
    def vision_chunk(self, pixels: torch.Tensor) -> int:
        """Most crops of ``pixels`` [N, 3, 336, 336] that go through CLIP in one forward.

        ``config.vision_batch`` when set. Otherwise all N on a GPU, and on a CPU as many as keep
        the widest activation of one forward (crops x 577 tokens x the widest of the CLIP MLP,
        the CLIP width and the projector's output) within 16 MiB. glibc maps buffers above its
        mmap threshold (which grows to at most 32 MiB) afresh and hands them back to the OS when
        freed, and touching fresh pages costs several times what an elementwise op does on
        them: one forward over 72 crops took 121.7 ms per crop on the project's CPU, forwards
        of 4 to 8 crops 82-86 ms (``bench/vision_bench.py``)."""
        n = pixels.shape[0]
        if self.config.vision_batch:
            return self.config.vision_batch
        if pixels.device.type != "cpu":
            return max(n, 1)
        vc = self.vision_config
        tokens = (vc.image_size // vc.patch_size) ** 2 + 1
        width = max(vc.intermediate_size, vc.hidden_size, self.config.hidden_size)
        per_crop = tokens * width * pixels.element_size()
        return max(1, (16 << 20) // per_crop)

    def encode_crops(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, 336, 336] normalised crops -> projected features [N, 576, hidden].

        Features are transformers' ``hidden_states[mm_vision_select_layer]`` (entry 0 is the
        embedding output after ``pre_layrnorm``); only the layers up to that entry run. The
        crops go through in forwards of at most ``vision_chunk`` crops."""
        step = self.vision_chunk(pixels)
        if pixels.shape[0] > step:
            return torch.cat([self._encode(pixels[i:i + step])
                              for i in range(0, pixels.shape[0], step)])
        return self._encode(pixels)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        tower = getattr(self.vision_tower, "vision_model", self.vision_tower)
        layers = tower.encoder.layers
        sel = self.config.mm_vision_select_layer
        n = sel if sel >= 0 else len(layers) + 1 + sel  # layers applied before that entry
        h = tower.pre_layrnorm(tower.embeddings(pixels))  # [N, 577, C]
        for layer in layers[:n]:
            h = layer(h, None)
            if isinstance(h, tuple):
                h = h[0]
        return self.model.mm_projector(h[:, 1:])  # drop CLS

    def stitch(self, tile_feats: torch.Tensor) -> torch.Tensor:
        """[N, Z*Z, G*G, hidden] per-tile features -> [N, (Z*G)**2, hidden] row-major grid."""
        cfg = self.config
        n, _, _, c = tile_feats.shape
        z, g = cfg.zoom_ratio, cfg.lr_grid
        x = tile_feats.view(n, z, z, g, g, c).permute(0, 1, 3, 2, 4, 5)  # [N, Zr, Gr, Zc, Gc, C]
        return x.reshape(n, cfg.hr_tokens, c)

    # decoder ------------------------------------------------------------------------------------
    def forward_step(self, embeds: torch.Tensor, positions: torch.Tensor, start: int,
                     sdpa_mask: torch.Tensor | None, key_valid: torch.Tensor, caches: list[KVCache],
                     flex: FlexState | None) -> torch.Tensor:
        """One prefill or decode step.

        embeds: [B, T, hidden] written at cache slots start..start+T-1; positions: [B, T] rotary
        positions; sdpa_mask: [B, 1, T, start+T] bool, or None for an unpadded batch;
        key_valid: [B, start+T] bool.
        Returns float32 logits of the last position: [B, vocab]."""
        cos, sin = self.rotary(embeds, positions)
        if flex is not None:
            flex.begin_step()
        h = embeds
        for layer, cache in zip(self.model.layers, caches):
            h = layer(h, cos, sin, cache, start, sdpa_mask, key_valid, flex)
        h = self.model.norm(h[:, -1:])
        return self.lm_head(h)[:, 0].float()
