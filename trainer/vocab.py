"""Id maps and the embedding tables that grow with them: the one place for both.

* ``IdMap``: string id → contiguous index; 0 = padding, 1 = unknown/OOV; grows with ``get_or_add``;
  saved/loaded as a plain ``{key: index}`` dict. The offline harness, the online trainer, the
  checkpoints and the exporter's snapshots all use it.
* ``Vocab``: the online trainer's item and user maps with preallocated capacity. New ads/users get
  the next row of a preallocated embedding table; when a table is full it grows ×2 by copying (the
  new rows get the model's init), and the optimizer state (AdamW exp_avg / exp_avg_sq) is padded
  with zeros and re-keyed to the new Parameter (``resize_rows``, ``set_table_sizes``), so training
  continues exactly as if the table had always been big. Why not hashing: hashed rows collide, and
  a collision makes two ads indistinguishable in corpus retrieval and in the exporter's id map; a
  dense map stays exact, growth is rare (log2 of the corpus size times) and costs one copy.
  Checkpoints hold the tables TRIMMED to the used rows (so ``trainer.checkpoint.build_model`` gives
  the exporter a model without untrained rows); on resume the same grow path pads them back to
  capacity. ``max_users`` is the admission limit for users (beyond it new users share the OOV row);
  every ad is admitted (it must be rankable).
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from trainer.model.config import OneRankerConfig

PAD, OOV = 0, 1

# Rows of these tensors are indexed by item / user id (the adapter to trainer/model/*: if the model
# renames its tables, only these two tuples change).
ITEM_ROWS = ("backbone.embed.item.weight", "item_log_bid", "item_log_pop")  # those the model has
USER_ROWS = ("backbone.embed.user.weight",)
ITEM_INIT_STD, USER_INIT_STD = 0.05, 0.02  # as TokenEmbedding initialises them


class IdMap:
    """String id ↔ contiguous index. Index 0 is padding, 1 is unknown/OOV."""

    def __init__(self, index: dict[str, int] | None = None):
        self.index: dict[str, int] = {}
        self.keys: list[str | None] = [None, None]
        for k, i in sorted((index or {}).items(), key=lambda kv: kv[1]):
            self.index[k] = i
            while len(self.keys) <= i:
                self.keys.append(None)
            self.keys[i] = k

    def __len__(self) -> int:
        return len(self.keys)

    def get_or_add(self, key: str) -> int:
        i = self.index.get(key)
        if i is None:
            i = self.index[key] = len(self.keys)
            self.keys.append(key)
        return i

    def get(self, key: str) -> int:
        return self.index.get(key, OOV)

    def lookup(self, keys: Iterable[str]) -> list[int]:
        return [self.index.get(k, OOV) for k in keys]

    def to_dict(self) -> dict[str, int]:
        return dict(self.index)

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> "IdMap":
        return cls({str(k): int(v) for k, v in d.items()})


class Vocab:
    """Item and user id maps plus the capacity policy of the embedding tables."""

    def __init__(self, items: IdMap | None = None, users: IdMap | None = None, min_capacity: int = 1024,
                 max_users: int | None = None):
        self.items = items or IdMap()
        self.users = users or IdMap()
        self.min_capacity = min_capacity
        self.max_users = max_users
        self.new_items: list[tuple[int, str]] = []  # admitted since the learner last initialised rows
        self.new_users: list[tuple[int, str]] = []

    def item(self, key: str) -> int:
        key = str(key)
        i = self.items.index.get(key)
        if i is None:
            i = self.items.get_or_add(key)
            self.new_items.append((i, key))
        return i

    def user(self, key: str) -> int:
        key = str(key)
        i = self.users.index.get(key)
        if i is None:
            if self.max_users is not None and len(self.users) >= self.max_users:
                return OOV
            i = self.users.get_or_add(key)
            self.new_users.append((i, key))
        return i

    def capacity_for(self, used: int, current: int) -> int:
        cap = max(current, self.min_capacity)
        while cap < used:
            cap *= 2
        return cap


# ------------------------------------------------------------------------------------------
# Growing tables


def owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding the dotted tensor ``name`` and the attribute's name there."""
    *path, attr = name.split(".")
    mod = model
    for p in path:
        mod = getattr(mod, p)
    return mod, attr


