"""Checkpoint → verified ONNX snapshot → store → announcement.

Before anything is published: the ONNX checker, dynamic-shape assertions (DESIGN §8 trap 1), parity
against the torch inference function (trainer.infer.rank_topk) on probe users, and a quality gate
against the snapshot now serving, both scored with onnxruntime on a recent holdout of samples.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from exporter.graph_cache import with_bucketed_tables
from exporter.runtime import INPUT_NAMES, NEG_HALF, OnnxRanker
from exporter.store import SnapshotError, SnapshotStore
from oneranker import config

log = logging.getLogger(__name__)

EXPORT_K = 100  # top-K baked into the graph; requests ask for k ≤ this
PARITY_ATOL = 1e-4
QUANTIZE_FROM_ROWS = 65_536  # item rows from which the corpus scan is int8 (corpus_bits_for)
SHORTLIST_PER_HEAD = 2  # an int8 scan keeps 2 x retrieve_n per head for exact rescoring
TIE_ATOL = 1e-5
GATE_METRICS = ("hr@10", "gauc")
# The gate is a group-sequential paired test: it looks after every GATE_LOOK holdout requests (those
# the serving snapshot scored in its own gate first, then the newest) and stops as soon as the
# decision is settled. Consecutive snapshots rank most
# requests the same, so one look usually settles it: a quarter of the scoring of a fixed 512-request
# holdout, the largest part of a snapshot's time (measured: 2.8 of 3.6 s). z = 2.36 at every look is
# Pocock's boundary for 4 looks at an overall two-sided α of 0.05.
GATE_LOOK = 128
GATE_Z = 2.36
# onnxruntime intra-op threads for parity and the gate. The exporter shares the CPU with the trainer,
# the stream worker and the replicas: on the 2-core machine, scoring a 256-request holdout took
# 1.6-1.8 s with 1 thread and 3.1-3.3 s with 2 while other work ran (batch 32 or 128 alike).
VALIDATION_THREADS = 1


@dataclass
class ExportResult:
    status: str  # published | parity_failed | gate_failed | check_failed | up_to_date | warmed
    step: int
    version: int | None = None
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status in ("published", "up_to_date", "warmed")


# --- building the snapshot files -----------------------------------------------------------

def corpus_bits_for(cfg, corpus_bits: int | None = None) -> int:
    """32 (fp32 corpus scan) or 8 (int8, exporter.quantize); None = 8 from QUANTIZE_FROM_ROWS
    item rows, where the scan decides latency, fp32 below, where it is under a millisecond."""
    if corpus_bits is None:
        return 8 if cfg.num_items >= QUANTIZE_FROM_ROWS else 32
    if corpus_bits not in (8, 32):
        raise ValueError(f"corpus_bits must be 8 or 32, not {corpus_bits}")
    return corpus_bits


def export_graph(model, out_dir: Path, k: int | None = None, corpus_bits: int | None = None,
                 valid_rows: int | None = None) -> dict:
    """Export the serving graph to ``out_dir/model.onnx`` (dynamo, dynamic batch and history), run
    the ONNX checker and assert the exported dims are dynamic. Returns a description.
    ``corpus_bits`` 8: the corpus scan reads an int8 table and the graph rescores a shortlist of
    SHORTLIST_PER_HEAD × retrieve_n per head exactly (``corpus_bits_for``). ``valid_rows``: the id
    map's length; the rows past it (a padded table's tail) are never served."""
    import onnx

    from exporter.graph_cache import GRAPHS
    from exporter.quantize import quantize_corpus

    cfg = model.cfg
    n_heads = cfg.n_tasks
    k = min(k or EXPORT_K, n_heads * min(cfg.retrieve_n, cfg.num_items))
    bits = corpus_bits_for(cfg, corpus_bits)
    shortlist = SHORTLIST_PER_HEAD * cfg.retrieve_n if bits == 8 else 0
    path = out_dir / "model.onnx"
    t0 = time.perf_counter()
    how = GRAPHS.export(model, str(path), k, shortlist, valid_rows)  # traced, or the last trace, new weights
    quantized = quantize_corpus(path, bits) if bits == 8 else None
    export_s = time.perf_counter() - t0
    onnx.checker.check_model(str(path))  # by path: also works with an external-data side file
    proto = onnx.load(str(path), load_external_data=False)
    inputs = {}
    for inp in proto.graph.input:
        dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        inputs[inp.name] = dims
    for name, dims in list(inputs.items()):
        if not isinstance(dims[0], str):
            raise ValueError(f"exported input {name} has a fixed batch dimension {dims} (trap 1)")
    for name in list(inputs)[1:4]:
        if not isinstance(inputs[name][1], str):
            raise ValueError(f"exported input {name} has a fixed history dimension {inputs[name]}")
    return {"k": k, "inputs": inputs, "export_s": round(export_s, 2), "graph": how, "corpus_bits": bits,
            "shortlist": shortlist, "quantized": quantized,
            "files": sorted(p.name for p in out_dir.iterdir() if p.name.startswith("model.onnx"))}


def write_id_maps(ckpt, out_dir: Path) -> None:
    (out_dir / "items.json").write_text(json.dumps(ckpt.item_ids, sort_keys=True))
    (out_dir / "users.json").write_text(json.dumps(ckpt.user_ids, sort_keys=True))


def model_manifest(model, graph: dict) -> dict:
    cfg = model.cfg
    return {"max_len": cfg.max_len, "num_items": cfg.num_items, "num_users": cfg.num_users,
            "top_k": graph["k"], "inputs": graph["inputs"], "corpus_bits": graph.get("corpus_bits", 32),
            "shortlist": graph.get("shortlist", 0), "config": cfg.to_dict()}


# --- holdout -------------------------------------------------------------------------------

def load_holdout(ckpt, holdout_file: Path | None = None, limit: int = 512) -> list[dict]:
    """Recent samples (Sample dicts) from the checkpoint, else from a JSONL file of samples."""
    samples = list((ckpt.extra or {}).get("recent_samples") or [])
    if not samples and holdout_file is not None:
        with open(holdout_file) as f:
            samples = [json.loads(line) for line in f if line.strip()]
    return samples[-limit:]


def _sample_inputs(samples: Sequence[dict]):
    from streaming.samples import Sample
    from trainer.data import DEVICE_INDEX

    out = []
    for d in samples:
        s = Sample.from_dict(d)
        out.append((s.user_id, s.history_sequence(),  # whole history: its items feed ``seen``
                    DEVICE_INDEX.get(str((s.context or {}).get("device", "")), 0), s.ads))
    return out


def holdout_metrics(ranker: OnnxRanker, samples: Sequence[dict], batch: int = 32,
                    known: dict[str, tuple] | None = None) -> dict:
    """HR@10 of a clicked ad in the whole-corpus top-10, and GAUC over the exposed ads (scores of
    each request's exposed ads, from the graph with eligibility = those ads). ``per_request`` keeps
    each holdout request's hit and AUC (None where undefined) so two models can be compared pairwise,
    and ``by_sample`` the same by sample id. Samples in ``known`` (sample id → (hit, auc) of this same
    snapshot, scored before) are not scored again."""
    known = known or {}
    rows = _sample_inputs(samples)
    ids_of = [str(d.get("sample_id", "")) for d in samples]
    todo = [i for i, sid in enumerate(ids_of) if not sid or sid not in known]
    scored: dict[int, tuple] = {}
    for i in range(0, len(todo), batch):
        idx = todo[i:i + batch]
        chunk = [rows[j] for j in idx]
        users = [r[0] for r in chunk]
        seqs = [r[1] for r in chunk]
        devs = [r[2] for r in chunk]
        ids, _ = ranker.run(ranker.encode(seqs, users, devs))
        exposed = [[a.ad_id for a in r[3]] for r in chunk]
        rids, rscores = ranker.run(ranker.encode(seqs, users, devs, exposed))
        for b, (_, _, _, ads) in enumerate(chunk):
            clicked = {ranker.items.get(a.ad_id) for a in ads if a.click}
            clicked.discard(1)
            hit = float(bool(clicked & set(int(x) for x in ids[b][:10]))) if any(a.click for a in ads) else None
            score = {int(x): float(s) for x, s in zip(rids[b], rscores[b]) if s > NEG_HALF}
            pos = [score.get(ranker.items.get(a.ad_id), -np.inf) for a in ads if a.click]
            neg = [score.get(ranker.items.get(a.ad_id), -np.inf) for a in ads if not a.click]
            auc = None
            if pos and neg:
                p, n = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
                auc = float(((p > n) + 0.5 * (p == n)).mean())
            scored[idx[b]] = (hit, auc)
    res = [scored[i] if i in scored else tuple(known[ids_of[i]]) for i in range(len(rows))]
    per_hit, per_auc = [r[0] for r in res], [r[1] for r in res]
    hits = [h for h in per_hit if h is not None]
    aucs = [a for a in per_auc if a is not None]
    return {"n": len(rows), "hr@10": float(np.mean(hits)) if hits else None,
            "gauc": float(np.mean(aucs)) if aucs else None, "n_hr": len(hits), "n_auc": len(aucs),
            "scored": len(scored), "per_request": {"hr@10": per_hit, "gauc": per_auc},
            "by_sample": {sid: r for sid, r in zip(ids_of, res) if sid}}


def _without_per_request(metrics: dict | None) -> dict | None:
    return None if metrics is None else {k: v for k, v in metrics.items() if k not in ("per_request", "by_sample")}


def gate(candidate: dict, current: dict | None, tolerance: float,
         z: float = GATE_Z) -> tuple[bool, bool, list[str]]:
    """Refuse the candidate when it is confidently worse than the serving snapshot by more than
    ``tolerance`` on a metric: the upper bound (mean + z·SE) of the paired per-request difference
    candidate − serving, over the holdout requests both can score, lies below −tolerance.
    Returns (ok, settled, notes): ``settled`` when more requests could not change the decision at
    this confidence: refused, or every metric's lower bound (mean − z·SE) above −tolerance.

    Pairing matters: a holdout of a few hundred requests gives each model's GAUC a standard error
    of ~0.02–0.03, so comparing two noisy means would refuse equally good models at random."""
    if not current:
        return True, True, ["no snapshot serving: nothing to compare"]
    notes, ok, settled = [], True, True
    for m in GATE_METRICS:
        c_all = (candidate.get("per_request") or {}).get(m)
        s_all = (current.get("per_request") or {}).get(m)
        if candidate.get(m) is None or current.get(m) is None:
            notes.append(f"{m}: not computable on this holdout")
            settled = False  # more requests may make it computable
            continue
        if c_all is not None and s_all is not None and len(c_all) == len(s_all):
            d = np.asarray([c - s for c, s in zip(c_all, s_all) if c is not None and s is not None])
        else:  # no per-request values (an older report): compare the means alone
            d = np.asarray([candidate[m] - current[m]])
        mean = float(d.mean())
        se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
        upper, lower = mean + z * se, mean - z * se
        line = (f"{m}: {candidate[m]:.4f} vs serving {current[m]:.4f} "
                f"(paired Δ {mean:+.4f} ± {z:g}·{se:.4f} over {len(d)})")
        if upper < -tolerance:
            ok = False
            notes.append(f"{line}: worse by more than tolerance {tolerance}")
        else:
            settled = settled and len(d) > 1 and lower > -tolerance
            notes.append(f"{line} ok")
    return ok, settled or not ok, notes


# --- parity --------------------------------------------------------------------------------

def parity(model, ranker: OnnxRanker, samples: Sequence[dict], n_random: int = 2) -> dict:
    """torch ``rank_topk`` (the model's own corpus scores) vs onnxruntime on probe users: the holdout's users
    with their histories (and one batch with eligibility = their exposed ads) plus random inputs
    of other batch sizes / history lengths. Same top-K ids; max |score diff| ≤ PARITY_ATOL."""
    import torch

    from trainer.infer import rank_topk, serving_inputs

    model = model.eval()

    def graph(user, items, actions, times, device, eligible, seen=None):
        # the model's own corpus scores (not the snapshot's precomputed table): parity checks both
        seen_kw = {} if seen is None else ({"seen": seen} if seen.dtype == torch.bool else {"seen_ids": seen})
        return rank_topk(model, user, items, actions, times, device, eligible, ranker.top_k, **seen_kw)

    batches = []
    rows = _sample_inputs(samples[:16])
    if rows:
        users, seqs, devs = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
        batches.append(ranker.encode(seqs, users, devs))
        batches.append(ranker.encode(seqs, users, devs, [[a.ad_id for a in r[3]] for r in rows]))
    cfg = model.cfg
    for j, (B, L) in enumerate([(3, cfg.max_len), (1, max(2, cfg.max_len // 3))][:n_random]):
        args = serving_inputs(cfg, B, L, torch.Generator().manual_seed(100 + j))
        feeds = dict(zip(INPUT_NAMES, (a.numpy() for a in args)))
        if "eligible" in ranker.input_names:  # an older graph: eligibility as a mask
            feeds["eligible"] = ranker.eligibility_mask({"candidates": feeds.pop("candidates")})
        batches.append({name: feeds[name] for name in ranker.input_names})
    max_diff, mismatches, n = 0.0, 0, 0
    for feeds in batches:
        # every form of eligibility here stops at default_mask: only where serving can answer
        torch_feeds = {**feeds, "eligible": ranker.eligibility_mask(feeds)}
        names = [("eligible" if name == "candidates" else name) for name in ranker.input_names]
        with torch.no_grad():
            t_ids, t_scores = graph(*(torch.from_numpy(np.array(torch_feeds[name])) for name in names))
        o_ids, o_scores = ranker.run(feeds)
        t_ids, t_scores = t_ids.numpy(), t_scores.numpy()
        valid = t_scores > NEG_HALF
        max_diff = max(max_diff, float(np.abs(np.where(valid, o_scores - t_scores, 0)).max()))
        for b in range(t_ids.shape[0]):
            n += 1
            for j in np.nonzero((t_ids[b] != o_ids[b]) & valid[b])[0]:
                # an order swap between (numerically) tied scores is not a ranking difference
                near = [t_scores[b, i] for i in (j - 1, j + 1) if 0 <= i < t_scores.shape[1]]
                if not any(abs(t_scores[b, j] - x) <= TIE_ATOL for x in near):
                    mismatches += 1
                    break
    return {"ok": mismatches == 0 and max_diff <= PARITY_ATOL, "rows": n, "topk_mismatch_rows": mismatches,
            "max_abs_diff": max_diff, "atol": PARITY_ATOL}


# --- the whole pipeline --------------------------------------------------------------------

# The session of the snapshot this process published last, by (store URL, version): it is what
# serves until the next export, so the gate scores it without fetching and loading it again.
_PUBLISHED: dict[tuple[str, int], OnnxRanker] = {}
# Its holdout results by sample id, from its own gate: the next checkpoint's holdout (the trainer's
# most recent samples) mostly repeats the last one, so the serving side of the gate scores only the
# samples that are new since then (a sample's result depends only on the snapshot and the sample).
_PUBLISHED_SCORES: dict[tuple[str, int], dict[str, tuple]] = {}


class _ServingScorer:
    """The serving snapshot's side of the gate: its session (this process's last publication, else
    fetched once) and its holdout results by sample id, from its own gate and from earlier looks."""

    def __init__(self, store: SnapshotStore, workdir: Path, threads: int | None):
        cur = store.current()
        self.store, self.workdir, self.threads = store, workdir, threads
        self.version = int(cur["version"]) if cur else None
        key = (store.url, self.version)
        self.ranker = _PUBLISHED.get(key)
        self.known = dict(_PUBLISHED_SCORES.get(key) or {})
        self.scored = 0
        self.broken = False

    def metrics(self, samples) -> dict | None:
        if self.version is None or self.broken:
            return None
        try:
            if self.ranker is None and not all(str(x.get("sample_id", "")) in self.known for x in samples):
                d = self.workdir / f"serving-{self.version}"
                self.ranker = OnnxRanker(d, self.store.fetch(self.version, d), threads=self.threads,
                                         want_cuda=False)
            res = holdout_metrics(self.ranker, samples, known=self.known)
        except (SnapshotError, OSError, ValueError) as exc:
            log.warning("cannot score the serving snapshot %s (%s): gating against nothing", self.version, exc)
            self.broken = True
            return None
        self.known.update(res["by_sample"])
        self.scored += res["scored"]
        return {**res, "scored": self.scored}


def _sequential_gate(ranker: OnnxRanker, samples, serving: _ServingScorer, tolerance: float):
    """Score candidate and serving on GATE_LOOK holdout requests, then on more, until the gate is
    settled or the holdout is used up. Requests the serving snapshot has scored already (in its own
    gate) come first, then the newest: one look then costs only the candidate's scoring.
    Returns (ok, notes, candidate, serving)."""
    order = list(reversed(samples))
    order.sort(key=lambda x: str(x.get("sample_id", "")) not in serving.known)  # stable
    cand_known: dict[str, tuple] = {}
    cand_scored = 0
    for m in range(GATE_LOOK, len(order) + GATE_LOOK, GATE_LOOK):
        part = order[:m]
        cand = holdout_metrics(ranker, part, known=cand_known)
        cand_known.update(cand["by_sample"])
        cand_scored += cand["scored"]
        cand["scored"] = cand_scored
        cur = serving.metrics(part)
        ok, settled, notes = gate(cand, cur, tolerance)
        if settled or m >= len(order):
            return ok, notes + [f"looks: {m // GATE_LOOK} ({len(part)} of {len(samples)} requests)"], cand, cur
    return True, ["empty holdout"], {}, None


class _PhaseClock:
    """Seconds per phase of one export (in the report as ``phases_s``: where a snapshot's time goes)."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = round(now - self._t, 3)
        self._t = now


@dataclass
class Staged:
    """A snapshot that passed (or failed) every check, not yet published."""

    result: ExportResult
    dir: Path | None = None
    manifest: dict | None = None
    _tmp: tempfile.TemporaryDirectory | None = None
    ranker: OnnxRanker | None = None  # the candidate's session (kept once published)
    scores: dict[str, tuple] | None = None  # its holdout results by sample id (kept once published)

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _serving_model(ckpt, min_item_rows: int):
    """The checkpoint's model with stable shapes (tables padded, the corpus to at least the
    catalog's size), so the traced graph is re-used across checkpoints."""
    from trainer.checkpoint import build_model

    return with_bucketed_tables(build_model(ckpt), min_items=min_item_rows)


def _valid_rows(ckpt) -> int:
    """The item id map's length: table rows at or past it are padding no id maps to."""
    from trainer.data import IdMap

    return len(IdMap.from_dict(ckpt.item_ids))


def untrained(ckpt) -> bool:
    """A checkpoint the trainer wrote before learning anything (its initial state)."""
    return (ckpt.extra or {}).get("samples_learned", None) == 0


def stage(ckpt, store: SnapshotStore, *, gate_tolerance: float = 0.02, holdout_file: Path | None = None,
          threads: int | None = VALIDATION_THREADS, force: bool = False, min_item_rows: int = 0,
          corpus_bits: int | None = None) -> Staged:
    """Export ``ckpt`` and run the checker, parity and the quality gate against what is serving.

    An untrained checkpoint (the trainer writes one when it starts fresh) is never published: it
    only warms the graph cache, so the first trace (20-60 s on 2 cores) runs while the trainer
    learns its first batches instead of after them."""
    if untrained(ckpt) and not force:
        model = _serving_model(ckpt, min_item_rows)
        with tempfile.TemporaryDirectory(prefix="oneranker-warm-") as tmp:
            graph = export_graph(model, Path(tmp), corpus_bits=corpus_bits, valid_rows=_valid_rows(ckpt))
        return Staged(ExportResult("warmed", ckpt.step, report={"export": graph}))

    cur = store.current()
    if cur and not force:
        try:
            cur_step = int(store.manifest(int(cur["version"])).get("checkpoint_step", -1))
        except SnapshotError:
            cur_step = -1
        if cur_step >= ckpt.step:
            return Staged(ExportResult("up_to_date", ckpt.step, int(cur["version"])))
    clock = _PhaseClock()
    model = _serving_model(ckpt, min_item_rows)
    samples = load_holdout(ckpt, holdout_file)
    report: dict[str, Any] = {"holdout_samples": len(samples), "phases_s": clock.phases}
    clock.lap("load")
    tmp = tempfile.TemporaryDirectory(prefix="oneranker-export-")
    work = Path(tmp.name)
    snap = work / "snapshot"
    snap.mkdir()
    try:
        graph = export_graph(model, snap, corpus_bits=corpus_bits, valid_rows=_valid_rows(ckpt))
    except Exception as exc:  # noqa: BLE001 - checker/export failures refuse the snapshot
        log.error("export/check failed for checkpoint %d: %s", ckpt.step, exc)
        tmp.cleanup()
        return Staged(ExportResult("check_failed", ckpt.step, report={"error": str(exc)}))
    clock.lap("export")
    write_id_maps(ckpt, snap)
    manifest = {"checkpoint_step": ckpt.step, "created": time.time(),
                "trained_through": {"offsets": ckpt.offsets, "event_time_ms": ckpt.trained_through_ts},
                "model": model_manifest(model, graph)}
    (snap / "manifest.json").write_text(json.dumps({**manifest, "version": 0}))
    ranker = OnnxRanker(snap, threads=threads, want_cuda=False)
    clock.lap("session")
    report["export"] = graph
    report["parity"] = parity(model, ranker, samples)
    clock.lap("parity")
    if not report["parity"]["ok"]:
        log.error("parity failed for checkpoint %d: %s", ckpt.step, report["parity"])
        tmp.cleanup()
        return Staged(ExportResult("parity_failed", ckpt.step, report=report))
    scorer = _ServingScorer(store, work, threads)
    ok, notes, cand, serving = _sequential_gate(ranker, samples, scorer, gate_tolerance) if samples else (
        True, ["empty holdout"], {}, None)
    clock.lap("gate")
    report["gate"] = {"ok": ok, "tolerance": gate_tolerance, "z": GATE_Z, "look": GATE_LOOK,
                      "candidate": _without_per_request(cand), "serving_version": scorer.version,
                      "serving": _without_per_request(serving), "notes": notes}
    if not ok:
        log.error("quality gate refused checkpoint %d: %s", ckpt.step, "; ".join(notes))
        tmp.cleanup()
        return Staged(ExportResult("gate_failed", ckpt.step, report=report))
    (snap / "manifest.json").unlink()
    manifest["metrics"] = {"train": ckpt.metrics, "holdout": _without_per_request(cand),
                           "parity": report["parity"]}
    manifest["gate"] = report["gate"]  # the decision and the numbers behind it
    return Staged(ExportResult("staged", ckpt.step, report=report), snap, manifest, tmp, ranker,
                  cand.get("by_sample"))


def publish(staged: Staged, store: SnapshotStore, *, keep: int = 5, promote: bool = True,
            announce: Callable[[dict], None] | None = None) -> ExportResult:
    """Publish a staged snapshot, point CURRENT at it, apply retention, announce it."""
    result = staged.result
    if staged.dir is None:
        return result
    t0 = time.perf_counter()
    try:
        doc = store.publish(staged.dir, staged.manifest)
    finally:
        staged.cleanup()
    result.report.setdefault("phases_s", {})["publish"] = round(time.perf_counter() - t0, 3)
    version = doc["version"]
    if staged.ranker is not None:
        _PUBLISHED.clear()
        _PUBLISHED[(store.url, version)] = staged.ranker
    _PUBLISHED_SCORES.clear()
    if staged.scores:
        _PUBLISHED_SCORES[(store.url, version)] = dict(staged.scores)
    if promote:
        store.set_current(version, "publish")
    result.report["removed"] = store.retain(keep)
    msg = {"version": version, "url": store.version_url(version), "created": doc["created"]}
    if announce is not None:
        try:
            announce(msg)
        except Exception as exc:  # noqa: BLE001 - polling the pointer is the fallback
            log.warning("announcement of snapshot %d failed (%s); replicas will poll", version, exc)
    result.status, result.version = "published", version
    return result


def export_checkpoint(ckpt, store: SnapshotStore, *, gate_tolerance: float = 0.02,
                      holdout_file: Path | None = None, keep: int = 5, promote: bool = True,
                      announce: Callable[[dict], None] | None = None, threads: int | None = VALIDATION_THREADS,
                      force: bool = False, min_item_rows: int = 0, corpus_bits: int | None = None) -> ExportResult:
    """Export ``ckpt`` and publish it when it passes every check."""
    staged = stage(ckpt, store, gate_tolerance=gate_tolerance, holdout_file=holdout_file,
                   threads=threads, force=force, min_item_rows=min_item_rows, corpus_bits=corpus_bits)
    return publish(staged, store, keep=keep, promote=promote, announce=announce)


class KafkaAnnouncer:
    """Announces snapshots on oneranker.snapshots as JSON {version, url, created}."""

    def __init__(self, bootstrap: str, topic: str = config.TOPIC_SNAPSHOTS):
        from oneranker.kafka import make_producer

        self.topic = topic
        self.producer = make_producer(bootstrap, linger_ms=0, client_id="oneranker-exporter",
                                      max_block_ms=5000)

    def __call__(self, msg: dict) -> None:
        self.producer.send(self.topic, key=b"snapshot", value=json.dumps(msg, sort_keys=True).encode())
        self.producer.flush(timeout=10)

    def close(self) -> None:
        self.producer.close(timeout=5)


def watch(ckpt_dir: Path, store: SnapshotStore, stop: threading.Event, interval_s: float = 10.0,
          on_result: Callable[[ExportResult], None] | None = None, **kw) -> None:
    """Export whenever a newer checkpoint appears (a refused one is not retried). Idle, it asks the
    trainer for its newest weights (``want_checkpoint``) rather than waiting for its next interval."""
    from trainer.checkpoint import CorruptCheckpoint, list_checkpoints, load, read_manifest, want_checkpoint

    done = -1
    while not stop.is_set():
        pts = list_checkpoints(ckpt_dir)
        before = done
        for pt in reversed(pts):
            try:
                manifest = read_manifest(pt)
                step = int(manifest["step"])
            except (OSError, ValueError, KeyError):
                continue
            if step <= done:
                break
            # wait: checkpoint written → picked up here; read: read, verify and unpickle it
            waited = max(0.0, time.time() - float(manifest.get("created", time.time())))
            t0 = time.perf_counter()
            try:
                ckpt = load(pt)
            except CorruptCheckpoint as exc:
                log.warning("skipping checkpoint: %s", exc)
                continue
            read_s = time.perf_counter() - t0
            try:
                result = export_checkpoint(ckpt, store, **kw)
            except Exception as exc:  # noqa: BLE001 - keep watching; this checkpoint is skipped
                log.exception("export of checkpoint %d failed", step)
                result = ExportResult("error", step, report={"error": f"{exc.__class__.__name__}: {exc}"})
            if "phases_s" in result.report:
                result.report["phases_s"] = {"wait": round(waited, 3), "read": round(read_s, 3),
                                             **result.report["phases_s"]}
            done = step
            if on_result:
                on_result(result)
            break
        if done == before:  # nothing new; after an export, a checkpoint written meanwhile goes next
            want_checkpoint(ckpt_dir)
            stop.wait(interval_s)


def clean_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
