"""`make run` at the tiny scale, read as a new user reads it: every stage runs, the output ends with one summary,
no finished progress bar is redrawn later, and no WARNING or ERROR line reaches the terminal."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SYSTEM = re.compile(r"\((raylet|pid=gcs_server)\)")  # a line Ray's own daemons sent to the driver
BAR = re.compile(r"epoch \d+/\d+: ")  # a tqdm_ray training bar: "psu epoch 1/1: 1.2ksamples [00:03, ...]"


@pytest.mark.slow
@pytest.mark.ownray
def test_tiny_run_ends_with_one_summary_and_shows_no_stale_bars_or_warnings(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "jobs.run_all",
        "--out",
        str(tmp_path / "demo"),
        "--scale",
        "tiny",
        "--pretrain-epochs",
        "1",
        "--epochs",
        "1",
        "--port",
        "8471",
    ]
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=1500,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-5000:]
    lines = [part for line in out.splitlines() for part in line.split("\r") if part.strip()]

    before, summaries = out.split("=== summary ===")[0], out.split("=== summary ===")[1:]
    assert len(summaries) == 1, "one summary, at the end"
    summary = summaries[0]
    for expected in (
        "stage times: prepare",
        "test metrics (seminar",
        "ndcg@10",
        "scored request: user",
        "answer (HTTP 200): scores [",
        "outputs: data",
        "Ray's logs",
    ):
        assert expected in summary, (expected, summary)

    assert not BAR.search(summary), "a closed bar was redrawn after the run ended"
    after_pretrain = before.split("=== finetune ===")[1]
    assert "psu epoch" not in after_pretrain, "the pretraining bar was redrawn during later stages"
    # Ray's system daemons (raylet, GCS) push their own warnings to every driver, e.g. about worker start-up on a
    # loaded machine; they are Ray's to word and outside what a job can route. Everything else must be quiet.
    noisy = [line for line in lines if re.search(r"\b(WARNING|ERROR)\b", line) and not SYSTEM.search(line)]
    assert not noisy, noisy
    assert (tmp_path / "demo" / "logs" / "ray.log").exists(), "Ray's own log lines went to the run's log files"
