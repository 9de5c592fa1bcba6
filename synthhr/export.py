"""A trained model in the original LLaVA-FlexAttn layout, with its provenance."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from flexattn.generate import LlavaFlexAttn
from flexattn.original_layout import export_original

TOWER_DIR = "vision_tower"


def git_commit(start: Path | None = None) -> str:
    """The commit checked out in the repository around ``start`` (this file's folder), from
    ``git rev-parse HEAD``; "unknown" outside a repository or without git."""
    here = (start or Path(__file__)).resolve()
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"],  # noqa: S607 (git from PATH)
                              cwd=here if here.is_dir() else here.parent, check=False,
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def export(model: LlavaFlexAttn, out_dir: str | Path, provenance: dict) -> Path:
    """Write ``model`` in the original LLaVA-FlexAttn layout (float32 safetensors), its CLIP
    tower in ``OUT/vision_tower`` (``mm_vision_tower`` relative to the model folder), and
    ``provenance`` as ``OUT/training.json``."""
    out = Path(out_dir)
    export_original(model, out, tower_dir=TOWER_DIR)
    (out / "training.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return out
