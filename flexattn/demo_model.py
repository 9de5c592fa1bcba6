"""The demo model: a deterministic tiny random LLaVA-FlexAttn in the original layout, built on
first use for ``--model demo``, and the sentencepiece tokenizer trainer it (and the SynthHR mini)
use.

No machine of this project reaches a model hub, so tests and the demo build tiny models and
tokenizers locally and save them in the real on-disk layouts (docs/DESIGN.md section 4); the real
loading code is then what runs against them.

Everything here is deterministic: every tensor is drawn from its own ``torch.Generator`` whose
seed is derived from ``(seed, tensor name)`` with SHA-256, so the weights do not depend on the
global RNG, on the order of creation, or on the initialisation code of the installed
transformers version, and two machines with the same torch build write the same bytes. The
global torch RNG is left untouched.

Layouts written
---------------

``build_tiny_original(root)`` -- the original LLaVA-FlexAttn layout, a copy of the layout of
``tests/data/golden/tiny`` (same file names, same JSON keys, values and formatting)::

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
Weight scales follow the golden checkpoint: linear weights N(0, 1/fan_in) (q/k and k_hd
projections twice that std, so attention maps are far from flat), token embeddings N(0, 1),
norm weights 1 + N(0, 0.1), biases N(0, 0.05), CLIP class embedding N(0, 0.5) and position
embedding N(0, 0.2).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .answers import ANSWER_SUFFIX
from .conversation import SYSTEM as SYSTEM_PROMPT
from .original_layout import (
    CLIP_DIR_NAME,
    IMAGE_SIZE,
    LLAVA_DIR_NAME,
    PATCH_SIZE,
    clip_config,
    clip_preprocessor_config,
    generation_config,
    llava_config,
    save_safetensors,
    special_tokens_map,
    tokenizer_config,
    write_json,
)

logger = logging.getLogger(__name__)

DEMO_DIR_NAME = "tiny-demo"

# Small English training corpus for the tiny tokenizer: LLaVA's system prompt and roles,
# remote-sensing captions, VQA and OCR phrases. 58 distinct characters, so a 320-piece
# vocabulary holds 3 special + 256 byte + 58 character pieces and a few merges. Do not edit:
# the tokenizer (and so every tiny model) is a function of this text.
CORPUS: tuple[str, ...] = (
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
    ANSWER_SUFFIX,
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


@dataclass(frozen=True)
class TinyShape:
    """The shape of a tiny random checkpoint: its Llama side and its CLIP tower."""

    llm_layers: int = 12  # the golden checkpoint's Llama: 12 layers, width 64
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 4  # grouped-query attention when fewer than heads
    intermediate: int = 172
    vocab_size: int = 320  # sentencepiece pieces (the Hugging Face layout adds <image>)
    clip_hidden: int = 32  # its CLIP tower: 2 layers, width 32
    clip_layers: int = 2
    clip_heads: int = 4
    clip_intermediate: int = 128

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.heads % self.kv_heads:
            raise ValueError(
                f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    def llm(self) -> dict[str, int]:
        """The fields ``original_layout.llava_config`` takes."""
        return {k: getattr(self, k) for k in ("llm_layers", "hidden", "heads", "kv_heads",
                                               "intermediate", "vocab_size", "clip_hidden")}

    def clip(self) -> dict[str, int]:
        """The fields ``original_layout.clip_config`` takes."""
        return {k: getattr(self, k) for k in ("clip_hidden", "clip_layers", "clip_heads",
                                               "clip_intermediate")}


def _original_llm_tensors(seed: int, shape: TinyShape) -> dict[str, torch.Tensor]:
    """The original-layout language model + projector, float32, keyed as on disk."""
    llm_layers, hidden, heads = shape.llm_layers, shape.hidden, shape.heads
    intermediate, vocab_size, clip_hidden = shape.intermediate, shape.vocab_size, shape.clip_hidden
    head_dim = hidden // heads
    kv_dim = shape.kv_heads * head_dim
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
    shape: TinyShape,
    *,
    image_size: int = IMAGE_SIZE,
    patch_size: int = PATCH_SIZE,
    num_channels: int = 3,
) -> dict[str, torch.Tensor]:
    """CLIP vision tower weights, float32, keyed as ``CLIPVisionModel`` (transformers 5) names
    its parameters (no ``vision_model.`` prefix)."""
    num_positions = (image_size // patch_size) ** 2 + 1
    h, m = shape.clip_hidden, shape.clip_intermediate
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
    for i in range(shape.clip_layers):
        p = f"encoder.layers.{i}."
        layer_norm(p + "layer_norm1")
        layer_norm(p + "layer_norm2")
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(p + "self_attn." + proj, h, h)
        linear(p + "mlp.fc1", m, h)
        linear(p + "mlp.fc2", h, m)
    layer_norm("post_layernorm")
    return t


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


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def train_tiny_tokenizer(out_dir: Path, vocab_size: int = 320,
                         corpus: tuple[str, ...] = CORPUS) -> Path:
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
    write_json(out_dir / "tokenizer_config.json", tokenizer_config())
    write_json(out_dir / "special_tokens_map.json", special_tokens_map())
    logger.info("trained tiny sentencepiece tokenizer (vocab %d) at %s", vocab_size, model_path)
    return model_path


# --------------------------------------------------------------------------------------------
# Original LLaVA-FlexAttn layout
# --------------------------------------------------------------------------------------------


def _write_clip_tower(out_dir: Path, *, seed: int, shape: TinyShape, dtype: torch.dtype) -> None:
    """Write a ``CLIPVisionModel`` directory like the golden tower."""
    from transformers import CLIPVisionModel

    config = clip_config(**shape.clip())
    tensors = _clip_tensors(seed, shape)
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
    save_safetensors(
        {"vision_model." + k: v.to(dtype) for k, v in tensors.items()},
        out_dir / "model.safetensors",
    )
    write_json(out_dir / "preprocessor_config.json", clip_preprocessor_config())


def build_tiny_original(
    out_root: Path, *, seed: int = 0, dtype: torch.dtype = torch.float16, **shape: int
) -> Path:
    """Build a tiny random LLaVA-FlexAttn checkpoint in the original layout.

    Writes ``out_root/clip-vit-tiny-patch14-336/`` (a ``CLIPVisionModel`` at 336 px, patch 14,
    quick_gelu) and ``out_root/llava-v1.5-tiny-flexattn/`` (config, float16 safetensors with
    ``k_proj_hd``/``v_proj_hd`` in every layer, sentencepiece tokenizer), the layout of
    ``tests/data/golden/tiny``. The same arguments always give the same bytes.

    Args:
        out_root: parent directory of the two checkpoint directories (created if missing).
        seed: weight seed.
        dtype: storage dtype of both weight files.
        shape: ``TinyShape`` fields (Llama and CLIP sizes) that differ from its defaults.

    Returns:
        The LLaVA model directory.
    """
    out_root = Path(out_root)
    size = TinyShape(**shape)
    clip_dir = out_root / CLIP_DIR_NAME
    llava_dir = out_root / LLAVA_DIR_NAME
    _write_clip_tower(clip_dir, seed=seed, shape=size, dtype=dtype)
    llava_dir.mkdir(parents=True, exist_ok=True)
    train_tiny_tokenizer(llava_dir, vocab_size=size.vocab_size)
    tensors = _original_llm_tensors(seed, size)
    save_safetensors({k: v.to(dtype) for k, v in tensors.items()}, llava_dir / "model.safetensors")
    write_json(llava_dir / "config.json", llava_config(**size.llm(), dtype=dtype))
    write_json(llava_dir / "generation_config.json", generation_config())
    logger.info("built tiny original-layout LLaVA-FlexAttn (seed %d, %d layers) at %s", seed,
                size.llm_layers, llava_dir)
    return llava_dir


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
