"""Phone numbers as the SMS channels accept them: E.164 only, checked with ``phonenumbers`` (libphonenumber's data)."""

from __future__ import annotations

import phonenumbers


def e164(number: str) -> str | None:
    """``number`` when it is written in E.164 and is a valid number, else None."""
    if not number.startswith("+") or not number[1:].isascii() or not number[1:].isdigit() or len(number) > 16:
        return None
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    if phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164) != number:
        return None
    return number
