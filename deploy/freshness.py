"""Freshness of the whole pipeline, and where it goes.

Freshness of an event = from the moment it was produced to the first moment a replica serves a
snapshot whose trained-through offsets cover that event's sample (its offset on oneranker.samples).
``oneranker up`` follows every N-th request and splits that time into stages, each from the end of
the previous one to the first moment the stage covers the request's sample:

* ``window``     produced → sample emitted (the attribution window closing in event time, the
                 watermark's lateness, the stream worker); the sample record's broker timestamp
* ``learn``      → learned by the trainer (the ``progress`` of the checkpoint manifests: wall time
                 and offsets after each optimizer step)
* ``checkpoint`` → a checkpoint covering it written (the manifest's ``created``)
* ``export``     → the export of a checkpoint covering it started (waiting for the exporter to
                 finish the one before; the snapshot manifest's ``created``)
* ``validate``   → that snapshot published (ONNX export, checker, parity, quality gate, upload;
                 the manifest's ``published``)
* ``swap``       → a replica serving such a snapshot (announcement, download, verify, warm, swap;
                 the replica's own swap time from ``/readyz``, which ``oneranker up`` polls)
"""

from __future__ import annotations

import statistics
import threading
from dataclasses import dataclass, field

from oneranker import config

STAGES = ("window", "learn", "checkpoint", "export", "validate", "swap")


def sample_offsets(offsets: dict[str, int] | None, topic: str = config.TOPIC_SAMPLES) -> dict[int, int]:
    """{"topic:partition": next offset} (checkpoint and snapshot manifests) → {partition: next offset}
    of the samples topic."""
    out = {}
    for key, off in (offsets or {}).items():
        name, _, part = key.rpartition(":")
        if name == topic:
            out[int(part)] = int(off)
    return out


def quantiles(values: list[float]) -> dict:
    s = sorted(values)
    q = (lambda p: round(s[min(len(s) - 1, int(p * len(s)))], 2)) if s else (lambda p: None)
    return {"n": len(s), "p50_s": q(0.5), "p95_s": q(0.95),
            "mean_s": round(statistics.fmean(s), 2) if s else None}


@dataclass
class Freshness:
    """Follows sampled requests from production to being served."""

    produced: dict[str, float] = field(default_factory=dict)  # request_id → wall time produced
    sample_at: dict[str, tuple[int, int]] = field(default_factory=dict)  # request_id → (partition, offset)
    sample_time: dict[str, float] = field(default_factory=dict)  # request_id → wall time emitted
    served: dict[str, float] = field(default_factory=dict)  # request_id → wall time first served
    learned: list[tuple[float, dict[int, int]]] = field(default_factory=list)  # (time, offsets) per step
    checkpoints: list[tuple[float, dict[int, int]]] = field(default_factory=list)  # (created, offsets)
    snapshots: list[tuple[float, float, dict[int, int]]] = field(default_factory=list)  # (created, published, offsets)
    lock: threading.Lock = field(default_factory=threading.Lock)
    histogram: object | None = None  # prometheus_client Histogram, observed as requests get served

    def on_version(self, now: float, offsets: dict[int, int]) -> None:
        """A replica now serves a snapshot trained through ``offsets`` (partition → next offset)."""
        with self.lock:
            for rid, (part, off) in self.sample_at.items():
                if rid not in self.served and off < offsets.get(part, 0):
                    self.served[rid] = now
                    if self.histogram is not None and rid in self.produced:
                        self.histogram.observe(now - self.produced[rid])

    def on_checkpoint(self, manifest: dict) -> None:
        """A checkpoint manifest (trainer/checkpoint.py): its creation and its steps' progress."""
        with self.lock:
            self.checkpoints.append((float(manifest["created"]), sample_offsets(manifest.get("offsets"))))
            for t, offsets in manifest.get("progress") or []:
                self.learned.append((float(t), sample_offsets(offsets)))

    def on_snapshot(self, manifest: dict) -> None:
        """A published snapshot's manifest (exporter/export.py)."""
        offsets = (manifest.get("trained_through") or {}).get("offsets")
        created = float(manifest["created"])
        with self.lock:
            self.snapshots.append((created, float(manifest.get("published", created)), sample_offsets(offsets)))

    def seconds(self) -> list[float]:
        with self.lock:
            return sorted(self.served[r] - self.produced[r] for r in self.served if r in self.produced)

    @staticmethod
    def _first(events: list[tuple[float, dict[int, int]]], part: int, off: int) -> float | None:
        times = [t for t, offsets in events if off < offsets.get(part, 0)]
        return min(times) if times else None

    def stages(self) -> dict[str, dict]:
        """Per stage, quantiles over the served followed requests whose every stage was observed
        (a checkpoint deleted by retention before it was read leaves a request out)."""
        per: dict[str, list[float]] = {s: [] for s in STAGES}
        with self.lock:
            for rid, served in self.served.items():
                part, off = self.sample_at[rid]
                snaps = [(c, p) for c, p, offsets in self.snapshots if off < offsets.get(part, 0)]
                first = min(snaps, key=lambda cp: cp[1]) if snaps else (None, None)
                marks = [self.produced.get(rid), self.sample_time.get(rid),
                         self._first(self.learned, part, off), self._first(self.checkpoints, part, off),
                         first[0], first[1], served]
                if any(m is None for m in marks):
                    continue
                for stage, a, b in zip(STAGES, marks, marks[1:]):
                    per[stage].append(max(0.0, b - a))
        return {s: quantiles(v) for s, v in per.items()}

    def summary(self) -> dict:
        s = self.seconds()
        q = quantiles(s)
        return {"followed": len(self.produced), "served": len(s), "p50_s": q["p50_s"], "p95_s": q["p95_s"],
                "mean_s": q["mean_s"], "stages": self.stages()}
