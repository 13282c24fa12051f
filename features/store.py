"""Feast access for the streaming worker (writes) and serving (reads).

Configuration (environment; nothing lands inside the git tree by default):

* ``ONERANKER_HOME`` — registry ``$ONERANKER_HOME/feast/registry.db``, SQLite online store
  ``$ONERANKER_HOME/feast/online.db``, push-source offline files.
* ``ONERANKER_FEAST_ONLINE`` — ``sqlite`` (default), a SQLite file path, or ``redis://host:port[/db]``
  (needs the ``redis`` Python package) for concurrent writers.
* ``ONERANKER_AD_CATALOG`` — the ad catalog parquet (default ``$ONERANKER_HOME/ad_catalog.parquet``).
* ``ONERANKER_FEATURE_REPO`` — the Feast repo folder (default ``features/repo``).

The effective ``feature_store.yaml`` is generated at ``$ONERANKER_HOME/feast/feature_store.yaml`` so
``feast -f <that file> ...`` (run inside ``features/repo``) talks to the same store.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from features.tokens import TokenSequence
from oneranker import config

log = logging.getLogger(__name__)

PROJECT = "oneranker"
USER_PUSH_SOURCE = "user_push"
SEQUENCE_FEATURES = ("item_ids", "actions", "event_times")
PROFILE_FEATURES = ("request_count", "click_count", "conversion_count", "total_value", "last_event_ts")
AD_FEATURES = ("bid", "advertiser_id", "category", "price")


def feast_dir(home: Path | None = None) -> Path:
    return (home or config.settings().home) / "feast"


def ad_catalog_path() -> Path:
    value = os.environ.get("ONERANKER_AD_CATALOG")
    return Path(value) if value else config.settings().home / "ad_catalog.parquet"


def ad_profile_path(home: Path | None = None) -> Path:
    value = os.environ.get("ONERANKER_AD_PROFILE")
    return Path(value) if value else feast_dir(home) / "ad_profile.parquet"


def online_store_config(home: Path | None = None, online: str | None = None) -> dict[str, Any]:
    """The online store section: SQLite under $ONERANKER_HOME by default, Redis by URL."""
    online = online if online is not None else os.environ.get("ONERANKER_FEAST_ONLINE", "")
    if online.startswith("redis://"):
        rest = online[len("redis://"):]
        hostport, _, db = rest.partition("/")
        conn = hostport + (f",db={db}" if db else "")
        return {"type": "redis", "connection_string": conn}
    path = online if online not in ("", "sqlite") else str(feast_dir(home) / "online.db")
    return {"type": "sqlite", "path": path}


def write_effective_yaml(home: Path | None = None, online: str | None = None) -> Path:
    """Write $ONERANKER_HOME/feast/feature_store.yaml for the configured store; return its path."""
    import yaml

    d = feast_dir(home)
    d.mkdir(parents=True, exist_ok=True)
    doc = {
        "project": PROJECT,
        "provider": "local",
        "registry": str(d / "registry.db"),
        "online_store": online_store_config(home, online),
        "offline_store": {"type": "file"},
        "entity_key_serialization_version": 3,
    }
    path = d / "feature_store.yaml"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, path)
    return path


def open_store(home: Path | None = None, online: str | None = None):
    """A FeatureStore on the configured registry/online store (works from any cwd)."""
    from feast import FeatureStore

    yaml_path = write_effective_yaml(home, online)
    return FeatureStore(repo_path=str(config.settings().feature_repo), fs_yaml_file=yaml_path)


def _definitions(home: Path | None = None):
    """Import features/repo/definitions.py fresh (its paths depend on the environment)."""
    path = config.settings().feature_repo / "definitions.py"
    env_home = os.environ.get("ONERANKER_HOME")
    if home is not None:
        os.environ["ONERANKER_HOME"] = str(home)
    try:
        spec = importlib.util.spec_from_file_location("_oneranker_feature_definitions", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if home is not None:
            if env_home is None:
                os.environ.pop("ONERANKER_HOME", None)
            else:
                os.environ["ONERANKER_HOME"] = env_home
    return module


def prepare_ad_profile(catalog: Path | None = None, home: Path | None = None) -> Path | None:
    """Copy the ad catalog into a Feast-ready parquet (adds ``event_timestamp``); None if absent."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = catalog or ad_catalog_path()
    if not src.exists():
        return None
    table = pq.read_table(src, use_threads=False)
    stamp = datetime.fromtimestamp(src.stat().st_mtime, tz=timezone.utc)
    table = table.append_column("event_timestamp",
                                pa.array([stamp] * table.num_rows, pa.timestamp("us", tz="UTC")))
    dst = ad_profile_path(home)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp.parquet")
    pq.write_table(table, tmp)
    os.replace(tmp, dst)
    return dst


