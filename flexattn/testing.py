"""Deterministic builders of tiny random LLaVA-FlexAttn checkpoints.

No machine of this project reaches a model hub, so tests and the demo build tiny models and
tokenizers locally and save them in the real on-disk layouts (DESIGN.md section 4); the real
loading code is then what runs against them.

Everything here is deterministic: every tensor is drawn from its own ``torch.Generator`` whose
seed is derived from ``(seed, tensor name)`` with SHA-256, so the weights do not depend on the
global RNG, on the order of creation, or on the initialisation code of the installed
transformers version, and two machines with the same torch build write the same bytes. The
global torch RNG is left untouched.

Layouts written
---------------

``build_tiny_original(root)`` -- the original LLaVA-FlexAttn layout, a copy of the layout of
``/work/shared/golden/tiny`` (same file names, same JSON keys, values and formatting)::

    root/clip-vit-tiny-patch14-336/
        config.json                 CLIPVisionConfig as CLIPVisionModel.save_pretrained writes it
        model.safetensors           keys ``vision_model.embeddings.*``, ``vision_model.pre_layrnorm.*``,
                                    ``vision_model.encoder.layers.N.*``, ``vision_model.post_layernorm.*``
                                    (the prefix the golden tower and the hub's CLIP checkpoints use;
                                    transformers 5 itself would write them without ``vision_model.``)
        preprocessor_config.json    the hub's openai/clip-vit-large-patch14-336 file
    root/llava-v1.5-tiny-flexattn/
        config.json                 model_type ``llava_llama``, ``extra`` values as strings,
                                    ``mm_vision_tower`` = "../clip-vit-tiny-patch14-336"
        generation_config.json
        model.safetensors           float16; keys
                                    ``model.embed_tokens.weight``,
                                    ``model.layers.N.{input_layernorm,post_attention_layernorm}.weight``,
                                    ``model.layers.N.self_attn.{q_proj,k_proj,v_proj,o_proj,k_proj_hd,v_proj_hd}.weight``
                                    (hd projections in every layer), ``model.layers.N.mlp.{gate,up,down}_proj.weight``,
                                    ``model.norm.weight``, ``model.mm_projector.{0,2}.{weight,bias}``, ``lm_head.weight``
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

Weight scales follow the golden checkpoint: linear weights N(0, 1/fan_in) (q/k and k_hd
projections twice that std, so attention maps are far from flat), token embeddings N(0, 1),
norm weights 1 + N(0, 0.1), biases N(0, 0.05), CLIP class embedding N(0, 0.5) and position
embedding N(0, 0.2).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "CLIP_DIR_NAME",
    "LLAVA_DIR_NAME",
    "build_tiny_hf",
    "build_tiny_original",
    "demo_model_path",
    "train_tiny_tokenizer",
]

CLIP_DIR_NAME = "clip-vit-tiny-patch14-336"
LLAVA_DIR_NAME = "llava-v1.5-tiny-flexattn"
DEMO_DIR_NAME = "tiny-demo"

IMAGE_SIZE = 336
PATCH_SIZE = 14
IMAGE_TOKEN = "<image>"

# The original checkpoints were written by transformers 4.37.2 (the version the original
# FlexAttention code pins); the original-layout JSON files keep that value, as in the golden dir.
_ORIGINAL_TRANSFORMERS_VERSION = "4.37.2"

SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# Small English training corpus for the tiny tokenizer: LLaVA's system prompt and roles,
# remote-sensing captions, VQA and OCR phrases. 58 distinct characters, so a 320-piece
# vocabulary holds 3 special + 256 byte + 58 character pieces and a few merges. Do not edit:
# the tokenizer (and so every tiny model) is a function of this text.
_CORPUS: tuple[str, ...] = (
    SYSTEM_PROMPT,
    "USER: <image>",
    "Describe this image in detail. ASSISTANT:",
    "USER: What is in the image? ASSISTANT: The image shows a river next to a small town.",
    "This is a satellite image of a city with roads, houses and a green park.",
    "The aerial photo shows farm fields, a forest and a lake in the north.",
    "There are 12 buildings and 3 roads in the image.",
    "How many ships are in the harbor? ASSISTANT: There are 4 ships in the harbor.",
    "Is there a bridge over the river? ASSISTANT: Yes, there is a bridge.",
    "Is the area urban or rural? ASSISTANT: The area is rural.",
    "Are there more water areas than commercial buildings? ASSISTANT: No.",
    "What is the number of residential buildings? ASSISTANT: 25",
    "The tile covers 1000 by 1000 meters at 0.5 meters per pixel.",
    "Read the text in the document. ASSISTANT: The text says: Invoice number 4567, total 89.",
    "What is the title of the page? ASSISTANT: The title is Annual Report 2024.",
    "OCR the scanned letter and return the text line by line.",
    "The page has two columns of text, a table and a figure.",
    "Provide a short caption for the picture. ASSISTANT: A white square on a dark background.",
    "What color is the roof of the house? ASSISTANT: The roof is red.",
    "Answer the question using a single word or phrase.",
    "A road runs from the west to the east, next to the airport.",
    "The image shows a coastline with a beach, a port and some boats.",
    "Small cars are parked near the stadium in the center of the city.",
    "What is written on the sign? ASSISTANT: Stop.",
    "The chart shows values from 1990 to 2020, and the highest value is 78.",
    "Look at the image and give a detailed description of the scene.",
    "The assistant answers the question about the image.",
    "The map shows a mountain range, a valley and a river delta.",
    "Crop fields are arranged in a grid, with a farm house in the corner.",
    "USER: Describe the document. ASSISTANT: It is a form with a name, a date and a signature.",
    "Is there a parking lot? ASSISTANT: Yes.",
    "How many tennis courts are there? ASSISTANT: 6",
)


# --------------------------------------------------------------------------------------------
# JSON templates (key order and values as in the golden original-layout checkpoint)
# --------------------------------------------------------------------------------------------


def _added_token(content: str, *, typed: bool) -> dict[str, Any]:
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


def _tokenizer_config() -> dict[str, Any]:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _added_token("<s>", typed=True),
        "clean_up_tokenization_spaces": False,
        "eos_token": _added_token("</s>", typed=True),
        "legacy": False,
        "model_max_length": 2048,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": _added_token("<unk>", typed=True),
    }


def _special_tokens_map() -> dict[str, Any]:
    return {
        "bos_token": _added_token("<s>", typed=False),
        "eos_token": _added_token("</s>", typed=False),
        "pad_token": "<unk>",
        "unk_token": _added_token("<unk>", typed=False),
    }


def _generation_config() -> dict[str, Any]:
    return {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "max_length": 4096,
        "transformers_version": _ORIGINAL_TRANSFORMERS_VERSION,
    }


def _clip_preprocessor_config(image_size: int = IMAGE_SIZE) -> dict[str, Any]:
    return {
        "crop_size": image_size,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": image_size,
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _llava_config(
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
        "torch_dtype": _dtype_name(dtype),
        "transformers_version": _ORIGINAL_TRANSFORMERS_VERSION,
        "tune_mm_mlp_adapter": False,
        "tune_mm_vision_resampler": False,
        "unfreeze_mm_vision_tower": False,
        "use_cache": True,
        "use_mm_proj": True,
        "vocab_size": vocab_size,
    }


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON like the golden files: indent 2, no trailing newline."""
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Deterministic random tensors
# --------------------------------------------------------------------------------------------


