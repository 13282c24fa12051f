"""A serving replica: FastAPI app + snapshot manager (announcements, polling, verified hot swap).

Swap protocol: a new snapshot is downloaded into a private directory, every file's sha256 checked,
an onnxruntime session built and warmed; only then is ``Replica.active`` replaced — one reference
assignment. A request reads ``active`` once and uses that object to the end, so in-flight requests
finish on the old session while new ones get the new one. Versions only move forward, except
when the store's CURRENT pointer says promote/rollback (an explicit act) or an admin rolls back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Protocol

import orjson

from exporter.runtime import OnnxRanker
from exporter.store import SnapshotError, SnapshotStore, write_snapshot
from features.tokens import TokenSequence
from oneranker import config

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
MAX_K = 100
MAX_CANDIDATES = 2000
MAX_ID_LEN = 256


# --- where user tokens come from ----------------------------------------------------------

class TokenSource(Protocol):
    def get(self, user_id: str) -> TokenSequence | None: ...


class FeastTokens:
    """User token sequences from the Feast online store (features.store)."""

    def __init__(self, online: str | None = None):
        from features.store import FeatureStoreClient, open_store

        self.client = FeatureStoreClient(open_store(online=online))
        self.lock = threading.Lock()  # the SQLite online store is not safe for concurrent use

    def get(self, user_id: str) -> TokenSequence | None:
        with self.lock:
            return self.client.get_user_sequences([user_id]).get(user_id)


class StaticTokens:
    """Token sequences from memory (benchmarks, or a JSON file {user_id: TokenSequence dict})."""

    def __init__(self, seqs: dict[str, TokenSequence] | None = None):
        self.seqs = dict(seqs or {})

    @classmethod
    def from_file(cls, path: Path) -> "StaticTokens":
        return cls({u: TokenSequence.from_dict(d) for u, d in json.loads(Path(path).read_text()).items()})

    def get(self, user_id: str) -> TokenSequence | None:
        return self.seqs.get(user_id)


# --- metrics --------------------------------------------------------------------------------

class Metrics:
    def __init__(self, replica_id: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        labels = {"replica": replica_id}
        self.latency = Histogram("oneranker_serve_request_seconds", "Latency of /v1/rank", ["replica"],
                                 registry=self.registry,
                                 buckets=(.001, .0025, .005, .0075, .01, .015, .02, .03, .05, .075, .1,
                                          .15, .25, .5, 1, 2.5)).labels(**labels)
        self.requests = Counter("oneranker_serve_requests_total", "Rank requests by HTTP status",
                                ["replica", "status"], registry=self.registry)
        self.version = Gauge("oneranker_serve_model_version", "Snapshot version being served", ["replica"],
                             registry=self.registry).labels(**labels)
        self.swaps = Counter("oneranker_serve_swaps_total", "Snapshot swaps", ["replica"],
                             registry=self.registry).labels(**labels)
        self.rejected = Counter("oneranker_serve_rejected_snapshots_total", "Snapshots refused",
                                ["replica", "reason"], registry=self.registry)
        self.swap_seconds = Gauge("oneranker_serve_last_swap_seconds",
                                  "Download + verify + session build + warm-up of the last swap",
                                  ["replica"], registry=self.registry).labels(**labels)
        self.cold_start = Counter("oneranker_serve_cold_start_total", "Requests of users without history",
                                  ["replica"], registry=self.registry).labels(**labels)
        self.replica_id = replica_id


# --- the snapshot manager ----------------------------------------------------------------------

class Replica:
    def __init__(self, replica_id: str, store_url: str, tokens: TokenSource, cache_dir: Path | None = None,
                 threads: int | None = None, poll_s: float = 5.0, bootstrap: str | None = None,
                 admin_token: str | None = None, want_cuda: bool = True):
        self.replica_id = replica_id
        self.store = SnapshotStore(store_url)
        self.tokens = tokens
        self.cache_dir = Path(cache_dir or config.settings().cache_dir / "replicas" / replica_id)
        self.threads = threads
        self.poll_s = poll_s
        self.bootstrap = bootstrap
        self.admin_token = admin_token
        self.want_cuda = want_cuda
        self.metrics = Metrics(replica_id)
        self.active: OnnxRanker | None = None
        self.applied_epoch = 0
        self.rejected: dict[int, str] = {}
        self._swap_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self.kafka_status = "disabled"
        self.last_swap: dict | None = None  # seconds of the last swap, by stage (readyz)

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        try:
            self.check_now("startup")
        except Exception:  # noqa: BLE001 - not ready yet; the poller keeps trying
            log.exception("[%s] no snapshot at startup", self.replica_id)
        t = threading.Thread(target=self._poll_loop, name=f"poll-{self.replica_id}", daemon=True)
        t.start()
        self._threads.append(t)
        if self.bootstrap:
            k = threading.Thread(target=self._kafka_loop, name=f"announce-{self.replica_id}", daemon=True)
            k.start()
            self._threads.append(k)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=5)

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            woken = self._wake.wait(self.poll_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.check_now("announcement" if woken else "poll")
            except Exception:  # noqa: BLE001 - keep polling whatever happens
                log.exception("[%s] snapshot check failed", self.replica_id)

    def _kafka_loop(self) -> None:
        """Announcements on oneranker.snapshots wake the poller (the store's pointer stays the
        source of truth, so a replayed or duplicated announcement is harmless)."""
        from kafka import KafkaConsumer, TopicPartition

        backoff = 1.0
        while not self._stop.is_set():
            consumer = None
            try:
                consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None,
                                         enable_auto_commit=False, request_timeout_ms=15000,
                                         # a fetch the broker holds back costs its whole wait when the
                                         # broker does not answer early: 100 ms, not the 500 default
                                         fetch_max_wait_ms=100,
                                         client_id=f"oneranker-replica-{self.replica_id}")
                parts = None
                deadline = time.monotonic() + 30
                while not parts and time.monotonic() < deadline and not self._stop.is_set():
                    parts = consumer.partitions_for_topic(config.TOPIC_SNAPSHOTS)
                    if not parts:
                        self._stop.wait(1.0)
                if not parts:
                    raise RuntimeError(f"topic {config.TOPIC_SNAPSHOTS} not found")
                consumer.assign([TopicPartition(config.TOPIC_SNAPSHOTS, p) for p in sorted(parts)])
                consumer.seek_to_end()
                self.kafka_status = "connected"
                log.info("[%s] listening for announcements on %s", self.replica_id, config.TOPIC_SNAPSHOTS)
                backoff = 1.0
                while not self._stop.is_set():
                    batch = consumer.poll(timeout_ms=500)
                    for records in batch.values():
                        for rec in records:
                            try:
                                msg = json.loads(rec.value)
                                log.info("[%s] announcement: version %s", self.replica_id, msg.get("version"))
                            except ValueError:
                                log.warning("[%s] unreadable announcement ignored", self.replica_id)
                    if batch:
                        self._wake.set()
            except Exception as exc:  # noqa: BLE001 - no broker: polling carries on
                self.kafka_status = f"unavailable ({exc.__class__.__name__})"
                log.warning("[%s] announcements unavailable (%s); polling every %.1f s",
                            self.replica_id, exc, self.poll_s)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            finally:
                if consumer is not None:
                    consumer.close()

    # --- swapping ------------------------------------------------------------------------------
    @property
    def version(self) -> int | None:
        a = self.active
        return a.version if a is not None else None

    def check_now(self, reason: str = "poll", force: bool = False) -> dict:
        """Follow the store's CURRENT pointer if it moved (forward, or an explicit promote/rollback)."""
        with self._swap_lock:
            ptr = self.store.current()
            if not ptr:
                return {"changed": False, "why": "no current snapshot in the store"}
            epoch, v, action = int(ptr.get("epoch", 0)), int(ptr["version"]), ptr.get("action", "publish")
            if epoch <= self.applied_epoch and not force:
                return {"changed": False, "why": "pointer unchanged"}
            cur = self.version or 0
            if v == cur:
                self.applied_epoch = epoch
                return {"changed": False, "why": f"already serving {v}"}
            if v < cur and action not in ("promote", "rollback"):
                self.applied_epoch = epoch
                log.warning("[%s] pointer names older version %d (serving %d) without a rollback: ignored",
                            self.replica_id, v, cur)
                return {"changed": False, "why": f"{v} is older than {cur}"}
            if v in self.rejected and not force:
                return {"changed": False, "why": f"{v} was refused: {self.rejected[v]}"}
            ok = self._load(v, reason)
            if ok:
                self.applied_epoch = epoch
            return {"changed": ok, "version": self.version, "why": "swapped" if ok else self.rejected.get(v)}

    def rollback(self, version: int) -> dict:
        """Admin: serve ``version`` on this replica now (may go backwards)."""
        with self._swap_lock:
            if version == self.version:
                return {"changed": False, "version": version}
            ok = self._load(version, "admin rollback")
            return {"changed": ok, "version": self.version, "why": None if ok else self.rejected.get(version)}

    def _load(self, version: int, reason: str) -> bool:
        """Download, verify, build, warm, swap. Must hold _swap_lock. False = refused."""
        t0 = time.perf_counter()
        dest = self.cache_dir / f"v{version:08d}-{uuid.uuid4().hex[:6]}"
        try:
            manifest, files = self.store.read(version)  # verified in memory
            # the session is built from the bytes just verified; only a model with external weights
            # (more files named model.onnx*) is loaded from disk; the id maps go to disk either way
            external = any(n.startswith("model.onnx") and n != "model.onnx" for n in files)
            model_bytes = None if external else files.pop("model.onnx")
            write_snapshot(dest, manifest, files)
            del files
        except SnapshotError as exc:
            self._refuse(version, exc.reason, str(exc), dest)
            return False
        except Exception as exc:  # noqa: BLE001 - store unreachable: try again on the next check
            log.warning("[%s] cannot fetch snapshot %d (%s); will retry", self.replica_id, version, exc)
            self.metrics.rejected.labels(replica=self.replica_id, reason="fetch_error").inc()
            shutil.rmtree(dest, ignore_errors=True)
            return False
        t_fetch = time.perf_counter()
        try:
            ranker = OnnxRanker(dest, manifest, threads=self.threads, want_cuda=self.want_cuda,
                                model_bytes=model_bytes)
            del model_bytes
            t_build = time.perf_counter()
            ranker.warm()
        except Exception as exc:  # noqa: BLE001 - verified files that do not load: refused
            self._refuse(version, "load", f"{exc.__class__.__name__}: {exc}", dest)
            return False
        old = self.active
        self.active = ranker  # the swap: one reference assignment
        self.metrics.version.set(version)
        self.metrics.swaps.inc()
        t_end = time.perf_counter()
        self.metrics.swap_seconds.set(t_end - t0)
        self.last_swap = {"version": version, "at": time.time(), "s": t_end - t0, "fetch_s": t_fetch - t0,
                          "build_s": t_build - t_fetch, "warm_s": t_end - t_build}
        log.info("[%s] serving snapshot %d (was %s; %s; %.2f s; providers %s)", self.replica_id, version,
                 old.version if old else None, reason, time.perf_counter() - t0, ranker.providers)
        if old is not None:
            # The old session stays alive while in-flight requests hold it; its files can go
            # (onnxruntime has read the model into memory).
            shutil.rmtree(old.dir, ignore_errors=True)
        return True

    def _refuse(self, version: int, reason: str, message: str, dest: Path) -> None:
        self.rejected[version] = message
        self.metrics.rejected.labels(replica=self.replica_id, reason=reason).inc()
        log.error("[%s] refused snapshot %d (%s): %s; still serving %s", self.replica_id, version, reason,
                  message, self.version)
        shutil.rmtree(dest, ignore_errors=True)


