"""The snapshot store: atomic versions, checksums, the CURRENT pointer, retention (no ONNX needed)."""

import json

import pytest

from exporter.store import SnapshotError, SnapshotStore


def _files(d, tag="x"):
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.onnx").write_bytes(b"onnx-" + tag.encode() * 100)
    (d / "model.onnx.data").write_bytes(b"weights-" + tag.encode())
    (d / "items.json").write_text(json.dumps({"a0": 2}))
    (d / "users.json").write_text(json.dumps({"u0": 2}))
    return d


def test_publish_fetch_verify_and_pointer(tmp_path):
    store = SnapshotStore(str(tmp_path / "store"))
    assert store.url.startswith("file://") and store.versions() == [] and store.current() is None
    docs = [store.publish(_files(tmp_path / f"s{i}", str(i)), {"checkpoint_step": i}) for i in range(3)]
    assert [d["version"] for d in docs] == [1, 2, 3] == store.versions()
    m = store.manifest(2)
    assert set(m["files"]) == {"model.onnx", "model.onnx.data", "items.json", "users.json"}  # side file too
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    got = store.fetch(2, tmp_path / "dl")
    assert got["checkpoint_step"] == 1 and (tmp_path / "dl" / "model.onnx.data").read_bytes() == b"weights-1"
    # no temp directories or temp pointer files are left behind
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["LATEST", "v00000001", "v00000002", "v00000003"]

    p1 = store.set_current(3)
    p2 = store.set_current(1, "rollback")
    assert (p1["epoch"], p2["epoch"]) == (1, 2) and store.current()["action"] == "rollback"
    assert store.current()["previous"] == 3
    with pytest.raises(SnapshotError):
        store.set_current(9)


def test_checksum_mismatch_and_missing_files_are_refused(tmp_path):
    store = SnapshotStore(str(tmp_path / "store"))
    store.publish(_files(tmp_path / "s"), {})
    victim = tmp_path / "store" / "v00000001" / "model.onnx.data"
    victim.write_bytes(b"tampered")
    with pytest.raises(SnapshotError) as e:
        store.fetch(1, tmp_path / "dl")
    assert e.value.reason == "checksum" and "model.onnx.data" in str(e.value)
    with pytest.raises(SnapshotError) as e:
        store.fetch(7, tmp_path / "dl2")
    assert e.value.reason == "missing"
    (tmp_path / "s" / "users.json").unlink()
    with pytest.raises(SnapshotError):
        store.publish(tmp_path / "s", {})  # a snapshot needs model, items and users


def test_incomplete_snapshot_is_invisible_and_versions_are_never_reused(tmp_path):
    store = SnapshotStore(str(tmp_path / "store"))
    store.publish(_files(tmp_path / "s"), {})
    (tmp_path / "store" / "v00000002").mkdir()  # a crashed writer on an object store: no manifest
    assert store.versions() == [1]
    for i in range(4):
        store.publish(_files(tmp_path / f"t{i}", str(i)), {})
    store.set_current(3)
    removed = store.retain(2)
    assert removed == [1, 4] and store.versions() == [3, 5, 6]  # current 3 survives retention
    store.retain(1)
    assert store.versions() == [3, 6]
    assert store.publish(_files(tmp_path / "u"), {})["version"] == 7  # LATEST keeps the counter


def test_object_store_path_without_rename(tmp_path):
    """A non-local fsspec URL (memory://, standing in for s3://) takes the no-rename path:
    files first, manifest last, pointer as one object."""
    store = SnapshotStore("memory://oneranker-test-store")
    assert not store.local
    for i in range(3):
        store.publish(_files(tmp_path / f"s{i}", str(i)), {"checkpoint_step": i})
    store.fs.mkdir(store._p("v00000004"))  # an upload that never wrote its manifest
    store.fs.pipe_file(store._p("v00000004", "model.onnx"), b"partial")
    assert store.versions() == [1, 2, 3]
    store.set_current(2)
    assert store.fetch(2, tmp_path / "dl")["checkpoint_step"] == 1
    assert store.publish(_files(tmp_path / "s9", "9"), {})["version"] == 5
    assert store.retain(2) == [1] and store.versions() == [2, 3, 5]  # newest two + current
    store.fs.rm(store.root, recursive=True)
