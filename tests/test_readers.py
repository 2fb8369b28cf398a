"""Source readers (RecBole, KuaiSAR, Amazon, SASRec text) on fixtures in the documented formats, and bad input."""

from __future__ import annotations

import gzip
import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seminar_ray.data.errors import DataError
from seminar_ray.data.readers import amazon, common, kuaisar, recbole
from seminar_ray.data.schema import DatasetMeta, DatasetTables, read_table

FIXTURES = Path(__file__).parent / "fixtures"


def originals(tables: DatasetTables) -> dict[str, list[str]]:
    """id_maps.parquet as kind → original keys indexed by dense id - 1."""
    maps = pq.read_table(io.BytesIO(tables.extra_files["id_maps.parquet"])).to_pylist()
    out: dict[str, list[str]] = {}
    for row in sorted(maps, key=lambda r: (r["kind"], r["id"])):
        out.setdefault(row["kind"], []).append(row["original"])
    return out


def timelines(tables: DatasetTables) -> dict[str, list[tuple[str, tuple[str, ...], int]]]:
    """Each user's sequence decoded to (original item, query tokens, timestamp)."""
    maps = originals(tables)
    tokens = {r["query_id"]: tuple(maps["token"][t - 1] for t in r["token_ids"]) for r in tables.queries.to_pylist()}
    out = {}
    for row in tables.sequences.to_pylist():
        user = maps["user"][row["user_id"] - 1]
        out[user] = [
            (maps["item"][i - 1], tokens[q], t) for i, q, t in zip(row["item_ids"], row["query_ids"], row["timestamps"])
        ]
    return out


