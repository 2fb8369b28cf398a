"""Seeded synthetic lifelong query-item sequences with planted structure (docs/design.md, Data model).

Generative story, all in a latent space of `latent_dim` dimensions:
- topics have unit centres; each item has a latent z_i near one topic centre and a long-tail
  popularity pop_i ∝ rank^(-zipf_a) (so most history ids are rare: "insufficient ID learning");
- an item's text / image channels are noisy random projections of z_i to 512-d with different
  norms (text 1.0, image 2.0, echoing the paper's μ per channel), attributes are its topic
  category, an author specialised in that topic and two hashed latent "tags"; some features are
  missing;
- each query has a latent v_q near a topic centre; its keywords come from that topic's vocabulary
  and its text embedding is a noisy view of v_q (norm 0.25);
- each user has a few interest vectors u_k with mixture weights; behaviour t keeps the previous
  interest with probability `stickiness`, else redraws one; a search behaviour picks a query of the
  interest's topic and then an item ∝ pop^a · exp(β<z, v_q>); a browse behaviour (empty query)
  picks an item ∝ pop^a · exp(β<z, u_k>). With probability `noise` the item is a random popular one.
The truth (z, pop, u, mixture weights, the interest behind each user's last behaviours) is kept in
truth.npz (`TRUTH_FILE`) so tests and the tables score candidates with an oracle.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from seminar_ray.data.queries import apply_mode, empty_queries
from seminar_ray.data.schema import FEATURE_DIM, SEQUENCES, DatasetMeta, DatasetTables, write_streamed
from seminar_ray.errors import InputError

log = logging.getLogger(__name__)


TRUTH_FILE = "truth.npz"  # the generator's latent state, written beside the tables for `Oracle`


@dataclass(frozen=True)
class SyntheticConfig:
    num_users: int = 2000
    num_items: int = 5000
    num_topics: int = 48
    queries_per_topic: int = 20
    interests_per_user: tuple[int, int] = (2, 4)
    min_len: int = 30
    max_len: int = 300
    latent_dim: int = 16
    zipf_a: float = 0.6
    beta: float = 20.0  # sharpness of the item choice around an interest or query vector
    stickiness: float = 0.8
    search_share: float = 0.3
    noise: float = 0.02
    channel_noise: float = 0.8  # per-channel noise std relative to the latent signal
    text_norm: float = 1.0
    image_norm: float = 2.0
    query_norm: float = 0.25
    missing_text: float = 0.02
    missing_image: float = 0.05
    authors_per_topic: int = 6
    words_per_topic: int = 12
    seed: int = 0

    @staticmethod
    def preset(name: str, **overrides) -> SyntheticConfig:
        """Named scales: tiny (tests), small (make run), medium, long (2,000 users × L = 1,000–2,000, the paper's
        history length at a size one machine trains), large (100k users × L = 2,000)."""
        presets: dict[str, dict] = {
            "tiny": dict(num_users=120, num_items=1500, num_topics=16, queries_per_topic=8, min_len=12, max_len=60),
            "small": dict(num_users=1500, num_items=20_000, num_topics=32, min_len=40, max_len=200),
            "medium": dict(num_users=10_000, num_items=50_000, num_topics=64, min_len=200, max_len=1000),
            "long": dict(num_users=2000, num_items=50_000, num_topics=64, min_len=1000, max_len=2000),
            "large": dict(num_users=100_000, num_items=200_000, num_topics=128, min_len=1000, max_len=2000),
        }
        if name not in presets:
            raise InputError(f"unknown synthetic preset {name!r}; choose from {sorted(presets)}")
        return replace(SyntheticConfig(**presets[name]), **overrides)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


@dataclass
class _World:
    topic_centres: np.ndarray  # [T, dl]
    item_topic: np.ndarray  # [N+1]
    item_z: np.ndarray  # [N+1, dl]
    item_logpop: np.ndarray  # [N+1]
    query_topic: np.ndarray  # [Q+1]
    query_v: np.ndarray  # [Q+1, dl]
    topic_items: list[np.ndarray]
    topic_queries: list[np.ndarray]


def _make_world(cfg: SyntheticConfig, rng: np.random.Generator) -> _World:
    n, t, dl = cfg.num_items, cfg.num_topics, cfg.latent_dim
    centres = _unit(rng.normal(size=(t, dl)))
    item_topic = np.concatenate([[0], rng.integers(0, t, size=n)])
    item_z = np.zeros((n + 1, dl))
    item_z[1:] = _unit(centres[item_topic[1:]] + 0.45 * rng.normal(size=(n, dl)))
    ranks = rng.permutation(n) + 1
    logpop = np.concatenate([[-np.inf], -cfg.zipf_a * np.log(ranks)])
    nq = t * cfg.queries_per_topic
    query_topic = np.concatenate([[-1], np.repeat(np.arange(t), cfg.queries_per_topic)])
    query_v = np.zeros((nq + 1, dl))
    query_v[1:] = _unit(centres[query_topic[1:]] + 0.35 * rng.normal(size=(nq, dl)))
    topic_items = [np.nonzero(item_topic[1:] == k)[0] + 1 for k in range(t)]
    topic_queries = [np.nonzero(query_topic == k)[0] for k in range(t)]
    return _World(centres, item_topic, item_z, logpop, query_topic, query_v, topic_items, topic_queries)


def _sample_rows(cdf: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw from the categorical with cumulative probabilities cdf[rows[j]] for every j: the number of entries
    of the (non-decreasing) row below u, found by binary search per distinct row, not a [len(rows), K] comparison."""
    u = rng.random(len(rows)) * cdf[rows, -1]
    out = np.empty(len(rows), dtype=np.int64)
    for r in np.unique(rows):
        mine = rows == r
        out[mine] = np.searchsorted(cdf[r], u[mine], side="left")
    return out.clip(0, cdf.shape[1] - 1)


