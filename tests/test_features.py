"""open_clip features through the Ray Data actor pool: embeddings land on the right rows, missing is recorded."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from seminar_ray.data.entities import EntityTables
from seminar_ray.data.errors import DataError
from seminar_ray.data.features import (
    FETCH_FAILED,
    NO_IMAGE,
    OK,
    UNREADABLE,
    ClipEncoder,
    FeatureConfig,
    extract_features,
    load_clip,
    load_image,
)
from seminar_ray.data.schema import ITEMS, QUERIES, SEQUENCES, DatasetMeta, DatasetTables, read_table

UNREACHABLE_URL = "http://127.0.0.1:9/poster.png"  # nothing listens on the discard port: fails at once
TEST_MODEL = "ViT-M-32"  # 512-d like the default ViT-B-32, narrower image tower: quicker on 2 shared cores


def png_bytes(colour: tuple[int, int, int], size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def dataset(tmp_path) -> Path:
    """Seven items (PNG paths, a relative path, a data: URI, a corrupt file, a URL, no image, no title) and
    three queries (a text one, an anonymised one without text, the empty one)."""
    images = tmp_path / "images"
    images.mkdir()
    for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (images / f"{name}.png").write_bytes(png_bytes(colour))
    (images / "corrupt.png").write_bytes(png_bytes((0, 255, 0))[:40])  # a truncated PNG
    data_uri = "data:image/png;base64," + base64.b64encode(png_bytes((9, 9, 9))).decode()
    refs = [
        str(images / "red.png"),
        str(images / "blue.png"),
        data_uri,
        str(images / "corrupt.png"),
        UNREACHABLE_URL,
        None,
        str(images / "red.png"),
    ]
    titles = ["red shoes", "blue jeans", "grey coat", "green hat", "poster", "no picture", None]
    n = len(refs)
    items = pa.table(
        {
            "item_id": np.arange(1, n + 1),
            "title": titles,
            "attr_ids": [[1]] * n,
            "image_ref": refs,
            "text_emb": pa.nulls(n, ITEMS.field("text_emb").type),
            "image_emb": pa.nulls(n, ITEMS.field("image_emb").type),
        },
        schema=ITEMS,
    )
    queries = pa.table(
        {
            "query_id": [0, 1, 2],
            "token_ids": [[], [1, 2], [3]],
            "text": [None, "blue jeans", None],
            "text_emb": pa.nulls(3, QUERIES.field("text_emb").type),
        },
        schema=QUERIES,
    )
    sequences = pa.table(
        {"user_id": [1], "item_ids": [[1, 2, 3]], "query_ids": [[0, 1, 2]], "timestamps": [[1, 2, 3]]}, schema=SEQUENCES
    )
    meta = DatasetMeta(
        source="test", num_items=n, num_queries=2, num_attrs=1, num_tokens=3, num_users=1, num_behaviours=3
    )
    return DatasetTables(items, queries, sequences, meta).write(tmp_path / "data")


def test_actor_pool_writes_embeddings_on_the_right_rows_and_records_missing(ray_local, dataset):
    sequences_before = read_table(dataset, "sequences")
    summary = extract_features(dataset, FeatureConfig(model=TEST_MODEL, pretrained=None, actors=2, batch_size=2))

    assert (summary.items, summary.items_with_text, summary.items_with_image) == (7, 6, 4)
    assert summary.item_text_missing == {"no_text": 1}
    assert summary.item_image_missing == {FETCH_FAILED: 1, NO_IMAGE: 1, UNREADABLE: 1}
    assert (summary.queries, summary.queries_with_text) == (2, 1)
    ent = EntityTables.load(dataset)
    assert ent.item_text_mask.tolist() == [False, True, True, True, True, True, True, False]
    assert ent.item_image_mask.tolist() == [False, True, True, True, False, False, False, True]
    assert ent.query_text_mask.tolist() == [False, True, False]
    assert ent.item_text[7].tolist() == [0.0] * 512 and ent.item_image[5].tolist() == [0.0] * 512

    # Same seeded weights in every actor as here, and each output on its own row.
    enc = ClipEncoder(model=TEST_MODEL, pretrained=None)
    text, _ = enc.encode_texts(["red shoes", "blue jeans", "grey coat"])
    np.testing.assert_allclose(ent.item_text[1:4], text, atol=1e-4)
    np.testing.assert_allclose(ent.query_text[1], text[1], atol=1e-4)
    image, status = enc.encode_images([png_bytes((255, 0, 0)), png_bytes((0, 0, 255))])
    assert status.tolist() == [OK, OK]
    np.testing.assert_allclose(ent.item_image[[1, 2, 7]], image[[0, 1, 0]], atol=1e-4)
    assert not np.allclose(ent.item_image[1], ent.item_image[2], atol=1e-3)  # different pictures differ

    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["extra"]["features"]["items_with_image"] == 4 and meta["num_items"] == 7
    assert read_table(dataset, "sequences").equals(sequences_before)
    assert sorted(p.name for p in dataset.parent.iterdir()) == ["data", "images"]  # no temporary directory left


def test_image_references_and_their_missing_reasons(tmp_path):
    (tmp_path / "ok.png").write_bytes(png_bytes((1, 2, 3)))
    (tmp_path / "text.png").write_text("this is not an image")
    cases = {
        "ok.png": OK,
        str(tmp_path / "ok.png"): OK,
        "absent.png": UNREADABLE,
        "text.png": UNREADABLE,
        UNREACHABLE_URL: FETCH_FAILED,
        "data:image/png;base64,@@@": UNREADABLE,
        "": NO_IMAGE,
    }
    for ref, expected in cases.items():
        image, status = load_image(ref, tmp_path, timeout_s=2.0)
        assert status == expected, ref
        assert (image is None) == (status != OK)
    image, status = load_image(png_bytes((5, 5, 5), size=(7, 3)), tmp_path, timeout_s=2.0)
    assert status == OK and image.size == (7, 3) and image.mode == "RGB"


def test_local_checkpoint_file_is_the_real_loading_path(tmp_path):
    import torch

    torch.set_num_threads(1)
    model, _, tokenizer = load_clip(TEST_MODEL, pretrained=None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # weights that random init would not give
        expected = model.encode_text(tokenizer(["a checkpoint"])).numpy()
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    loaded, _, _ = load_clip(TEST_MODEL, pretrained=str(tmp_path / "clip.pt"))
    with torch.no_grad():
        np.testing.assert_allclose(loaded.encode_text(tokenizer(["a checkpoint"])).numpy(), expected, atol=1e-5)
    with pytest.raises(RuntimeError, match="cannot load open_clip"):
        load_clip(TEST_MODEL, pretrained=str(tmp_path / "absent.pt"))


def test_missing_dataset_is_a_data_error_and_writes_nothing(tmp_path):
    with pytest.raises(DataError, match="missing table 'items'"):
        extract_features(tmp_path / "absent", FeatureConfig(pretrained=None))
    assert list(tmp_path.iterdir()) == []


def test_weights_spec_that_cannot_work_fails_before_any_actor_starts(tmp_path):
    with pytest.raises(ValueError, match="neither a checkpoint file nor an open_clip tag"):
        extract_features(tmp_path, FeatureConfig(pretrained=str(tmp_path / "absent.pt")))
    with pytest.raises(ValueError, match="unknown open_clip model"):
        extract_features(tmp_path, FeatureConfig(model="ViT-Nope", pretrained=None))
