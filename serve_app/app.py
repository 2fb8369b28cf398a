"""The SEMINAR scoring service on Ray Serve: three deployments wiring `seminar_ray.serving`.

    HTTP ─► Retriever (FastAPI ingress: validate, read the history, GSU top-K, compact job) ─► Scorer (ESU + MLP)
    POST /v1/events ─► Retriever (validate) ─► HistoryWriter (the single writer: append, fsync, acknowledge)

The history store is `AppArgs.store`: a directory (the embedded log, the default) or a `redis://host:port/db` URL
(seminar_ray/serving/redis_store.py). A store that cannot be reached is a 503 naming it, never a hang or a 500.

`build_app(AppArgs)` is the application builder (`import_path: serve_app.app:build_app`). Every deployment option
has its default here, in the decorators; `config.yaml` (Serve's `deployments:` list) overrides them per
deployment, and Python callers (tests, bench) pass the same overrides to `compose`.
"""

import os
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from seminar_ray.serving import (
    Catalog,
    EventsRequest,
    EventsResponse,
    HealthResponse,
    HistoryStore,
    Limits,
    RetrievalStage,
    ScoreJob,
    ScoreRequest,
    ScoreResponse,
    ScoringStage,
    load_serving_model,
)
from seminar_ray.serving.api import http_errors, json_safe
from seminar_ray.serving.history import HistoryUnavailable, open_store
from seminar_ray.serving.process import setup_serving_process
from seminar_ray.serving.stages import DEFAULT_RETRIEVAL, RetrievalMethod