def _topic_cdf(world: _World, topic: int, vecs: np.ndarray, beta: float) -> np.ndarray:
    """Cumulative P(item | vec) over the topic's items ∝ pop^a · exp(β<z, vec>), one row per vec."""
    cand = world.topic_items[topic]
    logits = beta * vecs @ world.item_z[cand].T + world.item_logpop[cand]
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return np.cumsum(p / p.sum(axis=-1, keepdims=True), axis=-1)


def _query_cdfs(cfg: SyntheticConfig, world: _World) -> list[np.ndarray]:
    """Per topic: [queries of the topic, items of the topic] cumulative item choice given the query."""
    return [_topic_cdf(world, k, world.query_v[world.topic_queries[k]], cfg.beta) for k in range(cfg.num_topics)]


def _sticky_chain(first: int, redraw: np.ndarray, fresh: np.ndarray) -> np.ndarray:
    """ks[0] = first; ks[s] = fresh[s] where redraw[s] (s ≥ 1), else ks[s - 1]: each position takes the draw of the
    last redraw at or before it (a forward fill, no Python loop over behaviours)."""
    idx = np.where(redraw, np.arange(len(redraw)), 0)
    idx[:1] = 0
    last = np.maximum.accumulate(idx)
    return np.where(last > 0, fresh[last], first).astype(np.int64)


def _user_sequence(
    cfg: SyntheticConfig, world: _World, rng: np.random.Generator, pop_cdf: np.ndarray, query_cdfs: list[np.ndarray]
):
    m = int(rng.integers(cfg.interests_per_user[0], cfg.interests_per_user[1] + 1))
    topics = rng.choice(cfg.num_topics, size=m, replace=False)
    interests = _unit(world.topic_centres[topics] + 0.35 * rng.normal(size=(m, cfg.latent_dim)))
    weights = rng.dirichlet(np.full(m, 1.0))
    length = int(rng.integers(cfg.min_len, cfg.max_len + 1))
    first = rng.choice(m, p=weights)  # interest chain: sticky Markov over the user's mixture
    redraw = rng.random(length) > cfg.stickiness
    fresh = rng.choice(m, size=length, p=weights)
    ks = _sticky_chain(int(first), redraw, fresh)
    is_search = rng.random(length) < cfg.search_share
    queries = np.zeros(length, dtype=np.int64)
    items = np.empty(length, dtype=np.int64)
    for k in range(m):
        topic = topics[k]
        cand = world.topic_items[topic]
        if len(cand) == 0:
            continue
        rows = np.nonzero(ks == k)[0]
        browse = rows[~is_search[rows]]
        items[browse] = cand[
            _sample_rows(
                _topic_cdf(world, topic, interests[k : k + 1], cfg.beta), np.zeros(len(browse), dtype=np.int64), rng
            )
        ]
        search = rows[is_search[rows]]
        tq = world.topic_queries[topic]
        q_p = np.exp(cfg.beta * (world.query_v[tq] @ interests[k]))
        q_local = _sample_rows(np.cumsum(q_p / q_p.sum())[None, :], np.zeros(len(search), dtype=np.int64), rng)
        queries[search] = tq[q_local]
        items[search] = cand[_sample_rows(query_cdfs[topic], q_local, rng)]
    noisy = rng.random(length) < cfg.noise
    items[noisy] = (
        np.searchsorted(pop_cdf, rng.random(int(noisy.sum())) * pop_cdf[-1], side="right").clip(0, cfg.num_items - 1)
        + 1
    )
    return items, queries, ks, interests, weights, topics


