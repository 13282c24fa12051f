"""Mechanism tests for the OneRanker model (tiny configs, CPU, milliseconds each)."""

import pytest
import torch

from trainer.data import last_position
from trainer.infer import example_inputs, rank_topk, score_candidates
from trainer.losses import oneranker_loss
from trainer.model.config import ABLATIONS, preset
from trainer.model.oneranker import OneRanker
from trainer.model.step2 import kmeans, step2_mask


def tiny(**kw):
    return preset("tiny", num_items=40, num_users=10, **kw)


def model(**kw):
    torch.manual_seed(0)
    m = OneRanker(tiny(**kw)).eval()
    m.refresh_centroids()
    return m


def inputs(cfg, B=3, L=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    user, items, actions, times, device, _, _ = example_inputs(cfg, B, L or cfg.max_len, g)
    return user, items, actions, times, device


def test_step2_mask_is_exact():
    T, F_ = 1, 0  # readability
    expected = torch.tensor([
        # t0 t1 t2 f0 f1
        [1, 0, 0, 1, 1],  # task 0 (impression) sees itself + all fakes
        [1, 1, 0, 1, 1],  # task 1 sees tasks ≤ 1
        [1, 1, 1, 1, 1],  # task 2
        [1, 1, 1, 1, 0],  # fake 0 sees all tasks and only itself among fakes
        [1, 1, 1, 0, 1],  # fake 1
    ], dtype=torch.bool)
    assert torch.equal(step2_mask(3, 2), expected)
    assert torch.equal(step2_mask(2, 0), torch.tensor([[1, 0], [1, 1]], dtype=torch.bool))


def test_task_tokens_follow_the_funnel():
    cfg = preset("paper")
    assert cfg.stages() == tuple(sorted(cfg.stages())) and cfg.stages()[0] == 1 and cfg.stages()[-1] == 3
    assert cfg.n_tasks == 8 and cfg.replace(decouple_tasks=False).n_tasks == 1


def test_step1_is_causal():
    m = model()
    user, items, actions, times, _ = inputs(m.cfg, L=8)
    items[:, :] = torch.randint(2, 40, items.shape)  # no padding
    actions[:, :] = 2
    h1, _ = m.backbone(user, items, actions, times)
    t = 4  # item index; H1 index 1 + t
    items2, actions2, times2 = items.clone(), actions.clone(), times.clone()
    items2[:, t + 1:] = torch.randint(2, 40, items2[:, t + 1:].shape)
    actions2[:, t + 1:] = 3
    times2[:, t + 1:] += 1234.0
    h2, _ = m.backbone(user, items2, actions2, times2)
    assert torch.allclose(h1[:, : t + 2], h2[:, : t + 2], atol=1e-6)
    assert not torch.allclose(h1[:, t + 2:], h2[:, t + 2:], atol=1e-4)


def test_step2_query_sees_only_its_prefix():
    m = model()
    user, items, actions, times, device = inputs(m.cfg, L=8)
    items[:, :] = torch.randint(2, 40, items.shape)
    pos = torch.tensor([[3, 8]] * 3)
    dev = device.view(-1, 1).expand(-1, 2)
    a = m(user, items, actions, times, pos, dev)
    items[:, 5:] = torch.randint(2, 40, items[:, 5:].shape)
    b = m(user, items, actions, times, pos, dev)
    assert torch.allclose(a["task"][:, 0], b["task"][:, 0], atol=1e-6)
    assert not torch.allclose(a["task"][:, 1], b["task"][:, 1], atol=1e-4)


def test_step3_score_ignores_other_candidates():
    m = model()
    user, items, actions, times, device = inputs(m.cfg)
    cand = torch.randint(2, 40, (3, 6))
    s1 = score_candidates(m, user, items, actions, times, device, cand)["score"]
    cand2 = cand.clone()
    cand2[:, 1:] = torch.randint(2, 40, (3, 5))
    s2 = score_candidates(m, user, items, actions, times, device, cand2)["score"]
    assert torch.allclose(s1[:, 0], s2[:, 0], atol=1e-6)
    s3 = score_candidates(m, user, items, actions, times, device, cand[:, :1])["score"]
    assert torch.allclose(s1[:, :1], s3, atol=1e-6)


def test_star_self_attention_equals_the_dense_step3_mask():
    """Step 3's O(C) self-attention gives what the dense [1+C, 1+C] step3_mask gives, hub included,
    and a change to one candidate moves only that candidate and nothing else's output."""
    from trainer.model.attention import MultiHeadAttention
    from trainer.model.ranker import step3_mask

    torch.manual_seed(0)
    att = MultiHeadAttention(32, 4).eval()
    x = torch.randn(3, 2, 1 + 9, 32)
    star = att.star(x)
    assert torch.allclose(star, att(x, x, step3_mask(9)), atol=1e-6)
    y = x.clone()
    y[..., 5, :] += 1.0
    moved = (att.star(y) - star).abs().amax(dim=(0, 1, 3)) > 1e-6
    assert moved.tolist() == [i == 5 for i in range(10)]


@pytest.mark.parametrize("kv", [True, False])
def test_step2_outputs_pass_through_to_step3(kv):
    m = model(kv_passthrough=kv)
    user, items, actions, times, device = inputs(m.cfg)
    pos = last_position(items)
    mem, mask = m.encode(user, items, actions, times, pos, device.view(-1, 1))
    task, fake, _ = m.step2(mem, mask)
    s2 = torch.cat([task, fake], dim=2)
    cand = torch.randint(2, 40, (3, 1, 5))
    a = m.rank(mem, mask, s2, cand)[0]
    b = m.rank(mem, mask, s2 + torch.randn_like(s2), cand)[0]
    assert (not torch.allclose(a, b, atol=1e-4)) if kv else torch.allclose(a, b, atol=1e-7)


def _batch(cfg, B=2, P=3, C=4, T=None):
    g = torch.Generator().manual_seed(1)
    user, items, actions, times, device = inputs(cfg, B)
    T = cfg.n_targets
    click = torch.zeros(B, P, C)
    click[:, :, 0] = 1
    return {"user": user, "items": items, "actions": actions, "times": times,
            "pos": torch.tensor([[0, 5, cfg.max_len]] * B), "pos_valid": torch.ones(B, P, dtype=torch.bool),
            "device": device.view(-1, 1).expand(B, P), "cand": torch.randint(2, 40, (B, P, C), generator=g),
            "click": click, "conv": click.clone(), "value": click * 2.0,
            "targets": torch.randint(2, 40, (B, P, 3, T), generator=g), "target_values": torch.rand(B, P, T) + 1}


def test_no_gradient_reaches_the_ranker_through_the_dc_teacher():
    m = model(alpha=0.0, beta=0.0, gamma=1.0)
    m.train()
    b = _batch(m.cfg)
    out = m(b["user"], b["items"], b["actions"], b["times"], b["pos"], b["device"], b["cand"])
    log_q = torch.full((40,), -torch.log(torch.tensor(38.0)))
    loss, parts = oneranker_loss(m, out, b, log_q)
    loss.backward()
    assert parts["dc"] > 0
    ranker_grads = [p.grad for p in m.ranker.parameters()]
    assert all(g is None or not g.any() for g in ranker_grads)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.step2.parameters())


