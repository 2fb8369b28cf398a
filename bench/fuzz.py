"""Property-based fuzz of the running app's /v1/score and /v1/events (hypothesis strategies over the request models).

    python -m bench.fuzz --out bench/out/fuzz.json [--requests 10000] [--ingress proxy]

Starts the app on 127.0.0.1 (a local Ray, small synthetic artefacts), sends generated requests, valid and
malformed, a few at a time, and checks every answer:
  - no status 5xx;
  - every 4xx carries a message (`detail`: text, or FastAPI's list of errors each with a `msg`);
  - a request the strategies built valid gets 200, and /v1/score answers one finite probability per candidate;
  - afterwards the history log holds exactly the acknowledged events: every seq a 200 returned is in the log with
    the request's user, items and resolved query ids, and the log has no record that no answer acknowledged.
Malformed means: ids and timestamps beyond int64 (2^63, 10^30, unbounded integers), numbers Python's JSON parser
reads but the API cannot hold (NaN, ±Infinity, 1e400), wrong types, missing and unknown fields, lists past the
limits, bodies that are not JSON. tests/test_serving_http.py runs the same fuzz with a bounded count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from seminar_ray.serving import Catalog, EventsRequest, Limits, ScoreRequest
from seminar_ray.serving.api import INT64_MAX, INT64_MIN
from seminar_ray.serving.history import LOG_FILE


@dataclass(frozen=True)
class Raw:
    """A JSON number token written as is (`1e400`: json.dumps cannot write a float that overflows to inf)."""

    token: str


def encode(value) -> bytes:
    """JSON text of `value` with NaN/Infinity tokens (what Python's parser accepts) and Raw tokens as given."""

    def enc(v) -> str:
        if isinstance(v, Raw):
            return v.token
        if isinstance(v, dict):
            return "{" + ",".join(f"{json.dumps(k)}:{enc(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ",".join(enc(x) for x in v) + "]"
        return json.dumps(v)

    return enc(value).encode()


@dataclass(frozen=True)
class Request:
    path: str
    body: bytes
    valid: bool  # built by the valid strategies: must get 200


@dataclass
class Space:
    """What a valid request may hold, read from the app's data directory and configured limits."""

    catalog: Catalog
    query_texts: list[str]
    users: st.SearchStrategy = field(
        default_factory=lambda: st.integers(0, 30) | st.integers(3 * 10**7, 3 * 10**7 + 30) | st.just(INT64_MAX)
    )

    @classmethod
    def load(cls, data: str | Path, limits: Limits) -> Space:
        catalog = Catalog.load(data, limits)
        texts = sorted(t for t in catalog.query_text if len(t) <= limits.max_query_chars)[:50]
        return cls(catalog, texts)


BIG_INTS = [2**63, 2**63 + 1, -(2**63) - 1, 2**64, 10**30, -(10**30), 10**400]
BAD_NUMBERS = [
    Raw("1e400"),
    Raw("-1e400"),
    Raw("1E999"),
    float("nan"),
    float("inf"),
    float("-inf"),
    1.5,
    -0.5,
    1e308,
    -1,
]


def bad_numbers() -> st.SearchStrategy:
    return st.sampled_from(BIG_INTS + BAD_NUMBERS) | st.integers() | st.floats()


def junk() -> st.SearchStrategy:
    return (
        st.none()
        | st.booleans()
        | st.text(max_size=12)
        | st.lists(st.integers(-3, 3), max_size=3)
        | st.dictionaries(st.text(max_size=3), st.integers(-3, 3), max_size=2)
    )


def mutated(valid: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(valid, bad_numbers(), junk())


class Strategies:
    """Request strategies: valid bodies, field-level mutations of them, and bodies that are not the model at all."""

    def __init__(self, space: Space):
        c, lim = space.catalog, space.catalog.limits
        self.space = space
        self.items = st.integers(1, c.num_items)
        texts = st.sampled_from(space.query_texts) if space.query_texts else st.just("")
        self.queries = (
            st.none() | st.integers(0, c.num_queries) | texts | st.text(max_size=lim.max_query_chars)
        )  # unknown text: a browse request with a note
        self.timestamps = st.integers(INT64_MIN, INT64_MAX) | st.integers(0, 2**31)
        self.over_candidates = list(range(1, lim.max_candidates + 2))
        self.over_events = [{"item_id": 1}] * (lim.max_events + 1)

    def score_valid(self) -> st.SearchStrategy:
        body = st.fixed_dictionaries(
            {"user_id": self.space.users, "candidates": st.lists(self.items, min_size=1, max_size=8)},
            optional={"query": self.queries, "return_topk": st.booleans()},
        )
        return body.map(lambda b: Request("/v1/score", encode(b), True))

    def score_mutated(self) -> st.SearchStrategy:
        candidates = st.lists(mutated(self.items), max_size=6) | st.just(self.over_candidates) | bad_numbers() | junk()
        body = st.fixed_dictionaries(
            {},
            optional={
                "user_id": mutated(self.space.users),
                "candidates": candidates,
                "query": mutated(self.queries) | st.text(min_size=65, max_size=300),
                "return_topk": mutated(st.booleans()),
                "extra": junk(),
            },
        )
        return body.map(lambda b: Request("/v1/score", encode(b), False))

    def event(self, valid: bool) -> st.SearchStrategy:
        fields = {"query": self.queries, "timestamp": self.timestamps}
        if valid:
            return st.fixed_dictionaries({"item_id": self.items}, optional=fields)
        return st.fixed_dictionaries(
            {}, optional={"item_id": mutated(self.items), "extra": junk(), **{k: mutated(v) for k, v in fields.items()}}
        )

    def events_valid(self) -> st.SearchStrategy:
        body = st.fixed_dictionaries(
            {"user_id": self.space.users, "events": st.lists(self.event(True), min_size=1, max_size=4)}
        )
        return body.map(lambda b: Request("/v1/events", encode(b), True))

    def events_mutated(self) -> st.SearchStrategy:
        events = (
            st.lists(self.event(True) | self.event(False), max_size=4)
            | st.just(self.over_events)
            | bad_numbers()
            | junk()
        )
        body = st.fixed_dictionaries(
            {}, optional={"user_id": mutated(self.space.users), "events": events, "extra": junk()}
        )
        return body.map(lambda b: Request("/v1/events", encode(b), False))

    def not_the_model(self) -> st.SearchStrategy:
        raw = st.sampled_from(
            [
                b"",
                b"{",
                b"null",
                b"[]",
                b"{}",
                b'{"user_id":',
                b"\xff\xfe\x00",
                b"[" * 3000,
                b'{"user_id": 1, "candidates": [1e400]}',
                b'{"user_id": NaN, "events": []}',
            ]
        )
        body = raw | st.binary(max_size=40) | st.builds(encode, junk() | bad_numbers())
        return st.tuples(st.sampled_from(["/v1/score", "/v1/events"]), body).map(lambda t: Request(t[0], t[1], False))

    def request(self) -> st.SearchStrategy:
        return st.one_of(
            self.score_valid(), self.events_valid(), self.score_mutated(), self.events_mutated(), self.not_the_model()
        )


@dataclass
class Outcome:
    """Everything the fuzz saw; `problems` lists the answers that broke a property (empty = all held)."""

    requests: int = 0
    status: Counter = field(default_factory=Counter)  # "path status" → count
    acked: dict[int, tuple[int, list[int], list[int]]] = field(default_factory=dict)  # seq → (user, items, queries)
    problems: list[str] = field(default_factory=list)
    lost_events: int = 0
    unacknowledged_in_log: int = 0

    def summary(self) -> dict:
        fivexx = sum(n for k, n in self.status.items() if k.split()[1].startswith("5"))
        return {
            "requests": self.requests,
            "status_counts": dict(sorted(self.status.items())),
            "responses_5xx": fivexx,
            "acknowledged_appends": len(self.acked),
            "lost_events": self.lost_events,
            "unacknowledged_in_log": self.unacknowledged_in_log,
            "problems": self.problems[:20],
            "problem_count": len(self.problems),
        }


def has_message(body) -> bool:
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, str):
        return bool(detail.strip())
    return bool(detail) and isinstance(detail, list) and all(isinstance(d, dict) and d.get("msg") for d in detail)


def check(req: Request, status: int, text: str, space: Space, out: Outcome) -> None:
    """Record one answer; append to out.problems when it breaks a property."""
    out.requests += 1
    out.status[f"{req.path} {status}"] += 1
    where = f"{req.path} {req.body[:300]!r} -> {status} {text[:300]}"
    if status >= 500:
        out.problems.append(f"5xx: {where}")
        return
    try:
        body = json.loads(text)
    except ValueError:
        out.problems.append(f"answer is not JSON: {where}")
        return
    if 400 <= status < 500:
        if not has_message(body):
            out.problems.append(f"4xx without a message: {where}")
        if req.valid:
            out.problems.append(f"valid request refused: {where}")
        return
    if status != 200:
        out.problems.append(f"unexpected status: {where}")
        return
    # what the app read: FastAPI parses with Python's json, then validates with the request models
    model = ScoreRequest if req.path == "/v1/score" else EventsRequest
    try:
        value = model.model_validate(json.loads(req.body))
    except ValueError as e:
        out.problems.append(f"200 for a body the request model refuses ({e}): {where}")
        return
    if isinstance(value, ScoreRequest):
        scores = body.get("scores")
        if (
            not isinstance(scores, list)
            or len(scores) != len(value.candidates)
            or not all(isinstance(s, float) and math.isfinite(s) and 0.0 <= s <= 1.0 for s in scores)
        ):
            out.problems.append(f"bad scores: {where}")
        return
    queries = [space.catalog.resolve_query(e.query)[0] for e in value.events]
    out.acked[body["seq"]] = (value.user_id, [e.item_id for e in value.events], queries)
    if body.get("appended") != len(value.events):
        out.problems.append(f"appended {body.get('appended')} of {len(value.events)}: {where}")


def log_records(store: str | Path) -> dict[int, dict]:
    path = Path(store) / LOG_FILE
    if not path.exists():
        return {}
    return {r["seq"]: r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())}


