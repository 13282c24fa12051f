"""Feast configuration (features/store.py): where the registry/online store live, Redis by URL."""

from __future__ import annotations

import yaml

from features.store import online_store_config, write_effective_yaml


def test_sqlite_under_home_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv("ONERANKER_FEAST_ONLINE", raising=False)
    assert online_store_config(tmp_path) == {"type": "sqlite", "path": str(tmp_path / "feast" / "online.db")}
    doc = yaml.safe_load(write_effective_yaml(tmp_path).read_text())
    assert doc["registry"] == str(tmp_path / "feast" / "registry.db")
    assert doc["offline_store"] == {"type": "file"} and doc["project"] == "oneranker"


def test_redis_and_explicit_sqlite_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("ONERANKER_FEAST_ONLINE", "redis://cache:6379/2")
    assert online_store_config(tmp_path) == {"type": "redis", "connection_string": "cache:6379,db=2"}
    assert online_store_config(tmp_path, "redis://r:6380") == {"type": "redis", "connection_string": "r:6380"}
    assert online_store_config(tmp_path, "/x/online.db") == {"type": "sqlite", "path": "/x/online.db"}
