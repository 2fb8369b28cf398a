"""Ray Serve deployments of the scoring service (DESIGN §1 step 5, §6); the logic lives in seminar_ray.serving.

Graph (topology "merged", the default): HTTP proxy → PQRetriever (FastAPI ingress: validation, history, GSU top-K)
→ ESUScorer (@serve.batch, ESU + MLP); /v1/events → HistoryWriter (one replica, fsynced log).
Topology "split" puts a separate Ingress deployment in front of PQRetriever (one more hop); README.md has the
measurements behind the choice. `work: false` keeps the same graph with the work removed (the zero-work floor).
"""

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from seminar_ray.serving import (Catalog, EventsRequest, EventsResponse, HealthResponse, Limits, LogHistoryStore,
                                 RequestError, RetrievalStage, ScoreJob, ScoreRequest, ScoreResponse, ScoringStage,
                                 load_serving_model)
from seminar_ray.serving.api import json_safe

FLOOR_VERSION = "zero-work"
DEFAULT_RETRIEVAL = "exact"  # measured: one GEMM over the fp16 tables beats the PQ shortlist at L = 2,000 (README)


QUIET = {"enable_access_log": False}  # one log line per request costs ~1 ms of replica CPU on 2 cores
# Rolls (a new checkpoint/index via serve.run) start each replacement before its old replica stops, and old ingress
# replicas get a minute to finish requests in flight: with the default (stop first) a single ESUScorer replica was
# gone for the ~20 s its successor took to start on a loaded machine, and requests held by a draining retriever
# past the 20 s default grace period were cut (500). The single-writer HistoryWriter keeps stop-then-start.
ROLL = {"max_surge_percent": 100, "graceful_shutdown_timeout_s": 60}


def _init_replica() -> None:
    """One compute thread per replica: replicas are the unit of parallelism (fractional CPUs, autoscaling)."""
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)


def busy_ms(ms: float) -> None:
    """Spin the CPU for `ms` (the skewed-load runs make one stage heavier with it)."""
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass


def _load_tables(data: str):
    from seminar_ray.data.entities import EntityTables

    return EntityTables.load(data)


# ---------------------------------------------------------------------------------------------------- writer
@serve.deployment(name="HistoryWriter", logging_config=QUIET, num_replicas=1, ray_actor_options={"num_cpus": 0.1},
                  max_ongoing_requests=64)
class HistoryWriter:
    """The only writer of the history log: appends and fsyncs before it acknowledges (returns the seq)."""

    def __init__(self, store: str):
        self.store = LogHistoryStore(store, writer=True)

    def append(self, user_id: int, item_ids: list[int], query_ids: list[int], timestamps: list[int]) -> int:
        return self.store.append(user_id, item_ids, query_ids, timestamps)

    def pid(self) -> int:
        return os.getpid()

    def last_seq(self) -> int:
        return self.store.refresh()


# ---------------------------------------------------------------------------------------------------- scorer
@serve.deployment(name="ESUScorer", logging_config=QUIET, **ROLL, ray_actor_options={"num_cpus": 0.25},
                  max_ongoing_requests=32,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 6,
                                      "upscale_delay_s": 2, "downscale_delay_s": 15,
                                      "look_back_period_s": 4, "metrics_interval_s": 1})
class ESUScorer:
    """ESU + MLP over the retrieved K, batched across requests. user_config: checkpoint, data, work, extra_cpu_ms."""

    def __init__(self):
        _init_replica()
        self.stage: ScoringStage | None = None
        self.version, self.work, self.extra_ms = FLOOR_VERSION, True, 0.0

    def reconfigure(self, config: dict) -> None:
        work = bool(config.get("work", True))
        if work:  # load first, then swap: requests in flight keep the stage they started with
            model, version = load_serving_model(config["checkpoint"], _load_tables(config["data"]))
            self.stage, self.version = ScoringStage(model), version
        else:
            self.stage, self.version = None, FLOOR_VERSION
        self.work, self.extra_ms = work, float(config.get("extra_cpu_ms", 0.0))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def score(self, jobs: list[ScoreJob]) -> list[tuple[list[float], str]]:
        stage, version = self.stage, self.version
        busy_ms(self.extra_ms * len(jobs))
        if stage is None:
            return [([0.0] * len(j.candidates), version) for j in jobs]
        return [(s.tolist(), version) for s in stage.score_batch(jobs)]


