"""Serving core (docs/design.md, Serving), testable without Ray Serve.

Request models, catalogue checks, history store, stages.
"""

from seminar_ray.serving.api import (
    Event,
    EventsRequest,
    EventsResponse,
    HealthResponse,
    RequestError,
    ScoreRequest,
    ScoreResponse,
)
from seminar_ray.serving.catalog import Catalog, Limits
from seminar_ray.serving.history import HistoryStore, HistoryUnavailable, LogHistoryStore, open_store
from seminar_ray.serving.stages import (
    RetrievalStage,
    ScoreJob,
    ScoringStage,
    checkpoint_version,
    compact_history,
    load_serving_model,
)

__all__ = [
    "Event",
    "EventsRequest",
    "EventsResponse",
    "HealthResponse",
    "RequestError",
    "ScoreRequest",
    "ScoreResponse",
    "Catalog",
    "Limits",
    "HistoryStore",
    "HistoryUnavailable",
    "open_store",
    "LogHistoryStore",
    "RetrievalStage",
    "ScoreJob",
    "ScoringStage",
    "checkpoint_version",
    "compact_history",
    "load_serving_model",
]
