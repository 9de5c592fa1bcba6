"""The original LLaVA-FlexAttn checkpoint layout on disk (docs/DESIGN.md section 4), written
the way the published code writes it: the JSON files (key order and values as in the golden
checkpoint under ``tests/data/golden/tiny``), safetensors weights, a sentencepiece tokenizer,
and the CLIP tower in a folder of its own named by ``mm_vision_tower``.

``export_original`` writes a loaded model (the trained SynthHR mini, say) in this layout;
``flexattn.demo_model`` writes the deterministic random demo model through the same pieces.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .config import CLIP_MEAN, CLIP_STD

CLIP_DIR_NAME = "clip-vit-tiny-patch14-336"
LLAVA_DIR_NAME = "llava-v1.5-tiny-flexattn"
IMAGE_SIZE = 336
PATCH_SIZE = 14

# The original checkpoints were written by transformers 4.37.2 (the version the original
# FlexAttention code pins); the original-layout JSON files keep that value, as in the golden dir.
ORIGINAL_TRANSFORMERS_VERSION = "4.37.2"


def added_token(content: str, *, typed: bool) -> dict[str, Any]:
    token: dict[str, Any] = {"__type": "AddedToken"} if typed else {}
    token.update(
        {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        }
    )
    return token


def tokenizer_config() -> dict[str, Any]:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": added_token("<s>", typed=True),
        "clean_up_tokenization_spaces": False,
        "eos_token": added_token("</s>", typed=True),
        "legacy": False,
        "model_max_length": 2048,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": added_token("<unk>", typed=True),
    }


def special_tokens_map() -> dict[str, Any]:
    return {
        "bos_token": added_token("<s>", typed=False),
        "eos_token": added_token("</s>", typed=False),
        "pad_token": "<unk>",
        "unk_token": added_token("<unk>", typed=False),
    }


def generation_config() -> dict[str, Any]:
    return {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "max_length": 4096,
        "transformers_version": ORIGINAL_TRANSFORMERS_VERSION,
    }


def clip_preprocessor_config(image_size: int = IMAGE_SIZE) -> dict[str, Any]:
    return {
        "crop_size": image_size,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "resample": 3,
        "size": image_size,
    }


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def llava_config(
    *,
    llm_layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab_size: int,
    clip_hidden: int,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """The original ``llava_llama`` config.json, keys sorted as in the golden file."""
    return {
        "_name_or_path": LLAVA_DIR_NAME,
        "architectures": ["LlavaLlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "extra": {
            "highres_size": "1008",
            "lowres_size": "336",
            "threshold": "48",
            "warmup": "10",
            "zoom_ratio": "3",
        },
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "image_aspect_ratio": "pad",
        "image_grid_pinpoints": None,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_length": 4096,
        "max_position_embeddings": 4096,
        "mm_hidden_size": clip_hidden,
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_resampler_type": None,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": f"../{CLIP_DIR_NAME}",
        "model_type": "llava_llama",
        "num_attention_heads": heads,
        "num_hidden_layers": llm_layers,
        "num_key_value_heads": kv_heads,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "torch_dtype": dtype_name(dtype),
        "transformers_version": ORIGINAL_TRANSFORMERS_VERSION,
        "tune_mm_mlp_adapter": False,
        "tune_mm_vision_resampler": False,
        "unfreeze_mm_vision_tower": False,
        "use_cache": True,
        "use_mm_proj": True,
        "vocab_size": vocab_size,
    }


def write_json(path: Path, obj: Any) -> None:
    """Write JSON like the golden files: indent 2, no trailing newline."""
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")



def clip_config(
    *, clip_hidden: int, clip_layers: int, clip_heads: int, clip_intermediate: int
) -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=clip_hidden,
        intermediate_size=clip_intermediate,
        num_hidden_layers=clip_layers,
        num_attention_heads=clip_heads,
        projection_dim=clip_hidden,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})



def export_original(model: Any, out_dir: Path, tower_dir: str = "vision_tower") -> Path:
    """Write a loaded ``LlavaFlexAttn`` in the original layout: ``out_dir/config.json``
    (``llava_llama``, ``extra`` as strings, ``extra.select_layer`` when s is not 8),
    ``model.safetensors`` in the model's dtype, the tokenizer, and the CLIP tower in
    ``out_dir/<tower_dir>`` (``mm_vision_tower`` relative to the model folder)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    module, cfg = model.module, model.config
    vc = module.vision_config
    dtype = model.dtype
    tower = out / tower_dir
    tower.mkdir(parents=True, exist_ok=True)
    for stale in tower.glob("model*.safetensors*"):
        stale.unlink()
    vc.save_pretrained(tower)
    clip = {"vision_model." + k: v.detach().to("cpu", dtype)
            for k, v in module.vision_tower.state_dict().items() if not k.endswith("position_ids")}
    save_safetensors(clip, tower / "model.safetensors")
    write_json(tower / "preprocessor_config.json", clip_preprocessor_config(cfg.lowres_size))
    state = {k: v.detach().to("cpu", dtype) for k, v in module.state_dict().items()
             if not k.startswith("vision_tower.") and "rotary" not in k}
    save_safetensors(state, out / "model.safetensors")
    config = llava_config(llm_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
                           heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                           intermediate=cfg.intermediate_size, vocab_size=cfg.vocab_size,
                           clip_hidden=cfg.mm_hidden_size, dtype=dtype)
    config["_name_or_path"] = out.name
    config["mm_vision_tower"] = tower_dir
    config["mm_vision_select_layer"] = cfg.mm_vision_select_layer
    config["extra"] = {"highres_size": str(cfg.highres_size), "lowres_size": str(cfg.lowres_size),
                       "threshold": f"{cfg.threshold:g}", "zoom_ratio": str(cfg.zoom_ratio)}
    if cfg.select_layer != 8:
        config["extra"]["select_layer"] = str(cfg.select_layer)
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", generation_config())
    (out / "tokenizer.model").write_bytes(model.tokenizer.path.read_bytes())
    write_json(out / "tokenizer_config.json", tokenizer_config())
    write_json(out / "special_tokens_map.json", special_tokens_map())
    return out
