"""Model tests: each defect of the public reference code (README, "The model") is made impossible here."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seminar_ray.data.entities import EntityTables
from seminar_ray.data.schema import DatasetMeta
from seminar_ray.models import MODELS, ModelConfig, build_model, export_gsu_tables, load_checkpoint, save_checkpoint
from seminar_ray.models.base import PAIR_KEYS
from seminar_ray.models.layers import Channels, MultiHeadTargetAttention, gather_rows, masked_softmax, masked_topk
from seminar_ray.models.psu import RelevanceHead, alignment_loss, derangement, relevance_loss
from seminar_ray.models.seminar import gsu_target_tables, restore_psu

torch.set_num_threads(1)
N_ITEMS, N_QUERIES, N_ATTRS, N_TOKENS = 60, 25, 12, 30
L, B, C = 2000, 4, 3
FROZEN = (
    "item_text",
    "item_image",
    "query_text",
    "item_text_mask",
    "item_image_mask",
    "query_text_mask",
    "item_attrs",
    "query_tokens",
)


def make_tables(n_queries: int = N_QUERIES, n_items: int = N_ITEMS, seed: int = 0) -> EntityTables:
    """Random entity tables with some missing text/image features, ragged attributes and ragged query tokens."""
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(n_items + 1, 512)).astype(np.float32)
    image = rng.normal(size=(n_items + 1, 512)).astype(np.float32)
    text_mask, image_mask = rng.random(n_items + 1) > 0.2, rng.random(n_items + 1) > 0.2
    text_mask[0] = image_mask[0] = False
    text[~text_mask], image[~image_mask] = 0.0, 0.0
    attrs = rng.integers(1, N_ATTRS + 1, size=(n_items + 1, 4))
    attrs[rng.random(attrs.shape) < 0.3] = 0
    attrs[0] = 0
    tokens = rng.integers(1, N_TOKENS + 1, size=(n_queries + 1, 5))
    tokens[:, 2:][rng.random((n_queries + 1, 3)) < 0.5] = 0
    tokens[0] = 0
    qtext = rng.normal(size=(n_queries + 1, 512)).astype(np.float32)
    qtext_mask = rng.random(n_queries + 1) > 0.5
    qtext_mask[0] = False
    qtext[~qtext_mask] = 0.0
    meta = DatasetMeta(
        source="test",
        num_items=n_items,
        num_queries=n_queries,
        num_attrs=N_ATTRS,
        num_tokens=N_TOKENS,
        num_users=B,
        num_behaviours=B * L,
    )
    return EntityTables(
        item_text=text,
        item_text_mask=text_mask,
        item_image=image,
        item_image_mask=image_mask,
        item_attrs=attrs.astype(np.int64),
        query_tokens=tokens.astype(np.int64),
        query_text=qtext,
        query_text_mask=qtext_mask,
        meta=meta,
    )


def make_batch(length: int = L, b: int = B, c: int = C, seed: int = 0, lengths=(2000, 1500, 7, 0)) -> dict:
    """Left-padded histories of the given real lengths (one shorter than K, one empty), ~40% search behaviours."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, N_ITEMS + 1, (b, length), generator=g)
    queries = torch.randint(1, N_QUERIES + 1, (b, length), generator=g)
    queries[torch.rand(b, length, generator=g) < 0.6] = 0
    for row, n in enumerate(lengths[:b]):
        items[row, : length - min(n, length)] = 0
        queries[row, : length - min(n, length)] = 0
    targets = torch.randint(1, N_ITEMS + 1, (b, c), generator=g)
    tq = torch.randint(0, N_QUERIES + 1, (b, c), generator=g)
    labels = torch.zeros(b, c)
    labels[:, 0] = 1.0
    return {
        "user_id": torch.arange(b),
        "hist_items": items,
        "hist_queries": queries,
        "target_items": targets,
        "target_queries": tq,
        "labels": labels,
    }


@pytest.fixture(scope="module")
def tables() -> EntityTables:
    return make_tables()


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return ModelConfig.preset(
        "small",
        d=8,
        heads=2,
        K=12,
        mlp_hidden=(16,),
        gate_hidden=8,
        n_chunks=8,
        din_recent=10,
        qin_k1=40,
        qin_k2=12,
        recent_len=5,
        eta_bits=16,
    )


