"""Hierarchical self-attention (DESIGN.md section 3) and the per-generation FlexAttention state.

Every position attends causally to the sequence through SDPA. The last query position of each
forward step is computed explicitly, with a float32 softmax and products in the model dtype: its
sequence-only softmax feeds the selection of the next layer, and in FlexAttention layers it also
attends to the selected high-resolution keys (one softmax over sequence keys and selected keys
together). High-resolution keys and values
never enter the sequence KV cache: they live in ``FlexState``'s per-block cache, projected once
per image and layer when a block is first selected and reused at every later step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .config import FlexAttnConfig
from .selection import select_high_res


@dataclass
class KVCache:
    """Preallocated sequence cache of one layer. k, v: [B, Hkv, S_max, D]."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, cfg: FlexAttnConfig, batch: int, length: int, device, dtype) -> KVCache:
        shape = (batch, cfg.num_key_value_heads, length, cfg.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype),
                   torch.zeros(shape, device=device, dtype=dtype))


@dataclass
class FlexState:
    """What one batched generation carries between layers and steps.

    image_slot: [B] cache index of each sample's first image token; has_image: [B] bool.
    keep: [B, G, G] margin mask; hr_blocks: [B, P*P, s*s, hidden] projected high-res features
    grouped by block; hr_cos / hr_sin: [B, P*P, s*s, D] float32 rotary tables of those tokens.
    With lazy tiles, ``tile_pixels`` [B, Z*Z, 3, t, t] holds the normalised 336 tiles and
    ``encode_tiles`` turns them into features the first time one of their blocks is selected;
    ``hr_blocks`` is filled tile by tile.
    """

    cfg: FlexAttnConfig
    image_slot: torch.Tensor
    has_image: torch.Tensor
    keep: torch.Tensor
    hr_blocks: torch.Tensor | None
    hr_cos: torch.Tensor | None
    hr_sin: torch.Tensor | None
    trace: bool = False
    # mask produced by the previous layer for the current one: [B, P*P] bool
    block_mask: torch.Tensor | None = None
    # lazily filled high-res key cache per FlexAttention layer: [B, Hkv, P*P, s*s, D]
    hr_k: dict[int, torch.Tensor] = field(default_factory=dict)
    computed: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, P*P] bool
    # per step, per FlexAttention layer: blocks used -> filled by the layers
    step_used: list[torch.Tensor] = field(default_factory=list)
    step_maps: list[torch.Tensor] = field(default_factory=list)  # trace: [B, G*G] per layer >= s
    step_masks: list[torch.Tensor] = field(default_factory=list)  # trace: masks made, per layer
    last_map: torch.Tensor | None = None  # [B, G*G] map of layer s at the latest step
    tile_pixels: torch.Tensor | None = None
    encode_tiles: Callable[[torch.Tensor], torch.Tensor] | None = None
    tile_done: torch.Tensor | None = None  # [B, Z*Z] bool
    blocks_projected: torch.Tensor | None = None  # [B] k/v_proj_hd block projections made

    def __post_init__(self) -> None:
        self.blocks_projected = torch.zeros(self.image_slot.shape[0], dtype=torch.long,
                                            device=self.image_slot.device)
        if self.tile_pixels is not None and self.tile_done is None:
            self.tile_done = torch.zeros(self.tile_pixels.shape[:2], dtype=torch.bool,
                                         device=self.tile_pixels.device)

    def ensure_tiles(self, blocks: torch.Tensor) -> None:
        """Encode the tiles holding any of ``blocks`` ([B, P*P] bool) not encoded yet."""
        if self.tile_pixels is None:
            return
        cfg = self.cfg
        z, per = cfg.zoom_ratio, cfg.pool_grid // cfg.zoom_ratio  # 3 tiles, 3 blocks a side
        b = blocks.shape[0]
        want = blocks.view(b, z, per, z, per).any(dim=4).any(dim=2).view(b, z * z)
        new = want & ~self.tile_done
        if not new.any():
            return
        bi, ti = new.nonzero(as_tuple=True)
        feats = self.encode_tiles(self.tile_pixels[bi, ti])  # [n, G*G, hidden]
        s = cfg.block_size
        n, _, c = feats.shape
        # tile grid G x G -> its per x per blocks of s x s tokens, block-major
        per_tile = feats.view(n, per, s, per, s, c).permute(0, 1, 3, 2, 4, 5)
        per_tile = per_tile.reshape(n, per * per, s * s, c)
        r = torch.arange(per, device=blocks.device)
        rows = (ti // z).view(-1, 1, 1) * per + r.view(1, -1, 1)  # [n, per, 1]
        cols = (ti % z).view(-1, 1, 1) * per + r.view(1, 1, -1)  # [n, 1, per]
        block_ids = (rows * cfg.pool_grid + cols).view(n, per * per)
        self.hr_blocks[bi.view(-1, 1), block_ids] = per_tile.to(self.hr_blocks.dtype)
        self.tile_done |= new

    def begin_step(self) -> None:
        self.block_mask = None
        self.step_used = []
        self.step_maps = []
        self.step_masks = []

    def gather_image_attention(self, probs: torch.Tensor) -> torch.Tensor:
        """probs: [B, S] (last query, summed over heads) -> [B, G*G] on the image positions."""
        n = self.cfg.lr_tokens
        idx = self.image_slot.view(-1, 1) + torch.arange(n, device=probs.device).view(1, -1)
        idx = idx.clamp(max=probs.shape[1] - 1)
        return probs.gather(1, idx) * self.has_image.view(-1, 1)

    def update_selection(self, layer_idx: int, probs: torch.Tensor) -> None:
        """Selection made by ``layer_idx`` from its sequence-only attention; used by the next."""
        amap = self.gather_image_attention(probs)
        if layer_idx == self.cfg.select_layer:
            self.last_map = amap
        if layer_idx == self.cfg.num_hidden_layers - 1 and not self.trace:
            return  # the last layer's selection is used by nothing
        mask = select_high_res(amap, self.keep, self.cfg.threshold, self.cfg.pool_grid)
        mask &= self.has_image.view(-1, 1)
        self.block_mask = mask
        if self.trace:
            self.step_maps.append(amap)
            self.step_masks.append(mask)

    def hr_keys(self, layer_idx: int, attn: HierarchicalAttention
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys and features of the selected high-res tokens for ``layer_idx``.

        Returns k: [B, Hkv, N, D] (rotary applied), feats: [B, N, hidden] and valid: [B, N]
        bool, N = 64 * (most blocks selected by one sample). Values are not projected here:
        sum_t p_t (W_V' f_t) = W_V' (sum_t p_t f_t), so the caller mixes the features first.
        Keys of blocks selected for the first time are projected (``k_proj_hd`` plus the
        interpolated rotary embedding) and cached for later steps of the same image; with
        ``hr_kv_prefetch``, all blocks of an image are projected at its first use."""
        cfg = self.cfg
        mask = self.block_mask
        assert mask is not None and self.hr_blocks is not None
        b, nblk = mask.shape
        tok = cfg.block_size ** 2
        hkv, d = cfg.num_key_value_heads, cfg.head_dim
        if cfg.hr_kv_reuse:
            if layer_idx not in self.hr_k:
                self.hr_k[layer_idx] = torch.zeros(b, hkv, nblk, tok, d, device=mask.device,
                                                   dtype=self.hr_blocks.dtype)
                self.computed[layer_idx] = torch.zeros(b, nblk, dtype=torch.bool,
                                                       device=mask.device)
            hr_k, done = self.hr_k[layer_idx], self.computed[layer_idx]
            # prefetch: the first use projects every block of each image
            want = self.has_image.view(-1, 1).expand_as(mask) if cfg.hr_kv_prefetch else mask
            need = want & ~done
            if need.any():
                self.ensure_tiles(need)
                bi, ki = need.nonzero(as_tuple=True)
                hr_k[bi, :, ki] = self._project_keys(attn, self.hr_blocks[bi, ki], bi, ki)
                done |= need
                self.blocks_projected += torch.bincount(bi, minlength=b)
        else:
            self.ensure_tiles(mask)
        self.step_used.append(mask)
        counts = mask.sum(1)
        kmax = int(counts.max())
        if kmax == 0:
            return (self.hr_blocks.new_zeros(b, hkv, 0, d),
                    self.hr_blocks.new_zeros(b, 0, cfg.hidden_size),
                    torch.zeros(b, 0, dtype=torch.bool, device=mask.device))
        # selected block ids first (stable sort keeps block order), padded with unselected ones
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :kmax]
        valid = (torch.arange(kmax, device=mask.device).view(1, -1) < counts.view(-1, 1))
        bidx = torch.arange(b, device=mask.device).view(-1, 1)
        # index_select on flattened leading dims: one contiguous copy per block (several times
        # faster than advanced indexing on CPU)
        blocks = self.hr_blocks.flatten(0, 1).index_select(0, (bidx * nblk + order).view(-1))
        blocks = blocks.view(b, kmax, tok, -1)  # [B, kmax, 64, hidden]
        if cfg.hr_kv_reuse:
            # straight into [B, Hkv, kmax, 64, D], so no permute afterwards
            rows = (bidx.view(b, 1, 1) * hkv + torch.arange(hkv, device=mask.device)
                    .view(1, -1, 1)) * nblk + order.view(b, 1, kmax)
            k_sel = self.hr_k[layer_idx].flatten(0, 2).index_select(0, rows.view(-1))
        else:  # the published code's way: project every selected token again at every step
            k_sel = self._project_keys(attn, blocks.reshape(b * kmax, tok, -1),
                                       bidx.expand(b, kmax).reshape(-1), order.reshape(-1))
            k_sel = k_sel.view(b, kmax, hkv, tok, d).transpose(1, 2)
            self.blocks_projected += counts
        k_sel = k_sel.reshape(b, hkv, kmax * tok, d)
        return k_sel, blocks.reshape(b, kmax * tok, -1), valid.repeat_interleave(tok, dim=1)

    def _project_keys(self, attn: HierarchicalAttention, x: torch.Tensor, bi: torch.Tensor,
                      ki: torch.Tensor) -> torch.Tensor:
        """x: [n, 64, hidden] block features of (sample bi, block ki) -> keys [n, Hkv, 64, D]."""
        cfg = self.cfg
        tok, hkv, d = x.shape[1], cfg.num_key_value_heads, cfg.head_dim
        k = attn.k_proj_hd(x).view(-1, tok, hkv, d).float()
        cos = self.hr_cos[bi, ki].unsqueeze(2)  # [n, 64, 1, D]
        sin = self.hr_sin[bi, ki].unsqueeze(2)
        # k * cos + rotate_half(k) * sin, with rotate_half(k) = cat(-k2, k1), in three passes
        half = d // 2
        out = k * cos
        out[..., :half].addcmul_(k[..., half:], sin[..., :half], value=-1.0)
        out[..., half:].addcmul_(k[..., :half], sin[..., half:])
        return out.transpose(1, 2).to(x.dtype)


class HierarchicalAttention(nn.Module):
    """Llama attention; in layers > s the last query also attends to selected high-res keys."""

    def __init__(self, cfg: FlexAttnConfig, layer_idx: int) -> None:
        # cfg only shapes the module; run-time settings come from FlexState.cfg
        super().__init__()
        self.layer_idx = layer_idx
        h, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, d
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=False)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=False)
        self.selects = layer_idx >= cfg.select_layer  # computes a selection for the next layer
        self.is_flex = layer_idx > cfg.select_layer  # attends to high-res keys
        if self.is_flex:
            self.k_proj_hd = nn.Linear(cfg.hidden_size, hkv * d, bias=False)
            self.v_proj_hd = nn.Linear(cfg.hidden_size, hkv * d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                start: int, sdpa_mask: torch.Tensor | None, key_valid: torch.Tensor,
                flex: FlexState | None) -> torch.Tensor:
        # x: [B, T, hidden]; cos, sin: [B, T, D]; sdpa_mask: [B, 1, T, S] bool (True = attend),
        # or None when no sample is padded (plain causal, which lets SDPA skip masked blocks)
        # key_valid: [B, S] bool; S = start + T
        b, t, _ = x.shape
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(b, t, h, d).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(b, t, hkv, d).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(b, t, hkv, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        s = start + t
        cache.k[:, :, start:s] = k
        cache.v[:, :, start:s] = v
        keys, values = cache.k[:, :, :s], cache.v[:, :, :s]  # [B, Hkv, S, D]
        gqa = h != hkv
        causal = sdpa_mask is None and t > 1
        if causal and start:
            raise ValueError("an unmasked multi-token step must start at slot 0")
        if flex is None or not self.selects:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=sdpa_mask,
                                                 is_causal=causal, enable_gqa=gqa)
        else:
            last = self._last_row(q[:, :, -1:], keys, values, key_valid, flex)  # [B, H, 1, D]
            if t > 1:
                # query i of the first T-1 rows sees keys 0..i (top-left causal alignment)
                rest = F.scaled_dot_product_attention(
                    q[:, :, :-1], keys, values,
                    attn_mask=None if causal else sdpa_mask[:, :, :-1], is_causal=causal,
                    enable_gqa=gqa)
                out = torch.cat([rest, last.to(rest.dtype)], dim=2)
            else:
                out = last.to(q.dtype)
        out = out.transpose(1, 2).reshape(b, t, h * d)
        return self.o_proj(out)

    def _last_row(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  key_valid: torch.Tensor, flex: FlexState) -> torch.Tensor:
        # q: [B, H, 1, D]; keys, values: [B, Hkv, S, D] -> [B, H, 1, D] in the model dtype.
        # Matrix products run in the model dtype, as in the original's eager attention, so no
        # cache, feature or weight tensor is ever copied to float32; only the small score and
        # probability rows are (the softmax is float32).
        b, h = q.shape[:2]
        hkv, d = keys.shape[1], keys.shape[-1]
        rep = h // hkv
        scale = d ** -0.5
        qg = q.reshape(b, hkv, rep, d)  # heads grouped by their kv head
        scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * scale  # [B, Hkv, rep, S]
        neg = torch.finfo(torch.float32).min
        scores = scores.masked_fill(~key_valid.view(b, 1, 1, -1), neg)
        probs_seq = torch.softmax(scores, dim=-1)
        hr = None
        if self.is_flex and flex.block_mask is not None:
            hr = flex.hr_keys(self.layer_idx, self)
        # selection for the next layer, from the sequence-only softmax summed over heads
        flex.update_selection(self.layer_idx, probs_seq.sum(dim=(1, 2)))
        if hr is None or hr[0].shape[2] == 0:
            out = torch.matmul(probs_seq.to(values.dtype), values)
            return out.reshape(b, h, 1, d)
        k_hr, feats, valid = hr  # [B, Hkv, N, D], [B, N, hidden], [B, N]
        s_hr = torch.matmul(qg, k_hr.transpose(-1, -2)).float() * scale  # [B, Hkv, rep, N]
        s_hr = s_hr.masked_fill(~valid.view(b, 1, 1, -1), float("-inf"))
        probs = torch.softmax(torch.cat([scores, s_hr], dim=-1), dim=-1).to(values.dtype)
        n_seq = scores.shape[-1]
        out = torch.matmul(probs[..., :n_seq], values)  # [B, Hkv, rep, D]
        p_hr = probs[..., n_seq:]  # [B, Hkv, rep, N]
        w_v = self.v_proj_hd.weight.view(hkv, d, -1)  # [Hkv, D, hidden]
        if flex.cfg.hr_kv_reuse:
            # values without projecting tokens: W_V' (sum_t p_t f_t), per query head
            mix = torch.matmul(p_hr.reshape(b, h, -1), feats).view(b, hkv, rep, -1)
            out = out + torch.einsum("bgrc,gdc->bgrd", mix, w_v)
        else:  # the published code's way: project every selected token's value
            v_hr = torch.einsum("bnc,gdc->bgnd", feats, w_v)
            out = out + torch.matmul(p_hr, v_hr)
        return out.reshape(b, h, 1, d)
