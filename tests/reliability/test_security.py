"""Issue 5.6: weights load with `weights_only=True`, nothing uses `trust_remote_code`,
credentials from the environment appear in no log, summary or Parquet file, output paths stay
under the given prefix whatever the ids, and ruff's security rules (flake8-bandit, `S`) pass."""

from __future__ import annotations

import ast
import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from flexattn.loading import read_weights
from pipeline.overlays import OVERLAY_DIR, save_overlays
from pipeline.run import JobConfig, run
from pipeline.storage import REDACTED, RedactingFormatter, redact_secrets_in_logs
from tests.helpers import REPO, noise_image
from tests.reliability.jobproc import job_command, job_env

SOURCE_DIRS = ("flexattn", "pipeline", "jobs", "bench", "samples")
# Recognisable fake credentials: if any of them shows up anywhere, something leaked it.
FAKE = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEKEYID7Q3ZX9W2",
    "AWS_SECRET_ACCESS_KEY": "fakeSECRET/do-not-log/7f3c9b2e1d4a6f8e0c5b",
    "AWS_SESSION_TOKEN": "fakeSESSIONtoken/do-not-log/0a1b2c3d4e5f",
}


def _sources() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py"))


def test_ruff_security_rules_are_clean():
    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run([str(ruff), "check", "--select", "S", "--no-cache", "flexattn",
                             "pipeline", "jobs"], cwd=REPO, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All checks passed" in result.stdout


def test_every_torch_load_is_weights_only_and_nothing_trusts_remote_code():
    loads, remote = [], []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            kwargs = {k.arg: k.value for k in node.keywords}
            if isinstance(func, ast.Attribute) and func.attr == "load" and \
                    isinstance(func.value, ast.Name) and func.value.id == "torch":
                flag = kwargs.get("weights_only")
                loads.append((path.name, node.lineno,
                              isinstance(flag, ast.Constant) and flag.value is True))
            value = kwargs.get("trust_remote_code")
            if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                remote.append((path.name, node.lineno))
        text = path.read_text()
        for lineno, line in enumerate(text.splitlines(), 1):  # any other spelling of it
            code = line.split("#", 1)[0]
            if "trust_remote_code" in code and "trust_remote_code=False" not in code and \
                    "``trust_remote_code``" not in code:
                remote.append((path.name, lineno))
    assert loads, "expected the .bin loader's torch.load calls"
    assert [(f, n) for f, n, ok in loads if not ok] == []
    assert remote == []


def test_a_pickle_payload_in_bin_weights_is_refused(tmp_path):
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # harmless, but proves code ran if it did

    for name, save in (("zip", lambda obj, f: torch.save(obj, f)),
                       ("legacy", lambda obj, f: pickle.dump(obj, f))):
        folder = tmp_path / name
        folder.mkdir()
        with open(folder / "pytorch_model.bin", "wb") as f:
            save({"w": torch.zeros(2), "x": Payload()}, f)
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            read_weights(folder)
        assert not marker.exists()


def test_log_redaction_covers_messages_arguments_and_tracebacks(monkeypatch):
    for name, value in FAKE.items():
        monkeypatch.setenv(name, value)
    logger = logging.getLogger("tests.reliability.redaction")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        assert redact_secrets_in_logs(logger) == 1
        assert isinstance(handler.formatter, RedactingFormatter)
        logger.warning("header X-Amz-Security-Token: %s", FAKE["AWS_SESSION_TOKEN"])
        try:
            raise ValueError(f"bad key {FAKE['AWS_SECRET_ACCESS_KEY']}")
        except ValueError:
            logger.exception("failed with %s", FAKE["AWS_ACCESS_KEY_ID"])
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert text.count(REDACTED) == 3 and "ValueError: bad key ***" in text
    assert not any(v in text for v in FAKE.values())


def _leaks(data: bytes) -> list[str]:
    return [name for name, value in FAKE.items() if value.encode() in data]


@pytest.mark.slow
def test_credentials_never_reach_logs_summaries_or_parquet(s3, pipeline_env, demo_model,
                                                            tmp_path):
    import ray

    ray.shutdown()  # the job starts its own Ray below
    buf = io.BytesIO()
    noise_image(500, 300, seed=1).save(buf, format="JPEG")
    s3.put_object(Bucket=s3.bucket, Key="in/good.jpg", Body=buf.getvalue())
    s3.put_object(Bucket=s3.bucket, Key="in/broken.jpg", Body=b"\xff\xd8\xff broken")
    manifest = [{"id": name, "image_uri": f"{name}.jpg"} for name in ("good", "broken", "gone")]
    s3.put_object(Bucket=s3.bucket, Key="in/manifest.jsonl",
                  Body="".join(json.dumps(r) + "\n" for r in manifest).encode())
    env, ray_tmp = job_env(**FAKE)  # moto takes any credentials; these are the job's
    try:
        # DEBUG: botocore then logs every request's headers, session token included.
        result = subprocess.run(
            job_command("caption_remote_sensing.py", "--input",
                        f"s3://{s3.bucket}/in/manifest.jsonl", "--output",
                        f"s3://{s3.bucket}/out", "--model", str(demo_model),
                        "--max-new-tokens", "2", "--memory-per-actor-gb", "0.5",
                        "--log-level", "DEBUG"),
            env=env, capture_output=True, timeout=300, check=False)
        log = result.stdout + result.stderr
        assert result.returncode == 0, log[-4000:].decode(errors="replace")
        assert b"DEBUG botocore" in log and b"X-Amz-Security-Token" in log  # headers logged ...
        assert _leaks(log) == []  # ... with the credentials redacted
        ray_logs = [p for p in ray_tmp.rglob("*") if p.is_file() and not p.is_symlink()]
        assert len(ray_logs) > 10
        assert {p.name: _leaks(p.read_bytes()) for p in ray_logs if _leaks(p.read_bytes())} == {}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3.bucket)["Contents"]]
    written = [k for k in keys if not k.startswith("in/")]
    assert written and all(k.startswith("out/") for k in written)  # under the prefix only
    for key in written:  # every Parquet file and the summary, byte for byte
        assert _leaks(s3.get_object(Bucket=s3.bucket, Key=key)["Body"].read()) == [], key
    summary = json.loads(s3.get_object(Bucket=s3.bucket, Key="out/_summary.json")["Body"].read())
    assert summary["rows_written"] == 3 and summary["errors_by_stage"] == {"decode": 1, "read": 1}


