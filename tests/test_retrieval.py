"""Retrieval: PQ codecs, scorers, the serving shortlist + re-rank, and the index artefact (paper §3.3.3;
docs/design.md, Retrieval)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from seminar_ray.retrieval.index import CHANNEL_PARTS, PQIndex, UnknownIdError, build_index
from seminar_ray.retrieval.quantizer import DimensionMismatchError, PQCodec, capped_centroids
from seminar_ray.retrieval.reference import (
    CascadingHNSWRetriever,
    ChannelADCRetriever,
    LSHRetriever,
    RQRetriever,
    SymmetricPQRetriever,
)
from seminar_ray.retrieval.retrievers import ADCRetriever, ExactRetriever, PQRerankRetriever, SketchRerankRetriever
from seminar_ray.retrieval.sketch import KeySketch
from seminar_ray.retrieval.tables import GSUTables

D = 16


def make_tables(n_queries: int = 1500, n_items: int = 3000, seed: int = 0) -> GSUTables:
    rng = np.random.default_rng(seed)
    gamma = rng.dirichlet(np.ones(3), size=n_items + 1).astype(np.float32) * 0.5
    gamma[0] = 0
    channels = rng.standard_normal((n_items + 1, 3, D)).astype(np.float32) + np.array([0.5, 1.0, 2.0])[:, None]
    channels[0] = 0
    return GSUTables(channels, gamma, rng.standard_normal((n_queries + 1, D)).astype(np.float32), 0.5)


@pytest.fixture(scope="module")
def tables() -> GSUTables:
    return make_tables()


@pytest.fixture(scope="module")
def index(tables) -> PQIndex:
    return build_index(tables, "test-v1", n_sub=4, n_centroids=16)


def history(tables: GSUTables, L: int = 400, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    hi = rng.integers(1, len(tables.item_channels), L)
    hq = np.where(rng.random(L) < 0.5, 0, rng.integers(1, len(tables.query_channel), L))
    return hq, hi


def targets(tables: GSUTables, C: int = 6, seed: int = 2):
    rng = np.random.default_rng(seed)
    items = rng.integers(1, len(tables.item_channels), C)
    queries = rng.integers(0, len(tables.query_channel), C)
    vectors = np.concatenate([tables.item_channels[items], tables.query_channel[queries][:, None]], axis=1)
    weights = np.concatenate([tables.item_gamma[items], np.full((C, 1), tables.query_gamma)], axis=1)
    return np.einsum("cp,cpd->cd", weights, vectors).astype(np.float32), (vectors, weights.astype(np.float32))


def exact_scores(tables, hq, hi, u):
    return u @ tables.keys(hq, hi).T


def test_adc_equals_exact_when_codebook_is_the_data():
    rng = np.random.default_rng(0)
    n_sub, k = 4, 8
    atoms = rng.standard_normal((n_sub, k, D // n_sub)).astype(np.float32)  # k distinct sub-vectors per slot
    pick = lambda n: np.concatenate([atoms[b][rng.integers(0, k, n)] for b in range(n_sub)], axis=1)
    items = np.zeros((201, 3, D), np.float32)
    items[1:] = pick(600).reshape(200, 3, D)
    t = GSUTables(items, np.full((201, 3), 0.3, np.float32), pick(51), 0.5)
    codec = PQCodec.from_centroids(atoms)
    assert np.array_equal(codec.decode(codec.encode(t.item_channels[1:, 0])), t.item_channels[1:, 0])
    hq, hi = np.arange(1, 51).repeat(4), np.arange(1, 201)
    u = rng.standard_normal((5, D)).astype(np.float32)
    index = PQIndex(
        version="lossless",
        codecs={p: codec for p in CHANNEL_PARTS},
        codes={p: codec.encode(t.item_channels[:, j]) for j, p in enumerate(CHANNEL_PARTS[:3])}
        | {"query_Q": codec.encode(t.query_channel)},
        query_gamma=t.query_gamma,
        item_gamma=t.item_gamma,
        query_exact=t.query_folded().astype(np.float16),
        item_exact=t.item_folded().astype(np.float16),
    )
    adc = ChannelADCRetriever(index)
    np.testing.assert_allclose(adc.scores(hq, hi, u), exact_scores(t, hq, hi, u), rtol=1e-4, atol=1e-4)
    exact_top = ExactRetriever.from_tables(t).topk(hq, hi, u, 16)
    assert np.array_equal(np.sort(adc.topk(hq, hi, u, 16), 1), np.sort(exact_top, 1))


def test_symmetric_lookups_equal_decoded_inner_products(tables, index):
    hq, hi = history(tables, 200)
    u, (vec, w) = targets(tables)
    sym = SymmetricPQRetriever(index)
    codecs = index.codecs
    target_hat = sum(w[:, i, None] * codecs[p].decode(codecs[p].encode(vec[:, i])) for i, p in enumerate(CHANNEL_PARTS))
    keys_hat = sum(
        tables.item_gamma[hi, j, None] * codecs[p].decode(index.codes[p][hi]) for j, p in enumerate(CHANNEL_PARTS[:3])
    )
    keys_hat = keys_hat + tables.query_gamma * codecs["query_Q"].decode(index.codes["query_Q"][hq])
    np.testing.assert_allclose(sym.scores(hq, hi, u, (vec, w)), target_hat @ keys_hat.T, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="target_channels"):
        sym.topk(hq, hi, u, 8)


def test_adc_folded_scores_equal_decoded_inner_products(tables, index):
    hq, hi = history(tables, 100)
    u, _ = targets(tables)
    c = index.codecs
    dec = c["item_folded"].decode(index.codes["item_folded"][hi]) + c["query_folded"].decode(
        index.codes["query_folded"][hq]
    )
    np.testing.assert_allclose(ADCRetriever(index).scores(hq, hi, u), u @ dec.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_items,n_centroids", [(3000, 16), (10000, 256), (3000, 64)])  # fast-scan, 8-bit, numpy
def test_shortlist_of_whole_history_is_exact(n_items, n_centroids):
    tables = make_tables(n_items, n_items)
    index = build_index(tables, "v", forms=("folded",), n_sub=4, n_centroids=n_centroids)
    assert PQRerankRetriever(index).pair is None if n_centroids == 64 else PQRerankRetriever(index).pair is not None
    hq, hi = history(tables, 300)
    hi[:20] = 0  # left padding is never returned
    u, _ = targets(tables)
    K = 32
    serving = PQRerankRetriever(index, rerank_factor=300 // K + 1)
    got = serving.topk(hq, hi, u, K)
    want = ExactRetriever.from_tables(tables).topk(hq, hi, u, K)
    assert not np.isin(np.arange(20), got).any()
    scores = exact_scores(tables, hq, hi, u)
    np.testing.assert_allclose(
        np.take_along_axis(scores, got, 1), np.take_along_axis(scores, want, 1), rtol=2e-3, atol=2e-3
    )


def test_serving_and_baselines_run_and_pad(tables, index):
    hq, hi = history(tables, 40)
    hi[:30] = 0  # 10 valid behaviours, K = 16 → 6 columns of -1
    u, tc = targets(tables)
    retrievers = [
        ExactRetriever.from_tables(tables),
        ADCRetriever(index),
        ChannelADCRetriever(index),
        SymmetricPQRetriever(index),
        PQRerankRetriever(index, 2),
        SketchRerankRetriever(index),
        CascadingHNSWRetriever(tables),
        LSHRetriever(tables, n_bits=64),
        RQRetriever(tables, n_levels=2, nbits=4),
    ]
    for r in retrievers:
        got = r.topk(hq, hi, u, 16, tc)
        assert got.shape == (len(u), 16) and got.dtype == np.int64, r.name
        assert (got[:, 10:] == -1).all() and np.array_equal(
            np.sort(got[:, :10], 1), np.tile(np.arange(30, 40), (len(u), 1))
        ), r.name


def test_every_retriever_answers_an_empty_history_with_an_empty_topk(tables, index):
    u, _ = targets(tables)
    empty = np.zeros(0, np.int64)
    for r in (
        ExactRetriever.from_tables(tables),
        PQRerankRetriever(index),
        ChannelADCRetriever(index),
        SketchRerankRetriever(index),
    ):
        assert r.topk(empty, empty, u, 32).shape == (len(u), 0)


def test_saved_index_memory_mapped_back_retrieves_the_same(tmp_path, tables, index):
    hq, hi = history(tables)
    u, tc = targets(tables)
    path = index.save(tmp_path / "idx")
    loaded = PQIndex.load(path, mmap=True)
    assert loaded.version == "test-v1" and isinstance(loaded.codes["item_folded"], np.memmap)
    assert loaded.sketch is not None and isinstance(loaded.sketch.item_codes, np.memmap)
    for make in (
        lambda i: PQRerankRetriever(i, 4),
        lambda i: ChannelADCRetriever(i),
        SymmetricPQRetriever,
        SketchRerankRetriever,
    ):
        assert np.array_equal(make(index).topk(hq, hi, u, 32, tc), make(loaded).topk(hq, hi, u, 32, tc))
    index.save(path)  # overwrite in place is atomic and leaves no temp dirs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_wrong_dimension_and_unknown_ids_raise_named_errors(tables, index):
    hq, hi = history(tables, 50)
    serving = PQRerankRetriever(index)
    with pytest.raises(DimensionMismatchError, match=r"\[C, 16\]"):
        serving.topk(hq, hi, np.zeros((3, D + 1), np.float32), 8)
    bad = hi.copy()
    bad[7] = 10**6
    with pytest.raises(UnknownIdError, match=f"item id 1000000.*{len(tables.item_channels)} rows"):
        serving.topk(hq, bad, np.zeros((3, D), np.float32), 8)
    with pytest.raises(KeyError):
        ExactRetriever.from_tables(tables).topk(hq - 5, hi, np.zeros((3, D), np.float32), 8)
    with pytest.raises(DimensionMismatchError):
        index.codecs["item_folded"].encode(np.zeros((2, D + 4), np.float32))


def test_centroid_cap_warns_and_still_builds():
    small = make_tables(n_queries=100, n_items=300, seed=3)
    with pytest.warns(UserWarning, match="capped from 256 to"):
        index = build_index(small, "small", n_sub=4, n_centroids=256)
    assert all(c.n_centroids * 39 <= 300 for c in index.codecs.values())
    assert capped_centroids(10**5, 256) == 256
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        capped_centroids(39 * 512, 512)


def test_sketch_rerank_whole_history_is_exact_and_default_margin_recalls(tables):
    index = build_index(tables, "sketch4", forms=("folded",), n_sub=4, n_centroids=16, sketch_dim=4)
    hq, hi = history(tables, 600)
    u, _ = targets(tables)
    K = 16
    want = ExactRetriever.from_tables(tables).topk(hq, hi, u, K)
    scores = exact_scores(tables, hq, hi, u)
    wide = SketchRerankRetriever(index, z=1e6)  # a margin wider than any score gap: the union is the whole history
    got = wide.topk(hq, hi, u, K)
    assert wide.last_union == len(hi)
    np.testing.assert_allclose(
        np.take_along_axis(scores, got, 1), np.take_along_axis(scores, want, 1), rtol=2e-3, atol=2e-3
    )
    serving = SketchRerankRetriever(index)  # 3σ margin: shortlists a fraction, still finds the exact top-K
    got = serving.topk(hq, hi, u, K)
    kth = np.take_along_axis(scores, want[:, -1:], 1)
    assert serving.last_union < len(hi)
    assert (np.take_along_axis(scores, got, 1) >= kth - 2e-3).mean() >= 0.95


def test_sketch_of_full_dimension_has_no_error_term():
    small = make_tables(n_queries=200, n_items=500, seed=4)
    sketch = KeySketch.fit(small.query_folded(), small.item_folded(), sketch_dim=D)
    u, _ = targets(small)
    weights, sigma = sketch.target(u)
    assert np.allclose(sigma, 0, atol=1e-3)
    hq, hi = history(small, 100)
    approx = sketch.scores(hq, hi, weights)
    exact = exact_scores(small, hq, hi, u)
    assert np.abs(approx - exact).max() < 0.02 * np.abs(exact).max()  # int8 rounding only
    with pytest.raises(DimensionMismatchError):
        sketch.target(np.zeros((2, D + 1), np.float32))
    with pytest.raises(ValueError, match="sketch_dim"):
        KeySketch.fit(small.query_folded(), small.item_folded(), sketch_dim=D + 1)
