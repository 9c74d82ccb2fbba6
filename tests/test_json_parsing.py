"""Request bodies are parsed by a fast parser with the standard library's as the reference:
whatever the body, the outcome (value, or refusal and its message) must be the reference's.

The reference here is what the service did before the fast path existed: json.loads refusing
NaN/Infinity and numbers out of a double's range (overflowing to infinity, or underflowing
to zero), then a depth check of the parsed document.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sluice.api import limits
from sluice.api.limits import (
    FITS,
    NOT_FINITE,
    TOO_DEEP,
    ZERO,
    inspect_json,
    parse_json,
    strict_loads,
)
from sluice.settings import Settings

LIMIT = 64


def reference(body: bytes, max_depth: int = LIMIT) -> Any:
    parsed = strict_loads(body)
    stack: list[tuple[Any, int]] = [(parsed, 1)] if isinstance(parsed, dict | list) else []
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise json.JSONDecodeError(f"nesting deeper than {max_depth} levels", "", 0)
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return parsed


def outcome(parse: Any, body: bytes) -> tuple[str, Any]:
    try:
        value = parse(body)
    except json.JSONDecodeError as exc:
        return "refused", str(exc)
    # repr tells -0.0 from 0.0 and 1 from 1.0 from True, which == would not.
    return "parsed", repr(value)


def assert_same(body: bytes) -> None:
    assert outcome(lambda b: parse_json(b, LIMIT), body) == outcome(reference, body), body[:200]


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


EDGE_CASES = [
    b'{"messages":[{"value":{"t":0.0,"pad":"xxxx"}}]}',
    b"123456789012345678901234567890",  # beyond 64 bits: kept exact
    b"-123456789012345678901234567890",
    b"-0",
    b"-0.0",
    b"1E2",
    b"1e-400",  # underflow to 0.0: refused by both
    b"0e-400",  # zero
    b'{"a":[0.0,{"b":1e-400}]}',  # underflow after a genuine zero
    b"[0.0," + b"[" * (LIMIT + 1) + b"]" * (LIMIT + 1) + b"]",  # a zero, then too deep
    b"1e400",  # overflow: refused
    b'{"a":[1,2,{"b":-1e400}]}',  # overflow deep inside
    b"1" + b"0" * 400 + b".0",  # overflow by digits
    b"1.7976931348623157e308",
    b"1.7976931348623159e308",
    b"NaN",
    b'{"v":Infinity}',
    b"[-Infinity]",
    b'"\\ud800"',  # lone surrogate escape: the fast parser refuses, the reference takes it
    b'{"key":"a\\udfff"}',
    b'"\\ud83d\\ude00"',  # a proper pair
    b'"\xed\xa0\x80"',  # a surrogate encoded as UTF-8
    b'"\xff"',  # not UTF-8
    b'"a\x01b"',  # raw control character
    b'"\\u0000"',
    b"\xef\xbb\xbf1",  # UTF-8 byte order mark
    '{"a": "é"}'.encode("utf-16"),  # UTF-16 with BOM: the reference detects it
    '{"a": "é"}'.encode("utf-16-le"),
    b'{"a":1,"a":2}',  # duplicate keys: the last one wins in both
    b"[1,]",
    b'{"a":1,}',
    b"",
    b"   ",
    b"{} x",
    b" \t\n[1] \n",
    json.dumps(nested(LIMIT)).encode(),  # exactly at the limit
    json.dumps(nested(LIMIT + 1)).encode(),  # one level too deep
    json.dumps(nested(199)).encode(),
    json.dumps(nested(250)).encode(),  # beyond the fast parser's own limit
    b"[" * 5000 + b"]" * 5000,  # beyond the reference's recursion
    json.dumps(nested(LIMIT + 1, leaf=1e308)).encode(),
    b"[" * (LIMIT + 1) + b"1e400" + b"]" * (LIMIT + 1),  # too deep and overflowing
]


@pytest.mark.parametrize("body", EDGE_CASES, ids=range(len(EDGE_CASES)))
def test_fast_parser_matches_the_reference(body: bytes) -> None:
    assert_same(body)


def test_depth_limit_is_the_settings_one() -> None:
    body = json.dumps(nested(10)).encode()
    assert parse_json(body, 10) == nested(10)
    with pytest.raises(json.JSONDecodeError, match="nesting deeper than 9 levels"):
        parse_json(body, 9)


def test_inspect_json_verdicts() -> None:
    assert inspect_json(nested(3), 3) == FITS
    assert inspect_json(nested(4), 3) == TOO_DEEP
    assert inspect_json({"a": [1.5, {"b": math.inf}]}, 10) == NOT_FINITE
    assert inspect_json(-math.inf, 10) == NOT_FINITE
    assert inspect_json([1, "x", None, True, 2**70, 5e-324], 1) == FITS
    # A float zero is a flag: the walk goes on to what would refuse the document.
    assert inspect_json([1, "x", -0.0], 1) == ZERO
    assert inspect_json(0.0, 1) == ZERO
    assert inspect_json({"a": [0.0], "b": 1}, 5) == ZERO
    assert inspect_json([0.0, [math.inf]], 5) == NOT_FINITE
    assert inspect_json([0.0, nested(5)], 3) == TOO_DEEP
    # Recursion stops at the limit: a document far deeper than Python's stack is fine.
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    assert inspect_json(deep, 500) == TOO_DEEP


# Not zero, yet below the smallest double (~4.9e-324, halfway ~2.5e-324): they would be
# stored as 0.0, so they are refused like numbers above the largest double.
UNDERFLOWING = [
    b"1e-400",
    b"-1e-400",
    b"0.1e-330",
    b"2.4e-324",
    b"1E-999",
    b"0.0001e-321",
    b"0." + b"0" * 400 + b"1",  # by digits alone, no exponent
    b"0." + b"0" * 400 + b"1e+40",
    b"1" + b"0" * 400 + b"e-800",
    b'{"messages":[{"value":{"a":[1,2,{"b":-1e-400}]}}]}',
    b'{"messages":[{"value":[0.0,1e-400]}]}',
]
# Zero written any way, and the smallest doubles, are numbers like any other.
ZEROS_AND_TINY = [
    b"0e-400",
    b"-0e-400",
    b"0.0",
    b"-0.0",
    b"0.000e+10",
    b"0E-0",
    b"0." + b"0" * 400,
    b"5e-324",
    b"2.5e-324",  # rounds up to the smallest double
    b"4.9e-324",
    b'{"messages":[{"value":[0.0,-0.0,0e-400,1e-10,"0e-400"]}]}',
]


@pytest.mark.parametrize("body", UNDERFLOWING, ids=range(len(UNDERFLOWING)))
def test_numbers_that_underflow_to_zero_are_refused(body: bytes) -> None:
    with pytest.raises(json.JSONDecodeError, match="out of range"):
        parse_json(body, LIMIT)
    assert_same(body)


@pytest.mark.parametrize("body", ZEROS_AND_TINY, ids=range(len(ZEROS_AND_TINY)))
def test_zero_in_any_form_and_the_smallest_doubles_are_accepted(body: bytes) -> None:
    # repr tells -0.0 from 0.0
    assert repr(parse_json(body, LIMIT)) == repr(json.loads(body))
    assert_same(body)


def test_genuine_zeros_do_not_send_a_body_to_the_reference(monkeypatch) -> None:
    """Only a zero that may come from an underflowing literal costs a second parse."""

    def refuse(body: bytes) -> None:
        raise AssertionError("parsed by the reference")

    monkeypatch.setattr(limits, "strict_loads", refuse)
    body = b'{"messages":[{"value":{"price":0.0,"n":0,"v":-0.0,"t":"one-two e-1"}}]}'
    assert parse_json(body, LIMIT) == json.loads(body)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)  # includes lone surrogates
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values, ascii_only=st.booleans(), depth=st.integers(0, 70))
def test_any_json_document_parses_as_the_reference_does(
    value: Any, ascii_only: bool, depth: int
) -> None:
    text = json.dumps(nested(depth, value), ensure_ascii=ascii_only)
    assert_same(text.encode("utf-8", "surrogatepass"))


TOKENS = [
    b"NaN",
    b"-Infinity",
    b"1e400",
    b"1e-400",
    b"0.0",
    b'"\\ud800"',
    b",",
    b"]",
    b"{",
    b"\x00",
    b"\xff",
    b" ",
]


@settings(max_examples=300, deadline=None)
@given(
    value=json_values,
    cuts=st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(TOKENS)), max_size=3),
)
def test_damaged_documents_are_refused_or_taken_as_the_reference_does(
    value: Any, cuts: list[tuple[int, bytes]]
) -> None:
    body = json.dumps(value).encode()
    for position, token in cuts:
        at = position % (len(body) + 1)
        body = body[:at] + token + body[at:]
    assert_same(body)


def test_depth_setting_is_bounded_below_the_recursion_limit() -> None:
    assert Settings(max_json_depth=500).max_json_depth == 500
    with pytest.raises(ValidationError):
        Settings(max_json_depth=501)
    with pytest.raises(ValidationError):
        Settings(max_json_depth=0)
