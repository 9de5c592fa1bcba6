"""LLaVA-FlexAttn: LLaVA-1.5 with FlexAttention (ECCV 2024) for high-resolution images.

    from flexattn import load_model
    model = load_model("path/to/llava-v1.5-7b-flexattn")
    [g] = model.generate([image], [llava_v1_prompt("Describe this image.")])

The names below load on first use, so that ``flexattn.options``, ``flexattn.padding`` and
``flexattn.conversation`` import without torch (a Ray driver reads them).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FlexAttnConfig": "config", "llava_v1_prompt": "conversation", "Generation": "generate",
    "LlavaFlexAttn": "generate", "CheckpointError": "loading", "convert": "loading",
    "load_model": "loading", "save_model": "loading",
}
__all__ = ["CheckpointError", "FlexAttnConfig", "Generation", "LlavaFlexAttn", "convert",
           "llava_v1_prompt", "load_model", "save_model"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flexattn' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
