"""jobs/caption_remote_sensing.py: flags, S3 end to end (real moto server), `ray job submit`
against a real `ray start --head`, and `make demo` from a clean copy of the tree."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.fs
import pyarrow.parquet as pq
import pytest

from jobs.caption_remote_sensing import main, parse_config
from pipeline import CAPTION
from pipeline.columns import OUTPUT_SCHEMA, output_schema
from tests.helpers import REPO, free_port, noise_image

VENV_BIN = Path(sys.executable).parent


def _upload_images(s3, prefix: str) -> list[str]:
    """Four images (two formats, one portrait) and one corrupt file under `prefix`."""
    names = []
    for i, (w, h, fmt) in enumerate([(900, 600, "JPEG"), (640, 1000, "PNG"),
                                     (1200, 500, "JPEG"), (700, 700, "PNG")]):
        name = f"scene{i}.{'jpg' if fmt == 'JPEG' else 'png'}"
        buf = io.BytesIO()
        noise_image(w, h, seed=i).save(buf, format=fmt)
        s3.put_object(Bucket=s3.bucket, Key=f"{prefix}/{name}", Body=buf.getvalue())
        names.append(name)
    s3.put_object(Bucket=s3.bucket, Key=f"{prefix}/scene9_corrupt.jpg", Body=b"\xff\xd8 broken")
    return sorted(names + ["scene9_corrupt.jpg"])


def _read_s3_output(env, bucket: str, prefix: str):
    fs = pyarrow.fs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key="testing",
                                 secret_key="testing", region="us-east-1")
    table = pq.read_table(f"{bucket}/{prefix}", filesystem=fs)
    with fs.open_input_stream(f"{bucket}/{prefix}/_summary.json") as f:
        summary = json.loads(f.read())
    return table, summary


def _check_output(table, summary, names):
    assert table.schema == output_schema(CAPTION.extra_fields)
    assert table.schema.names[:len(OUTPUT_SCHEMA)] == OUTPUT_SCHEMA.names
    ids = table.column("id").to_pylist()
    assert sorted(ids) == names and len(set(ids)) == len(ids)  # every input exactly once
    rows = {r["id"]: r for r in table.to_pylist()}
    assert rows["scene9_corrupt.jpg"]["error_stage"] == "decode"
    assert rows["scene9_corrupt.jpg"]["answer"] is None
    assert rows["scene9_corrupt.jpg"]["tflops"] is None
    for name in names[:-1]:
        assert rows[name]["error"] is None, rows[name]["error"]
        assert rows[name]["answer"] is not None and rows[name]["generated_tokens"] >= 1
        assert len(rows[name]["hr_cells"]) == 81
        assert rows[name]["tflops"] > 0  # analytical cost of the row (flexattn.flops)
    assert rows["scene1.png"]["width"] == 640 and rows["scene1.png"]["height"] == 1000
    assert summary["rows_written"] == len(names) and summary["errors_by_stage"] == {"decode": 1}


def test_defaults_are_the_embedded_demo():
    config, _ = parse_config([])
    assert config.input == str(REPO / "samples" / "remote_sensing")
    assert config.output == "outputs/caption_remote_sensing"
    assert config.model == "demo" and config.task.name == "caption"
    assert config.actors == (1, 1) and config.gpus_per_actor is None


def test_flags_map_to_config_fields():
    config, _ = parse_config([
        "--input", "s3://b/in/", "--output", "s3://b/out/", "--actors", "2,6",
        "--gpus-per-actor", "1", "--batch-size", "8", "--mode", "lowres", "--limit", "10",
        "--max-new-tokens", "32", "--prompt", "Count the ships.", "--overwrite",
        "--vision-tower", "/models/clip",
    ])
    assert (config.input, config.output, config.actors) == ("s3://b/in/", "s3://b/out/", (2, 6))
    assert (config.gpus_per_actor, config.batch_size, config.mode) == (1.0, 8, "lowres")
    assert (config.limit, config.max_new_tokens, config.overwrite) == (10, 32, True)
    assert config.prompt == "Count the ships." and config.vision_tower == "/models/clip"


@pytest.mark.parametrize("argv,flag", [
    (["--batch-size", "0"], "--batch-size"),
    (["--actors", "3,1"], "--actors"),
    (["--actors", "many"], "--actors"),
    (["--mode", "turbo"], "--mode"),
    (["--gpus-per-actor", "lots"], "--gpus-per-actor"),
    (["--limit", "0"], "--limit"),
    (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--batch-size", "x"], "--batch-size"),
    (["--image-size", "672"], "--image-size"),  # the demo model's highres_size is 1008
])
def test_bad_flags_exit_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(argv)
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("argv,flag", [
    (["--max-error-fraction", "1.5"], "--max-error-fraction"),
    (["--rows-per-file", "0"], "--rows-per-file"),
])
def test_new_flags_exit_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(argv)
    assert exc.value.code == 2 and flag in capsys.readouterr().err


def test_image_size_must_match_the_checkpoint_highres_size(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llava_llama", "extra": {"highres_size": "672", "lowres_size": "224"}}))
    with pytest.raises(SystemExit) as exc:
        parse_config(["--model", str(tmp_path)])  # --image-size defaults to 1008
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--image-size" in err and "672" in err
    config, _ = parse_config(["--model", str(tmp_path), "--image-size", "672"])
    assert config.decode_config().image_size == 672


def test_a_run_whose_rows_all_fail_exits_1_after_writing_them(ray_local, demo_model, tmp_path,
                                                              capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"\xff\xd8 broken")
    (tmp_path / "in" / "b.png").write_bytes(b"")
    argv = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
            "--model", str(demo_model), "--max-new-tokens", "1", "--memory-per-actor-gb", "0.5"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "run summary" in captured.out
    assert "job failed: all 2 rows written by this run are errors (decode=2)" in captured.err
    table = pq.read_table(tmp_path / "out")
    assert sorted(table.column("id").to_pylist()) == ["a.jpg", "b.png"]  # written all the same
    assert main(argv) == 0  # a rerun writes nothing new: nothing failed


def test_caption_job_s3_to_s3(ray_local, s3, pipeline_env, demo_model, capsys):
    names = _upload_images(s3, "tiles")
    argv = ["--input", f"s3://{s3.bucket}/tiles/", "--output", f"s3://{s3.bucket}/captions",
            "--model", str(demo_model), "--max-new-tokens", "4", "--batch-size", "2",
            "--memory-per-actor-gb", "0.5"]
    start = time.perf_counter()
    assert main(argv) == 0
    elapsed = time.perf_counter() - start
    printed = capsys.readouterr().out
    assert "run summary" in printed and re.search(r"errors +1 \(decode=1\)", printed)
    table, summary = _read_s3_output(pipeline_env, s3.bucket, "captions")
    _check_output(table, summary, names)
    print(f"S3 caption job: {len(names)} rows in {elapsed:.1f}s "
          f"({len(names) / elapsed:.2f} rows/s end to end; summary {summary['images_per_s']})")

    # A rerun finds everything written: nothing new, still exactly once.
    assert main(argv) == 0
    table, summary = _read_s3_output(pipeline_env, s3.bucket, "captions")
    assert sorted(table.column("id").to_pylist()) == names
    assert summary["rows_written"] == 0 and summary["rows_skipped"] == len(names)


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the `ray start --block` we launched, then anything left in its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_ray_job_submit_against_ray_start_head(s3, pipeline_env, demo_model, tmp_path):
    names = _upload_images(s3, "in")
    token = tmp_path / "token"
    token.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
    env = dict(os.environ)
    env.update({
        "PATH": f"{VENV_BIN}{os.pathsep}{env['PATH']}",
        # What a user does for a cluster with token auth: turn it on and point every Ray
        # process and CLI at the same token.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM: stop now, no 30 s drain
    })
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    temp_dir = Path(os.path.realpath("/tmp")) / f"rt{uuid.uuid4().hex[:6]}"  # short: sockets
    log_file = open(tmp_path / "head.log", "w")  # noqa: SIM115 - closed in finally
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={temp_dir}",
         f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
         f"--metrics-export-port={free_port()}", "--disable-usage-stats"],
        env=env, cwd=tmp_path, start_new_session=True,
        stdout=log_file, stderr=subprocess.STDOUT,
    )
    try:
        submit = [str(VENV_BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}",
                  "--working-dir", ".", "--", "python", "jobs/caption_remote_sensing.py",
                  "--input", f"s3://{s3.bucket}/in/", "--output", f"s3://{s3.bucket}/out",
                  "--max-new-tokens", "2", "--memory-per-actor-gb", "0.5"]
        deadline = time.monotonic() + 120
        while True:  # the dashboard's job server comes up a few seconds after the head
            result = subprocess.run(submit, env=env, cwd=REPO, capture_output=True, text=True,
                                    timeout=400, check=False)
            if result.returncode == 0 or time.monotonic() > deadline:
                break
            if "Connection refused" not in result.stdout + result.stderr:
                break
            time.sleep(2)
        log = result.stdout + result.stderr
        assert result.returncode == 0, log[-4000:]
        assert "succeeded" in log and "run summary" in log
        table, summary = _read_s3_output(pipeline_env, s3.bucket, "out")
        _check_output(table, summary, names)

        # Without the token the cluster refuses the submission.
        env_no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
        env_no_token.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "wrong"})
        denied = subprocess.run(submit, env=env_no_token, cwd=REPO, capture_output=True,
                                text=True, timeout=120, check=False)
        assert denied.returncode != 0
    finally:
        _stop_group(head)
        log_file.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_make_demo_from_a_clean_copy(pipeline_env, tmp_path):
    """`make demo` in a copy of the tree as git would check it out (tracked + unignored
    files), using this venv (the install step is the Makefile's, not under test)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    clone = tmp_path / "clone"
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, clone / rel)
    assert not (clone / "outputs").exists()
    stamp = tmp_path / "installed.stamp"
    stamp.touch()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env["FLEXATTN_HOME"] = str(tmp_path / "flexattn-home")  # the demo model is built anew
    result = subprocess.run(
        ["make", "demo", f"VENV={VENV_BIN.parent}", f"STAMP={stamp}"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "run summary" in result.stdout
    assert re.search(r"rows written +5\n", result.stdout), result.stdout[-2000:]
    table = pq.read_table(clone / "outputs" / "caption_remote_sensing")
    assert table.num_rows == 5 and table.column("error").null_count == 5
    assert (clone / "outputs" / "caption_remote_sensing" / "_summary.json").exists()
