"""The user-level path (every training target of a user in one pass) against the per-target path (each target with
its own copy of its history): same logits, losses and gradients on the same targets and candidates, and no leak."""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import pytest
import torch

from seminar_ray.data.entities import EntityTables
from seminar_ray.data.schema import DatasetMeta, read_table
from seminar_ray.data.splits import (
    SampleConfig,
    SequenceBatch,
    history_matrix,
    train_positions,
    train_targets,
    user_batch,
)
from seminar_ray.errors import InputError
from seminar_ray.models import MODELS, ModelConfig, build_model
from seminar_ray.models.psu import PSU

torch.set_num_threads(1)
TOL = dict(rtol=1e-4, atol=1e-5)  # float32: the two paths sum the same terms in other orders
CTR_KINDS = sorted(k for k in MODELS if k != "psu")


@pytest.fixture(scope="module")
def seqs(tiny_data) -> SequenceBatch:
    return SequenceBatch.from_arrow(read_table(tiny_data, "sequences").slice(0, 12))


@pytest.fixture(scope="module")
def tables(tiny_data) -> EntityTables:
    return EntityTables.load(tiny_data)


def model_cfg(**kw) -> ModelConfig:
    # L = 24 < most users' lengths, so windows are banded; K, din_recent and qin_k1 below L so retrieval selects
    return ModelConfig.preset(
        "small", max_len=24, K=6, din_recent=5, recent_len=4, qin_k1=10, qin_k2=6, n_chunks=3, **kw
    )


def sample_cfg(tiny_data, mc: ModelConfig, task: str = "ctr") -> SampleConfig:
    return SampleConfig(
        max_len=mc.max_len,
        num_items=DatasetMeta.load(tiny_data).num_items,
        num_neg=mc.n_neg,
        samples_per_user=0,
        task=task,
        seed=3,
    )


def both_batches(seqs, scfg, targets_per_row, pool=None):
    """(user-level batch, the per-target batch of the same targets in the user-level batch's order)."""
    rows, pos = train_positions(seqs, scfg, epoch=1)
    user = user_batch(seqs, scfg, 1, targets_per_row, pool)
    order = np.lexsort((pos, rows))  # user_batch lists each user's targets in position order
    rows, pos = rows[order], pos[order]
    hq, hi = history_matrix(seqs, rows, pos, scfg.max_len)
    tq, ti = train_targets(seqs, scfg, 1, rows, pos, pool)
    labels = np.zeros(ti.shape, np.float32)
    labels[:, 0] = 1
    per = {
        "user_id": seqs.user_id[rows],
        "hist_queries": hq,
        "hist_items": hi,
        "target_queries": tq,
        "target_items": ti,
        "labels": labels,
    }
    as_t = lambda b: {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()}  # noqa: E731
    return as_t(user), as_t(per)


def test_user_batch_holds_the_same_targets_and_candidates_with_their_histories_in_band(seqs, tiny_data):
    mc = model_cfg()
    user, per = both_batches(seqs, sample_cfg(tiny_data, mc), targets_per_row=7)
    valid = user["target_valid"]
    assert int(valid.sum()) == len(per["labels"]) > 50
    assert torch.equal(user["target_items"][valid], per["target_items"])
    assert torch.equal(user["target_queries"][valid], per["target_queries"])
    assert int(valid.sum(1).max()) == 7, "rows hold at most targets_per_row targets"
    # the band of every target, read from the window, is exactly its per-target history (left-padded to L)
    rows, cols = torch.nonzero(valid, as_tuple=True)
    for j, (r, t) in enumerate(zip(rows.tolist(), cols.tolist())):
        p = int(user["target_pos"][r, t])
        window = user["seq_items"][r, max(p - mc.max_len, 0) : p]
        hist = per["hist_items"][j]
        assert torch.equal(hist[hist.numel() - window.numel() :], window)
        assert (hist[: hist.numel() - window.numel()] == 0).all()
    # no id is copied per target: a row's window is at most L + targets_per_row long
    assert user["seq_items"].shape[1] <= mc.max_len + 7
    assert user["seq_items"].numel() < per["hist_items"].numel() / 3


SOFTMAX = {"ctr_loss": "softmax"}


