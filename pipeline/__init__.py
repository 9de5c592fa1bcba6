"""Ray Data stages and job assembly for LLaVA-FlexAttn batch inference.

Stages (one module each): `inputs` (list), `decode` (CPU tasks), `predict` (GPU actors),
`write` (Parquet datasink), `resume`, `summary`; `tasks` describes what differs per job and
`run` assembles them. Never imports the model at import time: `predict.Predictor` does, inside
each actor.
"""

from pipeline.run import JobConfig, parse_actors, run
from pipeline.summary import RunSummary
from pipeline.tasks import CAPTION, Task

__all__ = ["CAPTION", "JobConfig", "RunSummary", "Task", "parse_actors", "run"]
