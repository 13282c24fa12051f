"""The event contract: schema files, validation reasons for every malformed-input class."""

import json
import time

import jsonschema
import pytest

from streaming import events as ev

NOW = 1_790_000_000_000


def impression(**overrides):
    data = {"event_id": "e1", "schema_version": 1, "ts": NOW, "request_id": "r1", "user_id": "u1",
            "ad_id": "a1", "position": 1, "bid": 0.5, "context": {"device": "ios", "hour": 3}}
    data.update(overrides)
    return data


def raw(data) -> bytes:
    return json.dumps(data).encode()


def without(data, key):
    data = dict(data)
    del data[key]
    return data


@pytest.mark.parametrize("event_type", ev.EVENT_TYPES)
def test_schema_files_are_valid_json_schema(event_type):
    jsonschema.Draft202012Validator.check_schema(ev.schema(event_type))


def test_valid_events_pass_and_keep_unknown_fields():
    result = ev.validate(raw(impression(extra_field="kept")), "impression", now_ms=NOW)
    assert isinstance(result, ev.Event)
    assert result.data["extra_field"] == "kept"
    click = {k: v for k, v in impression().items() if k not in ("position", "bid", "context")}
    assert isinstance(ev.validate(raw(click), "click", now_ms=NOW), ev.Event)
    assert isinstance(ev.validate(raw({**click, "value": 12.5}), "conversion", now_ms=NOW), ev.Event)


@pytest.mark.parametrize("payload, event_type, reason, field", [
    (b"\xff\xfe not utf8", "impression", ev.NOT_UTF8, None),
    (b"{not json", "impression", ev.NOT_JSON, None),
    (b"[1, 2]", "impression", ev.NOT_OBJECT, None),
    (raw(without(impression(), "ad_id")), "impression", ev.MISSING_FIELD, "ad_id"),
    (raw(without(impression(), "bid")), "impression", ev.MISSING_FIELD, "bid"),
    (raw(impression(ts="yesterday")), "impression", ev.WRONG_TYPE, "ts"),
    (raw(impression(ts=True)), "impression", ev.WRONG_TYPE, "ts"),
    (raw(impression(user_id=42)), "impression", ev.WRONG_TYPE, "user_id"),
    (raw(impression(bid=-0.01)), "impression", ev.NEGATIVE_MONEY, "bid"),
    (raw({**without(impression(), "bid"), "value": -3}), "conversion", ev.NEGATIVE_MONEY, "value"),
    (raw(impression(ts=NOW - 10 * 365 * 86400_000)), "impression", ev.TS_TOO_OLD, "ts"),
    (raw(impression(ts=NOW + 30 * 86400_000)), "impression", ev.TS_IN_FUTURE, "ts"),
    (raw(impression(schema_version=2)), "impression", ev.UNKNOWN_SCHEMA_VERSION, "schema_version"),
    (raw(impression(position=0)), "impression", ev.INVALID_VALUE, "position"),
    (raw(impression()), "purchase", ev.UNKNOWN_EVENT_TYPE, None),
    (raw(impression(padding="x" * 20000)), "impression", ev.OVERSIZE, None),
    # inputs that used to raise out of the decoder (and so stop the worker), or slip through it
    (b"[" * 5000 + b"]" * 5000, "impression", ev.NOT_JSON, None),  # RecursionError
    (raw(impression()).replace(b'"bid": 0.5', b'"bid": ' + b"9" * 5000), "impression", ev.NOT_JSON, None),
    (raw(impression()).replace(b'"bid": 0.5', b'"bid": NaN'), "impression", ev.INVALID_VALUE, None),
    (raw(impression()).replace(b'"bid": 0.5', b'"bid": -Infinity'), "impression", ev.INVALID_VALUE, None),
    (raw(impression()).replace(b'"bid": 0.5', b'"bid": 1e400'), "impression", ev.INVALID_VALUE, None),
    (raw(impression(bid=1e300)), "impression", ev.INVALID_VALUE, "bid"),
    # a \u escape spelling a lone surrogate: decodes in Python, encodes nowhere downstream
    (raw(impression()).replace(b'"u1"', b'"\\udc80"'), "impression", ev.NOT_UTF8, None),
    (raw({**without(impression(), "bid"), "value": 5e12}), "conversion", ev.INVALID_VALUE, "value"),
])
def test_each_malformed_class_is_rejected_with_its_reason(payload, event_type, reason, field):
    result = ev.validate(payload, event_type, now_ms=NOW)
    assert isinstance(result, ev.Rejection), result
    assert result.reason == reason
    assert result.field == field
    assert result.detail  # a human-readable explanation too
    assert result.as_dict()["reason"] == reason


