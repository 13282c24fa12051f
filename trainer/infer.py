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


def serving_retrieval(model, task, s_target, corpus_t, corpus_bias, candidates, n: int, shortlist: int = 0):
    """The serving graph's retrieval → (head scores, head ids) [B, T, n] each.

    Rows without candidates (``candidates`` all 0) scan the corpus: [task | s_target] · ``corpus_t``
    + ``corpus_bias`` (NEG on the rows no request may get: padding, OOV, rows no id maps to; 0
    elsewhere, so a real item's score is exact), then each head's top n, or its top ``shortlist``
    rescored exactly from the item table (an int8 scan, exporter.quantize). Rows with candidates
    [B, C] (item rows, 0-padded) score only those, exactly, from the item table. No corpus-sized
    mask per request: masking [B, T, N] scores was 7 of 52 ms at 1M ads."""
    B = task.shape[0]
    tq, sq = task[:, 0], s_target[:, 0]  # [B, T, d], [B, T, k]
    corpus = torch.cat([tq, sq], dim=-1) @ corpus_t + corpus_bias  # [B, T, N]
    if shortlist > n:
        scan_scores, scan_ids = corpus.topk(min(shortlist, corpus.shape[-1]), dim=-1)  # [B, T, m]
        exact = model.step2.score_own(tq, sq, model.item_table[scan_ids]).masked_fill(scan_scores <= NEG / 2, NEG)
        open_scores, j = exact.topk(n, dim=-1)
        open_ids = torch.gather(scan_ids, 2, j)
    else:
        open_scores, open_ids = corpus.topk(n, dim=-1)
    # candidate rows: n padding columns on top, so that every row has n to pick from
    cand = torch.cat([candidates, torch.zeros_like(candidates[:, :1]).expand(B, n)], dim=1)  # [B, C+n]
    cand_scores = model.step2.score_each(task, s_target, model.item_table[cand].unsqueeze(1))[:, 0]  # [B, T, C+n]
    cand_scores = cand_scores.masked_fill((corpus_bias[cand] < 0).unsqueeze(1), NEG)
    cand_scores, j = cand_scores.topk(n, dim=-1)
    cand_ids = torch.gather(cand.unsqueeze(1).expand(-1, j.shape[1], -1), 2, j)
    restricted = (candidates > 0).any(-1).view(B, 1, 1)
    return torch.where(restricted, cand_scores, open_scores), torch.where(restricted, cand_ids, open_ids)


def rank_topk(model, user, items, actions, times, device, eligible=None, k: int | None = None,
              return_all: bool = False, seen=None, seen_ids=None, corpus_t=None, shortlist: int = 0,
              corpus_bias=None, candidates=None):
    """user [B], items/actions [B,L] (left-padded), times [B,L] float, device [B] (context),
    eligible [B, num_items] bool or None → (top-K ids [B,K], scores [B,K]).
    ``seen`` [B, num_items] bool or None: the items of the user's longer history (the feature
    store keeps more tokens than Step 1 reads); Step 3's seen-before flag is the window's or'ed
    with it. ``seen_ids`` [B, H] int64 (0-padded) is the same as an index list (serving: no
    corpus-sized input per request).

    Serving (``corpus_t`` given: ``corpus_table(model)`` [d+k, num_items], precomputed once per
    snapshot): retrieval is ``serving_retrieval`` with ``corpus_bias`` [num_items] and eligibility
    as ``candidates`` [B, C] (0-padded item rows; a row of zeros = every ad) instead of ``eligible``,
    and ``shortlist`` m > retrieve_n rescores each head's top m of an int8 scan exactly.

    With ``return_all`` also returns the merged retrieved set and both steps' scores on it
    (for the Step-2/Step-3 consistency metrics)."""
    cfg = model.cfg
    k = k or cfg.top_k
    pos = last_position(items)
    mem, mask = model.encode(user, items, actions, times, pos, device.view(-1, 1))
    task, fake, s_target = model.step2(mem, mask)
    serving = corpus_t is not None
    if serving:
        n_items = corpus_t.shape[-1]
        n = min(cfg.retrieve_n, n_items)
        if corpus_bias is None or candidates is None:
            raise ValueError("serving retrieval (corpus_t) needs corpus_bias and candidates")
        head_scores, head_ids = serving_retrieval(model, task, s_target, corpus_t, corpus_bias, candidates, n,
                                                  shortlist)
    else:
        corpus = model.corpus_scores(task, s_target)[:, 0]  # [B, T, N]
        n_items = corpus.shape[-1]
        ok = torch.arange(n_items, device=corpus.device) >= 2  # never padding / OOV
        ok = ok.unsqueeze(0) if eligible is None else ok & eligible
        corpus = corpus.masked_fill(~ok.unsqueeze(1), NEG)
        n = min(cfg.retrieve_n, n_items)
        head_scores, head_ids = corpus.topk(n, dim=-1)  # [B, T, n]
    ids = head_ids.flatten(1)  # [B, T*n]
    invalid = head_scores.flatten(1) <= NEG / 2
    M = ids.shape[1]
    same = ids.unsqueeze(2) == ids.unsqueeze(1)  # [B, M, M]
    earlier = torch.ones(M, M, dtype=torch.bool, device=ids.device).tril(-1)
    dup = (same & earlier).any(-1)
    if serving:  # bagged generator score of each retrieved item: every head's exact score of it
        gen = model.step2.score_each(task, s_target, model.item_table[ids].unsqueeze(1))[:, 0].mean(1)
    else:  # the same, gathered from the corpus scores (no second pass over the corpus)
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


