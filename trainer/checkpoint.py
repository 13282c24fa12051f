"""Checkpoints: the trainer writes them, the exporter reads them. One format, one module.

A checkpoint is two files in the checkpoint directory:

    ckpt-<step:012d>.pt    torch.save of the payload dict (model config + state, optimizer state,
                           id maps, consumer offsets, trained-through event time, metrics)
    ckpt-<step:012d>.json  the manifest: step, created, sha256 and size of the .pt, offsets,
                           trained_through_ts, metrics — written LAST, so a checkpoint without a
                           manifest (a crash mid-write) does not exist for readers.

Both are written atomically (temp file, fsync, rename, fsync of the directory). Readers verify the
sha256 and skip a truncated or corrupt checkpoint with a warning.

A reader that wants the newest weights now (the exporter, idle after a snapshot) leaves the file
``export-wanted`` in the directory (``want_checkpoint``); the trainer checks for it between steps and
writes a checkpoint at once (``take_checkpoint_request``) instead of at its next interval, so a
snapshot starts from weights a step old, not up to a checkpoint interval old.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class CorruptCheckpoint(Exception):
    pass


@dataclass
class Checkpoint:
    """Everything needed to resume training, or to export what was trained."""

    step: int
    model_config: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    item_ids: dict[str, int]  # trainer.data.IdMap.to_dict()
    user_ids: dict[str, int]
    offsets: dict[str, int] = field(default_factory=dict)  # "topic:partition" → next offset to read
    trained_through_ts: int = 0  # newest sample event time (ms) learned from
    metrics: dict[str, Any] = field(default_factory=dict)
    optimizer_state: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. recent sample ids for dedupe
    created: float = field(default_factory=time.time)
    # [wall time, offsets after that step] for each step since the previous checkpoint: when each
    # sample was learned (the freshness breakdown of ``oneranker up`` reads it from the manifest)
    progress: list = field(default_factory=list)
    path: Path | None = None

    def manifest(self) -> dict[str, Any]:
        return {"step": self.step, "created": self.created, "offsets": self.offsets,
                "trained_through_ts": self.trained_through_ts, "metrics": self.metrics,
                "progress": self.progress}


def _stem(step: int) -> str:
    return f"ckpt-{step:012d}"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(ckpt_dir: Path, ckpt: Checkpoint, keep: int = 3) -> Path:
    """Write ``ckpt`` atomically and keep only the newest ``keep`` checkpoints. Returns the .pt path."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    payload = {k: v for k, v in ckpt.__dict__.items() if k != "path"}
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    pt = ckpt_dir / f"{_stem(ckpt.step)}.pt"
    _atomic_write(pt, data)
    manifest = ckpt.manifest() | {"file": pt.name, "sha256": hashlib.sha256(data).hexdigest(),
                                  "size": len(data)}
    _atomic_write(pt.with_suffix(".json"), json.dumps(manifest, indent=2).encode())
    ckpt.path = pt
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        for p in (old, old.with_suffix(".json")):
            p.unlink(missing_ok=True)
    return pt


WANTED = "export-wanted"


def want_checkpoint(ckpt_dir: Path) -> None:
    """Ask the trainer for a checkpoint of its newest weights (idempotent)."""
    flag = Path(ckpt_dir) / WANTED
    if not flag.exists():
        flag.parent.mkdir(parents=True, exist_ok=True)
        flag.touch()


def take_checkpoint_request(ckpt_dir: Path) -> bool:
    """True once per request: the flag is removed BEFORE the checkpoint is written, so a request
    made while it is being written stays for the next one instead of being lost."""
    try:
        (Path(ckpt_dir) / WANTED).unlink()
        return True
    except FileNotFoundError:
        return False


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The .pt files that have a manifest, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.with_suffix(".pt") for p in ckpt_dir.glob("ckpt-*.json"))


def read_manifest(pt: Path) -> dict[str, Any]:
    return json.loads(Path(pt).with_suffix(".json").read_text())


def load(pt: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load and verify one checkpoint; raises CorruptCheckpoint when it is not intact."""
    pt = Path(pt)
    try:
        manifest = read_manifest(pt)
        data = pt.read_bytes()
    except (OSError, ValueError) as exc:
        raise CorruptCheckpoint(f"{pt}: unreadable ({exc})") from exc
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != manifest.get("size") or digest != manifest.get("sha256"):
        raise CorruptCheckpoint(f"{pt}: sha256/size mismatch (truncated or corrupt)")
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means corrupt
        raise CorruptCheckpoint(f"{pt}: cannot be loaded ({exc})") from exc
    return Checkpoint(**payload, path=pt)


def latest(ckpt_dir: Path, map_location: str | torch.device = "cpu") -> Checkpoint | None:
    """The newest intact checkpoint, skipping corrupt ones with a warning; None if there is none."""
    for pt in reversed(list_checkpoints(ckpt_dir)):
        try:
            return load(pt, map_location)
        except CorruptCheckpoint as exc:
            log.warning("skipping checkpoint: %s", exc)
    return None


def build_model(ckpt: Checkpoint):
    """The OneRanker described by ``ckpt``, with its weights, in eval mode."""
    from trainer.model.config import OneRankerConfig
    from trainer.model.oneranker import OneRanker

    model = OneRanker(OneRankerConfig.from_dict(ckpt.model_config))
    model.load_state_dict(ckpt.model_state)
    return model.eval()