# --- HTTP --------------------------------------------------------------------------------------

class BodyLimit:
    """ASGI middleware: 413 for bodies over ``limit`` bytes (declared or streamed)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # when the request reached the app: the handler reports receive + decode + dispatch from it
        scope.setdefault("state", {})["t_in"] = time.perf_counter()
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = True
                if too_big:
                    return await _send_json(send, 413, {"error": f"request body over {self.limit} bytes"})
        # Buffer the body (it is small by contract) so the limit also holds for chunked uploads.
        body = bytearray()
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            if len(body) > self.limit:
                return await _send_json(send, 413, {"error": f"request body over {self.limit} bytes"})
            if not msg.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class _TooLarge(Exception):
    pass


async def _send_json(send, status: int, doc: dict) -> None:
    body = json.dumps(doc).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


from typing import Literal, Optional  # noqa: E402

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr  # noqa: E402
# module level: the handlers' annotations are strings (PEP 563), resolved against these globals
from starlette.requests import Request as HTTPRequest  # noqa: E402


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: StrictStr = Field(min_length=1, max_length=MAX_ID_LEN)
    k: StrictInt = Field(10, ge=1, le=MAX_K)
    candidates: Optional[list[StrictStr]] = Field(
        None, min_length=1, max_length=MAX_CANDIDATES,
        description="Eligible ad ids: rank only these (the eligibility mask); default all ads.")
    device: Optional[Literal["ios", "android", "web"]] = None

class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: StrictInt = Field(ge=1)



def create_app(replica: Replica):
    from fastapi import FastAPI, Header, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from trainer.data import DEVICE_INDEX

    app = FastAPI(title=f"OneRanker replica {replica.replica_id}", docs_url=None, redoc_url=None)
    app.state.replica = replica

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
            problems.append(f"{loc}: {e.get('msg')}")
        status = 422
        replica.metrics.requests.labels(replica=replica.replica_id, status=str(status)).inc()
        return JSONResponse({"error": "invalid request", "problems": problems}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        log.exception("[%s] request failed", replica.replica_id)
        replica.metrics.requests.labels(replica=replica.replica_id, status="500").inc()
        return JSONResponse({"error": f"internal error: {exc.__class__.__name__}"}, status_code=500)

    @app.post("/v1/rank")
    async def rank(req: RankRequest, request: HTTPRequest):
        # On the event loop, not in the thread pool: the work is CPU-bound (one onnxruntime session,
        # a local or single-key online-store read) and a replica serves one core, so a thread hop
        # buys no parallelism and cost 0.8 ms a request (measured on this 2-core machine).
        t0 = time.perf_counter()
        active = replica.active  # read once: this request finishes on this snapshot
        if active is None:
            replica.metrics.requests.labels(replica=replica.replica_id, status="503").inc()
            return JSONResponse({"error": "no model loaded yet"}, status_code=503)
        try:
            seq = replica.tokens.get(req.user_id)
            t_feast = time.perf_counter()
        except Exception as exc:  # noqa: BLE001
            log.error("[%s] feature store read failed: %s", replica.replica_id, exc)
            replica.metrics.requests.labels(replica=replica.replica_id, status="503").inc()
            return JSONResponse({"error": "feature store unavailable"}, status_code=503)
        cold = seq is None or len(seq) == 0
        if cold:
            replica.metrics.cold_start.inc()
        unknown = 0
        if req.candidates is not None:
            unknown = sum(1 for c in req.candidates if c not in active.items.index)
        timing: dict[str, float] = {}
        items = active.rank(req.user_id, seq, min(req.k, active.top_k), req.candidates,
                            DEVICE_INDEX.get(req.device or "", 0), timing=timing)
        body = orjson.dumps({"user_id": req.user_id, "model_version": active.version,
                             "replica_id": replica.replica_id, "cold_start": cold,
                             "known_user": req.user_id in active.users.index, "unknown_candidates": unknown,
                             "items": [{"rank": i + 1, "ad_id": a, "score": s} for i, (a, s) in enumerate(items)]})
        t_end = time.perf_counter()
        replica.metrics.latency.observe(t_end - t0)
        replica.metrics.requests.labels(replica=replica.replica_id, status="200").inc()
        # per-stage durations (ms) for `oneranker bench serve`: before the handler (receive, decode,
        # validation), Feast read, input building, session run, everything else in the handler
        t_in = (request.scope.get("state") or {}).get("t_in", t0)
        stages = {"pre": t0 - t_in, "feast": t_feast - t0, "encode": timing.get("encode", 0.0),
                  "run": timing.get("run", 0.0)}
        stages["post"] = max(0.0, t_end - t_feast - stages["encode"] - stages["run"])
        timing_header = ", ".join(f"{k};dur={v * 1000:.3f}" for k, v in stages.items())
        return Response(body, media_type="application/json", headers={"Server-Timing": timing_header})

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "replica_id": replica.replica_id}

    @app.get("/readyz")
    def readyz():
        active = replica.active
        if active is None:
            return JSONResponse({"ready": False, "reason": "no verified model loaded"}, status_code=503)
        return {"ready": True, "model_version": active.version, "providers": active.providers,
                "replica_id": replica.replica_id, "announcements": replica.kafka_status,
                "last_swap": replica.last_swap}

    @app.get("/metrics")
    def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(replica.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def _admin(token: str | None):
        if not replica.admin_token:
            return JSONResponse({"error": "admin actions are disabled (set ONERANKER_ADMIN_TOKEN)"},
                                status_code=403)
        import hmac

        if not token or not hmac.compare_digest(token, f"Bearer {replica.admin_token}"):
            return JSONResponse({"error": "admin token missing or wrong"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return None

    @app.post("/admin/reload")
    def admin_reload(authorization: Optional[str] = Header(None)):
        denied = _admin(authorization)
        if denied is not None:
            return denied
        return replica.check_now("admin reload", force=True)

    @app.post("/admin/rollback")
    def admin_rollback(body: RollbackRequest, authorization: Optional[str] = Header(None)):
        denied = _admin(authorization)
        if denied is not None:
            return denied
        out = replica.rollback(body.version)
        if not out["changed"] and out["version"] != body.version:
            return JSONResponse({"error": f"snapshot {body.version} refused: {out['why']}",
                                 "model_version": out["version"]}, status_code=409)
        return out

    return BodyLimit(app)


# --- running it ------------------------------------------------------------------------------

class Server:
    """uvicorn in a background thread (tests, benchmarks) or the foreground (the CLI)."""

    def __init__(self, replica: Replica, host: str = "127.0.0.1", port: int = config.DEFAULT_SERVE_PORT,
                 log_level: str = "warning"):
        import uvicorn

        self.replica = replica
        self.config = uvicorn.Config(create_app(replica), host=host, port=port, log_level=log_level,
                                     access_log=False, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(self.config)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def run(self) -> None:
        self.replica.start()
        try:
            self.server.run()
        finally:
            self.replica.stop()

    def start_background(self, timeout_s: float = 30.0) -> "Server":
        self.replica.start()
        self.thread = threading.Thread(target=self.server.run, name=f"http-{self.replica.replica_id}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"replica {self.replica.replica_id} did not start on {self.url}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.replica.stop()


def admin_token_from_env() -> str | None:
    return os.environ.get("ONERANKER_ADMIN_TOKEN") or None
