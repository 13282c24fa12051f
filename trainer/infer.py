"""THE inference function: evaluation, export and serving all call ``rank_topk``/``score_candidates``.

history → Step 1 → Step 2 at the newest position → dual-channel scores over the whole corpus
(optional eligibility mask) → top-N per head → merge (duplicates masked) → Step 3 → top-K.
No Python control flow depends on tensor values, so the graph exports with
``torch.onnx.export(..., dynamo=True)``; TopK/Gather/boolean masks do the work.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from trainer.data import last_position

NEG = -1e9


def rank_topk(model, user, items, actions, times, device, eligible=None, k: int | None = None,
              return_all: bool = False, seen=None, seen_ids=None, corpus_t=None, shortlist: int = 0):
    """user [B], items/actions [B,L] (left-padded), times [B,L] float, device [B] (context),
    eligible [B, num_items] bool or None → (top-K ids [B,K], scores [B,K]).
    ``seen`` [B, num_items] bool or None: the items of the user's longer history (the feature
    store keeps more tokens than Step 1 reads); Step 3's seen-before flag is the window's or'ed
    with it. ``seen_ids`` [B, H] int64 (0-padded) is the same as an index list (serving: no
    corpus-sized input per request). ``corpus_t`` [d+k, num_items]: ``corpus_table(model)``
    precomputed once per snapshot (serving), else the corpus side is computed here.
    ``shortlist`` m > retrieve_n (serving with a quantised corpus table): each head keeps the top m
    of the corpus scan, rescores them exactly from the item table and retrieves its top-N from
    those, and the generator score Step 3 reads is exact too; with an exact scan this is the same
    result, with an int8 scan (exporter.quantize) it differs only when a true top-N item falls
    outside the scan's top m.

    With ``return_all`` also returns the merged retrieved set and both steps' scores on it
    (for the Step-2/Step-3 consistency metrics)."""
    cfg = model.cfg
    k = k or cfg.top_k
    pos = last_position(items)
    mem, mask = model.encode(user, items, actions, times, pos, device.view(-1, 1))
    task, fake, s_target = model.step2(mem, mask)
    if corpus_t is None:
        corpus = model.corpus_scores(task, s_target)[:, 0]  # [B, T, N]
    else:  # the same dual-channel score as one matmul against the precomputed corpus side
        corpus = torch.cat([task, s_target], dim=-1)[:, 0] @ corpus_t  # [B, T, N]
    n_items = corpus.shape[-1]
    ok = torch.arange(n_items, device=corpus.device) >= 2  # never padding / OOV
    ok = ok.unsqueeze(0) if eligible is None else ok & eligible
    corpus = corpus.masked_fill(~ok.unsqueeze(1), NEG)
    n = min(cfg.retrieve_n, n_items)
    if shortlist > n and corpus_t is not None:
        m = min(shortlist, n_items)
        scan_scores, scan_ids = corpus.topk(m, dim=-1)  # [B, T, m]
        exact = model.step2.score_own(task[:, 0], s_target[:, 0], model.item_table[scan_ids])  # [B, T, m]
        exact = exact.masked_fill(scan_scores <= NEG / 2, NEG)
        head_scores, j = exact.topk(n, dim=-1)  # [B, T, n]
        head_ids = torch.gather(scan_ids, 2, j)
    else:
        head_scores, head_ids = corpus.topk(n, dim=-1)  # [B, T, n]
    ids = head_ids.flatten(1)  # [B, T*n]
    invalid = head_scores.flatten(1) <= NEG / 2
    M = ids.shape[1]
    same = ids.unsqueeze(2) == ids.unsqueeze(1)  # [B, M, M]
    earlier = torch.ones(M, M, dtype=torch.bool, device=ids.device).tril(-1)
    dup = (same & earlier).any(-1)
    if shortlist > n and corpus_t is not None:  # every head's exact score of every retrieved item
        gen = model.step2.score_each(task, s_target, model.item_table[ids].unsqueeze(1))[:, 0].mean(1)
    else:  # bagged generator score of each retrieved item (gathered first: no pass over the corpus)
        gen = torch.gather(corpus, 2, ids.unsqueeze(1).expand(-1, corpus.shape[1], -1)).mean(1)
    if model.ranker is not None:
        s2 = torch.cat([task, fake], dim=2)
        flag = model.seen_in_history(items, pos, ids.unsqueeze(1))
        if seen is not None:
            flag = flag | torch.gather(seen, 1, ids).unsqueeze(1)
        if seen_ids is not None:
            hit = (ids.unsqueeze(-1) == seen_ids.unsqueeze(1)) & (seen_ids.unsqueeze(1) > 1)  # [B, M, H]
            flag = flag | hit.any(-1).unsqueeze(1)
        score = model.rank(mem, mask, s2, ids.unsqueeze(1), flag, gen.unsqueeze(1))[0][:, 0]  # [B, M]
    else:
        score = gen
    final = score.masked_fill(dup | invalid, NEG)
    top_scores, top_i = final.topk(min(k, M), dim=-1)
    top_ids = torch.gather(ids, 1, top_i)
    if return_all:
        return top_ids, top_scores, {"ids": ids, "drop": dup | invalid, "gen": gen, "score": score}
    return top_ids, top_scores


def score_candidates(model, user, items, actions, times, device, cand, seen=None):
    """Score a given candidate list cand [B, C] → dict(score, gen, ctr, cvr) each [B, C]
    (score = Step 3, or the generator's bagged score when the model has no Step 3).
    ``seen`` [B, C]: candidates in the user's longer history (see OneRanker.forward)."""
    pos = last_position(items)
    out = model(user, items, actions, times, pos, device.view(-1, 1), cand.unsqueeze(1),
                seen=None if seen is None else seen.unsqueeze(1))
    gen = out["gen_cand"][:, 0].mean(1)
    res = {"gen": gen, "score": out["score"][:, 0] if "score" in out else gen}
    if "ctr" in out:
        res["ctr"], res["cvr"] = out["ctr"][:, 0], out["cvr"][:, 0]
    return res


@torch.no_grad()
def corpus_table(model) -> torch.Tensor:
    """The corpus side of the dual-channel score, [d + k, num_items]: the item embeddings and their
    cosines to the k fake-item centroids (Step2.score_all), transposed for a plain MatMul."""
    e = model.item_table.detach()
    if model.step2.n_fake:
        e = torch.cat([e, model.step2.item_side(e)], dim=1)
    return e.T.contiguous()


class ServingGraph(nn.Module):
    """The exported serving graph: (user, items, actions, times, device, eligible, seen_ids) → (ids, scores).

    The corpus side of the scores is a buffer (``corpus_t``) computed when the graph is built, so a
    request reads one [d+k, N] table instead of normalising the item table and projecting it on the
    centroids every time; ``seen_ids`` [B, H] lists the items of the user's longer history."""

    def __init__(self, model, k: int | None = None, shortlist: int = 0):
        super().__init__()
        self.model = model
        self.k = k or model.cfg.top_k
        self.shortlist = shortlist  # > retrieve_n: the graph rescores a scan shortlist (quantised corpus)
        self.register_buffer("corpus_t", corpus_table(model))

    def forward(self, user, items, actions, times, device, eligible, seen_ids):
        return rank_topk(self.model, user, items, actions, times, device, eligible, self.k, seen_ids=seen_ids,
                         corpus_t=self.corpus_t, shortlist=self.shortlist)


def dynamic_shapes(max_len: int) -> tuple:
    """The serving graph's dynamic dimensions: batch everywhere, history length up to max_len."""
    B, S = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=1, max=max_len)
    H = torch.export.Dim("seen", min=1)
    return ({0: B}, {0: B, 1: S}, {0: B, 1: S}, {0: B, 1: S}, {0: B}, {0: B}, {0: B, 1: H})


