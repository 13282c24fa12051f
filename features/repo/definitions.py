"""OneRanker feature definitions (entities, sources, views). Definitions only: `feast apply` imports
every .py file in this folder. Paths come from environment variables so the repo works from any cwd:

* ``ONERANKER_HOME`` (default ``.oneranker``): offline files for the push sources live in
  ``$ONERANKER_HOME/feast/``.
* ``ONERANKER_AD_PROFILE`` (default ``$ONERANKER_HOME/feast/ad_profile.parquet``): the Feast-ready
  copy of the ad catalog (the catalog plus an ``event_timestamp`` column) that
  ``oneranker features apply`` writes from ``$ONERANKER_AD_CATALOG``
  (default ``$ONERANKER_HOME/ad_catalog.parquet``, written by ``oneranker produce``).
"""

import os
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Float64, Int64, String

_HOME = Path(os.environ.get("ONERANKER_HOME") or ".oneranker").resolve()
_FEAST_DIR = _HOME / "feast"
AD_PROFILE_PATH = os.environ.get("ONERANKER_AD_PROFILE") or str(_FEAST_DIR / "ad_profile.parquet")

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING,
              description="An end user (the Kafka key of every event).")
ad = Entity(name="ad", join_keys=["ad_id"], value_type=ValueType.STRING, description="An ad (item).")

# Written by the streaming worker: one push feeds both user views (one row per user per push).
user_push = PushSource(
    name="user_push",
    batch_source=FileSource(name="user_push_offline", path=str(_FEAST_DIR / "user_push.parquet"),
                            timestamp_field="event_timestamp"),
)

user_sequence = FeatureView(
    name="user_sequence",
    entities=[user],
    ttl=timedelta(0),  # never expires: the last N tokens stay valid until replaced
    schema=[
        Field(name="item_ids", dtype=Array(String)),
        Field(name="actions", dtype=Array(Int64)),
        Field(name="event_times", dtype=Array(Int64)),
    ],
    source=user_push,
    online=True,
    description="The user's last N tokens (features.tokens.TokenSequence), oldest first.",
)

user_profile = FeatureView(
    name="user_profile",
    entities=[user],
    ttl=timedelta(0),
    schema=[
        Field(name="request_count", dtype=Int64),
        Field(name="click_count", dtype=Int64),
        Field(name="conversion_count", dtype=Int64),
        Field(name="total_value", dtype=Float64),
        Field(name="last_event_ts", dtype=Int64),
    ],
    source=user_push,
    online=True,
    description="Running counters of the user's requests, clicks, conversions and conversion value.",
)

ad_catalog_source = FileSource(name="ad_catalog", path=AD_PROFILE_PATH, timestamp_field="event_timestamp")

ad_profile = FeatureView(
    name="ad_profile",
    entities=[ad],
    ttl=timedelta(0),
    schema=[
        Field(name="bid", dtype=Float64),
        Field(name="advertiser_id", dtype=Int64),
        Field(name="category", dtype=Int64),
        Field(name="price", dtype=Float64),
    ],
    source=ad_catalog_source,
    online=True,
    description="Static ad profile from the ad catalog.",
)
