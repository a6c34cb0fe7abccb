"""PII guardrail: detection per kind, redaction, the fail-safe guard and the log filter."""

from __future__ import annotations

import json
import logging
import random
import sys
import uuid
from collections.abc import Callable
from typing import Any

import phonenumbers
import pytest

from benchmarks.pii import bench_redaction
from firstmile.kit.telemetry import JsonFormatter
from firstmile.security import pii
from firstmile.security.pii import (
    DEFAULT_NATIONAL_IDS,
    FAILED_MESSAGE,
    DetectorConfig,
    Finding,
    GuardrailBlockedError,
    KnownPii,
    NationalIdPattern,
    PiiDetectionError,
    PiiDetector,
    PiiKind,
    RedactingFilter,
    Redactor,
    aguard,
    current_known,
    guard,
    guarded,
    iban_valid,
    luhn_valid,
    resolve_overlaps,
)

DETECTOR = PiiDetector()
REDACTOR = Redactor(DETECTOR)


def found(text: str, kind: PiiKind, detector: PiiDetector = DETECTOR, known: KnownPii | None = None) -> list[str]:
    """The texts of the findings of ``kind``."""
    return [text[f.start : f.end] for f in detector.detect(text, known) if f.kind is kind]


def boom(*_args: object, **_kwargs: object) -> list[Finding]:
    raise RuntimeError("detector exploded on jane@example.com")


# --------------------------------------------------------------------------- emails


@pytest.mark.parametrize(
    "email",
    [
        "jane@example.com",
        "Jane.Doe+onboarding@mail.example.co.uk",
        "o'brien@example.ie",
        "first_last-99@sub.domain-name.io",
        "JANE@EXAMPLE.COM",
        "zoë@bücher.de",
    ],
)
def test_emails_are_found(email: str) -> None:
    assert found(f'mailto:{email}, "{email}" <{email}>.', PiiKind.EMAIL) == [email] * 3


@pytest.mark.parametrize(
    "text", ["user@localhost", "follow @jane on social", "a@b", "jane@example", "price 5@3.50", "x@1.2"]
)
def test_non_emails_are_not(text: str) -> None:
    assert found(text, PiiKind.EMAIL) == []


# --------------------------------------------------------------------------- phone numbers


@pytest.mark.parametrize(
    ("text", "region", "number"),
    [
        ("call +1 (415) 555-2671 today", "US", "+1 (415) 555-2671"),
        ("call 415.555.2671 today", "US", "415.555.2671"),
        ("call (415) 555 2671 today", "US", "(415) 555 2671"),
        ("call 4155552671 today", "US", "4155552671"),
        ("call +14155552671 today", "US", "+14155552671"),
        ("ring +44 20 7946 0958 today", "US", "+44 20 7946 0958"),
        ("ring 020 7946 0958 today", "GB", "020 7946 0958"),
        ("ring 0049 30 901820 today", "GB", "0049 30 901820"),
        ("anrufen 030 901820 bitte", "DE", "030 901820"),
        ("appelez 01 42 68 53 00 svp", "FR", "01 42 68 53 00"),
        ("appelez +33 1 42 68 53 00 svp", "US", "+33 1 42 68 53 00"),
        ("denwa 03-1234-5678 made", "JP", "03-1234-5678"),
        ("call +91 98765 43210 now", None, "+91 98765 43210"),
    ],
)
def test_phone_numbers_in_several_formats_and_regions(text: str, region: str | None, number: str) -> None:
    detector = PiiDetector(DetectorConfig(default_region=region))
    assert found(text, PiiKind.PHONE, detector) == [number]
    assert REDACTOR.redact(text.replace(number, "X")) == text.replace(number, "X")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("phone (415) 555-2671 3 times", "phone [PHONE] 3 times"),
        ("phone +1 415 555 2671 2 attempts", "phone [PHONE] 2 attempts"),
        ("ids 12 415 555 2671", "ids 12 [PHONE]"),
        ("*+44 121 234 5155[ 2024", "*[PHONE][ 2024"),
    ],
)
def test_phone_next_to_other_numbers_is_found(text: str, expected: str) -> None:
    # PhoneNumberMatcher alone misses all of these; the detector retries digit-group runs.
    assert REDACTOR.redact(text) == expected


def test_digit_heavy_text_is_over_redacted_within_a_budget() -> None:
    text = "1 " * 5000
    findings = DETECTOR.detect(text)
    assert findings and findings[-1].rule == "phone_unchecked" and findings[-1].confidence < 0.5
    redacted = REDACTOR.redact(text)
    assert redacted.endswith("[PHONE] ") and len(redacted) < 100


