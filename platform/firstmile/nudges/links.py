"""Signed links in nudges: the tracked link (a click) and the one-click unsubscribe (RFC 8058).

A link carries its own credential: ``base64url(tenant id ‖ send id ‖ purpose ‖ tag)``, where the tag
is the first 16 bytes of ``HMAC-SHA256(key, tenant id ‖ send id ‖ purpose)``. The key is derived
from the platform's API-key pepper with HKDF-SHA256 (``info = "firstmile/nudge-links/v1"``), so no
new secret has to be provisioned, and a link of one purpose cannot be replayed as another. A link
does not expire: an unsubscribe must keep working for as long as the message may be read
(RFC 8058 asks the sender to honour it); a click after the outcome window only changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import uuid
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

CLICK = b"c"
UNSUBSCRIBE = b"u"
_PURPOSES = (CLICK, UNSUBSCRIBE)
_TAG = 16
_SIZE = 16 + 16 + 1 + _TAG


class BadLinkError(ValueError):
    """The link is malformed, forged or for another purpose."""


@dataclass(frozen=True, slots=True)
class LinkTarget:
    tenant_id: uuid.UUID
    send_id: uuid.UUID
    purpose: bytes


@dataclass(frozen=True, slots=True)
class LinkPrincipal:
    """Whoever holds a valid signed link: it acts for the link's tenant, on the link's send only."""

    target: LinkTarget

    @property
    def authenticated_tenant(self) -> uuid.UUID:
        return self.target.tenant_id


class LinkSigner:
    """Makes and checks the signed links of nudges."""

    def __init__(self, pepper: bytes) -> None:
        if len(pepper) < 16:
            raise ValueError("the link key needs a pepper of at least 16 bytes")
        self._key = HKDF(hashes.SHA256(), 32, salt=None, info=b"firstmile/nudge-links/v1").derive(pepper)

    def _tag(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:_TAG]

    def token(self, tenant_id: uuid.UUID, send_id: uuid.UUID, purpose: bytes) -> str:
        if purpose not in _PURPOSES:
            raise ValueError(f"unknown link purpose {purpose!r}")
        body = tenant_id.bytes + send_id.bytes + purpose
        return base64.urlsafe_b64encode(body + self._tag(body)).rstrip(b"=").decode("ascii")

    def check(self, token: str, purpose: bytes) -> LinkTarget:
        """The link's target; :class:`BadLinkError` when it was not made here for ``purpose``."""
        if not 60 <= len(token) <= 80:
            raise BadLinkError("not a nudge link")
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError) as exc:
            raise BadLinkError("not a nudge link") from exc
        if len(raw) != _SIZE:
            raise BadLinkError("not a nudge link")
        body, tag = raw[:-_TAG], raw[-_TAG:]
        if not hmac.compare_digest(tag, self._tag(body)) or body[32:33] != purpose:
            raise BadLinkError("this link was not issued here, or not for this")
        return LinkTarget(uuid.UUID(bytes=body[:16]), uuid.UUID(bytes=body[16:32]), purpose)
