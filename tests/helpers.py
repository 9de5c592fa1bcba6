"""Plain helpers shared by the pipeline and job tests (fixtures live in conftest.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "remote_sensing"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    arr[height // 4: height // 2, width // 4: width // 2] = 255  # a bright rectangle
    return Image.fromarray(arr).convert(mode)