def test_phone_extension_is_redacted_with_the_number() -> None:
    assert REDACTOR.redact("desk +44 20 7946 0958 ext. 123, thanks") == "desk [PHONE], thanks"


def test_phone_region_is_configurable_and_overridable_per_call() -> None:
    text = "ring 020 7946 0958 today"
    assert found(text, PiiKind.PHONE, PiiDetector(DetectorConfig(default_region="US"))) == []
    assert found(text, PiiKind.PHONE, PiiDetector(DetectorConfig(default_region=None))) == []
    detections = DETECTOR.detect(text, region="GB")
    assert [(f.kind, text[f.start : f.end]) for f in detections] == [(PiiKind.PHONE, "020 7946 0958")]


def test_phone_leniency_is_configurable() -> None:
    text = "call +1 200 555 1234"  # a possible number, but area code 200 is not assigned
    assert found(text, PiiKind.PHONE) == []
    possible = PiiDetector(DetectorConfig(phone_leniency=phonenumbers.Leniency.POSSIBLE))
    assert found(text, PiiKind.PHONE, possible) == ["+1 200 555 1234"]


@pytest.mark.parametrize(
    "text",
    [
        "released 2024-05-01T12:30:45Z",
        "on 2024-05-01 at noon",
        "at 2024/05/01 10:30 and 2024.05.01",
        "version 1.2.3 and build 20240501",
        "order 12345 shipped",
        "epoch 1700000000",
        "request 8f14e45f-ceea-467f-a8f5-012345678901",
        "trace 4bf92f3577b34da6a3ce929d0e0e4736",
        "took 12.5 ms, 3 retries",
    ],
)
def test_phone_negatives(text: str) -> None:
    assert found(text, PiiKind.PHONE) == []


# --------------------------------------------------------------------------- cards


_FULLWIDTH_DIGITS = {ord(d): ord(d) + 0xFEE0 for d in "0123456789"}


def test_luhn() -> None:
    assert luhn_valid("4111 1111 1111 1111")
    assert luhn_valid("79927398713")
    assert not luhn_valid("4111 1111 1111 1112")
    assert not luhn_valid("")
    assert luhn_valid("4111111111111111".translate(_FULLWIDTH_DIGITS))  # fullwidth digits count too


@pytest.mark.parametrize(
    "card",
    [
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "4111111111111111",
        "5555 5555 5555 4444",
        "3782 822463 10005",
        "6011 0009 9013 9424",
        "4222222222222",
        "6304 0000 0000 0000 00",
    ],
)
def test_valid_cards_are_found(card: str) -> None:
    assert luhn_valid(card)
    assert found(f"pay with {card}, exp 12/29", PiiKind.CARD) == [card]


def test_card_followed_by_more_digits_is_still_found() -> None:
    assert found("card 4111 1111 1111 1111 2029 cvv", PiiKind.CARD) == ["4111 1111 1111 1111"]
    assert found("card 4111111111111111 2029", PiiKind.CARD) == ["4111111111111111"]


@pytest.mark.parametrize(
    "text",
    [
        "pay with 4111 1111 1111 1112",  # Luhn fails
        "short 4111 1111 1111",  # 12 digits
        "long 41111111111111111111111",  # 23 digits, one run
        "order 1234-5678-9012-3456",  # Luhn fails
    ],
)
def test_invalid_cards_are_not(text: str) -> None:
    assert found(text, PiiKind.CARD) == []


# --------------------------------------------------------------------------- IBAN


def _with_check_digits(country: str, bban: str) -> str:
    numeric = "".join(str(int(c, 36)) for c in bban + country + "00")
    return f"{country}{98 - int(numeric) % 97:02d}{bban}"


def test_iban_check() -> None:
    assert iban_valid("DE89 3704 0044 0532 0130 00")
    assert iban_valid("GB82WEST12345698765432")
    assert iban_valid("gb82west12345698765432")
    assert not iban_valid("GB82 WEST 1234 5698 7654 33")
    assert not iban_valid("DE89")
    assert not iban_valid("1234567890123456")
    assert _with_check_digits("GB", "WEST12345698765432") == "GB82WEST12345698765432"


@pytest.mark.parametrize(
    "iban",
    [
        "DE89 3704 0044 0532 0130 00",
        "DE89370400440532013000",
        "GB82 WEST 1234 5698 7654 32",
        "GB82WEST12345698765432",
        "FR14 2004 1010 0505 0001 3M02 606",
        "NL91 ABNA 0417 1643 00",
        "NO93 8601 1117 947",
        "CH93 0076 2011 6238 5295 7",
        "gb82 west 1234 5698 7654 32",
    ],
)
def test_valid_ibans_are_found(iban: str) -> None:
    assert found(f"transfer to {iban} by Friday", PiiKind.IBAN) == [iban]
    assert found(f"IBAN:{iban}.", PiiKind.IBAN) == [iban]


