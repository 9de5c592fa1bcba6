"""Tests of flexattn.demo_model (and tests/flexattn/checkpoints.py): tiny deterministic
checkpoints in the real on-disk layouts."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open

from flexattn.demo_model import build_tiny_original, demo_model_path, train_tiny_tokenizer
from flexattn.original_layout import CLIP_DIR_NAME, LLAVA_DIR_NAME

from .checkpoints import build_tiny_hf

# The project's copy of the golden checkpoint (tests/data/golden/tiny).
GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden" / "tiny"
GOLDEN_LLAVA = GOLDEN / LLAVA_DIR_NAME
GOLDEN_CLIP = GOLDEN / CLIP_DIR_NAME

GOLDEN_CONFIG = GOLDEN_LLAVA / "config.json"  # as the original code wrote it

# Per-layer and global keys (and shapes) of the golden original-layout model.safetensors.
GOLDEN_LAYER_KEYS = {
    "input_layernorm.weight": (64,),
    "post_attention_layernorm.weight": (64,),
    "self_attn.q_proj.weight": (64, 64),
    "self_attn.k_proj.weight": (64, 64),
    "self_attn.v_proj.weight": (64, 64),
    "self_attn.o_proj.weight": (64, 64),
    "self_attn.k_proj_hd.weight": (64, 64),
    "self_attn.v_proj_hd.weight": (64, 64),
    "mlp.gate_proj.weight": (172, 64),
    "mlp.up_proj.weight": (172, 64),
    "mlp.down_proj.weight": (64, 172),
}
GOLDEN_GLOBAL_KEYS = {
    "model.embed_tokens.weight": (320, 64),
    "model.norm.weight": (64,),
    "model.mm_projector.0.weight": (64, 32),
    "model.mm_projector.0.bias": (64,),
    "model.mm_projector.2.weight": (64, 64),
    "model.mm_projector.2.bias": (64,),
    "lm_head.weight": (320, 64),
}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in sorted(f.keys())}


def _files(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_original(tmp_path_factory.mktemp("orig0"), seed=0)


@pytest.fixture(scope="module")
def hf_from_source(tmp_path_factory: pytest.TempPathFactory, original: Path) -> Path:
    return build_tiny_hf(tmp_path_factory.mktemp("hf") / "llava-hf", source=original)


# ---------------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes(tmp_path: Path, original: Path) -> None:
    rng_before = torch.random.get_rng_state()
    again = build_tiny_original(tmp_path, seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "global RNG was touched"
    assert _files(again.parent) == _files(original.parent)


def test_different_seed_different_weights(tmp_path: Path, original: Path) -> None:
    other = build_tiny_original(tmp_path, seed=1)
    for name in (f"{LLAVA_DIR_NAME}/model.safetensors", f"{CLIP_DIR_NAME}/model.safetensors"):
        a, b = _tensors(original.parent / name), _tensors(other.parent / name)
        assert a.keys() == b.keys()
        for key in a:
            assert not torch.equal(a[key], b[key]), key
    # Same tokenizer and configs: only the weights depend on the seed.
    assert (other / "tokenizer.model").read_bytes() == (original / "tokenizer.model").read_bytes()
    assert (other / "config.json").read_bytes() == (original / "config.json").read_bytes()


# ---------------------------------------------------------------------------------- layout


def test_layout_matches_golden(original: Path) -> None:
    root = original.parent
    assert sorted(p.name for p in root.iterdir()) == sorted(p.name for p in GOLDEN.iterdir())
    for sub in (LLAVA_DIR_NAME, CLIP_DIR_NAME):
        assert sorted(p.name for p in (root / sub).iterdir()) == sorted(
            p.name for p in (GOLDEN / sub).iterdir()
        )

    ours = json.loads((original / "config.json").read_text())
    gold = json.loads((GOLDEN_LLAVA / "config.json").read_text())
    assert ours.keys() == gold.keys()
    assert {k: type(v) for k, v in ours.items()} == {k: type(v) for k, v in gold.items()}
    assert ours["extra"] == gold["extra"]
    assert all(isinstance(v, str) for v in ours["extra"].values())
    assert ours["mm_vision_tower"] == "../clip-vit-tiny-patch14-336"
    assert (original / ours["mm_vision_tower"] / "config.json").is_file()
    # With the default shape, the JSON files are the golden ones byte for byte.
    for name in (
        "config.json",
        "generation_config.json",
        "special_tokens_map.json",
        "tokenizer_config.json",
    ):
        assert (original / name).read_bytes() == (GOLDEN_LLAVA / name).read_bytes(), name
    assert (root / CLIP_DIR_NAME / "preprocessor_config.json").read_bytes() == (
        GOLDEN_CLIP / "preprocessor_config.json"
    ).read_bytes()


@pytest.mark.parametrize("sub", [LLAVA_DIR_NAME, CLIP_DIR_NAME])
def test_weights_match_golden_keys_shapes_and_scales(original: Path, sub: str) -> None:
    ours = _tensors(original.parent / sub / "model.safetensors")
    gold = _tensors(GOLDEN / sub / "model.safetensors")
    assert ours.keys() == gold.keys()
    for key, g in gold.items():
        o = ours[key]
        assert (o.shape, o.dtype) == (g.shape, g.dtype), key
        of, gf = o.float(), g.float()
        spread = (
            4 * max(of.std().item(), gf.std().item()) / g.numel() ** 0.5 if g.numel() > 1 else 0
        )
        assert abs(of.mean().item() - gf.mean().item()) < 0.05 + spread, key
        if g.numel() > 16:  # small vectors give noisy std estimates: looser bounds
            ratio = of.std().item() / gf.std().item()
            low, high = (0.8, 1.25) if g.numel() >= 1000 else (0.5, 2.0)
            assert low < ratio < high, (key, ratio)


def test_layout_matches_embedded_golden_facts(original: Path) -> None:
    assert sorted(p.name for p in original.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert sorted(p.name for p in (original.parent / CLIP_DIR_NAME).iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    assert (original / "config.json").read_text() == GOLDEN_CONFIG.read_text()
    tensors = _tensors(original / "model.safetensors")
    expected = dict(GOLDEN_GLOBAL_KEYS)
    for i in range(12):  # k_proj_hd / v_proj_hd in every layer, as in the golden file
        expected.update({f"model.layers.{i}.{k}": v for k, v in GOLDEN_LAYER_KEYS.items()})
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert {v.dtype for v in tensors.values()} == {torch.float16}


def test_shape_arguments(tmp_path: Path) -> None:
    llava = build_tiny_original(tmp_path, seed=3, llm_layers=4, heads=8, kv_heads=2, hidden=64)
    config = json.loads((llava / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (8, 2)
    tensors = _tensors(llava / "model.safetensors")
    assert len(tensors) == 7 + 4 * 11
    assert tensors["model.layers.3.self_attn.k_proj_hd.weight"].shape == (16, 64)
    hf = build_tiny_hf(tmp_path / "hf", source=llava)
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(hf)
    assert model.config.text_config.num_key_value_heads == 2
    assert torch.equal(
        model.model.language_model.layers[3].self_attn.k_proj.weight,
        tensors["model.layers.3.self_attn.k_proj.weight"],
    )


def test_clip_tower_loads(original: Path) -> None:
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(original.parent / CLIP_DIR_NAME)
    cfg = tower.config
    assert (cfg.image_size, cfg.patch_size, cfg.hidden_act) == (336, 14, "quick_gelu")
    disk = _tensors(original.parent / CLIP_DIR_NAME / "model.safetensors")
    for name, param in tower.named_parameters():
        assert torch.equal(param, disk["vision_model." + name]), name


# ---------------------------------------------------------------------------------- tokenizer


def test_tokenizer(tmp_path: Path, original: Path) -> None:
    path = train_tiny_tokenizer(tmp_path)
    assert path == tmp_path / "tokenizer.model"
    assert path.read_bytes() == (original / "tokenizer.model").read_bytes()  # deterministic
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert sp.get_piece_size() == 320
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    for text in (
        "USER: <image>\nDescribe this image in detail. ASSISTANT:",
        "There are 12345 ships, 0.75 km apart.",
        "Caf\u00e9 \u00fcber Stra\u00dfe \u2014 \u5730\u56fe  two  spaces",
        "Zebra QUIZ jumps",
    ):
        assert sp.decode(sp.encode(text)) == text, text
    # Digits are split; non-ASCII falls back to bytes.
    assert sp.encode("2024", out_type=str) == ["\u2581", "2", "0", "2", "4"]
    assert "<0xC3>" in sp.encode("\u00e9", out_type=str)
    # A chunk starting with "\n" (the text after <image>) starts with the dummy prefix piece.
    ids = sp.encode("\nDescribe")
    assert ids[:2] == [sp.piece_to_id("\u2581"), sp.piece_to_id("<0x0A>")]
    assert sp.encode("\n") == ids[:2]


# ---------------------------------------------------------------------------------- HF layout


def test_hf_layout_loads_and_matches_source(hf_from_source: Path, original: Path) -> None:
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(hf_from_source)
    cfg = model.config
    assert cfg.image_token_id == 320
    assert cfg.text_config.vocab_size == 321
    assert cfg.vision_feature_layer == -2
    assert cfg.vision_feature_select_strategy == "default"
    assert cfg.projector_hidden_act == "gelu"
    assert model.dtype == torch.float16
    assert (hf_from_source / "tokenizer.model").read_bytes() == (
        original / "tokenizer.model"
    ).read_bytes()

    src = _tensors(original / "model.safetensors")
    params = dict(model.named_parameters())
    lm = model.model.language_model
    assert torch.equal(lm.embed_tokens.weight[:320], src["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.weight[:320], src["lm_head.weight"])
    assert torch.equal(lm.norm.weight, src["model.norm.weight"])
    for old, new in (("0", "linear_1"), ("2", "linear_2")):
        for p in ("weight", "bias"):
            assert torch.equal(
                params[f"model.multi_modal_projector.{new}.{p}"],
                src[f"model.mm_projector.{old}.{p}"],
            )
    n_llm = 0
    for key, value in src.items():
        if key.startswith("model.layers."):
            if "_hd." in key:
                continue
            assert torch.equal(params["model.language_model." + key[len("model.") :]], value), key
            n_llm += 1
    assert n_llm == 12 * 9
    assert not any("_hd" in name for name in params)

    clip = _tensors(original.parent / CLIP_DIR_NAME / "model.safetensors")
    for key, value in clip.items():
        assert torch.equal(params["model.vision_tower." + key[len("vision_model.") :]], value), key

    # Key names on disk, as documented in tests/flexattn/checkpoints.py for the loader.
    disk = set(_tensors(hf_from_source / "model.safetensors"))
    assert "language_model.model.embed_tokens.weight" in disk
    assert "language_model.lm_head.weight" in disk
    assert "language_model.model.layers.11.self_attn.q_proj.weight" in disk
    assert "multi_modal_projector.linear_2.bias" in disk
    assert "vision_tower.encoder.layers.1.mlp.fc2.weight" in disk
    assert "vision_tower.pre_layrnorm.weight" in disk


def test_hf_without_source_is_the_same_model(tmp_path: Path, hf_from_source: Path) -> None:
    direct = build_tiny_hf(tmp_path / "hf", seed=0)
    assert _files(direct) == _files(hf_from_source)


# ---------------------------------------------------------------------------------- demo model


def test_demo_model_path_builds_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, original: Path
) -> None:
    monkeypatch.setenv("FLEXATTN_HOME", str(tmp_path))
    first = demo_model_path()
    assert first == tmp_path / "tiny-demo" / LLAVA_DIR_NAME
    mtime = first.stat().st_mtime_ns
    start = time.perf_counter()
    second = demo_model_path()
    assert time.perf_counter() - start < 0.1
    assert second == first
    assert first.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-demo"]  # no temp dirs left
    # Seed 0 with default shapes: the same bytes as any other seed-0 build.
    assert _files(first.parent) == _files(original.parent)


def test_demo_model_path_concurrent(tmp_path: Path) -> None:
    n = 3
    barrier = threading.Barrier(n)
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            results.append(demo_model_path(tmp_path))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == [tmp_path / "tiny-demo" / LLAVA_DIR_NAME] * n
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-demo"]
    assert (results[0] / "model.safetensors").is_file()


def test_demo_model_path_replaces_incomplete_dir(tmp_path: Path) -> None:
    broken = tmp_path / "tiny-demo" / LLAVA_DIR_NAME
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}")
    path = demo_model_path(tmp_path)
    assert path == broken
    assert (path / "model.safetensors").is_file()
    assert json.loads((path / "config.json").read_text())["model_type"] == "llava_llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-demo"]
