"""Dead letters are bounded whatever the input: an oversize original is cut to a head, with its size
and sha256 in headers, so the send can never be refused for the input it reports."""

import hashlib

from oneranker import config
from streaming.dlq import dead_letter


def headers(letter) -> dict[str, str]:
    return {k: v.decode() for k, v in letter.headers}


def test_a_small_original_is_carried_untouched():
    letter = dead_letter(b"u1", b'{"x": 1}', reason="wrong_type", detail="bad", field="ts",
                         event_type="impression", source_topic="oneranker.impressions",
                         source_partition=2, source_offset=17)
    assert (letter.key, letter.value) == (b"u1", b'{"x": 1}')
    h = headers(letter)
    assert h == {"reason": "wrong_type", "field": "ts", "detail": "bad", "event_type": "impression",
                 "source_topic": "oneranker.impressions", "source_partition": "2", "source_offset": "17"}


def test_an_oversize_value_and_key_are_cut_with_their_size_and_digest():
    value = b"v" * 5_000_000
    key = b"k" * 2_000_000
    letter = dead_letter(key, value, reason="oversize", detail="x" * 10_000)
    assert letter.value == value[:config.DLQ_HEAD_BYTES]
    assert letter.key == key[:config.MAX_KEY_BYTES]
    h = headers(letter)
    assert h["truncated"] == "key,value"
    assert int(h["original_size"]) == len(value)
    assert h["original_sha256"] == hashlib.sha256(value).hexdigest()
    assert int(h["original_key_size"]) == len(key)
    assert h["original_key_sha256"] == hashlib.sha256(key).hexdigest()
    assert len(h["detail"]) <= 500
    assert letter.size < config.PRODUCER_MAX_REQUEST_BYTES


def test_the_value_limit_is_inclusive_and_null_values_pass():
    at_limit = b"a" * config.DLQ_MAX_VALUE_BYTES
    assert dead_letter(None, at_limit, reason="oversize").value == at_limit
    letter = dead_letter(None, None, reason="not_json")
    assert letter.value is None and "truncated" not in headers(letter)