def test_iban_of_a_country_missing_from_the_length_table_is_found_by_checksum() -> None:
    iban = _with_check_digits("ZZ", "12345678901234")
    assert iban_valid(iban)
    detections = [f for f in DETECTOR.detect(f"acct {iban} ok") if f.kind is PiiKind.IBAN]
    assert len(detections) == 1 and detections[0].confidence < 0.9


@pytest.mark.parametrize(
    "text",
    [
        "transfer to GB82 WEST 1234 5698 7654 33 by Friday",  # check digits wrong
        "transfer to GB82 WEST 1234 5698 7654 3 by Friday",  # too short for GB
        "transfer to GB82WEST123456987654321 by Friday",  # the token goes on
        "model XY12 ABCD EFGH IJKL MNOP",
    ],
)
def test_invalid_ibans_are_not(text: str) -> None:
    assert found(text, PiiKind.IBAN) == []


def test_two_adjacent_ibans_are_both_found() -> None:
    text = "DE89 3704 0044 0532 0130 00 GB82 WEST 1234 5698 7654 32"
    assert found(text, PiiKind.IBAN) == ["DE89 3704 0044 0532 0130 00", "GB82 WEST 1234 5698 7654 32"]


# --------------------------------------------------------------------------- national ids


@pytest.mark.parametrize("ssn", ["123-45-6789", "123 45 6789", "665-01-0001", "899-99-9999"])
def test_ssns_are_found(ssn: str) -> None:
    assert found(f"ssn on file {ssn}.", PiiKind.NATIONAL_ID) == [ssn]


@pytest.mark.parametrize(
    "text",
    [
        "000-12-3456",  # area 000
        "666-12-3456",  # area 666
        "900-12-3456",  # area 9xx
        "987-65-4321",  # area 9xx (advertising range)
        "123-00-4567",  # group 00
        "123-45-0000",  # serial 0000
        "123-45 6789",  # mixed separators
        "123456789",  # unseparated without a keyword
        "1123-45-6789",  # part of a longer number
        "123-45-67890",
    ],
)
def test_ssn_invalid_ranges_and_shapes_are_not(text: str) -> None:
    assert found(f"id {text} here", PiiKind.NATIONAL_ID) == []


def test_unseparated_ssn_next_to_a_keyword_is_found() -> None:
    assert found("SSN: 123456789", PiiKind.NATIONAL_ID) == ["123456789"]
    assert found("social security number 123456789", PiiKind.NATIONAL_ID) == ["123456789"]
    assert REDACTOR.redact("ssn#123456789 ok") == "ssn#[NATIONAL_ID] ok"
    assert found("SSN: 666456789", PiiKind.NATIONAL_ID) == []


@pytest.mark.parametrize("nino", ["AB 12 34 56 C", "AB123456C", "ab123456c", "JG 10 37 58 A"])
def test_uk_ninos_are_found(nino: str) -> None:
    assert found(f"NI number {nino}.", PiiKind.NATIONAL_ID) == [nino]


@pytest.mark.parametrize("text", ["GB123456A", "QQ123456C", "DA123456A", "AO123456A", "AB123456E", "XAB123456C"])
def test_invalid_ninos_are_not(text: str) -> None:
    assert found(f"NI number {text}.", PiiKind.NATIONAL_ID) == []


def test_configurable_national_id_patterns() -> None:
    ca_sin = NationalIdPattern.from_regex("ca_sin", r"\b\d{3}-\d{3}-\d{3}\b", validate=luhn_valid, confidence=0.7)
    detector = PiiDetector(DetectorConfig(national_ids=(*DEFAULT_NATIONAL_IDS, ca_sin)))
    assert found("SIN 046-454-286 and 123-45-6789", PiiKind.NATIONAL_ID, detector) == ["046-454-286", "123-45-6789"]
    assert found("SIN 046-454-287", PiiKind.NATIONAL_ID, detector) == []  # Luhn fails
    assert found("SIN 046-454-286", PiiKind.NATIONAL_ID) == []  # not in the default list
    only_sin = PiiDetector(DetectorConfig(national_ids=(ca_sin,)))
    assert found("SSN 123-45-6789", PiiKind.NATIONAL_ID, only_sin) == []
    letters = NationalIdPattern.from_regex("code", r"\bSECRET[A-Z]{4}\b", keywords=["secret"], needs_digit=False)
    assert found("the SECRETABCD id", PiiKind.NATIONAL_ID, PiiDetector(DetectorConfig(national_ids=(letters,)))) == [
        "SECRETABCD"
    ]