@torch.no_grad()
def resize_rows(model: nn.Module, opt: torch.optim.Optimizer | None, name: str, rows: int,
                init_std: float = 0.0) -> None:
    """Resize the id-indexed tensor ``name`` (parameter or buffer) to ``rows`` rows in place: old rows
    are copied, new rows get N(0, init_std) (params) or 0 (buffers). The optimizer follows: its
    param reference is swapped and per-parameter state tensors of the old shape are zero-padded."""
    mod, attr = owner(model, name)
    old = getattr(mod, attr)
    n = min(rows, old.shape[0])
    if isinstance(old, nn.Parameter):
        data = old.data.new_empty((rows, *old.shape[1:]))
        data.normal_(0.0, init_std) if init_std > 0 else data.zero_()
        data[:n] = old.data[:n]
        if attr == "weight" and getattr(mod, "padding_idx", None) is not None and n == 0:
            data[mod.padding_idx].zero_()
        new = nn.Parameter(data, requires_grad=old.requires_grad)
        setattr(mod, attr, new)
        if hasattr(mod, "num_embeddings"):
            mod.num_embeddings = rows
        if opt is not None:
            for g in opt.param_groups:
                g["params"] = [new if p is old else p for p in g["params"]]
            st = opt.state.pop(old, None)
            if st is not None:
                for k, v in list(st.items()):
                    if torch.is_tensor(v) and v.shape == old.shape:
                        pad = v.new_zeros((rows, *v.shape[1:]))
                        pad[:n] = v[:n]
                        st[k] = pad
                opt.state[new] = st
    else:
        data = old.new_zeros((rows, *old.shape[1:]))
        data[:n] = old[:n]
        mod._buffers[attr] = data


def id_init(keys: Sequence[str], d: int, std: float, salt: int = 0) -> torch.Tensor:
    """Initial embedding rows for newly admitted ids: N(0, std) seeded by the id itself, so a row's
    start does not depend on when (or in which process, before or after a resume) it was admitted."""
    out = torch.empty(len(keys), d)
    g = torch.Generator()
    for j, k in enumerate(keys):
        g.manual_seed(int.from_bytes(hashlib.blake2b(f"{salt}:{k}".encode(), digest_size=8).digest(), "little") >> 1)
        out[j] = torch.randn(d, generator=g) * std
    return out


@torch.no_grad()
def init_new_rows(model: nn.Module, opt: torch.optim.Optimizer, vocab: Vocab, seed: int) -> None:
    """Rows of ids ``vocab`` admitted since the last call start from an id-seeded init (and zero
    optimizer moments)."""
    for new, name, std, salt in ((vocab.new_items, ITEM_ROWS[0], ITEM_INIT_STD, seed),
                                 (vocab.new_users, USER_ROWS[0], USER_INIT_STD, seed + 1)):
        if not new:
            continue
        mod, attr = owner(model, name)
        w = getattr(mod, attr)
        idx = torch.tensor([i for i, _ in new], device=w.device)
        w[idx] = id_init([k for _, k in new], w.shape[1], std, salt).to(w)
        for v in opt.state.get(w, {}).values():
            if torch.is_tensor(v) and v.shape == w.shape:
                v[idx] = 0
        new.clear()


def set_table_sizes(model: nn.Module, opt, num_items: int | None = None, num_users: int | None = None) -> None:
    """Grow (or shrink) the item / user tables and keep every config object in the model in sync."""
    if num_items is not None and num_items != model.item_table.shape[0]:
        for name in ITEM_ROWS:
            mod, attr = owner(model, name)
            if getattr(mod, attr, None) is not None:
                resize_rows(model, opt, name, num_items, ITEM_INIT_STD if name.endswith("weight") else 0.0)
    if num_users is not None and num_users != model.backbone.embed.user.weight.shape[0]:
        for name in USER_ROWS:
            resize_rows(model, opt, name, num_users, USER_INIT_STD)
    ni, nu = model.item_table.shape[0], model.backbone.embed.user.weight.shape[0]
    seen = set()
    for m in model.modules():
        c = getattr(m, "cfg", None)
        if isinstance(c, OneRankerConfig) and id(c) not in seen:
            seen.add(id(c))
            c.num_items, c.num_users = ni, nu


def trimmed_rows(vocab: Vocab) -> dict[str, int]:
    """Rows in use per id-indexed tensor: what a checkpoint keeps of each table."""
    ni, nu = len(vocab.items), len(vocab.users)
    return {n: ni for n in ITEM_ROWS} | {n: nu for n in USER_ROWS}
