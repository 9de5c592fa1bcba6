"""``flexattn`` command line: ``generate`` one answer, ``convert`` a checkpoint to the own layout,
``viz`` one answer plus a PNG of what the model looked at. (A SynthHR question set:
``python -m synthhr.task``; flexattn never imports synthhr.)"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .options import DTYPES, MODES


def _load_inputs(args: argparse.Namespace):
    """The model, the image and the full prompt named by the shared flags."""
    from PIL import Image

    from .conversation import as_prompt
    from .loading import load_model

    overrides = {} if args.threshold is None else {"threshold": args.threshold}
    model = load_model(args.model, vision_tower=args.vision_tower, device=args.device,
                       dtype=args.dtype, mode=args.mode, **overrides)
    try:
        image = Image.open(args.image)
        image.load()
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--image: cannot read {args.image}: {exc}") from exc
    prompt = as_prompt(args.prompt)
    return model, image, prompt


def _generate(args: argparse.Namespace) -> int:
    model, image, prompt = _load_inputs(args)
    [out] = model.generate([image], [prompt], max_new_tokens=args.max_new_tokens,
                           do_sample=args.temperature > 0, temperature=args.temperature or 1.0,
                           top_p=args.top_p, seed=args.seed)
    stats = {
        "model": model.model_id, "mode": args.mode, "image_size": list(image.size),
        "prompt_tokens": out.prompt_tokens, "generated_tokens": out.generated_tokens,
        "hr_selected_per_layer": out.hr_selected_per_layer,
        "hr_selected_frac": round(out.hr_selected_frac, 4),
        "hr_cells_selected": sum(out.hr_cells), "prefill_ms": round(out.prefill_ms, 1),
        "decode_ms": round(out.decode_ms, 1), "finish_reason": out.finish_reason}
    if args.json:
        print(json.dumps({"answer": out.text, "token_ids": out.token_ids, **stats}))
        return 0
    print(out.text)
    print()
    layers = model.config.flex_layers
    print(f"prompt tokens {out.prompt_tokens}, generated {out.generated_tokens}"
          f" ({out.finish_reason}); prefill {out.prefill_ms:.1f} ms, decode {out.decode_ms:.1f} ms")
    if args.mode == "flexattn":
        print(f"high-res tokens selected at prefill, layers {layers[0]}-{layers[-1]}:"
              f" {out.hr_selected_per_layer}")
        print(f"mean selected fraction {out.hr_selected_frac:.3f};"
              f" 9x9 cells used {sum(out.hr_cells)}/81")
    return 0


def _viz(args: argparse.Namespace) -> int:
    from .viz import save_overlay

    if args.mode != "flexattn":
        raise ValueError("viz needs --mode flexattn: only FlexAttention selects cells")
    model, image, prompt = _load_inputs(args)
    [out] = model.generate([image], [prompt], max_new_tokens=args.max_new_tokens)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    picture = save_overlay(args.out, image, out.hr_cells, out.selection_map,
                           max_side=args.max_side)
    if args.json:
        print(json.dumps({"answer": out.text, "out": str(args.out), "size": list(picture.size),
                          "image_size": list(image.size), "hr_cells": out.hr_cells,
                          "selection_map": out.selection_map}))
        return 0
    print(out.text)
    print(f"wrote {args.out} ({picture.size[0]}x{picture.size[1]}); 9x9 cells used"
          f" {sum(out.hr_cells)}/81")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .loading import convert

    out = convert(args.src, args.dst, vision_tower=args.vision_tower, dtype=args.dtype)
    print(f"wrote {out}")
    return 0


def _add_input_flags(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The flags `_load_inputs` reads (model, image, prompt) and the answer length."""
    p.add_argument("--model", required=True, help="checkpoint directory (any layout)")
    p.add_argument("--vision-tower", help="CLIP tower directory (overrides mm_vision_tower)")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="question, or a full prompt holding <image>")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--mode", choices=MODES, default="flexattn")
    p.add_argument("--threshold", type=float, help="selection threshold (0-255)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flexattn", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer one prompt about one image")
    _add_input_flags(g, max_new_tokens=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=_generate)
    v = sub.add_parser("viz", help="answer one prompt and draw the selected cells and the"
                       " last selection map over the image as PNG")
    _add_input_flags(v, max_new_tokens=16)
    v.add_argument("--out", required=True, help="PNG to write")
    v.add_argument("--max-side", type=int, default=1024, help="long side of the PNG at most")
    v.add_argument("--json", action="store_true",
                   help="print one JSON object (answer, hr_cells, selection_map)")
    v.set_defaults(func=_viz)
    c = sub.add_parser("convert", help="write a checkpoint in the own safetensors layout")
    c.add_argument("src", help="checkpoint directory (original, HF or own layout)")
    c.add_argument("dst", help="output directory")
    c.add_argument("--vision-tower", help="CLIP tower directory for the original layout")
    c.add_argument("--dtype", choices=DTYPES, default="float16")
    c.set_defaults(func=_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"flexattn {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
