"""Checkpoint layouts: original (safetensors and .bin), own layout via convert, clear errors."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

from flexattn import CheckpointError, convert, load_model
from flexattn.cli import main as cli_main
from flexattn.loading import detect_layout

from .conftest import CASES, GOLDEN_MODEL, GOLDEN_TOWER, PROMPT, golden_case


def copy_model(tmp_path, with_tower=True):
    dst = tmp_path / "llava-v1.5-tiny-flexattn"
    shutil.copytree(GOLDEN_MODEL, dst)
    if with_tower:
        shutil.copytree(GOLDEN_TOWER, tmp_path / "clip-vit-tiny-patch14-336")
    return dst


def answer(model, name=CASES[0], n=6):
    image, _ = golden_case(name)
    return model.generate([image], [PROMPT], max_new_tokens=n, return_logits=True)[0]


def test_convert_to_own_layout_gives_identical_outputs(golden_model, tmp_path):
    out = convert(GOLDEN_MODEL, tmp_path / "own")
    assert detect_layout(out) == "own"
    assert {p.name for p in out.iterdir()} >= {"flexattn_config.json", "model.safetensors",
                                                "tokenizer.model"}
    own = load_model(out, device="cpu")
    assert own.model_id == golden_model.model_id == "llava-v1.5-tiny-flexattn"
    for name in CASES:
        a, b = answer(golden_model, name), answer(own, name)
        assert a.token_ids == b.token_ids and a.hr_cells == b.hr_cells
        torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    # only the FlexAttention layers keep high-res projections; the CLIP tower travels along
    keys = load_file(out / "model.safetensors").keys()
    assert "model.layers.9.self_attn.k_proj_hd.weight" in keys
    assert "model.layers.8.self_attn.k_proj_hd.weight" not in keys
    assert any(k.startswith("vision_tower.") and "patch_embedding" in k for k in keys)


def test_bin_weights_load_with_weights_only(golden_model, tmp_path):
    dst = copy_model(tmp_path)
    state = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    torch.save(state, dst / "pytorch_model.bin")
    model = load_model(dst, device="cpu")
    a, b = answer(golden_model), answer(model)
    assert a.token_ids == b.token_ids
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(dst / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"x": Evil()}, fh)
    with pytest.raises(pickle.UnpicklingError):
        load_model(dst, device="cpu")


def test_vision_tower_absolute_and_override(golden_model, tmp_path):
    dst = copy_model(tmp_path, with_tower=False)
    with pytest.raises(FileNotFoundError, match="vision tower"):
        load_model(dst, device="cpu")
    m = load_model(dst, vision_tower=GOLDEN_TOWER, device="cpu")
    assert answer(m).token_ids == answer(golden_model).token_ids
    cfg = json.loads((dst / "config.json").read_text())
    cfg["mm_vision_tower"] = str(GOLDEN_TOWER)
    (dst / "config.json").write_text(json.dumps(cfg))
    assert answer(load_model(dst, device="cpu")).token_ids == answer(golden_model).token_ids
    cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"  # a hub name, not cached
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="local Hugging Face cache"):
        load_model(dst, device="cpu")


def edit_config(dst, **changes):
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change, error, message", [
    ({"hidden_size": 128, "num_attention_heads": 8}, CheckpointError, "mismatched shapes"),
    ({"num_hidden_layers": 13}, CheckpointError, "missing"),
    ({"vocab_size": 200}, CheckpointError, "tokenizer has 320 pieces"),
    ({"model_type": "bert"}, CheckpointError, "model_type 'bert'"),
    ({"mm_projector_type": "linear"}, ValueError, "mm_projector_type"),
    ({"mm_hidden_size": 48}, CheckpointError, "mm_hidden_size"),
])
def test_bad_checkpoints_give_clear_errors(tmp_path, change, error, message):
    dst = copy_model(tmp_path)
    edit_config(dst, **change)
    with pytest.raises(error, match=message):
        load_model(dst, device="cpu")


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    dst = copy_model(tmp_path)
    (dst / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_model(dst, device="cpu")
    dst2 = copy_model(tmp_path / "b")
    (dst2 / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_model(dst2, device="cpu")
    (dst2 / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(dst2, device="cpu")


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "hd"}, "mode must be one of"),
    ({"threshold": 300}, "threshold"),
    ({"select_layer": 12}, "select_layer: fixed by the checkpoint"),
    ({"num_hidden_layers": 4}, "num_hidden_layers: fixed by the checkpoint"),
    ({"highres_size": 672, "hidden_size": 8}, "hidden_size, highres_size: fixed"),
    ({"thresold": 10}, "unknown config field"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"vision_batch": -1}, "vision_batch must be an integer >= 0"),
    ({"vision_batch": 2.5}, "vision_batch must be an integer >= 0"),
])
def test_bad_load_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_model(GOLDEN_MODEL, device="cpu", **kwargs)


def test_overrides_reach_generation():
    m = load_model(GOLDEN_MODEL, device="cpu", threshold=0)
    out = answer(m, CASES[0], n=2)
    assert m.config.threshold == 0
    # threshold 0 keeps every cell above the minimum: far more than the default 48
    assert sum(out.hr_selected_per_layer) > 3 * 2000


def test_cli_generate_and_convert(tmp_path, capsys):
    image = tmp_path / "in.png"
    golden_case(CASES[0])[0].save(image)
    rc = cli_main(["generate", "--model", str(GOLDEN_MODEL), "--image", str(image),
                   "--prompt", "Describe this image in detail.", "--max-new-tokens", "12",
                   "--device", "cpu", "--json"])
    assert rc == 0
    got = json.loads(capsys.readouterr().out)
    _, g = golden_case(CASES[0])
    assert got["token_ids"] == g["generated_ids"][1:].tolist()  # same prompt via the template
    assert got["hr_selected_per_layer"] == g["hr_keys_used_per_step_layer"][0][9:12].tolist()
    rc = cli_main(["generate", "--model", str(GOLDEN_MODEL), "--image", str(image),
                   "--prompt", "Describe.", "--max-new-tokens", "3", "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0 and "high-res tokens selected at prefill, layers 9-11" in text
    rc = cli_main(["convert", str(GOLDEN_MODEL), str(tmp_path / "own")])
    assert rc == 0 and (tmp_path / "own" / "model.safetensors").is_file()
    rc = cli_main(["generate", "--model", str(tmp_path / "missing"), "--image", str(image),
                   "--prompt", "x"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
