"""Request/response bodies of the scoring service (docs/design.md, Serving), validated with pydantic.

Shape checks live here (FastAPI answers 422 on a malformed body); checks that need the catalogue or the
configured limits (unknown item id, too many candidates, over-long query) live in `Catalog.check_*` and
raise `RequestError`, which `http_errors` turns into a 4xx.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field

# Ids and timestamps are stored as int64 (the tables, the history log, numpy): a larger JSON integer is a 422 with
# the bound in its message, not an overflow deep in the service.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UserId = Annotated[int, Field(ge=0, le=INT64_MAX)]
ItemId = Annotated[int, Field(ge=1, le=INT64_MAX)]
QueryId = Annotated[int, Field(ge=0, le=INT64_MAX)]
Timestamp = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
QueryField = QueryId | str | None


class RequestError(ValueError):
    """A request the service refuses: `status` is the HTTP status (4xx) to answer with, the message says why."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@contextmanager
def http_errors() -> Iterator[None]:
    """A RequestError raised in the block becomes the HTTP answer: its status, its message as the detail."""
    try:
        yield
    except RequestError as e:
        raise HTTPException(status_code=e.status, detail=str(e)) from e


class ScoreRequest(BaseModel):
    """POST /v1/score: score `candidates` for `user_id` under `query` (a query id, its text, or none = browse)."""

    model_config = ConfigDict(extra="forbid")
    user_id: UserId
    query: QueryField = None
    candidates: list[ItemId] = Field(min_length=1)
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
    item_id: ItemId
    query: QueryField = None
    timestamp: Timestamp | None = None


class EventsRequest(BaseModel):
    """POST /v1/events: behaviours appended, in order, to the end of the user's history."""

    model_config = ConfigDict(extra="forbid")
    user_id: UserId
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


def json_safe(value: Any) -> Any:
    """`value` made fit for a strict UTF-8 JSON answer: non-finite floats become their text ("nan", "inf"), and text
    holding lone surrogates ("\\ud800", which JSON escapes allow) gets them written as backslash escapes.

    A validation error echoes the bad input. Python's JSON parser reads `NaN`, `Infinity`, `1e400` (→ inf) and lone
    surrogate escapes; Starlette's JSON response refuses the first three and cannot UTF-8-encode the last, which
    turned a 422 into a 500.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {json_safe(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