# --------------------------------------------------------------------------- IP addresses


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("from 203.0.113.77 via proxy", "203.0.113.77"),
        ("remote=10.0.3.17:8443", "10.0.3.17"),
        ("net 192.168.1.0/24", "192.168.1.0"),
        ("dns 8.8.8.8.", "8.8.8.8"),
        ("v6 2001:db8:85a3::8a2e:370:7334 seen", "2001:db8:85a3::8a2e:370:7334"),
        ("v6 2001:0db8:0000:0000:0000:ff00:0042:8329 seen", "2001:0db8:0000:0000:0000:ff00:0042:8329"),
        ("loopback ::1 ok", "::1"),
        ("link fe80::1ff:fe23:4567:890a%eth0 up", "fe80::1ff:fe23:4567:890a%eth0"),
        ("mapped ::ffff:192.0.2.128 ok", "::ffff:192.0.2.128"),
        ("url http://[2001:db8::1]:8080/x", "2001:db8::1"),
        ("at 2001:db8::1.", "2001:db8::1"),
        ("from:2001:db8::1: refused", "2001:db8::1"),
        ("peer=[fe80::1]:443", "fe80::1"),
    ],
)
def test_ip_addresses_are_found(text: str, address: str) -> None:
    assert found(text, PiiKind.IP) == [address]


@pytest.mark.parametrize(
    "text",
    [
        "version 1.2.3.4.5",
        "libfoo 1.2.3.4.5-rc1",
        "999.1.1.1",
        "256.256.256.256",
        "version 1.2.3",
        "v1.2.3.4",
        "Chrome/124.0.0.0 Safari/537.36",
        "at 12:30:45 UTC",
        "2024-05-01T12:30:45.123Z",
        "std::vector<int>",
        "mac 00:1A:2B:3C:4D:5E",
        "ratio 1:2:3",
    ],
)
def test_ip_negatives(text: str) -> None:
    assert found(text, PiiKind.IP) == []


def test_private_addresses_are_less_confident_than_public_ones() -> None:
    by_text = {"10.0.0.1": 0.0, "8.8.8.8": 0.0}
    for finding in DETECTOR.detect("a 10.0.0.1 b 8.8.8.8"):
        by_text["a 10.0.0.1 b 8.8.8.8"[finding.start : finding.end]] = finding.confidence
    assert by_text["10.0.0.1"] < by_text["8.8.8.8"]
    strict = PiiDetector(DetectorConfig(min_confidence=0.8))
    assert found("a 10.0.0.1 b 8.8.8.8", PiiKind.IP, strict) == ["8.8.8.8"]


# --------------------------------------------------------------------------- known name and company


KNOWN = KnownPii(name="Zoë O'Brien-Smith", company="Acme Widgets, Inc.")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hi Zoë O'Brien-Smith!", "Hi [NAME]!"),
        ("hi ZOE OBRIEN-SMITH", "hi [NAME]"),
        ("hi zoe o\u2019brien smith", "hi [NAME]"),
        ("Zoe\u0308 wrote", "[NAME] wrote"),  # decomposed diaeresis
        ("\uff3a\uff2f\u00cb wrote", "[NAME] wrote"),  # fullwidth letters
        ("signed, Smith", "signed, [NAME]"),
        ("O'Brien called", "[NAME] called"),
        ("zoëtrope and Smithson and Zoey", "zoëtrope and Smithson and Zoey"),  # word boundaries
        ("from Acme Widgets, Inc. today", "from [COMPANY] today"),
        ("from ACME WIDGETS today", "from [COMPANY] today"),
        ("Acme Widgets' new plan", "[COMPANY]' new plan"),
        ("an acme of widgets", "an acme of widgets"),
        ("Zoë Smith at Acme Widgets", "[NAME] [NAME] at [COMPANY]"),
    ],
)
def test_known_name_and_company(text: str, expected: str) -> None:
    assert REDACTOR.redact(text, KNOWN) == expected


def test_name_parts_shorter_than_three_characters_are_not_matched_alone() -> None:
    known = KnownPii(name="Al Li Jones")
    assert REDACTOR.redact("Al said Li and Jones agreed", known) == "Al said Li and [NAME] agreed"
    assert REDACTOR.redact("al li jones agreed", known) == "[NAME] agreed"
    assert REDACTOR.redact("Jones", KnownPii(name="Jones", company="IBM")) == "[NAME]"
    assert REDACTOR.redact("at IBM and ibm", KnownPii(company="IBM")) == "at [COMPANY] and [COMPANY]"


def test_name_particles_and_aliases() -> None:
    known = KnownPii(name="Ludwig van Beethoven", aliases=("Lu",))
    assert REDACTOR.redact("van der Berg met Beethoven", known) == "van der Berg met [NAME]"
    assert REDACTOR.redact("Ludwig van Beethoven", known) == "[NAME]"
    assert REDACTOR.redact("hi Lu", known) == "hi [NAME]"


