"""Checkpoint writers only the tests use: the tiny model in the Hugging Face
``LlavaForConditionalGeneration`` layout (``build_tiny_hf``), from the same deterministic weights
as ``flexattn.demo_model.build_tiny_original`` or copied from an original-layout checkpoint.

        special_tokens_map.json
        tokenizer.model             sentencepiece BPE, vocab 320, byte fallback
        tokenizer_config.json

``build_tiny_hf(out_dir)`` -- the Hugging Face ``LlavaForConditionalGeneration`` layout as
transformers 5.24 ``save_pretrained`` writes it (``config.json``, ``generation_config.json``,
``model.safetensors``), plus ``tokenizer.model``, ``tokenizer_config.json``,
``special_tokens_map.json`` and ``preprocessor_config.json``. The text vocabulary is the
sentencepiece vocabulary plus one added token ``"<image>"`` at id ``vocab_size`` (321 rows for
the default 320-piece tokenizer; ``config.image_token_id == 320``), the way llava-hf appends
``<image>`` beyond the sentencepiece vocabulary. No ``k_proj_hd``/``v_proj_hd`` in this layout.

On-disk keys of the HF layout (transformers 5.24 converts its in-memory names back to the
legacy llava-hf names when saving; in memory they are ``model.language_model.*``,
``model.vision_tower.*``, ``model.multi_modal_projector.*`` and ``lm_head.weight``)::

    language_model.model.embed_tokens.weight                      [vocab+1, hidden]
    language_model.model.layers.N.input_layernorm.weight
    language_model.model.layers.N.post_attention_layernorm.weight
    language_model.model.layers.N.self_attn.{q,k,v,o}_proj.weight
    language_model.model.layers.N.mlp.{gate,up,down}_proj.weight
    language_model.model.norm.weight
    language_model.lm_head.weight                                 [vocab+1, hidden]
    multi_modal_projector.linear_1.{weight,bias}                  (original model.mm_projector.0)
    multi_modal_projector.linear_2.{weight,bias}                  (original model.mm_projector.2)
    vision_tower.embeddings.{class_embedding,patch_embedding.weight,position_embedding.weight}
    vision_tower.pre_layrnorm.{weight,bias}
    vision_tower.encoder.layers.N.{layer_norm1,layer_norm2}.{weight,bias}
    vision_tower.encoder.layers.N.self_attn.{q_proj,k_proj,v_proj,out_proj}.{weight,bias}
    vision_tower.encoder.layers.N.mlp.{fc1,fc2}.{weight,bias}
    vision_tower.post_layernorm.{weight,bias}

Note: checkpoints on the hub written by transformers 4.x (e.g. llava-hf/llava-1.5-7b-hf) have
``vision_tower.vision_model.*`` instead of ``vision_tower.*``; transformers 5 loads both.

"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from flexattn.config import CLIP_MEAN, CLIP_STD
from flexattn.demo_model import (
    TinyShape,
    _build_module,
    _clip_tensors,
    _load_exact,
    _normal,
    _original_llm_tensors,
    train_tiny_tokenizer,
)
from flexattn.original_layout import (
    IMAGE_SIZE,
    PATCH_SIZE,
    added_token,
    clip_config,
    special_tokens_map,
    tokenizer_config,
    write_json,
)
from flexattn.tokenizer import IMAGE_TOKEN

logger = logging.getLogger(__name__)


def _read_original(
    source: Path,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path, dict[str, torch.Tensor]]:
    """Config, LLM tensors, tower dir and tower tensors (unprefixed) of an original checkpoint."""
    from safetensors.torch import load_file

    source = Path(source)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    llm = load_file(str(source / "model.safetensors"))
    tower = Path(config["mm_vision_tower"])
    if not tower.is_absolute():
        tower = (source / tower).resolve()
    clip = {
        k.removeprefix("vision_model."): v
        for k, v in load_file(str(tower / "model.safetensors")).items()
    }
    return config, llm, tower, clip


def build_tiny_hf(
    out_dir: Path,
    *,
    source: Path | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    **shape: int,
) -> Path:
    """Build a tiny random LLaVA-1.5 checkpoint in the Hugging Face layout.

    Saves a ``transformers.LlavaForConditionalGeneration`` with ``save_pretrained`` (see the
    module docstring for the key names on disk), plus the sentencepiece ``tokenizer.model``,
    ``tokenizer_config.json`` (``<image>`` as an added token), ``special_tokens_map.json`` and a
    CLIP ``preprocessor_config.json``. The text vocabulary is ``vocab_size + 1``: the
    sentencepiece pieces plus ``<image>`` at id ``vocab_size`` (``config.image_token_id``).

    Without ``source``, the weights are those ``build_tiny_original`` draws for the same
    ``seed`` and shape (``TinyShape`` fields in ``shape``), so both layouts hold the same model.
    With ``source`` (an original-layout LLaVA directory), its Llama, projector, tower and
    tokenizer are copied (``mm_projector.0`` -> ``multi_modal_projector.linear_1``, ``.2`` ->
    ``linear_2``; ``k_proj_hd``/``v_proj_hd`` are dropped) and ``shape`` is ignored. The ``<image>`` embedding and ``lm_head`` rows
    are random from ``seed`` either way. ``dtype`` is the storage dtype.

    Returns:
        ``out_dir``.
    """
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if source is not None:
        config, llm, tower_dir, clip = _read_original(Path(source))
        llm = {k: v.float() for k, v in llm.items()}
        clip = {k: v.float() for k, v in clip.items()}
        tower_cfg = json.loads((tower_dir / "config.json").read_text(encoding="utf-8"))
        size = TinyShape(
            llm_layers=int(config["num_hidden_layers"]), hidden=int(config["hidden_size"]),
            heads=int(config["num_attention_heads"]),
            kv_heads=int(config.get("num_key_value_heads", config["num_attention_heads"])),
            intermediate=int(config["intermediate_size"]), vocab_size=int(config["vocab_size"]),
            clip_hidden=int(tower_cfg["hidden_size"]),
            clip_layers=int(tower_cfg["num_hidden_layers"]),
            clip_heads=int(tower_cfg["num_attention_heads"]),
            clip_intermediate=int(tower_cfg["intermediate_size"]))
        rms_norm_eps = float(config.get("rms_norm_eps", 1e-5))
        rope_theta = float(config.get("rope_theta", 10000.0))
        max_positions = int(config.get("max_position_embeddings", 4096))
        logger.info("converting %s (tower %s) to the Hugging Face LLaVA layout", source, tower_dir)
    else:
        size = TinyShape(**shape)
        llm, clip = _original_llm_tensors(seed, size), _clip_tensors(seed, size)
        rms_norm_eps, rope_theta, max_positions = 1e-5, 10000.0, 4096

    image_token_id = size.vocab_size
    text_config = LlamaConfig(
        vocab_size=size.vocab_size + 1, hidden_size=size.hidden,
        intermediate_size=size.intermediate, num_hidden_layers=size.llm_layers,
        num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, hidden_act="silu",
        max_position_embeddings=max_positions, rms_norm_eps=rms_norm_eps, rope_theta=rope_theta,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision_config = clip_config(**size.clip())
    llava_config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        tie_word_embeddings=False,
    )

    # In-memory parameter names of transformers 5 (save_pretrained maps them to the legacy
    # on-disk names listed in the module docstring).
    state: dict[str, torch.Tensor] = {}
    for key, value in llm.items():
        if key.endswith(("k_proj_hd.weight", "v_proj_hd.weight")):
            continue
        if key.startswith("model.mm_projector."):
            index, param = key.removeprefix("model.mm_projector.").split(".")
            linear = {"0": "linear_1", "2": "linear_2"}[index]
            state[f"model.multi_modal_projector.{linear}.{param}"] = value
        elif key == "lm_head.weight":
            state["lm_head.weight"] = value
        elif key.startswith("model."):
            state["model.language_model." + key.removeprefix("model.")] = value
        else:
            raise KeyError(f"unexpected key in original checkpoint: {key}")
    embed = state["model.language_model.embed_tokens.weight"]
    head = state["lm_head.weight"]
    # Same scales as the rows of the original embedding and lm_head.
    state["model.language_model.embed_tokens.weight"] = torch.cat(
        [embed, _normal(seed, "hf/image_token/embed_tokens", (1, size.hidden), 1.0)]
    )
    state["lm_head.weight"] = torch.cat(
        [head, _normal(seed, "hf/image_token/lm_head", (1, size.hidden), 1.0 / math.sqrt(size.hidden))]
    )
    for key, value in clip.items():
        state["model.vision_tower." + key] = value

    model = _build_module(lambda: LlavaForConditionalGeneration(llava_config))
    _load_exact(model, state)
    model.to(dtype)
    model.save_pretrained(out_dir)

    if source is not None:
        shutil.copyfile(Path(source) / "tokenizer.model", out_dir / "tokenizer.model")
    else:
        train_tiny_tokenizer(out_dir, vocab_size=size.vocab_size)
    tok_config = tokenizer_config()
    tok_config["added_tokens_decoder"] = {
        str(i): {**added_token(content, typed=False), "special": True}
        for i, content in ((0, "<unk>"), (1, "<s>"), (2, "</s>"), (image_token_id, IMAGE_TOKEN))
    }
    tok_config["image_token"] = IMAGE_TOKEN
    tok_config["extra_special_tokens"] = {"image_token": IMAGE_TOKEN}
    tok_config = dict(sorted(tok_config.items()))
    write_json(out_dir / "tokenizer_config.json", tok_config)
    special = special_tokens_map()
    special["additional_special_tokens"] = [IMAGE_TOKEN]
    write_json(out_dir / "special_tokens_map.json", dict(sorted(special.items())))
    write_json(
        out_dir / "preprocessor_config.json",
        {
            "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": list(CLIP_MEAN),
            "image_processor_type": "CLIPImageProcessor",
            "image_std": list(CLIP_STD),
            "resample": 3,
            "rescale_factor": 0.00392156862745098,
            "size": {"shortest_edge": IMAGE_SIZE},
        },
    )
    logger.info(
        "built tiny Hugging Face LLaVA (%d layers, vocab %d + <image>) at %s",
        size.llm_layers,
        size.vocab_size,
        out_dir,
    )
    return out_dir