def copy_fixture(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def write_round_trip(tables: DatasetTables, tmp_path: Path) -> DatasetMeta:
    out = tables.write(tmp_path / "out")
    assert read_table(out, "items").num_rows == tables.meta.num_items
    return DatasetMeta.load(out)


# ---------------------------------------------------------------- RecBole


def test_recbole_reads_tabs_name_type_headers_and_token_seq(tmp_path):
    tables = recbole.read(FIXTURES / "recbole", min_interactions=2, max_len=10)
    assert timelines(tables) == {
        "A1": [("m20", ("thriller",), 978300700), ("m10", ("comedy",), 978300760), ("m30", (), 978301000)],
        "B2": [("m10", ("comedy",), 978100000), ("m20", ("thriller",), 978200000)],
    }  # C3 has one interaction < min_interactions; m30's only words are its own id → empty query
    maps = originals(tables)
    titles = dict(zip(maps["item"], tables.items.column("title").to_pylist()))
    assert titles == {"m20": 'Heat "the" Movie', "m10": "Toy Story (1995)", "m30": "m30 Untitled"}
    attrs = {
        maps["item"][r["item_id"] - 1]: {maps["attr"][a - 1] for a in r["attr_ids"]} for r in tables.items.to_pylist()
    }
    assert attrs["m20"] == {"release_year=1995", "class=Action", "class=Crime", "class=Thriller"}
    assert attrs["m30"] == {"release_year=2000"}
    assert tables.queries.column("text").to_pylist() == [None, "thriller", "comedy"]
    meta = write_round_trip(tables, tmp_path)
    assert (meta.num_users, meta.num_items, meta.num_queries, meta.extra["timestamp_unit"]) == (2, 3, 2, "s")


def test_recbole_keeps_the_most_recent_max_len_behaviours():
    tables = recbole.read(FIXTURES / "recbole", min_interactions=1, max_len=2)
    assert [item for item, _, _ in timelines(tables)["A1"]] == ["m10", "m30"]
    assert [len(x) for x in tables.sequences.column("item_ids").to_pylist()] == [2, 2, 1]


def test_recbole_inter_file_path_and_no_timestamp(tmp_path):
    root = copy_fixture("recbole", tmp_path)
    lines = (root / "ml.inter").read_text().splitlines()
    (root / "ml.inter").write_text("\n".join("\t".join(line.split("\t")[:2]) for line in lines) + "\n")
    tables = recbole.read(root / "ml.inter", min_interactions=1, max_len=10)
    assert [i for i, _, _ in timelines(tables)["A1"]] == ["m10", "m20", "m30"]  # file order
    assert tables.meta.extra["timestamp_unit"] == "row"


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


# ---------------------------------------------------------------- KuaiSAR


def test_kuaisar_merges_rec_clicks_and_search_clicks_into_one_timeline(tmp_path):
    tables = kuaisar.read(FIXTURES / "kuaisar", min_interactions=2, max_len=10)
    assert timelines(tables) == {
        "1001": [("11", (), 1654041601000), ("14", ("20", "34", "3"), 1654041602500), ("12", (), 1654041603000)],
        "1002": [("16", ("34",), 1654037999000), ("12", (), 1654038000500), ("11", ("20", "34", "3"), 1654038001000)],
    }  # click = 0 rows (13, 16 of 1003) and click_cnt = 0 rows (15) are not behaviours; 1003 has 1 positive
    assert tables.queries.column("text").to_pylist() == [None, None, None]  # anonymised keywords: no text
    assert tables.meta.extra["timestamp_unit"] == "ms"
    maps = originals(tables)
    item = {maps["item"][r["item_id"] - 1]: r for r in tables.items.to_pylist()}
    assert item["11"]["title"] == "Sports > Basketball" and item["12"]["title"] == "Food"
    attrs = {maps["attr"][a - 1] for a in item["11"]["attr_ids"]}
    assert {
        "first_level_category_id=1",
        "second_level_category_id=10",
        "author_id=900",
        "caption=5",
        "caption=6",
    } <= attrs
    assert len(item["11"]["attr_ids"]) == len(set(item["11"]["attr_ids"]))  # caption [5, 6, 5]: distinct ids
    assert not any(maps["attr"][a - 1].startswith("author_id") for a in item["12"]["attr_ids"])  # author 0 = padding
    meta = write_round_trip(tables, tmp_path)
    assert (meta.num_users, meta.num_items, meta.num_tokens, meta.num_behaviours) == (2, 4, 3, 6)


def test_kuaisar_unknown_item_on_a_click_0_row_is_not_an_error(tmp_path):
    root = copy_fixture("kuaisar", tmp_path)
    _replace(root / "rec_inter.csv", "1003,16,0.0", "1003,99,0.0")
    assert kuaisar.read(root, min_interactions=1, max_len=10).meta.num_users == 3


# ---------------------------------------------------------------- Amazon


def test_amazon_json_and_python_literal_lines_query_never_from_asin(tmp_path):
    tables = amazon.read(FIXTURES / "amazon", min_interactions=2, max_len=10)
    assert timelines(tables) == {
        "R1": [
            ("B000ASIN02", ("food", "cooking"), 1420070400),
            ("B000ASIN01", ("daring", "space", "pirates"), 1420156800),
            ("B000ASIN03", (), 1420243200),
        ],
        "R2": [("B000ASIN03", (), 1420000000), ("B000ASIN01", ("daring", "space", "pirates"), 1420300000)],
    }  # 02: empty description → leaf category "Food & Cooking"; 03: nothing → empty query; R3 has 1 review
    maps = originals(tables)
    item = {maps["item"][r["item_id"] - 1]: r for r in tables.items.to_pylist()}
    assert item["B000ASIN01"]["title"] == "The Space Pirates"  # the duplicate metadata line is ignored
    assert item["B000ASIN01"]["image_ref"] == "https://images.example.com/a1.jpg"  # first high-res URL
    assert item["B000ASIN02"]["image_ref"] is None and item["B000ASIN03"]["title"] is None
    assert item["B000ASIN03"]["image_ref"] == "https://images.example.com/a3.jpg"
    assert "B000UNUSED" not in maps["item"]
    assert not any("asin" in t for t in maps["token"])
    assert {maps["attr"][a - 1] for a in item["B000ASIN01"]["attr_ids"]} == {
        "category=Movies & TV",
        "category=Science Fiction",
        "brand=Acme Studios",
    }
    assert write_round_trip(tables, tmp_path).extra["timestamp_unit"] == "s"


def test_amazon_gzipped_files_read_the_same(tmp_path):
    root = tmp_path / "gz"
    root.mkdir()
    for src in (FIXTURES / "amazon").iterdir():
        (root / (src.name + ".gz")).write_bytes(gzip.compress(src.read_bytes()))
    plain = amazon.read(FIXTURES / "amazon", min_interactions=1, max_len=10)
    zipped = amazon.read(root, min_interactions=1, max_len=10)
    assert zipped.sequences.equals(plain.sequences) and zipped.items.equals(plain.items)


# change: None deletes the file, a string is its new content, (old, new) replaces the first old
@pytest.mark.parametrize(
    "source, file, change, message",
    [
        ("recbole", "ml.inter", None, "expected exactly one .inter file"),
        ("recbole", "ml.inter", "", "ml.inter: empty file"),
        ("recbole", "ml.inter", "user_id:token\titem_id:token\n", "ml.inter: no data rows"),
        ("recbole", "ml.inter", ("user_id:token", "uid:token"), "missing column(s) ['user_id:token']"),
        (
            "recbole",
            "ml.inter",
            ("978100000", "yesterday"),
            "column 'timestamp:float', row 4 (line 6): unparsable timestamp 'yesterday'",
        ),
        (
            "recbole",
            "ml.inter",
            ("C3\tm30", "C3\tm99"),
            "column 'item_id:token', row 5 (line 7): references an unknown item 'm99'",
        ),
        ("recbole", "ml.item", ("release_year:token", "release_year"), "header field 'release_year' is not name:type"),
        ("kuaisar", "src_inter.csv", None, "src_inter.csv: missing file"),
        ("kuaisar", "rec_inter.csv", "", "rec_inter.csv: empty file"),
        (
            "kuaisar",
            "src_inter.csv",
            ('"[34]"', '"[34, x]"'),
            "src_inter.csv: column 'keyword', row 2 (line 4): malformed id list",
        ),
        ("kuaisar", "src_inter.csv", ('"[7]"', "20 34"), "column 'keyword', row 1 (line 3): malformed id list"),
        (
            "kuaisar",
            "rec_inter.csv",
            ("1654041603000.0", "noon"),
            "rec_inter.csv: column 'timestamp', row 2 (line 4): unparsable timestamp 'noon'",
        ),
        ("kuaisar", "rec_inter.csv", (",click,", ",clicked,"), "rec_inter.csv: missing column(s) ['click']"),
        (
            "kuaisar",
            "src_inter.csv",
            ("SEARCH_BOX,16,1", "SEARCH_BOX,77,1"),
            "src_inter.csv: column 'item_id', row 2 (line 4): references an unknown item 77",
        ),
        ("amazon", "meta_Movies_and_TV.json", None, "expected one reviews file and one meta_* file"),
        ("amazon", "Movies_and_TV_5.json", "", "Movies_and_TV_5.json: empty file"),
        (
            "amazon",
            "Movies_and_TV_5.json",
            ("1420000000", '"soon"'),
            "Movies_and_TV_5.json: column 'unixReviewTime', row 3 (line 4): unparsable timestamp 'soon'",
        ),
        (
            "amazon",
            "Movies_and_TV_5.json",
            ('"asin": "B000ASIN02", "unixReviewTime"', '"asin": "B999", "unixReviewTime"'),
            "column 'asin', row 5 (line 6): references an unknown item 'B999'",
        ),
        ("amazon", "Movies_and_TV_5.json", ('"reviewerID": "R3", ', ""), "line 6: missing field 'reviewerID'"),
        (
            "amazon",
            "meta_Movies_and_TV.json",
            ('{"asin": "B000UNUSED"', "{asin: B000UNUSED"),
            "meta_Movies_and_TV.json: line 5: neither JSON nor a Python literal",
        ),
    ],
)
def test_bad_input_is_a_data_error_naming_its_file_column_and_row(tmp_path, source, file, change, message):
    root = copy_fixture(source, tmp_path)
    if change is None:
        (root / file).unlink()
    elif isinstance(change, str):
        (root / file).write_text(change)
    else:
        _replace(root / file, *change)
    reader = {"recbole": recbole, "kuaisar": kuaisar, "amazon": amazon}[source]
    with pytest.raises(DataError) as err:
        reader.read(root, min_interactions=1, max_len=10)
    assert message in str(err.value)


# ---------------------------------------------------------------- shared rules


def test_query_rule_uses_description_then_leaf_category_never_the_id():
    assert (
        common.derive_query("<p>The B0X1 Best of the Ring: 1990 fights</p>", ["Sports"], "b0x1") == "best ring fights"
    )
    assert common.derive_query(None, ["Movies & TV", "", "Drama Series"], "x") == "drama series"
    assert common.derive_query("ASIN42 a", ["ASIN42"], "asin42") is None


def test_parse_int_lists_accepts_the_bracket_format():
    import pyarrow as pa

    lists = common.parse_int_lists(pa.array(["[20, 34, 3]", "[]", None, " [7] "]), Path("f.csv"), "keyword")
    assert lists.to_pylist() == [[20, 34, 3], [], None, [7]]


def test_min_interactions_filter_leaving_nobody_is_an_error():
    with pytest.raises(DataError, match="no user has >= 9 interactions"):
        recbole.read(FIXTURES / "recbole", min_interactions=9, max_len=10)


# ---------------------------------------------------------------- through the job entry points


@pytest.mark.parametrize(
    "source, fixture, edit, named",
    [
        (
            "recbole",
            "recbole",
            lambda r: _replace(r / "ml.inter", "978100000", "yesterday"),
            "ml.inter: column 'timestamp:float'",
        ),
        (
            "kuaisar",
            "kuaisar",
            lambda r: _replace(r / "src_inter.csv", '"[34]"', '"[34, x]"'),
            "src_inter.csv: column 'keyword'",
        ),
        ("amazon", "amazon", lambda r: (r / "Movies_and_TV_5.json").write_text(""), "Movies_and_TV_5.json: empty file"),
    ],
)
def test_prepare_data_job_exits_non_zero_and_writes_nothing(tmp_path, source, fixture, edit, named):
    import subprocess
    import sys

    root = copy_fixture(fixture, tmp_path)
    edit(root)
    out = tmp_path / "out"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.prepare_data", "--source", source, "--input", str(root), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=repo,
    )
    assert proc.returncode == 2 and named in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [fixture]  # no output, no temporary directory