@pytest.fixture(scope="module")
def batch() -> dict:
    return make_batch()


# --- configuration -----------------------------------------------------------------------------------------------


def test_config_has_the_papers_defaults_and_reads_yaml(tmp_path):
    paper = ModelConfig.preset("paper")
    assert (paper.d, paper.heads, paper.K, paper.lam, paper.batch, paper.lr) == (64, 4, 200, 0.5, 256, 1e-3)
    path = tmp_path / "m.yaml"
    path.write_text("preset: small\nK: 7\nmlp_hidden: [9, 3]\n")
    loaded = ModelConfig.from_yaml(path, lam=0.3)
    assert (loaded.K, loaded.d, loaded.lam, loaded.mlp_hidden) == (7, 16, 0.3, (9, 3))
    assert ModelConfig.from_dict(loaded.to_dict()) == loaded
    path.write_text("K: 7\nbogus_key: 1\n")
    with pytest.raises(ValueError, match="bogus_key"):
        ModelConfig.from_yaml(path)
    with pytest.raises(ValueError, match="lam"):
        ModelConfig(lam=1.5)


def test_dropout_acts_in_training_only_and_weight_decay_chooses_adamw(cfg, tables, batch):
    from seminar_ray.train.loop import make_optimizer

    plain = build_model("seminar", cfg, tables)
    for field in ("dropout", "emb_dropout"):
        dropped = build_model("seminar", cfg.replace(**{field: 0.5}), tables)
        assert plain.state_dict().keys() == dropped.state_dict().keys()  # checkpoints load either way
        dropped.load_state_dict(plain.state_dict())
        plain.eval()
        dropped.eval()
        assert torch.equal(plain(batch), dropped(batch)), field
        dropped.train()
        torch.manual_seed(0)
        assert not torch.allclose(dropped(batch), plain(batch)), field
    assert type(make_optimizer(plain, 1e-3)) is torch.optim.Adam
    decayed = make_optimizer(plain, 1e-3, weight_decay=0.01)
    assert type(decayed) is torch.optim.AdamW and decayed.param_groups[0]["weight_decay"] == 0.01
    for bad in (dict(dropout=1.0), dict(dropout=-0.1), dict(emb_dropout=1.0), dict(weight_decay=-1.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ModelConfig(**bad)


def test_target_products_widen_the_mlp_by_two_parts_and_change_the_scores(cfg, tables, batch):
    """With target_products the MLP reads target ⊙ lifelong and target ⊙ recent beside the paper's concatenation."""
    plain = build_model("seminar", cfg, tables).eval()
    products = build_model("seminar", cfg.replace(target_products=True), tables).eval()
    assert products.mlp[0].in_features == plain.mlp[0].in_features + 2 * cfg.d
    logits = products(batch)
    assert logits.shape == plain(batch).shape and torch.isfinite(logits).all()
    with torch.no_grad():
        products.mlp[0].weight[:, -2 * cfg.d :] = 0.0  # without the products' columns the inputs' rest decides
        before = products(batch)
        products.mlp[0].weight[:, -2 * cfg.d :] = 1.0
        assert not torch.allclose(products(batch), before)


def test_every_config_in_configs_loads():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("model*.yaml"))
    assert files, "configs/model*.yaml missing"
    for f in files:
        ModelConfig.from_yaml(f)


# --- every model: forward, backward, every parameter trained -----------------------------------------------------


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_forward_backward_every_parameter_gets_gradient(kind, cfg, tables, batch):
    model = build_model(kind, cfg, tables)
    logits = model(batch)
    assert logits.shape == (B, C) and torch.isfinite(logits).all()
    loss, parts = model.loss(batch)
    assert torch.isfinite(loss) and parts["loss"] == pytest.approx(loss.item())
    loss.backward()
    names = dict(model.named_parameters())
    missing = [n for n, p in names.items() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"{kind}: parameters without gradient: {missing}"
    for name, p in names.items():  # every head of every attention unit is trained (no Python-list heads)
        if name.split(".")[-1] in ("W_Q", "W_K", "W_V"):
            per_head = p.grad.flatten(1).abs().sum(1)
            assert torch.all(per_head > 0), f"{kind}: a head of {name} gets no gradient: {per_head}"
    assert not any(n.split(".")[-1] in FROZEN for n in names), "frozen feature tables must not be parameters"


@pytest.mark.parametrize("kind", ["psu", "seminar"])
def test_frozen_feature_tables_bit_identical_after_init_and_step(kind, cfg, tables, batch):
    model = build_model(kind, cfg, tables)

    def check():
        for name in FROZEN:
            buf = getattr(model.embedding, name)
            assert torch.equal(buf, torch.from_numpy(getattr(tables, name))), f"{name} differs from its source"

    check()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    loss, _ = model.loss(batch)
    loss.backward()
    opt.step()
    check()
    assert all(not getattr(model.embedding, n).requires_grad for n in FROZEN)


def test_missing_features_use_learned_missing_vectors_and_query_mean_excludes_padding(cfg, tables):
    emb = build_model("psu", cfg, tables).embedding
    no_text = int(np.nonzero(~tables.item_text_mask[1:])[0][0]) + 1
    channels = emb.item_channels(torch.tensor([no_text]))
    assert torch.equal(channels[0, 0], emb.missing[1])
    q = int(np.nonzero((tables.query_tokens[1:, 2:] == 0).any(1) & ~tables.query_text_mask[1:])[0][0]) + 1
    toks = torch.from_numpy(tables.query_tokens[q])
    expected = emb.W_q(emb.token(toks[toks != 0]).mean(0))
    assert torch.allclose(emb.query_channel(torch.tensor([q]))[0], expected, atol=1e-6)
    assert torch.equal(emb.query_channel(torch.tensor([0]))[0], emb.missing[0])  # the empty query


def test_gamma_is_lambda_and_item_gate(cfg, tables):
    emb = build_model("seminar", cfg.replace(lam=0.3), tables).embedding
    table, (tq,), (ti,) = emb.table([torch.tensor([[0, 3]])], [torch.tensor([[5, 9]])])
    ch = table.channels(tq, ti)
    assert torch.allclose(ch.gamma.sum(-1), torch.ones(1, 2))
    assert torch.allclose(ch.gamma[..., 0], torch.full((1, 2), 0.3))
    assert torch.allclose(ch.fused, table.keys(tq, ti), atol=1e-6)


# --- attention: padding, top-K, fused = decomposed ----------------------------------------------------------------


def test_padding_gets_zero_attention_and_cannot_change_output():
    torch.manual_seed(0)
    att = MultiHeadTargetAttention(8, 3)
    q, keys = torch.randn(2, 4, 8), torch.randn(2, 50, 8)
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[0, :30] = False
    mask[1, :] = False  # an empty history
    out, w = att(q, keys, mask)
    assert torch.all(w[0, :, :, :30] == 0) and torch.all(w[1] == 0)
    assert torch.allclose(w[0].sum(-1), torch.ones(4, 3))
    garbage = keys.clone()
    garbage[0, :30] = 1e4
    out2, _ = att(q, garbage, mask)
    assert torch.equal(out, out2) and torch.isfinite(out).all()


def test_topk_never_selects_padding_while_real_items_remain():
    scores = torch.randn(3, 2, 40)
    mask = torch.zeros(3, 1, 40, dtype=torch.bool)
    mask[0, :, 30:] = True  # 10 real, K = 6 → only real
    mask[1, :, 36:] = True  # 4 real, K = 6 → 4 real + 2 "none"
    scores[..., :30] = 1e6  # padding scores are huge: a mask must stop them
    idx = masked_topk(scores, mask, 6)
    assert torch.all(idx[0] >= 30)
    assert sorted(idx[1, 0].tolist()) == [-1, -1, 36, 37, 38, 39]
    assert torch.all(idx[2] == -1)


def test_model_gsu_topk_selects_only_real_behaviours(cfg, tables, batch):
    model = build_model("seminar", cfg, tables)
    enc = model.encode_batch(batch)
    idx, _ = model.retrieve(enc, with_aux=False)
    real = batch["hist_items"] != 0
    for row in range(B):
        n_real = int(real[row].sum())
        chosen = idx[row][idx[row] >= 0].view(C, -1)
        assert chosen.shape[1] == min(cfg.K, n_real)
        assert torch.all(real[row][chosen]), "a padded position was selected"


def test_fused_scores_equal_decomposed_form():
    torch.manual_seed(1)
    att = MultiHeadTargetAttention(16, 4)
    gq, gk = torch.softmax(torch.randn(2, 3, 4), -1), torch.softmax(torch.randn(2, 7, 4), -1)
    q = Channels(x=torch.randn(2, 3, 4, 16) * torch.tensor([0.25, 1.0, 2.0, 0.5])[:, None], gamma=gq)
    k = Channels(x=torch.randn(2, 7, 4, 16) * torch.tensor([0.25, 1.0, 2.0, 0.5])[:, None], gamma=gk)
    fused = att.scores(q.fused, k.fused)
    assert torch.allclose(fused, att.scores_decomposed(q, k), rtol=1e-4, atol=1e-4)
    assert torch.allclose(q.norms[..., None] * q.units, q.x, atol=1e-6)


def test_seminar_gsu_scores_decompose_over_its_own_channels(cfg, tables, batch):
    """The model's GSU score (fused keys after G_j) equals the §3.3.1 decomposition over its norms and unit vectors."""
    model = build_model("seminar", cfg, tables)
    hq, hi = batch["hist_queries"][:2, -50:], batch["hist_items"][:2, -50:]
    table, (hq_r, tq_r), (hi_r, ti_r) = model.embedding.table(
        [hq, batch["target_queries"][:2]], [hi, batch["target_items"][:2]], model.G
    )
    q, k = table.channels(tq_r, ti_r), table.channels(hq_r, hi_r)
    with torch.no_grad():
        fused = model.gsu.attention.scores(q.fused, table.keys(hq_r, hi_r))
        assert torch.allclose(fused, model.gsu.attention.scores_decomposed(q, k), rtol=1e-4, atol=1e-5)


def test_gather_rows_matches_indexing():
    table = torch.randn(2, 9, 3)
    idx = torch.tensor([[[0, 8, -1]], [[4, 4, 2]]])
    out = gather_rows(table, idx)
    assert torch.equal(out[1, 0, 2], table[1, 2]) and torch.equal(out[0, 0, 1], table[0, 8])
    assert torch.equal(
        masked_softmax(torch.zeros(1, 3), torch.tensor([[True, False, True]])), torch.tensor([[0.5, 0.0, 0.5]])
    )


# --- PSU losses ---------------------------------------------------------------------------------------------------


def test_relevance_loss_lower_for_matching_pairs():
    torch.manual_seed(2)
    head = RelevanceHead(16)
    xq = F.normalize(torch.randn(64, 16), dim=-1) * 3
    xi = xq + 0.1 * torch.randn(64, 16)
    neg = derangement(64, xq.device)
    assert torch.all(neg != torch.arange(64))
    ok = torch.ones(64)
    matching = relevance_loss(head, xq, xi, neg, ok)
    shuffled = relevance_loss(head, xq, xi[torch.randperm(64)], neg, ok)
    assert matching < shuffled
    xi = torch.randn(64, 16)  # unrelated pairs: a gradient step must separate matching from shuffled (correct sign)

    def margin() -> float:
        return (head(xq, xi).mean() - head(xq, xi[neg]).mean()).item()

    before = margin()
    relevance_loss(head, xq, xi, neg, ok).backward()
    with torch.no_grad():
        for p in head.parameters():
            p -= 0.1 * p.grad
    assert margin() > before


def test_alignment_loss_lower_for_aligned_and_divides_by_temperature():
    torch.manual_seed(3)
    base = F.normalize(torch.randn(2, 64, 16), dim=-1)
    aligned = torch.stack([base, base, base], dim=2)
    shuffled = torch.stack([base, base[:, torch.randperm(64)], base[:, torch.randperm(64)]], dim=2)
    present = torch.ones(2, 64, 3, dtype=torch.bool)
    ids = torch.arange(1, 65).expand(2, 64)
    a = alignment_loss(aligned, present, ids, 4, 0.1)
    s = alignment_loss(shuffled, present, ids, 4, 0.1)
    assert a < s
    # dividing by a smaller temperature sharpens aligned logits → lower loss (multiplying would raise it)
    assert alignment_loss(aligned, present, ids, 4, 0.05) < alignment_loss(aligned, present, ids, 4, 1.0)


def test_alignment_loss_masks_padding_and_duplicates():
    torch.manual_seed(4)
    units = F.normalize(torch.randn(1, 40, 3, 8), dim=-1)
    present = torch.ones(1, 40, 3, dtype=torch.bool)
    ids = torch.arange(1, 41).view(1, 40)
    ref = alignment_loss(units[:, 30:], present[:, 30:], ids[:, 30:], 1, 0.1)
    padded_present = present.clone()
    padded_present[:, :30] = False
    garbage = units.clone()
    garbage[:, :30] = F.normalize(torch.randn(1, 30, 3, 8), dim=-1)
    assert torch.allclose(alignment_loss(garbage, padded_present, ids, 1, 0.1), ref, atol=1e-5)
    # a repeated item is not its own negative: the same vectors score a lower loss when the ids say "same item"
    dup_units = torch.cat([units[:, 30:], units[:, 39:]], 1)
    all_present = torch.ones(1, 11, 3, dtype=torch.bool)
    same_item = alignment_loss(dup_units, all_present, torch.cat([ids[:, 30:], ids[:, 39:]], 1), 1, 0.1)
    other_item = alignment_loss(dup_units, all_present, torch.arange(1, 12).view(1, 11), 1, 0.1)
    assert torch.isfinite(same_item) and same_item < other_item


def test_alignment_memory_is_chunked():
    """The chunk logits tensor is B·L²/N_ch: the alignment never builds an L × L matrix."""
    from seminar_ray.models.psu import chunk

    x = torch.zeros(2, 2000, 4)
    assert chunk(x, 8).shape == (2, 8, 250, 4)
    assert chunk(x, 3).shape == (2, 3, 667, 4)
    assert torch.equal(chunk(torch.arange(1, 6).view(1, 5), 2), torch.tensor([[[0, 1, 2], [3, 4, 5]]]))


def test_psu_loss_switches(cfg, tables, batch):
    model = build_model("psu", cfg.replace(use_align=False, w_rel=2.0), tables)
    _, parts = model.loss(batch)
    assert set(parts) == {"next", "rel", "loss"}
    off = build_model("psu", cfg.replace(use_next=False, use_align=False, use_rel=False), tables)
    with pytest.raises(ValueError, match="nothing to train"):
        off.loss(batch)
    browse_only = dict(batch, hist_queries=torch.zeros_like(batch["hist_queries"]))
    _, parts = build_model("psu", cfg.replace(use_next=False, use_align=False), tables).loss(browse_only)
    assert parts["rel"] == 0.0  # relevance covers behaviours with a non-empty query only


# --- checkpoints, PSU → CTR restore, serving contracts -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["psu", "seminar", "eta"])
def test_checkpoint_roundtrip_identical_outputs(kind, cfg, tables, batch, tmp_path):
    model = build_model(kind, cfg, tables).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        expected = model(batch)
    save_checkpoint(model, cfg, tmp_path / "ck", {"epoch": 3, "ndcg": 0.5})
    loaded, loaded_cfg, extra = load_checkpoint(tmp_path / "ck", tables)
    assert loaded_cfg == cfg and extra == {"epoch": 3, "ndcg": 0.5} and type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(batch), expected)


def test_checkpoint_of_other_tables_or_config_is_rejected(cfg, tables, tmp_path):
    save_checkpoint(build_model("seminar", cfg, tables), cfg, tmp_path / "ck")
    with pytest.raises(ValueError, match="'seminar' model, expected 'sim'"):
        load_checkpoint(tmp_path / "ck", tables, kind="sim")
    with pytest.raises(ValueError, match="K: checkpoint 12 vs 13"):
        load_checkpoint(tmp_path / "ck", tables, cfg=cfg.replace(K=13))
    with pytest.raises(ValueError, match="num_items: checkpoint 60 vs 61"):
        load_checkpoint(tmp_path / "ck", make_tables(n_items=61))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nowhere", tables)


def test_psu_restore_copies_tables_exactly_and_errors_on_mismatch(cfg, tables):
    psu = build_model("psu", cfg, tables)
    with torch.no_grad():
        for p in psu.parameters():
            p.add_(torch.randn_like(p))
    ctr = build_model("seminar", cfg, tables)
    ctr.load_pretrained(psu.state_dict())
    psu_emb = psu.embedding.state_dict()
    for name, tensor in ctr.embedding.state_dict().items():
        assert torch.equal(tensor, psu_emb[name]), name
    assert len(psu_emb) == len(ctr.embedding.state_dict())
    state = psu.state_dict()
    del state["embedding.W_t.weight"]
    with pytest.raises(KeyError, match="embedding.W_t.weight"):
        restore_psu(ctr, state)
    other = build_model("psu", cfg, make_tables(n_items=70))
    with pytest.raises(ValueError, match="embedding.item_id.weight"):
        ctr.load_pretrained(other.state_dict())


def test_gsu_export_reproduces_model_scores(cfg, tables, batch):
    model = build_model("seminar", cfg, tables)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        scores = model.gsu_scores(batch)  # [B, C, L]
        u = model.gsu_target_vectors(target_queries=batch["target_queries"], target_items=batch["target_items"])
    gsu = export_gsu_tables(model)
    assert gsu.item_channels.shape == (N_ITEMS + 1, 3, cfg.d) and gsu.query_channel.shape == (N_QUERIES + 1, cfg.d)
    for row in range(2):
        keys = gsu.keys(batch["hist_queries"][row].numpy(), batch["hist_items"][row].numpy())
        real = batch["hist_items"][row].numpy() != 0
        exported = u[row].numpy() @ keys.T
        np.testing.assert_allclose(exported[:, real], scores[row].numpy()[:, real], rtol=1e-4, atol=1e-5)


def test_gsu_target_tables_sum_to_the_models_target_vectors(cfg, tables, batch):
    model = build_model("seminar", cfg, tables)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        u = model.gsu_target_vectors(target_queries=batch["target_queries"], target_items=batch["target_items"]).numpy()
    queries, items = gsu_target_tables(model)
    assert queries.shape == (N_QUERIES + 1, cfg.d) and items.shape == (N_ITEMS + 1, cfg.d)
    summed = queries[batch["target_queries"].numpy()] + items[batch["target_items"].numpy()]
    np.testing.assert_allclose(summed, u, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["seminar", "sim", "din"])
def test_cached_entities_score_like_projected_ones_and_training_drops_the_cache(kind, cfg, tables, batch):
    model = build_model(kind, cfg, tables).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        plain = model(batch)
        exported = export_gsu_tables(model) if kind == "seminar" else None
        model.embedding.cache_entities(chunk=37)  # several chunks, one ragged
        cached = model(batch)
    assert model.embedding._entity_cache is not None
    assert len(model.embedding._table_cache) == 1  # the cached model gathered rows from one full-entity table
    torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-6)
    if exported is not None:  # the export reads the cache and gets the same tables
        again = export_gsu_tables(model)
        for name in ("item_channels", "item_gamma", "query_channel"):
            np.testing.assert_array_equal(getattr(again, name), getattr(exported, name))
    model.train()
    assert model.embedding._entity_cache is None and not model.embedding._table_cache
    loss = model.loss(batch)[0]
    loss.backward()
    assert model.embedding.W_t.weight.grad is not None  # gradients reach the projections again


