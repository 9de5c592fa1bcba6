"""Decode benchmark: milliseconds per image for each step of the decode stage, on the pipeline
benchmark's synthetic remote-sensing JPEGs (mixed sizes, 1008x1008 to 2400x1800).

    python bench/decode_bench.py                       # 24 images, best of 3 passes
    python bench/decode_bench.py --images 48 --out bench/results/decode.json

Steps: `open` (Pillow open + full decode of the JPEG bytes), `exif_transpose`, `to_rgb`,
`square_resize` (to 1008) and `prepare` (what decode runs per image after opening:
orientation, RGB, pad, resize and the array). Each figure is the best of `--repeats` passes
over all images, in one process, one thread.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def best_ms_per_image(step, items, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            step(item)
        best = min(best, time.perf_counter() - start)
    return 1e3 * best / len(items)


def main(argv: list[str] | None = None) -> int:
    from model_bench import make_images, positive_int, provenance, source_commit, write_json

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=positive_int, default=24)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--out", type=Path, help="JSON file for the results")
    args = p.parse_args(argv)

    from PIL import ImageOps

    from pipeline.decode import DecodeConfig, open_image, prepare, square_resize, to_rgb

    commit = source_commit()
    config = DecodeConfig()
    jpegs = []
    for im in make_images(args.images, seed=1):
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    opened = [open_image(data, config.max_pixels) for data in jpegs]
    steps = {
        "open": (lambda data: open_image(data, config.max_pixels), jpegs),
        "exif_transpose": (ImageOps.exif_transpose, opened),
        "to_rgb": (to_rgb, opened),
        "square_resize": (lambda im: square_resize(im, config.image_size, config.pad_color),
                           opened),
        "prepare": (lambda im: prepare(im, config), opened),
    }
    ms = {name: round(best_ms_per_image(step, items, args.repeats), 2)
          for name, (step, items) in steps.items()}
    for name, value in ms.items():
        print(f"{name:>15}: {value:7.2f} ms/image")
    write_json(args.out, {**provenance(commit), "images": args.images,
                          "repeats": args.repeats, "ms_per_image": ms})
    return 0


if __name__ == "__main__":
    sys.exit(main())