def test_query_modes_derived_none_and_a_mode_the_source_cannot_give():
    from seminar_ray.data.queries import apply_mode, resolve_mode

    derived = apply_mode(
        recbole.read(FIXTURES / "recbole", min_interactions=1, max_len=10), resolve_mode("recbole", None)
    )
    assert derived.meta.extra["queries"] == "derived" and derived.meta.num_queries > 0
    none = apply_mode(
        recbole.read(FIXTURES / "recbole", min_interactions=1, max_len=10), resolve_mode("recbole", "none")
    )
    assert none.meta.extra["queries"] == "none" and none.meta.num_queries == 0 and none.queries.num_rows == 1
    flat = pa.compute.list_flatten(none.sequences.column("query_ids")).to_numpy()
    assert (flat == 0).all() and len(flat) == derived.meta.num_behaviours
    assert none.sequences.column("item_ids").equals(derived.sequences.column("item_ids")), "only the queries change"
    with pytest.raises(ValueError, match="source 'recbole' gives 'derived' queries only"):
        resolve_mode("recbole", "source")
    with pytest.raises(ValueError, match="source 'kuaisar' gives 'source' queries only"):
        resolve_mode("kuaisar", "derived")


def test_querymatch_pop_ranks_candidates_of_the_targets_derived_query_first():
    from seminar_ray.data.splits import SequenceBatch
    from seminar_ray.rule_rankers import item_queries, rule_scores

    # two users; items 1, 2 carry query 7, item 3 query 9; the last two behaviours of each user are held out
    seqs = SequenceBatch(
        user_id=np.array([1, 2]),
        queries=np.array([7, 9, 9, 7, 7, 7, 7, 9, 9]),
        items=np.array([1, 3, 3, 2, 1, 2, 1, 3, 3]),
        offsets=np.array([0, 5, 9]),
    )
    np.testing.assert_array_equal(item_queries(seqs, 4), [0, 7, 7, 9, 0])
    queries, targets = np.array([[7, 7, 7]]), np.array([[2, 3, 4]])
    pop = rule_scores("popularity", seqs, 4, queries, targets)
    assert pop[0, 1] > pop[0, 0], "item 3 is the more popular"
    match = rule_scores("querymatch_pop", seqs, 4, queries, targets)
    assert match[0].argmax() == 0 and match[0, 1] > match[0, 2], "query match first, then popularity"


