"""The learned-log (test mode): which samples the durable model has learned.

It is written from checkpoints: after each checkpoint the trainer appends the ids learned since the
previous one, tagged with the checkpoint step (``append_learned``), and on resume it completes a
tail that a crash between checkpoint and append left missing (``reconcile_learned``) — so the log
lists exactly the samples the durable model has learned. The crash test reads it (``read_learned``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from trainer import checkpoint as ckpt_mod


def append_learned(path: Path, step: int, ids: Iterable[str]) -> None:
    lines = "".join(f"{step}\t{i}\n" for i in ids)
    with open(path, "a") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())


def read_learned(path: Path) -> list[tuple[int, str]]:
    """(checkpoint step, sample id) lines; a torn last line (no newline: killed mid-append) is ignored."""
    if not Path(path).exists():
        return []
    text = Path(path).read_text()
    lines = text.split("\n")[:-1]  # the part after the last newline is torn or empty
    out = []
    for line in lines:
        if "\t" in line:
            st, i = line.split("\t", 1)
            out.append((int(st), i))
    return out


def reconcile_learned(path: Path, ck: ckpt_mod.Checkpoint | None) -> None:
    """Make the log equal to what checkpoint ``ck`` holds: the lines of earlier checkpoints (each
    complete, since the next checkpoint is written only after the append), then exactly ``ck``'s
    ids — dropping a torn or partial append and lines of checkpoints that did not survive."""
    path = Path(path)
    rows = read_learned(path)
    step = ck.step if ck is not None else -1
    keep = [(s, i) for s, i in rows if s < step]
    if ck is not None:
        keep += [(step, i) for i in (ck.extra or {}).get("learned_ids", [])]
    text = "".join(f"{s}\t{i}\n" for s, i in keep)
    if not path.exists() or path.read_text() != text:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