def export_onnx(model, path: str, batch: int = 2, seq_len: int | None = None, k: int | None = None):
    """Export the serving graph with dynamic batch and history length (examples ≥ 2 in every
    dynamic dimension, DESIGN §8 trap 1). Returns the ONNXProgram."""
    cfg = model.cfg
    L = seq_len or cfg.max_len
    g = torch.Generator().manual_seed(0)
    args = serving_inputs(cfg, batch, L, g)
    graph = ServingGraph(model.eval(), k).eval()
    prog = torch.onnx.export(graph, args, dynamo=True, dynamic_shapes=dynamic_shapes(cfg.max_len),
                             external_data=False)
    prog.save(path)
    return prog


def example_inputs(cfg, batch: int, seq_len: int, g: torch.Generator | None = None):
    user = torch.randint(2, cfg.num_users, (batch,), generator=g)
    items = torch.randint(2, cfg.num_items, (batch, seq_len), generator=g)
    items[0, : seq_len // 2] = 0  # left padding in one row
    actions = torch.randint(2, 4, (batch, seq_len), generator=g) * (items > 0)
    times = -torch.sort(torch.rand(batch, seq_len, generator=g) * 1e5, dim=1, descending=True).values
    device = torch.randint(0, cfg.num_devices, (batch,), generator=g)
    eligible = torch.rand(batch, cfg.num_items, generator=g) > 0.2
    seen = torch.rand(batch, cfg.num_items, generator=g) > 0.9
    return user, items, actions, times, device, eligible, seen


def seen_index(seen: torch.Tensor, min_len: int = 2) -> torch.Tensor:
    """A dense seen mask [B, N] → the serving graph's index list [B, H] (0-padded, H ≥ min_len)."""
    rows = [torch.nonzero(r).flatten() for r in seen]
    H = max([min_len] + [len(r) for r in rows])
    out = torch.zeros(len(rows), H, dtype=torch.int64)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
    return out


def serving_inputs(cfg, batch: int, seq_len: int, g: torch.Generator | None = None):
    """example_inputs in the serving graph's form (``seen`` as an index list)."""
    *head, seen = example_inputs(cfg, batch, seq_len, g)
    return (*head, seen_index(seen))
