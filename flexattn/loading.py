"""Loading LLaVA-FlexAttn from the three checkpoint layouts of docs/DESIGN.md section 4, and saving
the project's own layout.

- original: ``config.json`` of model type ``llava_llama`` with ``extra``; CLIP tower in a
  separate directory named by ``mm_vision_tower`` (absolute, relative to the model directory,
  or a hub name found in the local Hugging Face cache); sentencepiece tokenizer.
- hf: ``LlavaForConditionalGeneration`` (``model_type`` ``llava``); high-res projections start
  as copies of ``k_proj`` / ``v_proj`` and are untrained.
- own: ``flexattn_config.json`` + ``model.safetensors`` (everything, CLIP included), written by
  ``save_model`` / ``flexattn convert``; loads with mmap.

``.bin`` files load with ``weights_only=True``; ``trust_remote_code`` is never used.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from .config import FlexAttnConfig
from .generate import LlavaFlexAttn
from .model import LlavaFlexAttnForCausalLM
from .options import CLIP_MEAN, CLIP_STD, DTYPES
from .tokenizer import PromptTokenizer

log = logging.getLogger(__name__)

OWN_CONFIG = "flexattn_config.json"
OWN_FORMAT = "llava-flexattn/1"

# HF LlavaForConditionalGeneration names (transformers 4.x and 5.x) -> this package's names.
HF_RENAMES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
    ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
    ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ("model.vision_tower.", "vision_tower."),
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: wrong layout, missing pieces, mismatched shapes."""


# ------------------------------------------------------------------------------------------------
def _resolve_device_dtype(device: Any, dtype: Any) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        log.warning("CUDA requested but not available: falling back to CPU")
        dev = torch.device("cpu")
    if dtype is None:
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        names = {n: getattr(torch, n) for n in DTYPES}
        names |= {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        if dtype not in names:
            raise ValueError(f"dtype must be one of {sorted(names)}, got {dtype!r}")
        dt = names[dtype]
    else:
        dt = dtype
    return dev, dt


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: ``*.safetensors`` (mmap) or ``pytorch_model*.bin``
    (``weights_only=True``)."""
    files = sorted(directory.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    if files:
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                    state[k] = fh.get_tensor(k)
        return state
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"no weights in {directory}: expected *.safetensors or"
                                " pytorch_model*.bin")
    for f in bins:
        try:
            part = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) serialisation cannot be mapped
            if "mmap" not in str(exc):
                raise
            part = torch.load(f, map_location="cpu", weights_only=True)
        state.update(part)
    return state


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path.name} in {path.parent}")
    return json.loads(path.read_text())


def detect_layout(directory: Path) -> str:
    if (directory / OWN_CONFIG).is_file():
        return "own"
    raw = _read_json(directory / "config.json")
    kind = raw.get("model_type")
    if kind == "llava_llama":
        return "original"
    if kind == "llava":
        return "hf"
    raise CheckpointError(f"{directory}: config.json has model_type {kind!r}; expected"
                          " 'llava_llama' (LLaVA-FlexAttn), 'llava' (Hugging Face LLaVA) or"
                          f" a {OWN_CONFIG}")


def resolve_vision_tower(name: str | None, model_dir: Path) -> Path:
    """An absolute path, a path relative to the model directory, or a cached hub name."""
    if not name:
        raise CheckpointError(f"{model_dir}: config.json names no mm_vision_tower; pass"
                              " vision_tower=DIR")
    p = Path(name).expanduser()
    if p.is_absolute():
        if p.is_dir():
            return p
        raise FileNotFoundError(f"vision tower {p} does not exist; pass vision_tower=DIR")
    if (model_dir / p).is_dir():
        return (model_dir / p).resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception as exc:  # not cached (no hub access here), or not a valid repo id
        raise FileNotFoundError(
            f"vision tower {name!r} not found: not a directory, not relative to {model_dir},"
            " and not in the local Hugging Face cache; pass vision_tower=DIR"
            " (--vision-tower)") from exc


def _image_stats(directory: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The image processor's mean and std: from ``processor_config.json`` (where transformers 5
    saves a processor's image processor, and which it reads first), else
    ``preprocessor_config.json``, else CLIP's."""
    raw: dict[str, Any] = {}
    processor = directory / "processor_config.json"
    if processor.is_file():
        raw = json.loads(processor.read_text()).get("image_processor") or {}
    pre = directory / "preprocessor_config.json"
    if not raw and pre.is_file():
        raw = json.loads(pre.read_text())
    return tuple(raw.get("image_mean", CLIP_MEAN)), tuple(raw.get("image_std", CLIP_STD))


def _load_clip(directory: Path, dtype: torch.dtype) -> CLIPVisionModel:
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"vision tower {directory} has no config.json")
    return CLIPVisionModel.from_pretrained(str(directory), dtype=dtype,
                                           attn_implementation="sdpa")


