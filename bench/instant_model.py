"""A model stand-in for `bench/scale_bench.py` that answers every image at once, so that the
scale benchmark measures the pipeline (listing, resume, splitting, decoding, writing) and not
generation. Not a user option: `scale_bench.py` starts Ray with `install` as the
`worker_process_setup_hook`, which replaces `Predictor.__init__` in each Ray worker with one
that holds an `InstantModel` instead of loading a checkpoint (and never imports torch). The
rest of the predict stage (prompt checks, error rows, output columns) runs as in a real job.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

MODEL_ID = "instant-stand-in"


@dataclass
class InstantGeneration:
    """The fields `pipeline.predict.Predictor` reads from a generation."""

    text: str
    prompt_tokens: int = 577
    token_ids: list[int] = field(default_factory=lambda: [1, 2])
    hr_selected_per_layer: list[int] = field(default_factory=lambda: [256, 256, 256])
    hr_selected_frac: float = 0.05
    hr_cells: list[bool] = field(default_factory=lambda: [i % 7 == 0 for i in range(81)])
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    selection_map: list[float] = field(default_factory=lambda: [1.0 / 576] * 576)
    tflops: float = 0.0


class InstantModel:
    model_id = MODEL_ID

    def generate(self, images, prompts, image_sizes=None, **kwargs) -> list[InstantGeneration]:
        sizes = image_sizes or [img.size for img in images]
        return [InstantGeneration(text=f"an image of {w}x{h}") for w, h in sizes]


class _NoTorch:
    """What `Predictor._generate` asks of torch."""

    class OutOfMemoryError(RuntimeError):
        pass

    @staticmethod
    def inference_mode():
        return contextlib.nullcontext()


def _instant_init(self, config) -> None:
    from pipeline.predict import OomFaultHook

    self.config = config
    self._prompt = lambda question: question
    self._torch = _NoTorch()
    self.model = InstantModel()
    self.model_id = MODEL_ID
    self.device = "cpu"
    self._fault_hook = OomFaultHook()


def install() -> None:
    """Ray's `worker_process_setup_hook`: predict actors in this process use the stand-in."""
    from pipeline.predict import Predictor

    Predictor.__init__ = _instant_init