# ---------------------------------------------------------------- SASRec text files

SASREC_TXT = "1 10\n1 12\n2 12\n1 11\n\n2 10\n2 13\n3 10\n"  # users interleave; a blank line; user 3 has 1 action


def _sasrec_file(tmp_path: Path, text: str = SASREC_TXT) -> Path:
    path = tmp_path / "Video.txt"
    path.write_text(text)
    return path


def test_sasrec_txt_keeps_file_order_per_user_and_has_ids_only(tmp_path):
    from seminar_ray.data.queries import apply_mode, resolve_mode
    from seminar_ray.data.readers import sasrec_txt

    tables = apply_mode(
        sasrec_txt.read(_sasrec_file(tmp_path), min_interactions=1, max_len=10), resolve_mode("sasrec-txt", None)
    )
    got = {u: [(i, q) for i, q, _ in t] for u, t in timelines(tables).items()}
    assert got == {
        "1": [("10", ()), ("12", ()), ("11", ())],
        "2": [("12", ()), ("10", ()), ("13", ())],
        "3": [("10", ())],
    }
    assert [t for _, _, t in timelines(tables)["2"]] == [2, 4, 5], "timestamps are the line's row (blank skipped)"
    assert tables.items.column("title").null_count == tables.meta.num_items == 4  # no text, no image: ids only
    assert tables.items.column("image_ref").null_count == 4
    meta = write_round_trip(tables, tmp_path)
    assert (meta.num_users, meta.num_behaviours, meta.num_queries) == (3, 7, 0)
    assert (meta.extra["timestamp_unit"], meta.extra["queries"], meta.source) == ("row", "none", "sasrec-txt")
    with pytest.raises(ValueError, match="source 'sasrec-txt' gives 'none' queries only .*neither search logs"):
        resolve_mode("sasrec-txt", "derived")


