"""onnxruntime side of a snapshot: session creation and request encoding, shared by the exporter
(parity, quality gate) and the serving replicas, so both feed the model exactly the same way.

Encoding mirrors the trainer: ``trainer.data.history_arrays`` + ``collate_histories`` (left
padding to the model's max_len, times relative to the newest token), user/item ids through the
snapshot's own id maps (unknown → OOV), eligibility as a bool mask over the item table, and the
items of the whole given history (the feature store keeps more tokens than max_len) as a second
mask, ``seen``, for Step 3's seen-before flag.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from features.tokens import TokenSequence

log = logging.getLogger(__name__)

NEG_HALF = -1e9 / 2  # scores at or below this are "not a result" (trainer.infer.NEG masks)
INPUT_NAMES = ("user", "items", "actions", "times", "device", "eligible", "seen")
# Snapshots exported before the ``seen`` input still load and run: they get the first six.
LEGACY_INPUT_NAMES = INPUT_NAMES[:6]


def make_session(path: str | Path, threads: int | None = None, want_cuda: bool = True):
    """An InferenceSession with CUDA first when onnxruntime lists it. Returns (session, providers
    actually in use). Only ``session.get_providers()`` tells the truth (DESIGN §8 trap 4)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # the GPU wheel's missing-CUDA error: we report it below
    available = ort.get_available_providers()
    providers = (["CUDAExecutionProvider"] if want_cuda and "CUDAExecutionProvider" in available else []) \
        + ["CPUExecutionProvider"]
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3  # the GPU wheel logs an error for missing CUDA libs; we report below
    sess = ort.InferenceSession(str(path), so, providers=providers)
    actual = sess.get_providers()
    if "CUDAExecutionProvider" in providers and "CUDAExecutionProvider" not in actual:
        log.warning("CUDAExecutionProvider is listed but not usable here; running on %s", actual)
    log.info("onnxruntime session %s: providers %s", Path(path).name, actual)
    return sess, actual


class OnnxRanker:
    """A verified snapshot directory loaded into an onnxruntime session."""

    def __init__(self, snap_dir: Path, manifest: dict | None = None, threads: int | None = None,
                 want_cuda: bool = True):
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
        self.session, self.providers = make_session(snap_dir / "model.onnx", threads, want_cuda)
        names = [i.name for i in self.session.get_inputs()]
        if tuple(names) not in (INPUT_NAMES, LEGACY_INPUT_NAMES):
            raise ValueError(f"unexpected model inputs {names}")
        self.input_names = names

    # --- encoding ------------------------------------------------------------------------
    def encode(self, seqs: Sequence[TokenSequence | None], user_ids: Sequence[str],
               devices: Sequence[int] | None = None,
               eligible: Sequence[Sequence[str] | None] | None = None) -> dict[str, np.ndarray]:
        from trainer.data import collate_histories, history_arrays

        B = len(user_ids)
        hist = [history_arrays(s if s is not None else TokenSequence(), self.items, self.max_len)
                for s in seqs]
        items, actions, times = collate_histories(hist, self.max_len)
        mask = np.ones((B, self.num_items), dtype=bool)
        mask[:, :2] = False  # padding / OOV
        mask[:, len(self.items):] = False  # table rows no ad id maps to (yet)
        for b, cands in enumerate(eligible or [None] * B):
            if cands is not None:
                mask[b] = False
                idx = [i for i in self.items.lookup(cands) if 2 <= i < min(self.num_items, len(self.items))]
                mask[b, idx] = True
        seen = np.zeros((B, self.num_items), dtype=bool)
        for b, s in enumerate(seqs):
            if s is not None and len(s.item_ids):
                idx = np.asarray(self.items.lookup(s.item_ids), np.int64)
                seen[b, idx[idx < self.num_items]] = True
        seen[:, :2] = False  # padding / OOV are never "seen"
        arrays = (np.asarray(self.users.lookup(user_ids), np.int64), items.numpy(), actions.numpy(),
                  times.numpy(), np.asarray(devices if devices is not None else [0] * B, np.int64), mask, seen)
        return dict(zip(self.input_names, arrays))

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        ids, scores = self.session.run(None, feeds)
        return ids, scores

    def rank(self, user_id: str, seq: TokenSequence | None, k: int, candidates: Sequence[str] | None = None,
             device: int = 0) -> list[tuple[str, float]]:
        """Top-k (ad id, score) for one request; fewer when fewer items are eligible."""
        feeds = self.encode([seq], [user_id], [device], [candidates] if candidates is not None else None)
        ids, scores = self.run(feeds)
        out = []
        for i, s in zip(ids[0][:k], scores[0][:k]):
            i = int(i)
            if s <= NEG_HALF:
                break
            key = self.items.keys[i] if i < len(self.items.keys) else None
            if key is not None:
                out.append((key, float(s)))
        return out

    def warm(self, rounds: int = 2) -> None:
        """Run the graph at batch 1 and 2 so the first real request pays no first-run cost."""
        for _ in range(rounds):
            for b in (1, 2):
                self.run(self.encode([None] * b, ["__warmup__"] * b))
