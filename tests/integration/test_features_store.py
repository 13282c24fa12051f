"""The Feast repo for real: apply + ad catalog materialization, batched user pushes, reads."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from features.store import FeatureStoreClient, UserRow, apply, open_store
from features.tokens import TokenSequence


def test_apply_materializes_the_catalog_and_round_trips_users(tmp_path):
    catalog = tmp_path / "ad_catalog.parquet"
    pq.write_table(pa.table({"ad_id": ["a1", "a2"], "advertiser_id": [7, 8], "category": [1, 2],
                             "bid": [0.5, 1.25], "price": [10.0, 20.0]}), catalog)
    result = apply(home=tmp_path, catalog=catalog)
    assert result.ads_materialized == 2
    assert {"user", "ad", "user_sequence", "user_profile", "ad_profile", "user_push"} <= set(result.objects)
    assert result.yaml.parent == tmp_path / "feast"  # registry and online db live under the home

    client = FeatureStoreClient(open_store(home=tmp_path), history_len=3)
    assert client.get_ads(["a2", "nope"]) == {
        "a2": {"bid": 1.25, "advertiser_id": 8, "category": 2, "price": 20.0}, "nope": None}

    seq = TokenSequence(max_len=3)
    for i in range(5):
        seq.append(f"a{i}", 2 + i % 2, 1000 + i)
    rows = [UserRow("u1", seq, {"request_count": 4, "click_count": 3, "conversion_count": 2,
                                "total_value": 12.5, "last_event_ts": 1004}),
            UserRow("u2", TokenSequence(), {})]
    assert client.push_users(rows) == 2
    got = client.get_user_sequences(["u1", "u2", "u3"])
    assert got["u1"].to_dict() == {"item_ids": ["a2", "a3", "a4"], "actions": [2, 3, 2],
                                   "event_times": [1002, 1003, 1004]}
    assert len(got["u2"]) == 0 and len(got["u3"]) == 0
    assert client.get_user_profiles(["u1", "u3"]) == {
        "u1": {"request_count": 4, "click_count": 3, "conversion_count": 2, "total_value": 12.5,
               "last_event_ts": 1004}, "u3": None}
    # a later push replaces the sequence (upsert of the latest state)
    seq.append("a9", 3, 2000)
    client.push_users([UserRow("u1", seq, {})])
    assert client.get_user_sequences(["u1"])["u1"].item_ids == ["a3", "a4", "a9"]


def test_cli_apply_from_another_directory(tmp_path):
    env = {**os.environ, "ONERANKER_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-m", "oneranker.cli", "features", "apply"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "home" / "feast" / "registry.db").exists()
    assert "user_sequence" in out.stdout
