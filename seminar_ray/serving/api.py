"""Request/response bodies of the scoring service (DESIGN §6), validated with pydantic.

Shape checks live here (FastAPI answers 422 on a malformed body); checks that need the catalogue or the
configured limits (unknown item id, too many candidates, over-long query) live in `Catalog.validate_*` and
raise `RequestError`, which the HTTP layer turns into a 4xx.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

QueryField = int | str | None


class RequestError(ValueError):
    """A request the service refuses: `status` is the HTTP status (4xx) to answer with, the message says why."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


class ScoreRequest(BaseModel):
    """POST /v1/score: score `candidates` for `user_id` under `query` (a query id, its text, or none = browse)."""

    model_config = ConfigDict(extra="forbid")
    user_id: int = Field(ge=0)
    query: QueryField = None
    candidates: list[int] = Field(min_length=1)
    return_topk: bool = False


class ScoreResponse(BaseModel):
    scores: list[float]
    model_version: str
    index_version: str
    query_id: int
    history_len: int
    note: str | None = None
    topk: list[list[int]] | None = None  # per candidate, positions into the user's history (debug)


class Event(BaseModel):
    """One behaviour: the item the user acted on and the query that led to it (none = browse)."""

    model_config = ConfigDict(extra="forbid")
    item_id: int = Field(ge=1)
    query: QueryField = None
    timestamp: int | None = None


class EventsRequest(BaseModel):
    """POST /v1/events: behaviours appended, in order, to the end of the user's history."""

    model_config = ConfigDict(extra="forbid")
    user_id: int = Field(ge=0)
    events: list[Event] = Field(min_length=1)


class EventsResponse(BaseModel):
    seq: int  # the store's sequence number of this append; durable when answered
    appended: int
    model_version: str
    index_version: str


class HealthResponse(BaseModel):
    status: str
    model_version: str
    index_version: str
    history_seq: int
