"""Helpers the nudge tests share."""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.events.envelope import Envelope
from firstmile.nudges.webhooks import SENDGRID_SIGNATURE, SENDGRID_TIMESTAMP
from tests.conftest import TenantFixture


async def started_envelope(admin_engine: AsyncEngine, tenant: TenantFixture, user_id: str) -> Envelope:
    """The ``onboarding.started`` event of ``user_id`` as the outbox holds it (to feed the feature store)."""
    async with admin_engine.connect() as conn:
        [row] = list(
            await conn.execute(
                text(
                    "SELECT event_id, occurred_at, payload FROM outbox WHERE tenant_id = :t"
                    " AND event_type = 'onboarding.started' AND payload->>'user_id' = :u"
                ),
                {"t": tenant.id, "u": user_id},
            )
        )
    return Envelope(row[0], tenant.id, "onboarding.started", row[1], dict(row[2]))


def sendgrid_headers(private: ec.EllipticCurvePrivateKey, body: bytes, at: int) -> dict[str, str]:
    """The headers of a SendGrid Event Webhook request signed at ``at`` (ECDSA P-256, the timestamp then the body)."""
    signature = private.sign(str(at).encode() + body, ec.ECDSA(hashes.SHA256()))
    return {SENDGRID_SIGNATURE: base64.b64encode(signature).decode(), SENDGRID_TIMESTAMP: str(at),
            "Content-Type": "application/json"}  # fmt: skip


def verification_key(private: ec.EllipticCurvePrivateKey) -> str:
    """The verification key SendGrid's console would show for ``private`` (base64 DER)."""
    der = private.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()