@pytest.mark.parametrize(
    "kind, extras",
    [(kind, {}) for kind in CTR_KINDS]
    + [("seminar", {"target_products": True}), ("seminar", SOFTMAX), ("twin", SOFTMAX), ("sim", SOFTMAX)],
)
def test_ctr_logits_and_loss_equal_the_per_target_path(kind, extras, seqs, tables, tiny_data):
    mc = model_cfg(**extras)
    model = build_model(kind, mc, tables).eval()
    user, per = both_batches(seqs, sample_cfg(tiny_data, mc), targets_per_row=9)
    with torch.no_grad():
        got = model(user)[user["target_valid"]]
        want = model(per)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL)
    model.train()
    torch.manual_seed(0)
    loss_u, parts_u = model.loss(user)
    loss_p, parts_p = model.loss(per)
    torch.testing.assert_close(loss_u, loss_p, **TOL)
    assert parts_u.keys() == parts_p.keys()


@pytest.mark.parametrize("kind", ["seminar", "din"])
def test_softmax_click_loss_is_each_targets_cross_entropy_over_its_candidates(kind, seqs, tables, tiny_data):
    mc = model_cfg(**SOFTMAX)
    model = build_model(kind, mc, tables).eval()
    _, per = both_batches(seqs, sample_cfg(tiny_data, mc), targets_per_row=9)
    with torch.no_grad():
        logits = model(per)  # [B, C], the positive in column 0
        _, parts = model.loss(per)
        bce = build_model(kind, replace(mc, ctr_loss="bce"), tables).eval()
        bce.load_state_dict(model.state_dict())
        _, bce_parts = bce.loss(per)
    assert logits.shape[1] == 1 + mc.n_neg
    want = float(-torch.log_softmax(logits, dim=1)[:, 0].mean())
    assert parts["ctr"] == pytest.approx(want, rel=1e-5)
    assert abs(bce_parts["ctr"] - parts["ctr"]) > 0.05, "the softmax loss is not the BCE"
    assert ("gsu" in parts) == (kind == "seminar")
    if "gsu" in parts:  # the GSU's auxiliary loss takes the same form, over its own logits
        with torch.no_grad():
            _, aux = model.retrieve(model.encode_batch(per), with_aux=True)  # [B, C]
        assert parts["gsu"] == pytest.approx(float(-torch.log_softmax(aux, dim=1)[:, 0].mean()), rel=1e-5)
        assert parts["loss"] == pytest.approx(parts["ctr"] + mc.beta_gsu * parts["gsu"], rel=1e-6)


@pytest.mark.parametrize("bad", [{"ctr_loss": "hinge"}, {"ctr_loss": "softmax", "n_neg": 0}])
def test_a_click_loss_it_cannot_compute_is_refused_by_name(bad):
    with pytest.raises(InputError, match="ctr_loss"):
        model_cfg(**bad)


@pytest.mark.parametrize("kind", ["seminar", "psu"])
def test_gradients_equal_the_per_target_path(kind, seqs, tables, tiny_data):
    overrides = {"use_align": False, "use_rel": False} if kind == "psu" else {}
    mc = model_cfg(**overrides)
    model = build_model(kind, mc, tables)
    pool = np.arange(1, tables.meta.num_queries + 1) if kind == "psu" else None
    user, per = both_batches(seqs, sample_cfg(tiny_data, mc, "psu" if kind == "psu" else "ctr"), 8, pool)
    grads = []
    for batch in (user, per):
        model.zero_grad(set_to_none=True)
        model.loss(batch)[0].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-6, msg=name)


def test_psu_next_pair_logits_equal_and_alignment_relevance_count_each_behaviour_once(seqs, tables, tiny_data):
    mc = model_cfg()
    model = build_model("psu", mc, tables).eval()
    assert isinstance(model, PSU)
    pool = np.arange(1, tables.meta.num_queries + 1)
    user, per = both_batches(seqs, sample_cfg(tiny_data, mc, "psu"), 10, pool)
    with torch.no_grad():
        torch.testing.assert_close(model(user)[user["target_valid"]], model(per), **TOL)
    # every training position: each behaviour that is some target's history is owned by exactly one target
    from seminar_ray.models.psu import Sequences

    owned = Sequences.of(user, mc.max_len).owned
    per_user = {}
    for r in range(len(owned)):
        per_user.setdefault(int(user["user_id"][r]), []).extend(user["seq_items"][r][owned[r]].tolist())
    for u, got in per_user.items():
        n = int(seqs.lengths[np.flatnonzero(seqs.user_id == u)[0]])
        assert len(got) == n - 3, "positions 0 .. N-4 each once"