class AppArgs(BaseModel):
    """The application's arguments (config.yaml `args:`); an unknown or mistyped key is an error naming it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    checkpoint: str = Field(description="checkpoint or run directory (a run resolves to its best checkpoint)")
    index: str = Field(description="serving index directory from jobs/build_index.py")
    data: str = Field(description="dataset directory the model was trained on (catalogue, base histories)")
    store: str = Field(
        description="history store: a log directory (events.log, embedded; every node must see it) "
        "or redis://host:port/db (base histories loaded by jobs/load_histories.py)"
    )
    retrieval: RetrievalMethod = Field(DEFAULT_RETRIEVAL, description="top-K ranker over the index (stages.py)")
    rerank_factor: int = Field(8, ge=1, description="shortlist size / K for retrieval 'pq'")
    limits: Limits = Field(default_factory=Limits)


QUIET = {"enable_access_log": False}  # a log line per request is real CPU on a small machine
# Rolls (a new checkpoint or index) start each replacement before its old replica stops and give a draining
# replica a minute: Serve's default stops first, which left the single Scorer replica gone while its successor
# loaded, and cut requests held by a draining retriever (500s). The single HistoryWriter keeps stop-then-start.
ROLL: dict[str, Any] = {"max_surge_percent": 100, "graceful_shutdown_timeout_s": 60}


def load_model(config: dict):
    from seminar_ray.data.entities import EntityTables

    return load_serving_model(config["checkpoint"], EntityTables.load(config["data"]))


def strict_json_errors(api: FastAPI) -> FastAPI:
    """422 answers stay strict JSON when the bad input was NaN, 1e400 or a lone surrogate (see `json_safe`)."""

    @api.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": json_safe(jsonable_encoder(exc.errors()))})

    return api


# ---------------------------------------------------------------------------------------------------- writer
@serve.deployment(logging_config=QUIET, num_replicas=1, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
class HistoryWriter:
    """The only writer of the history store: appends and fsyncs before it acknowledges (returns the seq)."""

    def __init__(self, store: str):
        self.store = open_store(store, writer=True)

    def append(self, user_id: int, query_ids: list[int], item_ids: list[int], timestamps: list[int]) -> int:
        return self.store.append(user_id, query_ids, item_ids, timestamps)

    def pid(self) -> int:
        return os.getpid()


# ---------------------------------------------------------------------------------------------------- scorer
@serve.deployment(
    logging_config=QUIET,
    **ROLL,
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=32,
    autoscaling_config={
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 6,
        "upscale_delay_s": 2,
        "downscale_delay_s": 15,
        "look_back_period_s": 4,
        "metrics_interval_s": 1,
    },
)
class Scorer:
    """ESU + MLP over the retrieved K, batched across requests. user_config: checkpoint, data."""

    def __init__(self):
        setup_serving_process()

    def reconfigure(self, config: dict) -> None:
        model, version = load_model(config)  # load first, then swap: requests in flight keep the model they began
        self.loaded = (ScoringStage(model), version)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def score(self, jobs: list[tuple]) -> list[tuple[list[float], str]]:
        """Scores for each job (ScoreJob.to_wire), with the version of the model that computed them."""
        stage, version = self.loaded
        return [(s.tolist(), version) for s in stage.score_batch([ScoreJob.from_wire(j) for j in jobs])]


# ---------------------------------------------------------------------------------------------------- retriever
@dataclass(frozen=True)
class Loaded:
    """What a roll swaps in one assignment: the retrieval stage and the versions it answers with."""

    stage: RetrievalStage
    model_version: str
    index_version: str


# Everything the routes use is defined above them: @serve.ingress pickles the FastAPI app, with the globals of its
# routes, when the class is decorated (a helper defined further down is a NameError in the replica).
def store_unavailable(e: BaseException) -> HistoryUnavailable | None:
    """The HistoryUnavailable behind `e`: raised here, or in the writer and re-raised by its handle (RayTaskError)."""
    for err in (e, getattr(e, "cause", None), e.__cause__):
        if isinstance(err, HistoryUnavailable):
            return err
    return None


def unavailable_503(e: BaseException) -> HTTPException:
    return HTTPException(status_code=503, detail=str(store_unavailable(e) or e))


async def retry_once(call):
    """One retry when the replica serving the call died mid-request (the router picks a live one next time)."""
    try:
        return await call()
    except RayActorError:
        return await call()


api = strict_json_errors(FastAPI(title="SEMINAR scoring"))


@serve.deployment(
    logging_config=QUIET,
    **ROLL,
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=16,
    autoscaling_config={
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 3,
        "upscale_delay_s": 2,
        "downscale_delay_s": 15,
        "look_back_period_s": 4,
        "metrics_interval_s": 1,
    },
)
@serve.ingress(api)
class Retriever:
    """The HTTP ingress and the GSU stage: validation, history, top-K by the index, then one hop to the Scorer.

    Retrieval runs inline on the replica's event loop: a worker thread's hand-off cost more than it overlapped
    (serve_app/README.md). Nothing awaits between reading the history and building the job, so calls into
    the stage and the history reader never interleave. user_config: checkpoint, index, data, store, retrieval,
    rerank_factor.
    """

    history: HistoryStore  # set by the first reconfigure

    def __init__(self, scorer: DeploymentHandle, writer: DeploymentHandle, data: str, limits: dict):
        setup_serving_process()
        self.catalog = Catalog.load(data, Limits(**limits))
        self.scorer, self.writer = scorer, writer

    def reconfigure(self, config: dict) -> None:
        from seminar_ray.retrieval.index import PQIndex

        model, model_version = load_model(config)
        index = PQIndex.load(config["index"], mmap=True)
        stage = RetrievalStage(model, index, rerank_factor=config["rerank_factor"], method=config["retrieval"])
        if not hasattr(self, "history"):  # one reader for the replica's life: a roll keeps its position
            self.history = open_store(config["store"], config["data"])
        self.loaded = Loaded(stage, model_version, index.version)

    @api.post("/v1/score", response_model=ScoreResponse)
    async def score(self, req: ScoreRequest) -> ScoreResponse:
        """POST /v1/score, the whole request path (also callable through a handle with a ScoreRequest)."""
        with http_errors():
            query_id, note, candidates = self.catalog.check_score(req)
        loaded = self.loaded
        try:
            self.history.refresh()  # read-your-writes: every acknowledged append is in the log
            history = self.history.history(req.user_id, loaded.stage.max_len)
        except HistoryUnavailable as e:
            raise unavailable_503(e) from e
        job = loaded.stage.prepare(history, query_id, candidates, keep_full_topk=req.return_topk)
        wire = job.to_wire()
        scores, model_version = await retry_once(lambda: self.scorer.score.remote(wire))
        topk = job.full_topk.tolist() if job.full_topk is not None else None
        return ScoreResponse(
            scores=scores,
            model_version=model_version,
            index_version=job.index_version,
            query_id=query_id,
            history_len=job.history_len,
            note=note,
            topk=topk,
        )

    @api.post("/v1/events", response_model=EventsResponse)
    async def events(self, req: EventsRequest) -> EventsResponse:
        """POST /v1/events: answered once the writer has fsynced the append."""
        with http_errors():
            queries, items = self.catalog.check_events(req)
        now = int(time.time())
        stamps = [e.timestamp if e.timestamp is not None else now for e in req.events]
        try:
            seq = await self.writer.append.remote(req.user_id, queries, items, stamps)
        except Exception as e:  # only the store's unavailability is a 503; anything else stays what it was
            if store_unavailable(e) is None:
                raise
            raise unavailable_503(e) from e
        loaded = self.loaded
        return EventsResponse(
            seq=seq, appended=len(items), model_version=loaded.model_version, index_version=loaded.index_version
        )

    @api.get("/healthz", response_model=HealthResponse)
    async def health(self) -> HealthResponse:
        loaded = self.loaded
        try:
            seq = self.history.refresh()
        except HistoryUnavailable as e:
            raise unavailable_503(e) from e
        return HealthResponse(
            status="ok", model_version=loaded.model_version, index_version=loaded.index_version, history_seq=seq
        )


# ---------------------------------------------------------------------------------------------------- builder
def compose(args: AppArgs | dict, options: dict[str, dict] | None = None) -> serve.Application:
    """The application from typed args; `options` maps a deployment name to Serve deployment options that override
    the decorators' (what config.yaml's `deployments:` does for `serve deploy`), e.g. fixed replica counts."""
    args = AppArgs.model_validate(args)
    options = options or {}
    unknown = set(options) - {"Retriever", "Scorer", "HistoryWriter"}
    if unknown:
        raise ValueError(f"options for unknown deployments {sorted(unknown)}: Retriever, Scorer, HistoryWriter")
    models = {"checkpoint": args.checkpoint, "data": args.data}
    scorer = Scorer.options(user_config=models, **options.get("Scorer", {})).bind()  # type: ignore[attr-defined]
    writer = HistoryWriter.options(**options.get("HistoryWriter", {})).bind(args.store)  # type: ignore[attr-defined]
    retriever = Retriever.options(  # type: ignore[attr-defined]
        user_config={
            **models,
            "index": args.index,
            "store": args.store,
            "retrieval": args.retrieval,
            "rerank_factor": args.rerank_factor,
        },
        **options.get("Retriever", {}),
    )
    return retriever.bind(scorer, writer, args.data, args.limits.model_dump())


def build_app(args: AppArgs) -> serve.Application:
    """Serve's application builder: Serve validates config.yaml's `args:` into AppArgs before calling it."""
    return compose(args)
