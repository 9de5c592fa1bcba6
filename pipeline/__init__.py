"""Ray Data stages and job assembly for LLaVA-FlexAttn batch inference.

Stages (one module each): `inputs` (list), `decode` (CPU tasks), `predict` (GPU actors),
`write` (Parquet datasink), `resume`, `summary`; `processor` puts decode and predict together
as a Dataset -> Dataset callable, a list of `Stage`s (`build_processor`, for users' own
pipelines); `tasks`
describes what differs per job and `run` assembles listing, resume, the processor and the
sink. Never imports the model at import time: `predict.Predictor` does, inside each actor.
"""

from pipeline.processor import Processor, ProcessorConfig, Stage, build_processor
from pipeline.run import JobConfig, parse_actors, run
from pipeline.summary import RunSummary
from pipeline.tasks import CAPTION, Task

__all__ = ["CAPTION", "JobConfig", "Processor", "ProcessorConfig", "RunSummary", "Stage",
           "Task", "build_processor", "parse_actors", "run"]