def test_sasrec_txt_min_interactions_and_max_len_apply(tmp_path):
    from seminar_ray.data.readers import sasrec_txt

    tables = sasrec_txt.read(_sasrec_file(tmp_path), min_interactions=2, max_len=2)
    assert {u: [i for i, _, _ in t] for u, t in timelines(tables).items()} == {"1": ["12", "11"], "2": ["10", "13"]}


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "Video.txt: empty file"),
        ("\n\n", "Video.txt: no data rows"),
        (
            "1 10\n1 11 5.0\n",
            "Video.txt: line 2: expected 2 whitespace-separated fields `user_id item_id`, got 3: '1 11 5.0'",
        ),
        ("1 10\n\n7\n", "Video.txt: line 3: expected 2 whitespace-separated fields"),
        ("user_id item_id\n1 10\n", "Video.txt: line 1: user_id 'user_id' is not a non-negative integer"),
        ("1 10\n2 -4\n", "Video.txt: line 2: item_id '-4' is not a non-negative integer"),
    ],
)
def test_sasrec_txt_bad_input_is_a_data_error_naming_file_and_line(tmp_path, text, message):
    from seminar_ray.data.readers import sasrec_txt

    with pytest.raises(DataError) as err:
        sasrec_txt.read(_sasrec_file(tmp_path, text), min_interactions=1, max_len=10)
    assert message in str(err.value)


def test_prepare_data_sasrec_txt_exits_non_zero_and_writes_nothing(tmp_path):
    import subprocess
    import sys

    src = _sasrec_file(tmp_path, "1 10\n1 11\n1 x12\n")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.prepare_data",
            "--source",
            "sasrec-txt",
            "--input",
            str(src),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=repo,
    )
    assert proc.returncode == 2 and "Video.txt: line 3: item_id 'x12' is not a non-negative integer" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Video.txt"]  # no output, no temporary directory
