"""LLaVA-FlexAttn: LLaVA-1.5 with FlexAttention (ECCV 2024) for high-resolution images.

    from flexattn import load_model
    model = load_model("path/to/llava-v1.5-7b-flexattn")
    [g] = model.generate([image], [llava_v1_prompt("Describe this image.")])
"""

from .config import FlexAttnConfig
from .conversation import llava_v1_prompt
from .generate import Generation, LlavaFlexAttn
from .loading import CheckpointError, convert, load_model, save_model

__all__ = ["CheckpointError", "FlexAttnConfig", "Generation", "LlavaFlexAttn", "convert",
           "llava_v1_prompt", "load_model", "save_model"]
