"""The event contract: JSON Schema files in ``streaming/schemas`` plus checks a schema cannot express.

``validate(raw, event_type)`` never raises on bad input: it returns either a validated ``Event`` or a
``Rejection`` whose ``reason`` is a stable machine-readable code (what goes to the dead-letter topic).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import fastjsonschema
import jsonschema
import jsonschema_rs
import orjson

from oneranker import config

EVENT_TYPES = ("impression", "click", "conversion")
SCHEMA_VERSIONS = (1,)
MONEY_FIELDS = ("bid", "value")

# Stable reason codes (the DLQ's `reason`). Producers can switch on them.
NOT_UTF8 = "not_utf8"
NOT_JSON = "not_json"
NOT_OBJECT = "not_object"
OVERSIZE = "oversize"
UNKNOWN_EVENT_TYPE = "unknown_event_type"
UNKNOWN_SCHEMA_VERSION = "unknown_schema_version"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
NEGATIVE_MONEY = "negative_money"
TS_TOO_OLD = "ts_too_old"
TS_IN_FUTURE = "ts_in_future"
INVALID_VALUE = "invalid_value"
REASONS = (
    NOT_UTF8, NOT_JSON, NOT_OBJECT, OVERSIZE, UNKNOWN_EVENT_TYPE, UNKNOWN_SCHEMA_VERSION,
    MISSING_FIELD, WRONG_TYPE, NEGATIVE_MONEY, TS_TOO_OLD, TS_IN_FUTURE, INVALID_VALUE,
)
# … and those of the stream worker, for events it could not join
INTERNAL_ERROR = "internal_error"  # handling it raised (a bug, not the producer's: the worker goes on)
BEHIND_WATERMARK = "behind_watermark"  # older than the watermark minus the dedupe retention


class _NonFinite(ValueError):
    """A number JSON cannot hold (NaN, ±Infinity, or a literal beyond float range like 1e400)."""


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(text)
    return value


def _no_constant(text: str):
    raise _NonFinite(text)


def _loads(text: str) -> Any:
    """Strict JSON: NaN/Infinity (which Python's json accepts) and overflowing floats are refused."""
    return json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)


