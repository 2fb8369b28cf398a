"""What the service knows about entities: id ranges, query text → id, the request limits (docs/design.md, Serving)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from seminar_ray.data.schema import EMPTY_QUERY, DatasetMeta, read_table
from seminar_ray.serving.api import EventsRequest, QueryField, RequestError, ScoreRequest


class Limits(BaseModel):
    """Configurable request limits; exceeding one is a 4xx, never a 500. Part of the app's typed args."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    max_candidates: int = Field(200, ge=1)
    max_query_chars: int = Field(256, ge=0)
    max_events: int = Field(1000, ge=1)


def normalise_text(text: str) -> str:
    return " ".join(text.lower().split())


class Catalog:
    """Validates ids against the dataset's tables and maps query text to a query id (exact match after normalising)."""

    def __init__(self, num_queries: int, num_items: int, query_text: dict[str, int], limits: Limits | None = None):
        self.num_queries, self.num_items, self.limits = num_queries, num_items, limits or Limits()
        self.query_text = query_text

    @classmethod
    def load(cls, data_dir: str | Path, limits: Limits | None = None) -> Catalog:
        meta = DatasetMeta.load(data_dir)
        queries = read_table(data_dir, "queries", ["query_id", "text"]).to_pydict()
        text = {normalise_text(t): int(q) for q, t in zip(queries["query_id"], queries["text"]) if t}
        return cls(meta.num_queries, meta.num_items, text, limits)

    def resolve_query(self, query: QueryField) -> tuple[int, str | None]:
        """(query id, note): an id is checked, a known text maps to its id, an unknown text to the empty query."""
        if query is None or query == "":
            return EMPTY_QUERY, None
        if isinstance(query, int):
            if not 0 <= query <= self.num_queries:
                raise RequestError(f"unknown query id {query}: query ids are 0..{self.num_queries}")
            return query, None
        if len(query) > self.limits.max_query_chars:
            raise RequestError(f"query text has {len(query)} characters, the limit is {self.limits.max_query_chars}")
        qid = self.query_text.get(normalise_text(query))
        if qid is None:
            return EMPTY_QUERY, "query text not in the query table: scored as a browse request (empty query)"
        return qid, None

    def check_items(self, item_ids: list[int], what: str = "candidate") -> np.ndarray:
        ids = np.asarray(item_ids, dtype=np.int64)
        bad = (ids < 1) | (ids > self.num_items)
        if bad.any():
            raise RequestError(f"unknown {what} item id {int(ids[bad][0])}: item ids are 1..{self.num_items}")
        return ids

    def validate_candidates(self, candidates: list[int]) -> np.ndarray:
        if len(candidates) > self.limits.max_candidates:
            raise RequestError(f"{len(candidates)} candidates, the limit is {self.limits.max_candidates}")
        return self.check_items(candidates)

    def check_score(self, req: ScoreRequest) -> tuple[int, str | None, np.ndarray]:
        """(query id, note, candidate ids) of a score request; RequestError for one the service refuses."""
        query_id, note = self.resolve_query(req.query)
        return query_id, note, self.validate_candidates(req.candidates)

    def check_events(self, req: EventsRequest) -> tuple[list[int], list[int]]:
        """(query ids, item ids) of an events request; RequestError for one the service refuses."""
        if len(req.events) > self.limits.max_events:
            raise RequestError(f"{len(req.events)} events, the limit is {self.limits.max_events}")
        items = self.check_items([e.item_id for e in req.events], what="event").tolist()
        return [self.resolve_query(e.query)[0] for e in req.events], items
