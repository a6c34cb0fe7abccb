"""PII guardrail: find personal data in text, redact it, and fail safe.

Used before any text leaves the process for an LLM or a log:

* :class:`PiiDetector` returns typed :class:`Finding` spans for emails, phone
  numbers (``phonenumbers``), payment cards (Luhn), IBANs (ISO 13616 mod-97),
  national identifiers (US SSN, UK NINO and any configured pattern), IPv4/IPv6
  addresses (validated with :mod:`ipaddress`) and the user's own known name and
  company (:class:`KnownPii`).
* :class:`Redactor` replaces findings with typed placeholders (``[EMAIL]`` …),
  in strings and in nested JSON-like values.
* :func:`guard`, :func:`aguard` and :func:`guarded` run an action on the
  redacted payload only; if detection or redaction raises anything, the action
  is not run and :class:`GuardrailBlockedError` is raised instead.
* :class:`RedactingFilter` redacts log records (message, ``fields``, traceback)
  and writes ``[REDACTION FAILED]`` instead of the message when it cannot.

The detector favours recall: overlapping findings are merged into one span so
that no fragment of a finding survives, and a false positive costs a
placeholder, a false negative a leak.
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import functools
import inspect
import ipaddress
import logging
import re
import unicodedata
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ParamSpec, TypeVar, cast

import phonenumbers
from prometheus_client import Counter

__all__ = [
    "DEFAULT_NATIONAL_IDS",
    "FAILED_MESSAGE",
    "UK_NINO",
    "US_SSN",
    "US_SSN_KEYWORD",
    "DetectorConfig",
    "Finding",
    "GuardrailBlockedError",
    "KnownPii",
    "NationalIdPattern",
    "PiiDetectionError",
    "PiiDetector",
    "PiiKind",
    "RedactingFilter",
    "Redactor",
    "aguard",
    "current_known",
    "default_redactor",
    "guard",
    "guarded",
    "iban_valid",
    "luhn_valid",
    "resolve_overlaps",
]

log = logging.getLogger("firstmile.security.pii")

GUARDRAIL_BLOCKED = Counter(
    "firstmile_pii_guardrail_blocked_total",
    "Actions blocked or log records replaced because PII detection failed, by site.",
    ["site"],
)

FAILED_MESSAGE = "[REDACTION FAILED]"

J = TypeVar("J")
R = TypeVar("R")
P = ParamSpec("P")


class PiiKind(StrEnum):
    """What a finding is; its placeholder is ``[NAME_OF_THE_MEMBER]``."""

    EMAIL = "email"
    PHONE = "phone"
    CARD = "card"
    IBAN = "iban"
    NATIONAL_ID = "national_id"
    IP = "ip"
    NAME = "name"
    COMPANY = "company"

    @property
    def placeholder(self) -> str:
        return f"[{self.name}]"


# Tie-break between overlapping findings of equal length: the more specific
# (checksummed, structured) kind names the merged span.
_SPECIFICITY: dict[PiiKind, int] = {
    PiiKind.IBAN: 8,
    PiiKind.CARD: 7,
    PiiKind.NATIONAL_ID: 6,
    PiiKind.EMAIL: 5,
    PiiKind.IP: 4,
    PiiKind.PHONE: 3,
    PiiKind.NAME: 2,
    PiiKind.COMPANY: 1,
}


@dataclass(frozen=True, slots=True)
class Finding:
    """A span ``text[start:end]`` holding personal data of ``kind``.

    ``rule`` says which check found it (``"luhn"``, ``"us_ssn"``, ``"ipv6"``,
    ``"full_name"`` …). The matched text itself is not kept.
    """

    kind: PiiKind
    start: int
    end: int
    confidence: float
    rule: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"invalid finding span {self.start}..{self.end}")


class PiiDetectionError(RuntimeError):
    """Detection could not complete (bad input shape, too deep, ...)."""


class GuardrailBlockedError(RuntimeError):
    """PII detection failed, so the guarded action was not run.

    The message names only the failure's type, never the text; the original
    exception is deliberately not chained (its message may quote the text).
    """

    def __init__(self, error_type: str) -> None:
        super().__init__(f"PII detection failed ({error_type}); the guarded action was blocked")
        self.error_type = error_type


# --------------------------------------------------------------------------- known identity


@dataclass(frozen=True, slots=True)
class KnownPii:
    """What we already know about the user the text is about.

    ``name`` ("Firstname Lastname") is matched whole and by parts of at least
    :attr:`DetectorConfig.min_name_part` characters; ``company`` whole and
    without its legal suffix ("Acme" for "Acme Corp."). Matching is
    case-insensitive, on word boundaries, and ignores accents and Unicode
    compatibility forms ("Zoe" and "ＺＯË" both match "Zoë").
    """

    name: str | None = None
    company: str | None = None
    aliases: tuple[str, ...] = ()


current_known: contextvars.ContextVar[KnownPii | None] = contextvars.ContextVar("pii_known", default=None)
"""The user the current unit of work is about; used when no ``known`` is passed."""


# --------------------------------------------------------------------------- validators


def _ascii_digits(text: str) -> str:
    """Digits of ``text`` as ASCII (``\\d`` also matches e.g. fullwidth digits)."""
    digits = "".join(ch for ch in text if ch.isdigit())
    if digits.isascii():
        return digits
    return "".join(str(unicodedata.digit(ch)) for ch in digits)


_LUHN_DOUBLED = {str(d): (2 * d if d < 5 else 2 * d - 9) for d in range(10)}


def luhn_valid(number: str) -> bool:
    """The Luhn (mod 10) check over the digits of ``number``."""
    digits = _ascii_digits(number)
    return bool(digits) and _luhn_digits(digits)


def _luhn_digits(digits: str) -> bool:
    """Luhn over a string of ASCII digits."""
    total = sum(map(int, digits[-1::-2])) + sum(map(_LUHN_DOUBLED.__getitem__, digits[-2::-2]))
    return total % 10 == 0


# ISO 13616 registry: IBAN length by country.
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21,
    "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28,
    "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22,
    "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25,
    "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip


def iban_valid(iban: str) -> bool:
    """ISO 13616 check: 15-34 alphanumerics, country letters, mod 97 == 1.

    Spaces and dashes are ignored; the per-country length is not enforced here
    (the detector does that).
    """
    compact = iban.replace(" ", "").replace("-", "").upper()
    if not 15 <= len(compact) <= 34 or not compact.isascii() or not compact.isalnum():
        return False
    if not (compact[:2].isalpha() and compact[2:4].isdigit()):
        return False
    rearranged = compact[4:] + compact[:4]
    remainder = 0
    for char in rearranged:
        # Letters are 10..35; fold digit by digit to keep the integers small.
        for digit in str(int(char, 36)):
            remainder = (remainder * 10 + ord(digit) - 48) % 97
    return remainder == 1


# --------------------------------------------------------------------------- national ids


@dataclass(frozen=True, slots=True)
class NationalIdPattern:
    """A national-identifier pattern; the span is group ``id`` if present.

    ``validate`` (optional) gets the matched identifier and returns whether it
    is plausible (a checksum, a range check). ``keywords`` is a cheap
    pre-check: the pattern only runs on text containing one of them,
    case-insensitively; with ``needs_digit`` (the default) only on text
    containing a digit.
    """

    name: str
    pattern: re.Pattern[str]
    confidence: float = 0.8
    validate: Callable[[str], bool] | None = None
    keywords: tuple[str, ...] = ()
    needs_digit: bool = True

    @classmethod
    def from_regex(
        cls,
        name: str,
        regex: str,
        *,
        flags: int = 0,
        confidence: float = 0.8,
        validate: Callable[[str], bool] | None = None,
        keywords: Iterable[str] = (),
        needs_digit: bool = True,
    ) -> NationalIdPattern:
        folded = tuple(k.casefold() for k in keywords)
        return cls(name, re.compile(regex, flags), confidence, validate, folded, needs_digit)


# Patterns start with a character class and check what precedes it with a
# lookbehind *after* it: that lets the regex engine skip ahead to candidate
# characters instead of trying every position.

# US SSN, written 123-45-6789 or 123 45 6789. Area 000, 666 and 900-999,
# group 00 and serial 0000 are never issued.
US_SSN = NationalIdPattern.from_regex(
    "us_ssn",
    r"\d(?<![\d-]\d)\d\d(?<!000)(?<!666)(?<!9\d\d)([- ])\d\d(?<!00)\1\d{4}(?<!0000)(?![\d-])",
    confidence=0.9,
)
# An unseparated SSN only next to a keyword ("SSN: 123456789").
US_SSN_KEYWORD = NationalIdPattern.from_regex(
    "us_ssn",
    r"\b(?:ssn|social\s+security(?:\s+(?:number|no\.?|num\.?))?)\s*(?:number|no\.?|\#)?\s*[:=#]?\s*"
    r"(?P<id>(?!000|666|9\d\d)\d{3}(?!00)\d{2}(?!0000)\d{4})(?!\d)",
    flags=re.IGNORECASE,
    confidence=0.85,
    keywords=("ssn", "social security"),
)
# UK National Insurance number, QQ 12 34 56 C: first letter not D F I Q U V,
# second not D F I O Q U V, and BG GB KN NK NT TN ZZ are never issued.
_NINO_UNISSUED = frozenset({"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"})
UK_NINO = NationalIdPattern.from_regex(
    "uk_nino",
    r"[A-CEGHJ-PR-TW-Za-ceghj-pr-tw-z](?<![A-Za-z0-9][A-Za-z])[A-CEGHJ-NPR-TW-Za-ceghj-npr-tw-z]"
    r" ?\d{2} ?\d{2} ?\d{2} ?[A-Da-d](?![A-Za-z0-9])",
    confidence=0.85,
    validate=lambda value: value[:2].upper() not in _NINO_UNISSUED,
)
DEFAULT_NATIONAL_IDS: tuple[NationalIdPattern, ...] = (US_SSN, US_SSN_KEYWORD, UK_NINO)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    """Detector settings.

    ``default_region`` is the region nationally written phone numbers are
    read in (numbers written with a leading ``+`` are found whatever the
    region); ``None`` finds ``+`` numbers only. ``phone_leniency`` is a
    :class:`phonenumbers.Leniency` value. Phone candidates with fewer than
    ``phone_min_digits`` digits are not handed to ``phonenumbers``.
    ``national_ids`` replaces the default national-id patterns (add to
    :data:`DEFAULT_NATIONAL_IDS` to extend them). Findings below
    ``min_confidence`` are dropped.
    """

    default_region: str | None = "US"
    phone_leniency: int = phonenumbers.Leniency.VALID
    phone_min_digits: int = 7
    national_ids: tuple[NationalIdPattern, ...] = DEFAULT_NATIONAL_IDS
    kinds: frozenset[PiiKind] = field(default_factory=lambda: frozenset(PiiKind))
    min_name_part: int = 3
    min_confidence: float = 0.0


# --------------------------------------------------------------------------- patterns

# Emails are found from each "@": the local part is walked back over these
# characters (plus any letter or digit), the domain matched forward.
_EMAIL_LOCAL = frozenset("_.+-'!#$%*^`{|}~")
_EMAIL_DOMAIN = re.compile(r"(?:[^\W_][\w-]{0,62}\.)+[^\W\d_]{2,63}(?![^\W_]|-)")
# A run of digits with single space/dash separators, at least 13 digits.
_CARD_RUN = re.compile(r"\d(?<!\d\d)(?:[ -]?\d){12,}")
_CARD_SEPARATOR = re.compile(r"[ -]")
_CARD_ISSUER = re.compile(r"4|5[1-5]|2[2-7]|3[47]|3[0689]|6(?:011|4[4-9]|5)|35|62|8[0-9]|50|5[6-8]|6[37]")
# IBAN candidates: matched from the check digits (rarer than letters, so
# faster to scan for); the two country letters are behind the match start.
_IBAN_BODY = re.compile(r"\d(?<=[A-Za-z]{2}\d)(?<![A-Za-z0-9][A-Za-z]{2}\d)\d(?:[ -]?[A-Za-z0-9]){11,30}")
# Four dotted octets, not part of a longer dotted run (1.2.3.4.5) nor a
# product/version token (Chrome/124.0.0.0). An underscore is a boundary, as
# it is for every kind here (ip_10.0.0.1, jane_doe).
_IPV4 = re.compile(r"\d(?<![^\W_]\d)(?<!\.\d)(?<![A-Za-z]/\d)\d{0,2}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\.?\d)(?![^\W_])")
# IPv6 candidates grow from two colons around at most four hex digits.
_IPV6_HINT = re.compile(r":[0-9A-Fa-f]{0,4}:")
_IPV6_CHARS = frozenset("0123456789abcdefABCDEF:")
_IPV6_ZONE = re.compile(r"%[\w.-]{1,32}")
_HEX = re.compile(r"[0-9A-Fa-f]")
_PHONE_SEPARATORS = r"[ \t\-./()\u2010-\u2015\u2212\u30fc\uff0d\uff0e]"
_PHONE_EXTENSION = r"(?:[ \t]*(?:[eE][xX][tT]\.?|[xX]|\#)[ \t]*\d{1,7})?"
_PHONE_CONTEXT = 4  # characters of context phonenumbers needs either side of a candidate
_PHONE_LEAD = frozenset("+(\uff0b\uff08[")
_PHONE_MAX_DIGITS = 17  # E.164 allows 15, plus room for a trunk or IDD prefix
_PHONE_MAX_CANDIDATE = 64  # characters; longer digit runs are only tried group by group
_PHONE_MAX_WINDOW = 160  # characters handed to one PhoneNumberMatcher
_PHONE_BASE_CALLS = 32  # PhoneNumberMatcher calls per text, plus one per ...
_PHONE_CHARS_PER_CALL = 128  # ... this many characters of text
_DIGITS = re.compile(r"\d+")
# Candidates made only of digits and plain hyphens offer phonenumbers no
# place to look for a shorter number inside them.
_PHONE_UNSPLITTABLE = re.compile(r"[\d\-\u2010\u2011\u2212]+")
# Calendar dates (2025-06-12, 2025/06/12 10 before ":30") are not numbers to dial.
_DATE_LIKE = re.compile(r"(?:19|20)\d\d([-/.])(?:0[1-9]|1[0-2])\1(?:0[1-9]|[12]\d|3[01])(?P<hour> [0-2]\d)?")


@functools.lru_cache(maxsize=16)
def _phone_candidates(min_digits: int) -> re.Pattern[str]:
    return re.compile(rf"\d(?:{_PHONE_SEPARATORS}{{0,3}}\d){{{max(min_digits - 1, 1)},}}{_PHONE_EXTENSION}")


def _ascii_letter(char: str) -> bool:
    return char.isascii() and char.isalpha()


class _PhoneBudget:
    """How many more PhoneNumberMatcher calls one text may cost."""

    __slots__ = ("left",)

    def __init__(self, calls: int) -> None:
        self.left = calls

    def spend(self) -> bool:
        self.left -= 1
        return self.left >= 0


def _unchecked_phone(start: int, end: int) -> Finding:
    return Finding(PiiKind.PHONE, start, end, 0.3, "phone_unchecked")


# --------------------------------------------------------------------------- unicode folding

_APOSTROPHES = frozenset("'\u2019\u2018\u02bc`\u00b4")


@functools.lru_cache(maxsize=4096)
def _fold_char(char: str) -> str:
    if char in _APOSTROPHES:
        return "'"
    decomposed = unicodedata.normalize("NFKD", char)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def _fold(text: str) -> str:
    """Accent- and compatibility-folded text (case is handled by the regexes)."""
    if text.isascii():
        return text.replace("`", "'")
    return "".join(_fold_char(c) for c in text)


def _fold_with_map(text: str) -> tuple[str, list[int]]:
    """Folded text and, for each folded character, the original index."""
    out: list[str] = []
    owner: list[int] = []
    for index, char in enumerate(text):
        folded = _fold_char(char)
        out.append(folded)
        owner.extend([index] * len(folded))
    return "".join(out), owner


_NAME_PARTICLES = frozenset(
    {"van", "von", "der", "den", "del", "della", "des", "dos", "das", "die", "bin", "ibn", "the", "and"}
)
# Legal forms and generic descriptors stripped from a company name to find
# its distinctive core ("Acme" in "Acme Industries, Inc.").
_LEGAL_SUFFIX = re.compile(
    r"[\s,]+(?:inc|incorporated|ltd|limited|llc|llp|lp|plc|gmbh|ag|sa|sas|sarl|srl|spa|bv|nv|oy|ab|as|asa|aps|"
    r"co|corp|corporation|company|pty|pte|kk|kg|se|group|holdings?|industries|technologies|technology|tech|"
    r"solutions|systems|software|labs|services|international|partners|ventures|enterprises|consulting)\.?$",
    re.IGNORECASE,
)


def _term_regex(term: str) -> str:
    """A regex for a folded term: words joined by any run of whitespace, ``-``,
    ``_`` or ``.`` (jane_doe, jane.doe); optional apostrophes and dots."""
    pieces: list[str] = []
    for token in term.split():
        chars = []
        for char in token:
            if char == "'":
                chars.append("'?")
            elif char == ".":
                chars.append(r"\.?")
            elif char == "-":
                chars.append(r"[-\s]?")
            else:
                chars.append(re.escape(char))
        pieces.append("".join(chars))
    return r"[\s\-_.]+".join(pieces)


def _alternation(terms: Iterable[str]) -> str:
    unique = sorted({t for t in terms if t}, key=lambda t: (-len(t), t))
    return "|".join(_term_regex(t) for t in unique)


@dataclass(frozen=True, slots=True)
class _KnownPatterns:
    name: re.Pattern[str] | None
    company: re.Pattern[str] | None
    # Casefolded literals, one of which any match contains: a cheap pre-check.
    name_anchors: tuple[str, ...] = ()
    company_anchors: tuple[str, ...] = ()


def _anchors(terms: Iterable[str]) -> tuple[str, ...]:
    """For each term its longest piece between optional characters."""
    return tuple({max(re.split(r"['.\-\s]+", term.casefold()), key=len) for term in terms if term.strip(" '.-")} - {""})


@functools.lru_cache(maxsize=1024)
def _known_patterns(known: KnownPii, min_part: int) -> _KnownPatterns:
    full_names: set[str] = set()
    parts: set[str] = set()
    for raw in (known.name, *known.aliases):
        if not raw:
            continue
        folded = " ".join(_fold(raw).split())
        if len(folded) >= 2:
            full_names.add(folded)
        for token in folded.split():
            candidates = {token, *token.split("-")}
            parts.update(
                p for p in candidates if len(p.replace("'", "")) >= min_part and p.casefold() not in _NAME_PARTICLES
            )
    name_pattern = None
    name_anchors = _anchors(full_names | parts)
    if full_names or parts:
        alternatives = [f"(?P<full>{_alternation(full_names)})"] if full_names else []
        if parts - full_names:
            alternatives.append(f"(?P<part>{_alternation(parts - full_names)})")
        name_pattern = re.compile(rf"(?<![^\W_])(?:{'|'.join(alternatives)})(?![^\W_])", re.IGNORECASE)

    company_pattern = None
    company_terms: list[str] = []
    if known.company:
        full = " ".join(_fold(known.company).split())
        core = full
        while (stripped := _LEGAL_SUFFIX.sub("", core)) != core:
            core = stripped.rstrip(" ,")
        alternatives = []
        if len(full) >= 2:
            alternatives.append(f"(?P<full>{_alternation([full])})")
            company_terms.append(full)
        if core != full and len(core) >= min_part:
            alternatives.append(f"(?P<core>{_alternation([core])})")
            company_terms.append(core)
        if alternatives:
            company_pattern = re.compile(rf"(?<![^\W_])(?:{'|'.join(alternatives)})(?![^\W_])", re.IGNORECASE)
    return _KnownPatterns(name_pattern, company_pattern, name_anchors, _anchors(company_terms))


# --------------------------------------------------------------------------- detector


class PiiDetector:
    """Finds personal data in text. Stateless and thread-safe; reuse one."""

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()
        self._phone_candidates = _phone_candidates(self.config.phone_min_digits)

    def detect(self, text: str, known: KnownPii | None = None, *, region: str | None = None) -> list[Finding]:
        """All findings in ``text``, sorted by position (they may overlap).

        ``region`` overrides the configured default phone region for this call.
        """
        if not isinstance(text, str):
            raise PiiDetectionError(f"expected str, got {type(text).__name__}")
        if not text:
            return []
        kinds = self.config.kinds
        findings: list[Finding] = []
        if PiiKind.EMAIL in kinds and "@" in text:
            findings.extend(self._emails(text))
        has_digit = _has_digit(text)
        if has_digit:
            if PiiKind.CARD in kinds:
                findings.extend(self._cards(text))
            if PiiKind.IBAN in kinds:
                findings.extend(self._ibans(text))
            if PiiKind.IP in kinds:
                findings.extend(self._ips(text))
        if PiiKind.NATIONAL_ID in kinds:
            findings.extend(self._national_ids(text, has_digit))
        if PiiKind.PHONE in kinds and has_digit:
            findings.extend(self._phones(text, region or self.config.default_region, findings))
        if known is not None and (PiiKind.NAME in kinds or PiiKind.COMPANY in kinds):
            findings.extend(self._known(text, known))
        if self.config.min_confidence > 0:
            findings = [f for f in findings if f.confidence >= self.config.min_confidence]
        findings.sort(key=lambda f: (f.start, -f.end))
        return findings

    # -- emails

    @staticmethod
    def _emails(text: str) -> Iterable[Finding]:
        at = text.find("@")
        while at != -1:
            start = at
            while start > 0 and (text[start - 1].isalnum() or text[start - 1] in _EMAIL_LOCAL):
                start -= 1
            while start < at and not (text[start].isalnum() or text[start] == "_"):
                start += 1  # the local part starts with a letter, digit or underscore
            domain = _EMAIL_DOMAIN.match(text, at + 1)
            if start < at and domain is not None:
                yield Finding(PiiKind.EMAIL, start, domain.end(), 0.95, "email")
                at = text.find("@", domain.end())
            else:
                at = text.find("@", at + 1)

    # -- cards

    def _cards(self, text: str) -> Iterable[Finding]:
        for run in _CARD_RUN.finditer(text):
            # Windows of whole digit groups holding 13-19 digits, longest valid
            # first. Cards are printed in groups of 3 or more digits (4-4-4-4,
            # 4-6-5) except perhaps the last (4-4-4-4-2): a shorter group can
            # only end a window.
            groups = [(m.start(), m.end(), _ascii_digits(m.group())) for m in _DIGITS.finditer(text, *run.span())]
            taken_until = -1
            for i, (first_start, _, _) in enumerate(groups):
                if first_start < taken_until or len(groups[i][2]) < 3:
                    continue
                best: tuple[int, int, str] | None = None
                digits = ""
                for j in range(i, len(groups)):
                    digits += groups[j][2]
                    if len(digits) > 19:
                        break
                    if len(digits) >= 13 and _luhn_digits(digits):
                        best = (first_start, groups[j][1], digits)
                    if len(groups[j][2]) < 3:
                        break
                if best is not None:
                    start, end, digits = best
                    confidence = 0.95 if _CARD_ISSUER.match(digits) and len(set(digits)) > 1 else 0.7
                    yield Finding(PiiKind.CARD, start, end, confidence, "luhn")
                    taken_until = end

    # -- IBAN

    def _ibans(self, text: str) -> Iterable[Finding]:
        pos = 0
        while (match := _IBAN_BODY.search(text, pos)) is not None:
            found = self._iban_at(text, match.start() - 2, match.end())
            if found is None:
                pos = match.start() + 1
            else:
                yield found
                pos = found.end

    @staticmethod
    def _iban_at(text: str, start: int, stop: int) -> Finding | None:
        body = text[start:stop]
        offsets = [i for i, c in enumerate(body) if c.isalnum()]
        country = body[:2].upper()
        expected = IBAN_LENGTHS.get(country)
        lengths: list[tuple[int, float]] = []
        if expected is not None:
            lengths.append((expected, 0.95))
        lengths.extend((n, 0.6) for n in range(min(34, len(offsets)), 14, -1) if n != expected)
        for length, confidence in lengths:
            if length > len(offsets):
                continue
            end = start + offsets[length - 1] + 1
            if end < len(text) and text[end].isalnum():
                continue  # the token goes on: not the end of an IBAN
            compact = "".join(body[i] for i in offsets[:length])
            if iban_valid(compact):
                return Finding(PiiKind.IBAN, start, end, confidence, "iban_mod97")
        return None

    # -- national ids

    def _national_ids(self, text: str, has_digit: bool) -> Iterable[Finding]:
        folded: str | None = None
        for rule in self.config.national_ids:
            if rule.needs_digit and not has_digit:
                continue
            if rule.keywords:
                folded = text.casefold() if folded is None else folded
                if not any(keyword in folded for keyword in rule.keywords):
                    continue
            for match in rule.pattern.finditer(text):
                group = "id" if "id" in rule.pattern.groupindex and match.group("id") is not None else 0
                value = match.group(group)
                if not value or (rule.validate is not None and not rule.validate(value)):
                    continue
                yield Finding(PiiKind.NATIONAL_ID, match.start(group), match.end(group), rule.confidence, rule.name)

    # -- IP addresses

    def _ips(self, text: str) -> Iterable[Finding]:
        v6 = list(self._ipv6(text)) if ":" in text else []
        yield from v6
        if "." in text:
            for match in _IPV4.finditer(text):
                if any(f.start <= match.start() and match.end() <= f.end for f in v6):
                    continue  # the tail of ::ffff:192.0.2.1
                try:  # int() also reads non-ASCII digits and drops leading zeros
                    address = ipaddress.IPv4Address(".".join(str(int(o)) for o in match.group().split(".")))
                except ValueError:
                    continue
                yield Finding(PiiKind.IP, match.start(), match.end(), _ip_confidence(address), "ipv4")

    @staticmethod
    def _ipv6(text: str) -> Iterable[Finding]:
        size = len(text)
        done = 0
        for hint in _IPV6_HINT.finditer(text):
            if hint.start() < done:
                continue
            start, token_end = hint.start(), hint.end()
            while start > 0 and text[start - 1] in _IPV6_CHARS:
                start -= 1
            while token_end < size and (text[token_end] in _IPV6_CHARS or text[token_end] == "."):
                token_end += 1  # "." for an embedded IPv4 tail (::ffff:192.0.2.1)
            done = token_end
            if text[start] == ":" and text[start + 1] != ":":
                start += 1  # a colon before the address ("from:2001:db8::1")
            before = text[start - 1] if start else " "
            if before.isalnum() or before == ".":
                continue  # part of a longer token (T12:30:45, std::vector)
            end = token_end
            while end > start and text[end - 1] == ".":
                end -= 1  # a full stop after the address
            if end - start > 2 and text[end - 1] == ":" and text[end - 2] != ":":
                end -= 1  # a colon after the address ("from 2001:db8::1: refused")
            if end == token_end and end < size and text[end] == "%" and (zone := _IPV6_ZONE.match(text, end)):
                end = token_end = zone.end()
            after = text[token_end] if token_end < size else " "
            if after.isalnum():
                continue
            candidate = text[start:end]
            if not _HEX.search(candidate.split("%", 1)[0]):
                continue
            try:
                address = ipaddress.IPv6Address(candidate)
            except ValueError:
                continue
            yield Finding(PiiKind.IP, start, end, _ip_confidence(address), "ipv6")

    # -- phone numbers

    def _phones(self, text: str, region: str | None, found: list[Finding]) -> Iterable[Finding]:
        """Phone numbers, found by ``phonenumbers`` in windows around candidates.

        Handing ``PhoneNumberMatcher`` only the digit runs that could be phone
        numbers (with a little context) instead of the whole text keeps the
        cost down. Where it finds nothing in a candidate, the runs of whole
        digit groups inside it are tried one by one, with a single character
        of context: the matcher gives up on a number followed or preceded by
        another number ("(415) 555-2671 3 times") or by some punctuation a few
        characters on ("+44 121 234 5155[ 2024").

        Matcher calls are budgeted (linear in the text's length); candidates
        left when the budget runs out are reported whole, unchecked, with a
        low confidence: digit-heavy text is over-redacted, never passed
        through and never slow.
        """
        size = len(text)
        budget = _PhoneBudget(_PHONE_BASE_CALLS + size // _PHONE_CHARS_PER_CALL)
        candidates: list[tuple[int, int]] = []
        windows: list[tuple[int, int, list[tuple[int, int]]]] = []
        for match in self._phone_candidates.finditer(text):
            start, end = match.span()
            if start and text[start - 1] in _PHONE_LEAD:
                start -= 1
            if any(f.start <= start and end <= f.end for f in found):
                continue  # already an IP, card, IBAN, national id or email
            if (
                self.config.phone_leniency >= phonenumbers.Leniency.VALID
                and _PHONE_UNSPLITTABLE.fullmatch(text, start, end) is not None
                and ((start and _ascii_letter(text[start - 1])) or (end < size and _ascii_letter(text[end])))
            ):
                # What phonenumbers rejects at VALID and above: a number glued
                # to a Latin letter (2025-01-31T..., UUID and hex fragments).
                continue
            date = _DATE_LIKE.fullmatch(text, start, end)
            if date is not None and (date.group("hour") is None or text[end : end + 1] == ":"):
                continue
            candidates.append((start, end))
            if end - start > _PHONE_MAX_CANDIDATE:
                continue  # too long to be one number: only its digit groups are tried
            lo, hi = max(0, start - _PHONE_CONTEXT), min(size, end + _PHONE_CONTEXT)
            if windows and lo <= windows[-1][1] and hi - windows[-1][0] <= _PHONE_MAX_WINDOW:
                windows[-1][2].append((start, end))
                windows[-1] = (windows[-1][0], hi, windows[-1][2])
            else:
                windows.append((lo, hi, [(start, end)]))
        phones: list[Finding] = []
        for lo, hi, members in windows:
            if budget.spend():
                phones.extend(self._match_phones(text, lo, hi, region))
            else:
                phones.extend(_unchecked_phone(start, end) for start, end in members)
        for start, end in candidates:
            if not any(f.start < end and start < f.end for f in phones):
                phones.extend(self._phones_in_groups(text, start, end, region, budget))
        return phones

    def _match_phones(self, text: str, lo: int, hi: int, region: str | None) -> Iterable[Finding]:
        for number in phonenumbers.PhoneNumberMatcher(text[lo:hi], region, self.config.phone_leniency):
            yield Finding(PiiKind.PHONE, lo + number.start, lo + number.end, 0.9, "phonenumbers")

    def _phones_in_groups(
        self, text: str, start: int, end: int, region: str | None, budget: _PhoneBudget
    ) -> list[Finding]:
        """Numbers made of whole digit groups of the candidate ``text[start:end]``."""
        groups = [m.span() for m in _DIGITS.finditer(text, start, end)]
        size = len(text)
        min_digits = self.config.phone_min_digits
        results: list[Finding] = []
        first = 0
        while first < len(groups):
            hit = False
            # Runs starting at ``first`` with at most _PHONE_MAX_DIGITS digits, longest first.
            counts: list[int] = []
            total = 0
            for index in range(first, len(groups)):
                total += groups[index][1] - groups[index][0]
                if total > _PHONE_MAX_DIGITS:
                    break
                counts.append(total)
            for last in range(first + len(counts) - 1, first - 1, -1):
                if counts[last - first] < min_digits:
                    break
                lo, hi = groups[first][0], groups[last][1]
                if lo and text[lo - 1] in _PHONE_LEAD:
                    lo -= 1
                if hi < size and text[hi] in ")\uff09]":
                    hi += 1
                if not budget.spend():
                    results.append(_unchecked_phone(groups[first][0], end))
                    return results
                found = list(self._match_phones(text, max(0, lo - 1), min(size, hi + 1), region))
                if found:
                    results.extend(found)
                    first = last + 1
                    hit = True
                    break
            if not hit:
                first += 1
        return results

    # -- the user's own name and company

    def _known(self, text: str, known: KnownPii) -> Iterable[Finding]:
        patterns = _known_patterns(known, self.config.min_name_part)
        folded = _fold(text)
        lowered = folded.casefold()
        searches: list[tuple[PiiKind, re.Pattern[str]]] = []
        if (
            patterns.name is not None
            and PiiKind.NAME in self.config.kinds
            and any(anchor in lowered for anchor in patterns.name_anchors)
        ):
            searches.append((PiiKind.NAME, patterns.name))
        if (
            patterns.company is not None
            and PiiKind.COMPANY in self.config.kinds
            and any(anchor in lowered for anchor in patterns.company_anchors)
        ):
            searches.append((PiiKind.COMPANY, patterns.company))
        owner: list[int] | None = None
        for kind, pattern in searches:
            for match in pattern.finditer(folded):
                start, end = match.span()
                if start == end:
                    continue
                if len(folded) != len(text) or not text.isascii():
                    if owner is None:
                        folded_again, owner = _fold_with_map(text)
                        if folded_again != folded:  # pragma: no cover - _fold and _fold_with_map agree
                            raise PiiDetectionError("inconsistent unicode folding")
                    start, end = owner[start], owner[end - 1] + 1
                    while end < len(text) and _fold_char(text[end]) == "":
                        end += 1  # combining marks that belong to the last character
                rule = match.lastgroup or ""
                confidence = {"full": 0.95, "core": 0.8, "part": 0.75}.get(rule, 0.75)
                yield Finding(kind, start, end, confidence, f"{rule}_{kind.value}")


_DIGIT = re.compile(r"\d")


def _has_digit(text: str) -> bool:
    return _DIGIT.search(text) is not None


def _ip_confidence(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> float:
    return 0.9 if address.is_global else 0.6


# --------------------------------------------------------------------------- redaction


def resolve_overlaps(findings: Iterable[Finding]) -> list[Finding]:
    """Non-overlapping findings: each cluster of overlapping findings becomes
    one span covering all of them, named by the longest (then most specific,
    then most confident) member, so no fragment of any finding survives."""
    ordered = sorted(findings, key=lambda f: (f.start, -f.end))
    resolved: list[Finding] = []
    cluster: list[Finding] = []
    cluster_end = -1

    def close() -> None:
        if cluster:
            winner = max(cluster, key=lambda f: (f.end - f.start, _SPECIFICITY[f.kind], f.confidence))
            start = min(f.start for f in cluster)
            resolved.append(Finding(winner.kind, start, cluster_end, winner.confidence, winner.rule))

    for finding in ordered:
        if cluster and finding.start < cluster_end:
            cluster.append(finding)
            cluster_end = max(cluster_end, finding.end)
        else:
            close()
            cluster = [finding]
            cluster_end = finding.end
    close()
    return resolved


_SAFE_SCALARS = (bool, float, type(None), uuid.UUID, _dt.date, _dt.time, _dt.timedelta)


class Redactor:
    """Replaces findings with typed placeholders, in text and nested values."""

    def __init__(
        self,
        detector: PiiDetector | None = None,
        *,
        placeholders: Mapping[PiiKind, str] | None = None,
        max_depth: int = 64,
    ) -> None:
        self.detector = detector or PiiDetector()
        self.placeholders = {kind: kind.placeholder for kind in PiiKind} | dict(placeholders or {})
        self.max_depth = max_depth

    def apply(self, text: str, findings: Iterable[Finding]) -> str:
        """``text`` with each (resolved) finding replaced by its placeholder."""
        out: list[str] = []
        position = 0
        for finding in resolve_overlaps(findings):
            if finding.end > len(text) or finding.start < position:
                raise PiiDetectionError("finding outside the text")
            out.append(text[position : finding.start])
            out.append(self.placeholders[finding.kind])
            position = finding.end
        out.append(text[position:])
        return "".join(out)

    def redact(self, text: str, known: KnownPii | None = None) -> str:
        """Detect and redact ``text``; ``known`` defaults to :data:`current_known`."""
        if known is None:
            known = current_known.get()
        findings = self.detector.detect(text, known)
        return self.apply(text, findings) if findings else text

    def redact_value(self, value: J, known: KnownPii | None = None) -> J:
        """A redacted copy of a JSON-like value (dicts, lists, tuples, strings).

        Keys are redacted too (colliding keys get ``#2``, ``#3`` … suffixes).
        Integers are checked as their decimal form; other objects as ``str()``
        (what a JSON log formatter would write) and replaced by the redacted
        string when that holds PII. Floats, booleans, ``None``, UUIDs and dates
        pass unchanged.
        """
        if known is None:
            known = current_known.get()
        return cast(J, self._value(value, known, 0))

    def _value(self, value: object, known: KnownPii | None, depth: int) -> object:
        if depth > self.max_depth:
            raise PiiDetectionError("value nested too deeply to redact")
        if isinstance(value, str):
            return self.redact(value, known)
        if isinstance(value, Mapping):
            result: dict[object, object] = {}
            for key, item in value.items():
                new_key = self._value(key, known, depth + 1)
                if new_key in result:
                    suffix = 2
                    while f"{new_key}#{suffix}" in result:
                        suffix += 1
                    new_key = f"{new_key}#{suffix}"
                result[new_key] = self._value(item, known, depth + 1)
            return result
        if isinstance(value, list):
            return [self._value(item, known, depth + 1) for item in value]
        if isinstance(value, tuple):
            return tuple(self._value(item, known, depth + 1) for item in value)
        if isinstance(value, _SAFE_SCALARS):
            return value
        if isinstance(value, int):
            if -1_000_000 < value < 1_000_000:
                return value
            text = str(value)
        elif isinstance(value, set | frozenset):
            return [self._value(item, known, depth + 1) for item in value]
        else:
            text = str(value)
        redacted = self.redact(text, known)
        return value if redacted == text else redacted


@functools.lru_cache(maxsize=1)
def default_redactor() -> Redactor:
    """The process-wide redactor with the default configuration."""
    return Redactor()


# --------------------------------------------------------------------------- fail-safe guard


def _blocked(site: str, exc: BaseException) -> GuardrailBlockedError:
    GUARDRAIL_BLOCKED.labels(site=site).inc()
    error_type = type(exc).__name__
    log.error("PII detection failed; action blocked", extra={"fields": {"site": site, "error": error_type}})
    return GuardrailBlockedError(error_type)


def _redact_or_block(payload: J, known: KnownPii | None, redactor: Redactor | None, site: str) -> J:
    try:
        return (redactor or default_redactor()).redact_value(payload, known)
    except Exception as exc:
        raise _blocked(site, exc) from None


def guard(
    payload: J,
    action: Callable[[J], R],
    *,
    known: KnownPii | None = None,
    redactor: Redactor | None = None,
) -> R:
    """Run ``action`` on the redacted ``payload`` (a string or JSON-like value).

    If detection or redaction raises anything, ``action`` is not called and
    :class:`GuardrailBlockedError` is raised. Errors from ``action`` itself
    propagate unchanged.
    """
    safe = _redact_or_block(payload, known, redactor, "guard")
    return action(safe)


async def aguard(
    payload: J,
    action: Callable[[J], Awaitable[R]],
    *,
    known: KnownPii | None = None,
    redactor: Redactor | None = None,
) -> R:
    """:func:`guard` for coroutine functions: the coroutine is only created
    (and awaited) once the payload is redacted."""
    safe = _redact_or_block(payload, known, redactor, "guard")
    return await action(safe)


def guarded(
    *params: str,
    known: KnownPii | None = None,
    known_param: str | None = None,
    redactor: Redactor | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a function (sync or async) so the named arguments (default:
    the first parameter other than ``self``/``cls``) are redacted before it
    runs, and it does not run at all if redaction fails.

    The identity comes from ``known``, else from the argument named
    ``known_param``, else from :data:`current_known`. ::

        @guarded("prompt", known_param="user")
        async def complete(prompt: str, *, user: KnownPii) -> str: ...
    """

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(fn)
        names = params or tuple(n for n in signature.parameters if n not in ("self", "cls"))[:1]
        unknown = [n for n in (*names, *([known_param] if known_param else [])) if n not in signature.parameters]
        if not names or unknown:
            raise TypeError(f"guarded: {fn.__qualname__} has no parameter(s) {unknown or 'to redact'}")

        def prepare(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
            bound = signature.bind(*args, **kwargs)  # a wrong call raises TypeError as usual
            identity = known
            if identity is None and known_param is not None:
                identity = bound.arguments.get(known_param)
            try:
                for name in names:
                    if name in bound.arguments:
                        bound.arguments[name] = (redactor or default_redactor()).redact_value(
                            bound.arguments[name], identity
                        )
            except Exception as exc:
                raise _blocked("guard", exc) from None
            return bound.args, bound.kwargs

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                safe_args, safe_kwargs = prepare(args, kwargs)
                return await cast(Callable[..., Awaitable[Any]], fn)(*safe_args, **safe_kwargs)

            return cast(Callable[P, R], async_wrapper)

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            safe_args, safe_kwargs = prepare(args, kwargs)
            return fn(*safe_args, **safe_kwargs)

        return wrapper

    return decorate


# --------------------------------------------------------------------------- logging


class RedactingFilter(logging.Filter):
    """Redacts log records in place: the formatted message, the structured
    ``fields`` (what :class:`firstmile.kit.telemetry.JsonFormatter` merges into
    the JSON line) and any traceback or stack.

    Attach it to handlers (handler filters see records from every logger).
    A formatted traceback is moved, redacted, into ``fields[exc_field]``
    (``"exc"``, the key the JSON formatter uses) unless ``exc_field`` is
    ``None``, in which case it is left in ``record.exc_text``.

    If redaction fails the message becomes ``[REDACTION FAILED]``, the fields
    ``{"pii_redaction": "failed"}`` and the traceback is dropped: the record is
    still written, but nothing unredacted is.
    """

    def __init__(self, redactor: Redactor | None = None, *, name: str = "", exc_field: str | None = "exc") -> None:
        super().__init__(name)
        self._redactor = redactor
        self.exc_field = exc_field

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_pii_redacted", False):
            return True
        try:
            self._redact(record)
        except Exception as exc:
            self._fail(record, exc)
        setattr(record, "_pii_redacted", True)  # noqa: B010
        return True

    def _redact(self, record: logging.LogRecord) -> None:
        redactor = self._redactor or default_redactor()
        known = current_known.get()
        message = redactor.redact(record.getMessage(), known)
        has_fields = hasattr(record, "fields")
        fields: Any = redactor.redact_value(getattr(record, "fields", None), known) if has_fields else None
        exc_text: str | None = None
        if record.exc_info or record.exc_text:
            raw = record.exc_text or logging.Formatter().formatException(record.exc_info)  # type: ignore[arg-type]
            exc_text = redactor.redact(raw, known)
        stack = redactor.redact(record.stack_info, known) if record.stack_info else None
        # Commit only once everything is redacted.
        record.msg, record.args = message, None
        if exc_text is not None:
            record.exc_info = None
            if self.exc_field is not None:
                fields = dict(fields) if isinstance(fields, Mapping) else {}
                fields[self.exc_field] = exc_text
                has_fields = True
                record.exc_text = None
            else:
                record.exc_text = exc_text
        if has_fields:
            setattr(record, "fields", fields)  # noqa: B010
        record.stack_info = stack

    def _fail(self, record: logging.LogRecord, exc: Exception) -> None:
        GUARDRAIL_BLOCKED.labels(site="log").inc()
        record.msg, record.args = FAILED_MESSAGE, None
        setattr(record, "fields", {"pii_redaction": "failed", "error": type(exc).__name__})  # noqa: B010
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