def test_offsets_map_back_to_the_original_text_after_unicode_folding() -> None:
    text = "Ça va? e\u0301 Zoe\u0308 O\u2019Brien-Smith sent \uff21\uff23\uff2d\uff25 widgets"
    findings = DETECTOR.detect(text, KNOWN)
    spans = [(f.kind, text[f.start : f.end]) for f in findings]
    assert (PiiKind.NAME, "Zoe\u0308 O\u2019Brien-Smith") in spans
    assert (PiiKind.COMPANY, "\uff21\uff23\uff2d\uff25 widgets") in spans
    assert REDACTOR.redact(text, KNOWN) == "Ça va? e\u0301 [NAME] sent [COMPANY]"


def test_known_identity_comes_from_the_context_variable() -> None:
    token = current_known.set(KnownPii(name="Jane Doe"))
    try:
        assert REDACTOR.redact("ask Jane") == "ask [NAME]"
        assert REDACTOR.redact_value({"who": "Doe"}) == {"who": "[NAME]"}
    finally:
        current_known.reset(token)
    assert REDACTOR.redact("ask Jane") == "ask Jane"


# --------------------------------------------------------------------------- redaction


def test_findings_are_typed_and_placeholders_typed() -> None:
    text = "jane@example.com 4111 1111 1111 1111 10.0.0.1"
    kinds = [f.kind for f in DETECTOR.detect(text)]
    assert kinds == [PiiKind.EMAIL, PiiKind.CARD, PiiKind.IP]
    assert all(0 < f.confidence <= 1 for f in DETECTOR.detect(text))
    assert REDACTOR.redact(text) == "[EMAIL] [CARD] [IP]"
    assert {k.placeholder for k in PiiKind} == {
        "[EMAIL]",
        "[PHONE]",
        "[CARD]",
        "[IBAN]",
        "[NATIONAL_ID]",
        "[IP]",
        "[NAME]",
        "[COMPANY]",
    }
    custom = Redactor(DETECTOR, placeholders={PiiKind.EMAIL: "<email>"})
    assert custom.redact("x jane@example.com 10.0.0.1") == "x <email> [IP]"


def test_overlaps_resolve_to_one_span_named_by_the_longest() -> None:
    known = KnownPii(name="Jane Doe", company="Example")
    assert REDACTOR.redact("write to jane.doe@example.com", known) == "write to [EMAIL]"
    merged = resolve_overlaps(
        [
            Finding(PiiKind.PHONE, 0, 10, 0.9),
            Finding(PiiKind.CARD, 2, 18, 0.95),
            Finding(PiiKind.NAME, 17, 22, 0.7),
            Finding(PiiKind.IP, 30, 35, 0.9),
        ]
    )
    assert [(f.kind, f.start, f.end) for f in merged] == [(PiiKind.CARD, 0, 22), (PiiKind.IP, 30, 35)]
    same_length = resolve_overlaps([Finding(PiiKind.PHONE, 0, 11, 0.9), Finding(PiiKind.NATIONAL_ID, 0, 11, 0.9)])
    assert [f.kind for f in same_length] == [PiiKind.NATIONAL_ID]


def test_finding_spans_are_checked() -> None:
    with pytest.raises(ValueError, match="invalid finding span"):
        Finding(PiiKind.EMAIL, 5, 5, 1.0)
    with pytest.raises(PiiDetectionError):
        REDACTOR.apply("short", [Finding(PiiKind.EMAIL, 2, 50, 1.0)])


def test_nested_structures_are_redacted() -> None:
    request_id = uuid.uuid4()
    value = {
        "user": {"email": "jane@example.com", "phones": ["+1 415-555-2671", "none"]},
        "jane@example.com": "key holds PII",
        "notes": ("from 203.0.113.9", {"deep": [["card 4111111111111111"]]}),
        "count": 3,
        "big": 4155552671,
        "ratio": 0.5,
        "ok": True,
        "nothing": None,
        "request_id": request_id,
        "obj": _Shows("reach me at jane@example.com"),
        "tags": {"x"},
    }
    out = REDACTOR.redact_value(value)
    assert out == {
        "user": {"email": "[EMAIL]", "phones": ["[PHONE]", "none"]},
        "[EMAIL]": "key holds PII",
        "notes": ("from [IP]", {"deep": [["card [CARD]"]]}),
        "count": 3,
        "big": "[PHONE]",
        "ratio": 0.5,
        "ok": True,
        "nothing": None,
        "request_id": request_id,
        "obj": "reach me at [EMAIL]",
        "tags": ["x"],
    }
    assert value["user"] == {"email": "jane@example.com", "phones": ["+1 415-555-2671", "none"]}  # not mutated
    assert REDACTOR.redact_value("jane@example.com") == "[EMAIL]"
    assert REDACTOR.redact_value(["a", 1]) == ["a", 1]