@pytest.mark.parametrize("kind", ["seminar", "sim", "twin", "qin", "din", "eta"])
def test_scoring_a_given_topk_equals_forward(kind, cfg, tables, batch):
    model = build_model(kind, cfg, tables).eval()
    with torch.no_grad():
        enc = model.encode_batch(batch)
        idx, _ = model.retrieve(enc, with_aux=False)
        pairs = {key: batch[key] for key in PAIR_KEYS}
        served = model.score_with_topk(topk_idx=idx, **pairs)
        assert torch.allclose(served, model(batch), atol=1e-6)
        bad = idx.clone()
        bad[0, 0, 0] = L
        with pytest.raises(ValueError, match="position"):
            model.score_with_topk(topk_idx=bad, **pairs)


def test_ctr_scores_candidates_against_one_history_encoding(cfg, tables):
    """C candidates share one history encoding: scoring them together equals scoring each alone."""
    model = build_model("seminar", cfg, tables).eval()
    small = make_batch(length=300, lengths=(300, 120, 7, 0), c=5, seed=7)
    with torch.no_grad():
        together = model(small)
        for c in range(5):
            alone = dict(
                small,
                target_items=small["target_items"][:, c : c + 1],
                target_queries=small["target_queries"][:, c : c + 1],
                labels=small["labels"][:, c : c + 1],
            )
            assert torch.allclose(model(alone)[:, 0], together[:, c], atol=1e-5)


