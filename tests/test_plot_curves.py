"""bench.plot_curves: which runs a figure draws, under which labels, and the error for a match that finds none."""

from __future__ import annotations

import json

import pytest

from bench.plot_curves import ZOOM_FROM, epoch_points, main, method_and_seed, select_runs, short_label

CURVES = {
    "runs": {
        "SEMINAR, emb_dropout=0.2": {
            "psu_valid_ndcg@10": [0.3, 0.38],
            "valid_ndcg@10": [0.42, 0.45, 0.44],
            "test": {"best_epoch": 2},
        },
        "DIN, emb_dropout=0.2, seed 1": {"psu_valid_ndcg@10": [], "valid_ndcg@10": [0.35, 0.40]},
        "SEMINAR, emb_dropout=0.5 (stopped by hand)": {"valid_ndcg@10": [0.41]},
        "DIN, emb_dropout=0.2, no curve": {"valid_ndcg@10": []},
    },
    "popularity": {"valid_ndcg@10": 0.30},
}


def test_select_runs_keeps_matching_runs_with_curves_under_short_labels():
    assert list(select_runs(CURVES, "emb_dropout=0.2")) == ["SEMINAR", "DIN, seed 1"]
    assert short_label("SEMINAR, A=1, seed 1", "A=1") == "SEMINAR, seed 1"
    assert short_label("SEMINAR, A=1", "") == "SEMINAR, A=1"


def test_seeds_of_one_method_share_a_method_name():
    assert method_and_seed("DIN, seed 1") == ("DIN", 1)
    assert method_and_seed("w/o pretraining, seed 12") == ("w/o pretraining", 12)
    assert method_and_seed("TWIN") == ("TWIN", 0)


def test_a_run_that_ended_before_the_zoom_has_no_points_in_it():
    assert epoch_points([0.40, 0.45, 0.44], 2) == [(2, 0.45), (3, 0.44)]
    assert epoch_points([0.40] * (ZOOM_FROM - 1), ZOOM_FROM) == []
    assert epoch_points([0.40] * ZOOM_FROM, ZOOM_FROM) == [(ZOOM_FROM, 0.40)]


def test_main_writes_a_png_and_names_a_match_that_finds_nothing(tmp_path, capsys):
    src = tmp_path / "curves.json"
    src.write_text(json.dumps(CURVES))
    out = tmp_path / "fig" / "curves.png"
    assert main(["--input", str(src), "--match", "emb_dropout=0.2", "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="'emb_dropout=0.9'"):
        main(["--input", str(src), "--match", "emb_dropout=0.9", "--out", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()