def test_psu_alignment_and_relevance_on_one_whole_history_equal_the_per_target_form(tables):
    """One target whose history is the whole window: both forms align and relate the same behaviours."""
    mc = model_cfg()
    model = build_model("psu", mc, tables)
    g = torch.Generator().manual_seed(1)
    n = 24
    items = torch.randint(1, tables.meta.num_items + 1, (1, n), generator=g)
    queries = torch.randint(0, tables.meta.num_queries + 1, (1, n), generator=g)
    cands = torch.randint(1, tables.meta.num_items + 1, (1, 5), generator=g)
    cq = torch.randint(1, tables.meta.num_queries + 1, (1, 5), generator=g)
    labels = torch.zeros(1, 5)
    labels[:, 0] = 1
    per = {"hist_items": items, "hist_queries": queries, "target_items": cands, "target_queries": cq, "labels": labels}
    # user-level: the same n behaviours owned by n targets at columns 1..n (only the last one's history is whole)
    pos = torch.arange(1, n + 1).view(1, n)
    user = {
        "seq_items": items,
        "seq_queries": queries,
        "target_pos": pos,
        "target_valid": torch.ones(1, n, dtype=torch.bool),
        "target_items": cands.expand(n, 5).reshape(1, n, 5),
        "target_queries": cq.expand(n, 5).reshape(1, n, 5),
        "labels": labels.expand(n, 5).reshape(1, n, 5),
    }
    for kw in ({"use_next": False, "use_rel": False}, {"use_next": False, "use_align": False}):
        model.cfg = replace(mc, **kw)
        torch.manual_seed(5)
        a = model.loss(per)[0]
        torch.manual_seed(5)
        b = model.loss(user)[0]
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_changing_behaviours_at_or_after_a_target_leaves_its_logits_unchanged(kind, seqs, tables, tiny_data):
    mc = model_cfg()
    model = build_model(kind, mc, tables).eval()
    pool = np.arange(1, tables.meta.num_queries + 1)
    user, _ = both_batches(seqs, sample_cfg(tiny_data, mc, "psu" if kind == "psu" else "ctr"), 12, pool)
    r = int(torch.argmax(user["target_valid"].sum(1)))  # the row with the most targets
    t = int(user["target_valid"][r].sum()) // 2
    p = int(user["target_pos"][r, t])
    changed = {k: v.clone() for k, v in user.items()}
    g = torch.Generator().manual_seed(7)
    n_after = changed["seq_items"].shape[1] - p
    changed["seq_items"][r, p:] = torch.randint(1, tables.meta.num_items + 1, (n_after,), generator=g)
    changed["seq_queries"][r, p:] = torch.randint(0, tables.meta.num_queries + 1, (n_after,), generator=g)
    with torch.no_grad():
        before, after = model(user), model(changed)
    torch.testing.assert_close(before[r, : t + 1], after[r, : t + 1], **TOL)
    assert not torch.allclose(
        before[r, t + 1 :][user["target_valid"][r, t + 1 :]], after[r, t + 1 :][user["target_valid"][r, t + 1 :]]
    ), "later targets do see the change"


def test_fused_attention_matches_autograd_and_passes_gradcheck():
    """The fused dense and gathered attentions (layers._DenseAttention, _GatheredAttention): values and gradients
    equal the plain autograd ops, rows with nothing to attend pool zeros, and float64 gradcheck passes."""
    from seminar_ray.models.layers import _DenseAttention, _GatheredAttention, gather_rows, masked_softmax

    g = torch.Generator().manual_seed(0)
    qh = torch.randn(2, 3, 2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    keys = torch.randn(2, 7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    mask = torch.rand(2, 3, 7, generator=g) > 0.4
    mask[0, 1] = False  # nothing to attend
    idx = torch.randint(0, 7, (2, 3, 5), generator=g)
    idx[1, 2, 3:] = -1
    idx[0, 0] = -1
    plain_dense = torch.einsum(
        "bmhn,bnd->bmhd", masked_softmax(torch.einsum("bmhd,bnd->bmhn", qh, keys), mask.unsqueeze(2)), keys
    )
    sel = gather_rows(keys, idx)
    valid = (idx >= 0).unsqueeze(2)
    plain_rows = torch.einsum("bmhk,bmkd->bmhd", masked_softmax(torch.einsum("bmhd,bmkd->bmhk", qh, sel), valid), sel)
    for fused, plain, arg in ((_DenseAttention, plain_dense, mask), (_GatheredAttention, plain_rows, idx)):
        out = fused.apply(qh, keys, arg)
        torch.testing.assert_close(out, plain)
        got = torch.autograd.grad(out.square().sum(), (qh, keys))
        want = torch.autograd.grad(plain.square().sum(), (qh, keys))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        assert torch.autograd.gradcheck(functools.partial(_apply, fused, arg=arg), (qh, keys))
    assert (plain_dense[0, 1] == 0).all() and (_DenseAttention.apply(qh, keys, mask)[0, 1] == 0).all()


def _apply(fused, q, k, arg):
    return fused.apply(q, k, arg)
