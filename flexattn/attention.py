"""Hierarchical self-attention (docs/DESIGN.md, "Hierarchical self-attention") and the caches
it reads.

Every position attends causally to the sequence through SDPA, except the *flex rows*: the last
``rows`` query positions of a forward step. Each flex row is computed explicitly, with a
float32 softmax and products in the model dtype: its sequence-only softmax gives the map the
next layer's selection is made from, and in FlexAttention layers it also attends to the
high-resolution keys that the previous layer's selection chose for that row (one softmax over
sequence keys and selected keys together). ``generate`` runs one flex row per step (the last
position, the token being predicted); the teacher-forced training pass runs one per answer
token, each with its own selection, which is exactly what the matching decode step computes.

High-resolution keys and values never enter the sequence KV cache: they live in
``HighResCache``, projected once per image and layer when a block is first selected and reused
at every later step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .config import FlexAttnConfig


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
class HighResCache:
    """The high-resolution side of one batched generation: plain storage.

    blocks: [B, P*P, s*s, hidden] projected CLIP features of the 1008 view grouped by 8x8 block
    (block-major); with lazy tiles, filled tile by tile as their blocks are first selected from
    ``pixels`` [B, 3, Z*t, Z*t], the normalised 1008 view, with ``tile_done`` [B, Z*Z] marking
    the 336 tiles encoded. cos, sin: [B, P*P, s*s, D] float32 rotary
    tables of the high-resolution keys. keys[layer]: [B, Hkv, P*P, s*s, D] keys of the blocks
    whose ``projected[layer]`` [B, P*P] is set."""

    blocks: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    pixels: torch.Tensor | None = None
    tile_done: torch.Tensor | None = None
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    projected: dict[int, torch.Tensor] = field(default_factory=dict)

    def layer_keys(self, layer_idx: int, hkv: int, head_dim: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, projected) of ``layer_idx``, allocated on first use."""
        if layer_idx not in self.keys:
            b, nblk, tok, _ = self.blocks.shape
            self.keys[layer_idx] = self.blocks.new_zeros(b, hkv, nblk, tok, head_dim)
            self.projected[layer_idx] = torch.zeros(b, nblk, dtype=torch.bool,
                                                    device=self.blocks.device)
        return self.keys[layer_idx], self.projected[layer_idx]


@dataclass
class FlexInputs:
    """What the FlexAttention layers of one forward step read besides the hidden states.

    image_slot: [B] cache slot of each sample's first image token; has_image: [B] bool;
    keep: [B, G, G] margin mask (``selection.margin_keep``); hr: the high-resolution cache;
    rows: flex rows of this step (the last ``rows`` positions); row_valid: [B, rows] bool,
    False for a row that is not a flex row of its sample (its prompt, when answers of a
    teacher-forced batch differ in length); forced: a selection fed in from outside in place of
    the model's own, for the samples where ``forced_on`` [B] is set: [B, rows, P*P] bool for
    every selecting layer, or [B, rows, n, P*P] one per layer whose selection is read (s ..
    L-2); it goes through the same path as the model's own (tiles encoded, blocks projected
    when first selected); keep_maps: record each selecting layer's map and mask (traces,
    training losses)."""

    cfg: FlexAttnConfig
    image_slot: torch.Tensor
    has_image: torch.Tensor
    keep: torch.Tensor
    hr: HighResCache
    rows: int = 1
    row_valid: torch.Tensor | None = None
    forced: torch.Tensor | None = None
    forced_on: torch.Tensor | None = None
    keep_maps: bool = False
    replay: torch.Tensor | None = None  # per step selections generate feeds in as ``forced``
    activations: Activations | None = None  # filled in when given (teacher_forward)


@dataclass
class Activations:
    """What a teacher-forced forward computed on the way to its logits, for training losses
    (``LlavaFlexAttn.teacher_forward(..., return_activations=True)``); inference never asks for
    it, so it costs nothing there. Every tensor is part of the autograd graph.

    final: [B, R, hidden] the flex rows' final normed hidden state (what ``lm_head`` reads);
    entering: [B, R, hidden] the flex rows' hidden state entering layer s (the selecting query);
    row_attention: one [B, R, S] per layer before s: the flex rows' attention over the sequence,
    mean over heads (``attention_probs``, the rule the layer itself attends by);
    maps: one [B, R, G*G] image attention map per selecting layer (s .. L-1), the same list as
    ``StepRecord.maps``;
    hr_read: one (probs [B, R, N], order [B, N / 64]) per FlexAttention layer that read
    high-res keys: each flex row's attention on each gathered high-res token, mean over heads,
    and the blocks gathered (tokens block by block, as in ``HighResCache.blocks``)."""

    final: torch.Tensor | None = None
    entering: torch.Tensor | None = None
    row_attention: list[torch.Tensor] = field(default_factory=list)
    maps: list[torch.Tensor] = field(default_factory=list)
    hr_read: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass
class StepRecord:
    """What one forward step's FlexAttention layers did, for statistics and losses.

    used: one [B, rows, P*P] block mask per FlexAttention layer that attended (the selection it
    read, a forced one included); maps / masks: with ``keep_maps``, one [B, rows, G*G] map and
    the [B, rows, P*P] mask the model made from it per selecting layer (layers s .. L-1);
    select_map: [B, rows, G*G] the map of layer s."""

    used: list[torch.Tensor] = field(default_factory=list)
    maps: list[torch.Tensor] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)
    select_map: torch.Tensor | None = None


def image_attention(probs: torch.Tensor, flex: FlexInputs) -> torch.Tensor:
    """probs: [B, R, S] (flex rows, summed over heads) -> [B, R, G*G] on the image positions."""
    n = flex.cfg.lr_tokens
    b, r, s = probs.shape
    idx = flex.image_slot.view(-1, 1) + torch.arange(n, device=probs.device).view(1, -1)
    idx = idx.clamp(max=s - 1).unsqueeze(1).expand(b, r, n)
    return probs.gather(2, idx) * flex.has_image.view(-1, 1, 1)


def row_scores(q: torch.Tensor, keys: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """Masked attention scores of query rows over the sequence keys: q [B, H, R, D] (projected,
    rotary applied; row i sits at slot S - R + i), keys [B, Hkv, S, D] (the same), key_valid
    [B, S] bool -> float32 [B, Hkv, H / Hkv, R, S] (heads grouped by their kv head), each row
    seeing the valid keys up to its own slot. Matrix products run in the model dtype, as in the
    original's eager attention; only the score rows are float32."""
    b, h, r, d = q.shape
    hkv, s = keys.shape[1], keys.shape[2]
    qg = q.reshape(b, hkv, (h // hkv) * r, d)  # heads grouped by their kv head, then rows
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * d ** -0.5
    scores = scores.view(b, hkv, h // hkv, r, s)
    allowed = key_valid.view(b, 1, 1, 1, s)
    if r > 1:  # row i sits at slot s - r + i and sees the keys up to it
        slot = torch.arange(s, device=q.device).view(1, -1)
        row_slot = torch.arange(s - r, s, device=q.device).view(-1, 1)
        allowed = allowed & (slot <= row_slot).view(1, 1, 1, r, s)
    return scores.masked_fill(~allowed, torch.finfo(torch.float32).min)


def attention_probs(q: torch.Tensor, keys: torch.Tensor, key_valid: torch.Tensor
                    ) -> torch.Tensor:
    """The sequence attention of query rows (``row_scores``'s shapes): float32
    [B, Hkv, H / Hkv, R, S]."""
    return torch.softmax(row_scores(q, keys, key_valid), dim=-1)


def project_hr_keys(attn: HierarchicalAttention, hr: HighResCache, x: torch.Tensor,
                    bi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
    """x: [n, 64, hidden] block features of (sample bi, block ki) -> keys [n, Hkv, 64, D]:
    ``k_proj_hd`` and the interpolated rotary embedding."""
    tok, hkv, d = x.shape[1], attn.num_kv_heads, attn.head_dim
    k = attn.k_proj_hd(x).view(-1, tok, hkv, d).float()
    cos = hr.cos[bi, ki].unsqueeze(2)  # [n, 64, 1, D]
    sin = hr.sin[bi, ki].unsqueeze(2)
    # k * cos + rotate_half(k) * sin, with rotate_half(k) = cat(-k2, k1), in three passes
    half = d // 2
    out = k * cos
    out[..., :half].addcmul_(k[..., half:], sin[..., :half], value=-1.0)
    out[..., half:].addcmul_(k[..., :half], sin[..., half:])
    return out.transpose(1, 2).to(x.dtype)


class HierarchicalAttention(nn.Module):
    """Llama attention; in layers > s the flex rows also attend to selected high-res keys."""

    def __init__(self, cfg: FlexAttnConfig, layer_idx: int) -> None:
        # cfg only shapes the module; run-time settings come from FlexInputs.cfg
        super().__init__()
        self.layer_idx = layer_idx
        h, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, d
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=False)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=False)
        self.selects = layer_idx >= cfg.select_layer  # its map makes the next layer's selection
        self.is_flex = layer_idx > cfg.select_layer  # attends to high-res keys
        if self.is_flex:
            self.k_proj_hd = nn.Linear(cfg.hidden_size, hkv * d, bias=False)
            self.v_proj_hd = nn.Linear(cfg.hidden_size, hkv * d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                start: int, sdpa_mask: torch.Tensor | None, key_valid: torch.Tensor,
                flex: FlexInputs | None = None, hr_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [B, T, hidden]; cos, sin: [B, T, D]; sdpa_mask: [B, 1, T, S] bool (True = attend),
        or None when no sample is padded (plain causal, which lets SDPA skip masked blocks);
        key_valid: [B, S] bool, S = start + T; hr_mask: [B, R, P*P] the selection each flex
        row reads (FlexAttention layers).
        Returns ([B, T, hidden], the flex rows' sequence attention summed over heads [B, R, S]
        in float32, or None when this layer makes no selection)."""
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
        probs = None
        if flex is None or not self.selects:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=sdpa_mask,
                                                 is_causal=causal, enable_gqa=gqa)
            if flex is not None and flex.activations is not None:  # a layer before s
                flex.activations.row_attention.append(
                    attention_probs(q[:, :, t - flex.rows:], keys, key_valid).mean(dim=(1, 2)))
        else:
            r = flex.rows
            last, probs = self._flex_rows(q[:, :, t - r:], keys, values, key_valid, flex,
                                          hr_mask)  # [B, H, R, D]
            if t > r:
                # query i of the first T-R rows sees keys 0..i (top-left causal alignment)
                rest = F.scaled_dot_product_attention(
                    q[:, :, :t - r], keys, values,
                    attn_mask=None if causal else sdpa_mask[:, :, :t - r], is_causal=causal,
                    enable_gqa=gqa)
                out = torch.cat([rest, last.to(rest.dtype)], dim=2)
            else:
                out = last.to(q.dtype)
        out = out.transpose(1, 2).reshape(b, t, h * d)
        return self.o_proj(out), probs

    def _flex_rows(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   key_valid: torch.Tensor, flex: FlexInputs, hr_mask: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [B, H, R, D]; keys, values: [B, Hkv, S, D] -> ([B, H, R, D], [B, R, S]).
        # Matrix products run in the model dtype, as in the original's eager attention, so no
        # cache, feature or weight tensor is ever copied to float32; only the small score and
        # probability rows are (the softmax is float32).
        b, h, r, d = q.shape
        hkv, s = keys.shape[1], keys.shape[2]
        rep = h // hkv
        scale = d ** -0.5
        qg = q.reshape(b, hkv, rep * r, d)  # heads grouped by their kv head, then rows
        scores = row_scores(q, keys, key_valid)  # [B, Hkv, rep, R, S]
        probs_seq = torch.softmax(scores, dim=-1)  # [B, Hkv, rep, R, S]
        selection_probs = probs_seq.sum(dim=(1, 2))  # [B, R, S]
        hr = None
        if self.is_flex and hr_mask is not None:
            hr = self._selected_keys(flex, hr_mask)
        if hr is None or hr[0].shape[2] == 0:
            out = torch.matmul(probs_seq.to(values.dtype).view(b, hkv, rep * r, s), values)
            return out.view(b, h, r, d), selection_probs
        k_hr, feats, valid, order = hr  # [B, Hkv, N, D], [B, N, hidden], [B, R, N], [B, N/64]
        n = k_hr.shape[2]
        s_hr = torch.matmul(qg, k_hr.transpose(-1, -2)).float() * scale  # [B, Hkv, rep*R, N]
        s_hr = s_hr.view(b, hkv, rep, r, n).masked_fill(~valid.view(b, 1, 1, r, n),
                                                        float("-inf"))
        probs = torch.softmax(torch.cat([scores, s_hr], dim=-1), dim=-1).to(values.dtype)
        out = torch.matmul(probs[..., :s].reshape(b, hkv, rep * r, s), values)
        p_hr = probs[..., s:]  # [B, Hkv, rep, R, N]
        if flex.activations is not None:
            flex.activations.hr_read.append((p_hr.float().sum(dim=(1, 2)) / h, order))
        w_v = self.v_proj_hd.weight.view(hkv, d, -1)  # [Hkv, D, hidden]
        if flex.cfg.hr_kv_reuse:
            # values without projecting tokens: W_V' (sum_t p_t f_t), per query head and row
            mix = torch.matmul(p_hr.reshape(b, h * r, n), feats).view(b, hkv, rep * r, -1)
            out = out + torch.einsum("bgrc,gdc->bgrd", mix, w_v)
        else:  # the published code's way: project every selected token's value
            v_hr = torch.einsum("bnc,gdc->bgnd", feats, w_v)
            out = out + torch.matmul(p_hr.reshape(b, hkv, rep * r, n), v_hr)
        return out.view(b, h, r, d), selection_probs

    def _selected_keys(self, flex: FlexInputs, hr_mask: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys and features of the high-res tokens the flex rows selected.

        hr_mask: [B, R, P*P]. Returns k: [B, Hkv, N, D] (rotary applied), feats: [B, N, hidden]
        valid: [B, R, N] bool, N = 64 * (most blocks one sample's rows selected together), and
        the blocks gathered, [B, N / 64].
        Values are not projected here: sum_t p_t (W_V' f_t) = W_V' (sum_t p_t f_t), so the
        caller mixes the features first. With ``hr_kv_reuse``, keys of blocks selected for the
        first time are projected and cached for later steps of the same image; with
        ``hr_kv_prefetch``, all blocks of an image at its first use."""
        cfg, hr = flex.cfg, flex.hr
        union = hr_mask.any(1)  # [B, P*P]
        b, nblk = union.shape
        tok = cfg.block_size ** 2
        hkv, d = self.num_kv_heads, self.head_dim
        counts = union.sum(1)
        need = None
        if cfg.hr_kv_reuse:
            keys, done = hr.layer_keys(self.layer_idx, hkv, d)
            want = flex.has_image.view(-1, 1).expand_as(union) if cfg.hr_kv_prefetch else union
            need = want & ~done
        # the layer's one host synchronisation: how many blocks to gather, which to project
        host = torch.cat([counts, need.flatten().long()] if need is not None else [counts])
        host = host.tolist()
        kmax = max(host[:b])
        pairs = [divmod(i, nblk) for i, v in enumerate(host[b:]) if v]
        if pairs:
            bi, ki = torch.tensor(pairs, device=union.device).unbind(1)
            keys[bi, :, ki] = project_hr_keys(self, hr, hr.blocks[bi, ki], bi, ki)
            done |= need
        if kmax == 0:
            return (hr.blocks.new_zeros(b, hkv, 0, d), hr.blocks.new_zeros(b, 0, cfg.hidden_size),
                    torch.zeros(b, hr_mask.shape[1], 0, dtype=torch.bool, device=union.device),
                    torch.zeros(b, 0, dtype=torch.long, device=union.device))
        # selected block ids first (stable sort keeps block order), padded with unselected ones
        order = torch.sort((~union).to(torch.int8), dim=1, stable=True).indices[:, :kmax]
        bidx = torch.arange(b, device=union.device).view(-1, 1)
        # index_select on flattened leading dims: one contiguous copy per block (several times
        # faster than advanced indexing on CPU)
        blocks = hr.blocks.flatten(0, 1).index_select(0, (bidx * nblk + order).view(-1))
        blocks = blocks.view(b, kmax, tok, -1)  # [B, kmax, 64, hidden]
        if cfg.hr_kv_reuse:
            # straight into [B, Hkv, kmax, 64, D], so no permute afterwards
            rows = (bidx.view(b, 1, 1) * hkv + torch.arange(hkv, device=union.device)
                    .view(1, -1, 1)) * nblk + order.view(b, 1, kmax)
            k_sel = hr.keys[self.layer_idx].flatten(0, 2).index_select(0, rows.view(-1))
        else:  # the published code's way: project every selected token again at every step
            k_sel = project_hr_keys(self, hr, blocks.reshape(b * kmax, tok, -1),
                                    bidx.expand(b, kmax).reshape(-1), order.reshape(-1))
            k_sel = k_sel.view(b, kmax, hkv, tok, d).transpose(1, 2)
        k_sel = k_sel.reshape(b, hkv, kmax * tok, d)
        # per row: the gathered blocks it selected (padding blocks are never valid)
        valid = hr_mask.gather(2, order.unsqueeze(1).expand(-1, hr_mask.shape[1], -1))
        valid = valid & (torch.arange(kmax, device=union.device) < counts.view(-1, 1)).unsqueeze(1)
        return (k_sel, blocks.reshape(b, kmax * tok, -1), valid.repeat_interleave(tok, dim=2),
                order)