def test_fake_item_tokens_are_the_current_centroids():
    m = model()
    before = m.step2.fake_tokens().clone()
    with torch.no_grad():
        m.item_table.mul_(3.0).add_(1.0)
    m.refresh_centroids(seed=0)
    expect = kmeans(m.item_table.detach()[2:], m.cfg.n_fake_items, seed=0, init=before)
    assert torch.allclose(m.step2.fake_tokens(), expect)
    assert not torch.allclose(before, m.step2.fake_tokens())
    # and they are the query tokens Step 2 actually decodes from
    q = torch.cat([m.step2.task, m.step2.fake_tokens()])
    assert torch.equal(q[m.cfg.n_tasks:], expect)


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_every_ablation_ranks_and_respects_eligibility(name):
    m = model(**ABLATIONS[name])
    user, items, actions, times, device = inputs(m.cfg)
    eligible = torch.zeros(3, 40, dtype=torch.bool)
    eligible[:, 10:20] = True
    ids, scores = rank_topk(m, user, items, actions, times, device, eligible, k=3)
    assert ids.shape == (3, 3) and ((ids >= 10) & (ids < 20)).all()
    assert len(set(ids[0].tolist())) == 3  # merged heads are deduplicated
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_hard_negatives_extend_step3_training_candidates():
    m = model(rank_hard_negatives=3)
    b = _batch(m.cfg)
    pool = torch.arange(2, 40)
    out = m(b["user"], b["items"], b["actions"], b["times"], b["pos"], b["device"], b["cand"], pool)
    assert out["cand"].shape[-1] == b["cand"].shape[-1] + 3 and out["score"].shape == out["cand"].shape
    hard = out["cand"][..., -3:]
    assert not (hard.unsqueeze(-1) == b["cand"].unsqueeze(-2)).any()  # never an exposed candidate
    log_q = torch.full((40,), -torch.log(torch.tensor(38.0)))
    loss, parts = oneranker_loss(m, out, b, log_q)
    assert torch.isfinite(loss) and parts["rank"] > 0