def test_dataclass_config_is_frozen(cfg):
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d = 3


def test_alignment_loss_is_the_papers_sum_over_ordered_pairs():
    """§3.3.1: L_align = Σ_i Σ_(j≠i) L_CLIP(x̂^(i), x̂^(j)) with CLIP's symmetric loss, over T, I, A (one chunk here)."""
    torch.manual_seed(5)
    units = F.normalize(torch.randn(2, 12, 3, 8), dim=-1)
    present = torch.ones(2, 12, 3, dtype=torch.bool)
    ids = torch.arange(1, 13).expand(2, 12)
    target = torch.arange(12)

    def clip(a, b):  # CLIP: ½ (CE over rows + CE over columns), mean over the batch's rows
        logits = a @ b.T / 0.1
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))

    ordered = [(i, j) for i in range(3) for j in range(3) if i != j]
    paper = sum(clip(units[u, :, i], units[u, :, j]) for i, j in ordered for u in range(2)) / 2
    assert torch.allclose(alignment_loss(units, present, ids, 1, 0.1), paper, atol=1e-5)


def test_chance_normalised_losses_are_one_at_chance():
    """loss_norm="chance": a task that predicts nothing (all logits equal) scores 1, whatever its candidate count."""
    units = F.normalize(torch.ones(1, 30, 3, 4), dim=-1)  # every row identical: every logit ties
    present = torch.ones(1, 30, 3, dtype=torch.bool)
    for n_chunks in (1, 3):
        loss = alignment_loss(units, present, torch.arange(1, 31).view(1, 30), n_chunks, 0.1, by_chance=True)
        assert abs(float(loss) - 1.0) < 1e-5
    assert alignment_loss(units, present, torch.arange(1, 31).view(1, 30), 1, 0.1) > 6.0  # paper scale: 6·log 30