def test_colliding_redacted_keys_are_kept_apart() -> None:
    out = REDACTOR.redact_value({"a@example.com": 1, "b@example.com": 2, "c@example.com": 3})
    assert out == {"[EMAIL]": 1, "[EMAIL]#2": 2, "[EMAIL]#3": 3}


def test_too_deep_values_fail_rather_than_pass() -> None:
    deep: list[Any] = ["jane@example.com"]
    for _ in range(100):
        deep = [deep]
    with pytest.raises(PiiDetectionError, match="too deeply"):
        REDACTOR.redact_value(deep)
    with pytest.raises(GuardrailBlockedError):
        guard(deep, lambda _v: None)
    with pytest.raises(PiiDetectionError):
        DETECTOR.detect(b"bytes are not text")  # type: ignore[arg-type]


class _Shows:
    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


# --------------------------------------------------------------------------- the fail-safe guard


def test_guard_runs_the_action_on_redacted_text() -> None:
    sent: list[str] = []

    def send(text: str) -> str:
        sent.append(text)
        return "ok"

    assert guard("Jane Doe <jane@example.com>", action=send, known=KnownPii("Jane Doe")) == "ok"
    assert sent == ["[NAME] <[EMAIL]>"]
    payload = {"prompt": "call +1 415-555-2671"}
    assert guard(payload, lambda p: p) == {"prompt": "call [PHONE]"}


def test_guard_blocks_the_action_when_the_detector_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PiiDetector, "detect", boom)
    calls: list[object] = []
    before = _blocked_count("guard")
    with pytest.raises(GuardrailBlockedError) as caught:
        guard("Jane <jane@example.com>", action=calls.append, known=KnownPii("Jane"))
    assert calls == []
    assert "jane@example.com" not in str(caught.value)
    assert caught.value.error_type == "RuntimeError"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert _blocked_count("guard") == before + 1


def test_guard_blocks_on_any_exception_type(monkeypatch: pytest.MonkeyPatch) -> None:
    for error in (ValueError("x"), RecursionError(), MemoryError(), KeyError("k")):

        def raising(*_a: object, _error: Exception = error, **_k: object) -> list[Finding]:
            raise _error

        monkeypatch.setattr(PiiDetector, "detect", raising)
        calls: list[object] = []
        with pytest.raises(GuardrailBlockedError):
            guard({"nested": ["text"]}, calls.append)
        assert calls == []


def test_guard_lets_errors_from_the_action_itself_through() -> None:
    def fails(_text: str) -> None:
        raise ConnectionError("llm down")

    with pytest.raises(ConnectionError):
        guard("hello", fails)


async def test_async_guard_blocks_without_creating_the_coroutine(monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[str] = []

    async def send(text: str) -> str:
        created.append(text)
        return text.upper()

    assert await aguard("mail jane@example.com", send) == "MAIL [EMAIL]"
    monkeypatch.setattr(PiiDetector, "detect", boom)
    with pytest.raises(GuardrailBlockedError):
        await aguard("mail jane@example.com", send)
    assert created == ["mail [EMAIL]"]


async def test_guarded_decorator_sync_and_async(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, str]] = []

    @guarded("prompt", known_param="user")
    def complete(prompt: str, system: str, *, user: KnownPii | None = None) -> str:
        seen.append((prompt, system))
        return "done"

    @guarded()
    async def acomplete(prompt: str) -> str:
        seen.append((prompt, "async"))
        return "adone"

    assert complete("Jane at jane@example.com", "keep jane@example.com", user=KnownPii("Jane")) == "done"
    assert await acomplete("ip 203.0.113.9") == "adone"
    assert seen == [("[NAME] at [EMAIL]", "keep jane@example.com"), ("ip [IP]", "async")]

    monkeypatch.setattr(PiiDetector, "detect", boom)
    with pytest.raises(GuardrailBlockedError):
        complete("Jane", "s")
    with pytest.raises(GuardrailBlockedError):
        await acomplete("Jane")
    assert len(seen) == 2  # neither ran
    with pytest.raises(TypeError):
        complete()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="no parameter"):
        guarded("missing")(lambda text: text)


def test_guarded_methods_redact_the_first_argument_after_self() -> None:
    class Client:
        def __init__(self) -> None:
            self.sent: list[str] = []

        @guarded()
        def send(self, prompt: str) -> None:
            self.sent.append(prompt)

    client = Client()
    client.send("mail jane@example.com")
    assert client.sent == ["mail [EMAIL]"]


