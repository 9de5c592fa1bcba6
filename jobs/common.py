"""Flags every job shares (docs/DESIGN.md section 6) and the start-up they share.

Each flag maps to the `JobConfig` keyword of the same name (`--batch-size` <-> `batch_size`,
`--actors` <-> `actors`, which is the processor's `concurrency`); a job adds its own flags, then calls `job_config(parser, args, task)`, which turns a
`ValueError` from the config into argparse's exit 2 naming the flag.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline import JobConfig, RunSummary, Task
from pipeline.storage import redact_secrets_in_logs


def _gpus(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def job_parser(prog: str, doc: str, *, default_input: str, default_output: str,
               input_help: str, prompt_help: str | None, **defaults) -> argparse.ArgumentParser:
    """A job's parser (`doc`'s first paragraph as description) with the shared flags;
    `defaults` override JobConfig's defaults (e.g. batch_size=2); no `--prompt` when
    `prompt_help` is None (every row brings its own question). The job adds its own flags."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    d = JobConfig(input=default_input, output=default_output, **defaults)
    m = d.processor
    p.add_argument("--input", default=default_input, help=f"{input_help} (default: %(default)s)")
    p.add_argument("--output", default=default_output,
                   help="folder or s3:// / gs:// prefix (default: %(default)s)")
    p.add_argument("--model", default=m.model,
                   help="checkpoint directory, an object-storage URI of one, or 'demo' "
                        "(default: %(default)s)")
    p.add_argument("--vision-tower", default=None,
                   help="CLIP tower directory or URI (default: from the checkpoint's config)")
    if prompt_help is not None:
        p.add_argument("--prompt", default=None, help=prompt_help)
    p.add_argument("--mode", default=m.mode,
                   help="flexattn, lowres or fullres (default: %(default)s)")
    p.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 "
                   "(default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--batch-size", type=int, default=m.batch_size,
                   help="rows per generate() call on an actor (default: %(default)s)")
    p.add_argument("--actors", default="1",
                   help="actor pool size MIN[,MAX], autoscaling (default: %(default)s)")
    p.add_argument("--gpus-per-actor", type=_gpus, default="auto",
                   help="GPUs per actor, or 'auto': 1 if the cluster has GPUs, else 0 "
                        "(default: auto)")
    p.add_argument("--cpus-per-actor", type=float, default=m.cpus_per_replica,
                   help="(default: %(default)s)")
    p.add_argument("--memory-per-actor-gb", type=float, default=m.memory_per_replica_gb,
                   help="host memory reserved per model replica (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=m.max_new_tokens,
                   help="(default: %(default)s)")
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N inputs in listing order (default: all)")
    p.add_argument("--max-pixels", type=int, default=m.max_pixels,
                   help="larger images become error rows (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=m.image_size,
                   help="side of the padded square decode produces, the model's "
                        "highres_size (default: %(default)s)")
    p.add_argument("--decode-rows-per-task", type=int, default=m.decode_rows_per_task,
                   help="inputs per CPU decode task (default: %(default)s)")
    p.add_argument("--decode-in-actors", action="store_true",
                   help="decode in the model actors instead of in CPU tasks (Ray Data fuses the"
                        " stages): faster on CPU-only clusters whose actors fill every core")
    p.add_argument("--rows-per-file", type=int, default=None, metavar="N",
                   help="rows bundled into each output Parquet file (default: about 1%% of the "
                        "rows to run, at least one batch, at most 500); a file is written "
                        "sooner when its rows have waited --flush-seconds")
    p.add_argument("--flush-seconds", type=float, default=d.flush_seconds, metavar="S",
                   help="the longest an answered row waits before it is written: a job killed "
                        "at any moment loses at most about this much work (default: %(default)s)")
    p.add_argument("--max-error-fraction", type=float, default=d.max_error_fraction,
                   metavar="F",
                   help="exit 1 after writing everything when more than this share of the rows "
                        "written are errors; a run whose rows are all errors always exits 1 "
                        "(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete previous results under --output instead of resuming")
    p.add_argument("--save-overlays", type=int, default=0, metavar="N",
                   help="after the run, draw the selected cells and the last selection map "
                        "of the first N answered rows as PNG under OUTPUT/_overlays/")
    p.add_argument("--log-level", default="INFO", help="driver log level (default: %(default)s)")
    return p