def test_seen_in_history_respects_the_query_position():
    items = torch.tensor([[0, 5, 6, 7]])  # left-padded; H1 indices 2, 3, 4 hold 5, 6, 7
    pos = torch.tensor([[3, 4]])
    cand = torch.tensor([[[5, 7, 9], [5, 7, 9]]])
    seen = OneRanker.seen_in_history(items, pos, cand)
    assert seen.tolist() == [[[True, False, False], [True, True, False]]]


def test_retrieved_training_lists_are_inference_retrieval_scored_by_step3():
    m = model()
    b = _batch(m.cfg)
    out = m(b["user"], b["items"], b["actions"], b["times"], b["pos"], b["device"], b["cand"], retrieve=6)
    ret = out["ret_cand"]  # [B, P, 6]
    assert ret.shape == (2, 3, 6) and out["ret_score"].shape == ret.shape and out["ret_gen"].shape[-1] == 6
    assert out["score"].shape == b["cand"].shape and torch.equal(out["cand"], b["cand"])  # slate untouched
    assert (ret >= 2).all()
    # never an item of the history the query sees (inference masks the user's seen items too)
    L = b["items"].shape[1]
    for bi in range(2):
        for p in range(3):
            visible = set(b["items"][bi, max(0, 0):int(b["pos"][bi, p])].tolist()) - {0}
            assert not visible & set(ret[bi, p].tolist())
    # the generator's own top: bagged Step-2 scores of the list beat every other eligible item's
    task, st = out["task"], out["s_target"]
    g = m.corpus_scores(task, st).mean(2)
    kth = g.gather(-1, ret).min(-1).values
    assert torch.allclose(out["ret_gen"].mean(2), g.gather(-1, ret), atol=1e-5)
    assert (g.gather(-1, ret[..., :1]) >= kth.unsqueeze(-1)).all()
    # Step 3 scores them exactly as it scores any candidate list (candidates are independent)
    out2 = m(b["user"], b["items"], b["actions"], b["times"], b["pos"], b["device"], ret)
    assert torch.allclose(out2["score"], out["ret_score"], atol=1e-5)
    log_q = torch.full((40,), -torch.log(torch.tensor(38.0)))
    b["targets"][:, :, 1, 0] = ret[:, :, 2]  # make the click target retrievable
    loss, parts = oneranker_loss(m, out, b, log_q)
    assert torch.isfinite(loss) and parts["list"] > 0 and parts["list_cover"] == 1.0


def test_gen_only_has_no_retrieved_training_lists():
    m = model(use_step3=False, use_dc_loss=False)
    b = _batch(m.cfg)
    out = m(b["user"], b["items"], b["actions"], b["times"], b["pos"], b["device"], b["cand"], retrieve=6)
    assert "ret_cand" not in out and "score" not in out