def _reference_psu_class():
    """bench/psu_reference.py's ReferencePSU: the PSU whose alignment loss is the masked-logsumexp form it replaced."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "psu_reference.py"
    spec = importlib.util.spec_from_file_location("psu_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ReferencePSU


@pytest.mark.parametrize("loss_norm", ["none", "chance"])
def test_psu_losses_and_gradients_equal_the_reference_implementation(tables, batch, loss_norm):
    """The profiled alignment loss (one exp, in-place masks, a hand-written backward) computes the same L_PSU and the
    same gradients as the reference it replaced, on histories with padding, repeats and missing features."""
    config = ModelConfig.preset("small", max_len=L, n_chunks=20, loss_norm=loss_norm)
    torch.manual_seed(0)
    psu = build_model("psu", config, tables)
    reference = _reference_psu_class()(config, tables)
    reference.load_state_dict(psu.state_dict())
    losses = []
    for model in (psu, reference):
        torch.manual_seed(1)  # the relevance task's derangement draws from torch's generator
        loss, parts = model.loss(batch)
        loss.backward()
        losses.append((loss, parts))
    assert losses[0][1]["align"] > 0
    assert torch.allclose(losses[0][0], losses[1][0], rtol=1e-5), (losses[0][1], losses[1][1])
    for (name, p), q in zip(psu.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name
