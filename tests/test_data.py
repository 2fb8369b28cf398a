"""The data layer: schema, generator, splits, negative sampling, the Ray Data pipeline and bad input."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seminar_ray.data.entities import EntityTables
from seminar_ray.data.errors import DataError
from seminar_ray.data.schema import (
    ITEMS,
    QUERIES,
    SEQUENCES,
    DatasetMeta,
    DatasetTables,
    conform,
    read_table,
    write_dataset,
)
from seminar_ray.data.splits import (
    SampleConfig,
    SequenceBatch,
    candidates_digest,
    eval_batch,
    eval_users,
    sample_negatives,
    train_batch,
    train_positions,
)
from seminar_ray.data.synthetic import TRUTH_FILE, Oracle, SyntheticConfig, generate
from seminar_ray.metrics import ranking_metrics
from seminar_ray.rule_rankers import oracle_scores


@pytest.fixture(scope="module")
def seqs(tiny_data) -> SequenceBatch:
    return SequenceBatch.from_arrow(read_table(tiny_data, "sequences"))


@pytest.fixture(scope="module")
def cfg(tiny_data) -> SampleConfig:
    return SampleConfig(max_len=32, num_items=DatasetMeta.load(tiny_data).num_items, num_neg=5, samples_per_user=4)


def test_written_tables_have_the_declared_schemas_and_load_as_id_indexed_features(tiny_data):
    for name, schema in (("items", ITEMS), ("queries", QUERIES), ("sequences", SEQUENCES)):
        assert read_table(tiny_data, name).schema.equals(schema, check_metadata=False), name
    fresh = generate(SyntheticConfig.preset("tiny"))
    assert read_table(tiny_data, "sequences").equals(fresh.sequences.cast(SEQUENCES))
    tables = EntityTables.load(tiny_data)
    n, q = tables.meta.num_items, tables.meta.num_queries
    assert tables.item_text.shape == (n + 1, 512) and tables.query_text.shape == (q + 1, 512)
    assert not tables.item_text_mask[0] and not tables.query_text_mask[0]
    assert (~tables.item_image_mask[1:]).sum() > 0, "the generator plants missing image features"
    np.testing.assert_array_equal(tables.item_image[~tables.item_image_mask], 0.0)
    items = read_table(tiny_data, "items")
    first_text = items.column("text_emb")[0]
    if first_text.is_valid:
        np.testing.assert_array_equal(
            tables.item_text[items.column("item_id")[0].as_py()], np.asarray(first_text.as_py(), dtype=np.float32)
        )


def test_generator_is_deterministic_and_seeded():
    cfg = replace(SyntheticConfig.preset("tiny"), num_users=30)
    a, b, c = generate(cfg), generate(cfg), generate(replace(cfg, seed=1))
    for name in ("items", "queries", "sequences"):
        assert getattr(a, name).equals(getattr(b, name)), name
    assert not a.sequences.equals(c.sequences)


def test_planted_structure_lets_an_oracle_beat_popularity(tiny_data, seqs):
    """An oracle scoring by the user's latent interests ranks well; popularity alone does not; most ids are rare."""
    cfg = SampleConfig(max_len=64, num_items=DatasetMeta.load(tiny_data).num_items)
    ev = eval_batch(seqs, "test", cfg)
    scores = oracle_scores(Oracle(tiny_data / TRUTH_FILE), "test", ev)
    counts = np.bincount(seqs.items, minlength=cfg.num_items + 1)
    assert ranking_metrics(scores)["ndcg@10"] >= 0.8
    assert ranking_metrics(counts[ev["target_items"]].astype(float))["ndcg@10"] <= 0.35
    assert (counts[np.unique(seqs.items)] <= 5).mean() > 0.5
    search_share = (seqs.queries > 0).mean()
    assert 0.2 < search_share < 0.4


def test_eval_targets_are_the_last_behaviours_against_99_unseen_negatives(seqs, cfg):
    test, valid = eval_batch(seqs, "test", cfg), eval_batch(seqs, "valid", cfg)
    assert test["target_items"].shape == (len(seqs.lengths), 100)
    for j, u in enumerate(test["user_id"]):
        row = int(np.nonzero(seqs.user_id == u)[0][0])
        items, queries = seqs.user_items(row), seqs.queries[seqs.offsets[row] : seqs.offsets[row + 1]]
        assert test["target_items"][j, 0] == items[-1] and valid["target_items"][j, 0] == items[-2]
        assert (test["target_queries"][j] == queries[-1]).all(), "all candidates carry the positive's query"
        negs = test["target_items"][j, 1:]
        assert len(np.unique(negs)) == 99 and not np.isin(negs, items).any()
        hist = test["hist_items"][j]
        real = hist[hist > 0]
        np.testing.assert_array_equal(real, items[:-1][-cfg.max_len :])
        assert (hist[: cfg.max_len - len(real)] == 0).all(), "left-padded"
    again = eval_batch(seqs, "test", cfg)
    np.testing.assert_array_equal(again["target_items"], test["target_items"])
    # the model's seed never moves the evaluation negatives; only the protocol's eval_seed does
    np.testing.assert_array_equal(eval_batch(seqs, "test", replace(cfg, seed=7))["target_items"], test["target_items"])
    assert not np.array_equal(
        eval_batch(seqs, "test", replace(cfg, eval_seed=7))["target_items"][:, 1:], test["target_items"][:, 1:]
    )