# orjson reads an integer of 20+ digits as a float where Python's json keeps an int: such input
# (rare: any run of 19+ digits, in a string or not) takes the strict decoder, so both agree.
# (A translate + substring test: ~6x faster here than re.search for [0-9]{19}.)
_DIGITS_AS_NINES = bytes(0x39 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_NINETEEN_DIGITS = b"9" * 19
_NOT_DECODED = object()


def _fast_loads(raw: bytes) -> Any:
    """orjson (C, ~6x faster) for the common case, or ``_NOT_DECODED``: whatever orjson refuses
    (NaN, 1e400, bad UTF-8, lone surrogates, depth > 1024, …) is decoded again by ``_loads``,
    whose verdict and reason are the contract's."""
    if _NINETEEN_DIGITS in raw.translate(_DIGITS_AS_NINES):
        return _NOT_DECODED
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _NOT_DECODED


@dataclass(frozen=True, slots=True)
class Event:
    """A validated event. ``data`` is the decoded JSON object (unknown fields kept, ignored)."""

    type: str
    data: dict[str, Any]

    @property
    def event_id(self) -> str:
        return self.data["event_id"]

    @property
    def user_id(self) -> str:
        return self.data["user_id"]

    @property
    def ts(self) -> int:
        return self.data["ts"]


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why an input was refused. ``field`` names the offending field when there is one."""

    reason: str
    detail: str
    field: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "field": self.field, "detail": self.detail}


def schema_path(event_type: str) -> resources.abc.Traversable:
    return resources.files("streaming").joinpath("schemas", f"{event_type}.v1.json")


@lru_cache(maxsize=None)
def schema(event_type: str) -> dict[str, Any]:
    return json.loads(schema_path(event_type).read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def _validator(event_type: str) -> jsonschema.Draft202012Validator:
    """The reference validator: slow, but it lists every error (used to explain a rejection)."""
    return jsonschema.Draft202012Validator(schema(event_type))


@lru_cache(maxsize=None)
def _fast_validator(event_type: str):
    """The same schema compiled to Python code (~10x faster than the reference)."""
    return fastjsonschema.compile(schema(event_type))


@lru_cache(maxsize=None)
def _rs_validator(event_type: str):
    """The same schema in jsonschema-rs (Rust, ~3x faster than fastjsonschema): the hot path's
    yes/no. A "no" is re-checked by the Python validators, which give the reason."""
    return jsonschema_rs.validator_for(schema(event_type))


def _rejection_from_schema_error(err: jsonschema.ValidationError, doc: dict[str, Any]) -> Rejection:
    name = str(err.path[0]) if err.path else None
    if err.validator == "required":
        missing = next((f for f in err.validator_value if f not in doc), None)
        return Rejection(MISSING_FIELD, err.message, missing)
    if err.validator == "type":
        return Rejection(WRONG_TYPE, err.message, name)
    if name in MONEY_FIELDS and err.validator == "minimum":
        return Rejection(NEGATIVE_MONEY, err.message, name)
    if name == "schema_version":
        return Rejection(UNKNOWN_SCHEMA_VERSION, err.message, name)
    return Rejection(INVALID_VALUE, err.message, name)


def validate_object(doc: Any, event_type: str, now_ms: int | None = None) -> Event | Rejection:
    """Validate an already-decoded JSON value as an event of ``event_type``."""
    if event_type not in EVENT_TYPES:
        return Rejection(UNKNOWN_EVENT_TYPE, f"unknown event type {event_type!r}")
    if not isinstance(doc, dict):
        return Rejection(NOT_OBJECT, f"expected a JSON object, got {type(doc).__name__}")
    # Booleans are JSON's own type but Python ints; a schema validator would accept True as ts=1.
    for key in ("ts", "schema_version", "position"):
        if isinstance(doc.get(key), bool):
            return Rejection(WRONG_TYPE, f"{key} must be an integer, got a boolean", key)
    errors = []
    try:
        fast_ok = _rs_validator(event_type).is_valid(doc)
    except Exception:  # e.g. a string it cannot hold: the Python validators decide
        fast_ok = False
    if not fast_ok:
        try:
            _fast_validator(event_type)(doc)
        except fastjsonschema.JsonSchemaException:
            errors = list(_validator(event_type).iter_errors(doc))
    if errors:
        # Report the most useful error first: missing > type > the rest, in field order.
        order = {"required": 0, "type": 1}
        errors.sort(key=lambda e: order.get(e.validator, 2))
        return _rejection_from_schema_error(errors[0], doc)
    now = int(time.time() * 1000) if now_ms is None else now_ms
    ts = doc["ts"]
    if ts < now - config.MAX_EVENT_AGE_MS:
        return Rejection(TS_TOO_OLD, f"ts {ts} is more than {config.MAX_EVENT_AGE_MS} ms before now", "ts")
    if ts > now + config.MAX_EVENT_FUTURE_MS:
        return Rejection(TS_IN_FUTURE, f"ts {ts} is more than {config.MAX_EVENT_FUTURE_MS} ms after now", "ts")
    return Event(event_type, doc)


def validate(raw: bytes, event_type: str, now_ms: int | None = None,
             max_bytes: int = config.MAX_EVENT_BYTES, key: bytes | None = None) -> Event | Rejection:
    """Validate one raw Kafka message value (and its key, when given) as an event of ``event_type``."""
    if key is not None and len(key) > config.MAX_KEY_BYTES:
        return Rejection(OVERSIZE, f"key is {len(key)} bytes, limit {config.MAX_KEY_BYTES}", "key")
    if raw is None:
        return Rejection(NOT_JSON, "empty message (null value)")
    if len(raw) > max_bytes:
        return Rejection(OVERSIZE, f"message is {len(raw)} bytes, limit {max_bytes}")
    doc = _fast_loads(raw)
    if doc is not _NOT_DECODED:
        return validate_object(doc, event_type, now_ms)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejection(NOT_UTF8, str(exc))
    try:
        doc = _loads(text)
    except _NonFinite as exc:
        return Rejection(INVALID_VALUE, f"number {str(exc)[:40]} is not finite (NaN, Infinity or overflow)")
    except RecursionError:
        return Rejection(NOT_JSON, "nested too deeply to decode")
    except ValueError as exc:  # JSONDecodeError, and integers past Python's digit limit
        return Rejection(NOT_JSON, str(exc)[:200])
    if "\\u" in text and _has_lone_surrogate(doc):
        # JSON's \ud800 escapes can spell a string no UTF-8 encoder (Feast, the samples, the
        # state changelog) accepts downstream
        return Rejection(NOT_UTF8, "a \\u escape spells a lone surrogate: not Unicode text")
    return validate_object(doc, event_type, now_ms)


def _has_lone_surrogate(doc: Any) -> bool:
    try:
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def dumps(obj: Any, sort_keys: bool = False) -> bytes:
    """Compact UTF-8 JSON, with orjson; Python's json where orjson refuses (an integer past 64 bits,
    which an event's free-form ``context`` may carry into a sample or a state)."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS if sort_keys else 0)
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(obj, separators=(",", ":"), sort_keys=sort_keys,
                          ensure_ascii=False).encode("utf-8")


def encode(data: dict[str, Any]) -> bytes:
    """Canonical wire form: compact, sorted keys, UTF-8 (byte-identical for equal events)."""
    return json.dumps(data, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode("utf-8")
