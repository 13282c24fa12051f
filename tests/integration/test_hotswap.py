"""Two real replicas (subprocesses, HTTP on 127.0.0.1, Feast online store, Kafka announcements)
under steady load while snapshots are published, refused (quality gate, checksum) and rolled back:
no non-2xx response, every response names a published version, no replica goes backwards except
by an explicit rollback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("feast")

from deploy.bench import _free_port  # noqa: E402
from exporter.export import KafkaAnnouncer, export_checkpoint, publish, stage  # noqa: E402
from exporter.runtime import OnnxRanker  # noqa: E402
from exporter.store import SnapshotStore  # noqa: E402
from exporter.synthetic import labelled_samples, make_checkpoint, make_model, make_users  # noqa: E402
from oneranker import config  # noqa: E402

TOKEN = "test-admin-token"
MIN_LOAD_S = 30.0
MAX_LOAD_S = 240.0
MAX_REQUESTS = 50_000


def wait_for(pred, timeout_s: float, what: str, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
            if last:
                return last
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what} (last: {last!r})")


def version_of(url: str) -> int | None:
    r = httpx.get(f"{url}/readyz", timeout=5)
    return r.json().get("model_version") if r.status_code == 200 else None


def metric(url: str, name: str, **labels) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


class Load:
    """One sequential client thread per replica (so per-replica order is unambiguous)."""

    def __init__(self, urls: list[str], users: list[str]):
        self.urls, self.users = urls, users
        self.phase = 0  # even = stable; odd = an explicit rollback in progress
        self.records: list[tuple] = []  # (replica, phase_sent, phase_done, status, version, cold, user)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(len(urls))]
        self.lock = threading.Lock()

    def _run(self, i: int) -> None:
        n = 0
        deadline = time.monotonic() + MAX_LOAD_S
        with httpx.Client(base_url=self.urls[i], timeout=30) as c:
            while not self.stop.is_set() and n < MAX_REQUESTS and time.monotonic() < deadline:
                user = self.users[n % len(self.users)]
                sent = self.phase
                try:
                    r = c.post("/v1/rank", json={"user_id": user, "k": 5})
                    doc = r.json() if r.status_code == 200 else {}
                    rec = (i, sent, self.phase, r.status_code, doc.get("model_version"), doc.get("cold_start"), user)
                except httpx.HTTPError as exc:
                    rec = (i, sent, self.phase, repr(exc), None, None, user)
                with self.lock:
                    self.records.append(rec)
                n += 1

    def start(self):
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


@pytest.fixture
def feast_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("ONERANKER_HOME", str(home))
    monkeypatch.delenv("ONERANKER_FEAST_ONLINE", raising=False)
    from features.store import apply

    apply(home=home)
    return home


def test_hot_swap_under_load(tmp_path, feast_home, broker):
    from typer.testing import CliRunner

    from features.store import FeatureStoreClient, UserRow, open_store
    from oneranker.cli import app
    from oneranker.kafka import ensure_topics

    ensure_topics(broker, [config.TOPIC_SNAPSHOTS])
    announce = KafkaAnnouncer(broker)
    store = SnapshotStore(str(tmp_path / "store"))
    N_ITEMS, N_USERS = 200, 40
    base = make_model("tiny", num_items=N_ITEMS, num_users=N_USERS, seed=0)
    users = make_users(N_USERS, N_ITEMS, base.cfg.max_len, 30, seed=1)
    FeatureStoreClient(open_store()).push_users([UserRow(u, s, {}) for u, s in users.items()])

    # v1 (no snapshot serving yet: no gate to pass), then a holdout labelled by v1's own ranking
    assert export_checkpoint(make_checkpoint(base, 1), store).version == 1
    v1 = OnnxRanker(tmp_path / "v1", store.fetch(1, tmp_path / "v1"), threads=1, want_cuda=False)
    holdout = labelled_samples(v1, users)
    # checkpoints 2-4: the same model with tiny weight noise (passes the gate); exported and verified
    # now, published under load below
    staged = [stage(make_checkpoint(base, s, holdout, noise=1e-7, seed=s), store, threads=1) for s in (2, 3, 4)]
    assert [s.result.status for s in staged] == ["staged"] * 3, [s.result.report for s in staged]

    procs, urls = [], []
    env = {**os.environ, "ONERANKER_ADMIN_TOKEN": TOKEN, "ONERANKER_KAFKA": broker}
    for rid, poll in (("r0", "1"), ("r1", "5")):
        port = _free_port()
        log = open(tmp_path / f"{rid}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "oneranker.cli", "serve", "--replica-id", rid, "--store", store.url,
             "--port", str(port), "--host", "127.0.0.1", "--poll-s", poll, "--threads", "1",
             "--cache-dir", str(tmp_path / f"cache-{rid}"), "--no-cuda"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2]))
        urls.append(f"http://127.0.0.1:{port}")
    load = Load(urls, list(users)[:20] + ["cold-user-1", "cold-user-2"])
    try:
        for u in urls:
            wait_for(lambda u=u: version_of(u) == 1, 120, f"{u} ready on v1")
        t0 = time.monotonic()
        load.start()

        def all_at(v, timeout=60):
            for u in urls:
                wait_for(lambda u=u: version_of(u) == v, timeout, f"{u} serving v{v}")

        published = {1}
        for s in staged[:2]:  # v2, v3
            res = publish(s, store, announce=announce)
            published.add(res.version)
            all_at(res.version)
        assert published == {1, 2, 3}

        # a checkpoint that fails the quality gate (an unrelated model) is refused, not published
        bad = make_model("tiny", num_items=N_ITEMS, num_users=N_USERS, seed=99)
        res = export_checkpoint(make_checkpoint(bad, 10, holdout), store, announce=announce, threads=1)
        assert res.status == "gate_failed" and res.version is None, res.report
        assert store.versions() == [1, 2, 3] and store.current()["version"] == 3

        # a snapshot whose file does not match its checksum is refused by every replica
        m3 = store.fetch(3, tmp_path / "copy3")
        (tmp_path / "copy3" / "manifest.json").unlink()
        doc = store.publish(tmp_path / "copy3", {"checkpoint_step": 11, "model": m3["model"]})
        assert doc["version"] == 4
        onnx_file = tmp_path / "store" / "v00000004" / "model.onnx"
        data = bytearray(onnx_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        onnx_file.write_bytes(bytes(data))
        store.set_current(4)
        announce({"version": 4, "url": store.version_url(4), "created": doc["created"]})
        for u in urls:
            wait_for(lambda u=u: metric(u, "oneranker_serve_rejected_snapshots_total", reason="checksum") >= 1,
                     60, f"{u} refusing v4")
            assert version_of(u) == 3

        res = publish(staged[2], store, announce=announce)  # v5 moves everyone forward again
        assert res.version == 5
        published.add(5)
        all_at(5)

        # explicit rollback of the fleet through the CLI
        load.phase += 1
        out = CliRunner().invoke(app, ["snapshots", "rollback", "3", "--store", store.url,
                                       "--bootstrap-servers", broker])
        assert out.exit_code == 0, out.output
        all_at(3)
        load.phase += 1

        # admin rollback of one replica (needs the token)
        r = httpx.post(f"{urls[0]}/admin/rollback", json={"version": 2}, timeout=60)
        assert r.status_code == 401
        load.phase += 1
        r = httpx.post(f"{urls[0]}/admin/rollback", json={"version": 2}, timeout=60,
                       headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and r.json()["version"] == 2, r.text
        load.phase += 1
        assert version_of(urls[1]) == 3

        load.stop.wait(max(0.0, MIN_LOAD_S - (time.monotonic() - t0)))  # at least 30 s of load
        load.finish()
        load_s = time.monotonic() - t0
    finally:
        load.finish()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        announce.close()

    recs = load.records
    bad_status = [r for r in recs if r[3] != 200]
    assert not bad_status, bad_status[:5]
    assert load_s >= MIN_LOAD_S and len(recs) >= 100
    assert {r[4] for r in recs} <= published and 4 not in {r[4] for r in recs}
    for i in range(len(urls)):
        mine = [r for r in recs if r[0] == i]
        assert len({r[4] for r in mine}) >= 3, {r[4] for r in mine}  # saw at least three versions
        last = 0
        for _, sent, done, _, v, _, _ in mine:
            if sent != done or sent % 2:  # a rollback was in progress: may go down
                last = 0
                continue
            assert v >= last, f"replica {i} went from v{last} to v{v} without a rollback"
            last = v
    assert all(r[5] for r in recs if r[6].startswith("cold-user"))  # unknown users: cold start, 200
    assert not any(r[5] for r in recs if not r[6].startswith("cold-user"))  # Feast gave histories
    logs = "".join((tmp_path / f"r{i}.log").read_text() for i in range(2))
    assert re.search(r"providers \['CPUExecutionProvider'\]", logs)
    print(f"\nhot swap: {len(recs)} requests in {load_s:.1f}s, versions {sorted({r[4] for r in recs})}, "
          f"0 non-2xx")