def test_retrieved_lists_of_covered_queries_only_match_the_full_pass():
    m = model()
    b = _batch(m.cfg)
    args = (b["user"], b["items"], b["actions"], b["times"], b["pos"], b["device"], b["cand"])
    full = m(*args, retrieve=6)
    tg = torch.zeros(2, 3, 2, dtype=torch.long)
    tg[0, 1, 0] = full["ret_cand"][0, 1, 3]  # one covered query
    tg[1, 2, 1] = full["ret_cand"][1, 2, 0]  # and another via its second target
    tg[1, 0, 0] = 39 if 39 not in full["ret_cand"][1, 0].tolist() else 0  # not retrieved
    sub = m(*args, retrieve=6, ret_targets=tg)
    assert sub["ret_sel"].tolist() == [[False, True, False], [False, False, True]]
    for bi, p in ((0, 1), (1, 2)):
        assert torch.allclose(sub["ret_score"][bi, p], full["ret_score"][bi, p], atol=1e-5)
        assert torch.allclose(sub["ret_gen"][bi, p], full["ret_gen"][bi, p], atol=1e-5)
    assert not sub["ret_score"][~sub["ret_sel"]].any()
    assert torch.allclose(sub["score"], full["score"], atol=1e-6)  # slates unaffected
    b["targets"][:, :, 1] = tg
    log_q = torch.full((40,), -torch.log(torch.tensor(38.0)))
    l1, p1 = oneranker_loss(m, full, b, log_q)
    b2 = dict(b)
    l2, p2 = oneranker_loss(m, sub, b2, log_q)
    assert abs(p1["list"] - p2["list"]) < 1e-5 and abs(p2["list_cover"] - 2 / 6) < 1e-6


def test_no_covered_query_is_a_zero_list_loss_not_an_error():
    m = model()
    m.train()
    b = _batch(m.cfg)
    tg = torch.zeros(2, 3, 2, dtype=torch.long)  # no targets at all
    out = m(b["user"], b["items"], b["actions"], b["times"], b["pos"], b["device"], b["cand"], retrieve=6,
            ret_targets=tg)
    assert not out["ret_sel"].any()
    b["targets"][:, :, 1] = tg
    loss, parts = oneranker_loss(m, out, b, torch.full((40,), -torch.log(torch.tensor(38.0))))
    loss.backward()
    assert torch.isfinite(loss) and parts["list"] == 0 and parts["list_cover"] == 0


def test_longer_history_seen_flag_reaches_only_its_candidate():
    m = model()
    torch.nn.init.normal_(m.ranker.seen.weight)  # zero-initialised: give the flag an effect
    user, items, actions, times, device = inputs(m.cfg)
    cand = torch.tensor([[38, 39, 37]] * 3)
    items[items >= 37] = 2  # the window holds none of the candidates
    base = score_candidates(m, user, items, actions, times, device, cand)["score"]
    none = score_candidates(m, user, items, actions, times, device, cand, torch.zeros(3, 3, dtype=torch.bool))
    assert torch.allclose(base, none["score"], atol=1e-6)
    flag = torch.zeros(3, 3, dtype=torch.bool)
    flag[:, 1] = True  # seen before the window
    s = score_candidates(m, user, items, actions, times, device, cand, flag)["score"]
    assert not torch.allclose(s[:, 1], base[:, 1], atol=1e-4)
    assert torch.allclose(s[:, [0, 2]], base[:, [0, 2]], atol=1e-6)


def test_serving_seen_mask_flags_retrieved_items_for_step3():
    """rank_topk's ``seen`` [B, N] (the feature store's longer history) reaches Step 3's flag of
    exactly the flagged retrieved items."""
    m = model()
    torch.nn.init.normal_(m.ranker.seen.weight)  # zero-initialised: give the flag an effect
    user, items, actions, times, device = inputs(m.cfg)
    with torch.no_grad():
        _, _, base = rank_topk(m, user, items, actions, times, device, k=3, return_all=True)
        window = m.seen_in_history(items, last_position(items), base["ids"].unsqueeze(1))[:, 0]
        j = (~window).float().argmax(1)  # per row a retrieved item the window has not seen
        target = base["ids"][torch.arange(3), j]
        seen = torch.zeros(3, 40, dtype=torch.bool)
        seen[torch.arange(3), target] = True
        _, _, flagged = rank_topk(m, user, items, actions, times, device, k=3, return_all=True, seen=seen)
        _, _, none = rank_topk(m, user, items, actions, times, device, k=3, return_all=True,
                               seen=torch.zeros_like(seen))
    assert torch.allclose(none["score"], base["score"], atol=1e-6)
    hit = base["ids"] == target.unsqueeze(1)  # [B, M] (the item may be retrieved by several heads)
    diff = (flagged["score"] - base["score"]).abs()
    assert (diff[hit] > 1e-4).all() and (diff[~hit] <= 1e-6).all()