# ---------------------------------------------------------------------------------------------------- retriever
@dataclass
class RetrieverState:
    stage: RetrievalStage | None
    store: LogHistoryStore | None
    index_version: str
    model_version: str


class RetrieverCore:
    """What every PQRetriever replica holds: the history reader and the GSU/PQ retrieval stage.

    Retrieval runs inline on the replica's event loop (~1–2 ms per request): measured against one worker thread per
    replica, the thread hand-off cost more than the overlap gained (README). No await inside it, so calls into the
    stage and the store, which are not thread-safe, never interleave.
    """

    state: RetrieverState
    extra_ms: float = 0.0

    def _setup(self) -> None:
        _init_replica()
        self.state = RetrieverState(None, None, FLOOR_VERSION, FLOOR_VERSION)

    def reconfigure(self, config: dict) -> None:
        self.extra_ms = float(config.get("extra_cpu_ms", 0.0))
        if not config.get("work", True):
            self.state = RetrieverState(None, None, FLOOR_VERSION, FLOOR_VERSION)
            return
        from seminar_ray.retrieval.index import PQIndex

        model, version = load_serving_model(config["checkpoint"], _load_tables(config["data"]))
        index = PQIndex.load(config["index"], mmap=True)
        store = self.state.store if self.state.store is not None else LogHistoryStore(config["store"], config["data"])
        stage = RetrievalStage(model, index, rerank_factor=int(config.get("rerank_factor", 8)),
                               method=config.get("retrieval", DEFAULT_RETRIEVAL))
        self.state = RetrieverState(stage, store, index.version, version)

    async def prepare(self, user_id: int, query_id: int, candidates: np.ndarray, return_topk: bool = False) -> ScoreJob:
        state = self.state
        busy_ms(self.extra_ms)
        if state.stage is None:
            empty = np.zeros(0, np.int32)
            return ScoreJob(empty, empty, np.zeros((len(candidates), 0), np.int16), candidates, query_id, 0,
                            state.index_version)
        state.store.refresh()  # read-your-writes: every acknowledged append is in the log
        history = state.store.history(user_id, state.stage.max_len)
        return state.stage.prepare(history, query_id, candidates, keep_full_topk=return_topk)

    async def versions(self) -> tuple[str, str, int]:
        store = self.state.store
        return self.state.model_version, self.state.index_version, store.refresh() if store is not None else 0


# ---------------------------------------------------------------------------------------------------- ingress
@dataclass
class IngressConfig:
    data: str | None = None
    limits: Limits = field(default_factory=Limits)