def _clip_from_state(vision_config: CLIPVisionConfig, state: dict[str, torch.Tensor],
                     dtype: torch.dtype) -> CLIPVisionModel:
    """A CLIP tower from tensors named with or without the ``vision_model.`` prefix (hub
    checkpoints and transformers 4 use it; transformers 5 saves without)."""
    with torch.device("meta"):
        clip = CLIPVisionModel(vision_config)
    prefixed = any(k.startswith("vision_model.") for k in clip.state_dict())
    named = {}
    for k, v in state.items():
        bare = k.removeprefix("vision_model.")
        named[("vision_model." + bare) if prefixed else bare] = v.to(dtype)
    named = {k: v for k, v in named.items() if not k.endswith("position_ids")}
    _assign(clip, named, "vision tower")
    emb = getattr(clip, "vision_model", clip).embeddings
    emb.register_buffer("position_ids", torch.arange(emb.num_positions).expand((1, -1)),
                        persistent=False)
    return clip


def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into a meta-device ``module`` by assignment, with clear errors."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
           for k in expected if k in state and state[k].shape != expected[k]]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:3]}")
        if bad:
            parts.append(f"mismatched shapes: {bad[:3]}")
        raise CheckpointError(f"{what} weights do not fit the config: " + "; ".join(parts))
    module.load_state_dict(state, strict=True, assign=True)


# ------------------------------------------------------------------------------------------------
def _original_config(raw: dict[str, Any]) -> FlexAttnConfig:
    if raw.get("rope_scaling"):
        raise CheckpointError(f"rope_scaling {raw['rope_scaling']!r} is not supported")
    if raw.get("mm_vision_select_feature", "patch") != "patch":
        raise CheckpointError("only mm_vision_select_feature 'patch' is supported")
    extra = dict(raw.get("extra") or {})
    zoom = int(extra.get("zoom_ratio", 3))
    heads = raw["num_attention_heads"]
    return FlexAttnConfig(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"], num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=raw.get("num_key_value_heads") or heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-5), rope_theta=raw.get("rope_theta", 10000.0),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        hidden_act=raw.get("hidden_act", "silu"), bos_token_id=raw.get("bos_token_id", 1),
        eos_token_id=raw.get("eos_token_id", 2), pad_token_id=raw.get("pad_token_id") or 0,
        mm_hidden_size=raw.get("mm_hidden_size", 1024),
        mm_projector_type=raw.get("mm_projector_type", "mlp2x_gelu"),
        mm_vision_select_layer=raw.get("mm_vision_select_layer", -2),
        # not stored by the published checkpoints, where it is 8 whatever the depth; a model
        # trained here with another s says so in extra.select_layer
        select_layer=int(extra.get("select_layer", 8)),
        threshold=float(extra.get("threshold", 48)), lowres_size=int(extra.get("lowres_size", 336)),
        highres_size=int(extra.get("highres_size", 1008)), zoom_ratio=zoom, pool_grid=3 * zoom,
        extra={k: v for k, v in extra.items()
               if k not in ("threshold", "lowres_size", "highres_size", "zoom_ratio",
                            "select_layer")})


def _lm_state(raw: dict[str, torch.Tensor], cfg: FlexAttnConfig) -> dict[str, torch.Tensor]:
    """Language-model tensors of the original layout, minus what this model does not use
    (high-res projections of layers <= s, vision tower copies, rotary buffers)."""
    state = {}
    for k, v in raw.items():
        if k.startswith(("model.vision_tower.", "vision_tower.")) or "rotary_emb" in k:
            continue
        if "_proj_hd." in k:
            layer = int(k.split(".")[2])
            if layer <= cfg.select_layer:
                continue
        state[k] = v
    return state


def _build(cfg: FlexAttnConfig, clip: CLIPVisionModel, lm_state: dict[str, torch.Tensor],
           dtype: torch.dtype) -> LlavaFlexAttnForCausalLM:
    with torch.device("meta"):
        module = LlavaFlexAttnForCausalLM(cfg, clip.config, vision_tower=torch.nn.Identity())
    del module.vision_tower
    _assign(module, {k: v.to(dtype) for k, v in lm_state.items()}, "language model")
    module.vision_tower = clip.to(dtype)
    module.rotary = type(module.rotary)(cfg.llama_config())  # real buffers, not meta
    return module


def _check_vocab(tok: PromptTokenizer, cfg: FlexAttnConfig, where: Path) -> None:
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{where}: the tokenizer has {tok.vocab_size} pieces but the"
                              f" model's vocabulary has {cfg.vocab_size} rows")


