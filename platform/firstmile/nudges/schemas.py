"""Wire types of the nudges slice's tenant API (the in-app messages, push subscriptions)."""

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


class PushKeys(msgspec.Struct, forbid_unknown_fields=True):
    p256dh: str = msgspec.field(name="p256dh")
    """The browser's P-256 public key, uncompressed, base64url (65 octets)."""
    auth: str
    """The authentication secret, base64url (16 octets)."""


class PushSubscriptionIn(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    """A browser's ``PushSubscription`` as its ``toJSON()`` gives it."""

    endpoint: str
    keys: PushKeys
    expiration_time: int | None = None


class PushSubscriptionOut(msgspec.Struct):
    subscription_id: str
    """The SHA-256 of the endpoint (hex): ``DELETE …/push-subscriptions/{subscription_id}`` forgets it."""


class ConsentIn(msgspec.Struct, forbid_unknown_fields=True):
    granted: bool
    """True: the user agreed to nudges of this category on this channel; false: they declined."""
    source: str = msgspec.field(default="api")
    """Where the answer came from (``preference-centre``, ``signup-form``…), kept with it and in the audit log."""


class ConsentOut(msgspec.Struct):
    channel: str
    category: str
    granted: bool


class ConsentList(msgspec.Struct):
    user_id: str
    consents: list[ConsentOut]
