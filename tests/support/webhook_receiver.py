"""A tenant's webhook endpoint on 127.0.0.1, as the Standard Webhooks specification has a consumer behave.

Each request is verified with the ``standardwebhooks`` library's own :meth:`Webhook.verify` against the secrets
the test gives (any of them may sign: a rotation); a request that does not verify gets ``401`` and is not
recorded. A verified one is recorded with its ``webhook-id`` (the idempotency key a real consumer deduplicates
by) and answered ``204`` (or what :meth:`StandIn.respond` scripted). :meth:`hold` makes it record and then hold
further requests unanswered (a worker killed while it waits for the answer).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError

from tests.support.saas_standins import Answer, Recorded, StandIn


@dataclass(frozen=True)
class Delivery:
    """One verified request: its ``webhook-id`` and parsed body, and which secret verified it."""

    webhook_id: str
    payload: dict[str, Any]
    verified_by: tuple[int, ...]
    signature: str


class WebhookReceiver(StandIn):
    """The endpoint (see the module docstring)."""

    name = "webhook-receiver"

    def __init__(self, *secrets: str) -> None:
        super().__init__()
        self.secrets = list(secrets)
        self.deliveries: list[Delivery] = []
        self.refused: list[Recorded] = []
        self._holding = threading.Event()
        self._hold_after = 0
        self.held = threading.Event()
        """Set once a request has been recorded and held."""

    def hold(self, after: int = 0) -> None:
        """Hold every request (recorded first) once ``after`` more have been answered."""
        with self._lock:
            self._hold_after = len(self.deliveries) + after
        self._holding.set()

    def recover(self) -> None:
        """Forget the answers scripted with :meth:`respond` and stop holding: the endpoint is back."""
        self._holding.clear()
        with self._lock:
            self._answers.clear()

    @property
    def ids(self) -> list[str]:
        """Every verified ``webhook-id``, in arrival order (a redelivery appears twice)."""
        return [d.webhook_id for d in self.deliveries]

    def unique(self) -> dict[str, dict[str, Any]]:
        """The deliveries as a consumer that deduplicates by ``webhook-id`` keeps them (the first of each)."""
        kept: dict[str, dict[str, Any]] = {}
        for d in self.deliveries:
            kept.setdefault(d.webhook_id, d.payload)
        return kept

    def answer(self, request: Recorded) -> Answer:
        verified: list[int] = []
        payload: Any = None
        for i, secret in enumerate(self.secrets):
            try:
                payload = Webhook(secret).verify(request.body, request.headers)
            except WebhookVerificationError:
                continue
            verified.append(i)
        if not verified:
            with self._lock:
                self.refused.append(request)
            return Answer(401, {"Content-Type": "text/plain"}, b"signature does not verify")
        delivery = Delivery(request.headers["webhook-id"], payload, tuple(verified),
                            request.headers["webhook-signature"])  # fmt: skip
        with self._lock:
            self.deliveries.append(delivery)
            holding = self._holding.is_set() and len(self.deliveries) > self._hold_after
        if holding:
            self.held.set()
            return Answer(0, hang=True)
        return Answer(204)