def test_eval_users_are_a_fixed_seeded_subset_in_any_block_order(seqs, cfg):
    users = eval_users(seqs.user_id, seqs.lengths, 30, eval_seed=0)
    assert len(users) == 30 and np.array_equal(users, np.sort(users))
    np.testing.assert_array_equal(users, eval_users(seqs.user_id[::-1], seqs.lengths[::-1], 30, eval_seed=0))
    assert not np.array_equal(users, eval_users(seqs.user_id, seqs.lengths, 30, eval_seed=1))
    assert eval_users(seqs.user_id, seqs.lengths, 0) is None
    picked = eval_batch(seqs, "valid", cfg, users)
    np.testing.assert_array_equal(np.sort(picked["user_id"]), users)
    full = eval_batch(seqs, "valid", cfg)
    rows = np.isin(full["user_id"], users)
    assert candidates_digest(picked["user_id"], picked["target_items"]) == candidates_digest(
        full["user_id"][rows][::-1], full["target_items"][rows][::-1]
    ), "the digest ignores row order"


def test_train_positions_are_seeded_fresh_per_epoch_and_exclude_eval(seqs, cfg):
    rows0, pos0 = train_positions(seqs, cfg, epoch=0)
    rows0b, pos0b = train_positions(seqs, cfg, epoch=0)
    _, pos1 = train_positions(seqs, cfg, epoch=1)
    np.testing.assert_array_equal(pos0, pos0b)
    assert not np.array_equal(pos0, pos1)
    assert (pos0 >= 1).all() and (pos0 <= seqs.lengths[rows0] - 3).all()


def test_train_negatives_share_the_target_query_for_ctr_and_sample_queries_for_psu(seqs, cfg):
    ctr = train_batch(seqs, cfg, epoch=0)
    assert (
        ctr["target_items"].shape[1] == 1 + cfg.num_neg and ctr["labels"][:, 0].all() and not ctr["labels"][:, 1:].any()
    )
    assert (ctr["target_queries"] == ctr["target_queries"][:, :1]).all()
    for j in range(len(ctr["user_id"])):
        assert ctr["target_items"][j, 0] not in ctr["target_items"][j, 1:]
    pool = np.arange(1, 50)
    psu = train_batch(seqs, replace(cfg, task="psu"), epoch=0, query_pool=pool)
    assert (psu["target_queries"][:, 1:] != psu["target_queries"][:, :1]).any(), "PSU negatives get sampled queries"
    np.testing.assert_array_equal(psu["target_items"], ctr["target_items"])


def test_sampled_negatives_are_distinct_unseen_and_too_few_is_a_data_error():
    rng = np.random.default_rng(0)
    negs = sample_negatives(rng, 200, np.arange(1, 101), 99)
    assert len(np.unique(negs)) == 99 and (negs > 100).all() and (negs <= 200).all()
    with pytest.raises(DataError, match="only 10 of 110"):
        sample_negatives(rng, 110, np.arange(1, 101), 99)


def test_ray_data_pipeline_shapes_and_two_shards_cover_every_user_once(ray_local, tiny_data, cfg):
    from seminar_ray.data.pipeline import eval_dataset, read_sequences, train_batches

    ds = read_sequences(tiny_data)
    first = next(iter(train_batches(ds, cfg, epoch=0, users_per_batch=8)))
    assert first["hist_items"].shape[1:] == (cfg.max_len,) and first["target_items"].shape[1:] == (1 + cfg.num_neg,)
    assert first["hist_items"].dtype.is_floating_point is False
    shards = ds.streaming_split(2, equal=False)
    seen: list[list[np.ndarray]] = [[], []]

    def consume(i: int) -> None:
        for batch in train_batches(shards[i], cfg, epoch=0, users_per_batch=8):
            seen[i].append(np.unique(batch["user_id"].numpy()))

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    [t.start() for t in threads], [t.join() for t in threads]
    per_shard = [np.concatenate(s) if s else np.empty(0, dtype=np.int64) for s in seen]
    all_users = read_table(tiny_data, "sequences").column("user_id").to_numpy()
    assert len(per_shard[0]) and len(per_shard[1]), "both shards get users"
    assert sorted(np.concatenate(per_shard).tolist()) == sorted(all_users.tolist()), "each user exactly once"
    rows = eval_dataset(tiny_data, "valid", cfg).take(3)
    assert rows[0]["target_items"].shape == (100,) and rows[0]["hist_items"].shape == (cfg.max_len,)


def test_training_visits_every_user_once_per_epoch_in_a_new_order(ray_local, tiny_data, cfg):
    from seminar_ray.data.pipeline import train_batches, training_users

    ds = training_users(tiny_data, min_blocks=1, seed=0)
    file_order = read_table(tiny_data, "sequences").column("user_id").to_numpy()
    orders = [
        np.concatenate([b["user_id"].numpy() for b in train_batches(ds, cfg, epoch, 8, targets_per_row=cfg.max_len)])
        for epoch in (0, 1)
    ]
    for order in orders:
        assert sorted(order.tolist()) == sorted(file_order.tolist())  # every user once (rows of <= L targets)
        assert not np.array_equal(order, file_order)
    assert not np.array_equal(orders[0], orders[1])


