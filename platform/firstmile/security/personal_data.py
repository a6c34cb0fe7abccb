"""Which traits and Segment fields are personal data, and how they are kept out of clear text.

Email, name, first and last name, phone and company are always personal data; a
tenant's manifest may name more (``pii_traits``). Such values are never stored in
clear: on an end user they live encrypted under the user's own key (the ``pii``
column), with a keyed blind index for equality lookup by email; in an event
payload they travel as one encrypted ``pii`` member, so outbox rows, Kafka
messages and analytics rows carry none of them in clear.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

BUILTIN_PII_TRAITS: frozenset[str] = frozenset({"email", "name", "first_name", "last_name", "phone", "company"})
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}\.[^@\s]{2,63}$")
# Segment's reserved traits spell these in camelCase; match both spellings, case-insensitively.
_ALIASES = {"firstname": "first_name", "lastname": "last_name", "phonenumber": "phone", "ip": "ip"}


def canonical_name(key: str) -> str:
    lowered = key.lower()
    return _ALIASES.get(lowered.replace("_", ""), lowered)


def split_traits(traits: Mapping[str, Any], pii_names: frozenset[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(plain, personal)``: the traits that may be stored in clear, and those that may not."""
    plain: dict[str, Any] = {}
    personal: dict[str, Any] = {}
    for key, value in traits.items():
        (personal if canonical_name(key) in pii_names else plain)[key] = value
    return plain, personal


def valid_email(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 320 and bool(_EMAIL.match(value.strip()))


def extract_message_pii(payload: dict[str, Any], pii_names: frozenset[str]) -> dict[str, Any]:
    """Remove personal fields from a normalised Segment payload, in place; returns them by location.

    Looks at ``traits``, ``properties`` and ``context.traits``; ``context.ip`` is dropped.
    """
    found: dict[str, Any] = {}
    for where in ("traits", "properties"):
        section = payload.get(where)
        if isinstance(section, dict):
            plain, personal = split_traits(section, pii_names)
            if personal:
                payload[where] = plain
                found[where] = personal
    context = payload.get("context")
    if isinstance(context, dict):
        traits = context.get("traits")
        if isinstance(traits, dict):
            plain, personal = split_traits(traits, pii_names)
            if personal:
                context["traits"] = plain
                found["context.traits"] = personal
        # Data minimisation: nothing here needs the client's IP address, so it is dropped, not kept.
        context.pop("ip", None)
    return found
