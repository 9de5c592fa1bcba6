"""Vision benchmark: milliseconds per 336 crop through CLIP and the projector, by the number of
crops per forward (`FlexAttnConfig.vision_batch`), on a preset's shapes with random weights.

    python bench/vision_bench.py                                 # cpu-mini, 72 crops
    python bench/vision_bench.py --chunks 72,36,16,8,4,1 --out bench/results/vision.json

72 crops are the nine tiles of a batch of 8 at 1008 px, which eager tiles encode in one call.
`0` in `--chunks` is the automatic choice (`LlavaFlexAttnForCausalLM.vision_chunk`). Each
figure is the best of `--repeats` passes over all crops, after one warm-up forward; the passes
take the settings in turn.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main(argv: list[str] | None = None) -> int:
    from model_bench import (
        PRESETS,
        bench_parser,
        build_model,
        counts_list,
        positive_int,
        provenance,
        source_commit,
        sync,
        write_json,
    )

    p = bench_parser(__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-mini")
    p.add_argument("--crops", type=positive_int, default=72)
    p.add_argument("--chunks", type=counts_list, default="0,72,36,16,8,4,1",
                   help="crops per forward to time, comma-separated; 0: the automatic choice")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (0: torch's)")
    args = p.parse_args(argv)
    chunks = args.chunks
    preset = PRESETS[args.preset]
    if preset["device"] == "cuda" and not torch.cuda.is_available():
        p.error(f"--preset {args.preset} needs a CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)

    commit = source_commit()
    model = build_model(preset)
    module, dev = model.module, model.device
    crops = torch.randn(args.crops, 3, 336, 336, device=dev, dtype=model.dtype)
    auto = module.vision_chunk(crops)
    best = dict.fromkeys(chunks, float("inf"))
    with torch.inference_mode():
        module.encode_crops(crops[:1])
        for _ in range(args.repeats):  # passes interleave the settings, against drift
            for chunk in chunks:
                model.configure(vision_batch=chunk)
                sync(dev)
                start = time.perf_counter()
                module.encode_crops(crops)
                sync(dev)
                best[chunk] = min(best[chunk], time.perf_counter() - start)
    rows = []
    for chunk in chunks:
        rows.append({"vision_batch": chunk, "crops_per_forward": min(chunk or auto, args.crops),
                     "ms_per_crop": round(1e3 * best[chunk] / args.crops, 2)})
        print(f"vision_batch {chunk:>3} ({rows[-1]['crops_per_forward']:>3} crops per forward):"
              f" {rows[-1]['ms_per_crop']:8.2f} ms/crop")
    write_json(args.out, {**provenance(commit), "preset": args.preset, "device": str(dev),
                          "threads": torch.get_num_threads(), "crops": args.crops,
                          "repeats": args.repeats, "auto_crops_per_forward": auto,
                          "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
