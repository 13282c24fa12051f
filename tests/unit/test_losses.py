import torch
import torch.nn.functional as F

from trainer.losses import bpr_loss, dc_loss, sampled_softmax


def test_sampled_softmax_with_every_item_is_cross_entropy():
    torch.manual_seed(0)
    N = 12
    logits = torch.randn(4, N)
    target = torch.randint(2, N, (4,))
    ids = torch.arange(2, N)
    log_q = torch.zeros(N)
    got = sampled_softmax(logits.gather(1, target[:, None]), logits[:, 2:], target[:, None], ids, log_q,
                          torch.ones(4, 1))
    want = F.cross_entropy(logits[:, 2:], target - 2)
    assert torch.allclose(got, want, atol=1e-5)


def test_sampled_softmax_ignores_missing_targets_and_weights_values():
    pos = torch.tensor([[1.0, 5.0]])
    neg = torch.tensor([[0.0, 0.0]])
    ids = torch.tensor([[3, 0]])  # second target missing
    lq = torch.zeros(6)
    a = sampled_softmax(pos, neg, ids, torch.tensor([4, 5]), lq, torch.ones(1, 2))
    b = sampled_softmax(pos[:, :1], neg, ids[:, :1], torch.tensor([4, 5]), lq, torch.ones(1, 1))
    assert torch.allclose(a, b)


def test_logq_correction_lowers_popular_negatives():
    pos, neg = torch.tensor([[0.0]]), torch.tensor([[0.0, 0.0]])
    ids, negs = torch.tensor([[1]]), torch.tensor([2, 3])
    flat = sampled_softmax(pos, neg, ids, negs, torch.log(torch.tensor([.25, .25, .25, .25])), torch.ones(1, 1))
    pop = sampled_softmax(pos, neg, ids, negs, torch.log(torch.tensor([.1, .1, .4, .4])), torch.ones(1, 1))
    assert pop < flat


def test_bpr_orders_by_value():
    value = torch.tensor([[2.0, 0.0, 1.0]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    good = bpr_loss(torch.tensor([[3.0, 1.0, 2.0]]), value, valid)
    bad = bpr_loss(torch.tensor([[1.0, 3.0, 2.0]]), value, valid)
    assert good < bad
    assert bpr_loss(torch.zeros(1, 3), torch.zeros(1, 3), valid) == 0


def test_dc_teacher_is_stopgrad_and_matches_cross_entropy():
    s = torch.randn(2, 5, requires_grad=True)
    g = torch.randn(2, 5, requires_grad=True)
    valid = torch.ones(2, 5, dtype=torch.bool)
    loss = dc_loss(s, g, valid, tau=0.5)
    loss.backward()
    assert s.grad is None or not s.grad.any()
    assert g.grad.abs().sum() > 0
    want = -(torch.softmax(s.detach() / 0.5, -1) * torch.log_softmax(g.detach(), -1)).sum(-1).mean()
    assert torch.allclose(loss, want, atol=1e-6)


def test_dc_restricts_to_valid_candidates():
    s, g = torch.randn(1, 4), torch.randn(1, 4)
    valid = torch.tensor([[True, True, False, False]])
    a = dc_loss(s, g, valid)
    g2 = g.clone()
    g2[0, 2:] += 100.0
    assert torch.allclose(a, dc_loss(s, g2, valid))


def test_retrieved_list_loss_is_softmax_ce_on_retrieved_positives_only():
    from trainer.losses import retrieved_list_loss

    score = torch.tensor([[[2.0, 0.5, -1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]])  # [1, 2 queries, 4]
    ids = torch.tensor([[[5, 6, 7, 8], [5, 6, 7, 8]]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    # query 0: target 6 retrieved; query 1: target 9 was not retrieved → no contribution
    tg = torch.tensor([[[6, 0], [9, 0]]])
    loss, cover = retrieved_list_loss(score, ids, tg, valid)
    assert torch.allclose(loss, F.cross_entropy(score[0, :1], torch.tensor([1])))
    assert cover == 0.5
    # two positives: each one's denominator leaves the other out
    tg2 = torch.tensor([[[6, 5], [0, 0]]])
    loss2, _ = retrieved_list_loss(score, ids, tg2, valid)
    a = F.cross_entropy(score[0, 0, 1:].unsqueeze(0), torch.tensor([0]))  # 6 vs {7, 8}
    b = F.cross_entropy(score[0, 0, [0, 2, 3]].unsqueeze(0), torch.tensor([0]))  # 5 vs {7, 8}
    assert torch.allclose(loss2, (a + b) / 2)
    score.requires_grad_(True)
    retrieved_list_loss(score, ids, tg, valid)[0].backward()
    assert not score.grad[0, 1].any()  # the uncovered query gets no gradient
