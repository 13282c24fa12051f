"""The bare reference graph of ``oneranker bench serve``: the served model's three steps at the same
sizes with nothing else (no masks, time/position biases, id maps, dedupe, seen flags, bids), so the
served path's overhead is a ratio measured in the same run on the same CPU.

items [1, L] → embeddings → n_layers HSTU-style blocks (SiLU attention, causal) → Step 2: task + fake
query tokens, n_step2_layers decoder layers (cross-attention to H1, self-attention, FFN) → whole-corpus
dual-channel scores ([task | s_target] · a [d+k, N] corpus table) → top-retrieve_n per task head →
Step 3: n_step3_layers decoder layers over the retrieved candidates → top-K.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _attend(x, mem, q, kv, o, h: int, causal: bool = False):
    B, Q, d = x.shape
    K, dh = mem.shape[1], d // h
    qq = q(x).view(B, Q, h, dh).transpose(1, 2)
    k, v = kv(mem).view(B, K, 2, h, dh).permute(2, 0, 3, 1, 4)
    a = (qq @ k.transpose(-1, -2)) * dh ** -0.5
    if causal:
        a = a.masked_fill(torch.ones(Q, K, dtype=torch.bool).triu(1), -1e9)
    return o((a.softmax(-1) @ v).transpose(1, 2).reshape(B, Q, d))


class _Decoder(nn.Module):
    def __init__(self, d: int, h: int, mult: int):
        super().__init__()
        self.h = h
        self.ln = nn.ModuleList([nn.LayerNorm(d) for _ in range(3)])
        self.q1, self.kv1, self.o1 = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.q2, self.kv2, self.o2 = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, mult * d), nn.GELU(), nn.Linear(mult * d, d))

    def forward(self, x, mem):
        x = x + _attend(self.ln[0](x), mem, self.q1, self.kv1, self.o1, self.h)
        y = self.ln[1](x)
        x = x + _attend(y, y, self.q2, self.kv2, self.o2, self.h)
        return x + self.ffn(self.ln[2](x))


class _Hstu(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.h = h
        self.ln, self.ln_out = nn.LayerNorm(d), nn.LayerNorm(d)
        self.uvqk, self.o = nn.Linear(d, 4 * d), nn.Linear(d, d)

    def forward(self, x):
        B, S, d = x.shape
        dh = d // self.h
        u, v, q, k = F.silu(self.uvqk(self.ln(x))).chunk(4, dim=-1)
        q, k, v = (t.view(B, S, self.h, dh).transpose(1, 2) for t in (q, k, v))
        causal = torch.ones(S, S).tril()
        a = F.silu(q @ k.transpose(-1, -2) * dh ** -0.5) * causal / S
        y = (a @ v).transpose(1, 2).reshape(B, S, d)
        return x + self.o(self.ln_out(y) * u)


class BareGraph(nn.Module):
    def __init__(self, cfg, n_items: int, k: int):
        super().__init__()
        d, self.T, self.n_fake = cfg.d_model, cfg.n_tasks, cfg.n_fake
        self.n, self.k = min(cfg.retrieve_n, n_items), k
        g = torch.Generator().manual_seed(0)
        self.item = nn.Parameter(torch.randn(n_items, d, generator=g) * 0.05)
        self.corpus_t = nn.Parameter(torch.randn(d + self.n_fake, n_items, generator=g) * 0.05)
        self.blocks = nn.ModuleList([_Hstu(d, cfg.n_heads) for _ in range(cfg.n_layers)])
        self.queries = nn.Parameter(torch.randn(self.T + self.n_fake, d, generator=g) * 0.02)
        self.step2 = nn.ModuleList([_Decoder(d, cfg.n_heads, cfg.ffn_mult) for _ in range(cfg.n_step2_layers)])
        self.st = nn.Linear(d, self.n_fake)
        self.step3 = nn.ModuleList([_Decoder(d, cfg.n_heads, cfg.ffn_mult) for _ in range(cfg.n_step3_layers)])
        self.head = nn.Linear(d, 1)

    def forward(self, items):
        x = F.embedding(items, self.item)
        for blk in self.blocks:
            x = blk(x)
        z = self.queries.unsqueeze(0) + x[:, -1:]
        for layer in self.step2:
            z = layer(z, x)
        task = z[:, : self.T]
        scores = torch.cat([task, self.st(task)], dim=-1) @ self.corpus_t  # [1, T, N]
        ids = scores.topk(self.n, dim=-1).indices.flatten(1)  # [1, T*n]
        c = F.embedding(ids, self.item)
        mem = torch.cat([x, z], dim=1)
        for layer in self.step3:
            c = layer(c, mem)
        top = self.head(c).squeeze(-1).topk(self.k, dim=-1)
        return torch.gather(ids, 1, top.indices), top.values


def export_bare(cfg, n_items: int, k: int, path: Path, corpus_bits: int = 32) -> Path:
    """The bare graph at ``path``; ``corpus_bits`` 8: its corpus scan quantised as the served
    snapshot's is (exporter.quantize), so served/bare compares like with like."""
    model = BareGraph(cfg, n_items, k).eval()
    items = torch.randint(2, n_items, (1, cfg.max_len))
    with torch.no_grad():
        torch.onnx.export(model, (items,), str(path), input_names=["items"], output_names=["ids", "scores"],
                          dynamo=False)
    if corpus_bits == 8:
        from exporter.quantize import quantize_corpus

        quantize_corpus(path)
    return path


def time_bare(path: Path, max_len: int, n_items: int, threads: int | None, n: int = 200) -> dict:
    """Session build + one warm-up run, then ``n`` batch-1 runs: p50/p99 ms."""
    from exporter.runtime import make_session

    t0 = time.perf_counter()
    sess, providers = make_session(path, threads, want_cuda=False)
    rng = np.random.default_rng(0)
    feed = {"items": rng.integers(2, n_items, (1, max_len)).astype(np.int64)}
    sess.run(None, feed)
    ready_s = time.perf_counter() - t0
    lat = []
    for _ in range(n):
        feed = {"items": rng.integers(2, n_items, (1, max_len)).astype(np.int64)}
        t = time.perf_counter()
        sess.run(None, feed)
        lat.append(time.perf_counter() - t)
    a = np.asarray(lat) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "session_ready_s": ready_s, "providers": providers}