@torch.no_grad()
def corpus_bias(num_items: int, valid_rows: int | None = None) -> torch.Tensor:
    """[num_items]: 0 on the rows a request may get (2 ≤ row < ``valid_rows``, the id map's length;
    default every row), NEG on padding, OOV and the rows no id maps to (a padded table's tail)."""
    rows = torch.arange(num_items)
    top = num_items if valid_rows is None else min(valid_rows, num_items)
    return torch.where((rows >= 2) & (rows < top), 0.0, NEG)


class ServingGraph(nn.Module):
    """The exported serving graph: (user, items, actions, times, device, candidates, seen_ids) → (ids, scores).

    The corpus side of the scores is a buffer (``corpus_t``) computed when the graph is built, so a
    request reads one [d+k, N] table instead of normalising the item table and projecting it on the
    centroids every time; so is ``corpus_bias``, the rows no request may get (``valid_rows``: the
    id map's length). ``candidates`` [B, C] restricts a row to those item rows (0-padded; zeros =
    every ad); ``seen_ids`` [B, H] lists the items of the user's longer history."""

    def __init__(self, model, k: int | None = None, shortlist: int = 0, valid_rows: int | None = None):
        super().__init__()
        self.model = model
        self.k = k or model.cfg.top_k
        self.shortlist = shortlist  # > retrieve_n: the graph rescores a scan shortlist (quantised corpus)
        self.register_buffer("corpus_t", corpus_table(model))
        self.register_buffer("corpus_bias", corpus_bias(model.cfg.num_items, valid_rows))

    def forward(self, user, items, actions, times, device, candidates, seen_ids):
        return rank_topk(self.model, user, items, actions, times, device, k=self.k, seen_ids=seen_ids,
                         corpus_t=self.corpus_t, corpus_bias=self.corpus_bias, candidates=candidates,
                         shortlist=self.shortlist)


def dynamic_shapes(max_len: int) -> tuple:
    """The serving graph's dynamic dimensions: batch everywhere, history length up to max_len,
    candidates and seen items per row."""
    B, S = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=1, max=max_len)
    C, H = torch.export.Dim("cand", min=1), torch.export.Dim("seen", min=1)
    return ({0: B}, {0: B, 1: S}, {0: B, 1: S}, {0: B, 1: S}, {0: B}, {0: B, 1: C}, {0: B, 1: H})


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
    """example_inputs in the serving graph's form: ``seen`` as an index list, eligibility as
    candidates (row 0: every ad; the other rows: up to 8 distinct random item rows each)."""
    user, items, actions, times, device, _, seen = example_inputs(cfg, batch, seq_len, g)
    C = min(8, cfg.num_items - 2)
    cand = torch.stack([torch.randperm(cfg.num_items - 2, generator=g)[:C] + 2 for _ in range(batch)])
    cand[0] = 0
    return user, items, actions, times, device, cand, seen_index(seen)
