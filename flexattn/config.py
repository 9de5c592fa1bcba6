"""Configuration of LLaVA-FlexAttn: one validated dataclass for the language model, the
projector and the FlexAttention settings. The CLIP tower keeps its own transformers config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from transformers import LlamaConfig

from .options import CLIP_MEAN, CLIP_STD, LOWRES_VIEWS, MODES, RUNTIME_FIELDS


@dataclass
class FlexAttnConfig:
    # language model (Llama)
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    hidden_act: str = "silu"
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    # vision tower and projector
    mm_hidden_size: int = 1024
    mm_projector_type: str = "mlp2x_gelu"
    mm_vision_select_layer: int = -2
    patch_size: int = 14
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    # FlexAttention (docs/DESIGN.md section 3)
    select_layer: int = 8  # s: last plain layer; layers s+1..L-1 are FlexAttention layers
    threshold: float = 48.0  # keep cells with 255 * normalised attention > threshold
    lowres_size: int = 336
    highres_size: int = 1008
    zoom_ratio: int = 3
    pool_grid: int = 9  # 3 * zoom_ratio cells per side
    mode: str = "flexattn"
    # how the checkpoint was trained to see its images and prompts (fixed by the checkpoint):
    # the low-res view is "highres" (antialiased downsampling of the padded high-res square, as
    # LLaVA-FlexAttn does) or "direct" (the padded image resized straight to lowres_size, as
    # LLaVA-1.5 and Hugging Face's LlavaImageProcessor(do_pad=True) do); the text after <image>
    # starts with sentencepiece's dummy prefix (original LLaVA encodes each chunk on its own) or
    # not (Hugging Face's LlavaProcessor with a Llama tokenizer of legacy=False)
    lowres_view: str = "highres"
    prefix_after_image: bool = True
    # cost switches (outputs are the same either way, up to float rounding)
    lazy_tiles: bool = True  # encode a 336 tile only when one of its cells is first selected
    hr_kv_reuse: bool = True  # project each high-res block once per image and layer
    # project every block of an image in its first step (one large product per layer) instead
    # of when each is first selected: more work when the selection stays in one area, but no
    # projection while decoding; implies all tiles (needs hr_kv_reuse)
    hr_kv_prefetch: bool = False
    # most crops per CLIP forward; 0: automatic. On a GPU every crop of a call goes through at
    # once; on a CPU, as many as keep a forward's widest activation within 16 MiB (7 crops when
    # the widest layer is 1024 wide in float32, 1 at CLIP-L's 4096), small enough for glibc to
    # reuse from its heap instead of mapping it afresh (see ``vision_chunk`` in model.py)
    vision_batch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # anything else from the checkpoint

    def __post_init__(self) -> None:
        for name in ("select_layer", "lowres_size", "highres_size", "zoom_ratio", "pool_grid",
                     "patch_size", "vocab_size", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, str):  # the original checkpoint stores these as strings
                value = int(value)
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")  # noqa: TRY004
            setattr(self, name, value)
        self.threshold = float(self.threshold)
        self.image_mean = tuple(float(x) for x in self.image_mean)
        self.image_std = tuple(float(x) for x in self.image_std)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.lowres_view not in LOWRES_VIEWS:
            raise ValueError(f"lowres_view must be one of {LOWRES_VIEWS}, got {self.lowres_view!r}")
        if not 0 <= self.threshold <= 255:
            raise ValueError(f"threshold must be within [0, 255], got {self.threshold}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
        if not 0 <= self.select_layer < self.num_hidden_layers:
            raise ValueError(
                f"select_layer must be within [0, {self.num_hidden_layers}), got {self.select_layer}")
        if self.highres_size != self.lowres_size * self.zoom_ratio:
            raise ValueError(
                f"highres_size ({self.highres_size}) must equal lowres_size ({self.lowres_size})"
                f" * zoom_ratio ({self.zoom_ratio})")
        if self.lowres_size % self.patch_size:
            raise ValueError("lowres_size must be a multiple of patch_size")
        if self.hr_grid % self.pool_grid:
            raise ValueError(f"pool_grid ({self.pool_grid}) must divide the high-res grid"
                             f" ({self.hr_grid})")
        if self.pool_grid % self.zoom_ratio:
            raise ValueError(f"pool_grid ({self.pool_grid}) must be a multiple of zoom_ratio"
                             f" ({self.zoom_ratio}) so that cells do not straddle tiles")
        if isinstance(self.vision_batch, bool) or not isinstance(self.vision_batch, int) \
                or self.vision_batch < 0:
            raise ValueError(f"vision_batch must be an integer >= 0, got {self.vision_batch!r}")
        if self.hr_kv_prefetch and not self.hr_kv_reuse:
            raise ValueError("hr_kv_prefetch needs hr_kv_reuse (prefetched keys are kept for"
                             " reuse)")
        if self.mm_projector_type != "mlp2x_gelu":
            raise ValueError(f"unsupported mm_projector_type {self.mm_projector_type!r}"
                             " (only mlp2x_gelu is implemented)")

    # derived sizes --------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def lr_grid(self) -> int:  # 24
        return self.lowres_size // self.patch_size

    @property
    def lr_tokens(self) -> int:  # 576
        return self.lr_grid ** 2

    @property
    def hr_grid(self) -> int:  # 72
        return self.lr_grid * self.zoom_ratio

    @property
    def hr_tokens(self) -> int:  # 5184
        return self.hr_grid ** 2

    @property
    def num_blocks(self) -> int:  # 81
        return self.pool_grid ** 2

    @property
    def block_size(self) -> int:  # 8 tokens per block side
        return self.hr_grid // self.pool_grid

    @property
    def flex_layers(self) -> list[int]:
        return list(range(self.select_layer + 1, self.num_hidden_layers))

    def with_runtime(self, **changes: Any) -> FlexAttnConfig:
        """A copy with run-time options changed (``RUNTIME_FIELDS``); a structural field is
        refused, since the modules were built from it."""
        fixed = sorted(set(changes) - set(RUNTIME_FIELDS))
        names = {f.name for f in dataclasses.fields(self)}
        if any(name in names for name in fixed):
            raise ValueError(f"{', '.join(n for n in fixed if n in names)}: fixed by the checkpoint"
                             f" (the model was built from it); run-time options are"
                             f" {', '.join(RUNTIME_FIELDS)}")
        return self.replace(**changes)

    def replace(self, **changes: Any) -> FlexAttnConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown config field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FlexAttnConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def llama_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta, max_position_embeddings=self.max_position_embeddings,
            hidden_act=self.hidden_act, attention_bias=False, mlp_bias=False,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id if 0 <= self.eos_token_id < self.vocab_size else None,
            pad_token_id=self.pad_token_id, tie_word_embeddings=False)