def _blocked_count(site: str) -> float:
    value = pii.GUARDRAIL_BLOCKED.labels(site=site)._value.get()
    return float(value)


# --------------------------------------------------------------------------- logging


def _record(msg: str, *args: object, fields: dict[str, Any] | None = None, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("bad card 4111 1111 1111 1111")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("firstmile.test", logging.INFO, __file__, 1, msg, args or None, exc_info)
    if fields is not None:
        record.fields = fields
    return record


def test_logging_filter_redacts_message_fields_and_traceback() -> None:
    record = _record(
        "signup from %s (%s)",
        "jane@example.com",
        "203.0.113.9",
        fields={"phone": "+1 415-555-2671", "status": 201, "nested": {"iban": "GB82 WEST 1234 5698 7654 32"}},
        exc=True,
    )
    assert RedactingFilter().filter(record) is True
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert entry["msg"] == "signup from [EMAIL] ([IP])"
    assert entry["phone"] == "[PHONE]" and entry["status"] == 201
    assert entry["nested"] == {"iban": "[IBAN]"}
    assert "ValueError: bad card [CARD]" in entry["exc"]
    for secret in ("jane@example.com", "203.0.113.9", "555-2671", "WEST", "4111"):
        assert secret not in line


def test_logging_filter_uses_the_current_user_and_is_idempotent() -> None:
    token = current_known.set(KnownPii(name="Jane Doe", company="Initech"))
    try:
        record = _record("Jane from Initech finished step %d", 3)
        log_filter = RedactingFilter()
        log_filter.filter(record)
        log_filter.filter(record)
        assert record.getMessage() == "[NAME] from [COMPANY] finished step 3"
    finally:
        current_known.reset(token)


def test_logging_filter_can_keep_the_traceback_in_exc_text() -> None:
    record = _record("failed", exc=True)
    RedactingFilter(exc_field=None).filter(record)
    assert record.exc_info is None
    assert record.exc_text is not None and "[CARD]" in record.exc_text
    assert "4111" not in logging.Formatter().format(record)


def test_logging_filter_failure_replaces_the_record(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PiiDetector, "detect", boom)
    record = _record("user %s", "jane@example.com", fields={"email": "jane@example.com"}, exc=True)
    before = _blocked_count("log")
    assert RedactingFilter().filter(record) is True
    line = JsonFormatter().format(record)
    assert "jane@example.com" not in line and "4111" not in line
    entry = json.loads(line)
    assert entry["msg"] == FAILED_MESSAGE
    assert entry["pii_redaction"] == "failed"
    assert "exc" not in entry
    assert _blocked_count("log") == before + 1


def test_logging_filter_end_to_end_through_a_handler(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("firstmile.test.pii")
    caplog.handler.addFilter(RedactingFilter())
    try:
        with caplog.at_level(logging.INFO, logger="firstmile.test.pii"):
            logger.info("contact %s", "jane@example.com", extra={"fields": {"ip": "203.0.113.9"}})
    finally:
        caplog.handler.filters.clear()
    assert caplog.messages == ["contact [EMAIL]"]
    assert caplog.records[0].fields == {"ip": "[IP]"}  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- property: nothing survives


_FILLER = [
    "the",
    "a",
    "onboarding",
    "step",
    "user",
    "account",
    "workspace",
    "please",
    "note",
    "invoice",
    "order",
    "id",
    "ref",
    "status",
    "done",
    "pending",
    "retry",
    "42",
    "7",
    "2024",
    "v2",
    "ok",
    "ship",
    "via",
    "to",
    "from",
    "at",
    "on",
    "for",
    "with",
    "and",
    "or",
    "not",
]
_SEPARATORS = [
    " ",
    " ",
    " ",
    ", ",
    "; ",
    " (",
    ") ",
    "\n",
    ": ",
    ' "',
    '" ',
    " <",
    "> ",
    " - ",
    "=",
    "/",
    "_",
    "[",
    "]",
    ":",
    "|",
    "\t",
    "*",
    "#",
]
_FIRST = ["Jane", "Zoë", "Oliver", "Amélie", "Rajesh", "Siobhan", "Björn", "Mateo"]
_LAST = ["Doe", "O'Brien", "Müller", "Okafor", "García-Lopez", "Nakamura", "Kowalski"]
_COMPANIES = ["Initech Inc.", "Globex Corporation", "Umbrella GmbH", "Stark Industries", "Hooli"]


def _luhn_complete(rng: random.Random, prefix: str, length: int) -> str:
    body = prefix + "".join(str(rng.randrange(10)) for _ in range(length - len(prefix) - 1))
    check = next(d for d in "0123456789" if luhn_valid(body + d))
    return body + check


def _card(rng: random.Random) -> str:
    prefix, length = rng.choice([("4", 16), ("51", 16), ("37", 15), ("6011", 16), ("4", 13)])
    digits = _luhn_complete(rng, prefix, length)
    style = rng.choice(["plain", "space", "dash"])
    if style == "plain" or length != 16:
        return digits
    groups = [digits[i : i + 4] for i in range(0, 16, 4)]
    return (" " if style == "space" else "-").join(groups)


def _iban(rng: random.Random) -> str:
    country, bban_len = rng.choice([("DE", 18), ("GB", 18), ("FR", 23), ("NL", 14), ("ES", 20)])
    if country in ("GB", "NL"):
        bban = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4))
        bban += "".join(str(rng.randrange(10)) for _ in range(bban_len - 4))
    else:
        bban = "".join(str(rng.randrange(10)) for _ in range(bban_len))
    iban = _with_check_digits(country, bban)
    if rng.random() < 0.5:
        iban = " ".join(iban[i : i + 4] for i in range(0, len(iban), 4))
    return iban