def _load_original(path: Path, vision_tower: str | None, dtype: torch.dtype
                   ) -> tuple[LlavaFlexAttnForCausalLM, PromptTokenizer, str]:
    raw = _read_json(path / "config.json")
    cfg = _original_config(raw)
    tower = Path(vision_tower) if vision_tower else resolve_vision_tower(
        raw.get("mm_vision_tower"), path)
    if vision_tower and not tower.is_dir():
        raise FileNotFoundError(f"vision tower {tower} does not exist")
    mean, std = _image_stats(tower)
    cfg = cfg.replace(image_mean=mean, image_std=std)
    clip = _load_clip(tower, dtype)
    _check_clip(cfg, clip.config, tower)
    tok = PromptTokenizer.from_dir(path, cfg.bos_token_id, cfg.eos_token_id)
    _check_vocab(tok, cfg, path)
    module = _build(cfg, clip, _lm_state(read_weights(path), cfg), dtype)
    return module, tok, path.name


def _check_clip(cfg: FlexAttnConfig, vc: CLIPVisionConfig, where: Path) -> None:
    if vc.image_size != cfg.lowres_size or vc.patch_size != cfg.patch_size:
        raise CheckpointError(f"vision tower {where} works at {vc.image_size}px / patch"
                              f" {vc.patch_size}; the model expects {cfg.lowres_size}px / patch"
                              f" {cfg.patch_size}")
    if vc.hidden_size != cfg.mm_hidden_size:
        raise CheckpointError(f"vision tower {where} has width {vc.hidden_size}; the projector"
                              f" expects mm_hidden_size {cfg.mm_hidden_size}")


# The published LLaVA-FlexAttn models select at layer 8 of 32; a Hugging Face LLaVA has no
# FlexAttention layers of its own, so a shallower one keeps at least its last layer plain.
HF_SELECT_LAYER = 8


def _hf_select_layer(path: Path, layers: int) -> int:
    """Layer 8, or the last layer of an LLM of 8 or fewer (no FlexAttention layers then:
    ``flexattn`` mode runs as ``lowres``)."""
    if layers > HF_SELECT_LAYER + 1:
        return HF_SELECT_LAYER
    log.warning("%s: %d LLM layers, none above select_layer %d; FlexAttention has no layers to"
                " run on (flexattn mode equals lowres)", path, layers, max(layers - 1, 0))
    return max(layers - 1, 0)


def _hf_legacy_tokenizer(path: Path) -> bool:
    """Whether the folder's Llama tokenizer is ``legacy`` (puts a dummy prefix on text after
    special tokens such as ``<image>``); transformers 5 defaults to ``legacy=False``."""
    config = path / "tokenizer_config.json"
    raw = json.loads(config.read_text()) if config.is_file() else {}
    return bool(raw.get("legacy", False))


def _load_hf(path: Path, dtype: torch.dtype
             ) -> tuple[LlavaFlexAttnForCausalLM, PromptTokenizer, str]:
    raw = _read_json(path / "config.json")
    text = dict(raw.get("text_config") or {})
    vision = dict(raw.get("vision_config") or {})
    if raw.get("projector_hidden_act", "gelu") != "gelu":
        raise CheckpointError("only projector_hidden_act 'gelu' is supported")
    if raw.get("vision_feature_select_strategy", "default") != "default":
        raise CheckpointError("only vision_feature_select_strategy 'default' is supported")
    layer = raw.get("vision_feature_layer", -2)
    vision.pop("model_type", None)
    vc = CLIPVisionConfig(**vision)
    heads = text.get("num_attention_heads", 32)
    layers = text.get("num_hidden_layers", 32)
    rope = text.get("rope_parameters") or {}
    mean, std = _image_stats(path)
    cfg = FlexAttnConfig(
        vocab_size=text.get("vocab_size", 32064), hidden_size=text.get("hidden_size", 4096),
        intermediate_size=text.get("intermediate_size", 11008),
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=text.get("num_key_value_heads") or heads,
        rms_norm_eps=text.get("rms_norm_eps", 1e-5),
        rope_theta=rope.get("rope_theta", text.get("rope_theta", 10000.0)),
        max_position_embeddings=text.get("max_position_embeddings", 4096),
        hidden_act=text.get("hidden_act", "silu"), bos_token_id=text.get("bos_token_id", 1),
        eos_token_id=text.get("eos_token_id", 2), pad_token_id=text.get("pad_token_id") or 0,
        mm_hidden_size=vc.hidden_size, mm_vision_select_layer=layer,
        patch_size=vc.patch_size, lowres_size=vc.image_size, highres_size=3 * vc.image_size,
        image_mean=mean, image_std=std, select_layer=_hf_select_layer(path, layers),
        # as LLaVA-1.5 and transformers' LlavaProcessor see images and prompts
        lowres_view="direct", prefix_after_image=_hf_legacy_tokenizer(path))
    state = read_weights(path)
    renamed: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        for old, new in HF_RENAMES:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        renamed[k] = v
    clip_state = {k[len("vision_tower."):]: v for k, v in renamed.items()
                  if k.startswith("vision_tower.")}
    lm = {k: v for k, v in renamed.items() if not k.startswith("vision_tower.")}
    for i in cfg.flex_layers:
        for kind in ("k", "v"):
            src = f"model.layers.{i}.self_attn.{kind}_proj.weight"
            if src in lm:
                lm[f"model.layers.{i}.self_attn.{kind}_proj_hd.weight"] = lm[src].clone()
    if cfg.flex_layers:
        log.warning("%s is a plain LLaVA-1.5 checkpoint: the high-resolution projections"
                    " k_proj_hd/v_proj_hd of layers %d-%d are UNTRAINED copies of k_proj/v_proj",
                    path, cfg.flex_layers[0], cfg.flex_layers[-1])
    clip = _clip_from_state(vc, clip_state, dtype)
    tok = PromptTokenizer.from_dir(path, cfg.bos_token_id, cfg.eos_token_id,
                                   prefix_after_image=cfg.prefix_after_image)
    _check_vocab(tok, cfg, path)
    cfg.extra["hd_projections"] = "copied from k_proj/v_proj (untrained)"
    return _build(cfg, clip, lm, dtype), tok, path.name