def test_default_now_is_the_wall_clock():
    fresh = impression(ts=int(time.time() * 1000))
    assert isinstance(ev.validate(raw(fresh), "impression"), ev.Event)


def test_encode_is_canonical():
    a = ev.encode({"b": 1, "a": "é"})
    assert a == ev.encode({"a": "é", "b": 1}) == '{"a":"é","b":1}'.encode()


def test_an_oversize_key_is_rejected_before_the_value_is_read():
    result = ev.validate(raw(impression()), "impression", now_ms=NOW, key=b"u" * 2_000_000)
    assert isinstance(result, ev.Rejection)
    assert (result.reason, result.field) == (ev.OVERSIZE, "key")
    assert isinstance(ev.validate(raw(impression()), "impression", now_ms=NOW, key=b"u1"), ev.Event)


AGREEMENT_CORPUS = [
    raw(impression()),
    raw(impression(user_id="ü😀" * 40, ad_id="\\u00e9")),
    raw(impression(ts=float(NOW))),  # JSON Schema's integer: 1.7e12 written as a float is one
    raw(impression(ts=1.5)),
    raw(impression(bid=-0.0)),
    raw(impression(bid=1e308)),
    raw(impression(event_id="1234567890123456789012")),  # long digit runs take the strict decoder
    raw(impression()).replace(b'"ts": %d' % NOW, b'"ts": 1790000000000000000000'),
    raw(impression()).replace(b'"bid": 0.5', b'"bid": 0.5, "bid": 0.7'),  # duplicate key: last wins
    raw(impression()).replace(b'"user_id": "u1"', b'"user_id": "\\ud800"'),  # lone surrogate
    raw(impression()).replace(b'"hour": 3', b'"hour": 3, "deep": ' + b"[" * 1100 + b"]" * 1100),
    b"\xef\xbb\xbf" + raw(impression()),  # UTF-8 BOM
    b"  \n" + raw(impression()) + b"\n ",
    raw(impression()).replace(b'"bid": 0.5', b'"bid": 05'),
    raw(impression()).replace(b'"bid": 0.5', b'"bid": 1E2'),
    raw(impression(user_id="a\x01")),
    raw(impression(context={"hour": 24})),
    b'{"event_id": "e1", "schema_version": 1}',
    b"null", b"", b"\"\"", b"{}",
]


@pytest.mark.parametrize("payload", AGREEMENT_CORPUS)
@pytest.mark.parametrize("event_type", ["impression", "conversion"])
def test_the_fast_path_agrees_with_the_strict_decoder_and_validators(payload, event_type, monkeypatch):
    """The hot path (orjson + jsonschema-rs) must give the verdict the reference path gives
    (Python's strict json + fastjsonschema/jsonschema): same event data, or same reason and field."""
    fast = ev.validate(payload, event_type, now_ms=NOW)
    monkeypatch.setattr(ev, "_fast_loads", lambda raw: ev._NOT_DECODED)
    monkeypatch.setattr(ev, "_rs_validator", lambda et: type("No", (), {"is_valid": lambda s, d: False})())
    strict = ev.validate(payload, event_type, now_ms=NOW)
    assert type(fast) is type(strict)
    if isinstance(strict, ev.Event):
        assert fast.data == strict.data
    else:
        assert (fast.reason, fast.field) == (strict.reason, strict.field)


def test_dumps_falls_back_where_orjson_refuses():
    """A sample or state may carry an event's free-form context: an integer past 64 bits must not
    make the worker's encoding raise (that would fail the batch on every restart)."""
    big = {"b": 2, "a": {"n": 10**30, "s": "é"}}
    assert json.loads(ev.dumps(big)) == big
    assert ev.dumps(big, sort_keys=True).startswith(b'{"a":')
    assert ev.dumps({"x": 1.5, "y": [1, "ü"]}) == '{"x":1.5,"y":[1,"ü"]}'.encode()
