"""Analytical cost model (FLOPs, a multiply-add counted as 2) of one image through the three
modes: vision encoder, prefill, decode, and FlexAttention's high-resolution keys and values.

It counts what this implementation computes: the CLIP layers up to the selected one (layer -2:
all but the last), the projector, all decoder linears, causal attention over
the sequence, the logits of the last position only, and in ``flexattn`` mode the ``k_proj_hd``
projection of each projected block, the last query's scores against the selected keys, and
its values as W_V' (sum_t p_t f_t) per head (no value is projected per token). With
``reuse=False`` it counts the published code's way instead: keys and values of every selected
token projected at every step. Element-wise work (norms, softmax, selection) is left out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import CLIPVisionConfig

from .config import FlexAttnConfig


@dataclass
class Cost:
    vision: float  # CLIP + projector over all encoded crops
    prefill: float  # decoder over the prompt (image positions included)
    decode: float  # decoder over the generated tokens after the first
    hr_kv: float  # high-res key projections, attention to high-res keys, value mixing
    crops: int
    prefill_tokens: int

    @property
    def total(self) -> float:
        return self.vision + self.prefill + self.decode + self.hr_kv

    def as_dict(self) -> dict[str, float]:
        d = asdict(self)
        d["total"] = self.total
        return d


def clip_crop_flops(vc: CLIPVisionConfig, mm_hidden: int, hidden: int,
                    select_layer: int = -2) -> float:
    """One 336 crop through the CLIP layers up to ``select_layer`` and the mlp2x_gelu
    projector."""
    n = (vc.image_size // vc.patch_size) ** 2 + 1  # patches + CLS
    h, i = vc.hidden_size, vc.intermediate_size
    per_layer = 2 * n * (4 * h * h + 2 * h * i) + 4 * n * n * h
    patch = 2 * (n - 1) * 3 * vc.patch_size ** 2 * h
    proj = 2 * (n - 1) * (mm_hidden * hidden + hidden * hidden)
    layers = select_layer if select_layer >= 0 else vc.num_hidden_layers + 1 + select_layer
    return layers * per_layer + patch + proj


def _linear_per_token(cfg: FlexAttnConfig) -> float:
    d, hd = cfg.hidden_size, cfg.head_dim
    q_o = 2 * d * cfg.num_attention_heads * hd
    k_v = 2 * d * cfg.num_key_value_heads * hd
    mlp = 3 * d * cfg.intermediate_size
    return 2 * cfg.num_hidden_layers * (q_o + k_v + mlp)


def image_cost(cfg: FlexAttnConfig, vc: CLIPVisionConfig, mode: str, text_tokens: int,
               new_tokens: int, selected_frac: float = 0.0, tiles: int | None = None,
               blocks_projected: int | None = None, attention: str = "causal",
               reuse: bool = True) -> Cost:
    """Cost of one image with ``text_tokens`` prompt tokens and ``new_tokens`` generated.

    selected_frac: mean fraction of the 5184 high-res tokens attended per FlexAttention layer
    and step; tiles: 336 tiles encoded (default all Z*Z); blocks_projected: 8x8 blocks put
    through the high-res projections over all layers (default: each layer's selection once);
    attention: "causal" counts the lower triangle of prefill attention (what a causal kernel
    computes), "dense" the whole square (what a masked kernel, and torch's counter, count)."""
    if attention not in ("causal", "dense"):
        raise ValueError(f"attention must be 'causal' or 'dense', got {attention!r}")
    z2 = cfg.zoom_ratio ** 2
    crop = clip_crop_flops(vc, cfg.mm_hidden_size, cfg.hidden_size, cfg.mm_vision_select_layer)
    n_img = cfg.lr_tokens + (cfg.hr_tokens if mode == "fullres" else 0)
    if mode == "lowres":
        crops = 1
    elif mode == "fullres":
        crops = 1 + z2
    else:
        crops = 1 + (z2 if tiles is None else tiles)
    t = text_tokens + n_img
    lin = _linear_per_token(cfg)
    attn_dim = cfg.num_attention_heads * cfg.head_dim
    layers = cfg.num_hidden_layers
    logits = 2 * cfg.hidden_size * cfg.vocab_size
    square = 4 * t * t * attn_dim  # QK^T and PV over the whole T x T matrix
    prefill = t * lin + layers * (square / 2 if attention == "causal" else square) + logits
    decode = 0.0
    for step in range(1, new_tokens):
        ctx = t + step
        decode += lin + layers * 4 * ctx * attn_dim + logits
    hr_kv = 0.0
    if mode == "flexattn":
        n_flex = len(cfg.flex_layers)
        kv_dim = cfg.num_key_value_heads * cfg.head_dim
        proj = 2 * cfg.hidden_size * kv_dim  # one token through k_proj_hd (or v_proj_hd)
        selected = selected_frac * cfg.hr_tokens  # per layer and step, on average
        steps = new_tokens * n_flex
        if reuse:
            if blocks_projected is None:
                blocks_projected = round(selected_frac * cfg.num_blocks) * n_flex
            hr_kv += blocks_projected * cfg.block_size ** 2 * proj
            mix = 2 * cfg.num_attention_heads * cfg.hidden_size * (selected + cfg.head_dim)
            hr_kv += steps * (2 * selected * attn_dim + mix)
        else:
            hr_kv += steps * (selected * 2 * proj + 4 * selected * attn_dim)
    return Cost(vision=crops * crop, prefill=prefill, decode=decode, hr_kv=hr_kv, crops=crops,
                prefill_tokens=t)
