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
              return_all: bool = False, seen=None):
    """user [B], items/actions [B,L] (left-padded), times [B,L] float, device [B] (context),
    eligible [B, num_items] bool or None → (top-K ids [B,K], scores [B,K]).
    ``seen`` [B, num_items] bool or None: the items of the user's longer history (the feature
    store keeps more tokens than Step 1 reads); Step 3's seen-before flag is the window's or'ed
    with it.

    With ``return_all`` also returns the merged retrieved set and both steps' scores on it
    (for the Step-2/Step-3 consistency metrics)."""
    cfg = model.cfg
    k = k or cfg.top_k
    pos = last_position(items)
    mem, mask = model.encode(user, items, actions, times, pos, device.view(-1, 1))
    task, fake, s_target = model.step2(mem, mask)
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
    gen = torch.gather(corpus.mean(1), 1, ids)  # bagged generator score of each retrieved item
    if model.ranker is not None:
        s2 = torch.cat([task, fake], dim=2)
        flag = model.seen_in_history(items, pos, ids.unsqueeze(1))
        if seen is not None:
            flag = flag | torch.gather(seen, 1, ids).unsqueeze(1)
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


class ServingGraph(nn.Module):
    """The exported serving graph: (user, items, actions, times, device, eligible, seen) → (ids, scores)."""

    def __init__(self, model, k: int | None = None):
        super().__init__()
        self.model = model
        self.k = k or model.cfg.top_k

    def forward(self, user, items, actions, times, device, eligible, seen):
        return rank_topk(self.model, user, items, actions, times, device, eligible, self.k, seen=seen)


def dynamic_shapes(max_len: int) -> tuple:
    """The serving graph's dynamic dimensions: batch everywhere, history length up to max_len."""
    B, S = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=1, max=max_len)
    return ({0: B}, {0: B, 1: S}, {0: B, 1: S}, {0: B, 1: S}, {0: B}, {0: B}, {0: B})


def export_onnx(model, path: str, batch: int = 2, seq_len: int | None = None, k: int | None = None):
    """Export the serving graph with dynamic batch and history length (examples ≥ 2 in every
    dynamic dimension, DESIGN §8 trap 1). Returns the ONNXProgram."""
    cfg = model.cfg
    L = seq_len or cfg.max_len
    g = torch.Generator().manual_seed(0)
    args = example_inputs(cfg, batch, L, g)
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
