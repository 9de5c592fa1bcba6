"""A training run's recipe as data: one TOML file (``synthhr/configs/mini.toml``), read with
``tomllib`` into a ``Config``. Every error names the key it is about.

Top level: the run (seed, steps, batch size, learning rate, warm-up, ...); ``[model]``: the
shapes of the model (``MODEL_KEYS``); ``[oracle]``: the share of samples whose selection is
the box's own cells falls linearly from 1 to ``floor`` over ``steps``; ``[calibrate]``: the
threshold calibration after training; ``[[phase]]``: from ``from_step`` on, the loss weights
and the pattern share it sets (``PHASE_KEYS``; the first phase starts at 0 and sets them
all, later ones change some). The learning rate follows one schedule over ``steps``: linear
warm-up, then a cosine from ``lr`` to ``0.1 lr``.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

COUNT_ATTENTION = ("boxes", "corner", "corner-boxes")

# key -> type; floats accept integers
TOP_KEYS = {"seed": int, "steps": int, "batch_size": int, "lr": float, "warmup": int,
            "hd_lr_scale": float, "clip": float, "reuse": int, "threads": int,
            "checkpoint_every": int, "eval_every": int, "eval_images": int, "eval_seed": int,
            "count_attention": str}
MODEL_KEYS = {"hidden": int, "heads": int, "intermediate": int, "layers": int,
              "select_layer": int, "vocab": int, "clip_hidden": int, "clip_heads": int,
              "clip_intermediate": int, "clip_layers": int}
ORACLE_KEYS = {"steps": int, "floor": float}
CALIBRATE_KEYS = {"seed": int, "images": int, "max_frac": float, "min_hit": float}
PHASE_KEYS = {"attn_weight": float, "presence_weight": float, "feature_weight": float,
              "read_weight": float,
              "contrast_weight": float, "route_weight": float, "pattern_share": float}
TABLES = {"model": MODEL_KEYS, "oracle": ORACLE_KEYS, "calibrate": CALIBRATE_KEYS}
POSITIVE = ("steps", "batch_size", "reuse", "threads", "checkpoint_every", "eval_every",
            "eval_images")


class ConfigError(ValueError):
    """A config that cannot be run; the message names the key."""


@dataclass(frozen=True)
class Phase:
    from_step: int
    attn_weight: float
    presence_weight: float
    feature_weight: float
    read_weight: float
    contrast_weight: float
    route_weight: float
    pattern_share: float


@dataclass(frozen=True)
class Config:
    seed: int
    steps: int
    batch_size: int
    lr: float
    warmup: int
    hd_lr_scale: float
    clip: float
    reuse: int
    threads: int
    checkpoint_every: int
    eval_every: int
    eval_images: int
    eval_seed: int
    count_attention: str
    model: dict
    oracle: dict
    calibrate: dict
    phases: tuple[Phase, ...]

    # schedules -------------------------------------------------------------------------------
    def phase(self, step: int) -> Phase:
        """The phase ``step`` is in."""
        return [p for p in self.phases if p.from_step <= step][-1]

    def oracle_share(self, step: int) -> float:
        steps, floor = self.oracle["steps"], self.oracle["floor"]
        if step >= steps:
            return floor
        return 1.0 - (1.0 - floor) * step / steps

    def learning_rate(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        done = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))

    # round trip ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The config as TOML-shaped data (``parse_config`` reads it back)."""
        d = asdict(self)
        phases = d.pop("phases")
        d["phase"] = list(phases)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def with_seed(self, seed: int) -> Config:
        return parse_config({**self.to_dict(), "seed": seed})


def _typed(where: str, value, kind: type):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def _table(where: str, data, keys: dict[str, type], partial: bool = False) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {data!r}")
    for key in data:
        if key not in keys:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(keys)})"
                              .lstrip("."))
    if not partial:
        for key in keys:
            if key not in data:
                raise ConfigError(f"{where}.{key}: missing".lstrip("."))
    return {k: _typed(f"{where}.{k}".lstrip("."), v, keys[k]) for k, v in data.items()}


def parse_config(data: dict) -> Config:
    """A ``Config`` from TOML-shaped data; ``ConfigError`` naming the key when it is wrong."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a table, got {data!r}")
    known = {**TOP_KEYS, **{k: dict for k in TABLES}, "phase": list}
    for key in data:
        if key not in known:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(known)})")
    top = _table("", {k: v for k, v in data.items() if k in TOP_KEYS}, TOP_KEYS)
    tables = {name: _table(name, data.get(name, {}), keys) for name, keys in TABLES.items()}
    for key in POSITIVE:
        if top[key] < 1:
            raise ConfigError(f"{key}: must be >= 1, got {top[key]}")
    for key in ("warmup", "seed", "eval_seed"):
        if top[key] < 0:
            raise ConfigError(f"{key}: must be >= 0, got {top[key]}")
    if top["count_attention"] not in COUNT_ATTENTION:
        raise ConfigError(f"count_attention: must be one of {COUNT_ATTENTION}, got"
                          f" {top['count_attention']!r}")
    if not 0 <= tables["oracle"]["floor"] <= 1:
        raise ConfigError(f"oracle.floor: must be within [0, 1], got {tables['oracle']['floor']}")
    if tables["oracle"]["steps"] < 1:
        raise ConfigError(f"oracle.steps: must be >= 1, got {tables['oracle']['steps']}")
    shape = tables["model"]
    if not 0 < shape["select_layer"] < shape["layers"] - 1:
        raise ConfigError(f"model.select_layer: must be within [1, layers - 2], got"
                          f" {shape['select_layer']}")
    if shape["hidden"] % shape["heads"]:
        raise ConfigError(f"model.heads: must divide model.hidden ({shape['hidden']}),"
                          f" got {shape['heads']}")
    raw = data.get("phase")
    if not isinstance(raw, list) or not raw:
        raise ConfigError("phase: at least one [[phase]] is needed")
    phases: list[Phase] = []
    current: dict = {}
    for i, entry in enumerate(raw):
        where = f"phase[{i}]"
        values = _table(where, entry, {"from_step": int, **PHASE_KEYS}, partial=True)
        if "from_step" not in values:
            raise ConfigError(f"{where}.from_step: missing")
        start = values.pop("from_step")
        if i == 0 and start != 0:
            raise ConfigError(f"{where}.from_step: the first phase starts at 0, got {start}")
        if i and start <= phases[-1].from_step:
            raise ConfigError(f"{where}.from_step: must be above the previous phase's"
                              f" ({phases[-1].from_step}), got {start}")
        if start >= top["steps"]:
            raise ConfigError(f"{where}.from_step: must be below steps ({top['steps']}),"
                              f" got {start}")
        if i == 0:
            for key in PHASE_KEYS:
                if key not in values:
                    raise ConfigError(f"{where}.{key}: missing (the first phase sets every"
                                      " weight)")
        for key, value in values.items():
            if value < 0 or (key == "pattern_share" and value > 1):
                raise ConfigError(f"{where}.{key}: out of range, got {value}")
        current = {**current, **values}
        phases.append(Phase(from_step=start, **current))
    return Config(**top, **tables, phases=tuple(phases))


def load_config(path: str | Path) -> Config:
    """Read and check a TOML config; ``ConfigError`` names the file and the key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def differences(a: Config, b: Config) -> list[str]:
    """The keys where two configs differ (top-level fields, tables and phases)."""
    return [f.name for f in fields(Config) if getattr(a, f.name) != getattr(b, f.name)]
