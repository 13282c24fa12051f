"""Re-use the traced serving graph across checkpoints that differ only in their weights.

Tracing the serving graph with the dynamo exporter costs 20–30 s on a 2-core CPU, most of a
snapshot's freshness budget; yet between two checkpoints of one trainer only the weights change
(the id maps grow inside a preallocated capacity). The graph is therefore exported without the ONNX
optimizer (so every weight stays an initializer named by its state_dict key) and kept as a template;
a later checkpoint with the same signature (model config + every state tensor's shape and dtype +
top-K) gets a copy of the template with its initializers replaced. onnxruntime applies its own
graph optimizations when it builds a session, and the exporter's parity check against torch runs on
every snapshot either way, so a wrong patch is refused, never served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading

import torch

log = logging.getLogger(__name__)


def bucket(n: int, minimum: int = 1024) -> int:
    """The next power of two ≥ n (at least ``minimum``): tables grow in few, large steps."""
    size = minimum
    while size < n:
        size *= 2
    return size


def with_bucketed_tables(model, min_items: int = 1024, min_users: int = 1024):
    """The same model with its item and user tables padded to a power-of-two number of rows, so a
    growing vocabulary changes the graph's shapes (and forces a new trace) only now and then.
    ``min_items`` is the expected corpus (the ad catalog's size): with it, the first checkpoint
    already has the shapes of the later ones, and the item ids filling up the catalog never force a
    second trace (measured in ``oneranker up``: a second trace of 61 s under load, 1 min after
    the first, as the ids seen passed 1,024 of the catalog's 1,682).

    Padded rows are zeros and no id maps to them: the serving runtime's eligibility mask excludes
    item rows at or beyond the id map's length, and user lookups only ever yield mapped rows."""
    from trainer.model.oneranker import OneRanker

    cfg = model.cfg
    items, users = bucket(max(cfg.num_items, min_items)), bucket(max(cfg.num_users, min_users))
    if (items, users) == (cfg.num_items, cfg.num_users):
        return model
    padded = OneRanker(cfg.replace(num_items=items, num_users=users))
    old = model.state_dict()
    new = padded.state_dict()
    for name, target in new.items():
        source = old[name]
        if source.shape == target.shape:
            target.copy_(source)
        elif source.shape[1:] == target.shape[1:] and source.shape[0] < target.shape[0]:
            target.zero_()
            target[: source.shape[0]].copy_(source)
        else:
            raise ValueError(f"cannot pad {name}: {tuple(source.shape)} → {tuple(target.shape)}")
    return padded.eval()


def signature(model, k: int, shortlist: int = 0) -> str:
    """What the traced graph depends on besides weight values."""
    shapes = {name: [list(t.shape), str(t.dtype)] for name, t in model.state_dict().items()}
    doc = {"config": model.cfg.to_dict(), "state": shapes, "k": k, "shortlist": shortlist}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def trace(model, k: int, shortlist: int = 0, valid_rows: int | None = None):
    """Export the serving graph (dynamic batch and history, examples ≥ 2 in every dynamic dim) to an
    un-optimised ONNX ModelProto whose initializers carry the state_dict names."""
    from trainer.infer import ServingGraph, dynamic_shapes, serving_inputs

    cfg = model.cfg
    args = serving_inputs(cfg, 2, cfg.max_len, torch.Generator().manual_seed(0))
    graph = ServingGraph(model.eval(), k, shortlist, valid_rows).eval()
    program = torch.onnx.export(graph, args, dynamo=True, dynamic_shapes=dynamic_shapes(cfg.max_len),
                                external_data=False, optimize=False)
    return program.model_proto


def serving_state(model, valid_rows: int | None = None) -> dict:
    """Every initializer of the serving graph by its ONNX name: the model's state and the
    ServingGraph's precomputed corpus table and bias (trainer.infer.corpus_table, corpus_bias)."""
    from trainer.infer import corpus_bias, corpus_table

    state = {f"model.{name}": t for name, t in model.state_dict().items()}
    state["corpus_t"] = corpus_table(model)
    state["corpus_bias"] = corpus_bias(model.cfg.num_items, valid_rows)
    return state


class GraphCache:
    """One template per process (the newest signature); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._signature: str | None = None
        self._template = None
        self.traces = 0
        self.reuses = 0

    def export(self, model, path: str, k: int, shortlist: int = 0, valid_rows: int | None = None) -> str:
        """Write the serving graph of ``model`` to ``path``; returns "traced" or "reused".
        ``valid_rows``: the id map's length (rows past it are never served; data, not shape)."""
        import onnx
        from onnx import numpy_helper

        sig = signature(model, k, shortlist)
        with self._lock:
            template = self._template if sig == self._signature else None
        if template is None:
            proto = trace(model, k, shortlist, valid_rows)
            with self._lock:
                self._signature, self._template = sig, proto
                self.traces += 1
            onnx.save_model(proto, path)
            return "traced"
        proto = onnx.ModelProto()
        proto.CopyFrom(template)
        state = serving_state(model, valid_rows)
        replaced = 0
        for init in proto.graph.initializer:
            tensor = state.get(init.name)
            if tensor is not None:
                init.CopyFrom(numpy_helper.from_array(tensor.detach().cpu().numpy(), init.name))
                replaced += 1
        if replaced != len(state):
            # Some weight is not a named initializer (an exporter change?): never guess, trace again.
            log.warning("graph template covers %d of %d weights; tracing again", replaced, len(state))
            with self._lock:
                self._signature = None
            return self.export(model, path, k, shortlist, valid_rows)
        onnx.save_model(proto, path)
        with self._lock:
            self.reuses += 1
        return "reused"


GRAPHS = GraphCache()
