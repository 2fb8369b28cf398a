"""Shared storage through a URI (pyarrow.fs), exercised with file:// URIs: helpers, checkpoints, data, a training
run."""

from __future__ import annotations

import json
import os

import pytest

from seminar_ray import storage


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(storage.CACHE_ENV, str(root))
    return root


def _tree(root, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_uri_helpers_round_trip(tmp_path, cache):
    base = f"file://{tmp_path}/shared"
    assert storage.join(base, "a", "b.json") == f"{base}/a/b.json"
    assert storage.join(tmp_path, "a") == tmp_path / "a"
    storage.write_text(storage.join(base, "a", "b.json"), '{"x": 1}')
    assert (tmp_path / "shared" / "a" / "b.json").read_text() == '{"x": 1}'
    assert storage.exists(f"{base}/a") and storage.is_file(f"{base}/a/b.json") and not storage.exists(f"{base}/zz")
    assert json.loads(storage.read_text(f"{base}/a/b.json")) == {"x": 1}
    (tmp_path / "shared" / ".hidden").mkdir()
    assert storage.subdirs(base) == [f"{base}/a"] and storage.subdirs(f"{base}/none") == []
    assert storage.basename(f"{base}/a/") == "a" and storage.parent(f"{base}/a/b.json") == f"{base}/a"
    with pytest.raises(ValueError, match="not a storage URI"):
        storage.exists("nosuchscheme://bucket/x")


def test_local_dir_mirrors_once_and_refreshes_on_change(tmp_path, cache):
    src = tmp_path / "src"
    _tree(src, {"x.txt": "one", "sub/y.txt": "two"})
    local = storage.local_dir(f"file://{src}")
    assert local.parent == cache and (local / "sub" / "y.txt").read_text() == "two"
    assert storage.local_dir(f"file://{src}/") == local, "same content → same cache entry, no second download"
    (src / "x.txt").write_text("changed!")
    fresh = storage.local_dir(f"file://{src}")
    assert fresh != local and (fresh / "x.txt").read_text() == "changed!"
    assert storage.local_dir(src) == src, "a local path is used in place"
    with pytest.raises(FileNotFoundError, match="no such directory"):
        storage.local_dir(f"file://{tmp_path}/missing")


def test_copy_dir_both_ways(tmp_path, cache):
    _tree(tmp_path / "a", {"m.txt": "m", "d/n.txt": "n"})
    uri = f"file://{tmp_path}/remote/a"
    storage.copy_dir(tmp_path / "a", uri)
    storage.copy_dir(uri, tmp_path / "back")
    assert (tmp_path / "back" / "d" / "n.txt").read_text() == "n"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "no temp directory left behind"
    storage.delete_dir(uri)
    assert not storage.exists(uri)


def _hidden(root) -> list[str]:
    return sorted(p for p in os.listdir(root) if p.startswith("."))


def test_staged_dir_replaces_the_old_directory_whole_and_leaves_nothing_behind(tmp_path):
    _tree(tmp_path / "out", {"old.txt": "old"})
    with storage.staged_dir(tmp_path / "out") as tmp:
        assert (tmp_path / "out" / "old.txt").read_text() == "old", "the old directory stays until the new is whole"
        _tree(tmp, {"new.txt": "new"})
    assert sorted(os.listdir(tmp_path / "out")) == ["new.txt"] and _hidden(tmp_path) == []


def test_staged_dir_failing_while_filled_keeps_the_old_directory_and_removes_the_temporary_one(tmp_path):
    _tree(tmp_path / "out", {"old.txt": "old"})
    with pytest.raises(RuntimeError, match="disk full"):
        with storage.staged_dir(tmp_path / "out") as tmp:
            _tree(tmp, {"half.txt": "half"})
            raise RuntimeError("disk full")
    assert sorted(os.listdir(tmp_path / "out")) == ["old.txt"] and _hidden(tmp_path) == []


def test_replace_dir_failing_at_the_final_rename_puts_the_old_directory_back(tmp_path, monkeypatch):
    """Without an atomic exchange the old directory is renamed aside first; a failing second rename undoes that."""
    _tree(tmp_path / "out", {"old.txt": "old"})
    _tree(tmp_path / "new", {"new.txt": "new"})
    monkeypatch.setattr(storage, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(src, dst):
        if os.fspath(src) == os.fspath(tmp_path / "new"):
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(storage.os, "rename", rename)
    with pytest.raises(OSError, match="No space left"):
        storage.replace_dir(tmp_path / "new", tmp_path / "out")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "out")) == ["old.txt"] and _hidden(tmp_path) == []


