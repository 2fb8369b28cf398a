"""Building the index with Ray Data end to end: a tiny SEMINAR checkpoint → Ray Data encoding → a loadable index
(docs/design.md, Retrieval)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs.build_index import index_checkpoint
from seminar_ray.data.entities import EntityTables
from seminar_ray.models import ModelConfig, build_model, export_gsu_tables, save_checkpoint
from seminar_ray.retrieval.encode import fit_n_sub, part_vectors
from seminar_ray.retrieval.index import PQIndex
from seminar_ray.retrieval.retrievers import ExactRetriever, SketchRerankRetriever


@pytest.fixture(scope="module")
def checkpoint(tiny_data, tmp_path_factory):
    cfg = ModelConfig.preset("small")
    model = build_model("seminar", cfg, EntityTables.load(tiny_data))
    return save_checkpoint(model, cfg, tmp_path_factory.mktemp("ckpt") / "seminar").parent, model


def test_index_built_with_ray_data_loads_and_ranks_like_the_model(ray_local, tiny_data, checkpoint, tmp_path):
    ckpt_dir, model = checkpoint
    out = tmp_path / "index"
    index_checkpoint(ckpt_dir, tiny_data, out, n_sub=4, n_centroids=16, folded_n_sub=8, folded_n_centroids=16, actors=1)
    index = PQIndex.load(out)
    gsu = export_gsu_tables(model)
    assert index.num_items == len(gsu.item_channels) and index.num_queries == len(gsu.query_channel)
    assert index.version.startswith("seminar-pq4x16") and index.sketch is not None
    for part in ("item_T", "query_Q", "item_folded"):  # Ray Data kept the rows in id order
        vectors = part_vectors(gsu)[part]
        assert np.array_equal(index.codes[part], index.codecs[part].encode(vectors)), part
    np.testing.assert_allclose(index.item_exact, gsu.item_folded(), rtol=1e-2, atol=1e-3)

    rng = np.random.default_rng(0)
    hi = rng.integers(1, index.num_items, 300)
    hq = np.where(rng.random(300) < 0.5, rng.integers(1, index.num_queries, 300), 0)
    with torch.no_grad():
        u = model.gsu_target_vectors(
            target_items=torch.from_numpy(hi[:8]), target_queries=torch.from_numpy(hq[:8])
        ).numpy()
    exact = ExactRetriever.from_tables(gsu)
    want, got = exact.topk(hq, hi, u, 16), SketchRerankRetriever(index).topk(hq, hi, u, 16)
    scores = exact.scores(hq, hi, u)
    kth = np.take_along_axis(scores, want[:, -1:], 1)
    assert (np.take_along_axis(scores, got, 1) >= kth - 1e-3 * np.abs(kth).max()).mean() >= 0.99


def test_sub_vector_count_is_capped_to_a_divisor_of_d():
    with pytest.warns(UserWarning, match="--folded-n-sub 32 does not divide the model's d = 16: using 16"):
        assert fit_n_sub(16, 32, "--folded-n-sub") == 16
    with pytest.warns(UserWarning, match="using 4"):
        assert fit_n_sub(12, 5, "--n-sub") == 4
    assert fit_n_sub(64, 8, "--n-sub") == 8
