"""The snapshot store: versioned snapshot directories and a "current" pointer, addressed by URL.

Layout under the store URL (a local directory by default; any fsspec URL, e.g. ``s3://bucket/x``)::

    v00000007/            one snapshot: model.onnx (+ model.onnx.data if any), items.json,
                          users.json, manifest.json (written LAST; a directory without it does not exist)
    CURRENT               {"version", "url", "epoch", "action", "updated"}: what replicas should serve;
                          ``epoch`` grows by one on every write, ``action`` is publish|promote|rollback
    LATEST                {"version"}: the highest version ever published (versions are never reused,
                          even after retention removed them)

Local stores write a snapshot to a hidden temp directory and rename it into place, and write the
pointer files to a temp name and rename them, so a reader never sees half a snapshot or half a
pointer. Object stores have no rename: files are uploaded into the final prefix with the manifest
last, and single-object PUTs of the pointer files are atomic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CURRENT = "CURRENT"
LATEST = "LATEST"
REQUIRED_FILES = ("model.onnx", "items.json", "users.json")
_VERSION_DIR = re.compile(r"^v(\d{8})$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SnapshotError(Exception):
    """A snapshot that must not be served: missing, incomplete, or failing its checksums."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_snapshot(dest: Path, manifest: dict, files: dict[str, bytes]) -> None:
    """A snapshot's (verified) files and its manifest into the local directory ``dest``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (dest / name).write_bytes(data)
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def version_name(version: int) -> str:
    return f"v{version:08d}"


class SnapshotStore:
    def __init__(self, url: str):
        import fsspec

        self.url = str(url).rstrip("/")
        if "://" not in self.url:
            self.url = Path(self.url).resolve().as_uri()
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.local = "file" in protocols or "local" in protocols
        if self.local:
            self.fs.makedirs(self.root, exist_ok=True)

    # --- paths ---------------------------------------------------------------------------
    def _p(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def version_url(self, version: int) -> str:
        return f"{self.url}/{version_name(version)}"

    # --- small JSON objects ----------------------------------------------------------------
    def _read_json(self, *parts: str) -> Any | None:
        try:
            return json.loads(self.fs.cat_file(self._p(*parts)))
        except FileNotFoundError:
            return None

    def _write_json(self, name: str, doc: Any) -> None:
        data = json.dumps(doc, indent=2, sort_keys=True).encode()
        if self.local:
            tmp = self._p(f".{name}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._p(name))
        else:
            self.fs.pipe_file(self._p(name), data)

    # --- reading -------------------------------------------------------------------------
    def _version_dirs(self) -> list[int]:
        """Every vNNNNNNNN entry, complete or not (an interrupted upload still uses its number)."""
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for e in entries:
            m = _VERSION_DIR.match(e.rstrip("/").rsplit("/", 1)[-1])
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def versions(self) -> list[int]:
        """Complete snapshots (with a manifest), oldest first."""
        return [v for v in self._version_dirs() if self.fs.exists(self._p(version_name(v), MANIFEST))]

    def manifest(self, version: int) -> dict:
        doc = self._read_json(version_name(version), MANIFEST)
        if doc is None:
            raise SnapshotError(f"snapshot {version} not found in {self.url}", "missing")
        return doc

    def current(self) -> dict | None:
        return self._read_json(CURRENT)

    def latest_version(self) -> int:
        doc = self._read_json(LATEST) or {}
        return max([int(doc.get("version", 0)), *self._version_dirs()])

    def read(self, version: int) -> tuple[dict, dict[str, bytes]]:
        """Snapshot ``version``'s manifest and files, in memory, each file's size and sha256
        verified; raises SnapshotError when the snapshot is not intact. (A replica builds its
        session from these bytes: no second copy on local disk, read back again.)"""
        m = self.manifest(version)
        if int(m.get("version", -1)) != version:
            raise SnapshotError(f"snapshot {version}: manifest names version {m.get('version')}", "manifest")
        files = m.get("files") or {}
        missing = [f for f in REQUIRED_FILES if f not in files]
        if missing:
            raise SnapshotError(f"snapshot {version}: manifest lacks {missing}", "manifest")
        out = {}
        for name, meta in files.items():
            if not _SAFE_NAME.match(name) or name == MANIFEST:
                raise SnapshotError(f"snapshot {version}: bad file name {name!r}", "manifest")
            try:
                data = self.fs.cat_file(self._p(version_name(version), name))
            except FileNotFoundError:
                raise SnapshotError(f"snapshot {version}: {name} missing", "missing") from None
            digest = hashlib.sha256(data).hexdigest()
            if len(data) != meta.get("size") or digest != meta.get("sha256"):
                raise SnapshotError(f"snapshot {version}: {name} fails its checksum "
                                    f"(sha256 {digest[:12]}…, manifest {str(meta.get('sha256'))[:12]}…)",
                                    "checksum")
            out[name] = data
        return m, out

    def fetch(self, version: int, dest: Path) -> dict:
        """Download snapshot ``version`` into ``dest`` (``read``: every file verified first).
        Returns the manifest; raises SnapshotError when the snapshot is not intact."""
        m, files = self.read(version)
        write_snapshot(dest, m, files)
        return m

    # --- writing -------------------------------------------------------------------------
    def publish(self, src_dir: Path, manifest: dict) -> dict:
        """Publish the files of ``src_dir`` as the next version; returns the manifest written
        (with version, created and files {name: {sha256, size}} filled in)."""
        src_dir = Path(src_dir)
        names = sorted(p.name for p in src_dir.iterdir() if p.is_file() and p.name != MANIFEST)
        for req in REQUIRED_FILES:
            if req not in names:
                raise SnapshotError(f"cannot publish without {req}", "manifest")
        version = self.latest_version() + 1
        files = {n: {"sha256": sha256_file(src_dir / n), "size": (src_dir / n).stat().st_size} for n in names}
        # created: when the export began; published: when it became visible (freshness stages)
        now = time.time()
        doc = {**manifest, "version": version, "created": manifest.get("created", now),
               "published": now, "files": files}
        data = json.dumps(doc, indent=2, sort_keys=True).encode()
        final = self._p(version_name(version))
        if self.local:
            tmp = self._p(f".tmp-{version_name(version)}-{uuid.uuid4().hex[:8]}")
            os.makedirs(tmp)
            for n in names:
                self.fs.put_file(str(src_dir / n), f"{tmp}/{n}")
            with open(f"{tmp}/{MANIFEST}", "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, final)  # atomic: the snapshot appears complete or not at all
        else:
            for n in names:
                self.fs.put_file(str(src_dir / n), f"{final}/{n}")
            self.fs.pipe_file(f"{final}/{MANIFEST}", data)  # last: readers need the manifest
        self._write_json(LATEST, {"version": version})
        log.info("published snapshot %d to %s", version, self.version_url(version))
        return doc

    def set_current(self, version: int, action: str = "publish") -> dict:
        """Point replicas at ``version`` (which must exist). ``action`` promote/rollback lets
        replicas go to a lower version; publish only ever moves them forward."""
        self.manifest(version)  # must exist
        old = self.current() or {}
        doc = {"version": version, "url": self.version_url(version), "epoch": int(old.get("epoch", 0)) + 1,
               "action": action, "updated": time.time(), "previous": old.get("version")}
        self._write_json(CURRENT, doc)
        return doc

    def retain(self, keep: int) -> list[int]:
        """Remove all but the newest ``keep`` snapshots (never the current one); returns removed."""
        if keep <= 0:
            return []
        cur = (self.current() or {}).get("version")
        versions = self.versions()
        removed = []
        for v in versions[:-keep]:
            if v == cur:
                continue
            path = self._p(version_name(v))
            if self.local:  # hide it first (rename is atomic) so no reader sees a half-deleted one
                trash = self._p(f".del-{version_name(v)}-{uuid.uuid4().hex[:8]}")
                os.rename(path, trash)
                path = trash
            self.fs.rm(path, recursive=True)
            removed.append(v)
        return removed
