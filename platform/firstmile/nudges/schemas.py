"""Wire types of the nudges slice's tenant API (the in-app messages)."""

from __future__ import annotations

import uuid
from datetime import datetime

import msgspec


class InAppMessage(msgspec.Struct):
    """One in-app nudge delivered to the user (the SSE stream's ``data``, and an item of the list)."""

    send_id: uuid.UUID
    """The nudge's id: the stream's ``id:``, and the ``{send_id}`` of ``…/seen`` and ``…/dismiss``."""
    subject: str | None
    """The title (may be absent)."""
    body: str
    """Plain text."""
    sent_at: datetime
    seen_at: datetime | None
    """When the app first reported it seen (``POST …/seen``); null until then."""


class InAppMessageList(msgspec.Struct):
    """A user's in-app messages that are delivered and not dismissed, newest first."""

    user_id: str
    messages: list[InAppMessage]
