"""Crash test of the incremental trainer against the real embedded broker: SIGKILL the trainer three
times during a replay of samples (with duplicate deliveries) and restart it; the durable model must
have learned every produced sample exactly once (learned-log in test mode)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from oneranker.kafka import ensure_topics
from streaming.replay.adlayer import load_requests
from trainer.learned_log import read_learned
from trainer.replay_samples import publish_samples, samples_from_requests

N_SAMPLES = 480


def _start(bootstrap: str, topic: str, group: str, tmp: Path, n: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "oneranker.cli", "train", "--bootstrap-servers", bootstrap,
           "--samples-topic", topic, "--group-id", group, "--checkpoint-dir", str(tmp / "ckpt"),
           "--learned-log", str(tmp / "learned.tsv"), "--preset", "small", "--batch-size", "16", "--max-batch-size", "32",
           "--max-wait-ms", "200", "--checkpoint-every-steps", "2", "--checkpoint-every-s", "1",
           "--metrics-port", "-1", "--metrics-every-s", "2", "--exit-when-idle-s", "6", "--threads", "1",
           "--min-capacity", "64"]
    env = dict(os.environ, ONERANKER_HOME=str(tmp / "home"), PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, env=env, stdout=open(tmp / f"run{n}.log", "wb"), stderr=subprocess.STDOUT)


def _learned(tmp: Path) -> list[str]:
    return [i for _, i in read_learned(tmp / "learned.tsv")]


def test_sigkill_three_times_learns_every_sample_once(broker, unique, tmp_path):
    topic, group = f"test.samples.{unique}", f"test-trainer-{unique}"
    ensure_topics(broker, [topic], partitions=4)
    requests, _ = load_requests("synthetic", seed=1, limit=N_SAMPLES)
    samples = samples_from_requests(requests)
    produced = {s.sample_id for s in samples}
    assert len(produced) == N_SAMPLES

    def replay():  # a paced replay in chunks; every 7th sample delivered twice (at-least-once)
        for i in range(0, N_SAMPLES, 60):
            publish_samples(samples[i:i + 60], broker, topic, duplicate_every=7)
            time.sleep(0.7)

    producer = threading.Thread(target=replay, daemon=True)
    producer.start()
    kills = 0
    for run in range(3):
        target = (run + 1) * N_SAMPLES // 5  # kill at ~20%, 40%, 60% of the stream, mid-batch
        proc = _start(broker, topic, group, tmp_path, run)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(_learned(tmp_path)) < target and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / f"run{run}.log").read_text()[-3000:]
        assert len(_learned(tmp_path)) >= target, "no progress before the deadline"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        kills += 1
    producer.join(timeout=60)
    proc = _start(broker, topic, group, tmp_path, 3)
    try:
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "run3.log").read_text()
    assert rc == 0, log[-3000:]
    learned = _learned(tmp_path)
    assert kills == 3
    assert len(learned) == len(set(learned)), "a sample was learned twice"
    assert set(learned) == produced, (len(set(learned)), len(produced))
    assert log.count("resumed from") == 1 and all(
        "resumed from" in (tmp_path / f"run{r}.log").read_text() for r in (1, 2, 3))
    # the group's committed offsets are the final checkpoint's (committed only after it was written)
    from kafka import KafkaConsumer, TopicPartition

    from trainer.checkpoint import latest

    ck = latest(tmp_path / "ckpt")
    c = KafkaConsumer(bootstrap_servers=broker, group_id=group, enable_auto_commit=False,
                      session_timeout_ms=6000)
    try:
        committed = {f"{topic}:{p}": c.committed(TopicPartition(topic, p)) for p in range(4)}
    finally:
        c.close()
    assert {k: v for k, v in committed.items() if v is not None} == ck.offsets


def test_keepup_tool_measures_lag_against_a_real_trainer(broker, tmp_path):
    """`oneranker bench keepup` end to end on a short replay: a trainer process learns every
    published sample and the lag series ends at zero."""
    from trainer.keepup import keepup

    out = tmp_path / "keepup.json"
    res = keepup(limit=600, threads=(1,), bootstrap=broker, out=str(out), metrics_every_s=0.5,
                 drain_timeout_s=90, show=False)
    (run,) = res["runs"]
    assert run["drained"] and run["learned"] == run["samples"] == 600
    assert run["series"] and run["series"][-1]["lag"] == 0
    assert all(r["lag"] >= 0 for r in run["series"]) and run["samples_per_trainer_cpu_s"] > 0
    assert out.exists()
