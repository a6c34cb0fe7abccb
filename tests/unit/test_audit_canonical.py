"""The canonical encoding: RFC 8785 (JCS) vectors, what is refused, the entry layout."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firstmile.audit.canonical import (
    GENESIS,
    CanonicalError,
    canonical_entry,
    canonical_parts,
    entry_hash,
    format_timestamp,
    jcs,
    leaf_hash,
    loads,
    parse_timestamp,
)
from tests.factories import ROOT

# RFC 8785 Appendix B: IEEE 754 bit patterns and their serialisation
NUMBER_VECTORS = [
    ("0000000000000000", "0"),
    ("8000000000000000", "0"),
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]


@pytest.mark.parametrize(("bits", "expected"), NUMBER_VECTORS)
def test_rfc8785_numbers(bits: str, expected: str) -> None:
    (value,) = struct.unpack(">d", bytes.fromhex(bits))
    assert jcs(value) == expected


def test_rfc8785_example() -> None:
    source = (
        '{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],'
        ' "string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",'
        ' "literals": [null, true, false]}'
    )
    assert jcs(json.loads(source)) == (
        '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    )


def test_rfc8785_property_sorting_by_utf16_code_units() -> None:
    value = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }
    keys = list(json.loads(jcs(value)))
    assert keys == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]


def test_integers_and_literals() -> None:
    assert jcs([0, -1, 2**53, -(2**53), True, False, None, 3.0, -0.0, 10**21]) == (
        "[0,-1,9007199254740992,-9007199254740992,true,false,null,3,0,1e+21]"
    )
    assert jcs({"b": [], "a": {}}) == '{"a":{},"b":[]}'
    assert jcs("\x1f\x7f\u2028") == '"\\u001f\x7f\u2028"'


@pytest.mark.parametrize(
    "bad",
    [
        float("nan"),
        float("inf"),
        2**53 + 1,
        10**400,
        "a\x00b",
        {"k\x00": 1},
        "\ud800",
        b"bytes",
        {1: "int key"},
        {"set": {1, 2}},
    ],
)
def test_refused_values(bad: object) -> None:
    with pytest.raises(CanonicalError):
        jcs(bad)


def test_strict_mode_keeps_integers_in_the_i_json_range() -> None:
    assert jcs(2**53 - 1, strict=True) == "9007199254740991"
    assert jcs(2437432259388968000) == "2437432259388968000"  # a double's shortest form: fine when reading
    with pytest.raises(CanonicalError):
        jcs(2**60)  # a double, but JavaScript would print 1152921504606847000
    for number in (2**53, -(2**53), 2437432259388968000):
        with pytest.raises(CanonicalError):
            jcs({"n": [number]}, strict=True)
    assert loads('{"a": 2437432259388968000, "b": 7}') == {"a": 2.437432259388968e18, "b": 7}
    assert isinstance(loads("9007199254740992"), float)


def test_refuses_deep_nesting() -> None:
    value: object = []
    for _ in range(70):
        value = [value]
    with pytest.raises(CanonicalError):
        jcs(value)


def test_reparsing_the_canonical_form_is_stable() -> None:
    rng = random.Random(5)
    for _ in range(500):
        (number,) = struct.unpack(">d", rng.getrandbits(64).to_bytes(8, "big"))
        if number != number or number in (float("inf"), float("-inf")):
            continue
        value = {
            "f": number,
            "i": rng.randint(-(2**53), 2**53),
            "s": "".join(chr(rng.choice([rng.randint(1, 0x7F), rng.randint(0x80, 0xD7FF)])) for _ in range(8)),
        }
        once = jcs(value)
        assert jcs(loads(once)) == once
        assert jcs(loads(once), strict=True) == once  # large integral doubles read back as floats


def test_timestamps() -> None:
    moment = datetime(2026, 11, 27, 10, 15, 30, 5, tzinfo=timezone(timedelta(hours=2)))
    assert format_timestamp(moment) == "2026-11-27T08:15:30.000005Z"
    assert parse_timestamp("2026-11-27T08:15:30.000005Z") == moment
    with pytest.raises(CanonicalError):
        format_timestamp(datetime(2026, 1, 1))  # noqa: DTZ001


def test_entry_layout_parts_and_hashes() -> None:
    tenant = uuid.UUID("9a0f1c2e-3b4d-4e5f-8a6b-7c8d9e0f1a2b")
    at = datetime(2026, 11, 27, 8, 15, 30, 123456, tzinfo=UTC)
    payload = {"model": "planner-v3", "confidence": 0.87, "inputs": {"persona": "developer"}, "fallback": None}
    canonical = canonical_entry(tenant, 7, "decision", "agent:planner", "user:u-1", payload, at)
    assert canonical == (
        b'{"actor":"agent:planner","created_at":"2026-11-27T08:15:30.123456Z","kind":"decision",'
        b'"payload":{"confidence":0.87,"fallback":null,"inputs":{"persona":"developer"},"model":"planner-v3"},'
        b'"seq":7,"subject":"user:u-1","tenant":"9a0f1c2e-3b4d-4e5f-8a6b-7c8d9e0f1a2b"}'
    )
    document = {
        "actor": "agent:planner",
        "created_at": format_timestamp(at),
        "kind": "decision",
        "payload": payload,
        "seq": 7,
        "subject": "user:u-1",
        "tenant": str(tenant),
    }
    assert canonical == jcs(document).encode()
    head, middle, tail = canonical_parts(tenant, "decision", "agent:planner", "user:u-1", jcs(payload))
    assert (head + format_timestamp(at) + middle + "7" + tail).encode() == canonical
    assert entry_hash(GENESIS, canonical) == hashlib.sha256(bytes(32) + canonical).digest()
    assert leaf_hash(canonical) == hashlib.sha256(b"\x00" + canonical).digest()


def test_parts_agree_with_jcs_for_awkward_text() -> None:
    tenant = uuid.uuid4()
    rng = random.Random(9)
    for _ in range(200):
        actor, subject, kind = (
            "".join(chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(0, 6))) for _ in range(3)
        )
        payload = {"\u20ac": ["\n", 1.5e-7], "a": {"\r": True}}
        at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(microseconds=rng.randint(0, 10**12))
        document = {
            "actor": actor,
            "created_at": format_timestamp(at),
            "kind": kind,
            "payload": payload,
            "seq": rng.randint(0, 10**12),
            "subject": subject,
            "tenant": str(tenant),
        }
        assert canonical_entry(tenant, document["seq"], kind, actor, subject, payload, at) == jcs(document).encode()  # type: ignore[arg-type]


def test_known_answer_is_the_one_documented() -> None:
    tenant = uuid.UUID("9a0f1c2e-3b4d-4e5f-8a6b-7c8d9e0f1a2b")
    at = datetime(2026, 11, 27, 8, 15, 30, 123456, tzinfo=UTC)
    payload = {  # the planner's decision as the platform writes it (docs/audit.md, "What is recorded")
        "decision": "path_selection",
        "inputs": {"traits": {"persona": "developer"}},
        "output": {"path_id": "developer-quickstart", "path_version": 1},
        "model": "path_classifier",
        "model_version": "1.0.0",
        "confidence": 0.87,
        "selected_by": "model",
        "fallback": None,
    }
    entry_id = uuid.UUID("3f1d2c4b-5a69-4e7d-8c0b-1a2b3c4d5e6f")
    canonical = canonical_entry(tenant, 0, "decision", "path_planner", "u-1", payload, at, entry_id)
    assert canonical_entry(tenant, 7, "decision", "path_planner", "u-1", payload, at, entry_id) == canonical  # no seq
    doc = (ROOT / "docs" / "audit.md").read_text(encoding="utf-8")
    assert canonical.decode() in doc
    assert f"entry_hash `{entry_hash(GENESIS, canonical).hex()}`" in doc
    assert f"leaf_hash `{leaf_hash(canonical).hex()}`" in doc


def _exact(value: object, strict: bool) -> str:
    """The character-by-character encoder alone (what the fast path must agree with)."""
    from firstmile.audit.canonical import _encode

    out: list[str] = []
    _encode(value, out, 0, strict)
    return "".join(out)


_KEYS = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=6) | st.sampled_from(
    ["a", "B", "\ue000", "\U0001f600", "é", "\u20ac", "aa", "a\U00010000", "a\uffff", "\x7f"]
)
_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([1e21, 1e-7, 1.5e-7, 123456789012345680.0, -0.0, 5e-324, 2.0**53, 0.1 + 0.2])
    | st.text(max_size=8)
)
_VALUES = st.recursive(
    _LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=4), max_leaves=24
)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(_VALUES, st.booleans())
def test_the_fast_path_is_exactly_the_jcs_encoder(value: object, strict: bool) -> None:
    """Every value gets the same text, or the same error, from jcs as from the exact encoder alone: floats
    in every range, non-BMP keys (whose UTF-16 order differs from code point order), integers past 2**53,
    NaN, NUL and lone surrogates included."""
    try:
        expected: object = _exact(value, strict)
        expected.encode("utf-8")  # type: ignore[attr-defined]
    except (CanonicalError, UnicodeEncodeError) as exc:
        expected = type(exc)
    try:
        got: object = jcs(value, strict=strict)
    except CanonicalError as exc:
        got = UnicodeEncodeError if "surrogates" in str(exc) else type(exc)
    assert got == expected


def test_the_fast_path_falls_back_for_what_it_does_not_cover() -> None:
    deep: object = 1
    for _ in range(70):
        deep = [deep]
    with pytest.raises(CanonicalError, match="nesting deeper"):
        jcs(deep)
    assert jcs({"\U0001f600": 1, "\ue000": 2}) == '{"\U0001f600":1,"\ue000":2}'  # UTF-16 order, not code points
    assert jcs((1, 2.5)) == "[1,2.5]"
    assert jcs({"n": 2**53}) == '{"n":9007199254740992}'
    with pytest.raises(CanonicalError, match="I-JSON"):
        jcs({"n": 2**53}, strict=True)
