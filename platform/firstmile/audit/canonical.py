"""The canonical encoding of an audit entry and the hashes over it (pure, no I/O).

An entry's canonical form is the RFC 8785 JSON Canonicalization (JCS) of the
object ``{actor, created_at, id, kind, payload, subject, tenant}``, encoded as
UTF-8, where ``created_at`` is RFC 3339 in UTC with exactly six fractional
digits and ``Z`` (``2026-11-27T10:15:30.123456Z``), and ``id`` (the entry's
own UUID, drawn when it is queued) and ``tenant`` are UUIDs in lower-case
hyphenated form. The form holds no sequence number: an entry's leaf hash is
known when the writer queues it, before the sequencer gives it its place
(``seq``) in the log, and the place is bound by the chain and the Merkle tree.

Entries written before the queue existed (version 1, ``id`` unset) have the form
``{actor, created_at, kind, payload, seq, subject, tenant}`` instead; both forms
verify for ever. Over either:

* ``entry_hash = SHA-256(prev_hash || canonical)``, with ``prev_hash`` of entry 0
  being 32 zero bytes (:data:`GENESIS`);
* ``leaf_hash = SHA-256(0x00 || canonical)``, the RFC 6962/9162 Merkle leaf hash.

Payloads are restricted to what survives PostgreSQL's ``jsonb`` unchanged under
JCS: no ``\\u0000`` in strings or keys, finite numbers only, and (when appending) integers
within ±(2**53 - 1), the I-JSON range (RFC 7493): JCS serialises every number as a double.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

GENESIS = bytes(32)
"""``prev_hash`` of entry 0."""

HASH_SIZE = 32
MAX_DEPTH = 64
MAX_SAFE_INTEGER = 2**53 - 1
TIMESTAMP_SQL_FORMAT = 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'
"""The PostgreSQL ``to_char`` format equal to :func:`format_timestamp` (of a UTC timestamp)."""

_FLOAT = re.compile(r"-?(\d+)(?:\.(\d+))?(?:e([+-]?\d+))?")


class CanonicalError(ValueError):
    """The value has no canonical encoding here (see the module docstring)."""


def format_timestamp(moment: datetime) -> str:
    """RFC 3339, UTC, six fractional digits, ``Z``: the ``created_at`` of the canonical form."""
    if moment.tzinfo is None:
        raise CanonicalError("timestamps must carry a time zone")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_timestamp(value: str) -> datetime:
    """The inverse of :func:`format_timestamp` (accepts any RFC 3339 offset)."""
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {value!r} has no offset")
    return moment.astimezone(UTC)


def _number(value: float) -> str:
    """ECMAScript's Number::toString for a finite double (RFC 8785 §3.2.2.3)."""
    if not math.isfinite(value):
        raise CanonicalError("NaN and infinities have no JSON form")
    if value == 0:
        return "0"
    match = _FLOAT.fullmatch(repr(value))  # repr is the shortest round-trip form
    if match is None:  # pragma: no cover - repr of a finite float always matches
        raise CanonicalError(f"unexpected float form {value!r}")
    whole, fraction, exponent = match.group(1), match.group(2) or "", match.group(3) or "0"
    digits = whole + fraction
    point = len(whole) + int(exponent)  # value = 0.<digits> * 10**point
    stripped = digits.lstrip("0")
    point -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    k, n = len(digits), point
    sign = "-" if value < 0 else ""
    if k <= n <= 21:
        return sign + digits + "0" * (n - k)
    if 0 < n <= 21:
        return sign + digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return sign + "0." + "0" * (-n) + digits
    e = n - 1
    mantissa = digits if k == 1 else digits[0] + "." + digits[1:]
    return f"{sign}{mantissa}e{'+' if e >= 0 else '-'}{abs(e)}"


