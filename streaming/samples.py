"""The training-sample contract: what the streaming worker writes to ``oneranker.samples`` and the
trainer reads. One place defines it; both sides use ``Sample.to_json`` / ``Sample.from_json``.

Wire format (Kafka key = user_id as UTF-8; value = one JSON object, UTF-8, compact, sorted keys)::

    {
      "schema_version": 1,
      "sample_id":  "3f1c…" ,   # deterministic: sha256(user_id + "\\x1f" + request_id)[:32];
                                 # at-least-once delivery may repeat a sample, never with another id
      "user_id":    "u42",
      "request_id": "r0-17",
      "ts":         1764000000000,   # event time (ms) of the request (its first impression)
      "history": {                    # the user's tokens strictly BEFORE ts (features.tokens),
        "item_ids":    ["s12", …],    # oldest first, at most history_len (default 200);
        "actions":     [2, 3, …],     # Action codes: 1 impression, 2 click, 3 conversion
        "event_times": [1763…, …]     # ms
      },
      "ads": [                        # the exposed ads, ordered by position (1 = top)
        {"position": 1, "ad_id": "s7", "bid": 0.93,
         "click": 1, "conversion": 1, "value": 41.5},   # labels inside the windows; value = sum of
        …                                               # conversion values (GMV) for that ad
      ],
      "context": {"device": "ios", "hour": 13},         # from the first impression ({} if none)
      "late_labels": 0,     # clicks/conversions for this request that came after their window
      "closed_at": 1764086400000   # the watermark (ms) that closed the request's window
    }

A click counts when ``click.ts - ts <= click_window_ms``, a conversion when
``conversion.ts - ts <= conversion_window_ms``; a request closes (and its sample is emitted once)
when the event-time watermark passes ``ts + max(click_window_ms, conversion_window_ms)``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from features.tokens import TokenSequence
from oneranker import config

SAMPLE_SCHEMA_VERSION = 1


def sample_id(user_id: str, request_id: str) -> str:
    """Deterministic id of a request's sample (the same on every replay and every re-delivery)."""
    return hashlib.sha256(f"{user_id}\x1f{request_id}".encode()).hexdigest()[:32]


@dataclass
class SampleAd:
    position: int
    ad_id: str
    bid: float
    click: int = 0
    conversion: int = 0
    value: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"position": self.position, "ad_id": self.ad_id, "bid": self.bid, "click": self.click,
                "conversion": self.conversion, "value": self.value}


@dataclass
class Sample:
    sample_id: str
    user_id: str
    request_id: str
    ts: int
    history: dict[str, list] = field(default_factory=lambda: TokenSequence().to_dict())
    ads: list[SampleAd] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)
    late_labels: int = 0
    closed_at: int = 0
    schema_version: int = SAMPLE_SCHEMA_VERSION

    def history_sequence(self, max_len: int = config.DEFAULT_HISTORY_LEN) -> TokenSequence:
        return TokenSequence.from_dict(self.history, max_len=max_len)

    def to_dict(self) -> dict[str, Any]:
        # by hand: dataclasses.asdict deep-copies recursively and was the worker's top cost per sample
        return {"sample_id": self.sample_id, "user_id": self.user_id, "request_id": self.request_id,
                "ts": self.ts, "history": {k: list(v) for k, v in self.history.items()},
                "ads": [a.to_dict() for a in self.ads], "context": dict(self.context),
                "late_labels": self.late_labels, "closed_at": self.closed_at,
                "schema_version": self.schema_version}

    def to_json(self) -> bytes:
        from streaming.events import dumps

        return dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Sample":
        if d.get("schema_version", SAMPLE_SCHEMA_VERSION) != SAMPLE_SCHEMA_VERSION:
            raise ValueError(f"unsupported sample schema_version {d.get('schema_version')!r}")
        ads = [SampleAd(**a) for a in d.get("ads", [])]
        return cls(**{**d, "ads": ads})

    @classmethod
    def from_json(cls, raw: bytes | str) -> "Sample":
        return cls.from_dict(json.loads(raw))
