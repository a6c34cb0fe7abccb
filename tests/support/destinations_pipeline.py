"""A tenant whose webhook destination has been through the real pipeline (docs/destinations.md): the manifest applied
with a ``destinations:`` section pointing at a loopback :class:`WebhookReceiver`, the secret stored sealed, users
started through the onboarding API, the outbox fed to the ``destinations`` consumer as the in-process dispatcher
feeds it, and the delivery worker run once against the receiver. The admin UI's destinations tests use it."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.controlplane.service import apply_manifest
from firstmile.destinations import service
from firstmile.destinations.consumer import DestinationFeed
from firstmile.destinations.policy import RetryPolicy, new_webhook_secret
from firstmile.destinations.registry import OfficialAdapters
from firstmile.destinations.worker import DestinationDelivery
from firstmile.events.envelope import Envelope
from firstmile.kit.scope import OperatorContext
from firstmile.kit.uow import UnitOfWork
from firstmile.security.datakeys import DataKeyService, TenantKeys
from firstmile.tenancy.cli import create_key
from firstmile.wiring import adapters
from tests.conftest import PEPPER, REGION, make_settings
from tests.factories import demo_document, manifest_for
from tests.support.webhook_receiver import WebhookReceiver

WORKER = OperatorContext("worker:test-destinations")
NAME = "hooks"
"""The destination's name in the manifest."""


@dataclass(frozen=True)
class Pipeline:
    """A tenant with one webhook destination, and what drives it."""

    admin: AsyncEngine
    app: AsyncEngine
    keyring: DataKeyService
    tenant_id: Any
    slug: str
    api_key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def uow(self) -> UnitOfWork:
        return UnitOfWork(self.app, WORKER.tenant(self.tenant_id))

    async def start(self, api: httpx.AsyncClient, user: str) -> None:
        body = {"user_id": user, "traits": {"persona": "developer"}}
        response = await api.post("/v1/onboarding/start", json=body, headers=self.headers)
        assert response.status_code == 201, response.text

    async def complete(self, api: httpx.AsyncClient, user: str, step: str) -> None:
        response = await api.post(f"/v1/onboarding/{user}/steps/{step}/complete", headers=self.headers)
        assert response.status_code == 200, response.text

    async def feed(self) -> None:
        """Every outbox row of the tenant to the ``destinations`` consumer (a row queued before is queued once)."""
        async with self.admin.connect() as conn:
            rows = list(
                await conn.execute(
                    text("SELECT event_id, tenant_id, event_type, occurred_at, payload, partition_key FROM outbox"
                         " WHERE tenant_id = :t ORDER BY id"),
                    {"t": self.tenant_id},
                )
            )  # fmt: skip
        await DestinationFeed(self.app, self.keyring, config_ttl=0).handle(
            [Envelope(r[0], r[1], r[2], r[3], dict(r[4]), r[5]) for r in rows]
        )

    async def deliver(self) -> None:
        """One pass of the delivery worker over the destination."""
        worker = DestinationDelivery(self.app, self.keyring, OfficialAdapters(timeout_s=2),
                                     policy=RetryPolicy(0.05, 0.2, 5), skip_s=0, purge_every_s=3600)  # fmt: skip
        try:
            await worker.deliver_destination(WORKER.tenant(self.tenant_id), NAME)
        finally:
            await worker.close()

    async def status(self) -> service.DestinationStatus:
        [found] = await self.uow().run(service.status)
        return found

    async def queue(self) -> list[dict[str, Any]]:
        return await self.uow().run(lambda tx: service.queued(tx, NAME))


async def webhook_tenant(admin: AsyncEngine, app: AsyncEngine, receiver: WebhookReceiver, prefix: str) -> Pipeline:
    """A new tenant (the demo manifest) with the webhook destination ``hooks`` at ``receiver``, its secret stored
    (with the app's key-encryption key) and given to the receiver."""
    slug = f"{prefix}-{secrets.token_hex(4)}"
    doc = demo_document() | {"destinations": [{"name": NAME, "kind": "webhook", "url": receiver.url + "/firstmile"}]}
    result = await apply_manifest(admin, manifest_for(slug, REGION, doc))
    created = await create_key(admin, PEPPER, slug, ["onboarding:write"], "test")
    keyring = DataKeyService.from_config(app, adapters.key_config(make_settings()))
    pipeline = Pipeline(admin, app, keyring, result.tenant_id, slug, created.key)
    secret = new_webhook_secret()
    receiver.secrets = [secret]

    async def store(tx: Any, keys: TenantKeys) -> service.CredentialsSet:
        return await service.set_credentials(tx, keys, NAME, {"secret": secret}, actor="operator:test")

    await keyring.run_with_keys(pipeline.uow(), store)
    return pipeline


async def delivered_pending_dead(api: httpx.AsyncClient, pipeline: Pipeline, receiver: WebhookReceiver) -> None:
    """User ``u1`` starts (an ``identify`` the endpoint refuses with 422: a dead letter; ``Onboarding Started``
    delivered), then completes a step after the worker's pass (``Onboarding Step Completed``: pending)."""
    await pipeline.start(api, "u1")
    await pipeline.feed()
    receiver.respond(422, body="unknown event type")  # the identify, the user's first event
    await pipeline.deliver()
    await pipeline.complete(api, "u1", "create-api-key")
    await pipeline.feed()
    rows = [(r["name"], r["status"]) for r in await pipeline.queue()]
    assert rows == [("identify", "dead"), ("Onboarding Started", "done"), ("Onboarding Step Completed", "pending")]
