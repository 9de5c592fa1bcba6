"""The conventions the model and the pipeline share, in one place that imports nothing heavy
(no torch), so that a Ray driver can read them: the modes, the dtypes, the run-time options of
a loaded model, CLIP's normalisation and the padding colour derived from it."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

MODES = ("flexattn", "lowres", "fullres")
LOWRES_VIEWS = ("highres", "direct")  # FlexAttnConfig.lowres_view
DTYPES = ("bfloat16", "float16", "float32")
# Fields a loaded model may change: how it runs, not what was built. Everything else (sizes,
# layer counts, select_layer, grids) shapes the modules and the statistics, so it is fixed by
# the checkpoint.
RUNTIME_FIELDS = ("mode", "threshold", "lazy_tiles", "hr_kv_reuse", "hr_kv_prefetch",
                  "vision_batch", "eos_token_id")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def pad_colour(mean: tuple[float, float, float] = CLIP_MEAN) -> tuple[int, int, int]:
    """The image mean colour truncated to integers, as LLaVA pads: (122, 116, 104) for CLIP."""
    return tuple(int(m * 255) for m in mean)  # type: ignore[return-value]


PAD_COLOUR = pad_colour()


# The high-resolution side every published LLaVA-FlexAttn checkpoint uses (3 x 336).
DEFAULT_HIGHRES_SIZE = 1008


@functools.lru_cache(maxsize=64)  # a job's configs are built several times from one path
def checkpoint_highres_size(directory: str | os.PathLike) -> int | None:
    """The side of the padded square image a local checkpoint folder expects (its
    ``highres_size``), read from its config alone; None for what is not a local folder (an
    object-storage URI is only read when a replica loads it). Any of the three layouts the
    loader reads: ours (``flexattn_config.json``), the original (``extra.highres_size``, else
    1008) and Hugging Face LLaVA (3 x the vision tower's ``image_size``)."""
    folder = Path(directory)
    if not folder.is_dir():
        return None
    own = folder / "flexattn_config.json"
    if own.is_file():
        return int(json.loads(own.read_text())["config"].get("highres_size",
                                                              DEFAULT_HIGHRES_SIZE))
    config = folder / "config.json"
    if not config.is_file():
        return None
    raw = json.loads(config.read_text())
    if raw.get("model_type") == "llava":
        return 3 * int((raw.get("vision_config") or {}).get("image_size", 336))
    return int((raw.get("extra") or {}).get("highres_size", DEFAULT_HIGHRES_SIZE))
