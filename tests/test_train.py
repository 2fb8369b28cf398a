"""Ray Train jobs: local-mode training, resume by run name, pretrain → finetune, evaluation and bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from seminar_ray.data.errors import DataError
from seminar_ray.models import ModelConfig
from seminar_ray.runs import resolve_checkpoint, run_checkpoints
from seminar_ray.train.job import TrainJob, check_placement, run_training

CFG = ModelConfig.preset("small", max_len=32, K=8, qin_k1=16, qin_k2=8, din_recent=8, batch=32)


def _job(tiny_data, tmp_path, kind="seminar", **kw) -> TrainJob:
    model = CFG.replace(pretrained=kind == "seminar" and kw.get("pretrained") is not None).to_dict()
    return TrainJob(
        kind=kind,
        data=str(tiny_data),
        storage_path=str(tmp_path / "runs"),
        run_name=kw.pop("run_name", kind),
        model=model,
        epochs=kw.pop("epochs", 2),
        num_workers=kw.pop("num_workers", 0),
        samples_per_user=2,
        **kw,
    )


@pytest.fixture(scope="module")
def psu_run(ray_local, tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("psu")
    return run_training(_job(tiny_data, tmp, "psu", epochs=1))


def test_pretrain_then_finetune_in_local_mode_keeps_the_best_checkpoint(ray_local, tiny_data, tmp_path, psu_run):
    assert psu_run["epochs"] == 1 and 0.0 <= psu_run["best"]["ndcg@10"] <= 1.0
    summary = run_training(_job(tiny_data, tmp_path, pretrained=psu_run["run_dir"]))
    run_dir = tmp_path / "runs" / "seminar"
    assert summary["epochs"] == 2 and len(run_checkpoints(run_dir)) == 2
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert [h["epoch"] for h in saved["history"]] == [1, 2]
    assert {"ndcg@10", "hr@10", "mrr", "auc", "train_loss", "train_samples_per_s"} <= set(saved["history"][0])
    assert (run_dir / "curves.png").stat().st_size > 1000
    best = resolve_checkpoint(run_dir)
    assert json.loads((best / "metrics.json").read_text())["ndcg@10"] == max(h["ndcg@10"] for h in saved["history"])


def test_rerun_with_the_same_run_name_resumes_after_its_last_epoch(ray_local, tiny_data, tmp_path):
    first = run_training(_job(tiny_data, tmp_path, "din", epochs=1))
    resumed = run_training(_job(tiny_data, tmp_path, "din", epochs=3))
    assert resumed["epochs"] == 3
    assert resumed["history"][0] == first["history"][0], "epoch 1 was not trained again"
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]


def test_evaluation_of_a_run_writes_test_metrics(ray_local, tiny_data, tmp_path, psu_run):
    from seminar_ray.train.evaluation import evaluate_checkpoint, write_metrics

    out = tmp_path / "eval"
    write_metrics(evaluate_checkpoint(psu_run["run_dir"], "test", actors=1), out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"hr@10", "ndcg@10", "mrr", "auc", "gauc"} <= set(metrics) and metrics["split"] == "test"
    assert all(isinstance(metrics[k], float) for k in ("hr@10", "ndcg@10", "mrr", "auc"))
    assert metrics["search"]["targets"] + metrics["browse"]["targets"] == metrics["targets"]


def test_bad_inputs_fail_before_any_training_starts(ray_local, tiny_data, tmp_path, psu_run):
    with pytest.raises(ValueError, match="holds a 'din' model, --pretrained needs a 'psu'"):
        din = run_training(_job(tiny_data, tmp_path, "din", epochs=1, run_name="d"))
        _job(tiny_data, tmp_path, pretrained=din["run_dir"]).check_inputs()
    broken = tmp_path / "broken"
    shutil.copytree(tiny_data, broken)
    (broken / "queries.parquet").unlink()
    with pytest.raises(DataError, match="missing table 'queries'"):
        run_training(_job(broken, tmp_path))
    with pytest.raises(ValueError, match="cannot be placed"):
        check_placement(_job(tiny_data, tmp_path, num_workers=64, cpus_per_worker=1.0))
    with pytest.raises(ValueError, match="pretrained=true but no PSU checkpoint"):
        TrainJob(
            **{**_job(tiny_data, tmp_path).__dict__, "model": CFG.replace(pretrained=True).to_dict()}
        ).check_inputs()
    with pytest.raises(FileNotFoundError, match="no such checkpoint or run directory"):
        resolve_checkpoint(tmp_path / "nowhere")


def test_checkpoint_of_other_data_rejected(ray_local, tiny_data, tmp_path, psu_run):
    from dataclasses import replace

    from seminar_ray.data.entities import EntityTables
    from seminar_ray.data.synthetic import SyntheticConfig, generate_to_dir
    from seminar_ray.models import load_checkpoint

    other = generate_to_dir(replace(SyntheticConfig.preset("tiny"), num_items=700, num_users=20), tmp_path / "other")
    with pytest.raises(ValueError, match="trained on other entity tables"):
        load_checkpoint(resolve_checkpoint(psu_run["run_dir"]), EntityTables.load(other))


def _kill_rank0_once_at_step_2_of_epoch_2(job: TrainJob, rank: int, epoch: int):
    """A TrainJob step hook: SIGKILL the rank-0 worker at its second step of epoch 2, once per run (a marker file)."""
    if rank != 0 or epoch != 1:
        return None
    marker = Path(job.storage_path) / f".{job.run_name}.fault-injected"
    steps = [0]

    def on_step(_n: int, _loss: float) -> None:
        steps[0] += 1
        if steps[0] == 2 and not marker.exists():
            marker.write_text("2")
            os.kill(os.getpid(), signal.SIGKILL)

    return on_step


@pytest.mark.slow
def test_two_worker_ddp_survives_a_killed_worker(ray_local, tiny_data, tmp_path):
    """Rank 0 is SIGKILLed mid-epoch 2; FailureConfig restarts the group, which resumes from epoch 1's checkpoint."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hook travels to the workers by value
    job = _job(
        tiny_data,
        tmp_path,
        "sim",
        epochs=3,
        num_workers=2,
        cpus_per_worker=0.5,
        max_failures=1,
        step_hook=_kill_rank0_once_at_step_2_of_epoch_2,
    )
    job.samples_per_user = 4
    summary = run_training(job)
    marker = tmp_path / "runs" / ".sim.fault-injected"
    assert marker.exists(), "the fault was injected"
    epochs = [m.get("epoch") for _, m in run_checkpoints(tmp_path / "runs" / "sim")]
    assert summary["epochs"] == 3 and [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    assert sorted(epochs) == [1, 2, 3], "one checkpoint per epoch: nothing was trained twice after the restart"