def test_a_storage_path_holding_one_run_resolves_to_its_checkpoint_and_several_runs_are_named(tmp_path):
    from seminar_ray.runs import find_checkpoint

    runs = tmp_path / "runs"
    _tree(runs / "psu" / "checkpoint_1", {"model.pt": "w", "metrics.json": json.dumps({"epoch": 1, "select": 1.0})})
    assert find_checkpoint(runs) == runs / "psu" / "checkpoint_1"
    _tree(runs / "psu2" / "checkpoint_1", {"model.pt": "w", "metrics.json": json.dumps({"epoch": 1, "select": 1.0})})
    with pytest.raises(FileNotFoundError, match="holds 2 runs, name one of them: .*psu, .*psu2"):
        find_checkpoint(runs)


def test_checkpoints_resolve_from_a_uri_run_directory(tmp_path, cache):
    from seminar_ray.runs import find_checkpoint, resolve_checkpoint, run_checkpoints

    run = tmp_path / "runs" / "r"
    for epoch, ndcg in ((1, 0.2), (2, 0.5), (3, 0.4)):
        _tree(
            run / f"checkpoint_{epoch}",
            {
                "model.pt": f"weights{epoch}",
                "metrics.json": json.dumps({"epoch": epoch, "ndcg@10": ndcg, "select": ndcg}),
            },
        )
    uri = f"file://{run}"
    found = run_checkpoints(uri)
    assert [m["epoch"] for _, m in found] == [1, 2, 3] and all(isinstance(p, str) for p, _ in found)
    assert find_checkpoint(uri) == f"{uri}/checkpoint_2"
    best = resolve_checkpoint(uri)
    assert best.parent == cache and (best / "model.pt").read_text() == "weights2"
    assert find_checkpoint(f"{uri}/checkpoint_3/model.pt") == f"{uri}/checkpoint_3"
    with pytest.raises(FileNotFoundError, match="no such checkpoint or run directory"):
        resolve_checkpoint(f"{uri}/nope")


def test_training_with_data_and_runs_on_a_uri(ray_local, tiny_data, tmp_path, cache):
    """The same TrainJob with file:// URIs for --data and --out: checkpoints, metrics.json and curves land there."""
    from seminar_ray.data.entities import EntityTables
    from seminar_ray.data.schema import DatasetMeta
    from seminar_ray.models import ModelConfig
    from seminar_ray.train.job import TrainJob, run_training

    shared = tmp_path / "bucket"
    storage.copy_dir(tiny_data, f"file://{shared}/data")
    data_uri, runs_uri = f"file://{shared}/data", f"file://{shared}/runs"
    assert DatasetMeta.load(data_uri) == DatasetMeta.load(tiny_data)
    assert EntityTables.load(data_uri).item_text.shape == EntityTables.load(tiny_data).item_text.shape
    cfg = ModelConfig.preset("small", max_len=32, K=8, qin_k1=16, qin_k2=8, din_recent=8, batch=32)
    job = TrainJob(
        kind="din",
        data=data_uri,
        storage_path=runs_uri,
        run_name="din",
        model=cfg.to_dict(),
        epochs=2,
        num_workers=0,
        samples_per_user=2,
    )
    summary = run_training(job)
    assert summary["epochs"] == 2 and summary["best_checkpoint"].startswith(f"{runs_uri}/din/")
    run_dir = shared / "runs" / "din"
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 2
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    resumed = run_training(TrainJob(**{**job.__dict__, "epochs": 3}))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["history"][0] == summary["history"][0], "resumed from the URI run directory, epoch 1 kept"
