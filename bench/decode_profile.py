"""Where a decode step's time goes, and what ``torch.compile`` of the decode step buys.

    python bench/decode_profile.py --out bench/results/decode-profile.json

The ``cpu-mini`` shapes of ``bench/model_bench.py`` (random weights, 7B proportions) on SynthHR
scenes, with the trained mini's selections replayed (so that FlexAttention reads a few cells,
as a trained model does). Three parts, in one run:

1. Profile: ``torch.profiler`` over every decode step of a ``flexattn`` and a ``lowres``
   generation at ``--batch``; self CPU time per operator, summed over the steps, split into the
   model's own arithmetic (matrix products and attention) and the rest (gathers, copies,
   masks, element-wise work, Python).
2. Decode step ms for lowres and flexattn, eager, side by side.
3. The same with ``model.decode_step`` wrapped in ``torch.compile`` (``dynamic=True``): the
   first generation's extra time (compilation) and the steady-state step.

Each generation is timed per step from ``Generation.decode_ms`` (the steps after the first
token), median over ``--repeats`` generations taken in turn.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import model_bench

# aten operators that are the model's own arithmetic (linear layers, attention products)
ARITHMETIC = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul",
              "aten::linear", "aten::_scaled_dot_product", "aten::scaled_dot_product",
              "aten::einsum", "aten::_flash", "aten::_efficient")
TOP = 15


def step_ms(g) -> float:
    """Mean ms of one decode step of a generation (the steps after the first token)."""
    steps = g.generated_tokens - 1
    return g.decode_ms / max(1, steps)


def profile_steps(model, images, prompts, mode, new_tokens, selections) -> dict[str, float]:
    """Self CPU ms per operator, summed over the decode steps of one generation."""
    totals: dict[str, float] = defaultdict(float)
    step = model.decode_step

    def profiled(*args, **kwargs):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = step(*args, **kwargs)
        for e in prof.key_averages():
            totals[e.key] += e.self_cpu_time_total / 1000.0
        return out

    model.decode_step = profiled
    try:
        extra = {"selections": selections} if mode == "flexattn" else {}
        model.generate(images, prompts, max_new_tokens=new_tokens, mode=mode, **extra)
    finally:
        del model.decode_step
    return dict(totals)


def summarize_profile(totals: dict[str, float], steps: int) -> dict:
    total = sum(totals.values())
    arith = sum(v for k, v in totals.items() if k.startswith(ARITHMETIC))
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:TOP]
    return {"ms_per_step": total / steps, "arithmetic_share": arith / total if total else 0.0,
            "top": [{"op": k, "ms_per_step": v / steps, "share": v / total} for k, v in top]}


def timed(model, images, prompts, modes, new_tokens, selections, repeats) -> dict[str, list]:
    out: dict[str, list] = {m: [] for m in modes}
    for _ in range(repeats):
        for m in modes:
            extra = {"selections": selections} if m == "flexattn" else {}
            gs = model.generate(images, prompts, max_new_tokens=new_tokens, mode=m, **extra)
            out[m].append(statistics.mean(step_ms(g) for g in gs))
    return out


def main(argv: list[str] | None = None) -> int:
    p = model_bench.bench_parser(__doc__)
    p.add_argument("--batch", type=model_bench.positive_int, default=4)
    p.add_argument("--new-tokens", type=model_bench.positive_int, default=16)
    p.add_argument("--repeats", type=model_bench.positive_int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile part")
    args = p.parse_args(argv)
    commit = model_bench.source_commit()
    preset = model_bench.PRESETS["cpu-mini"]
    model = model_bench.build_model(preset)
    images, prompts = model_bench.synthhr_inputs(args.batch)
    selections = model_bench.trained_selections(preset["selections_from"], images, prompts,
                                                args.new_tokens)
    prompts = [model_bench.llava_v1_prompt(model_bench.QUESTION)] * args.batch
    modes = ("lowres", "flexattn")
    for m in modes:  # warm-up
        model.generate(images[:1], prompts[:1], max_new_tokens=2, mode=m,
                       **({"selections": selections[:1]} if m == "flexattn" else {}))
    steps = args.new_tokens - 1
    result = {"meta": {**model_bench.provenance(commit, argv, "bench/decode_profile.py"),
                       "preset": "cpu-mini", "batch": args.batch, "threads":
                       torch.get_num_threads(), "torch": torch.__version__,
                       "selected_fraction": float(selections.float().mean())}}
    result["profile"] = {m: summarize_profile(
        profile_steps(model, images, prompts, m, args.new_tokens, selections), steps)
        for m in modes}
    eager = timed(model, images, prompts, modes, args.new_tokens, selections, args.repeats)
    result["eager_step_ms"] = {m: statistics.median(v) for m, v in eager.items()}
    if not args.no_compile:
        compiled = torch.compile(model.decode_step, dynamic=True)
        model.decode_step = compiled
        first = {}
        for m in modes:
            t0 = time.perf_counter()
            extra = {"selections": selections} if m == "flexattn" else {}
            model.generate(images, prompts, max_new_tokens=args.new_tokens, mode=m, **extra)
            first[m] = time.perf_counter() - t0
        comp = timed(model, images, prompts, modes, args.new_tokens, selections, args.repeats)
        del model.decode_step
        result["compiled_step_ms"] = {m: statistics.median(v) for m, v in comp.items()}
        result["compiled_first_generation_s"] = first
    print(markdown(result))
    model_bench.write_json(args.out, result)
    return 0


def markdown(result: dict) -> str:
    lines = []
    for m, prof in result["profile"].items():
        lines += [(f"{m} decode step (batch {result['meta']['batch']}): "
                  f"{prof['ms_per_step']:.1f} ms profiled, "
                  f"{100 * prof['arithmetic_share']:.0f}% in matrix products and attention"),
                  "", "| operator | ms / step | share |", "|---|---|---|"]
        lines += [f"| {t['op']} | {t['ms_per_step']:.2f} | {100 * t['share']:.1f}% |"
                  for t in prof["top"]]
        lines.append("")
    e = result["eager_step_ms"]
    lines.append(f"eager step: lowres {e['lowres']:.1f} ms, flexattn {e['flexattn']:.1f} ms "
                 f"({e['flexattn'] / e['lowres']:.2f}x)")
    if "compiled_step_ms" in result:
        c, f = result["compiled_step_ms"], result["compiled_first_generation_s"]
        lines.append(f"torch.compile step: lowres {c['lowres']:.1f} ms, flexattn "
                     f"{c['flexattn']:.1f} ms; first generation (compiling) lowres "
                     f"{f['lowres']:.0f} s, flexattn {f['flexattn']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