@pytest.mark.parametrize("shortlist", [0, 30])
def test_serving_retrieval_with_candidates_equals_the_masked_corpus(shortlist):
    """The serving graph's retrieval (precomputed corpus table, a bias on rows never served, the
    request's candidates as an index list, optionally an exactly rescored shortlist) ranks like the
    evaluation path's dense eligibility mask: an open row, a restricted row, a row whose only
    candidates are rows never served (nothing), and a tail of unmapped rows that no row gets."""
    from trainer.infer import corpus_bias, corpus_table

    m = model(retrieve_n=10)
    user, items, actions, times, device = inputs(m.cfg, B=3)
    valid = 35  # rows 35..39: a padded table's tail no id maps to
    cand = torch.tensor([[0, 0, 0, 0], [7, 12, 30, 33], [36, 38, 0, 0]])
    eligible = torch.zeros(3, 40, dtype=torch.bool)
    eligible[0, 2:valid] = True
    eligible[1, [7, 12, 30, 33]] = True
    with torch.no_grad():
        want = rank_topk(m, user, items, actions, times, device, eligible, k=8)
        got = rank_topk(m, user, items, actions, times, device, k=8, corpus_t=corpus_table(m),
                        corpus_bias=corpus_bias(40, valid), candidates=cand, shortlist=shortlist)
    real = want[1] > -5e8
    assert torch.equal(real, got[1] > -5e8) and real[0].all() and real[1, :4].all() and not real[2].any()
    assert torch.equal(want[0][real], got[0][real])
    assert torch.allclose(want[1][real], got[1][real], atol=1e-5)
    assert (got[0][0] < valid).all()


def test_click_share_feature_reaches_only_its_candidate_and_old_configs_load_without_it():
    from trainer import checkpoint as ck
    from trainer.model.config import OneRankerConfig
    from trainer.model.oneranker import centred_log_share

    m = model(popularity_feature=True)
    share = torch.full((40,), -30.0)
    share[2:30] = torch.linspace(-6.0, -2.0, 28)  # rows 30+: no item yet
    m.set_item_log_pop(share)
    pop = m.item_log_pop
    assert abs(float(pop[2:30].mean())) < 1e-5 and (pop[:2] == 0).all() and (pop[30:] == 0).all()
    assert torch.allclose(pop, centred_log_share(share, 40))
    user, items, actions, times, device = inputs(m.cfg)
    cand = torch.tensor([[3, 4, 5]] * 3)
    base = score_candidates(m, user, items, actions, times, device, cand)["score"]
    with torch.no_grad():
        m.item_log_pop[4] += 3.0
    s = score_candidates(m, user, items, actions, times, device, cand)["score"]
    assert not torch.allclose(s[:, 1], base[:, 1], atol=1e-4) and torch.allclose(s[:, [0, 2]], base[:, [0, 2]], atol=1e-6)
    # a checkpoint config from before the switch: no feature, no tensors, loads as it was trained
    old_cfg = {k: v for k, v in m.cfg.to_dict().items() if k != "popularity_feature"}
    assert OneRankerConfig.from_dict(old_cfg).popularity_feature is False
    old = OneRanker(OneRankerConfig.from_dict(old_cfg))
    assert "item_log_pop" not in old.state_dict() and old.ranker.pop_in is None
    restored = ck.build_model(ck.Checkpoint(0, old_cfg, old.state_dict(), {}, {}))
    assert "item_log_pop" not in restored.state_dict()


def test_a_checkpoint_config_from_before_embed_norm_builds_the_model_it_was_trained_as():
    from trainer.model.config import OneRankerConfig, preset
    from trainer.model.oneranker import OneRanker

    new = preset("tiny", num_items=20, num_users=5)
    old = {k: v for k, v in new.to_dict().items() if k != "embed_norm"}
    assert new.embed_norm and not OneRankerConfig.from_dict(old).embed_norm
    keys_new = set(OneRanker(new).state_dict())
    keys_old = set(OneRanker(OneRankerConfig.from_dict(old)).state_dict())
    assert keys_new - keys_old == {"backbone.embed_ln.weight", "backbone.embed_ln.bias"}
