"""E.164 as both SMS channels accept it: the number as written, or None."""

from __future__ import annotations

import pytest

from firstmile.nudges.phones import e164


@pytest.mark.parametrize("number", ["+14155552671", "+447911123456", "+4930901820"])
def test_a_valid_e164_number_is_kept_as_written(number: str) -> None:
    assert e164(number) == number


@pytest.mark.parametrize(
    "number",
    [
        "14155552671",  # no plus
        "+1 415 555 2671",  # spaces: not E.164 as written
        "+1415555267\uff11",  # a full-width digit one
        "+12345",  # too short to be a number
        "+99912345678",  # no such country code
        "+1415555267100000",  # longer than 15 digits
        "+",
    ],
)
def test_anything_else_is_refused(number: str) -> None:
    assert e164(number) is None
