"""Dead-letter records: what goes to ``oneranker.dlq`` for an input the worker cannot use.

A dead letter must never fail on the input it reports (a 2 MB event whose original bytes were
forwarded as they are exceeded the producer's request limit, the send failed, the batch was never
acknowledged, and every restart met the same record: a poison pill). So the original value is
carried whole only up to ``config.DLQ_MAX_VALUE_BYTES``; a larger one is cut to its first
``config.DLQ_HEAD_BYTES`` and the headers say so (``truncated``, ``original_size``,
``original_sha256``). Keys get the same treatment above ``config.MAX_KEY_BYTES``.

Headers (all UTF-8): ``reason`` (a code of streaming/events.py), ``field``, ``detail``,
``event_type``, ``source_topic``, ``source_partition``, ``source_offset``; and, when cut,
``truncated`` ("value", "key" or "key,value"), ``original_size``, ``original_sha256`` (of the value),
``original_key_size``, ``original_key_sha256``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from oneranker import config

DETAIL_MAX_CHARS = 500
HEADERS_MAX_BYTES = 8 * 1024  # the fixed headers above, with room to spare

if config.DLQ_MAX_VALUE_BYTES + config.MAX_KEY_BYTES + HEADERS_MAX_BYTES > config.PRODUCER_MAX_REQUEST_BYTES:
    raise ValueError(f"ONERANKER_DLQ_MAX_BYTES={config.DLQ_MAX_VALUE_BYTES} leaves no room under the "
                     f"producer's request limit ({config.PRODUCER_MAX_REQUEST_BYTES} bytes)")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record for the dead-letter topic: key, value and headers as the producer takes them."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    @property
    def size(self) -> int:
        return (len(self.key or b"") + len(self.value or b"")
                + sum(len(k) + len(v) for k, v in self.headers))


def dead_letter(key: bytes | None, value: bytes | None, *, reason: str, detail: str = "",
                field: str | None = None, event_type: str = "", source_topic: str = "",
                source_partition: int = -1, source_offset: int = -1,
                max_value_bytes: int = config.DLQ_MAX_VALUE_BYTES,
                head_bytes: int = config.DLQ_HEAD_BYTES,
                max_key_bytes: int = config.MAX_KEY_BYTES) -> DeadLetter:
    """The dead letter for one input record; its size is bounded whatever the input's."""
    headers = [("reason", reason.encode()), ("field", (field or "").encode()),
               ("detail", detail[:DETAIL_MAX_CHARS].encode("utf-8", "replace")),
               ("event_type", event_type.encode()), ("source_topic", source_topic.encode()),
               ("source_partition", str(source_partition).encode()),
               ("source_offset", str(source_offset).encode())]
    cut = []
    if key is not None and len(key) > max_key_bytes:
        headers += [("original_key_size", str(len(key)).encode()),
                    ("original_key_sha256", hashlib.sha256(key).hexdigest().encode())]
        key = key[:max_key_bytes]
        cut.append("key")
    if value is not None and len(value) > max_value_bytes:
        headers += [("original_size", str(len(value)).encode()),
                    ("original_sha256", hashlib.sha256(value).hexdigest().encode())]
        value = value[:head_bytes]
        cut.append("value")
    if cut:
        headers.append(("truncated", ",".join(cut).encode()))
    return DeadLetter(key, value, headers)