def compare_log(store: str | Path, seq_before: int, out: Outcome) -> None:
    """The log's records after seq_before are exactly the acknowledged appends, with their content."""
    records = {s: r for s, r in log_records(store).items() if s > seq_before}
    for seq, (user, items, queries) in out.acked.items():
        r = records.get(seq)
        if r is None or (r["user_id"], r["item_ids"], r["query_ids"]) != (user, items, queries):
            out.lost_events += len(items)
            out.problems.append(f"acknowledged seq {seq} ({user}, {items}, {queries}) is not in the log as sent: {r}")
    extra = sorted(records.keys() - out.acked.keys())
    out.unacknowledged_in_log = len(extra)
    if extra:
        out.problems.append(f"log records no answer acknowledged: seqs {extra[:10]}")


def fuzz(
    base_url: str, space: Space, store: str | Path, requests: int, batch: int = 25, workers: int = 4, seed: int = 0
) -> Outcome:
    """Send at least `requests` generated requests, `batch` per hypothesis example, `workers` at a time."""
    import httpx
    from hypothesis import seed as hypothesis_seed

    out = Outcome()
    seq_before = max(log_records(store), default=0)
    strategies = Strategies(space)
    examples = -(-requests // batch)
    with (
        httpx.Client(base_url=base_url, timeout=60, headers={"content-type": "application/json"}) as client,
        ThreadPoolExecutor(workers) as pool,
    ):

        def send(req: Request) -> tuple[Request, int, str]:
            r = client.post(req.path, content=req.body)
            return req, r.status_code, r.text

        @hypothesis_seed(seed)
        @settings(
            max_examples=examples,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(st.lists(strategies.request(), min_size=batch, max_size=batch))
        def run(reqs: list[Request]) -> None:
            for req, status, text in pool.map(send, reqs):
                check(req, status, text, space, out)

        run()
    compare_log(store, seq_before, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/out/fuzz.json"))
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--port", type=int, default=18331)
    ap.add_argument("--ingress", default="proxy", choices=("proxy", "direct"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from ray import serve

    from seminar_ray.testing.artefacts import build_artefacts
    from serve_app.deploy import direct_urls, start

    t0 = time.time()
    load_before = os.getloadavg()
    art = build_artefacts(
        Path(tempfile.mkdtemp(prefix="fuzz_")), num_users=30, min_len=30, max_len=200, model_max_len=256
    )
    limits = Limits()
    start(
        {"checkpoint": str(art.checkpoint), "index": str(art.index), "data": str(art.data), "store": str(art.store)},
        port=args.port,
        ingress=args.ingress,
    )
    url = direct_urls()[0] if args.ingress == "direct" else f"http://127.0.0.1:{args.port}"
    try:
        t1 = time.time()
        out = fuzz(url, Space.load(art.data, limits), art.store, args.requests, seed=args.seed)
        fuzz_s = time.time() - t1
    finally:
        serve.shutdown()
    result = {
        "ingress": args.ingress,
        "seed": args.seed,
        **out.summary(),
        "fuzz_wall_s": fuzz_s,
        "requests_per_s": out.requests / fuzz_s,
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "wall_s": time.time() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "problems"}, indent=1))
    return 0 if not out.problems else 1


if __name__ == "__main__":
    sys.exit(main())
