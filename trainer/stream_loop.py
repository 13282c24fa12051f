"""The Kafka loop of the online trainer (``oneranker train``): ``oneranker.samples`` → a
continuously updated OneRanker (trainer/learner.py), prequential metrics (trainer/prequential.py)
as JSON lines and Prometheus gauges, checkpoints and committed offsets.

``StreamTrainer``: kafka-python consumer group (enable_auto_commit=False, session_timeout_ms=6000),
dedupe by sample_id, micro-batches by size or time (bigger under a backlog), checkpoints every N
steps or T seconds, offsets committed to Kafka only after the checkpoint that holds them is
written; on start it resumes from the newest valid checkpoint and seeks to ITS offsets.

Exactly-once learning: a checkpoint holds the model, the offsets of every record learned (or skipped
as a duplicate) and the recent sample ids; after a crash the model and offsets roll back together,
so the samples learned after the last checkpoint are learned again (once) into the restored model.
The learned-log (test mode, trainer/learned_log.py) lists exactly the samples the durable model has
learned.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from oneranker import config
from streaming.samples import Sample
from trainer import checkpoint as ckpt_mod
from trainer.learned_log import append_learned, reconcile_learned
from trainer.learner import FORMAT, OnlineLearner
from trainer.model.config import preset as make_preset
from trainer.prequential import Prequential

log = logging.getLogger(__name__)


@dataclass
class TrainerOptions:
    bootstrap: str
    topic: str = config.TOPIC_SAMPLES
    group_id: str = "oneranker-trainer"
    checkpoint_dir: Path = Path(".oneranker/checkpoints")
    preset: str = "small"
    device: str = "auto"
    batch_size: int = 64
    max_batch_size: int | None = 256  # with a backlog, batches grow up to this
    max_wait_ms: int = 500
    checkpoint_every_steps: int = 200
    checkpoint_every_s: float = 60.0
    keep: int = 3
    metrics_port: int = config.DEFAULT_TRAINER_METRICS_PORT
    metrics_jsonl: Path | None = None
    metrics_every_s: float = 10.0
    windows: tuple[int, ...] = (1000, 10000)
    learned_log: Path | None = None
    max_samples: int | None = None
    exit_when_idle_s: float | None = None
    min_capacity: int = 1024
    max_users: int | None = None
    centroid_every: int = 1  # damped (trainer/learner.py refresh_centroids)
    threads: int | None = 1  # measured: 2 threads on the shared 2-core box ran 12x slower than 1
    seed: int = 0
    overrides: dict = field(default_factory=dict)


class _Metrics:
    """Prometheus gauges/counters (prometheus_client), on a private registry."""

    def __init__(self, port: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        self.registry = CollectorRegistry()
        r = self.registry
        self.samples = Counter("oneranker_trainer_samples", "Samples learned", registry=r)
        self.dupes = Counter("oneranker_trainer_duplicates", "Samples skipped as duplicates", registry=r)
        self.bad = Counter("oneranker_trainer_invalid", "Records that are not valid samples", registry=r)
        self.steps = Counter("oneranker_trainer_steps", "Optimizer steps", registry=r)
        self.ckpts = Counter("oneranker_trainer_checkpoints", "Checkpoints written", registry=r)
        self.window = Gauge("oneranker_trainer_prequential", "Test-then-train metric over a sliding window",
                            ["metric", "window"], registry=r)
        self.loss = Gauge("oneranker_trainer_loss", "Last batch loss part", ["part"], registry=r)
        self.rate = Gauge("oneranker_trainer_samples_per_second", "Learning throughput", registry=r)
        self.items = Gauge("oneranker_trainer_vocab", "Ids in the growing maps", ["kind"], registry=r)
        self.through = Gauge("oneranker_trainer_trained_through_ts", "Newest event time learned (ms)", registry=r)
        self.port = None
        if port is not None and port >= 0:
            server, _ = start_http_server(port, addr=config.settings().bind_host, registry=r)
            self.port = server.server_port


def c_crc32c_available() -> bool:
    """Whether kafka-python can check record CRCs in C (the optional ``crc32c`` package). Without
    it kafka-python falls back to pure Python: 300 µs of CPU per 3.3 KB sample (measured, vs 16 µs
    without the check) — half of what the trainer can spend per sample at the replay's rate. Then
    the trainer skips the check, as librdkafka does by default (check.crcs=false): TCP checksums the
    hop, the broker checked the batch on produce, and most damage fails JSON decoding (counted as
    invalid). The project now depends on ``crc32c`` (≈ 12 µs per sample with the check); this
    fallback is for environments without it."""
    import importlib.util

    return importlib.util.find_spec("crc32c") is not None


class StreamTrainer:
    def __init__(self, opts: TrainerOptions):
        self.o = opts
        self.stop = False
        self.buffer: collections.deque = collections.deque()  # (partition, offset, raw value)
        self.offsets: dict[str, int] = {}  # "topic:partition" → next offset (learned or skipped)
        self.last_ckpt_step = -1
        self.last_ckpt_time = time.monotonic()
        self.last_record = time.monotonic()
        self.assigned_at: float | None = None
        self.consumer = None
        self.batch_sizes: list[int] = []  # since the last metrics line
        self.progress: list = []  # [wall time, offsets] per step since the last checkpoint
        # seconds spent per part of the loop (the learner's own phases are in OnlineLearner.timing)
        self.loop_time = dict.fromkeys(("poll_s", "decode_s", "metrics_s", "checkpoint_s"), 0.0)

    # -- setup -----------------------------------------------------------------------------
    def _learner(self) -> OnlineLearner:
        kw = dict(min_capacity=self.o.min_capacity, max_users=self.o.max_users, centroid_every=self.o.centroid_every)
        ck = ckpt_mod.latest(self.o.checkpoint_dir)
        if self.o.learned_log is not None:
            reconcile_learned(self.o.learned_log, ck)
        if ck is not None and (ck.extra or {}).get("format") == FORMAT:
            lr = OnlineLearner.from_checkpoint(ck, self.o.device, **kw)
            self.offsets = dict(ck.offsets)
            self.last_ckpt_step = ck.step
            log.info("resumed from %s: step %d, %d samples learned, offsets %s", ck.path, ck.step,
                     lr.samples_learned, ck.offsets)
            return lr
        # online: no dropout (single pass; train-mode outputs are the prequential predictions)
        cfg = make_preset(self.o.preset, **({"dropout": 0.0} | self.o.overrides))
        log.info("no checkpoint in %s: starting a fresh %s model", self.o.checkpoint_dir, self.o.preset)
        return OnlineLearner(cfg, self.o.device, seed=self.o.seed, **kw)

    def _consumer(self):
        from kafka import ConsumerRebalanceListener, KafkaConsumer

        trainer = self

        class Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked):
                gone = {tp.partition for tp in revoked}
                trainer.buffer = collections.deque(r for r in trainer.buffer if r[0] not in gone)

            def on_partitions_assigned(self, assigned):
                # The checkpoint (or what was learned since), never the group's committed offsets.
                for tp in assigned:
                    off = trainer.offsets.get(f"{tp.topic}:{tp.partition}")
                    if off is None:
                        trainer.consumer.seek_to_beginning(tp)
                    else:
                        trainer.consumer.seek(tp, off)
                trainer.buffer = collections.deque(r for r in trainer.buffer
                                                   if r[0] not in {tp.partition for tp in assigned})
                trainer.assigned_at = time.monotonic()
                log.info("assigned %s", sorted(tp.partition for tp in assigned))

        c = KafkaConsumer(
            bootstrap_servers=self.o.bootstrap, group_id=self.o.group_id, client_id="oneranker-trainer",
            enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=config.SESSION_TIMEOUT_MS, heartbeat_interval_ms=config.HEARTBEAT_INTERVAL_MS,
            max_poll_interval_ms=120_000, max_poll_records=max(500, 4 * self.o.batch_size),
            fetch_max_wait_ms=100, check_crcs=c_crc32c_available())
        self.consumer = c
        c.subscribe([self.o.topic], listener=Listener())
        return c

    # -- checkpoint + commit -----------------------------------------------------------------
    def checkpoint(self, lr: OnlineLearner, metrics: dict) -> None:
        if lr.step_no == self.last_ckpt_step and not lr.learned_since_ckpt:
            return
        t0 = time.perf_counter()
        ck = lr.to_checkpoint(self.offsets, metrics)
        ck.progress, self.progress = self.progress, []
        ckpt_mod.save(self.o.checkpoint_dir, ck, keep=self.o.keep)
        if self.o.learned_log is not None:
            append_learned(self.o.learned_log, ck.step, lr.learned_since_ckpt)
        lr.learned_since_ckpt = []
        self.last_ckpt_step, self.last_ckpt_time = lr.step_no, time.monotonic()
        self.prom.ckpts.inc()
        # Only now that the checkpoint holds them do the offsets go to Kafka.
        self._commit(ck.offsets)
        self.loop_time["checkpoint_s"] += time.perf_counter() - t0

    def _commit(self, offsets: dict[str, int]) -> None:
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        if self.consumer is None or not offsets:
            return
        mine = {tp.partition for tp in self.consumer.assignment()}
        req = {}
        for key, off in offsets.items():
            topic, p = key.rsplit(":", 1)
            if topic == self.o.topic and int(p) in mine:
                req[TopicPartition(topic, int(p))] = OffsetAndMetadata(off, "", -1)
        if not req:
            return
        try:
            self.consumer.commit(req)
        except Exception as exc:  # noqa: BLE001 - a failed commit is harmless: the checkpoint rules
            log.warning("offset commit failed (the checkpoint still holds them): %s", exc)

    # -- main loop ---------------------------------------------------------------------------
    def _take_batch(self, lr: OnlineLearner, n: int):
        samples, consumed, ids = [], [], set()
        while self.buffer and len(samples) < n:
            part, off, raw = self.buffer.popleft()
            consumed.append((part, off))
            try:
                s = Sample.from_json(raw)
            except Exception:  # noqa: BLE001
                self.prom.bad.inc()
                continue
            if lr.seen(s.sample_id) or s.sample_id in ids:
                self.prom.dupes.inc()
                continue
            ids.add(s.sample_id)
            samples.append(s)
        return samples, consumed

    def _advance(self, consumed) -> None:
        for part, off in consumed:
            key = f"{self.o.topic}:{part}"
            self.offsets[key] = max(self.offsets.get(key, 0), off + 1)

    def run(self) -> dict:
        if self.o.threads:
            torch.set_num_threads(self.o.threads)
        self.prom = _Metrics(self.o.metrics_port)
        lr = self._learner()
        pq = Prequential(self.o.windows)
        if self.last_ckpt_step < 0:
            # A fresh start writes its initial state at once: the exporter warms its graph on it
            # (never publishing it), so its first trace overlaps the first batches (exporter/export.py).
            self.checkpoint(lr, {})
        consumer = self._consumer()
        jsonl = open(self.o.metrics_jsonl, "a") if self.o.metrics_jsonl else None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: setattr(self, "stop", True))
        first_wait = None
        last_metrics = time.monotonic()
        t_start, n_start = time.monotonic(), lr.samples_learned
        parts: dict = {}
        summary: dict = {}
        learned_here = 0
        log.info("trainer on %s topic=%s group=%s device=%s metrics port=%s", self.o.bootstrap, self.o.topic,
                 self.o.group_id, lr.dev, self.prom.port)
        try:
            while not self.stop:
                max_batch = max(self.o.batch_size, self.o.max_batch_size or self.o.batch_size)
                t0 = time.perf_counter()
                recs = consumer.poll(timeout_ms=50 if self.buffer else 200,
                                     max_records=max(max_batch - len(self.buffer), 1))
                while recs:
                    for tp, rs in recs.items():
                        for r in rs:
                            self.buffer.append((tp.partition, r.offset, r.value))
                    self.last_record = time.monotonic()
                    # top up from what the fetcher already holds (no waiting): with a backlog one
                    # poll returns one fetch's worth, and full-size batches learn more samples/s
                    recs = (consumer.poll(timeout_ms=0, max_records=max_batch - len(self.buffer))
                            if len(self.buffer) < max_batch else None)
                now = time.monotonic()
                self.loop_time["poll_s"] += time.perf_counter() - t0
                if self.buffer and first_wait is None:
                    first_wait = now
                full = len(self.buffer) >= self.o.batch_size
                waited = first_wait is not None and (now - first_wait) * 1000 >= self.o.max_wait_ms
                if self.o.max_samples is not None:
                    left = self.o.max_samples - learned_here
                    full = full or (0 < left <= len(self.buffer))
                if self.buffer and (full or waited):
                    # behind the stream (a backlog): bigger batches, more samples/s on CPU
                    n = min(max(self.o.batch_size, len(self.buffer)), max_batch)
                    if self.o.max_samples is not None:
                        n = min(n, self.o.max_samples - learned_here)
                    t0 = time.perf_counter()
                    samples, consumed = self._take_batch(lr, n)
                    self.loop_time["decode_s"] += time.perf_counter() - t0
                    first_wait = now if self.buffer else None
                    if samples:
                        if learned_here == 0:  # rate from the first batch (not the group join)
                            t_start = time.monotonic()
                        preds, parts = lr.step(samples)
                        t0 = time.perf_counter()
                        pq.add(preds)
                        learned_here += len(samples)
                        self.batch_sizes.append(len(samples))
                        self.prom.samples.inc(len(samples))
                        self.prom.steps.inc()
                        for k, v in parts.items():
                            self.prom.loss.labels(k).set(v)
                        self.loop_time["metrics_s"] += time.perf_counter() - t0
                    self._advance(consumed)
                    if samples:
                        self.progress.append([round(time.time(), 3), dict(self.offsets)])
                now = time.monotonic()
                if now - last_metrics >= self.o.metrics_every_s and pq.total:
                    t0 = time.perf_counter()
                    summary = self._emit(lr, pq, parts, jsonl, learned_here / max(now - t_start, 1e-9))
                    self.loop_time["metrics_s"] += time.perf_counter() - t0
                    last_metrics = now
                due_steps = self.o.checkpoint_every_steps and lr.step_no - max(self.last_ckpt_step, 0) >= self.o.checkpoint_every_steps
                due_time = self.o.checkpoint_every_s and now - self.last_ckpt_time >= self.o.checkpoint_every_s
                if lr.learned_since_ckpt and (due_steps or due_time or ckpt_mod.take_checkpoint_request(
                        self.o.checkpoint_dir)):
                    self.checkpoint(lr, summary)
                if self.o.max_samples is not None and learned_here >= self.o.max_samples:
                    break
                if self.o.exit_when_idle_s is not None and not self.buffer and self.assigned_at is not None:
                    if now - max(self.last_record, self.assigned_at) >= self.o.exit_when_idle_s:
                        log.info("idle for %.1fs: exiting", self.o.exit_when_idle_s)
                        break
            rate = (lr.samples_learned - n_start) / max(time.monotonic() - t_start, 1e-9)
            summary = self._emit(lr, pq, parts, jsonl, rate) if pq.total else summary
            self.checkpoint(lr, summary)
        finally:
            consumer.close(autocommit=False)
            if jsonl:
                jsonl.close()
        return {"samples_learned": lr.samples_learned, "learned_this_run": learned_here, "step": lr.step_no,
                "offsets": self.offsets, "metrics": summary, "samples_per_s": round(rate, 1),
                "items": len(lr.vocab.items) - 2, "users": len(lr.vocab.users) - 2}

    def _emit(self, lr: OnlineLearner, pq: Prequential, parts: dict, jsonl, rate: float) -> dict:
        s = pq.summary()
        sizes, self.batch_sizes = self.batch_sizes, []
        rec = {"ts": time.time(), "step": lr.step_no, "samples_learned": lr.samples_learned,
               "mean_batch": round(sum(sizes) / len(sizes), 1) if sizes else None,  # grows under a backlog
               "trained_through_ts": lr.trained_through_ts, "samples_per_s": round(rate, 1), "loss": parts,
               "windows": s, "items": len(lr.vocab.items) - 2, "users": len(lr.vocab.users) - 2,
               "grow_events": lr.grow_events,
               "time_s": {k: round(v, 3) for k, v in (lr.timing | self.loop_time).items()}}
        for w, m in s.items():
            for k, v in m.items():
                if isinstance(v, float) and not math.isnan(v):
                    self.prom.window.labels(k, w).set(v)
        self.prom.rate.set(rate)
        self.prom.items.labels("items").set(len(lr.vocab.items) - 2)
        self.prom.items.labels("users").set(len(lr.vocab.users) - 2)
        self.prom.through.set(lr.trained_through_ts)
        if jsonl:
            jsonl.write(json.dumps(rec, default=float) + "\n")
            jsonl.flush()
        log.info("step %d learned %d (%.0f/s) %s", lr.step_no, lr.samples_learned, rate,
                 " ".join(f"{k}={v:.4f}" for k, v in s[f"w{self.o.windows[0]}"].items()
                          if isinstance(v, float)))
        return rec


def run_trainer(opts: TrainerOptions) -> dict:
    return StreamTrainer(opts).run()