class Routes:
    """The HTTP behaviour shared by both topologies; subclasses say how to reach the retriever."""

    catalog: Catalog | None
    scorer: DeploymentHandle
    writer: DeploymentHandle

    def _ingress_setup(self, data: str | None, limits: dict | None, scorer, writer) -> None:
        self.catalog = Catalog.load(data, Limits(**(limits or {}))) if data else None
        self.scorer, self.writer = scorer, writer

    async def _prepare(self, user_id: int, query_id: int, candidates: np.ndarray, return_topk: bool) -> ScoreJob:
        raise NotImplementedError

    async def _versions(self) -> tuple[str, str, int]:
        raise NotImplementedError

    async def _score(self, req: ScoreRequest) -> ScoreResponse:
        try:
            if self.catalog is not None:
                query_id, note = self.catalog.resolve_query(req.query)
                candidates = self.catalog.validate_candidates(req.candidates)
            else:
                query_id, note, candidates = 0, None, np.asarray(req.candidates, dtype=np.int64)
        except RequestError as e:
            raise HTTPException(status_code=e.status, detail=str(e)) from e
        job = await self._prepare(req.user_id, query_id, candidates, req.return_topk)
        scores, model_version = await _retry_once(lambda: self.scorer.score.remote(job))
        topk = job.full_topk.tolist() if req.return_topk and job.full_topk is not None else None
        return ScoreResponse(scores=scores, model_version=model_version, index_version=job.index_version,
                             query_id=query_id, history_len=job.history_len, note=note, topk=topk)

    async def score(self, body: dict) -> dict:
        """The handle (non-HTTP) entry, e.g. from another deployment or local testing mode: same as POST /v1/score."""
        return (await self._score(ScoreRequest.model_validate(body))).model_dump()

    async def _events(self, req: EventsRequest) -> EventsResponse:
        if self.catalog is None:
            raise HTTPException(status_code=503, detail="events need the data directory (catalogue) configured")
        try:
            if len(req.events) > self.catalog.limits.max_events:
                raise RequestError(f"{len(req.events)} events, the limit is {self.catalog.limits.max_events}")
            items = self.catalog.check_items([e.item_id for e in req.events], what="event").tolist()
            queries = [self.catalog.resolve_query(e.query)[0] for e in req.events]
        except RequestError as e:
            raise HTTPException(status_code=e.status, detail=str(e)) from e
        now = int(time.time())
        stamps = [e.timestamp if e.timestamp is not None else now for e in req.events]
        seq = await self.writer.append.remote(req.user_id, items, queries, stamps)
        model_version, index_version, _ = await self._versions()
        return EventsResponse(seq=seq, appended=len(items), model_version=model_version, index_version=index_version)

    async def _health(self) -> HealthResponse:
        model_version, index_version, seq = await self._versions()
        return HealthResponse(status="ok", model_version=model_version, index_version=index_version, history_seq=seq)


async def _retry_once(call):
    """One retry when the replica serving the call died mid-request (the router picks a live one next time)."""
    try:
        return await call()
    except RayActorError:
        return await call()


def _api(title: str) -> FastAPI:
    """A FastAPI app whose 422 answers are strict JSON even when the bad input was NaN or 1e400 (see json_safe)."""
    api = FastAPI(title=title)

    @api.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": json_safe(jsonable_encoder(exc.errors()))})

    return api


merged_api = _api("SEMINAR scoring (PQRetriever ingress)")


@serve.deployment(name="PQRetriever", logging_config=QUIET, **ROLL, ray_actor_options={"num_cpus": 0.25},
                  max_ongoing_requests=16,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3,
                                      "upscale_delay_s": 2, "downscale_delay_s": 15,
                                      "look_back_period_s": 4, "metrics_interval_s": 1})
@serve.ingress(merged_api)
class PQRetrieverIngress(RetrieverCore, Routes):
    """Topology "merged": the retriever is the HTTP ingress (one hop fewer)."""

    def __init__(self, scorer: DeploymentHandle, writer: DeploymentHandle, data: str | None = None,
                 limits: dict | None = None):
        self._setup()
        self._ingress_setup(data, limits, scorer, writer)

    async def _prepare(self, user_id, query_id, candidates, return_topk):
        return await self.prepare(user_id, query_id, candidates, return_topk)

    async def _versions(self):
        return await self.versions()

    @merged_api.post("/v1/score", response_model=ScoreResponse)
    async def score_route(self, req: ScoreRequest) -> ScoreResponse:
        return await self._score(req)

    @merged_api.post("/v1/events", response_model=EventsResponse)
    async def events_route(self, req: EventsRequest) -> EventsResponse:
        return await self._events(req)

    @merged_api.get("/healthz", response_model=HealthResponse)
    async def health_route(self) -> HealthResponse:
        return await self._health()


@serve.deployment(name="PQRetriever", logging_config=QUIET, **ROLL, ray_actor_options={"num_cpus": 0.25},
                  max_ongoing_requests=16,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2,
                                      "upscale_delay_s": 2, "downscale_delay_s": 15,
                                      "look_back_period_s": 4, "metrics_interval_s": 1})
class PQRetriever(RetrieverCore):
    """Topology "split": the retriever behind a separate Ingress deployment."""

    def __init__(self):
        self._setup()


split_api = _api("SEMINAR scoring (separate ingress)")


