"""open_clip text and image features of items and queries, run as a Ray Data actor pool (docs/design.md, Architecture;
paper §4.1).

The paper's text and image channels are CLIP ViT-B/32 outputs (512-d). `extract_features` reads a prepared
dataset directory, encodes every item's title and image and every query's text through `map_batches` over
a pool of `ClipEncoder` actors, and rewrites items.parquet / queries.parquet with the embeddings (raw
encoder outputs, not L2-normalised: the model sees each channel's norm). The new directory is built beside
the old one and renamed into place, so a failure leaves the dataset as it was.

Missing values are recorded, never fatal: an item without a title, an image reference that is null, a file
that is missing or not an image, or a URL that cannot be fetched (no network) gets a null embedding and is
counted by reason in the summary. Queries without text (KuaiSAR's anonymised keyword ids) keep a null
text_emb. Image references are file paths (relative ones resolve against the dataset directory), http(s)
URLs, `data:` URIs, or raw bytes in a batch.

`pretrained`: an open_clip tag such as "openai" (downloads weights; not possible offline), a local
checkpoint file, or None for random weights seeded identically in every actor (tests, benchmarks).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seminar_ray import storage
from seminar_ray.data.schema import FEATURE_DIM, ITEMS, QUERIES, read_table, table_path
from seminar_ray.errors import InputError

DEFAULT_MODEL = "ViT-B-32"
RANDOM_INIT_SEED = 0
OK, NO_TEXT, NO_IMAGE, UNREADABLE, FETCH_FAILED = "ok", "no_text", "no_image", "unreadable", "fetch_failed"


@dataclass
class FeatureConfig:
    """How the encoder pool runs; defaults follow the paper (CLIP ViT-B/32)."""

    model: str = DEFAULT_MODEL
    pretrained: str | None = "openai"
    actors: int = 2
    batch_size: int = 16
    use_gpu: bool = False
    num_cpus: float = 0.5  # per actor: fractional, so a pool fits beside other work
    url_timeout_s: float = 5.0


@dataclass
class FeatureSummary:
    items: int
    items_with_text: int
    items_with_image: int
    item_text_missing: dict[str, int]
    item_image_missing: dict[str, int]
    queries: int  # non-empty queries
    queries_with_text: int
    seconds: float  # the encoding pass: items and query texts together, actor start-up included
    items_per_s: float  # items / seconds
    rows_per_s: float  # (items + query texts) / seconds
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- the encoder (plain PyTorch, no Ray)


def load_clip(model: str = DEFAULT_MODEL, pretrained: str | None = "openai", device: str = "cpu"):
    """(model, image preprocess, tokenizer) of open_clip, in eval mode; checks the output width is 512."""
    import open_clip
    import torch

    tag = None if pretrained is None or str(pretrained).lower() == "none" else str(pretrained)
    if tag is None:
        torch.manual_seed(RANDOM_INIT_SEED)  # same random weights in every actor
    try:
        net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=tag, device=device)
    except (RuntimeError, ValueError, OSError) as exc:
        raise RuntimeError(
            f"cannot load open_clip {model!r} with pretrained={tag!r} ({exc}); without internet, pass a local "
            f"checkpoint file or pretrained=None"
        ) from exc
    width = net.text_projection.shape[-1] if hasattr(net, "text_projection") else None
    if width is not None and width != FEATURE_DIM:
        raise InputError(f"open_clip {model!r} outputs {width}-d features; the tables hold {FEATURE_DIM}-d")
    return net.eval(), preprocess, open_clip.get_tokenizer(model)


def check_pretrained(model: str, pretrained: str | None) -> None:
    """Fail before any actor starts on a model or weights spec that cannot work (the download itself is the actors')."""
    import open_clip

    if model not in open_clip.list_models():
        raise InputError(f"unknown open_clip model {model!r}")
    if pretrained is None or str(pretrained).lower() == "none" or Path(pretrained).is_file():
        return
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained not in tags:
        raise InputError(
            f"pretrained={pretrained!r} is neither a checkpoint file nor an open_clip tag of {model!r} {tags}"
        )


def load_image(ref, root: Path, timeout_s: float):
    """A PIL RGB image from bytes, a data: URI, an http(s) URL or a file path; (None, reason) when it fails."""
    from PIL import Image, UnidentifiedImageError

    if ref is None or (isinstance(ref, str) and not ref.strip()):
        return None, NO_IMAGE
    if isinstance(ref, str) and ref.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(ref, timeout=timeout_s) as resp:
                ref = resp.read()
        except (OSError, ValueError):  # URLError, timeouts and HTTP errors are OSErrors
            return None, FETCH_FAILED
    elif isinstance(ref, str) and ref.startswith("data:"):
        try:
            ref = base64.b64decode(ref.split(",", 1)[1], validate=True)
        except (IndexError, ValueError):
            return None, UNREADABLE
    try:
        source = io.BytesIO(ref) if isinstance(ref, (bytes, bytearray)) else (root / ref)
        with Image.open(source) as img:
            return img.convert("RGB"), OK
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None, UNREADABLE


class ClipEncoder:
    """A callable class for `Dataset.map_batches`: one open_clip model per actor, single-threaded torch.

    In: a numpy batch with "id" and, per channel, "text" (str or None) and/or "image" (path, URL, bytes or None).
    Out: "id", "<channel>_emb" float32 [B, 512] (zeros where missing) and "<channel>_status" (OK or a reason).
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        pretrained: str | None = "openai",
        channels=("text", "image"),
        use_gpu: bool = False,
        image_root: str = ".",
        url_timeout_s: float = 5.0,
    ):
        import torch

        torch.set_num_threads(1)
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("use_gpu=True but this actor sees no CUDA device")
        self.device = "cuda" if use_gpu else "cpu"
        self.model, self.preprocess, self.tokenizer = load_clip(model, pretrained, self.device)
        self.channels = tuple(channels)
        self.image_root = Path(image_root)
        self.url_timeout_s = url_timeout_s

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {"id": np.asarray(batch["id"])}
        if "text" in self.channels:
            out["text_emb"], out["text_status"] = self.encode_texts(list(batch["text"]))
        if "image" in self.channels:
            out["image_emb"], out["image_status"] = self.encode_images(list(batch["image"]))
        return out

    def encode_texts(self, texts: list) -> tuple[np.ndarray, np.ndarray]:
        import torch

        status = np.array([OK if isinstance(t, str) and t.strip() else NO_TEXT for t in texts], dtype=object)
        emb = np.zeros((len(texts), FEATURE_DIM), dtype=np.float32)
        keep = np.flatnonzero(status == OK)
        if len(keep):
            tokens = self.tokenizer([texts[i] for i in keep]).to(self.device)
            with torch.no_grad():
                emb[keep] = self.model.encode_text(tokens).float().cpu().numpy()
        return emb, status

    def encode_images(self, refs: list) -> tuple[np.ndarray, np.ndarray]:
        import torch

        loaded = [load_image(r, self.image_root, self.url_timeout_s) for r in refs]
        status = np.array([s for _, s in loaded], dtype=object)
        emb = np.zeros((len(refs), FEATURE_DIM), dtype=np.float32)
        keep = np.flatnonzero(status == OK)
        if len(keep):
            pixels = torch.stack([self.preprocess(loaded[i][0]) for i in keep]).to(self.device)
            with torch.no_grad():
                emb[keep] = self.model.encode_image(pixels).float().cpu().numpy()
        return emb, status


# ---------------------------------------------------------------- the actor pool (Ray Data)


def encoder_dataset(rows: pa.Table, channels: tuple[str, ...], cfg: FeatureConfig, image_root: Path):
    """The lazy Ray Data pipeline: `rows` (+ an "id" = row index) → `map_batches(ClipEncoder)` on an actor pool."""
    import ray

    rows = rows.select(list(channels)).add_column(0, "id", pa.array(np.arange(rows.num_rows, dtype=np.int64)))
    bs = cfg.batch_size
    blocks = [rows.slice(i, bs) for i in range(0, rows.num_rows, bs)]  # one batch per block: actors share evenly
    return ray.data.from_arrow(blocks).map_batches(
        ClipEncoder,
        fn_constructor_kwargs=dict(
            model=cfg.model,
            pretrained=cfg.pretrained,
            channels=channels,
            use_gpu=cfg.use_gpu,
            image_root=str(image_root),
            url_timeout_s=cfg.url_timeout_s,
        ),
        batch_size=bs,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
        num_cpus=cfg.num_cpus,
        num_gpus=1 if cfg.use_gpu else 0,
    )


def encode_with_pool(
    rows: pa.Table, channels: tuple[str, ...], cfg: FeatureConfig, image_root: Path
) -> dict[str, np.ndarray]:
    """Run `ClipEncoder` over `rows` (columns "text" and/or "image") on an actor pool; results in row order."""
    n = rows.num_rows
    out = {}
    for ch in channels:
        out[f"{ch}_emb"] = np.zeros((n, FEATURE_DIM), dtype=np.float32)
        out[f"{ch}_status"] = np.full(n, NO_TEXT if ch == "text" else NO_IMAGE, dtype=object)
    if n == 0:
        return out
    for batch in encoder_dataset(rows, channels, cfg, image_root).iter_batches(batch_format="numpy", batch_size=None):
        where = batch["id"].astype(np.int64)
        for ch in channels:
            out[f"{ch}_emb"][where] = batch[f"{ch}_emb"]
            out[f"{ch}_status"][where] = batch[f"{ch}_status"]
    return out


def embedding_column(emb: np.ndarray, present: np.ndarray) -> pa.FixedSizeListArray:
    """float32 [N, 512] + presence mask → a nullable fixed_size_list<float32>[512] column."""
    values = pa.array(np.ascontiguousarray(emb, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(values, FEATURE_DIM, mask=pa.array(~present))


def extract_features(data_dir: str | Path, cfg: FeatureConfig) -> FeatureSummary:
    """Encode items (title + image) and queries with text in one actor-pool pass; rewrite the tables atomically."""
    data_dir = Path(data_dir)
    check_pretrained(cfg.model, cfg.pretrained)
    items = read_table(data_dir, "items")
    queries = read_table(data_dir, "queries")
    texted = np.flatnonzero(queries.column("text").is_valid().to_numpy(zero_copy_only=False))
    rows = pa.concat_tables(
        [
            pa.table({"text": items.column("title"), "image": items.column("image_ref")}),
            pa.table(
                {"text": queries.column("text").take(pa.array(texted)), "image": pa.nulls(len(texted), pa.string())}
            ),
        ]
    )
    start = time.perf_counter()
    enc = encode_with_pool(rows, ("text", "image"), cfg, data_dir)
    seconds = time.perf_counter() - start
    n = items.num_rows
    text_ok, image_ok = enc["text_status"][:n] == OK, enc["image_status"][:n] == OK
    items = _set_embedding(items, "text_emb", enc["text_emb"][:n], text_ok)
    items = _set_embedding(items, "image_emb", enc["image_emb"][:n], image_ok)
    q_emb = np.zeros((queries.num_rows, FEATURE_DIM), dtype=np.float32)
    q_ok = np.zeros(queries.num_rows, dtype=bool)
    q_emb[texted], q_ok[texted] = enc["text_emb"][n:], enc["text_status"][n:] == OK
    queries = _set_embedding(queries, "text_emb", q_emb, q_ok)
    summary = FeatureSummary(
        items=n,
        items_with_text=int(text_ok.sum()),
        items_with_image=int(image_ok.sum()),
        item_text_missing=_missing(enc["text_status"][:n]),
        item_image_missing=_missing(enc["image_status"][:n]),
        queries=queries.num_rows - 1,
        queries_with_text=int(q_ok.sum()),
        seconds=round(seconds, 3),
        items_per_s=round(n / seconds, 3),
        rows_per_s=round(rows.num_rows / seconds, 3),
        config={
            "model": cfg.model,
            "pretrained": cfg.pretrained,
            "actors": cfg.actors,
            "batch_size": cfg.batch_size,
            "use_gpu": cfg.use_gpu,
        },
    )
    rewrite_tables(data_dir, {"items": items, "queries": queries}, {"features": summary.to_dict()})
    return summary


def _set_embedding(table: pa.Table, column: str, emb: np.ndarray, present: np.ndarray) -> pa.Table:
    schema = ITEMS if "item_id" in table.column_names else QUERIES
    return table.set_column(table.schema.get_field_index(column), schema.field(column), embedding_column(emb, present))


def _missing(status: np.ndarray) -> dict[str, int]:
    return {str(k): int(v) for k, v in sorted(Counter(status[status != OK].tolist()).items())}


def rewrite_tables(data_dir: Path, tables: dict[str, pa.Table], meta_extra: dict) -> None:
    """Copy `data_dir` beside itself (hard links where possible), write the new tables and meta.json there,
    then rename it into place: readers see either the old dataset or the new one, never a mix."""
    with storage.staged_dir(data_dir) as tmp:
        os.chmod(tmp, data_dir.stat().st_mode & 0o7777)
        for src in data_dir.iterdir():
            if src.is_file() and src.name not in {f"{n}.parquet" for n in tables} | {"meta.json"}:
                _link_or_copy(src, tmp / src.name)
            elif src.is_dir():
                shutil.copytree(src, tmp / src.name, copy_function=_link_or_copy)
        for name, table in tables.items():
            pq.write_table(table, table_path(tmp, name), row_group_size=4096)
        meta = json.loads((data_dir / "meta.json").read_text())
        meta.setdefault("extra", {}).update(meta_extra)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