def _phone(rng: random.Random) -> str:
    region = rng.choice(["US", "GB", "DE", "FR", "IN", "AU"])
    while True:
        number = phonenumbers.example_number(region)
        assert number is not None
        national = str(number.national_number)
        mutated = national[:-3] + "".join(str(rng.randrange(10)) for _ in range(3))
        candidate = phonenumbers.parse(f"+{number.country_code}{mutated}")
        if phonenumbers.is_valid_number(candidate):
            break
    formats = [phonenumbers.PhoneNumberFormat.E164, phonenumbers.PhoneNumberFormat.INTERNATIONAL]
    if region == "US":
        formats.append(phonenumbers.PhoneNumberFormat.NATIONAL)
    return phonenumbers.format_number(candidate, rng.choice(formats))


def _ssn(rng: random.Random) -> str:
    area = rng.choice([a for a in range(1, 900) if a != 666])
    sep = rng.choice("- ")
    return f"{area:03d}{sep}{rng.randint(1, 99):02d}{sep}{rng.randint(1, 9999):04d}"


def _nino(rng: random.Random) -> str:
    first = rng.choice("ABCEGHJKLMNOPRSTWXYZ")
    second = rng.choice("ABCEGHJKLMNPRSTWXYZ")
    if first + second in {"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"}:
        first, second = "A", "B"
    digits = "".join(str(rng.randrange(10)) for _ in range(6))
    return f"{first}{second}{digits}{rng.choice('ABCD')}"


def _email(rng: random.Random) -> str:
    local = rng.choice(["jane", "j.doe", "ops+alerts", "zoë", "first_last99"])
    domain = rng.choice(["example.com", "mail.example.co.uk", "bücher.de", "corp-x.io"])
    return f"{local}@{domain}"


def _ip(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return ".".join(str(rng.randrange(256)) for _ in range(4))
    groups = [f"{rng.randrange(65536):x}" for _ in range(8)]
    if rng.random() < 0.5:
        return ":".join(groups[:3]) + "::" + groups[7]
    return ":".join(groups)


_GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "card": _card,
    "iban": _iban,
    "phone": _phone,
    "ssn": _ssn,
    "nino": _nino,
    "email": _email,
    "ip": _ip,
}


@pytest.mark.parametrize("seed", range(8))
def test_generated_pii_never_survives_redaction(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(40):
        name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        company = rng.choice(_COMPANIES)
        known = KnownPii(name=name, company=company)
        secrets: list[str] = []
        words: list[str] = []
        for _ in range(rng.randint(3, 8)):
            words.extend(rng.choice(_FILLER) for _ in range(rng.randint(0, 6)))
            kind = rng.choice([*_GENERATORS, "name", "company"])
            if kind == "name":
                secret = rng.choice([name, name.upper(), name.lower(), name.split()[-1]])
            elif kind == "company":
                secret = rng.choice([company, company.split()[0].upper()])
            else:
                secret = _GENERATORS[kind](rng)
            secrets.append(secret)
            words.append(f"{rng.choice(_SEPARATORS)}{secret}{rng.choice(_SEPARATORS)}")
        text = " ".join(words)
        redacted = REDACTOR.redact(text, known)
        for secret in secrets:
            assert secret not in redacted, f"{secret!r} survived in {redacted!r} (from {text!r})"
        assert REDACTOR.redact_value({"text": text, "list": [text]}, known) == {"text": redacted, "list": [redacted]}


# --------------------------------------------------------------------------- benchmark


def test_benchmark_reports_a_markdown_table() -> None:
    report = bench_redaction(n_lines=40, repeats=1)
    assert "| Pass | lines/s |" in report
    assert "baseline" in report and "full redaction" in report
