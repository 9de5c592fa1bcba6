"""The ``llava_v1`` conversation template used by LLaVA-1.5."""

from __future__ import annotations

from .tokenizer import IMAGE_TOKEN

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def as_prompt(text: str) -> str:
    """A full prompt from a user's text: as it is when it already holds ``<image>``, else the
    question wrapped in the llava_v1 conversation with the image before it."""
    return text if IMAGE_TOKEN in text else llava_v1_prompt(text)


def llava_v1_prompt(question: str, system: str = SYSTEM, with_image: bool = True) -> str:
    """``question`` -> "<system> USER: <image>\\n<question> ASSISTANT:"."""
    if with_image and IMAGE_TOKEN not in question:
        question = f"{IMAGE_TOKEN}\n{question}"
    return f"{system} USER: {question} ASSISTANT:"
