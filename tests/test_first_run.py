"""`make run` at the tiny scale, read as a new user reads it: every stage runs, the output ends with one summary,
no finished progress bar is redrawn later, and none of Ray's own lines (warnings, errors, its workers' output)
reaches the terminal: they are in the run's logs/ (seminar_ray/runtime.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BAR = re.compile(r"epoch \d+/\d+: ")  # a tqdm_ray training bar: "psu epoch 1/1: 1.2ksamples [00:03, ...]"
# Ray's own lines, each kind seen on this terminal before they were routed to the run's logs/:
RAY_LINES = {
    "C++ log line": re.compile(r"\[\d{4}-\d\d-\d\d [\d:,]+ [WEF] \d+ \d+\]"),  # core_worker.cc, network_util.cc
    "torch C++ warning": re.compile(r"\[[WE]\d{4} [\d:.]+ "),  # c10d's socket.cpp in a Ray Train worker
    "Python warning raised in Ray": re.compile(r"/ray/[\w/]+\.py:\d+: \w*Warning"),
    "Ray logger line": re.compile(r"\b(WARNING|ERROR)\b"),
    "Ray daemon line": re.compile(r"\((raylet|autoscaler[^)]*|pid=gcs_server)\)"),  # errors the GCS pushes to drivers
    # a worker's line forwarded by Ray ("(PlacementGroupCleaner pid=1) Failed to query ...") that is not ours
    "worker line": re.compile(r"\((\w+ )?pid=\w+(, ip=[\d.]+)?\)\S* (?!\d\d:\d\d:\d\d (seminar_ray|jobs))"),
}


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
    noisy = {kind: [line for line in lines if pattern.search(line)] for kind, pattern in RAY_LINES.items()}
    assert not any(noisy.values()), {kind: found[:3] for kind, found in noisy.items() if found}
    assert re.search(r"seminar_ray\.train\.job: \[psu\] epoch 1/1 loss", before), "the project's own progress shows"
    logs = tmp_path / "demo" / "logs"
    assert (logs / "ray.log").exists() and (logs / "ray-workers.log").exists(), "Ray's own lines went to logs/"


def test_ray_line_patterns_match_the_lines_they_name():
    seen = {
        "C++ log line": "[2026-12-03 13:00:34,885 E 21720 21777] core_worker.cc:2465: Actor with class name: ...",
        "torch C++ warning": "[W1203 13:00:34.744500651 socket.cpp:207] [c10d] The hostname of the client socket",
        "Python warning raised in Ray": ".venv/lib/python3.11/site-packages/ray/data/_internal/execution/operators/"
        "task_pool_map_operator.py:319: UserWarning: The maximum number of concurrent tasks",
        "Ray logger line": "2026-12-03 13:02:12,247	WARNING authentication_token_setup.py:85 -- Token ...",
        "worker line": "(PlacementGroupCleaner pid=21892) Failed to query Ray Train Controller actor state.",
        "Ray daemon line": "(raylet) Task ServeController.graceful_shutdown failed. There are infinite retries",
    }
    for kind, line in seen.items():
        assert RAY_LINES[kind].search(line), kind
    ours = "(RayTrainWorker pid=24155) 13:02:10 seminar_ray.train.job: [seminar] epoch 1/3 loss 0.9889"
    assert not any(p.search(ours) for p in RAY_LINES.values()), "the project's own worker line is not Ray's"