def _channels(cfg: SyntheticConfig, world: _World, rng: np.random.Generator):
    dl = cfg.latent_dim

    def view(latent, norm, seed_shift):
        proj = np.random.default_rng(cfg.seed + seed_shift).normal(size=(dl, FEATURE_DIM)) / np.sqrt(dl)
        x = latent @ proj + cfg.channel_noise * rng.normal(size=(len(latent), FEATURE_DIM)) / np.sqrt(
            FEATURE_DIM
        ) * np.sqrt(dl)
        scale = norm * np.exp(0.1 * rng.normal(size=(len(latent), 1)))
        return (_unit(x) * scale).astype(np.float32)

    text = view(world.item_z[1:], cfg.text_norm, 101)
    image = view(world.item_z[1:], cfg.image_norm, 202)
    qtext = view(world.query_v[1:], cfg.query_norm, 303)
    return text, image, qtext


def _fixed_list(matrix: np.ndarray, present: np.ndarray) -> pa.Array:
    values = pa.array(matrix.reshape(-1), type=pa.float32())
    if present.all():
        return pa.FixedSizeListArray.from_arrays(values, FEATURE_DIM)
    # nulls by a validity mask over the same values (a Python list of every float cost ~6 GB and minutes at 200k items)
    return pa.FixedSizeListArray.from_arrays(values, FEATURE_DIM, mask=pa.array(~present))


def _attributes(cfg: SyntheticConfig, world: _World, rng: np.random.Generator) -> tuple[list[list[int]], int]:
    """Attribute ids: category (1..T), author (topic-specialised), two hashed latent tags."""
    n, t = cfg.num_items, cfg.num_topics
    cat = world.item_topic[1:] + 1
    flip = rng.random(n) < 0.1
    cat[flip] = rng.integers(1, t + 1, size=int(flip.sum()))
    author = t + 1 + world.item_topic[1:] * cfg.authors_per_topic + rng.integers(0, cfg.authors_per_topic, size=n)
    tag_base = t + 1 + t * cfg.authors_per_topic
    planes = np.random.default_rng(cfg.seed + 7).normal(size=(2, 4, cfg.latent_dim))
    bits = (np.einsum("gbd,nd->gnb", planes, world.item_z[1:]) > 0).astype(np.int64)
    codes = bits @ (1 << np.arange(4))  # [2, n] in 0..15
    tags = tag_base + np.arange(2)[:, None] * 16 + codes
    attrs = np.stack([cat, author, tags[0], tags[1]], axis=1).astype(np.int32)
    return attrs.tolist(), int(tag_base + 32 - 1)


def _words(cfg: SyntheticConfig, topic: int, idx: np.ndarray) -> list[str]:
    return [f"t{topic}w{int(i)}" for i in idx]


USER_CHUNK = 2048  # users handed on at a time (8 row groups of 256): at the large preset ~70 MB, not ~4 GB of them all


def generate(cfg: SyntheticConfig, progress: bool = False) -> DatasetTables:
    """Generate the three tables and the truth for an oracle; deterministic for a given config."""
    chunks: list[pa.Table] = []
    tables = _generate(cfg, chunks.append, progress)
    sequences = pa.concat_tables(chunks).combine_chunks() if chunks else tables.sequences
    return DatasetTables(tables.items, tables.queries, sequences, tables.meta, tables.extra_files)


@dataclass
class _Users:
    """What the truth keeps of every user, gathered while their sequences are handed on in chunks."""

    interests: list[np.ndarray]
    weights: list[np.ndarray]
    last_ks: list[np.ndarray]
    topics: list[np.ndarray]
    behaviours: int = 0