def _tables(tiny_data):
    return [read_table(tiny_data, n) for n in ("items", "queries", "sequences")], DatasetMeta.load(tiny_data)


def _assert_nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "no temporary directory left"


def test_bad_tables_fail_clearly_and_write_nothing(tiny_data, tmp_path):
    (items, queries, seqs), meta = _tables(tiny_data)
    out = tmp_path / "out"
    bad_seq = seqs.set_column(
        1, "item_ids", pa.array([[999_999]] + seqs.column("item_ids").to_pylist()[1:], pa.list_(pa.int64()))
    )
    bad_seq = bad_seq.set_column(
        2, "query_ids", pa.array([[0]] + seqs.column("query_ids").to_pylist()[1:], pa.list_(pa.int64()))
    )
    bad_seq = bad_seq.set_column(
        3, "timestamps", pa.array([[1]] + seqs.column("timestamps").to_pylist()[1:], pa.list_(pa.int64()))
    )
    with pytest.raises(DataError, match=r"sequences row 0 \(user_id 0\)\.item_ids: unknown id 999999"):
        write_dataset(out, items, queries, bad_seq, meta)
    _assert_nothing_written(out)
    with pytest.raises(DataError, match=r"items: missing column\(s\) \['title'\]"):
        write_dataset(out, items.drop(["title"]), queries, seqs, meta)
    ragged = seqs.set_column(3, "timestamps", pa.array([[1]] * len(seqs), pa.list_(pa.int64())))
    with pytest.raises(DataError, match="differ in length"):
        write_dataset(out, items, queries, ragged, meta)
    with pytest.raises(DataError, match="sequences: empty table"):
        write_dataset(out, items, queries, seqs.slice(0, 0), meta)
    _assert_nothing_written(out)


def test_rewrite_replaces_the_dataset_only_when_complete(tiny_data, tmp_path):
    (items, queries, seqs), meta = _tables(tiny_data)
    out = write_dataset(tmp_path / "d", items, queries, seqs, meta)
    before = pq.read_table(out / "sequences.parquet")
    with pytest.raises(DataError):
        write_dataset(out, items.slice(1), queries, seqs, meta)
    assert pq.read_table(out / "sequences.parquet").equals(before), "a failed rewrite leaves the old data intact"


def test_prepare_data_job_prints_a_summary_and_a_missing_input_exits_2(ray_local, tmp_path, capsys):
    from jobs.prepare_data import main

    assert main(["--source", "synthetic", "--scale", "tiny", "--users", "40", "--out", str(tmp_path / "syn")]) == 0
    out = capsys.readouterr().out
    assert '"users": 40' in out and '"behaviours"' in out
    from seminar_ray.runtime import run_cli

    assert run_cli(main, ["--source", "recbole", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "nope: no such file or directory" in capsys.readouterr().err
    _assert_nothing_written(tmp_path / "x")


def test_streamed_generation_writes_what_the_in_memory_tables_hold(tiny_data, tmp_path, monkeypatch):
    """generate_to_dir hands users on in chunks (row groups of a ParquetWriter): with chunks of 7 users, the files
    equal generate(cfg) written whole, for the source's queries and for --queries none; a bad chunk writes nothing."""
    from seminar_ray.data import synthetic
    from seminar_ray.data.queries import apply_mode
    from seminar_ray.data.schema import write_streamed

    monkeypatch.setattr(synthetic, "USER_CHUNK", 7)
    cfg = SyntheticConfig.preset("tiny")
    for mode in (None, "none"):
        out = synthetic.generate_to_dir(cfg, tmp_path / f"s-{mode}", mode=mode)
        whole = generate(cfg) if mode is None else apply_mode(generate(cfg), mode)
        for name in ("items", "queries", "sequences"):
            assert read_table(out, name).equals(conform(getattr(whole, name), name)), (mode, name)
        assert DatasetMeta.load(out).to_json() == whole.meta.to_json()
    assert pq.ParquetFile(tmp_path / "s-None" / "sequences.parquet").metadata.num_row_groups == -(-cfg.num_users // 7)
    assert read_table(tiny_data, "sequences").equals(read_table(tmp_path / "s-None", "sequences"))
    (items, queries, seqs), meta = _tables(tiny_data)

    def build(sink):
        sink(seqs.slice(0, 5))
        sink(
            seqs.slice(5, 1).set_column(1, "item_ids", pa.array([[0] * len(seqs["item_ids"][5])], pa.list_(pa.int64())))
        )
        return DatasetTables(items, queries, seqs.slice(0, 0), meta)

    with pytest.raises(DataError, match=r"sequences row 0 \(user_id 5\)\.item_ids: unknown id 0"):
        write_streamed(tmp_path / "bad", meta.num_items, meta.num_queries, build)
    _assert_nothing_written(tmp_path / "bad")
