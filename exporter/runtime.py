"""onnxruntime side of a snapshot: session creation and request encoding, shared by the exporter
(parity, quality gate) and the serving replicas, so both feed the model exactly the same way.

Encoding mirrors the trainer: ``trainer.data.history_arrays`` + ``collate_histories`` (left
padding to the model's max_len, times relative to the newest token), user/item ids through the
snapshot's own id maps (unknown → OOV), eligibility as ``candidates`` [B, C] (the request's
candidate ads as item rows, 0-padded; a row of zeros = every ad: no corpus-sized input), and the
items of the whole given history (the feature store keeps more tokens than max_len) as an index
list, ``seen_ids`` [B, H] (0-padded), for Step 3's seen-before flag. Older snapshots took
eligibility as a bool mask over the item table (``eligible``; the all-ads mask is built once per
snapshot and batch size) and, before that, the seen items as a dense mask (``seen``); they load.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from features.tokens import TokenSequence

log = logging.getLogger(__name__)

NEG_HALF = -1e9 / 2  # scores at or below this are "not a result" (trainer.infer.NEG masks)
INPUT_NAMES = ("user", "items", "actions", "times", "device", "candidates", "seen_ids")
# Older snapshots still load and run: a dense ``eligible`` mask with the seen items as an index list,
# as a dense ``seen`` mask, or (before that) no seen input at all.
ELIGIBLE_INPUT_NAMES = INPUT_NAMES[:5] + ("eligible", "seen_ids")
DENSE_SEEN_INPUT_NAMES = INPUT_NAMES[:5] + ("eligible", "seen")
LEGACY_INPUT_NAMES = INPUT_NAMES[:5] + ("eligible",)
ACCEPTED_INPUT_NAMES = (INPUT_NAMES, ELIGIBLE_INPUT_NAMES, DENSE_SEEN_INPUT_NAMES, LEGACY_INPUT_NAMES)


def make_session(path: str | Path | bytes, threads: int | None = None, want_cuda: bool = True):
    """An InferenceSession (from a file, or the model's bytes) with CUDA first when onnxruntime
    lists it. Returns (session, providers actually in use). Only ``session.get_providers()`` tells
    the truth (DESIGN §8 trap 4)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # the GPU wheel's missing-CUDA error: we report it below
    available = ort.get_available_providers()
    providers = (["CUDAExecutionProvider"] if want_cuda and "CUDAExecutionProvider" in available else []) \
        + ["CPUExecutionProvider"]
    so = ort.SessionOptions()
    # Deliberate settings: every graph optimisation (constant folding, MatMul/Transpose/GELU
    # fusions), one inter-op thread (the graph is a chain: parallel branches buy nothing and a
    # second pool competes for the same cores), intra-op threads as given (default: one per core).
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3  # the GPU wheel logs an error for missing CUDA libs; we report below
    sess = ort.InferenceSession(path if isinstance(path, bytes) else str(path), so, providers=providers)
    actual = sess.get_providers()
    if "CUDAExecutionProvider" in providers and "CUDAExecutionProvider" not in actual:
        log.warning("CUDAExecutionProvider is listed but not usable here; running on %s", actual)
    log.info("onnxruntime session %s: providers %s", "(bytes)" if isinstance(path, bytes) else Path(path).name,
             actual)
    return sess, actual


class OnnxRanker:
    """A verified snapshot directory loaded into an onnxruntime session."""

    def __init__(self, snap_dir: Path, manifest: dict | None = None, threads: int | None = None,
                 want_cuda: bool = True, model_bytes: bytes | None = None):
        """``model_bytes``: model.onnx already in memory (verified by SnapshotStore.read); the
        id maps are read from ``snap_dir``."""
        from trainer.data import IdMap

        snap_dir = Path(snap_dir)
        self.dir = snap_dir
        self.manifest = manifest or json.loads((snap_dir / "manifest.json").read_text())
        self.version = int(self.manifest.get("version", 0))
        model = self.manifest["model"]
        self.max_len = int(model["max_len"])
        self.num_items = int(model["num_items"])
        self.top_k = int(model["top_k"])
        self.items = IdMap.from_dict(json.loads((snap_dir / "items.json").read_text()))
        self.users = IdMap.from_dict(json.loads((snap_dir / "users.json").read_text()))
        self.session, self.providers = make_session(model_bytes if model_bytes is not None else snap_dir / "model.onnx",
                                                    threads, want_cuda)
        names = [i.name for i in self.session.get_inputs()]
        if tuple(names) not in ACCEPTED_INPUT_NAMES:
            raise ValueError(f"unexpected model inputs {names}")
        self.input_names = names
        self._all_ads: dict[int, np.ndarray] = {}  # the all-ads eligibility mask by batch size

    def default_mask(self, B: int) -> np.ndarray:
        """Eligibility = every mapped ad, as a mask (read-only, built once per batch size)."""
        mask = self._all_ads.get(B)
        if mask is None:
            mask = np.zeros((B, self.num_items), dtype=bool)
            mask[:, 2:min(self.num_items, len(self.items))] = True  # not padding / OOV / unmapped rows
            mask.flags.writeable = False
            if B <= 8:
                self._all_ads[B] = mask
        return mask

    def eligibility_mask(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The feeds' eligibility as a dense [B, num_items] mask, whichever form the graph takes
        (what torch's rank_topk takes: parity, tests). Candidates are kept only where serving can
        answer (``default_mask``): the padded rows of a bucketed table are zeros no id maps to, all
        scoring the same, and while trained items still score below that tie (the first
        checkpoints) torch and onnxruntime picked different subsets of it."""
        if "candidates" not in feeds:
            return feeds["eligible"]
        cand = feeds["candidates"]
        mask = self.default_mask(len(cand)).copy()
        for b, rows in enumerate(cand):
            rows = rows[rows > 0]
            if len(rows):
                keep = mask[b, rows]
                mask[b] = False
                mask[b, rows] = keep
        return mask

    def candidate_rows(self, ads: Sequence[str]) -> np.ndarray:
        """A request's candidate ad ids → their item rows, known and servable only, each once."""
        top = min(self.num_items, len(self.items))
        return np.asarray(list(dict.fromkeys(i for i in self.items.lookup(ads) if 2 <= i < top)), np.int64)

    # --- encoding ------------------------------------------------------------------------
    def encode(self, seqs: Sequence[TokenSequence | None], user_ids: Sequence[str],
               devices: Sequence[int] | None = None,
               eligible: Sequence[Sequence[str] | None] | None = None) -> dict[str, np.ndarray]:
        from trainer.batching import MS_PER_S
        from trainer.data import collate_histories, history_arrays

        B = len(user_ids)
        hist = [history_arrays(s if s is not None else TokenSequence(), self.items, self.max_len)
                for s in seqs]
        # Feast and the samples hold event times in ms; the model was trained on seconds (the
        # online trainer converts the same way): time gaps must be in the unit it learned
        items, actions, times = collate_histories(hist, self.max_len, time_unit_s=MS_PER_S)
        cand_rows = [None if c is None else self.candidate_rows(c) for c in (eligible or [None] * B)]
        if "candidates" in self.input_names:
            mask = np.zeros((B, max([1] + [len(r) for r in cand_rows if r is not None])), dtype=np.int64)
            for b, rows in enumerate(cand_rows):
                if rows is not None:
                    # none of them servable: the OOV row (never served) keeps the row restricted
                    rows = rows if len(rows) else np.ones(1, np.int64)
                    mask[b, :len(rows)] = rows
        elif all(r is None for r in cand_rows):
            mask = self.default_mask(B)
        else:
            mask = self.default_mask(B).copy()
            for b, rows in enumerate(cand_rows):
                if rows is not None:
                    mask[b] = False
                    mask[b, rows] = True
        seen_rows = []
        for s in seqs:
            idx = np.asarray(self.items.lookup(s.item_ids) if s is not None and len(s.item_ids) else [], np.int64)
            seen_rows.append(np.unique(idx[(idx > 1) & (idx < self.num_items)]))  # never padding / OOV
        if self.input_names[-1] == "seen":  # an older snapshot: the dense mask
            seen = np.zeros((B, self.num_items), dtype=bool)
            for b, idx in enumerate(seen_rows):
                seen[b, idx] = True
        else:
            seen = np.zeros((B, max([1] + [len(r) for r in seen_rows])), dtype=np.int64)  # 0-padded
            for b, idx in enumerate(seen_rows):
                seen[b, :len(idx)] = idx
        arrays = (np.asarray(self.users.lookup(user_ids), np.int64), items.numpy(), actions.numpy(),
                  times.numpy(), np.asarray(devices if devices is not None else [0] * B, np.int64), mask, seen)
        return dict(zip(self.input_names, arrays))

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        ids, scores = self.session.run(None, feeds)
        return ids, scores

    def rank(self, user_id: str, seq: TokenSequence | None, k: int, candidates: Sequence[str] | None = None,
             device: int = 0, timing: dict | None = None) -> list[tuple[str, float]]:
        """Top-k (ad id, score) for one request; fewer when fewer items are eligible. ``timing``,
        when given, receives the seconds spent encoding and in the session."""
        t0 = time.perf_counter()
        feeds = self.encode([seq], [user_id], [device], [candidates] if candidates is not None else None)
        t1 = time.perf_counter()
        ids, scores = self.run(feeds)
        if timing is not None:
            timing["encode"], timing["run"] = t1 - t0, time.perf_counter() - t1
        out = []
        for i, s in zip(ids[0][:k], scores[0][:k]):
            i = int(i)
            if s <= NEG_HALF:
                break
            key = self.items.keys[i] if i < len(self.items.keys) else None
            if key is not None:
                out.append((key, float(s)))
        return out

    def warm(self, rounds: int = 1, batches: Sequence[int] = (1,)) -> None:
        """Run the graph (batch 1: what a replica serves) so the first real request pays no
        first-run cost (buffer allocation, kernel selection)."""
        for _ in range(rounds):
            for b in batches:
                self.run(self.encode([None] * b, ["__warmup__"] * b))