def _generate(cfg: SyntheticConfig, sink: Callable[[pa.Table], None], progress: bool) -> DatasetTables:
    """Generate, passing the sequences to `sink` in chunks of USER_CHUNK users (in user order); the returned tables
    carry an empty sequences table. The draws are those of one pass over every user, whatever the chunking."""
    rng = np.random.default_rng(cfg.seed)
    world = _make_world(cfg, rng)
    text, image, qtext = _channels(cfg, world, rng)
    attrs, num_attrs = _attributes(cfg, world, rng)
    n, nq = cfg.num_items, len(world.query_topic) - 1
    # titles: words of the item's topic chosen by its latent; queries: 1-3 topic keywords
    title_words = [
        " ".join(_words(cfg, int(world.item_topic[i]), rng.choice(cfg.words_per_topic, size=4, replace=False)))
        for i in range(1, n + 1)
    ]
    q_tokens: list[list[int]] = [[]]
    q_text: list[str | None] = [None]
    for q in range(1, nq + 1):
        k = int(world.query_topic[q])
        idx = rng.choice(cfg.words_per_topic, size=int(rng.integers(1, 4)), replace=False)
        q_tokens.append([int(k * cfg.words_per_topic + i + 1) for i in idx])
        q_text.append(" ".join(_words(cfg, k, idx)))
    users = _all_users(cfg, world, rng, sink, progress)
    missing_t = rng.random(n) < cfg.missing_text
    missing_i = rng.random(n) < cfg.missing_image
    items_tbl = pa.table(
        {
            "item_id": np.arange(1, n + 1, dtype=np.int64),
            "title": pa.array([None if m else t for t, m in zip(title_words, missing_t)], type=pa.string()),
            "attr_ids": pa.array(attrs, type=pa.list_(pa.int32())),
            "image_ref": pa.array([None] * n, type=pa.string()),
            "text_emb": _fixed_list(text, ~missing_t),
            "image_emb": _fixed_list(image, ~missing_i),
        }
    )
    qtext_full = np.zeros((nq + 1, FEATURE_DIM), dtype=np.float32)
    qtext_full[1:] = qtext
    present_q = np.ones(nq + 1, dtype=bool)
    present_q[0] = False
    queries_tbl = pa.table(
        {
            "query_id": np.arange(0, nq + 1, dtype=np.int64),
            "token_ids": pa.array(q_tokens, type=pa.list_(pa.int32())),
            "text": pa.array(q_text, type=pa.string()),
            "text_emb": _fixed_list(qtext_full, present_q),
        }
    )
    meta = DatasetMeta(
        source="synthetic",
        num_items=n,
        num_queries=nq,
        num_attrs=num_attrs,
        num_tokens=cfg.num_topics * cfg.words_per_topic,
        num_users=cfg.num_users,
        num_behaviours=users.behaviours,
        extra={"config": asdict(cfg), "timestamp_unit": "s"},
    )
    truth = _truth_npz(cfg, world, users.interests, users.weights, users.last_ks, users.topics)
    return DatasetTables(items_tbl, queries_tbl, SEQUENCES.empty_table(), meta, {TRUTH_FILE: truth})


def _all_users(
    cfg: SyntheticConfig, world: _World, rng: np.random.Generator, sink: Callable[[pa.Table], None], progress: bool
) -> _Users:
    """Every user's sequence, in order, handed to `sink` USER_CHUNK users at a time."""
    pop_cdf = np.cumsum(np.exp(world.item_logpop[1:]))
    query_cdfs = _query_cdfs(cfg, world)
    users = _Users([], [], [], [])
    seq_items: list[np.ndarray] = []
    seq_queries: list[np.ndarray] = []
    seq_ts: list[np.ndarray] = []
    for u in range(cfg.num_users):
        items, queries, ks, ints, w, tps = _user_sequence(cfg, world, rng, pop_cdf, query_cdfs)
        users.topics.append(tps)
        start = int(rng.integers(1_600_000_000, 1_700_000_000))
        ts = start + np.cumsum(rng.exponential(3600.0, size=len(items)).astype(np.int64) + 1)
        seq_items.append(items)
        seq_queries.append(queries)
        seq_ts.append(ts)
        users.interests.append(ints)
        users.weights.append(w)
        users.last_ks.append(ks[-3:])
        if len(seq_items) == USER_CHUNK or u + 1 == cfg.num_users:
            first = u + 1 - len(seq_items)
            sink(_sequences_chunk(first, seq_items, seq_queries, seq_ts))
            users.behaviours += sum(len(s) for s in seq_items)
            seq_items, seq_queries, seq_ts = [], [], []
        if progress and (u + 1) % max(1, cfg.num_users // 10) == 0:
            log.info("synthetic: %d/%d users", u + 1, cfg.num_users)
    return users


def _sequences_chunk(first_user: int, items: list[np.ndarray], queries: list[np.ndarray], ts: list[np.ndarray]):
    return pa.table(
        {
            "user_id": np.arange(first_user, first_user + len(items), dtype=np.int64),
            "item_ids": _list_column(items),
            "query_ids": _list_column(queries),
            "timestamps": _list_column(ts),
        }
    )


def _list_column(arrays: list[np.ndarray]) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(arrays).astype(np.int64)))


