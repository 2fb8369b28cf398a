"""Serving core without Ray Serve: stages agree with the model, validation, the fsynced history log (docs/design.md,
Serving)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch

from seminar_ray.data.entities import EntityTables
from seminar_ray.models import load_checkpoint
from seminar_ray.retrieval.index import PQIndex
from seminar_ray.serving import (
    Catalog,
    EventsRequest,
    Limits,
    LogHistoryStore,
    RequestError,
    RetrievalStage,
    ScoreJob,
    ScoreRequest,
    ScoringStage,
    compact_history,
)
from seminar_ray.serving.history import LOG_FILE
from seminar_ray.testing.artefacts import build_artefacts

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    return build_artefacts(tmp_path_factory.mktemp("serving"), num_users=20, min_len=30, max_len=80, model_max_len=64)


@pytest.fixture(scope="module")
def stages(artefacts):
    tables = EntityTables.load(artefacts.data)
    model, _, _ = load_checkpoint(artefacts.checkpoint, tables)
    model.eval()
    return model, RetrievalStage(model, PQIndex.load(artefacts.index)), ScoringStage(model)


def random_history(rng, n_queries, n_items, L):
    return rng.integers(0, n_queries + 1, L), rng.integers(1, n_items + 1, L)


def test_compact_history_keeps_selected_and_recent_in_order():
    hq, hi = np.arange(10) + 100, np.arange(10) + 1
    topk = np.array([[7, 2, -1], [2, 0, 9]])
    cq, ci, remapped = compact_history(hq, hi, topk, recent=2)
    assert ci.tolist() == [1, 3, 8, 9, 10]  # positions 0, 2, 7 selected; 8, 9 recent
    assert cq.tolist() == [100, 102, 107, 108, 109]
    assert (ci[np.maximum(remapped, 0)] == hi[np.maximum(topk, 0)])[topk >= 0].all()
    assert (remapped == -1).sum() == 1


def test_batched_compact_jobs_score_like_full_history(stages):
    model, retrieval, scoring = stages
    rng = np.random.default_rng(0)
    n_queries, n_items = retrieval.index.num_queries - 1, retrieval.index.num_items - 1
    requests = [
        (random_history(rng, n_queries, n_items, L), int(q), rng.integers(1, n_items + 1, C))
        for L, q, C in ((50, 3, 7), (17, 0, 4), (0, 5, 3))
    ]  # the last one: a cold-start user
    jobs = [retrieval.prepare(h, q, c, keep_full_topk=True) for h, q, c in requests]
    batched = scoring.score_batch(jobs)
    for (history, q, cands), job, got in zip(requests, jobs, batched):
        assert got.shape == (len(cands),)
        if len(history[1]) == 0:
            assert job.topk.shape == (len(cands), 0) and np.isfinite(got).all()
            continue
        hq, hi = (torch.from_numpy(a)[None] for a in history)
        t = torch.from_numpy(cands)[None]
        with torch.no_grad():
            want = torch.sigmoid(
                model.score_with_topk(
                    hist_queries=hq,
                    hist_items=hi,
                    topk_idx=torch.from_numpy(job.full_topk)[None],
                    target_queries=torch.full_like(t, q),
                    target_items=t,
                )
            )[0].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, min_overlap", [("pq", 0.8), ("exact", 0.95), ("sketch", 0.8)])
def test_each_retrieval_method_agrees_with_the_model_gsu_topk(stages, method, min_overlap):
    """Top-K positions point at real behaviours and rank like the model's own exact GSU top-K: PQ shortlist +
    re-rank, the served default "exact" (one GEMM over the index's fp16 tables) and the sketch shortlist."""
    model, retrieval, _ = stages
    stage = RetrievalStage(model, retrieval.index, method=method)
    rng = np.random.default_rng(2)
    hq, hi = random_history(rng, retrieval.index.num_queries - 1, retrieval.index.num_items - 1, 60)
    cands = rng.integers(1, retrieval.index.num_items, 5)
    job = stage.prepare((hq, hi), 0, cands, keep_full_topk=True)
    batch = {
        "hist_items": torch.from_numpy(hi)[None],
        "hist_queries": torch.from_numpy(hq)[None],
        "target_items": torch.from_numpy(cands)[None],
        "target_queries": torch.zeros(1, 5, dtype=torch.long),
    }
    with torch.no_grad():
        exact = model.gsu_scores(batch)[0].topk(model.cfg.K, dim=-1).indices.numpy()
    overlap = np.mean([len(set(a) & set(b)) / model.cfg.K for a, b in zip(job.full_topk, exact)])
    assert overlap >= min_overlap, overlap
    assert job.hist_items.dtype == np.int32 and job.topk.dtype == np.int16  # compact on the wire


def test_unknown_retrieval_method_is_refused(stages):
    model, retrieval, _ = stages
    with pytest.raises(ValueError, match="retrieval method must be one of"):
        RetrievalStage(model, retrieval.index, method="hnsw")


def test_catalog_resolves_queries_and_refuses_bad_ids_and_limits_with_4xx(artefacts):
    catalog = Catalog.load(artefacts.data, Limits(max_candidates=5, max_query_chars=20, max_events=3))
    text = next(iter(catalog.query_text))
    assert catalog.resolve_query(text.upper())[0] == catalog.query_text[text]
    assert catalog.resolve_query(None) == (0, None)
    qid, note = catalog.resolve_query("never typed")
    assert qid == 0 and "empty query" in note
    score = ScoreRequest(user_id=1, query=text, candidates=[2, 1])
    assert catalog.check_score(score)[:2] == (catalog.query_text[text], None)
    assert catalog.check_score(score)[2].tolist() == [2, 1]
    events = EventsRequest(user_id=1, events=[{"item_id": 3}, {"item_id": 4, "query": text}])
    assert catalog.check_events(events) == ([0, catalog.query_text[text]], [3, 4])
    too_many = EventsRequest(user_id=1, events=[{"item_id": 1}] * 4)
    for call, match in (
        (lambda: catalog.validate_candidates([1, catalog.num_items + 1]), "unknown candidate"),
        (lambda: catalog.validate_candidates([1] * 6), "limit is 5"),
        (lambda: catalog.resolve_query("x" * 21), "limit is 20"),
        (lambda: catalog.resolve_query(catalog.num_queries + 1), "unknown query id"),
        (lambda: catalog.check_events(too_many), "4 events, the limit is 3"),
    ):
        with pytest.raises(RequestError, match=match) as err:
            call()
        assert 400 <= err.value.status < 500


def test_a_request_error_becomes_the_http_answer_with_its_status():
    from fastapi import HTTPException

    from seminar_ray.serving.api import http_errors

    with pytest.raises(HTTPException) as err, http_errors():
        raise RequestError("no such user", status=404)
    assert (err.value.status_code, err.value.detail) == (404, "no such user")


@pytest.mark.parametrize(
    "body",
    [
        {"candidates": [1]},
        {"user_id": 1, "candidates": []},
        {"user_id": "x", "candidates": [1]},
        {"user_id": 1, "candidates": [1], "extra": 1},
        {"user_id": 1, "candidates": ["a"]},
        {"user_id": 1, "candidates": [2**63]},
        {"user_id": 10**30, "candidates": [1]},
        {"user_id": 1, "candidates": [float("nan")]},
        {"user_id": 1, "query": 2**63, "candidates": [1]},
        {"user_id": 1, "candidates": [float("inf")]},
    ],
)
def test_malformed_score_bodies_are_rejected(body):
    with pytest.raises(pydantic.ValidationError):
        ScoreRequest.model_validate(body)


@pytest.mark.parametrize(
    "event",
    [
        {"item_id": 2**63},
        {"item_id": 1, "timestamp": 10**30},
        {"item_id": 1, "timestamp": -(2**63) - 1},
        {"item_id": float("nan")},
    ],
)
def test_events_past_int64_are_rejected(event):
    with pytest.raises(pydantic.ValidationError):
        EventsRequest.model_validate({"user_id": 1, "events": [event]})
    assert EventsRequest.model_validate({"user_id": 2**63 - 1, "events": [{"item_id": 1, "timestamp": -(2**63)}]})


def test_validation_errors_echo_only_strict_json():
    """A 422 echoes the bad input; NaN, inf and lone surrogates in it must not break the JSON answer (a 500)."""
    import json

    from seminar_ray.serving.api import json_safe

    bad = {"input": [float("nan"), float("-inf"), "\ud800", {"\udfff": 1.5}], "ctx": (1, "x")}
    text = json.dumps(json_safe(bad), allow_nan=False, ensure_ascii=False).encode("utf-8")
    assert json.loads(text) == {"input": ["nan", "-inf", "\\ud800", {"\\udfff": 1.5}], "ctx": [1, "x"]}


def test_log_store_read_your_writes_and_torn_tail(tmp_path, artefacts):
    writer = LogHistoryStore(tmp_path, writer=True)
    reader = LogHistoryStore(tmp_path, data_dir=artefacts.data)
    base_q, base_i = reader.history(1, 1000)
    seq = writer.append(1, [0, 2], [5, 6], [10, 11])
    assert reader.refresh() >= seq
    q, i = reader.history(1, 1000)
    assert i.tolist() == base_i.tolist() + [5, 6] and q.tolist() == base_q.tolist() + [0, 2]
    assert reader.history(10**9, 100)[1].size == 0  # unknown user: cold start
    with open(tmp_path / LOG_FILE, "ab") as f:  # a crash mid-write: never acknowledged
        f.write(b'{"seq": 2, "user_id": 1, "item_')
    assert reader.refresh() == seq  # readers skip the partial line
    writer.close()
    reopened = LogHistoryStore(tmp_path, writer=True)
    assert reopened.append(10**6, [0], [7], [12]) == seq + 1
    assert reader.refresh() == seq + 1 and reader.history(10**6, 10)[1].tolist() == [7]
    with pytest.raises(PermissionError):
        reader.append(1, [0], [1], [0])


def test_every_acknowledged_append_survives_sigkill(tmp_path):
    """A writer process acknowledges appends on stdout; SIGKILL it mid-stream; every acknowledged seq is in the log."""
    script = textwrap.dedent(f"""
        import sys
        from seminar_ray.serving.history import LogHistoryStore
        store = LogHistoryStore({str(tmp_path)!r}, writer=True)
        n = 0
        while True:
            n += 1
            seq = store.append(n % 7, [0, 1, 2], [n % 50 + 1] * 3, [n] * 3)
            print(seq, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    acked = [int(proc.stdout.readline()) for _ in range(40)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = LogHistoryStore(tmp_path, writer=True)  # the restart: repairs a torn tail, continues the numbering
    assert store.last_seq >= acked[-1] and acked == list(range(1, 41))
    total = sum(len(store.history(u, 10**6)[1]) for u in range(7))
    assert total == 3 * store.last_seq
    assert store.append(0, [0], [1], [0]) == store.last_seq


def test_ingress_mode_is_checked_before_anything_starts(monkeypatch):
    from serve_app.deploy import set_ingress_env, start

    with pytest.raises(ValueError, match="ingress must be one of"):
        set_ingress_env("haproxy")
    with pytest.raises(ValueError, match="ingress must be one of"):
        start({}, ingress="haproxy")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # a cluster "already running" without the direct preset
    monkeypatch.delenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", raising=False)
    with pytest.raises(ValueError, match="RAY_SERVE_THROUGHPUT_OPTIMIZED=1 ray start"):
        start({}, ingress="direct")


def test_concurrent_appends_take_consecutive_seqs(tmp_path):
    """Serve runs the writer's sync `append` on a thread pool: simultaneous appends must not share a seq."""
    from concurrent.futures import ThreadPoolExecutor

    store = LogHistoryStore(tmp_path, writer=True)
    with ThreadPoolExecutor(8) as pool:
        seqs = list(pool.map(lambda n: store.append(n % 5, [0], [n + 1], [n]), range(200)))
    assert sorted(seqs) == list(range(1, 201))
    reader = LogHistoryStore(tmp_path)
    assert reader.last_seq == 200 and sum(len(reader.history(u, 10**6)[1]) for u in range(5)) == 200


def test_app_builder_takes_typed_args_and_names_a_bad_key():
    """Serve validates config.yaml's `args:` into build_app's pydantic model before calling it (app_builder pattern)."""
    import yaml
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from serve_app.app import AppArgs, build_app, compose

    root = Path(__file__).resolve().parents[1] / "serve_app"
    for config in ("config.yaml", "config.cluster.yaml"):
        args = yaml.safe_load((root / config).read_text())["applications"][0]["args"]
        app = call_user_app_builder_with_args_if_necessary(build_app, args)
        assert type(app).__name__ == "Application" and AppArgs.model_validate(args).retrieval == "exact"
    good = {"checkpoint": "c", "index": "i", "data": "d", "store": "s"}
    for bad, name in (
        ({**good, "topology": "split"}, "topology"),
        ({**good, "retrieval": "fast"}, "retrieval"),
        ({**good, "limits": {"max_candidate": 5}}, "max_candidate"),
        ({"checkpoint": "c"}, "index"),
    ):
        with pytest.raises(pydantic.ValidationError, match=name):
            call_user_app_builder_with_args_if_necessary(build_app, bad)
    with pytest.raises(ValueError, match="unknown deployments"):
        compose(good, {"PQRetriever": {"num_replicas": 2}})


def test_score_job_wire_round_trip_scores_the_same(stages):
    """The Scorer receives ScoreJob.to_wire() (msgpack-native buffers); decoded, it is the same job."""
    _, retrieval, scoring = stages
    rng = np.random.default_rng(3)
    n_queries, n_items = retrieval.index.num_queries - 1, retrieval.index.num_items - 1
    jobs = [
        retrieval.prepare(random_history(rng, n_queries, n_items, L), 2, rng.integers(1, n_items + 1, 6))
        for L in (40, 0)
    ]
    back = [ScoreJob.from_wire(j.to_wire()) for j in jobs]
    for a, b in zip(jobs, back):
        for f in ("hist_queries", "hist_items", "topk", "candidates"):
            assert np.array_equal(getattr(a, f), getattr(b, f)) and getattr(a, f).dtype == getattr(b, f).dtype, f
        assert (a.query_id, a.history_len, a.index_version) == (b.query_id, b.history_len, b.index_version)
    for x, y in zip(scoring.score_batch(jobs), scoring.score_batch(back)):
        np.testing.assert_array_equal(x, y)