def _integer(value: int) -> str:
    """An integer is a number like any other in JCS: accepted when it is exactly the shortest
    decimal form of a double (so ``2**53 + 1`` is refused, not silently rounded, while the
    ``2437432259388968000`` that a double serialises to reads back to the same text)."""
    if -(2**53) <= value <= 2**53:
        return str(value)
    try:
        text = _number(float(value))
    except OverflowError as exc:
        raise CanonicalError(f"integer {value} does not fit an IEEE 754 double") from exc
    if Decimal(text) != value:
        raise CanonicalError(f"integer {value} is not exactly representable as an IEEE 754 double")
    return text


def _string(value: str) -> str:
    if "\x00" in value:
        raise CanonicalError("strings must not contain U+0000 (PostgreSQL jsonb refuses it)")
    # json's escaping with ensure_ascii=False is exactly RFC 8785's: \" \\ \b \f \n \r \t, other
    # controls as \u00xx (lower-case hex), everything else literal.
    return json.dumps(value, ensure_ascii=False)


def _sort_key(key: str) -> bytes:
    return key.encode("utf-16-be", "surrogatepass")  # byte order of UTF-16BE = order of code units


def _encode(value: Any, out: list[str], depth: int, strict: bool) -> None:
    if depth > MAX_DEPTH:
        raise CanonicalError(f"nesting deeper than {MAX_DEPTH}")
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, int):
        if strict and not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            raise CanonicalError(f"integer {value} is outside ±(2**53 - 1) (I-JSON): send it as a float or a string")
        out.append(_integer(value))
    elif isinstance(value, float):
        out.append(_number(value))
    elif isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise CanonicalError(f"object keys must be strings, not {type(key).__name__}")
        out.append("{")
        for i, key in enumerate(sorted(value, key=_sort_key)):
            if i:
                out.append(",")
            out.append(_string(key))
            out.append(":")
            _encode(value[key], out, depth + 1, strict)
        out.append("}")
    elif isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode(item, out, depth + 1, strict)
        out.append("]")
    else:
        raise CanonicalError(f"{type(value).__name__} has no JSON form")


def jcs(value: Any, *, strict: bool = False) -> str:
    """RFC 8785 canonical JSON of ``value`` (dict, list, str, int, float, bool, None).

    ``strict`` (what :func:`~firstmile.audit.service.append` uses) also refuses integers outside
    the I-JSON range (RFC 7493), which other JCS implementations refuse too.

    Most payloads take a fast path: one pass that checks the value and sets its floats aside, then
    the standard library's C encoder (sorted keys, no ASCII escaping: for these values exactly
    JCS), with each float put back in ECMAScript's form. Anything the fast path does not cover
    exactly (keys whose UTF-16 order could differ from code point order, integers beyond 2**53,
    NaN, NUL, other container types, deep nesting) goes through :func:`_encode`, which also
    produces every error.
    """
    try:
        floats: list[str] = []
        text = _FAST_ENCODER.encode(_prepare(value, 0, floats))
        if floats:
            text = _PLACEHOLDER.sub(lambda m: floats[int(m.group(1))], text)
    except _SlowPathError:
        out: list[str] = []
        _encode(value, out, 0, strict)
        text = "".join(out)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CanonicalError("strings must be valid Unicode (no lone surrogates)") from exc
    return text


class _SlowPathError(Exception):
    """The value needs the exact encoder (or is refused by it)."""


_FAST_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":"))
_PLACEHOLDER = re.compile(r'"\\u0000(\d+)\\u0000"')
_MAX_FAST_INT = 2**53 - 1
_LAST_BMP_BEFORE_SURROGATES = "\ud7ff"