def add_raster_arguments(p: argparse.ArgumentParser) -> None:
    """Remote-sensing flags (pipeline/raster.py, pipeline/stac.py): chips, bands, stretch,
    ground sample distance, STAC asset, scene maps."""
    g = p.add_argument_group("remote-sensing scenes (GeoTIFF / COG / JPEG2000, STAC)")
    g.add_argument("--chip-size", type=int, default=None, metavar="PX",
                   help="cut each scene into chips of PX x PX native pixels, one row each "
                        "(default: a scene is one row, shrunk whole)")
    g.add_argument("--chip-overlap", type=int, default=0, metavar="PX",
                   help="pixels shared by neighbouring chips (default: %(default)s)")
    g.add_argument("--gsd", type=float, default=None, metavar="METRES",
                   help="resample georeferenced scenes to this ground sample distance first")
    g.add_argument("--bands", default=None, metavar="R,G,B",
                   help="1-based bands shown as red, green, blue, e.g. 4,3,2 (default: the "
                        "raster's red/green/blue colour interpretation, else the first three)")
    g.add_argument("--stretch", default="2,98", metavar="LOW,HIGH",
                   help="per-band percentiles stretched to 0..255 for data above 8 bits "
                        "(default: %(default)s)")
    g.add_argument("--asset", default=None, metavar="NAME",
                   help="STAC input: the asset to read (default: visual, else the first "
                        "image asset)")
    g.add_argument("--save-scene-maps", type=int, default=0, metavar="N",
                   help="after the run, draw the first N chipped scenes with their chip grid "
                        "and the high-res cells each chip's answer used, as "
                        "OUTPUT/_scenes/<id>.png")


def job_config(parser: argparse.ArgumentParser, args: argparse.Namespace, task: Task,
               **fields) -> JobConfig:
    """JobConfig from the parsed flags of the same names, plus `fields`; a bad value exits 2
    naming its flag."""
    if args.save_overlays < 0:
        parser.error(f"--save-overlays must be >= 0, got {args.save_overlays}")
    if getattr(args, "save_scene_maps", 0) < 0:
        parser.error(f"--save-scene-maps must be >= 0, got {args.save_scene_maps}")
    names = JobConfig.keywords()
    values = {k: v for k, v in vars(args).items() if k in names} | fields
    try:
        return JobConfig(task=task, **values)
    except ValueError as exc:
        parser.error(str(exc))  # exits 2 with the message naming the flag
        raise  # unreachable: parser.error exits


def start(args: argparse.Namespace) -> None:
    """Driver logging (credentials from the environment redacted, even at DEBUG level), and
    Ray: RAY_ADDRESS (as `ray job submit` sets) or a local instance."""
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    redact_secrets_in_logs()
    import ray

    if not ray.is_initialized():
        ray.init()


def finish(config: JobConfig, args: argparse.Namespace, summary: RunSummary) -> int:
    """After the run: the task's report (`Task.report`) over the whole output, written as
    OUTPUT/_<name>.json and .md; print the run summary and the report's table; draw
    --save-overlays; say where the results are. Returns the job's exit status: 1, saying why,
    when every row this run wrote is an error row or more than --max-error-fraction are."""
    from pipeline.overlays import save_overlays
    from pipeline.report import format_table, write_report
    from pipeline.resume import read_output

    files = "Parquet and _summary.json"
    report = config.processor.task.report
    scores = None
    if report is not None:
        scores = report.summarize(read_output(config.output, columns=list(report.columns)))
        json_uri, _ = write_report(config.output, report.name, scores, report.markdown(scores))
        files = f"Parquet, _summary.json and {json_uri.rsplit('/', 1)[-1]} (+ .md)"
    print()
    print(summary.format_table())
    if report is not None:
        print()
        print(format_table(report.title, report.rows(scores)))
    if args.save_overlays:
        written = save_overlays(config.output, args.save_overlays, config.processor.task.expand,
                                config.processor.decode_config())
        print(f"{len(written)} overlay(s) under {config.output}/_overlays")
    print(f"{files} under {config.output}")
    reason = summary.failure(config.max_error_fraction)
    if reason is not None:
        print(f"job failed: {reason}", file=sys.stderr)
        return 1
    return 0