def test_output_stays_under_the_given_prefix_whatever_the_ids(ray_local, demo_model, tmp_path):
    (tmp_path / "in").mkdir()
    noise_image(400, 300, seed=3).save(tmp_path / "in" / "img.jpg")
    evil = ["../../escape", str(tmp_path / "abs_evil"), "a/../../b", "..", ".", "",
            "s3://another-bucket/x", "~/home", "sub/dir/ok", "_summary.json", ".hidden"]
    evil.remove("")  # an empty id is refused by the manifest reader; keep the rest
    manifest = tmp_path / "in" / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"id": i, "image_uri": "img.jpg"}) + "\n"
                                for i in evil))
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "work" / "out"
    summary = run(JobConfig(input=str(manifest), output=str(out), model=str(demo_model),
                            max_new_tokens=1, batch_size=4, memory_per_actor_gb=0.5))
    written = save_overlays(str(out), n=len(evil))

    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(p == out.parent or out in (p, *p.parents) for p in new), sorted(new)
    assert len(written) == len(evil)
    assert all(os.path.dirname(w) == f"{out}/{OVERLAY_DIR}" for w in written)
    table = pq.read_table(out)
    assert sorted(table.column("id").to_pylist()) == sorted(evil)  # ids kept verbatim
    assert table.column("error").null_count == len(evil)
    assert summary.rows_written == len(evil) and summary.rows_ok == len(evil)
