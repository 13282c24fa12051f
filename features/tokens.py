"""THE token builder: events → a user's token sequence → index arrays for the model.

Streaming (which writes sequences to Feast and into samples), the trainer and serving all use this
module, so the sequence a model is trained on is built exactly like the one it is served.

A token is one (ad_id, action, ts) triple: an item-with-action token in the paper's terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Iterable, Mapping

from oneranker import config


class Action(IntEnum):
    PAD = 0
    IMPRESSION = 1
    CLICK = 2
    CONVERSION = 3


ACTION_OF_EVENT = {
    "impression": Action.IMPRESSION,
    "click": Action.CLICK,
    "conversion": Action.CONVERSION,
}


@dataclass
class TokenSequence:
    """A user's last ``max_len`` tokens in event-time order (oldest first).

    Columns are parallel lists so the sequence maps 1:1 onto the Feast arrays
    ``item_ids`` / ``actions`` / ``event_times``.
    """

    item_ids: list[str] = field(default_factory=list)
    actions: list[int] = field(default_factory=list)
    event_times: list[int] = field(default_factory=list)
    max_len: int = config.DEFAULT_HISTORY_LEN

    def __len__(self) -> int:
        return len(self.item_ids)

    def append(self, ad_id: str, action: int, ts: int) -> None:
        """Add one token, keeping event-time order even when events arrive slightly out of order."""
        i = len(self.event_times)
        while i > 0 and self.event_times[i - 1] > ts:
            i -= 1
        self.item_ids.insert(i, ad_id)
        self.actions.insert(i, int(action))
        self.event_times.insert(i, int(ts))
        if len(self.item_ids) > self.max_len:
            drop = len(self.item_ids) - self.max_len
            del self.item_ids[:drop], self.actions[:drop], self.event_times[:drop]

    def add_event(self, event_type: str, data: Mapping[str, Any]) -> None:
        self.append(data["ad_id"], ACTION_OF_EVENT[event_type], data["ts"])

    def as_of(self, ts: int) -> "TokenSequence":
        """The tokens strictly before event time ``ts`` (a request's history, never after it)."""
        n = len(self.event_times)
        while n > 0 and self.event_times[n - 1] >= ts:
            n -= 1
        return TokenSequence(self.item_ids[:n], self.actions[:n], self.event_times[:n], self.max_len)

    def last(self, n: int) -> "TokenSequence":
        return TokenSequence(self.item_ids[-n:] if n else [], self.actions[-n:] if n else [],
                             self.event_times[-n:] if n else [], self.max_len)

    def to_dict(self) -> dict[str, list]:
        return {"item_ids": list(self.item_ids), "actions": list(self.actions),
                "event_times": list(self.event_times)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, max_len: int = config.DEFAULT_HISTORY_LEN) -> "TokenSequence":
        if not d:
            return cls(max_len=max_len)
        seq = cls([str(x) for x in d.get("item_ids") or []], [int(x) for x in d.get("actions") or []],
                  [int(x) for x in d.get("event_times") or []], max_len)
        if not (len(seq.item_ids) == len(seq.actions) == len(seq.event_times)):
            raise ValueError("token sequence columns have different lengths")
        return seq.last(max_len)

    @classmethod
    def from_events(cls, events: Iterable[tuple[str, Mapping[str, Any]]],
                    max_len: int = config.DEFAULT_HISTORY_LEN) -> "TokenSequence":
        seq = cls(max_len=max_len)
        for event_type, data in events:
            seq.add_event(event_type, data)
        return seq