def _load_own(path: Path, dtype: torch.dtype
              ) -> tuple[LlavaFlexAttnForCausalLM, PromptTokenizer, str]:
    raw = _read_json(path / OWN_CONFIG)
    if raw.get("format") != OWN_FORMAT:
        raise CheckpointError(f"{path / OWN_CONFIG}: unknown format {raw.get('format')!r}")
    cfg = FlexAttnConfig.from_dict(raw["config"])
    vc = CLIPVisionConfig(**{k: v for k, v in raw["vision_config"].items()
                             if k != "model_type"})
    state = read_weights(path)
    clip = _clip_from_state(vc, {k[len("vision_tower."):]: v for k, v in state.items()
                                 if k.startswith("vision_tower.")}, dtype)
    if cfg.extra.get("hd_projections"):
        log.warning("%s: high-resolution projections are %s", path, cfg.extra["hd_projections"])
    tok = PromptTokenizer.from_dir(path, cfg.bos_token_id, cfg.eos_token_id,
                                   prefix_after_image=cfg.prefix_after_image)
    _check_vocab(tok, cfg, path)
    lm = {k: v for k, v in state.items() if not k.startswith("vision_tower.")}
    return _build(cfg, clip, lm, dtype), tok, raw.get("model_id") or path.name


def load_model(path: str | Path, vision_tower: str | Path | None = None, device: Any = None,
               dtype: Any = None, mode: str = "flexattn", **overrides: Any) -> LlavaFlexAttn:
    """Load a checkpoint of any of the three layouts.

    device: None -> CUDA if available, else CPU. dtype: None -> bf16 on CUDA, float32 on CPU.
    overrides: run-time options by name (``threshold=255`` selects nothing; see
    ``config.RUNTIME_FIELDS``); structural fields are refused."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"model directory {p} does not exist")
    dev, dt = _resolve_device_dtype(device, dtype)
    layout = detect_layout(p)
    if layout == "original":
        module, tok, model_id = _load_original(p, str(vision_tower) if vision_tower else None, dt)
    elif layout == "hf":
        module, tok, model_id = _load_hf(p, dt)
    else:
        module, tok, model_id = _load_own(p, dt)
    module.config = module.config.with_runtime(mode=mode, **overrides)
    log.info("loaded %s (%s layout) on %s as %s, mode %s", model_id, layout, dev, dt, mode)
    return LlavaFlexAttn(module.to(dev), tok, model_id=model_id)


def save_model(model: LlavaFlexAttn, out_dir: str | Path, dtype: Any = None) -> Path:
    """Write the own layout: ``flexattn_config.json`` + ``model.safetensors`` + tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, dt = _resolve_device_dtype("cpu", dtype) if dtype is not None else (None, model.dtype)
    state = {k: v.detach().to("cpu", dt).contiguous()
             for k, v in model.module.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.replace(mode="flexattn").to_dict()
    (out / OWN_CONFIG).write_text(json.dumps({
        "format": OWN_FORMAT, "model_id": model.model_id, "config": cfg,
        "vision_config": model.module.vision_config.to_dict(), "dtype": str(dt)}, indent=2))
    model.tokenizer.save(out)
    return out


def convert(src: str | Path, dst: str | Path, vision_tower: str | Path | None = None,
            dtype: Any = "float16") -> Path:
    """Any supported layout -> the own layout."""
    model = load_model(src, vision_tower=vision_tower, device="cpu", dtype="float32")
    return save_model(model, dst, dtype=dtype)