def _prepare(value: Any, depth: int, floats: list[str]) -> Any:
    """``value`` with each float replaced by a placeholder string (``\\x00<index>\\x00``, which no
    accepted string can contain), or :class:`_SlowPathError`."""
    kind = type(value)
    if kind is str:
        if "\x00" in value:
            raise _SlowPathError
        return value
    if kind is dict:
        if depth >= MAX_DEPTH:
            raise _SlowPathError
        prepared = {}
        for key, item in value.items():
            # code point order is UTF-16 order unless a key has characters past U+D7FF
            if type(key) is not str or "\x00" in key or (not key.isascii() and max(key) > _LAST_BMP_BEFORE_SURROGATES):
                raise _SlowPathError
            prepared[key] = _prepare(item, depth + 1, floats)
        return prepared
    if kind is list or kind is tuple:
        if depth >= MAX_DEPTH:
            raise _SlowPathError
        return [_prepare(item, depth + 1, floats) for item in value]
    if kind is int:
        if not -_MAX_FAST_INT <= value <= _MAX_FAST_INT:
            raise _SlowPathError
        return value
    if kind is float:
        if not math.isfinite(value):
            raise _SlowPathError
        floats.append(_number(value))
        return f"\x00{len(floats) - 1}\x00"
    if value is None or kind is bool:
        return value
    raise _SlowPathError


def _parse_int(text: str) -> int | float:
    value = int(text)
    return value if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER else float(text)


def loads(text: str) -> Any:
    """Parse a stored payload: integers outside ±(2**53 - 1) come back as the double they are
    (a float of 2.4e18 is stored by ``jsonb`` as ``2400000000000000000``)."""
    return json.loads(text, parse_int=_parse_int)


def canonical_v2(
    tenant_id: uuid.UUID, entry_id: uuid.UUID, kind: str, actor: str, subject: str, payload_jcs: str, created_at: str
) -> bytes:
    """The canonical bytes of a queued entry (version 2), from its payload's JCS text."""
    return (
        '{"actor":' + _string(actor) + ',"created_at":"' + created_at + '","id":"' + str(entry_id)
        + '","kind":' + _string(kind) + ',"payload":' + payload_jcs + ',"subject":' + _string(subject)
        + ',"tenant":"' + str(tenant_id) + '"}'
    ).encode("utf-8")  # fmt: skip


def canonical_parts(
    tenant_id: uuid.UUID, kind: str, actor: str, subject: str, payload_jcs: str
) -> tuple[str, str, str]:
    """The version 1 form around ``created_at`` and ``seq``, which the database filled in.

    ``canonical = parts[0] + created_at + parts[1] + str(seq) + parts[2]``: the keys of
    the entry object sort as actor, created_at, kind, payload, seq, subject, tenant.
    """
    return (
        '{"actor":' + _string(actor) + ',"created_at":"',
        '","kind":' + _string(kind) + ',"payload":' + payload_jcs + ',"seq":',
        ',"subject":' + _string(subject) + ',"tenant":"' + str(tenant_id) + '"}',
    )


def canonical_entry(
    tenant_id: uuid.UUID,
    seq: int,
    kind: str,
    actor: str,
    subject: str,
    payload: Any,
    created_at: datetime | str,
    entry_id: uuid.UUID | None = None,
) -> bytes:
    """The canonical bytes of one entry (see the module docstring): version 2 when it has an
    ``entry_id`` (``seq`` is then not part of it), version 1 otherwise."""
    stamp = created_at if isinstance(created_at, str) else format_timestamp(created_at)
    if entry_id is not None:
        return canonical_v2(tenant_id, entry_id, kind, actor, subject, jcs(payload), stamp)
    head, middle, tail = canonical_parts(tenant_id, kind, actor, subject, jcs(payload))
    return (head + stamp + middle + str(seq) + tail).encode("utf-8")


def entry_hash(prev_hash: bytes, canonical: bytes) -> bytes:
    """``SHA-256(prev_hash || canonical)``: the hash chain."""
    return hashlib.sha256(prev_hash + canonical).digest()


def leaf_hash(canonical: bytes) -> bytes:
    """``SHA-256(0x00 || canonical)``: the RFC 6962 Merkle leaf hash."""
    return hashlib.sha256(b"\x00" + canonical).digest()