@serve.deployment(name="Ingress", logging_config=QUIET, **ROLL, ray_actor_options={"num_cpus": 0.25},
                  max_ongoing_requests=32,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8,
                                      "upscale_delay_s": 2, "downscale_delay_s": 15,
                                      "look_back_period_s": 4, "metrics_interval_s": 1})
@serve.ingress(split_api)
class Ingress(Routes):
    def __init__(self, retriever: DeploymentHandle, scorer: DeploymentHandle, writer: DeploymentHandle,
                 data: str | None = None, limits: dict | None = None):
        self.retriever = retriever
        self._ingress_setup(data, limits, scorer, writer)

    async def _prepare(self, user_id, query_id, candidates, return_topk):
        return await _retry_once(lambda: self.retriever.prepare.remote(user_id, query_id, candidates, return_topk))

    async def _versions(self):
        return await self.retriever.versions.remote()

    @split_api.post("/v1/score", response_model=ScoreResponse)
    async def score_route(self, req: ScoreRequest) -> ScoreResponse:
        return await self._score(req)

    @split_api.post("/v1/events", response_model=EventsResponse)
    async def events_route(self, req: EventsRequest) -> EventsResponse:
        return await self._events(req)

    @split_api.get("/healthz", response_model=HealthResponse)
    async def health_route(self) -> HealthResponse:
        return await self._health()


# ---------------------------------------------------------------------------------------------------- builder
def build_app(args: dict) -> serve.Application:
    """The application from a flat args dict (also the `serve deploy` builder, see config.yaml).

    Keys: checkpoint, index, data, store (history log directory), topology ("merged" | "split"), work (bool),
    limits ({max_candidates, max_query_chars, max_events}), retrieval ("exact" | "pq" | "sketch"), rerank_factor,
    retriever_extra_cpu_ms / scorer_extra_cpu_ms (bench-only: spin that many ms per request / per batched job),
    retriever_autoscaling / scorer_autoscaling (override autoscaling_config), retriever_replicas / scorer_replicas
    (fixed replica counts instead of autoscaling).
    """
    work = bool(args.get("work", True))
    missing = [k for k in ("checkpoint", "index", "data", "store") if work and not args.get(k)]
    if missing:
        raise ValueError(f"build_app: missing {missing} (or set work: false for the zero-work floor)")
    store = args.get("store") or str(Path(os.environ.get("TMPDIR", "/tmp")) / "seminar_history_floor")
    common = {"work": work, "checkpoint": args.get("checkpoint"), "data": args.get("data")}
    scorer_cfg = {**common, "extra_cpu_ms": float(args.get("scorer_extra_cpu_ms", 0.0))}
    retriever_cfg = {**common, "index": args.get("index"), "store": store,
                     "rerank_factor": int(args.get("rerank_factor", 8)),
                     "retrieval": args.get("retrieval", DEFAULT_RETRIEVAL),
                     "extra_cpu_ms": float(args.get("retriever_extra_cpu_ms", 0.0))}
    data = args.get("data") if work else None
    limits = args.get("limits")
    topology = args.get("topology", "merged")
    scorer_opts = {"user_config": scorer_cfg}
    retriever_opts = {"user_config": retriever_cfg}
    for opts, name in ((scorer_opts, "scorer"), (retriever_opts, "retriever")):
        if args.get(f"{name}_replicas"):
            opts.update(num_replicas=int(args[f"{name}_replicas"]), autoscaling_config=None)
        elif args.get(f"{name}_autoscaling"):
            opts["autoscaling_config"] = args[f"{name}_autoscaling"]
    scorer = ESUScorer.options(**scorer_opts).bind()
    writer = HistoryWriter.bind(store)
    if topology == "merged":
        return PQRetrieverIngress.options(**retriever_opts).bind(scorer, writer, data, limits)
    if topology == "split":
        retriever = PQRetriever.options(**retriever_opts).bind()
        return Ingress.bind(retriever, scorer, writer, data, limits)
    raise ValueError(f"build_app: topology must be 'merged' or 'split', got {topology!r}")