def _truth_npz(cfg, world: _World, interests, weights, last_ks, user_topics) -> bytes:
    m_max = cfg.interests_per_user[1]
    u_vec = np.zeros((cfg.num_users, m_max, cfg.latent_dim), dtype=np.float32)
    u_w = np.zeros((cfg.num_users, m_max), dtype=np.float32)
    u_topic = np.full((cfg.num_users, m_max), -1, dtype=np.int64)
    last = np.full((cfg.num_users, 3), -1, dtype=np.int64)
    for u, (ints, w, ks, tps) in enumerate(zip(interests, weights, last_ks, user_topics)):
        u_vec[u, : len(ints)], u_w[u, : len(w)], u_topic[u, : len(tps)] = ints, w, tps
        last[u, 3 - len(ks) :] = ks
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        item_z=world.item_z.astype(np.float32),
        item_logpop=world.item_logpop,
        query_v=world.query_v.astype(np.float32),
        user_interests=u_vec,
        user_weights=u_w,
        user_topics=u_topic,
        item_topic=world.item_topic,
        query_topic=world.query_topic,
        last_interest=last,
        beta=cfg.beta,
        stickiness=cfg.stickiness,
        noise=cfg.noise,
    )
    return buf.getvalue()


def generate_to_dir(cfg: SyntheticConfig, out_dir: str | Path, progress: bool = False, mode: str | None = None) -> Path:
    """Generate and write, streaming the sequences in chunks of users (schema.write_streamed): peak memory is the
    item tables and one chunk of users, not every behaviour. Same files as generate(cfg).write(out_dir), or with a
    query `mode` (queries.py) as apply_mode(generate(cfg), mode).write(out_dir)."""
    nq = 0 if mode == "none" else cfg.num_topics * cfg.queries_per_topic

    def build(sink: Callable[[pa.Table], None]) -> DatasetTables:
        chunk_sink = (lambda chunk: sink(empty_queries(chunk))) if mode == "none" else sink
        tables = _generate(cfg, chunk_sink, progress)
        return tables if mode is None else apply_mode(tables, mode)

    return write_streamed(out_dir, cfg.num_items, nq, build)


class Oracle:
    """Scores candidates with the generator's own probabilities (the planted-structure check; docs/design.md, Data
    model)."""

    def __init__(self, truth_path: str | Path):
        t = np.load(truth_path)
        self.item_z, self.logpop, self.item_topic = t["item_z"], t["item_logpop"], t["item_topic"]
        self.query_v, self.query_topic = t["query_v"], t["query_topic"]
        self.u_vec, self.u_w, self.u_topic = t["user_interests"], t["user_weights"], t["user_topics"]
        self.last = t["last_interest"]
        self.beta, self.stick, self.noise = float(t["beta"]), float(t["stickiness"]), float(t["noise"])
        pop = np.exp(self.logpop[1:])
        self.pop_p = np.concatenate([[0.0], pop / pop.sum()])

    def _p_given(self, vec: np.ndarray, topic: int, candidates: np.ndarray) -> np.ndarray:
        """P(candidate | interest or query vector), the generator's choice restricted to the topic."""
        in_topic = np.nonzero(self.item_topic == topic)[0]
        logits = self.beta * self.item_z[in_topic] @ vec + self.logpop[in_topic]
        log_norm = logits.max() + np.log(np.exp(logits - logits.max()).sum())
        cand = self.beta * self.item_z[candidates] @ vec + self.logpop[candidates] - log_norm
        return np.where(self.item_topic[candidates] == topic, np.exp(cand), 0.0)

    def score(self, user: int, query: int, candidates: np.ndarray, split: str = "test") -> np.ndarray:
        """log P(candidate | the user's latent state, the target's query) for the test or valid target."""
        if query != 0:
            p = self._p_given(self.query_v[query], int(self.query_topic[query]), candidates)
        else:
            live = np.nonzero(self.u_w[user] > 0)[0]
            w = self.u_w[user][live] * (1 - self.stick)
            prev = self.last[user, 1 if split == "test" else 0]
            w[live == prev] += self.stick
            p = sum(
                wk * self._p_given(self.u_vec[user, k], int(self.u_topic[user, k]), candidates)
                for wk, k in zip(w, live)
            )
        return np.log((1 - self.noise) * p + self.noise * self.pop_p[candidates] + 1e-300)
