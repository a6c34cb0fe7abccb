"""Identifier formats every slice shares, and the check of one in a URL path.

They are part of the public contract (docs/api.md): a tenant's user ids, the slugs of
tenants, paths and steps, and region names. Defined once here, so the manifest schema,
the wire types and the path-parameter checks cannot drift apart.
"""

from __future__ import annotations

import re
from typing import Annotated

from litestar.params import PathParameter

from firstmile.kit.errors import ProblemError

USER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@+\-]*$(?!\n)"
"""The tenant's own id for an end user: letters, digits and ``. _ : @ + -``.

``(?!\n)``: Python's ``$`` also matches before a final line break ("u-1\n" passed), and msgspec
applies the pattern with ``re.search``; with it the pattern means the same in Python and in JSON
Schema (ECMA-262, where it is a no-op), so the document, msgspec and our own checks agree."""
USER_ID_MAX_LENGTH = 128
SLUG_PATTERN = r"^[a-z][a-z0-9-]{0,62}[a-z0-9]$"
"""Lower-case ids of tenants, paths and steps: letters, digits, dashes."""
REGION_PATTERN = r"^[a-z]{2}(-[a-z]+)+-\d$"
"""An AWS-style region name (``eu-west-1``)."""

UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
"""A UUID as text (ids Firstmile makes: a message's ``send_id``)."""

USER_ID_RE = re.compile(USER_ID_PATTERN)
UUID_RE = re.compile(UUID_PATTERN)
SLUG_RE = re.compile(SLUG_PATTERN)

# Path parameters of these formats. The handler checks them (``check_id``, for a problem naming the
# parameter); ``schema_extra`` only documents the check, so the OpenAPI document admits exactly what
# the handler accepts (the OpenAPI fuzzing, tests/integration/test_api_fuzz.py, holds it to that).
UserIdPath = Annotated[
    str,
    PathParameter(
        description="The tenant's own id for the user: letters, digits and . _ : @ + -",
        schema_extra={"min_length": 1, "max_length": USER_ID_MAX_LENGTH, "pattern": USER_ID_PATTERN},
    ),
]
SlugPath = Annotated[
    str,
    PathParameter(
        description="A lower-case id: letters, digits, dashes", schema_extra={"max_length": 64, "pattern": SLUG_PATTERN}
    ),
]


def check_id(value: str, pattern: re.Pattern[str], name: str) -> str:
    """A path parameter id, or 400 ``validation-error`` naming it."""
    if len(value) > USER_ID_MAX_LENGTH or not pattern.fullmatch(value):  # match's $ admits a final "\n"
        raise ProblemError(
            400,
            "validation-error",
            f"{name} {value[:140]!r} is not a valid id (at {name})",
            errors=[{"key": name, "message": "invalid id", "source": "path"}],
        )
    return value


def check_user_id(value: str) -> str:
    """A ``user_id`` path parameter, or 400."""
    return check_id(value, USER_ID_RE, "user_id")


__all__ = [
    "REGION_PATTERN",
    "SLUG_PATTERN",
    "SLUG_RE",
    "USER_ID_MAX_LENGTH",
    "USER_ID_PATTERN",
    "USER_ID_RE",
    "UUID_PATTERN",
    "UUID_RE",
    "SlugPath",
    "UserIdPath",
    "check_id",
    "check_user_id",
]