@dataclass
class ApplyResult:
    yaml: Path
    online_store: dict
    objects: list[str]
    ads_materialized: int


def apply(home: Path | None = None, online: str | None = None, catalog: Path | None = None) -> ApplyResult:
    """``feast apply`` for the configured store, then materialize the ad catalog if there is one."""
    from feast import Entity, FeatureView, PushSource

    ads = prepare_ad_profile(catalog, home)
    store = open_store(home, online)
    defs = _definitions(home)
    objects = [v for v in vars(defs).values() if isinstance(v, (Entity, FeatureView, PushSource))]
    store.apply(objects)
    n_ads = 0
    if ads is not None:
        import pyarrow.parquet as pq

        n_ads = pq.read_metadata(ads).num_rows
        now = datetime.now(timezone.utc)
        store.materialize(now - timedelta(days=3650), now + timedelta(minutes=1), feature_views=["ad_profile"])
    return ApplyResult(write_effective_yaml(home, online), online_store_config(home, online),
                       sorted(o.name for o in objects), n_ads)


@dataclass
class UserRow:
    """What the streaming worker pushes for one user: its last N tokens and its profile."""

    user_id: str
    sequence: TokenSequence
    profile: Mapping[str, Any]


class FeatureStoreClient:
    """Batched writes of user sequences/profiles and reads of users and ads.

    Blocking (Feast is synchronous): the worker calls ``push_users`` from a thread.
    """

    def __init__(self, store=None, history_len: int = config.DEFAULT_HISTORY_LEN):
        self.store = store if store is not None else open_store()
        self.history_len = history_len

    def push_users(self, rows: Sequence[UserRow]) -> int:
        """Upsert the given users' sequences and profiles in one push; returns rows written."""
        if not rows:
            return 0
        import pandas as pd

        from feast.data_source import PushMode

        now = pd.Timestamp.now(tz="UTC")
        cols: dict[str, list] = {"user_id": [], "event_timestamp": []}
        for name in SEQUENCE_FEATURES + PROFILE_FEATURES:
            cols[name] = []
        for row in rows:
            seq = row.sequence.last(self.history_len)
            cols["user_id"].append(row.user_id)
            cols["event_timestamp"].append(now)
            cols["item_ids"].append(list(seq.item_ids))
            cols["actions"].append([int(a) for a in seq.actions])
            cols["event_times"].append([int(t) for t in seq.event_times])
            for name in PROFILE_FEATURES:
                default = 0.0 if name == "total_value" else 0
                cols[name].append(type(default)(row.profile.get(name, default)))
        self.store.push(USER_PUSH_SOURCE, pd.DataFrame(cols), to=PushMode.ONLINE)
        return len(rows)

    def _online(self, features: Iterable[str], key: str, ids: Sequence[str]) -> dict[str, list]:
        return self.store.get_online_features(
            features=list(features), entity_rows=[{key: i} for i in ids]).to_dict()

    def get_user_sequences(self, user_ids: Sequence[str]) -> dict[str, TokenSequence]:
        """The stored sequence per user; users never pushed get an empty sequence."""
        ids = list(user_ids)
        if not ids:
            return {}
        d = self._online([f"user_sequence:{f}" for f in SEQUENCE_FEATURES], "user_id", ids)
        out = {}
        for i, uid in enumerate(ids):
            out[uid] = TokenSequence.from_dict(
                {f: d[f][i] or [] for f in SEQUENCE_FEATURES}, max_len=self.history_len)
        return out

    def get_user_profiles(self, user_ids: Sequence[str]) -> dict[str, dict | None]:
        ids = list(user_ids)
        if not ids:
            return {}
        d = self._online([f"user_profile:{f}" for f in PROFILE_FEATURES], "user_id", ids)
        return {uid: (None if all(d[f][i] is None for f in PROFILE_FEATURES)
                      else {f: d[f][i] for f in PROFILE_FEATURES}) for i, uid in enumerate(ids)}

    def get_ads(self, ad_ids: Sequence[str]) -> dict[str, dict | None]:
        """Ad profiles (bid, advertiser_id, category, price); None for unknown ads."""
        ids = list(ad_ids)
        if not ids:
            return {}
        d = self._online([f"ad_profile:{f}" for f in AD_FEATURES], "ad_id", ids)
        return {aid: (None if all(d[f][i] is None for f in AD_FEATURES)
                      else {f: d[f][i] for f in AD_FEATURES}) for i, aid in enumerate(ids)}


def timed_push(client: FeatureStoreClient, rows: Sequence[UserRow]) -> tuple[int, float]:
    t = time.perf_counter()
    n = client.push_users(rows)
    return n, time.perf_counter() - t
