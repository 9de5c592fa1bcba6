"""Model benchmark: the three modes on the same weights and the same images, in one run.

    python bench/model_bench.py --preset mini            # the trained SynthHR mini
    python bench/model_bench.py --preset cpu-mini        # 7B proportions, trained selections
    python bench/model_bench.py --preset gpu-7b          # on a CUDA machine

Presets: ``mini`` runs the committed ``models/synthhr-mini`` on SynthHR scenes, asked their
pattern questions. ``cpu-mini`` and ``gpu-7b`` are random weights at 7B-proportioned shapes; on
SynthHR scenes, ``cpu-mini``'s FlexAttention layers replay the trained mini's own selection for
the same image and step (``generate(selections=...)``, the same path as a computed selection:
blocks projected when first selected, tiles encoded when first needed).

Modes: ``lowres`` (plain LLaVA-1.5 at 336), ``flexattn`` (1008, hierarchical attention),
``fullres`` (1008, all 5184 high-res tokens in the sequence). FlexAttention also runs with its
cost switches off, to show what each saves: ``flexattn-eager-tiles`` (all nine tiles encoded up
front) and ``flexattn-no-kv-reuse`` (high-res K/V projected again at every step, as the
published code does); ``flexattn-kv-prefetch`` projects every block's keys in the first step
instead of when each is first selected, so its decode steps show the hierarchical attention
without any projection (with random weights the selection wanders and the default projects
new blocks at nearly every step). Reports per-image time, prefill ms, decode ms per token,
images/s per batch size, analytical TFLOPs per image (flexattn/flops.py) and peak memory (on
CUDA the most allocated during the variant's runs; on a CPU the process's max RSS so far, an
upper bound), then the ratios. At each batch size the timed repeats take the variants in turn,
so that the ratios compare runs made side by side.
EOS is disabled so that every image generates exactly ``--new-tokens`` tokens. A variant that
runs out of device memory at a batch size gets a row with ``error`` instead of figures, and the
run goes on; ``--out`` is rewritten after every batch size (``meta.complete`` is true once all
are done), so a run stopped by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flexattn import llava_v1_prompt
from flexattn.config import FlexAttnConfig
from flexattn.flops import image_cost
from flexattn.random_model import random_model

TRAINED = ROOT / "models" / "synthhr-mini"  # the SynthHR mini (make train: python -m synthhr.train)
SCENE_SEED = 2027  # SynthHR scenes the trained presets run on (training used seeds 0 and 1)
PRESETS = {
    # the trained SynthHR mini on SynthHR scenes, asked its pattern questions; EOS is ignored so
    # that every image generates the tokens asked for
    "mini": {"checkpoint": TRAINED, "device": "cpu", "dtype": "float32", "batches": [1, 4, 8],
             "fullres_batches": [1, 4, 8], "repeats": 3},
    # LLM width 1024 x 12 layers with selection from layer 8 (3 FlexAttention layers); a CLIP
    # tower whose cost per 336 crop is ~4% of the LLM prefill, as CLIP-L is for the 7B model;
    # the real 24x24 / 72x72 grids.
    "cpu-mini": {
        "llm": {"vocab_size": 8192, "hidden_size": 1024, "intermediate_size": 2752, "num_hidden_layers": 12,
                 "num_attention_heads": 16, "num_key_value_heads": 16, "mm_hidden_size": 256},
        "clip": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 6,
                  "num_attention_heads": 4},
        "device": "cpu", "dtype": "float32", "batches": [1, 4, 8], "fullres_batches": [1], "repeats": 2,
        # every FlexAttention layer reads the trained mini's own selection on the same SynthHR
        # image at the same step (its random attention would select all over the image)
        "selections_from": TRAINED},
    # a few seconds a run, for the harness's own test (tests/bench): its times mean nothing
    "cpu-tiny": {
        "llm": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 10,
                 "num_attention_heads": 4, "num_key_value_heads": 4, "mm_hidden_size": 32},
        "clip": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 2},
        "device": "cpu", "dtype": "float32", "batches": [1, 2], "fullres_batches": [1], "repeats": 1},
    # LLaVA-1.5-7B and CLIP ViT-L/14-336 shapes, random weights, bf16
    "gpu-7b": {
        "llm": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                 "mm_hidden_size": 1024},
        "clip": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                  "num_attention_heads": 16},
        "device": "cuda", "dtype": "bfloat16", "batches": [1, 8, 16], "fullres_batches": [1, 8, 16],
        "repeats": 3},
}
VARIANTS = {  # name -> (mode, config changes)
    "lowres": ("lowres", {}),
    "flexattn": ("flexattn", {}),
    "flexattn-eager-tiles": ("flexattn", {"lazy_tiles": False}),
    "flexattn-no-kv-reuse": ("flexattn", {"hr_kv_reuse": False}),
    "flexattn-kv-prefetch": ("flexattn", {"hr_kv_prefetch": True}),
    "fullres": ("fullres", {}),
}
QUESTION = "Describe this image in detail."


def make_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Remote-sensing-like synthetic scenes of mixed sizes: textured fields, roads, buildings."""
    rng = np.random.default_rng(seed)
    sizes = [(1600, 1200), (1008, 1008), (2000, 1000), (900, 1500), (1400, 1400), (2400, 1800)]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        base = rng.integers(40, 120, (h // 8, w // 8, 3), dtype=np.uint8)
        im = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
        d = ImageDraw.Draw(im)
        for _ in range(12):
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            s = int(rng.integers(20, 160))
            d.rectangle([x, y, x + s, y + s // 2], fill=tuple(int(c) for c in rng.integers(150, 255, 3)))
        d.line([0, int(rng.integers(0, h)), w, int(rng.integers(0, h))], fill=(200, 200, 200), width=9)
        out.append(im)
    return out


def synthhr_inputs(n: int, seed: int = SCENE_SEED) -> tuple[list[Image.Image], list[str]]:
    """``n`` SynthHR scenes and, per scene, its pattern question as the trained mini asks it."""
    from synthhr import task as synthhr
    from synthhr.data import question_prompt

    images, prompts = [], []
    for i in range(n):
        scene = synthhr.draw_scene(seed, i)
        images.append(Image.fromarray(scene.image))
        prompts.append(question_prompt(synthhr.scene_questions(scene, str(i))[0].question))
    return images, prompts


def load_trained(path: Path, device: str = "cpu", dtype: str = "float32"):
    """The trained checkpoint at ``path`` with EOS ignored (every image runs the tokens asked)."""
    from flexattn import load_model

    if not (path / "config.json").is_file():
        raise SystemExit(f"{path}: no trained checkpoint (make train, README)")
    model = load_model(path, device=device, dtype=dtype)
    model.module.config = model.config.replace(eos_token_id=-1)
    return model


def trained_selections(path: Path, images: list[Image.Image], prompts: list[str],
                       new_tokens: int) -> torch.Tensor:
    """[N, new_tokens, P*P] bool: the selection the trained model at ``path`` makes at layer s
    for the next layer, per image and step of its own generation (EOS ignored)."""
    model = load_trained(path)
    out = []
    for image, prompt in zip(images, prompts):
        g = model.generate([image], [prompt], max_new_tokens=new_tokens, return_trace=True)[0]
        out.append(g.trace["block_masks"][:, 0])  # [steps, P*P]: the selecting layer s
    return torch.stack(out)


def int_at_least(text: str, minimum: int) -> int:
    """``text`` as an integer >= ``minimum``, else argparse's error (argparse names the flag)."""
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse ``type`` of the benches' counts: an integer >= 1."""
    return int_at_least(text, 1)


def batch_list(text: str) -> list[int]:
    """argparse ``type`` of ``--batches`` and other sizes: comma-separated integers >= 1."""
    return [positive_int(part.strip()) for part in text.split(",")]


def counts_list(text: str) -> list[int]:
    """argparse ``type``: comma-separated integers >= 0."""
    return [int_at_least(part.strip(), 0) for part in text.split(",")]


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """A bench's parser: ``doc`` as description, and ``--out``, the JSON file for the results."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, help="JSON file for the results")
    return p


def provenance(commit: str, argv: list[str] | None = None, script: str = "") -> dict:
    """What every result file records: the command, the commit (`source_commit()`, read
    before the run) and the date. The command is ``sys.argv``, or ``script`` with ``argv``
    when a bench's ``main`` was given its arguments (from a test, say)."""
    words = sys.argv if argv is None else [script, *argv]
    return {"command": " ".join(["python", *words]), "commit": commit,
            "date": time.strftime("%Y-%m-%d")}


def write_json(path: Path | None, result: dict) -> None:
    """Write `result` to `path` (the benches' `--out`), creating its folder; nothing if None."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))


def source_commit() -> str:
    """HEAD's short hash, with ``+dirty`` when tracked files other than benchmark results
    (``bench/results/``, ``bench/RESULTS.md``) differ from it."""
    def git(*cmd):
        return subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=ROOT,
                              check=False).stdout
    head = git("rev-parse", "--short", "HEAD").strip()
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                  ":(exclude)bench/results", ":(exclude)bench/RESULTS.md").strip()
    return head + ("+dirty" if changed else "")


def build_model(preset: dict):
    """A random-weight model at ``preset``'s shapes, device and dtype; EOS never ends its
    answers, so every image generates exactly the tokens asked for."""
    from transformers import CLIPVisionConfig

    cfg = FlexAttnConfig(**preset["llm"], eos_token_id=-1)
    vc = CLIPVisionConfig(image_size=336, patch_size=14, **preset["clip"])
    model = random_model(cfg, vc, device=preset["device"], dtype=getattr(torch, preset["dtype"]))
    if preset["device"] == "cuda":
        torch.cuda.empty_cache()  # the float32 weights the init went through (29 GiB at 7B)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def use_variant(model, variant: str, base) -> str:
    """Configure ``model`` (its config was ``base``) for ``variant``; returns the mode."""
    mode, changes = VARIANTS[variant]
    model.module.config = base.replace(**{"lazy_tiles": True, "hr_kv_reuse": True,
                                          "hr_kv_prefetch": False, **changes})
    return mode


def run_batch(model, variants: list[str], images, batch: int, new_tokens: int,
              repeats: int, prompts: list[str] | None = None,
              selections: torch.Tensor | None = None) -> list[dict]:
    """One row per variant at ``batch``: median of ``repeats`` timed generations. The repeats
    take the variants in turn (lowres, flexattn, ..., lowres, flexattn, ...), so that drift in
    the machine's speed during the run falls on all variants alike rather than on whichever
    ran last. ``prompts``: one per image (default: QUESTION for all); ``selections``: replayed
    by the flexattn variants instead of the model's own ([N, steps, P*P], see
    ``trained_selections``)."""
    base = model.config
    dev = model.device
    prompts = (prompts or [llava_v1_prompt(QUESTION)] * len(images))[:batch]
    imgs = images[:batch]
    replay = {} if selections is None else {"selections": selections[:batch]}

    def generate(mode: str, n: int, tokens: int):
        extra = replay if mode == "flexattn" and n == batch else {}
        return model.generate(imgs[:n], prompts[:n], max_new_tokens=tokens, mode=mode, **extra)

    walls: dict[str, list[float]] = {v: [] for v in variants}
    outs: dict[str, list] = {}
    peak: dict[str, int] = dict.fromkeys(variants, 0)
    for v in variants:  # warm-up
        generate(use_variant(model, v, base), 1, 2)
    failed: dict[str, str] = {}  # variant -> out-of-memory message; its later repeats skipped
    for _ in range(repeats):
        for v in variants:
            if v in failed:
                continue
            mode = use_variant(model, v, base)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            sync(dev)
            t0 = time.perf_counter()
            try:
                outs[v] = generate(mode, batch, new_tokens)
                sync(dev)
            except torch.OutOfMemoryError as exc:
                # one point too big for the device (fullres at a large batch, say) must not
                # lose the rest of the run: it becomes a row that says so
                failed[v] = f"out of memory: {str(exc).splitlines()[0]}"
            if v in failed:
                # out of the except block, the failed call's frames and tensors are freed
                outs.pop(v, None)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            walls[v].append(time.perf_counter() - t0)
            peak[v] = max(peak[v], torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
                          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    text_tokens = len(model.tokenizer.encode_prompt(prompts[0])) - 1
    rows = []
    for v in variants:
        mode = use_variant(model, v, base)
        if v in failed:
            rows.append({"variant": v, "mode": mode, "batch": batch, "new_tokens": new_tokens,
                         "error": failed[v]})
            continue
        wall = statistics.median(walls[v])
        costs = [image_cost(model.config, model.module.vision_config, mode, text_tokens,
                            new_tokens, selected_frac=o.hr_selected_frac, tiles=o.tiles_encoded,
                            blocks_projected=o.hr_blocks_projected,
                            reuse=model.config.hr_kv_reuse) for o in outs[v]]
        o = outs[v]
        first = None  # keys projected for the first time per image and decode step
        if model.config.hr_kv_reuse and not model.config.hr_kv_prefetch and mode == "flexattn":
            # prefill projects exactly the blocks it selects (hr_selected_per_layer, in tokens)
            blk = model.config.block_size ** 2
            first = statistics.mean(
                (x.hr_blocks_projected - sum(x.hr_selected_per_layer) // blk)
                / max(1, x.generated_tokens - 1) for x in o)
        rows.append({
            "variant": v, "mode": mode, "batch": batch, "new_tokens": new_tokens,
            "wall_s": wall, "walls_s": walls[v], "ms_per_image": wall / batch * 1000,
            "images_per_s": batch / wall,
            "prefill_ms": statistics.mean(x.prefill_ms for x in o),
            "decode_ms_per_token": statistics.mean(x.decode_ms / max(1, x.generated_tokens - 1)
                                                   for x in o),
            "prompt_tokens": o[0].prompt_tokens,
            "hr_selected_frac": statistics.mean(x.hr_selected_frac for x in o),
            "tiles_encoded": statistics.mean(x.tiles_encoded for x in o),
            "hr_blocks_projected": statistics.mean(x.hr_blocks_projected for x in o),
            "decode_first_projections_per_step": first,
            "tflops_per_image": statistics.mean(c.total for c in costs) / 1e12,
            "tflops_parts": {k: statistics.mean(c.as_dict()[k] for c in costs) / 1e12
                             for k in ("vision", "prefill", "decode", "hr_kv")},
            "peak_mem_gib": peak[v] / 2 ** 30,
        })
    model.module.config = base
    return rows


def projection_gflops(model, blocks: int = 10, repeats: int = 5) -> float:
    """GFLOP/s of ``k_proj_hd`` on ``blocks`` 8x8 blocks of features, best of ``repeats``:
    the rate at which decode steps project the keys of newly selected blocks."""
    cfg = model.config
    lin = model.module.model.layers[-1].self_attn.k_proj_hd
    x = torch.randn(blocks, cfg.block_size ** 2, cfg.hidden_size, device=model.device,
                    dtype=model.dtype)
    flops = 2 * x.shape[0] * x.shape[1] * lin.in_features * lin.out_features
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first is a warm-up
            sync(model.device)
            t0 = time.perf_counter()
            lin(x)
            sync(model.device)
            best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def projection_floor(rows: list[dict], cfg, gflops: float) -> dict[str, float]:
    """Lowest flexattn/lowres decode-step ratio that the measured first-time projections
    allow: (lowres step + batch x new blocks per image and step x one block's k_proj_hd
    FLOPs at ``gflops``) / lowres step, taking the hierarchical attention itself as free."""
    block = 2 * cfg.block_size ** 2 * cfg.hidden_size * cfg.num_key_value_heads * cfg.head_dim
    out = {}
    for r in rows:
        if r["variant"] != "flexattn" or "error" in r:
            continue
        low = [x for x in rows if x["variant"] == "lowres" and x["batch"] == r["batch"]
               and "error" not in x]
        if not low or r["decode_first_projections_per_step"] is None:
            continue
        ms = r["batch"] * r["decode_first_projections_per_step"] * block / (gflops * 1e9) * 1e3
        step = low[0]["decode_ms_per_token"]
        out[f"b{r['batch']} flexattn/lowres decode step, floor from first projections"] = (
            (step + ms) / step)
    return out


def ratios(rows: list[dict]) -> dict[str, float]:
    def get(variant, batch, key):
        for r in rows:
            if r["variant"] == variant and r["batch"] == batch and "error" not in r:
                return r[key]
        return float("nan")

    out = {}
    for b in sorted({r["batch"] for r in rows}):
        low, flex = get("lowres", b, "ms_per_image"), get("flexattn", b, "ms_per_image")
        out[f"b{b} flexattn/lowres per image"] = flex / low
        out[f"b{b} flexattn-eager-tiles/lowres per image"] = get(
            "flexattn-eager-tiles", b, "ms_per_image") / low
        out[f"b{b} fullres/flexattn per image"] = get("fullres", b, "ms_per_image") / flex
        out[f"b{b} flexattn/lowres decode step"] = (get("flexattn", b, "decode_ms_per_token")
                                                    / get("lowres", b, "decode_ms_per_token"))
        pre = "flexattn-kv-prefetch"
        out[f"b{b} {pre}/lowres per image"] = get(pre, b, "ms_per_image") / low
        out[f"b{b} {pre}/lowres decode step"] = (get(pre, b, "decode_ms_per_token")
                                                 / get("lowres", b, "decode_ms_per_token"))
        out[f"b{b} no-kv-reuse/kv-reuse decode step"] = (
            get("flexattn-no-kv-reuse", b, "decode_ms_per_token")
            / get("flexattn", b, "decode_ms_per_token"))
        out[f"b{b} no-kv-reuse/kv-reuse per image"] = get(
            "flexattn-no-kv-reuse", b, "ms_per_image") / flex
    return {k: v for k, v in out.items() if not math.isnan(v)}  # drop missing combinations


def all_ratios(rows: list[dict], cfg, gflops: float) -> dict[str, float]:
    return {**ratios(rows), **projection_floor(rows, cfg, gflops)}


def markdown(rows: list[dict], rat: dict[str, float]) -> str:
    head = ("| variant | batch | ms/image | images/s | prefill ms | decode ms/token |"
            " prompt tokens | selected frac | tiles | blocks projected |"
            " first projections per decode step | TFLOPs/image | peak GiB |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        first = r.get("decode_first_projections_per_step")
        first = "" if first is None else f"{first:.1f}"
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['batch']} | {r['error']} |" + " |" * 10)
            continue
        lines.append(
            f"| {r['variant']} | {r['batch']} | {r['ms_per_image']:.0f} | {r['images_per_s']:.2f}"
            f" | {r['prefill_ms']:.0f} | {r['decode_ms_per_token']:.1f} | {r['prompt_tokens']}"
            f" | {r['hr_selected_frac']:.3f} | {r['tiles_encoded']:.1f}"
            f" | {r['hr_blocks_projected']:.0f} | {first}"
            f" | {r['tflops_per_image']:.3f} | {r['peak_mem_gib']:.2f} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in rat.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-mini")
    p.add_argument("--new-tokens", type=positive_int, default=16)
    p.add_argument("--batches", type=batch_list,
                   help="comma-separated batch sizes (default: the preset's)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {list(VARIANTS)}")
    p.add_argument("--repeats", type=positive_int, help="timed runs per point (median is reported)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    commit = source_commit()  # read before the run: the figures belong to this tree
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            p.error(f"--variants: unknown variant {v!r}")
    if preset["device"] == "cuda" and not torch.cuda.is_available():
        p.error(f"--preset {args.preset} needs a CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = args.batches or preset["batches"]
    t0 = time.perf_counter()
    model = load_trained(preset["checkpoint"]) if "checkpoint" in preset else build_model(preset)
    print(f"built {model.model_id} in {time.perf_counter() - t0:.1f}s", flush=True)
    gflops = projection_gflops(model)
    print(f"k_proj_hd on 10 blocks: {gflops:.1f} GFLOP/s", flush=True)
    prompts, selections = None, None
    if "checkpoint" in preset or "selections_from" in preset:
        images, prompts = synthhr_inputs(max(batches))
        if "selections_from" in preset:
            selections = trained_selections(preset["selections_from"], images, prompts,
                                            args.new_tokens)
            prompts = None  # the random model is asked QUESTION; the selection is the mini's
            print(f"trained selections: mean fraction {selections.float().mean():.3f}",
                  flush=True)
    else:
        images = make_images(max(batches))
    device = (torch.cuda.get_device_name() if preset["device"] == "cuda"
              else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    meta = {"preset": args.preset, **provenance(commit, argv, "bench/model_bench.py"),
            "device": device, "torch": torch.__version__, "dtype": preset["dtype"],
            "projection_gflops": gflops}
    rows: list[dict] = []
    for i, b in enumerate(batches):
        todo = [v for v in variants
                if VARIANTS[v][0] != "fullres" or b in preset["fullres_batches"]]
        for r in run_batch(model, todo, images, b, args.new_tokens,
                           args.repeats or preset["repeats"], prompts, selections):
            rows.append(r)
            if "error" in r:
                print(f"{r['variant']:22s} b={b:<3d} {r['error']}", flush=True)
                continue
            print(f"{r['variant']:22s} b={b:<3d} {r['ms_per_image']:9.0f} ms/image"
                  f"  prefill {r['prefill_ms']:8.0f} ms  decode {r['decode_ms_per_token']:7.1f}"
                  f" ms/token  sel {r['hr_selected_frac']:.3f}  tiles {r['tiles_encoded']:.1f}"
                  f"  blocks {r['hr_blocks_projected']:.0f}  {r['tflops_per_image']:.3f} TFLOPs",
                  flush=True)
        rows.sort(key=lambda r: (variants.index(r["variant"]), r["batch"]))
        # written after every batch size, so a run stopped by a time limit keeps what it measured
        rat = all_ratios(rows, model.config, gflops)
        write_json(args.out, {"meta": {**meta, "complete": i == len(batches) - 1},
                              "rows": rows, "ratios": rat})
    print()
    print(markdown(rows, rat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
