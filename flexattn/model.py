"""LLaVA-FlexAttn modules: CLIP tower + mlp2x_gelu projector + Llama decoder whose layers above
``select_layer`` use hierarchical attention. Parameter names follow the original checkpoint
(``model.layers.N.self_attn.k_proj_hd``, ``model.mm_projector.0``, ``lm_head``) so its weights
load without renaming; the CLIP tower sits under ``vision_tower``."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from .attention import FlexInputs, HierarchicalAttention, KVCache, StepRecord, image_attention
from .config import FlexAttnConfig
from .selection import select_high_res


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
                flex: FlexInputs | None, hr_mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn, probs = self.self_attn(self.input_layernorm(x), cos, sin, cache, start, sdpa_mask,
                                     key_valid, flex, hr_mask)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), probs


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

    def ensure_tiles(self, flex: FlexInputs, blocks: torch.Tensor) -> None:
        """Encode the tiles holding any of ``blocks`` ([B, P*P] bool) not encoded yet, into
        ``flex.hr.blocks`` (lazy tiles; nothing to do when every tile was encoded up front)."""
        hr, cfg = flex.hr, flex.cfg
        if hr.pixels is None:
            return
        z, per = cfg.zoom_ratio, cfg.pool_grid // cfg.zoom_ratio  # 3 tiles, 3 blocks a side
        b = blocks.shape[0]
        want = blocks.view(b, z, per, z, per).any(dim=4).any(dim=2).view(b, z * z)
        new = want & ~hr.tile_done
        pairs = [divmod(i, z * z) for i, v in enumerate(new.flatten().tolist()) if v]  # one sync
        if not pairs:
            return
        bi, ti = torch.tensor(pairs, device=blocks.device).unbind(1)
        t = cfg.lowres_size
        crops = torch.stack([hr.pixels[i, :, r * t:(r + 1) * t, c * t:(c + 1) * t]
                             for i, (r, c) in ((i, divmod(k, z)) for i, k in pairs)])
        feats = self.encode_crops(crops)  # [n, G*G, hidden]
        s = cfg.block_size
        n, _, c = feats.shape
        # tile grid G x G -> its per x per blocks of s x s tokens, block-major
        per_tile = feats.view(n, per, s, per, s, c).permute(0, 1, 3, 2, 4, 5)
        per_tile = per_tile.reshape(n, per * per, s * s, c)
        r = torch.arange(per, device=blocks.device)
        rows = (ti // z).view(-1, 1, 1) * per + r.view(1, -1, 1)  # [n, per, 1]
        cols = (ti % z).view(-1, 1, 1) * per + r.view(1, 1, -1)  # [n, 1, per]
        block_ids = (rows * cfg.pool_grid + cols).view(n, per * per)
        hr.blocks[bi.view(-1, 1), block_ids] = per_tile.to(hr.blocks.dtype)
        hr.tile_done |= new

    # decoder ------------------------------------------------------------------------------------
    def forward_step(self, embeds: torch.Tensor, positions: torch.Tensor, start: int,
                     sdpa_mask: torch.Tensor | None, key_valid: torch.Tensor, caches: list[KVCache],
                     flex: FlexInputs | None) -> tuple[torch.Tensor, StepRecord]:
        """One prefill, decode or teacher-forced step.

        embeds: [B, T, hidden] written at cache slots start..start+T-1; positions: [B, T] rotary
        positions; sdpa_mask: [B, 1, T, start+T] bool, or None for an unpadded batch;
        key_valid: [B, start+T] bool.
        Returns float32 logits of the flex rows (the last ``flex.rows`` positions; the last
        position without FlexAttention): [B, R, vocab], and what the FlexAttention layers did.
        Each selecting layer's map makes the selection the next layer reads. With
        ``flex.activations``, what the training losses read is recorded there."""
        cos, sin = self.rotary(embeds, positions)
        record = StepRecord()
        h, hr_mask = embeds, None
        rows = flex.rows if flex is not None else 1
        acts = flex.activations if flex is not None else None
        for layer, cache in zip(self.model.layers, caches):
            attn = layer.self_attn
            if acts is not None and attn.layer_idx == self.config.select_layer:
                acts.entering = h[:, -rows:]
            if attn.is_flex and hr_mask is not None:
                self.ensure_tiles(flex, flex.has_image.view(-1, 1).expand(-1, hr_mask.shape[-1])
                                  if flex.cfg.hr_kv_prefetch else hr_mask.any(1))
                record.used.append(hr_mask)
            h, probs = layer(h, cos, sin, cache, start, sdpa_mask, key_valid, flex, hr_mask)
            if probs is not None:
                hr_mask = self.next_selection(flex, attn.layer_idx, probs, record)
        h = self.model.norm(h[:, -rows:])
        if acts is not None:
            acts.final, acts.maps = h, record.maps
        return self.lm_head(h).float(), record

    @staticmethod
    def next_selection(flex: FlexInputs, layer_idx: int, probs: torch.Tensor,
                       record: StepRecord) -> torch.Tensor | None:
        """The selection layer ``layer_idx`` makes for the next one from its flex rows'
        sequence attention probs [B, R, S]: [B, R, P*P] bool (None after the last layer, whose
        selection nothing reads, unless maps are kept)."""
        cfg = flex.cfg
        amap = image_attention(probs, flex)  # [B, R, G*G]
        if layer_idx == cfg.select_layer:
            record.select_map = amap
        if layer_idx == cfg.num_hidden_layers - 1 and not flex.keep_maps:
            return None
        b, r, n = amap.shape
        mask = select_high_res(amap.detach().reshape(b * r, n), flex.keep.repeat_interleave(r, 0),
                               cfg.threshold, cfg.pool_grid).view(b, r, -1)
        mask &= flex.has_image.view(-1, 1, 1)
        if flex.row_valid is not None:
            mask &= flex.row_valid.unsqueeze(-1)
        if flex.keep_maps:
            record.maps.append(amap)
            record.masks.append(mask)  # the model's own, also where one is forced
        if flex.forced is not None and layer_idx < cfg.num_hidden_layers - 1:
            forced = flex.forced if flex.forced.dim() == 3 \
                else flex.forced[:, :, layer_idx - cfg.select_layer]
            mask = torch.where(flex.forced_on.view(-1, 1, 1), forced, mask)
        return mask
