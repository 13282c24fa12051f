"""Checkpoints are atomic, verified and pruned; a corrupt one is skipped, never loaded."""

import torch

from trainer import checkpoint as ck


def make(step):
    return ck.Checkpoint(step=step, model_config={"d": 4}, model_state={"w": torch.full((3,), float(step))},
                         item_ids={"a": 2}, user_ids={"u": 2}, offsets={"oneranker.samples:0": step * 10},
                         trained_through_ts=1000 + step)


def test_save_load_roundtrip_and_retention(tmp_path):
    for step in (1, 2, 3, 4):
        ck.save(tmp_path, make(step), keep=2)
    paths = ck.list_checkpoints(tmp_path)
    assert [p.name for p in paths] == ["ckpt-000000000003.pt", "ckpt-000000000004.pt"]
    got = ck.latest(tmp_path)
    assert got.step == 4 and got.offsets == {"oneranker.samples:0": 40}
    assert torch.equal(got.model_state["w"], torch.full((3,), 4.0))
    assert ck.read_manifest(got.path)["trained_through_ts"] == 1004
    assert not list(tmp_path.glob("*.tmp"))


def test_truncated_newest_is_skipped(tmp_path, caplog):
    ck.save(tmp_path, make(1))
    newest = ck.save(tmp_path, make(2))
    newest.write_bytes(newest.read_bytes()[:-7])
    got = ck.latest(tmp_path)
    assert got.step == 1
    assert "skipping checkpoint" in caplog.text


def test_checkpoint_without_manifest_does_not_exist(tmp_path):
    ck.save(tmp_path, make(1))
    (tmp_path / "ckpt-000000000009.pt").write_bytes(b"half-written")
    assert ck.latest(tmp_path).step == 1
    assert ck.latest(tmp_path / "missing") is None
