"""HierarchicalAttention (batched, left padded, SDPA + fused last row + per-block K/V reuse)
against a plain eager implementation that concatenates keys and masks explicitly, per sample."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from flexattn.attention import (
    FlexInputs,
    HierarchicalAttention,
    HighResCache,
    KVCache,
    image_attention,
)
from flexattn.config import FlexAttnConfig
from flexattn.selection import blocks_to_tokens, hr_rope_tables, margin_keep, to_blocks

CFG = FlexAttnConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, select_layer=1,
                     mm_hidden_size=16)


def rope(x, cos, sin):
    # x: [H, T, D]; cos, sin: [T, D]
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


def eager_layer(attn, x, pos, cos_tab, sin_tab, hr_feats, hr_cos, hr_sin, token_mask,
                past_k=None, past_v=None):
    """One sample, no padding. x: [T, C]; hr_feats: [5184, C] row-major; token_mask: [5184]."""
    h, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    t = x.shape[0]
    q = (x @ attn.q_proj.weight.T).view(t, h, d).transpose(0, 1)
    k = (x @ attn.k_proj.weight.T).view(t, hkv, d).transpose(0, 1)
    v = (x @ attn.v_proj.weight.T).view(t, hkv, d).transpose(0, 1)
    q, k = rope(q, cos_tab[pos], sin_tab[pos]), rope(k, cos_tab[pos], sin_tab[pos])
    if past_k is not None:
        k, v = torch.cat([past_k, k], 1), torch.cat([past_v, v], 1)
    s = k.shape[1]
    rep = h // hkv
    kk, vv = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)  # [H, S, D]
    scores = q @ kk.transpose(1, 2) / d ** 0.5  # [H, T, S]
    causal = torch.ones(t, s, dtype=torch.bool).tril(diagonal=s - t)
    scores = scores.masked_fill(~causal, float("-inf"))
    out = torch.softmax(scores, -1) @ vv  # [H, T, D]
    seq_probs_last = torch.softmax(scores[:, -1], -1)  # [H, S]
    sel = token_mask.nonzero().flatten()
    if len(sel):
        f = hr_feats[sel]
        k_hr = (f @ attn.k_proj_hd.weight.T).view(-1, hkv, d).transpose(0, 1)  # [Hkv, N, D]
        v_hr = (f @ attn.v_proj_hd.weight.T).view(-1, hkv, d).transpose(0, 1)
        k_hr = rope(k_hr, hr_cos[sel], hr_sin[sel])
        k_all = torch.cat([kk, k_hr.repeat_interleave(rep, 0)], 1)
        v_all = torch.cat([vv, v_hr.repeat_interleave(rep, 0)], 1)
        last = torch.softmax(q[:, -1:] @ k_all.transpose(1, 2) / d ** 0.5, -1) @ v_all
        out[:, -1:] = last
    y = out.transpose(0, 1).reshape(t, h * d) @ attn.o_proj.weight.T
    return y, k, v, seq_probs_last.sum(0)


def test_hierarchical_attention_matches_eager_reference():
    torch.manual_seed(0)
    attn = HierarchicalAttention(CFG, layer_idx=2).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    rot = LlamaRotaryEmbedding(CFG.llama_config())
    lengths = [600, 590, 583]  # 576 image tokens + a few text tokens each
    offsets = [10, 3, 5]  # where each sample's image starts
    b, t = 3, max(lengths)
    cos_tab, sin_tab = rot(torch.zeros(1), torch.arange(700).view(1, -1))
    cos_tab, sin_tab = cos_tab[0], sin_tab[0]
    hr_feats = torch.randn(b, 5184, 32)
    img_pos = torch.tensor(offsets).view(-1, 1) + torch.arange(576)
    hr_cos, hr_sin = hr_rope_tables(*rot(torch.zeros(1), img_pos), 72)
    # ragged selections: 5 blocks, 1 block, nothing
    blocks = torch.zeros(b, 81, dtype=torch.bool)
    blocks[0, [0, 7, 40, 41, 80]] = True
    blocks[1, 33] = True
    blocks_step2 = blocks.clone()
    blocks_step2[0, 7] = False
    blocks_step2[1, [2, 60]] = True  # new blocks: projected at step 2, old ones reused
    blocks_step2[2, 5] = True
    pads = [t - n for n in lengths]
    hr = HighResCache(blocks=to_blocks(hr_feats, 72, 9), cos=to_blocks(hr_cos, 72, 9),
                      sin=to_blocks(hr_sin, 72, 9))
    flex = FlexInputs(cfg=CFG, image_slot=torch.tensor(pads) + torch.tensor(offsets),
                      has_image=torch.ones(b, dtype=torch.bool),
                      keep=margin_keep(torch.tensor([[100, 100]] * b), 24), hr=hr)
    x = torch.randn(b, t, 32)
    positions = torch.stack([(torch.arange(t) - p).clamp(min=0) for p in pads])
    key_valid = torch.zeros(b, t + 1, dtype=torch.bool)
    for i, p in enumerate(pads):
        key_valid[i, p:] = True
    cache = KVCache.empty(CFG, b, t + 1, "cpu", torch.float32)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    mask = (causal & (key_valid[:, None, :t] | torch.eye(t, dtype=torch.bool))).unsqueeze(1)
    cos, sin = rot(x, positions)
    with torch.no_grad():
        y1, probs1 = attn(x, cos, sin, cache, 0, mask, key_valid[:, :t], flex, blocks[:, None])
        map1 = image_attention(probs1, flex)[:, 0]
        x2 = torch.randn(b, 1, 32)
        pos2 = torch.tensor(lengths).view(-1, 1)
        cos2, sin2 = rot(x2, pos2)
        projected_before = hr.projected[2].sum(1)
        y2, _ = attn(x2, cos2, sin2, cache, t, key_valid[:, None, None, :], key_valid, flex,
                     blocks_step2[:, None])
        # only the new blocks are projected: none for sample 0, two for 1, one for 2
        assert (hr.projected[2].sum(1) - projected_before).tolist() == [0, 2, 1]
        for i in range(b):
            p = pads[i]
            ref1, k, v, probs = eager_layer(
                attn, x[i, p:], torch.arange(lengths[i]), cos_tab, sin_tab, hr_feats[i],
                hr_cos[i], hr_sin[i], blocks_to_tokens(blocks[i:i + 1], 72)[0])
            torch.testing.assert_close(y1[i, p:], ref1, atol=2e-5, rtol=1e-5)
            ref_map = probs[offsets[i]:offsets[i] + 576]
            torch.testing.assert_close(map1[i], ref_map, atol=1e-6, rtol=1e-5)
            ref2, *_ = eager_layer(
                attn, x2[i], torch.tensor([lengths[i]]), cos_tab, sin_tab, hr_feats[i],
                hr_cos[i], hr_sin[i], blocks_to_tokens(blocks_step2[i:i + 1], 72)[0], k, v)
            torch.testing.assert_close(y2[i], ref2, atol=2e-5, rtol=1e-5)
