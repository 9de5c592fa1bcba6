from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flexattn import load_model

DATA = Path(__file__).resolve().parents[1] / "data" / "golden"
GOLDEN_MODEL = DATA / "tiny" / "llava-v1.5-tiny-flexattn"
GOLDEN_TOWER = DATA / "tiny" / "clip-vit-tiny-patch14-336"
CASES = ("dev0_640x480", "dev1_600x1500", "dev2_2000x1000")
PROMPT = ("A chat between a curious human and an artificial intelligence assistant. The assistant"
          " gives helpful, detailed, and polite answers to the human's questions. USER: <image>\n"
          "Describe this image in detail. ASSISTANT:")


def golden_case(name: str) -> tuple[Image.Image, dict[str, np.ndarray]]:
    arrays = np.load(DATA / "cases" / f"{name}.npz")
    return Image.open(DATA / "cases" / f"{name}.png"), {k: arrays[k] for k in arrays.files}


@pytest.fixture(scope="session")
def golden_model():
    return load_model(GOLDEN_MODEL, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def golden_model_nohr():
    return load_model(GOLDEN_MODEL, device="cpu", dtype="float32", threshold=255)
