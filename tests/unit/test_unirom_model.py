"""UniROM model package: shapes, padding, set-awareness, O(N·C) cost of cluster attention, and the
auction properties (bid monotonicity of the allocation, IR of the payments) over random bids."""

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer.model.unirom import GCFLayer, UniROM, UniROMConfig, greedy_allocate, sample_allocate
from trainer.model.unirom.aucformer import gather_rows
from trainer.model.unirom.cluster_attention import FullAttention

B, L, N = 3, 7, 20


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is faster, and far less hurt by a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_cfg(**kw):
    return UniROMConfig(num_items=60, num_users=10, num_advertisers=8, num_categories=5, d_model=16,
                        n_clusters=4, n_layers=2, mif_every=1, head_hidden=(16,), **kw)


def inputs(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(2, 60, (B, L), generator=g)
    hist[0, :3] = 0  # left padding
    hist[1] = 0  # an empty history: only the user token remains
    return (torch.tensor([2, 3, 4]), torch.tensor([1, 2, 0]), hist, torch.randint(1, 4, (B, L), generator=g),
            torch.randint(2, 60, (B, n), generator=g), torch.ones(B, n, dtype=torch.bool))


def flops(module, *args) -> int:
    with FlopCounterMode(display=False) as fc:
        module(*args)
    return fc.get_total_flops()


def test_shapes_and_no_nan_with_an_empty_history():
    m = UniROM(small_cfg()).eval()
    u, dv, hi, ha, cand, mask = inputs()
    rec = m.recformer(u, dv, hi, ha, cand, mask)
    assert rec["h"].shape == (B, N, 16) and rec["ctr_logit"].shape == (B, N) == rec["cvr_logit"].shape
    assert torch.isfinite(rec["h"]).all()
    bids = torch.rand(B, N) + 0.1
    z = m.generator(rec["h"], rec["ctr_logit"], mask, bids)
    assert z.shape == (B, N, 3)
    out = m.auction(rec, mask, bids)
    assert out["slots"].shape == (B, 3) == out["payment"].shape
    assert all(len(set(r)) == 3 for r in out["slots"].tolist())  # no ad placed twice
    assert m.evaluator(gather_rows(rec["h"], out["slots"])).shape == (B, 3)
    idx, logp = sample_allocate(z, torch.Generator().manual_seed(0))
    assert idx.shape == (B, 3) and (logp <= 0).all() and all(len(set(r)) == 3 for r in idx.tolist())


def test_padded_candidates_change_nothing():
    m = UniROM(small_cfg()).eval()
    u, dv, hi, ha, cand, mask = inputs()
    a = m.recformer(u, dv, hi, ha, cand, mask)
    cand2 = torch.cat([cand, torch.zeros(B, 5, dtype=torch.long)], 1)
    b = m.recformer(u, dv, hi, ha, cand2, cand2 > 0)
    torch.testing.assert_close(a["ctr_logit"], b["ctr_logit"][:, :N], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("set_aware", [True, False])
def test_pctr_is_set_aware_only_with_gcf(set_aware):
    m = UniROM(small_cfg(set_aware=set_aware)).eval()
    u, dv, hi, ha, cand, mask = inputs()
    a = m.recformer(u, dv, hi, ha, cand, mask)["ctr_logit"][:, 0]
    cand2 = cand.clone()
    cand2[:, 1:] = torch.randint(2, 60, (B, N - 1), generator=torch.Generator().manual_seed(9))
    b = m.recformer(u, dv, hi, ha, cand2, mask)["ctr_logit"][:, 0]
    changed = (a - b).abs().max().item() > 1e-6
    assert changed == set_aware


def test_gcf_cost_grows_linearly_in_candidates_and_full_attention_quadratically():
    d, n = 32, 512
    gcf = GCFLayer(d, 2, 16).eval()
    full = FullAttention(d, 2).eval()
    with torch.no_grad():
        g1, g4 = (flops(gcf, torch.randn(1, k, d), torch.ones(1, k, dtype=torch.bool)) for k in (n, 4 * n))
        f1, f4 = (flops(full, torch.randn(1, k, d)) for k in (n, 4 * n))
    assert 3.8 < g4 / g1 < 4.2, g4 / g1  # O(N·C)
    assert f4 / f1 > 12, f4 / f1  # O(N²): the test can tell the two apart
    assert g4 < f4 / 5


def test_recformer_cost_is_linear_in_candidates():
    m = UniROM(small_cfg()).eval()
    u, dv, hi, ha, _, _ = inputs()
    with torch.no_grad():
        c = [flops(m.recformer, u, dv, hi, ha, torch.randint(2, 60, (B, k)), torch.ones(B, k, dtype=torch.bool))
             for k in (256, 1024)]
    assert c[1] / c[0] < 4.2, c[1] / c[0]


def slot_of(slots: torch.Tensor, i: int, K: int) -> torch.Tensor:
    """Slot index of candidate i per request (K = not allocated)."""
    hit = slots == i
    return torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(slots[:, 0], K))


def monotonicity_violations(m: UniROM, trials: int = 40, seed: int = 0) -> int:
    """Raise one random ad's bid in random requests: count cases where its allocation probability in
    some slot drops or where greedy filling places it later (or drops it)."""
    rng = np.random.default_rng(seed)
    u, dv, hi, ha, cand, mask = inputs(seed)
    with torch.no_grad():
        rec = m.recformer(u, dv, hi, ha, cand, mask)
        mm = m.generator.match(rec["h"], rec["ctr_logit"], mask)
        bad = 0
        for _ in range(trials):
            bids = torch.from_numpy(rng.lognormal(0.0, 0.7, size=(B, N))).float()
            i = int(rng.integers(N))
            up = bids.clone()
            up[:, i] *= float(rng.uniform(1.01, 3.0))
            z0, z1 = m.generator.logits(mm, bids, mask), m.generator.logits(mm, up, mask)
            p0, p1 = z0.softmax(1)[:, i], z1.softmax(1)[:, i]
            bad += int((p1 < p0 - 1e-7).any())
            bad += int((slot_of(greedy_allocate(z1), i, 3) > slot_of(greedy_allocate(z0), i, 3)).any())
    return bad


def test_higher_bid_never_lowers_allocation_over_random_bids():
    m = UniROM(small_cfg()).eval()
    with torch.no_grad():  # a trained-looking generator: non-zero matching term, uneven bid weights
        m.generator.ad_proj.weight.normal_(0, 0.5)
        m.generator.bid_raw.copy_(torch.tensor([-2.0, 0.3, 2.0]))
    assert monotonicity_violations(m) == 0


def test_monotonicity_check_catches_a_negative_bid_weight():
    m = UniROM(small_cfg()).eval()
    with torch.no_grad():
        m.generator.ad_proj.weight.normal_(0, 0.5)
    m.generator.__class__ = type("Neg", (m.generator.__class__,), {"bid_weight": property(lambda s: -torch.ones(3))})
    assert monotonicity_violations(m) > 0


def ir_violations(m: UniROM, trials: int = 40, seed: int = 1, scale: float = 1.0) -> int:
    rng = np.random.default_rng(seed)
    u, dv, hi, ha, cand, mask = inputs(seed)
    bad = 0
    with torch.no_grad():
        rec = m.recformer(u, dv, hi, ha, cand, mask)
        for _ in range(trials):
            bids = torch.from_numpy(rng.lognormal(0.0, 1.0, size=(B, N))).float()
            out = m.auction(rec, mask, bids)
            pay = out["payment"] * scale
            bad += int((pay > bids.gather(1, out["slots"]) + 1e-6).sum())
            bad += int((pay < 0).sum())
    return bad


def test_payment_never_exceeds_bid_over_random_bids():
    m = UniROM(small_cfg()).eval()
    with torch.no_grad():  # push the payment net towards rates near 1
        m.payment.net[-1].bias.fill_(8.0)
    assert ir_violations(m) == 0
    assert ir_violations(m, scale=1.5) > 0  # the check can fail
