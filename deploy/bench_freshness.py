"""``oneranker bench freshness``: ``oneranker up`` run several times; medians of its freshness and of
each stage (deploy/freshness.py) over the runs, as JSON and a table."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from deploy.freshness import STAGES


def run_once(home: Path, args: list[str], log_path: Path) -> dict:
    """One ``oneranker up`` in a child process; its up-summary.json plus wall time and load."""
    t0 = time.monotonic()
    load0 = os.getloadavg()[0]
    with open(log_path, "wb") as log:
        rc = subprocess.call([sys.executable, "-m", "oneranker.cli", "up", "--home", str(home), *args],
                             stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "120"})
    try:
        summary = json.loads((home / "up-summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    return {"rc": rc, "wall_s": round(time.monotonic() - t0, 1), "load_at_start": round(load0, 2),
            "load_at_end": round(os.getloadavg()[0], 2), "log": str(log_path), **summary}


def medians(runs: list[dict]) -> dict:
    def med(values):
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 2) if values else None

    fr = [r.get("freshness") or {} for r in runs]
    out = {"p50_s": med([f.get("p50_s") for f in fr]), "p95_s": med([f.get("p95_s") for f in fr]),
           "snapshots": med([r.get("snapshots_published") for r in runs]),
           "overlap@10": med([(r.get("diversity") or {}).get("mean_overlap@10") for r in runs]),
           "stages_p50_s": {s: med([((f.get("stages") or {}).get(s) or {}).get("p50_s") for f in fr])
                            for s in STAGES}}
    order = ("wait", "read", "load", "export", "session", "parity", "gate", "publish")  # exporter/export.py's phases
    phases = sorted({k for r in runs for k in ((r.get("exports") or {}).get("phases_p50_s") or {})},
                    key=lambda k: (order.index(k) if k in order else len(order), k))
    out["export_phases_p50_s"] = {k: med([((r.get("exports") or {}).get("phases_p50_s") or {}).get(k)
                                          for r in runs]) for k in phases}
    out["gate_looks_mean"] = med([(r.get("exports") or {}).get("gate_looks_mean") for r in runs])
    return out


def run_bench(runs: int, out_dir: Path, args: list[str]) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    results = [run_once(out_dir / f"run{i}", args, out_dir / f"run{i}.log") for i in range(runs)]
    return {"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": f"{platform.machine()}, "
            f"{os.cpu_count()} cores", "args": args, "runs": results, "median": medians(results)}


def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"freshness over {len(doc['runs'])} runs of oneranker up {' '.join(doc['args'])}")
    t.add_column("")
    for i in range(len(doc["runs"])):
        t.add_column(f"run {i}", justify="right")
    t.add_column("median", justify="right")
    m = doc["median"]

    def row(name, values, med):
        t.add_row(name, *[str(v) for v in values], str(med))

    fr = [r.get("freshness") or {} for r in doc["runs"]]
    row("freshness p50 (s)", [f.get("p50_s") for f in fr], m["p50_s"])
    row("freshness p95 (s)", [f.get("p95_s") for f in fr], m["p95_s"])
    for s in STAGES:
        row(f"  {s} p50 (s)", [((f.get("stages") or {}).get(s) or {}).get("p50_s") for f in fr],
            m["stages_p50_s"][s])
    for k, v in (m.get("export_phases_p50_s") or {}).items():
        row(f"  export phase {k} p50 (s)",
            [((r.get("exports") or {}).get("phases_p50_s") or {}).get(k) for r in doc["runs"]], v)
    row("snapshots published", [r.get("snapshots_published") for r in doc["runs"]], m["snapshots"])
    row("top-10 overlap between users", [(r.get("diversity") or {}).get("mean_overlap@10") for r in doc["runs"]],
        m["overlap@10"])
    row("wall (s)", [r["wall_s"] for r in doc["runs"]], "")
    row("load avg (start/end)", [f"{r['load_at_start']}/{r['load_at_end']}" for r in doc["runs"]], "")
    Console().print(t)
