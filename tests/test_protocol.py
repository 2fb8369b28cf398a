"""The evaluation protocol behind every table: one eval seed for all models, fixed validation users, checkpoint
selection by one rule, and a training run that stops on a non-finite loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from seminar_ray.models import DIN, MODELS, ModelConfig
from seminar_ray.rule_rankers import evaluate_rule
from seminar_ray.runs import HISTORY_FILE, resolve_checkpoint, run_checkpoints
from seminar_ray.train.evaluation import evaluate_checkpoint
from seminar_ray.train.job import TrainJob, run_training

CFG = ModelConfig.preset("small", max_len=32, din_recent=8, batch=32)


def _job(data, tmp_path, seed: int, epochs: int, run_name: str, kind: str = "din", **kw) -> TrainJob:
    return TrainJob(
        kind=kind,
        data=str(data),
        storage_path=str(tmp_path / "runs"),
        run_name=run_name,
        model=CFG.replace(seed=seed).to_dict(),
        epochs=epochs,
        num_workers=0,
        samples_per_user=2,
        **kw,
    )


def _history(run_dir) -> list[dict]:
    return json.loads((Path(run_checkpoints(run_dir)[-1][0]) / HISTORY_FILE).read_text())


def test_models_of_other_seeds_rank_the_same_users_and_candidates(ray_local, tiny_data, tmp_path):
    a = run_training(_job(tiny_data, tmp_path, seed=0, epochs=2, run_name="a", eval_users=20))
    b = run_training(_job(tiny_data, tmp_path, seed=1, epochs=1, run_name="b", eval_users=20))
    history = _history(a["run_dir"]) + _history(b["run_dir"])
    assert {h["valid"]["targets"] for h in history} == {20}
    assert len({h["valid_candidates"] for h in history}) == 1, "the same validation users and negatives every epoch"
    assert {h["eval_seed"] for h in history} == {0}
    tests = [evaluate_checkpoint(run["run_dir"], "test", actors=1, per_target=True) for run in (a, b)]
    tests.append(evaluate_rule("popularity", tiny_data, "test"))
    assert len({t["candidates_digest"] for t in tests}) == 1, "every model and the rule rank identical candidate lists"
    assert tests[0]["ndcg@10"] != tests[1]["ndcg@10"], "the two seeds did train different models"
    kept = [t["per_target"] for t in tests[:2]]
    assert kept[0]["user_id"] == kept[1]["user_id"] == sorted(kept[0]["user_id"]), "paired target by target"
    assert [sum(k["ndcg@10"]) / len(k["ndcg@10"]) for k in kept] == pytest.approx([t["ndcg@10"] for t in tests[:2]])
    assert {t["eval_seed"] for t in tests} == {0}
    counts = [{k: m["targets"] for k, m in t["by_history_length"].items()} for t in [*tests, history[0]["valid"]]]
    assert counts[0] == counts[1] == counts[2], "the Ray Data scorer and the rule read the same history lengths"
    assert sum(counts[0].values()) == tests[0]["targets"] and sum(counts[3].values()) == 20


class _AscendingDIN(DIN):
    """DIN trained by gradient ascent: every step makes the model worse."""

    def loss(self, batch):
        loss, parts = super().loss(batch)
        return -loss, parts


class _NaNDIN(DIN):
    def loss(self, batch):
        loss, parts = super().loss(batch)
        return loss * float("nan"), parts


def test_a_worse_epoch_does_not_replace_the_best_and_patience_stops_the_run(
    ray_local, tiny_data, tmp_path, monkeypatch
):
    def job(epochs: int) -> TrainJob:  # lr 0.01 and 8 targets per user: epoch 1 learns, so epoch 2 can undo it
        return TrainJob(
            **{
                **_job(tiny_data, tmp_path, seed=0, epochs=epochs, run_name="r", patience=1).__dict__,
                "model": CFG.replace(lr=0.01).to_dict(),
                "samples_per_user": 8,
            }
        )

    first = run_training(job(1))
    monkeypatch.setitem(MODELS, "din", _AscendingDIN)  # the re-run resumes epoch 1's checkpoint, then ruins it
    summary = run_training(job(5))
    epoch1, epoch2 = summary["history"]  # epoch 2 did not improve: patience 1 stopped the run below its cap of 5
    assert epoch1 == first["history"][0] and epoch2["ndcg@10"] < epoch1["ndcg@10"] - 0.02
    assert (summary["best_epoch"], summary["stopped_early"], summary["max_epochs"]) == (1, True, 5)
    best = resolve_checkpoint(summary["run_dir"])
    assert json.loads((best / "metrics.json").read_text())["epoch"] == 1
    assert sorted(m["epoch"] for _, m in run_checkpoints(summary["run_dir"])) == [1, 2], "the last epoch is kept too"
    again = run_training(job(8))  # resuming a stopped run trains nothing more
    assert again["history"] == summary["history"] and again["stopped_early"] and again["best_epoch"] == 1
    assert sorted(m["epoch"] for _, m in run_checkpoints(summary["run_dir"])) == [1, 2]


def test_the_stopping_rule_counts_epochs_without_a_strictly_better_score():
    from seminar_ray.runs import SELECT_KEY, stops_early

    def history(*scores: float) -> list[dict]:
        return [{SELECT_KEY: s} for s in scores]

    assert not stops_early(history(0.1, 0.2, 0.3), 1)
    assert stops_early(history(0.1, 0.3, 0.3), 1), "a tie is no improvement"
    assert stops_early(history(0.3, 0.2, 0.1), 2) and not stops_early(history(0.3, 0.2, 0.1), 3), "3 epochs: no 4th"
    assert stops_early(history(0.1, 0.5, 0.2, 0.4, 0.3), 3) and not stops_early(history(0.1, 0.5, 0.2, 0.4, 0.6), 3)
    assert not stops_early(history(0.5, 0.1, 0.1, 0.1), 0), "patience 0: no early stopping"
    assert not stops_early(history(*range(1, 9)), 1), "a PSU's score is its epoch: it never stops"


def _decide_on_two_ranks(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    from seminar_ray.train.job import _agreed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out.put((rank, _agreed(rank == 0), _agreed(False)))
    finally:
        dist.destroy_process_group()


def test_every_rank_follows_rank_0s_stopping_decision():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.start_processes(_decide_on_two_ranks, args=(port, out), nprocs=2, start_method="spawn")
    assert sorted(out.get(timeout=5) for _ in range(2)) == [(0, True, False), (1, True, False)]


def test_eval_neg_sets_validation_and_test_candidates_alike(ray_local, tiny_data, tmp_path):
    from seminar_ray.data.pipeline import sample_config
    from seminar_ray.data.schema import read_table
    from seminar_ray.data.splits import SequenceBatch, eval_batch

    seqs = SequenceBatch.from_arrow(read_table(tiny_data, "sequences"))
    assert eval_batch(seqs, "test", sample_config(tiny_data, eval_neg=20))["target_items"].shape[1] == 21
    run = run_training(_job(tiny_data, tmp_path, seed=0, epochs=1, run_name="n20", eval_users=20, eval_neg=20))
    assert run["eval_neg"] == 20 and {h["eval_neg"] for h in _history(run["run_dir"])} == {20}
    test = evaluate_checkpoint(run["run_dir"], "test", actors=1)  # default: as many as the run was validated with
    rule = evaluate_rule("popularity", tiny_data, "test", eval_neg=20)
    assert test["eval_neg"] == rule["eval_neg"] == 20 and test["candidates_digest"] == rule["candidates_digest"]
    assert rule["candidates_digest"] != evaluate_rule("popularity", tiny_data, "test")["candidates_digest"]
    with pytest.raises(ValueError, match="--eval-neg 0: each evaluation target needs at least 1 negative"):
        evaluate_rule("popularity", tiny_data, "test", eval_neg=0)


def test_a_psu_run_selects_its_last_epoch(ray_local, tiny_data, tmp_path):
    """The align-only ablation trains no next-pair head, so its validation ranking cannot choose an epoch."""
    job = _job(tiny_data, tmp_path, seed=0, epochs=2, run_name="psu", kind="psu")
    job.model = CFG.replace(use_next=False, use_rel=False).to_dict()
    summary = run_training(job)
    assert summary["best_epoch"] == 2
    assert json.loads((resolve_checkpoint(summary["run_dir"]) / "metrics.json").read_text())["epoch"] == 2


def test_a_non_finite_loss_stops_the_run_with_a_clear_error(ray_local, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(MODELS, "din", _NaNDIN)
    # local mode raises in this process; with workers, run_training re-raises Ray Train's error as a RuntimeError
    with pytest.raises((FloatingPointError, RuntimeError), match=r"loss became nan at step 0: lower the learning"):
        run_training(_job(tiny_data, tmp_path, seed=0, epochs=1, run_name="nan"))
    assert run_checkpoints(tmp_path / "runs" / "nan") == [], "no checkpoint of the broken epoch was written"


def test_epoch_loss_is_the_sample_weighted_mean_of_step_losses():
    from torch import nn

    from seminar_ray.train.loop import train_one_epoch

    class Fixed(nn.Module):  # loss = the batch's value, parts as model.loss returns them ("loss" included)
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, batch):
            loss = self.w + batch["value"][0]
            return loss, {"ctr": float(loss), "loss": float(loss)}

    batches = [
        {"value": torch.tensor([1.0]), "labels": torch.zeros(2, 5)},
        {"value": torch.tensor([4.0]), "labels": torch.zeros(6, 5)},
    ]
    net = Fixed()
    stats = train_one_epoch(net, batches, torch.optim.SGD(net.parameters(), lr=0.0))
    assert stats["loss"] == pytest.approx((2 * 1.0 + 6 * 4.0) / 8) and stats["ctr"] == stats["loss"]


def _record_rows(partial: Path, prefix: str, n: int) -> None:
    from jobs.compare import record_finished

    for i in range(n):
        record_finished(partial, f"{prefix}/{i}", {"ndcg@10": i / n})


def test_compare_processes_sharing_one_out_keep_every_finished_row(tmp_path):
    """Two compare processes (say one per core, with disjoint --variants) write OUT/compare_partial.json in turn:
    each re-reads it under a lock, so neither drops the rows the other finished."""
    import multiprocessing

    partial = tmp_path / "compare_partial.json"
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_record_rows, args=(partial, name, 40)) for name in ("SEMINAR", "DIN")]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    assert [w.exitcode for w in writers] == [0, 0]
    done = json.loads(partial.read_text())
    assert sorted(done) == sorted(f"{name}/{i}" for name in ("SEMINAR", "DIN") for i in range(40))


def test_compare_states_each_rows_training_time_summed_over_resumed_segments():
    """A row's minutes are the sum of its epochs' training seconds, however many processes ran them; rows recorded
    before the times were kept still print their epochs."""
    from jobs.compare import train_seconds, training_lines

    summary = {"history": [{"train_seconds": 600.0}, {"train_seconds": 1200.0}]}  # say, two sessions
    assert train_seconds(summary) == 1800.0
    timed = {"epochs": 2, "best_epoch": 2, "stopped_early": False, "train_seconds": 1800.0, "pretrain_seconds": 660.0}
    old = {"epochs": 9, "best_epoch": 4, "stopped_early": True}
    text = training_lines({"SEMINAR": [timed, old], "Popularity": [{}]})
    assert "- SEMINAR: 2 (best 2, hit the cap, 30 min + PSU 11 min), 9 (best 4)\n" in text
    assert "Popularity" not in text


def _row(ndcg: list[float], users: list[int]) -> dict:
    return {"ndcg@10": sum(ndcg) / len(ndcg), "per_target": {"user_id": users, "ndcg@10": ndcg}}


def test_compare_pairs_seminar_with_each_row_on_the_same_test_targets():
    """The paired lines under a table: SEMINAR's per-target NDCG@10 (averaged over seeds) minus another row's, ± the
    standard error over targets; rows without per-target figures (the rules, older rows) are left out, and rows
    that kept different targets are an error rather than a wrong pairing."""
    from jobs.compare import paired

    users = [1, 2, 3, 4]
    per_seed = {
        "SEMINAR": [_row([1.0, 1.0, 0.5, 0.0], users), _row([1.0, 0.5, 0.5, 0.0], users)],
        "DIN": [_row([1.0, 0.5, 0.0, 0.0], users), _row([0.5, 0.5, 0.0, 0.0], users)],
        "Popularity": [{"ndcg@10": 0.2}] * 2,
    }
    (line,) = paired(per_seed)
    # seed means: SEMINAR [1, .75, .5, 0], DIN [.75, .5, 0, 0] → differences [.25, .25, .5, 0], mean .25
    assert line.startswith("SEMINAR − DIN: +0.2500 ± 0.1021 NDCG@10 (paired over the 4 test targets, 2 seed(s)")
    per_seed["DIN"][1] = _row([0.5, 0.5, 0.0, 0.0], [1, 2, 3, 5])
    with pytest.raises(RuntimeError, match="different test targets"):
        paired(per_seed)


def test_synthetic_tables_have_the_generators_oracle_as_their_ceiling(tiny_data, tmp_path):
    """The Oracle rule ranks the same candidates as every model with the generator's own probabilities; it exists only
    where the data carries its generator's truth, and the verdict lines never judge SEMINAR against it."""
    import shutil

    from jobs.compare import rule_rows, verdict
    from seminar_ray.errors import InputError

    oracle, popularity = evaluate_rule("oracle", tiny_data), evaluate_rule("popularity", tiny_data)
    assert oracle["candidates_digest"] == popularity["candidates_digest"]
    assert oracle["ndcg@10"] > popularity["ndcg@10"] + 0.3
    assert evaluate_rule("oracle", tiny_data, "valid")["ndcg@10"] > popularity["ndcg@10"] + 0.3
    assert rule_rows(tiny_data)["Oracle"] == "oracle"
    real = Path(shutil.copytree(tiny_data, tmp_path / "real", ignore=shutil.ignore_patterns("truth.npz")))
    assert "Oracle" not in rule_rows(real)
    with pytest.raises(InputError, match="truth.npz not found: the oracle rule needs the synthetic generator's truth"):
        evaluate_rule("oracle", real)
    with pytest.raises(InputError, match="unknown rule 'bogus'"):
        evaluate_rule("bogus", tiny_data)
    agg = {n: {"ndcg@10": (m, 0.01)} for n, m in (("SEMINAR", 0.5), ("DIN", 0.4), ("Oracle", 0.9))}
    assert [line.split(":")[0] for line in verdict(agg, seeds=2)] == ["SEMINAR 0.5000 vs DIN 0.4000"]
