"""Reliability harness: a multi-tenant isolation soak (issue 14, item 5c).

``test_tenant_isolation.py`` attacks row-level security one statement at a time. Here many tenants'
requests run interleaved on one app and one connection pool (starts, step completions, event batches,
state reads, analytics reads and reads of other tenants' users), as a busy region serves them; then
the database, read with the admin engine (which bypasses RLS), must hold each tenant's rows under
that tenant only, and no answer may have named another tenant's users.

Each tenant's own users carry a marker of that tenant (``soak<run>-<nn>-u<i>``); every tenant also
has users with the same ids as every other tenant (``shared-<i>``), which only the tenant id tells
apart. A row or an answer of tenant A that contains tenant B's marker is a leak. The figures
(tenants, requests, rows checked) are printed at the end of the run (tests/support/figures.py).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import uuid
from collections import Counter
from typing import Any

from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.wiring.schema import TENANT_OWNED_TABLES
from tests.conftest import TenantFixture, new_tenant
from tests.support import figures

Client = AsyncTestClient[Litestar]
TENANTS = 20
OWN_USERS = 4
SHARED_USERS = 2
CONCURRENCY = 16
"""Requests in flight at once: more than the app's pool has connections, so they queue and interleave."""


class Soak:
    def __init__(self, client: Client, tenants: list[TenantFixture], run: str) -> None:
        self.client = client
        self.tenants = tenants
        self.run = run
        self.gate = asyncio.Semaphore(CONCURRENCY)
        self.answers: Counter[int] = Counter()
        self.leaks: list[str] = []
        self.marker_re = re.compile(rf"{run}-(\d\d)-")

    def marker(self, index: int) -> str:
        return f"{self.run}-{index:02d}-"

    def users(self, index: int) -> list[str]:
        own = [f"{self.marker(index)}u{i}" for i in range(OWN_USERS)]
        return own + [f"shared-{i}" for i in range(SHARED_USERS)]

    def foreign_markers(self, index: int, content: str) -> set[int]:
        return {int(m) for m in self.marker_re.findall(content)} - {index}

    async def call(self, index: int, method: str, path: str, expected: set[int], echo: str = "", **kwargs: Any) -> Any:
        """Send as tenant ``index``; ``echo`` is an id of the request that a refusal may repeat."""
        async with self.gate:
            response = await self.client.request(method, path, headers=self.tenants[index].headers, **kwargs)
        self.answers[response.status_code] += 1
        assert response.status_code in expected, (method, path, response.status_code, response.text)
        foreign = self.foreign_markers(index, response.text.replace(echo, "") if echo else response.text)
        if foreign:
            self.leaks.append(f"tenant {index} {method} {path} named the users of tenants {sorted(foreign)}")
        return response.json() if response.content else None

    async def journey(self, index: int, user: str) -> None:
        """One user's onboarding as a tenant app drives it, interleaved with every other tenant's."""
        traits = {"persona": "developer", "role": f"{self.marker(index)}role"}
        state = await self.call(index, "POST", "/v1/onboarding/start", {201}, json={"user_id": user, "traits": traits})
        assert state["user_id"] == user
        done = await self.call(index, "POST", f"/v1/onboarding/{user}/steps/create-api-key/complete", {200})
        assert done["user_id"] == user and "create-api-key" in {s["id"] for s in done["steps"] if s["completed"]}
        batch = [
            {"type": "track", "messageId": uuid.uuid4().hex, "userId": user, "event": f"{self.marker(index)}Clicked"},
            {"type": "identify", "messageId": uuid.uuid4().hex, "userId": user, "traits": {"plan": "pro"}},
        ]
        accepted = await self.call(index, "POST", "/v1/events", {202}, json={"batch": batch})
        assert accepted == {"accepted": 2, "duplicates": 0, "rejected": []}
        read = await self.call(index, "GET", f"/v1/onboarding/{user}", {200})
        assert read["user_id"] == user and read["started_at"] == state["started_at"]

    async def reads(self, index: int) -> None:
        """Analytics reads, and reads of other tenants' users, which must not exist for this tenant."""
        await self.call(index, "GET", "/v1/analytics/funnel", {200}, params={"path": "developer-quickstart"})
        for other in (index + 1) % TENANTS, (index + 7) % TENANTS:
            theirs = f"{self.marker(other)}u0"
            await self.call(index, "GET", f"/v1/onboarding/{theirs}", {404}, echo=theirs)
            await self.call(index, "POST", f"/v1/onboarding/{theirs}/steps/create-api-key/complete", {404}, echo=theirs)


async def test_many_tenants_interleaved_on_one_pool_see_and_write_only_their_own_rows(
    client: Client, admin_engine: AsyncEngine, worker_id: str
) -> None:
    tenants = [
        await new_tenant(admin_engine, scopes=("onboarding:write", "events:write", "analytics:read"))
        for _ in range(TENANTS)
    ]
    soak = Soak(client, tenants, f"soak{secrets.token_hex(3)}")
    work = [soak.journey(i, user) for i in range(TENANTS) for user in soak.users(i)]
    work += [soak.reads(i) for i in range(TENANTS)]
    order = list(range(len(work)))
    secrets.SystemRandom().shuffle(order)  # tenants' requests arrive mixed, not tenant by tenant
    await asyncio.gather(*(work[i] for i in order))
    assert soak.leaks == []

    # In the database, read past RLS: each row is under the tenant whose key wrote it, and names no other.
    by_id = {t.id: i for i, t in enumerate(tenants)}
    rows_checked = 0
    users_seen: dict[int, set[str]] = {i: set() for i in range(TENANTS)}
    async with admin_engine.connect() as conn:
        for table in TENANT_OWNED_TABLES:
            user = "user_id" if table == "end_users" else "NULL"
            rows = await conn.execute(
                text(f"SELECT tenant_id, {user}, t::text FROM {table} t WHERE tenant_id = ANY(:ids)"),
                {"ids": list(by_id)},
            )
            for tenant_id, user_id, content in rows:
                index = by_id[tenant_id]
                rows_checked += 1
                foreign = soak.foreign_markers(index, content)
                assert not foreign, f"{table}: a row of tenant {index} names tenants {sorted(foreign)}: {content}"
                if table == "end_users":
                    users_seen[index].add(user_id)
    for index in range(TENANTS):
        assert users_seen[index] == set(soak.users(index)), index
    # each tenant's outbox has its users' track and identify events, none lost to another tenant
    async with admin_engine.connect() as conn:
        counts: dict[uuid.UUID, int] = dict(
            (
                await conn.execute(
                    text(
                        "SELECT tenant_id, count(*) FROM outbox WHERE tenant_id = ANY(:ids) "
                        "AND event_type IN ('track', 'identify') GROUP BY tenant_id"
                    ),
                    {"ids": list(by_id)},
                )
            ).all()
        )
    assert counts == {t.id: 2 * (OWN_USERS + SHARED_USERS) for t in tenants}

    requests = sum(soak.answers.values())
    figures.add(
        "tenant isolation soak",
        worker_id,
        {
            "tenants": TENANTS,
            "requests": requests,
            **{f"answers {status}": n for status, n in sorted(soak.answers.items())},
            "rows checked": rows_checked,
            "leaks": len(soak.leaks),
        },
    )
