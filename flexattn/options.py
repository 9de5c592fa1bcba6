"""The conventions the model and the pipeline share, in one place that imports nothing heavy
(no torch), so that a Ray driver can read them: the modes, the dtypes, the run-time options of
a loaded model, CLIP's normalisation and the padding colour derived from it."""

from __future__ import annotations

MODES = ("flexattn", "lowres", "fullres")
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
