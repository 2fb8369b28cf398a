"""Serve applications that exist only for bench/serve_load.py, built from the same parts as serve_app/app.py.

- `floor_app`: the zero-work floor. The production graph's shape (FastAPI ingress "Retriever" validating a
  ScoreRequest, one handle hop with a ScoreJob to a @serve.batch "Scorer", a ScoreResponse back) with the work
  removed: what Ray Serve itself costs per request on this machine, against which the real app is measured.
- `split_app`: a separate Ingress in front of the Retriever (Ingress → Retriever → Ingress → Scorer), with a busy
  loop of `extra_cpu_ms` per request on one stage. The skewed-load runs use it to show each deployment autoscaling
  on its own signal: in production the Retriever is the ingress, so its ongoing requests include the time it awaits
  the Scorer, and a heavy Scorer would scale both.

No `from __future__ import annotations` here: FastAPI must see the route parameters' real types (ScoreRequest) in
the pickled routes, or it reads them as query parameters.
"""

import time
from typing import Any

import numpy as np
from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from seminar_ray.serving import (
    Catalog,
    Limits,
    LogHistoryStore,
    RetrievalStage,
    ScoreJob,
    ScoreRequest,
    ScoreResponse,
    ScoringStage,
)
from seminar_ray.serving.api import http_errors
from seminar_ray.serving.process import setup_serving_process
from serve_app.app import QUIET, AppArgs, load_model, retry_once, strict_json_errors

FLOOR_VERSION = "zero-work"
CPU: dict[str, Any] = {"ray_actor_options": {"num_cpus": 0.25}}


def busy_ms(ms: float) -> None:
    """Spin the CPU for `ms` (makes one stage heavier in the skewed-load runs)."""
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass


# ---------------------------------------------------------------------------------------------------- floor
@serve.deployment(name="Scorer", logging_config=QUIET, max_ongoing_requests=32, **CPU)
class FloorScorer:
    def __init__(self):
        setup_serving_process()  # the app's process settings: the floor differs from it only by the work

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def score(self, jobs: list[tuple]) -> list[tuple[list[float], str]]:
        return [([0.0] * len(ScoreJob.from_wire(j).candidates), FLOOR_VERSION) for j in jobs]


floor_api = strict_json_errors(FastAPI(title="zero-work floor"))
EMPTY = np.zeros(0, np.int32)


@serve.deployment(name="Retriever", logging_config=QUIET, max_ongoing_requests=16, **CPU)
@serve.ingress(floor_api)
class FloorRetriever:
    def __init__(self, scorer: DeploymentHandle):
        setup_serving_process()
        self.scorer = scorer

    @floor_api.post("/v1/score", response_model=ScoreResponse)
    async def score(self, req: ScoreRequest) -> ScoreResponse:
        candidates = np.asarray(req.candidates, dtype=np.int64)
        job = ScoreJob(
            hist_queries=EMPTY,
            hist_items=EMPTY,
            topk=np.zeros((len(candidates), 0), np.int16),
            candidates=candidates,
            query_id=0,
            history_len=0,
            index_version=FLOOR_VERSION,
        )
        scores, version = await self.scorer.score.remote(job.to_wire())
        return ScoreResponse(
            scores=scores, model_version=version, index_version=FLOOR_VERSION, query_id=0, history_len=0
        )


def floor_app(options: dict[str, dict] | None = None) -> serve.Application:
    options = options or {}
    return FloorRetriever.options(**options.get("Retriever", {})).bind(  # type: ignore[attr-defined]
        FloorScorer.options(**options.get("Scorer", {})).bind()  # type: ignore[attr-defined]
    )


# ---------------------------------------------------------------------------------------------------- split
@serve.deployment(name="Scorer", logging_config=QUIET, max_ongoing_requests=32, **CPU)
class BusyScorer:
    def __init__(self, args: dict, extra_cpu_ms: float):
        setup_serving_process()
        self.stage, self.extra_ms = ScoringStage(load_model(args)[0]), extra_cpu_ms

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def score(self, jobs: list[tuple]) -> list[tuple[list[float], str]]:
        busy_ms(self.extra_ms * len(jobs))
        return [(s.tolist(), "busy") for s in self.stage.score_batch([ScoreJob.from_wire(j) for j in jobs])]


@serve.deployment(name="Retriever", logging_config=QUIET, max_ongoing_requests=16, **CPU)
class BusyRetriever:
    def __init__(self, args: dict, extra_cpu_ms: float):
        from seminar_ray.retrieval.index import PQIndex

        setup_serving_process()
        self.stage = RetrievalStage(
            load_model(args)[0], PQIndex.load(args["index"], mmap=True), method=args["retrieval"]
        )
        self.history = LogHistoryStore(args["store"], args["data"])
        self.extra_ms = extra_cpu_ms

    async def prepare(self, user_id: int, query_id: int, candidates: np.ndarray) -> tuple:
        busy_ms(self.extra_ms)
        self.history.refresh()
        return self.stage.prepare(self.history.history(user_id, self.stage.max_len), query_id, candidates).to_wire()


split_api = strict_json_errors(FastAPI(title="split topology (bench)"))


@serve.deployment(name="Ingress", logging_config=QUIET, max_ongoing_requests=32, **CPU)
@serve.ingress(split_api)
class Ingress:
    def __init__(self, retriever: DeploymentHandle, scorer: DeploymentHandle, data: str, limits: dict):
        self.catalog = Catalog.load(data, Limits(**limits))
        self.retriever, self.scorer = retriever, scorer

    @split_api.post("/v1/score", response_model=ScoreResponse)
    async def score(self, req: ScoreRequest) -> ScoreResponse:
        with http_errors():
            query_id, note, candidates = self.catalog.check_score(req)
        wire = await retry_once(lambda: self.retriever.prepare.remote(req.user_id, query_id, candidates))
        scores, version = await retry_once(lambda: self.scorer.score.remote(wire))
        job = ScoreJob.from_wire(wire)
        return ScoreResponse(
            scores=scores,
            model_version=version,
            index_version=job.index_version,
            query_id=query_id,
            history_len=job.history_len,
            note=note,
        )


def split_app(
    args: AppArgs | dict,
    retriever_extra_cpu_ms: float = 0.0,
    scorer_extra_cpu_ms: float = 0.0,
    options: dict[str, dict] | None = None,
) -> serve.Application:
    args, options = AppArgs.model_validate(args), options or {}
    stage_args = args.model_dump(exclude={"limits"})
    retriever = BusyRetriever.options(**options.get("Retriever", {})).bind(stage_args, retriever_extra_cpu_ms)  # type: ignore[attr-defined]
    scorer = BusyScorer.options(**options.get("Scorer", {})).bind(stage_args, scorer_extra_cpu_ms)  # type: ignore[attr-defined]
    return Ingress.options(**options.get("Ingress", {})).bind(retriever, scorer, args.data, args.limits.model_dump())  # type: ignore[attr-defined]