def _generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator whose seed depends only on ``seed`` and ``name``."""
    digest = hashlib.sha256(f"flexattn-tiny/{seed}/{name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _normal(
    seed: int, name: str, shape: tuple[int, ...], std: float, mean: float = 0.0
) -> torch.Tensor:
    """float32 N(mean, std^2) drawn from the tensor's own generator."""
    t = torch.randn(shape, generator=_generator(seed, name), dtype=torch.float32)
    return t.mul_(std).add_(mean)


def _original_llm_tensors(
    seed: int,
    *,
    llm_layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab_size: int,
    clip_hidden: int,
) -> dict[str, torch.Tensor]:
    """The original-layout language model + projector, float32, keyed as on disk."""
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    head_dim = hidden // heads
    kv_dim = kv_heads * head_dim
    w = 1.0 / math.sqrt(hidden)
    t: dict[str, torch.Tensor] = {}

    def add(name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> None:
        t[name] = _normal(seed, name, shape, std, mean)

    add("model.embed_tokens.weight", (vocab_size, hidden), 1.0)
    for i in range(llm_layers):
        p = f"model.layers.{i}."
        add(p + "input_layernorm.weight", (hidden,), 0.1, 1.0)
        add(p + "post_attention_layernorm.weight", (hidden,), 0.1, 1.0)
        add(p + "self_attn.q_proj.weight", (hidden, hidden), 2 * w)
        add(p + "self_attn.k_proj.weight", (kv_dim, hidden), 2 * w)
        add(p + "self_attn.v_proj.weight", (kv_dim, hidden), w)
        add(p + "self_attn.o_proj.weight", (hidden, hidden), w)
        add(p + "self_attn.k_proj_hd.weight", (kv_dim, hidden), 2 * w)
        add(p + "self_attn.v_proj_hd.weight", (kv_dim, hidden), w)
        add(p + "mlp.gate_proj.weight", (intermediate, hidden), w)
        add(p + "mlp.up_proj.weight", (intermediate, hidden), w)
        add(p + "mlp.down_proj.weight", (hidden, intermediate), 1.0 / math.sqrt(intermediate))
    add("model.norm.weight", (hidden,), 0.1, 1.0)
    add("model.mm_projector.0.weight", (hidden, clip_hidden), 1.0 / math.sqrt(clip_hidden))
    add("model.mm_projector.0.bias", (hidden,), 0.05)
    add("model.mm_projector.2.weight", (hidden, hidden), w)
    add("model.mm_projector.2.bias", (hidden,), 0.05)
    add("lm_head.weight", (vocab_size, hidden), w)
    return t


def _clip_tensors(
    seed: int,
    *,
    clip_hidden: int,
    clip_layers: int,
    clip_intermediate: int,
    image_size: int = IMAGE_SIZE,
    patch_size: int = PATCH_SIZE,
    num_channels: int = 3,
) -> dict[str, torch.Tensor]:
    """CLIP vision tower weights, float32, keyed as ``CLIPVisionModel`` (transformers 5) names
    its parameters (no ``vision_model.`` prefix)."""
    num_positions = (image_size // patch_size) ** 2 + 1
    h, m = clip_hidden, clip_intermediate
    t: dict[str, torch.Tensor] = {}

    def add(name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> None:
        # Seeded by the golden-style name so the tower is the same whatever prefix is used.
        t[name] = _normal(seed, "clip/vision_model." + name, shape, std, mean)

    def layer_norm(name: str) -> None:
        add(name + ".weight", (h,), 0.1, 1.0)
        add(name + ".bias", (h,), 0.05)

    def linear(name: str, fan_out: int, fan_in: int) -> None:
        add(name + ".weight", (fan_out, fan_in), 1.0 / math.sqrt(fan_in))
        add(name + ".bias", (fan_out,), 0.05)

    add("embeddings.class_embedding", (h,), 0.5)
    fan_in = num_channels * patch_size * patch_size
    add(
        "embeddings.patch_embedding.weight",
        (h, num_channels, patch_size, patch_size),
        1.0 / math.sqrt(fan_in),
    )
    add("embeddings.position_embedding.weight", (num_positions, h), 0.2)
    layer_norm("pre_layrnorm")
    for i in range(clip_layers):
        p = f"encoder.layers.{i}."
        layer_norm(p + "layer_norm1")
        layer_norm(p + "layer_norm2")
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(p + "self_attn." + proj, h, h)
        linear(p + "mlp.fc1", m, h)
        linear(p + "mlp.fc2", h, m)
    layer_norm("post_layernorm")
    return t


def _clip_config(
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


def _build_module(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Instantiate a model without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        return factory()


def _load_exact(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load ``tensors`` into ``module``, requiring the exact same key set."""
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    # Non-persistent buffers (position_ids) are not in the state dict; anything else must match.
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def train_tiny_tokenizer(out_dir: Path, vocab_size: int = 320,
                         corpus: tuple[str, ...] = _CORPUS) -> Path:
    """Train a tiny Llama-like sentencepiece BPE tokenizer on an embedded English corpus.

    Settings follow Llama's tokenizer: byte fallback, ``<unk>``=0, ``<s>``=1, ``</s>``=2, no
    pad piece, dummy prefix, split digits, identity normalisation, extra whitespace kept. The
    training is single-threaded and reads the corpus in order, so the model file is
    byte-identical on every run.

    Args:
        out_dir: directory to write ``tokenizer.model``, ``tokenizer_config.json`` and
            ``special_tokens_map.json`` into (created if missing).
        vocab_size: number of pieces; at least 3 + 256 + 58 (specials, bytes, corpus characters)
            and small enough that the corpus offers that many merges.
        corpus: the training sentences (default: the embedded English corpus).

    Returns:
        The path of ``tokenizer.model``.
    """
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        num_threads=1,
        seed_sentencepiece_size=100000,
        max_sentencepiece_length=16,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    model_path = out_dir / "tokenizer.model"
    model_path.write_bytes(buf.getvalue())
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config())
    _write_json(out_dir / "special_tokens_map.json", _special_tokens_map())
    logger.info("trained tiny sentencepiece tokenizer (vocab %d) at %s", vocab_size, model_path)
    return model_path


# --------------------------------------------------------------------------------------------
# Original LLaVA-FlexAttn layout
# --------------------------------------------------------------------------------------------


def _write_clip_tower(
    out_dir: Path,
    *,
    seed: int,
    clip_hidden: int,
    clip_layers: int,
    clip_heads: int,
    clip_intermediate: int,
    dtype: torch.dtype,
) -> None:
    """Write a ``CLIPVisionModel`` directory like the golden tower."""
    from transformers import CLIPVisionModel

    config = _clip_config(
        clip_hidden=clip_hidden,
        clip_layers=clip_layers,
        clip_heads=clip_heads,
        clip_intermediate=clip_intermediate,
    )
    tensors = _clip_tensors(
        seed, clip_hidden=clip_hidden, clip_layers=clip_layers, clip_intermediate=clip_intermediate
    )
    model = _build_module(lambda: CLIPVisionModel(config))
    _load_exact(model, tensors)
    model.to(dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    # transformers 5 saves CLIPVisionModel keys without the "vision_model." prefix; the golden
    # tower and the hub's CLIP checkpoints have it (transformers 5 loads both). Rewrite the
    # weights file in that layout, byte-deterministically.
    for stale in out_dir.glob("model*.safetensors*"):
        stale.unlink()
    _save_safetensors(
        {"vision_model." + k: v.to(dtype) for k, v in tensors.items()},
        out_dir / "model.safetensors",
    )
    _write_json(out_dir / "preprocessor_config.json", _clip_preprocessor_config())


def build_tiny_original(
    out_root: Path,
    *,
    seed: int = 0,
    llm_layers: int = 12,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 4,
    intermediate: int = 172,
    vocab_size: int = 320,
    clip_hidden: int = 32,
    clip_layers: int = 2,
    clip_heads: int = 4,
    clip_intermediate: int = 128,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Build a tiny random LLaVA-FlexAttn checkpoint in the original layout.

    Writes ``out_root/clip-vit-tiny-patch14-336/`` (a ``CLIPVisionModel`` at 336 px, patch 14,
    quick_gelu) and ``out_root/llava-v1.5-tiny-flexattn/`` (config, float16 safetensors with
    ``k_proj_hd``/``v_proj_hd`` in every layer, sentencepiece tokenizer), the layout of
    ``/work/shared/golden/tiny``. The same arguments always give the same bytes.

    Args:
        out_root: parent directory of the two checkpoint directories (created if missing).
        seed: weight seed.
        llm_layers, hidden, heads, kv_heads, intermediate, vocab_size: Llama shape.
        clip_hidden, clip_layers, clip_heads, clip_intermediate: CLIP vision tower shape.
        dtype: storage dtype of both weight files.

    Returns:
        The LLaVA model directory.
    """
    out_root = Path(out_root)
    clip_dir = out_root / CLIP_DIR_NAME
    llava_dir = out_root / LLAVA_DIR_NAME
    _write_clip_tower(
        clip_dir,
        seed=seed,
        clip_hidden=clip_hidden,
        clip_layers=clip_layers,
        clip_heads=clip_heads,
        clip_intermediate=clip_intermediate,
        dtype=dtype,
    )

    llava_dir.mkdir(parents=True, exist_ok=True)
    train_tiny_tokenizer(llava_dir, vocab_size=vocab_size)
    tensors = _original_llm_tensors(
        seed,
        llm_layers=llm_layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        vocab_size=vocab_size,
        clip_hidden=clip_hidden,
    )
    _save_safetensors({k: v.to(dtype) for k, v in tensors.items()}, llava_dir / "model.safetensors")
    _write_json(
        llava_dir / "config.json",
        _llava_config(
            llm_layers=llm_layers,
            hidden=hidden,
            heads=heads,
            kv_heads=kv_heads,
            intermediate=intermediate,
            vocab_size=vocab_size,
            clip_hidden=clip_hidden,
            dtype=dtype,
        ),
    )
    _write_json(llava_dir / "generation_config.json", _generation_config())
    logger.info(
        "built tiny original-layout LLaVA-FlexAttn (seed %d, %d layers) at %s",
        seed,
        llm_layers,
        llava_dir,
    )
    return llava_dir


# --------------------------------------------------------------------------------------------
# Hugging Face LlavaForConditionalGeneration layout
# --------------------------------------------------------------------------------------------


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
    llm_layers: int = 12,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 4,
    intermediate: int = 172,
    vocab_size: int = 320,
    clip_hidden: int = 32,
    clip_layers: int = 2,
    clip_heads: int = 4,
    clip_intermediate: int = 128,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Build a tiny random LLaVA-1.5 checkpoint in the Hugging Face layout.

    Saves a ``transformers.LlavaForConditionalGeneration`` with ``save_pretrained`` (see the
    module docstring for the key names on disk), plus the sentencepiece ``tokenizer.model``,
    ``tokenizer_config.json`` (``<image>`` as an added token), ``special_tokens_map.json`` and a
    CLIP ``preprocessor_config.json``. The text vocabulary is ``vocab_size + 1``: the
    sentencepiece pieces plus ``<image>`` at id ``vocab_size`` (``config.image_token_id``).

    Without ``source``, the weights are those ``build_tiny_original`` draws for the same
    ``seed`` and shape, so both layouts hold the same model. With ``source`` (an original-layout
    LLaVA directory), its Llama, projector, tower and tokenizer are copied (``mm_projector.0`` ->
    ``multi_modal_projector.linear_1``, ``.2`` -> ``linear_2``; ``k_proj_hd``/``v_proj_hd`` are
    dropped) and the shape arguments are ignored. The ``<image>`` embedding and ``lm_head`` rows
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
        llm_layers = int(config["num_hidden_layers"])
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads", heads))
        intermediate = int(config["intermediate_size"])
        vocab_size = int(config["vocab_size"])
        clip_hidden = int(tower_cfg["hidden_size"])
        clip_layers = int(tower_cfg["num_hidden_layers"])
        clip_heads = int(tower_cfg["num_attention_heads"])
        clip_intermediate = int(tower_cfg["intermediate_size"])
        rms_norm_eps = float(config.get("rms_norm_eps", 1e-5))
        rope_theta = float(config.get("rope_theta", 10000.0))
        max_positions = int(config.get("max_position_embeddings", 4096))
        logger.info("converting %s (tower %s) to the Hugging Face LLaVA layout", source, tower_dir)
    else:
        llm = _original_llm_tensors(
            seed,
            llm_layers=llm_layers,
            hidden=hidden,
            heads=heads,
            kv_heads=kv_heads,
            intermediate=intermediate,
            vocab_size=vocab_size,
            clip_hidden=clip_hidden,
        )
        clip = _clip_tensors(
            seed,
            clip_hidden=clip_hidden,
            clip_layers=clip_layers,
            clip_intermediate=clip_intermediate,
        )
        rms_norm_eps, rope_theta, max_positions = 1e-5, 10000.0, 4096

    image_token_id = vocab_size
    text_config = LlamaConfig(
        vocab_size=vocab_size + 1,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=llm_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        hidden_act="silu",
        max_position_embeddings=max_positions,
        rms_norm_eps=rms_norm_eps,
        rope_theta=rope_theta,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    vision_config = _clip_config(
        clip_hidden=clip_hidden,
        clip_layers=clip_layers,
        clip_heads=clip_heads,
        clip_intermediate=clip_intermediate,
    )
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
        [embed, _normal(seed, "hf/image_token/embed_tokens", (1, hidden), 1.0)]
    )
    state["lm_head.weight"] = torch.cat(
        [head, _normal(seed, "hf/image_token/lm_head", (1, hidden), 1.0 / math.sqrt(hidden))]
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
        train_tiny_tokenizer(out_dir, vocab_size=vocab_size)
    tok_config = _tokenizer_config()
    tok_config["added_tokens_decoder"] = {
        str(i): {**_added_token(content, typed=False), "special": True}
        for i, content in ((0, "<unk>"), (1, "<s>"), (2, "</s>"), (image_token_id, IMAGE_TOKEN))
    }
    tok_config["image_token"] = IMAGE_TOKEN
    tok_config["extra_special_tokens"] = {"image_token": IMAGE_TOKEN}
    tok_config = dict(sorted(tok_config.items()))
    _write_json(out_dir / "tokenizer_config.json", tok_config)
    special = _special_tokens_map()
    special["additional_special_tokens"] = [IMAGE_TOKEN]
    _write_json(out_dir / "special_tokens_map.json", dict(sorted(special.items())))
    _write_json(
        out_dir / "preprocessor_config.json",
        {
            "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_processor_type": "CLIPImageProcessor",
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3,
            "rescale_factor": 0.00392156862745098,
            "size": {"shortest_edge": IMAGE_SIZE},
        },
    )
    logger.info(
        "built tiny Hugging Face LLaVA (%d layers, vocab %d + <image>) at %s",
        llm_layers,
        vocab_size,
        out_dir,
    )
    return out_dir


# --------------------------------------------------------------------------------------------
# Demo model
# --------------------------------------------------------------------------------------------


def _default_home() -> Path:
    env = os.environ.get("FLEXATTN_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flexattn"


def _is_complete(llava_dir: Path) -> bool:
    return all(
        (llava_dir / name).is_file()
        for name in ("config.json", "model.safetensors", "tokenizer.model")
    )


def demo_model_path(root: Path | None = None) -> Path:
    """The original-layout directory of the tiny demo model, built on first use.

    The demo model is ``build_tiny_original(seed=0)`` with default shapes, stored under
    ``root/tiny-demo/`` (``root`` defaults to ``$FLEXATTN_HOME`` or ``~/.cache/flexattn``).
    Several processes may call this at once: each builds in its own temporary directory next
    to the target and renames it into place atomically; the first rename wins and the others
    discard their copy. Every node builds byte-identical weights.

    Returns:
        ``root/tiny-demo/llava-v1.5-tiny-flexattn``.
    """
    root = Path(root).expanduser() if root is not None else _default_home()
    target = root / DEMO_DIR_NAME
    llava_dir = target / LLAVA_DIR_NAME
    if _is_complete(llava_dir):
        return llava_dir

    root.mkdir(parents=True, exist_ok=True)
    if target.exists():
        # Complete builds appear all at once (rename), so a target that exists now and is
        # complete was just renamed into place by another process.
        if _is_complete(llava_dir):
            return llava_dir
        # Incomplete: not something this function leaves behind. Move it aside atomically so
        # that a fresh build can take its place.
        aside = Path(tempfile.mkdtemp(prefix=f".{DEMO_DIR_NAME}.broken-", dir=root))
        try:
            os.rename(target, aside / DEMO_DIR_NAME)
            logger.warning("moved incomplete demo model directory %s aside", target)
        except OSError:
            pass  # another process moved or replaced it first
        finally:
            shutil.rmtree(aside, ignore_errors=True)
        if _is_complete(llava_dir):
            return llava_dir

    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_DIR_NAME}.tmp-", dir=root))
    try:
        logger.info("building the tiny demo model under %s", target)
        build_tiny_original(tmp, seed=0)
        # mkdtemp makes a 0700 directory and safetensors writes 0600 files: let other users of
        # a shared cache read the model.
        for path in (tmp, *tmp.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
        try:
            os.rename(tmp, target)  # atomic; fails if another process got there first
        except OSError:
            if not _is_complete(llava_dir):
                raise
            logger.info("demo model was built concurrently by another process; using it")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return llava_dir


# --------------------------------------------------------------------------------------------
# A loaded model written back in the original layout
# --------------------------------------------------------------------------------------------


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
    _save_safetensors(clip, tower / "model.safetensors")
    _write_json(tower / "preprocessor_config.json", _clip_preprocessor_config(cfg.lowres_size))
    state = {k: v.detach().to("cpu", dtype) for k, v in module.state_dict().items()
             if not k.startswith("vision_tower.") and "rotary" not in k}
    _save_safetensors(state, out / "model.safetensors")
    config = _llava_config(llm_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
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
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", _generation_config())
    (out / "tokenizer.model").write_bytes(model.tokenizer.path.read_bytes())
    _write_json(out / "tokenizer_config.json", _tokenizer_config())
    _write_json(out / "special_tokens_map.json", _special_tokens_map())
    return out
