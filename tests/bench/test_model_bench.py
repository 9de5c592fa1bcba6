"""bench/model_bench.py's harness on its `cpu-tiny` preset: the rows and ratios it writes are
the ones it measured, each variant does what its name says, a point that runs out of memory
becomes a row instead of ending the run, and bad flags are named. Its times mean nothing here;
what a benchmark measures is recorded in bench/RESULTS.md, not asserted by tests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import model_bench

TINY = model_bench.PRESETS["cpu-tiny"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    argv = ["--preset", "cpu-tiny", "--new-tokens", "3", "--out", str(out)]
    assert model_bench.main(argv) == 0
    return argv, json.loads(out.read_text())


def test_writes_a_row_per_variant_and_batch_with_its_provenance(tiny_run):
    argv, result = tiny_run
    meta, rows = result["meta"], result["rows"]
    assert meta["command"] == "python bench/model_bench.py " + " ".join(argv)
    assert meta["preset"] == "cpu-tiny" and meta["complete"] is True
    assert meta["dtype"] == "float32" and meta["torch"] == torch.__version__
    assert meta["commit"] == model_bench.source_commit()
    assert meta["projection_gflops"] > 0  # k_proj_hd's measured rate, for the floor ratios
    expected = [(v, b) for v in model_bench.VARIANTS for b in TINY["batches"]
                if v != "fullres" or b in TINY["fullres_batches"]]
    assert [(r["variant"], r["batch"]) for r in rows] == expected
    for r in rows:
        assert "error" not in r
        assert r["new_tokens"] == 3 and r["mode"] == model_bench.VARIANTS[r["variant"]][0]
        assert len(r["walls_s"]) == TINY["repeats"] and r["wall_s"] == r["walls_s"][0]
        assert r["ms_per_image"] == pytest.approx(1000 * r["wall_s"] / r["batch"])
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["wall_s"])
        assert r["tflops_per_image"] == pytest.approx(sum(r["tflops_parts"].values()))
        assert r["peak_mem_gib"] > 0


def test_each_variant_does_what_its_name_says(tiny_run):
    _, result = tiny_run
    rows = {(r["variant"], r["batch"]): r for r in result["rows"]}
    n_flex = TINY["llm"]["num_hidden_layers"] - 9  # FlexAttention layers 9 .. L-1
    for b in TINY["batches"]:
        low, flex = rows["lowres", b], rows["flexattn", b]
        assert low["tiles_encoded"] == 0 and low["hr_blocks_projected"] == 0
        assert low["hr_selected_frac"] == 0 and low["tflops_parts"]["hr_kv"] == 0
        assert 0 < flex["hr_selected_frac"] < 1 and 1 <= flex["tiles_encoded"] <= 9
        assert rows["flexattn-eager-tiles", b]["tiles_encoded"] == 9
        # every block of every FlexAttention layer, projected once
        assert rows["flexattn-kv-prefetch", b]["hr_blocks_projected"] == 81 * n_flex
        # the published code's way projects a block again at each step it is selected
        assert (rows["flexattn-no-kv-reuse", b]["hr_blocks_projected"]
                > flex["hr_blocks_projected"])
    assert rows["fullres", 1]["prompt_tokens"] == rows["lowres", 1]["prompt_tokens"] + 5184
    assert rows["fullres", 1]["tflops_per_image"] > 4 * rows["flexattn", 1]["tflops_per_image"]


def test_ratios_are_quotients_of_the_rows(tiny_run):
    _, result = tiny_run
    rows = {(r["variant"], r["batch"]): r for r in result["rows"]}
    rat = result["ratios"]

    def per_image(v, b):
        return rows[v, b]["ms_per_image"]

    def step(v, b):
        return rows[v, b]["decode_ms_per_token"]

    for b in TINY["batches"]:
        assert rat[f"b{b} flexattn/lowres per image"] == pytest.approx(
            per_image("flexattn", b) / per_image("lowres", b))
        assert rat[f"b{b} flexattn/lowres decode step"] == pytest.approx(
            step("flexattn", b) / step("lowres", b))
        assert rat[f"b{b} no-kv-reuse/kv-reuse decode step"] == pytest.approx(
            step("flexattn-no-kv-reuse", b) / step("flexattn", b))
    assert rat["b1 fullres/flexattn per image"] == pytest.approx(
        per_image("fullres", 1) / per_image("flexattn", 1))
    assert "b2 fullres/flexattn per image" not in rat  # fullres does not run at batch 2


def test_a_point_out_of_memory_becomes_an_error_row_and_the_run_goes_on(monkeypatch):
    # Fault injection: the CPU never runs out of memory at these sizes, so generate() raises
    # torch.OutOfMemoryError (what CUDA raises) for fullres at batch 2, as a GPU would for a
    # batch too big for it.
    model = model_bench.build_model(TINY)
    real = type(model).generate
    calls = []

    def generate(self, images, prompts, **kwargs):
        calls.append((kwargs["mode"], len(images)))
        if kwargs["mode"] == "fullres" and len(images) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.50 GiB\nmore")
        return real(self, images, prompts, **kwargs)

    monkeypatch.setattr(type(model), "generate", generate)
    images = model_bench.make_images(2)
    rows = model_bench.run_batch(model, ["lowres", "fullres", "flexattn"], images, batch=2,
                                 new_tokens=2, repeats=2)
    assert [r["variant"] for r in rows] == ["lowres", "fullres", "flexattn"]
    assert rows[1] == {"variant": "fullres", "mode": "fullres", "batch": 2, "new_tokens": 2,
                       "error": "out of memory: CUDA out of memory. Tried to allocate 9.50 GiB"}
    # fullres is not tried again in the second repeat; the other variants ran both
    assert calls.count(("fullres", 2)) == 1
    assert len(rows[0]["walls_s"]) == 2 and len(rows[2]["walls_s"]) == 2
    rat = model_bench.ratios(rows)
    assert "b2 fullres/flexattn per image" not in rat
    assert rat["b2 flexattn/lowres per image"] == pytest.approx(
        rows[2]["ms_per_image"] / rows[0]["ms_per_image"])
    assert "| fullres | 2 | out of memory: CUDA out of memory." in model_bench.markdown(rows, rat)
    assert model.config.hr_kv_reuse and model.config.lazy_tiles  # the base config is restored


@pytest.mark.parametrize(("flag", "value"), [
    ("--batches", "1,x"), ("--batches", "0"), ("--new-tokens", "0"), ("--repeats", "-1"),
    ("--threads", "two"), ("--variants", "lowres,fastest"), ("--preset", "gpu-70b"),
])
def test_a_bad_flag_is_named(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        model_bench.main(["--preset", "cpu-tiny", flag, value])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_first_projections_per_decode_step_match_the_models_own_masks():
    # Reference: the block masks that the FlexAttention layers used at each step
    # (return_trace), counting each (layer, block) pair at the first step that uses it.
    model = model_bench.build_model(TINY)
    images = model_bench.make_images(2)
    new_tokens = 5
    row = model_bench.run_batch(model, ["flexattn"], images, batch=2, new_tokens=new_tokens,
                                repeats=1)[0]
    outs = model.generate(images, [model_bench.llava_v1_prompt(model_bench.QUESTION)] * 2,
                          max_new_tokens=new_tokens, mode="flexattn", return_trace=True)
    per_image = []
    for o in outs:
        used = o.trace["block_masks"][:, :-1]  # [steps, flex layers, 81]: the last is unused
        seen = used[0].clone()
        first = 0
        for step in range(1, used.shape[0]):
            first += int((used[step] & ~seen).sum())
            seen |= used[step]
        assert int(seen.sum()) == o.hr_blocks_projected  # each pair projected exactly once
        per_image.append(first / (new_tokens - 1))
    assert row["decode_first_projections_per_step"] == pytest.approx(sum(per_image) / 2)
    assert max(per_image) > 0  # random weights: the selection moves while decoding
    prefetch = model_bench.run_batch(model, ["flexattn-kv-prefetch", "lowres"], images, batch=2,
                                     new_tokens=2, repeats=1)
    assert [r["decode_first_projections_per_step"] for r in prefetch] == [None, None]


def test_projection_floor_is_the_lowres_step_plus_the_first_projections():
    cfg = model_bench.build_model(TINY).config
    rows = [{"variant": "lowres", "batch": 4, "decode_ms_per_token": 50.0},
            {"variant": "flexattn", "batch": 4, "decode_ms_per_token": 90.0,
             "decode_first_projections_per_step": 2.5},
            {"variant": "flexattn", "batch": 8, "decode_ms_per_token": 90.0,
             "decode_first_projections_per_step": 2.5}]  # no lowres row at batch 8
    block = 2 * 64 * cfg.hidden_size * cfg.num_key_value_heads * cfg.head_dim
    floor = model_bench.projection_floor(rows, cfg, gflops=10.0)
    ms = 4 * 2.5 * block / 10e9 * 1e3
    assert floor == {"b4 flexattn/lowres decode step, floor from first projections":
                     pytest.approx((50.0 + ms) / 50.0)}
