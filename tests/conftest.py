"""Shared fixtures: a real PostgreSQL database per test worker, migrated once.

``make test`` starts PostgreSQL (deploy/local/postgres.sh) and exports
``FIRSTMILE_TEST_ADMIN_URL`` (a superuser URL on loopback); likewise Kafka
(``FIRSTMILE_TEST_KAFKA``), Redis (``FIRSTMILE_TEST_REDIS``) and Keycloak
(``FIRSTMILE_TEST_KEYCLOAK``). Each xdist worker gets its own database; tests isolate
from each other by tenant, which every factory takes as a required argument.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from playwright.sync_api import Browser, Page
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.controlplane.service import apply_manifest
from firstmile.settings import Settings
from firstmile.tenancy.cli import create_key
from firstmile.tenancy.manifest import TenantManifest
from firstmile.wiring.migrate import upgrade
from tests.factories import ROOT, manifest_for, recreate_database
from tests.support import figures
from tests.support.workers import workers

REGION = "eu-west-1"
_TAG = os.environ.get("FIRSTMILE_TEST_DB_TAG", "")
"""Prefix of this run's database and chdb names, so that two test runs on one server do not share them."""
PEPPER = b"test-pepper-0123456789abcdef"


@dataclass(frozen=True)
class Database:
    admin_url: str
    app_url: str
    name: str


def _admin_server_url() -> str:
    url = os.environ.get("FIRSTMILE_TEST_ADMIN_URL")
    if not url:
        pytest.exit("FIRSTMILE_TEST_ADMIN_URL is not set: run `make test` (it starts PostgreSQL)", returncode=2)
    return url


def migrated_database(name: str) -> Database:
    """Recreate database ``name`` on the test server and migrate it; the app role can log in."""
    import asyncio

    server = make_url(_admin_server_url())
    admin_url = recreate_database(server, name)

    async def allow_login() -> None:
        engine = create_async_engine(admin_url)
        async with engine.begin() as conn:
            await conn.execute(text("ALTER ROLE firstmile_app LOGIN"))
        await engine.dispose()

    # Roles and their grants are cluster-wide: xdist workers migrate one at a time, or
    # concurrent GRANT/ALTER ROLE on the same role fail with "tuple concurrently updated".
    lock_path = ROOT / ".firstmile" / "test-migrate.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            upgrade(admin_url, "firstmile_app")
            asyncio.run(allow_login())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    app_url = server.set(database=name, username="firstmile_app", password=None).render_as_string(hide_password=False)
    return Database(admin_url=admin_url, app_url=app_url, name=name)


@pytest.fixture(scope="session")
def database(worker_id: str) -> Database:
    """A freshly migrated database for this worker; the app role can log in."""
    return migrated_database(f"firstmile_test_{_TAG}{worker_id}")


@dataclass(frozen=True)
class EventsDatabase(Database):
    relay_url: str


RELAY_LOGIN = "firstmile_relay_test"


@pytest.fixture(scope="session")
def events_database(worker_id: str) -> EventsDatabase:
    """A second migrated database for tests that run the outbox relay (it drains every tenant's
    outbox), with a login role that has exactly the relay's privileges."""
    import asyncio

    server = make_url(_admin_server_url())
    name = f"firstmile_test_{_TAG}{worker_id}_events"
    admin_url = recreate_database(server, name)

    async def roles() -> None:
        engine = create_async_engine(admin_url)
        async with engine.begin() as conn:
            await conn.execute(text("ALTER ROLE firstmile_app LOGIN"))
            await conn.execute(
                text(
                    f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{RELAY_LOGIN}') THEN "
                    f"CREATE ROLE {RELAY_LOGIN} LOGIN IN ROLE firstmile_relay; END IF; END $$"
                )
            )
        await engine.dispose()

    lock_path = ROOT / ".firstmile" / "test-migrate.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            upgrade(admin_url, "firstmile_app")
            asyncio.run(roles())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

    def as_role(role: str) -> str:
        return server.set(database=name, username=role, password=None).render_as_string(hide_password=False)

    return EventsDatabase(admin_url, as_role("firstmile_app"), name, as_role(RELAY_LOGIN))


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    bootstrap = os.environ.get("FIRSTMILE_TEST_KAFKA")
    if not bootstrap:
        pytest.exit("FIRSTMILE_TEST_KAFKA is not set: run `make test` (it starts Kafka)", returncode=2)
    return bootstrap


@pytest.fixture(scope="session")
def kafka_sasl_bootstrap() -> str:
    """The test broker's SASL_PLAINTEXT listener (SCRAM-SHA-512; ``deploy/local/kafka.sh sasl-url``)."""
    bootstrap = os.environ.get("FIRSTMILE_TEST_KAFKA_SASL")
    if not bootstrap:
        pytest.exit("FIRSTMILE_TEST_KAFKA_SASL is not set: run `make test` (it starts Kafka)", returncode=2)
    return bootstrap


@pytest.fixture(scope="session")
def tiny_registry(worker_id: str) -> Path:
    """Small models trained once per worker on 3,000 simulated sessions, all in production (about 10 s)."""
    from firstmile.ml.cli import train_models

    root = ROOT / ".firstmile" / "test-models" / f"{os.environ.get('FIRSTMILE_TEST_DB_TAG', '')}{worker_id}"
    shutil.rmtree(root, ignore_errors=True)
    train_models(str(root), sessions=3_000, seed=11, promote="production")  # as `firstmile models train` does
    return root


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The test Redis (``deploy/local/redis.sh``); tests keep to their own keys, never flush the database."""
    url = os.environ.get("FIRSTMILE_TEST_REDIS")
    if not url:
        pytest.exit("FIRSTMILE_TEST_REDIS is not set: run `make test` (it starts Redis)", returncode=2)
    return url


@dataclass(frozen=True)
class Mailpit:
    """The test Mailpit (``deploy/local/mailpit.sh``): a real SMTP server and its HTTP API."""

    smtp_host: str
    smtp_port: int
    api: str


@pytest.fixture(scope="session")
def mailpit() -> Mailpit:
    """Tests that use it are in the xdist group ``mailpit`` (its chaos switch is global); each sends to
    recipients of its own and finds its mail by them."""
    smtp, api = os.environ.get("FIRSTMILE_TEST_MAILPIT_SMTP"), os.environ.get("FIRSTMILE_TEST_MAILPIT_API")
    if not smtp or not api:
        pytest.exit("FIRSTMILE_TEST_MAILPIT_SMTP/_API are not set: run `make test` (it starts Mailpit)", returncode=2)
    parsed = urlsplit(smtp)
    return Mailpit(parsed.hostname or "127.0.0.1", parsed.port or 25, api.rstrip("/"))


@pytest.fixture(scope="session")
def keycloak_url() -> str:
    """The test Keycloak (``deploy/local/keycloak.sh``), as ``http://admin:<password>@127.0.0.1:<port>``
    (its bootstrap admin); tests make realms of their own and delete them afterwards."""
    url = os.environ.get("FIRSTMILE_TEST_KEYCLOAK")
    if not url:
        pytest.exit("FIRSTMILE_TEST_KEYCLOAK is not set: run `make test` (it starts Keycloak)", returncode=2)
    return url


@pytest.fixture(scope="module")
def browser(chromium_path: str) -> Iterator[Browser]:
    """Debian's Chromium under Playwright, one per test module (``tests.support.browser.chromium``)."""
    from tests.support.browser import chromium

    with chromium(chromium_path) as launched:
        yield launched


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A page of its own browser context (cookies apart) that lets axe-core in past the page's CSP."""
    context = browser.new_context(bypass_csp=True)
    opened = context.new_page()
    opened.set_default_timeout(15_000)
    yield opened
    context.close()


@pytest.fixture(scope="session")
def axe_script() -> str:
    """axe-core's ``axe.min.js`` (npm, pinned), which the browser tests inject to check each page's accessibility:
    ``FIRSTMILE_TEST_AXE``, set by ``make test`` from ``deploy/local/chromium.sh axe``. Missing, the tests fail."""
    path = os.environ.get("FIRSTMILE_TEST_AXE", "")
    if not path or not os.path.isfile(path):
        pytest.fail(f"no axe-core ({path or 'FIRSTMILE_TEST_AXE unset'}): run deploy/local/chromium.sh axe "
                    "(make test does) and set FIRSTMILE_TEST_AXE to what it prints", pytrace=False)  # fmt: skip
    return path


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """The Chromium the browser tests drive: ``FIRSTMILE_TEST_CHROMIUM``, else ``chromium`` on PATH.

    Debian's package, installed by ``make test``/``make services`` (``deploy/local/chromium.sh``); Playwright
    launches it with ``executable_path`` and never downloads a browser of its own. Missing, the tests that
    need it fail rather than skip: a skipped browser test would pass CI without the admin login ever
    having run.
    """
    path = os.environ.get("FIRSTMILE_TEST_CHROMIUM") or shutil.which("chromium")
    if not path or not os.access(path, os.X_OK):
        pytest.fail(
            f"no Chromium to run the browser tests ({path or 'chromium not on PATH'}): "
            "run deploy/local/chromium.sh install (make test does), or set FIRSTMILE_TEST_CHROMIUM",
            pytrace=False,
        )
    return path


@pytest.fixture
async def redis_region(redis_url: str, worker_id: str) -> AsyncIterator[str]:
    """A region name of this test's own (feature keys are ``fm:<region>:…``); its keys are deleted afterwards."""
    from redis.asyncio import Redis

    region = f"test-{worker_id}-{secrets.token_hex(4)}"
    yield region
    client = Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"fm:{region}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
async def admin_engine(database: Database) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(database.admin_url, pool_size=2)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="session")
async def app_engine(database: Database) -> AsyncIterator[AsyncEngine]:
    # pre-ping: the database fault tests kill every backend of the app role, these included
    engine = create_async_engine(database.app_url, pool_size=5, pool_pre_ping=True)
    yield engine
    await engine.dispose()


def make_settings(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "region": REGION,
        "api_key_cache_ttl_seconds": 0,
        "log_format": "json",
        # No models unless a test brings its own registry; no background stuck scans or experiment
        # reviews; no background audit sequencer (tests sequence with `sequenced` when they read the log;
        # the in-process sequencer and the review have tests of their own).
        "model_registry_uri": str(ROOT / ".firstmile" / "test-no-models"),
        "stuck_scan_interval_seconds": 0,
        "experiment_review_seconds": 0,
        "dropoff_alert_seconds": 0,  # the drop-off check has tests of its own (test_dropoff_alerts.py)
        "review_queue_check_seconds": 0,  # the review queue's check has tests of its own (test_review_queue_watch.py)
        "destination_poll_seconds": 0,  # the destinations' delivery worker has tests of its own (test_destinations*)
        # a busy CI machine may need more than the 50 ms default for a tenant's first read of its running
        # experiments (a start past it gets control); tests/unit/test_experiment_orchestrator.py tests that
        "experiment_allocation_timeout_ms": 1000,
        # likewise a model's answer: past the 100 ms default on a loaded machine the rules decide and a test that
        # asserts the model's decision fails; the timeout's fallback has tests of its own (test_adaptive_planner)
        "inference_timeout_ms": 2000,
        # and an analytics query (the 5 s default answered 503 once on a loaded CI run; the timeout's fallback to
        # the cache is tested with its own setting in test_analytics_api)
        "analytics_query_timeout_seconds": 30,
        "in_process_sequencer": False,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def analytics_store(worker_id: str) -> Iterator[ChdbStore]:
    """This worker's chdb store (chdb admits one data folder per process); tests isolate by tenant."""
    path = ROOT / ".firstmile" / "test-chdb" / f"{_TAG}{worker_id}"
    shutil.rmtree(path, ignore_errors=True)
    store = ChdbStore(path)
    store.ensure_schema()
    yield store
    store.close()


@pytest.fixture(scope="session")
def app(database: Database, analytics_store: ChdbStore) -> Litestar:
    # The app owns its pool: the test client may run it on another event loop than the tests'.
    return create_app(make_settings(), database.app_url, PEPPER, analytics=analytics_store)


@pytest.fixture(scope="session")
async def client(app: Litestar) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(app=app, raise_server_exceptions=False) as c:
        yield c


@dataclass(frozen=True)
class TenantFixture:
    id: uuid.UUID
    slug: str
    key: str
    manifest: TenantManifest

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


async def new_tenant(
    admin_engine: AsyncEngine, *, region: str = REGION, scopes: tuple[str, ...] = ("onboarding:write",)
) -> TenantFixture:
    """Apply a fresh tenant's manifest and give it a key."""
    slug = f"t-{secrets.token_hex(5)}"
    manifest = manifest_for(slug, region)
    result = await apply_manifest(admin_engine, manifest)
    created = await create_key(admin_engine, PEPPER, slug, list(scopes), "test")
    return TenantFixture(result.tenant_id, slug, created.key, manifest)


async def unaudited_tenant(
    admin_engine: AsyncEngine, *, region: str = REGION, scopes: tuple[str, ...] = ("onboarding:write",)
) -> TenantFixture:
    """A tenant and key written straight through the repository, so its audit chain starts empty
    (``new_tenant`` goes through ``tenants apply`` and ``keys create``, which are audited)."""
    from firstmile.kit.db import tenant_transaction
    from firstmile.kit.scope import OPERATOR_CLI
    from firstmile.tenancy import keys as keylib
    from firstmile.tenancy import repository as tenancy_repo

    slug = f"t-{secrets.token_hex(5)}"
    manifest = manifest_for(slug, region)
    tenant_id = OPERATOR_CLI.tenant(uuid.uuid4())
    key = keylib.generate_key()
    async with tenant_transaction(admin_engine, tenant_id) as tx:
        await tenancy_repo.insert_tenant(
            tx, slug, slug, region, manifest.model_dump(mode="json"), manifest.content_hash()
        )
        await tenancy_repo.insert_key(
            tx, "test", keylib.display_prefix(key), keylib.hash_key(PEPPER, key), scopes, region
        )
    return TenantFixture(tenant_id, slug, key, manifest)


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[object]:
    """Start `firstmile <command>` as Kubernetes runs it (``tests/support/workers.py``); killed at the end."""
    yield from workers(tmp_path, PEPPER, REGION)


@pytest.fixture
async def tenant(admin_engine: AsyncEngine) -> TenantFixture:
    return await new_tenant(admin_engine)


@pytest.fixture
async def other_tenant(admin_engine: AsyncEngine) -> TenantFixture:
    return await new_tenant(admin_engine)


def pytest_sessionstart(session: pytest.Session) -> None:
    """The controller (or the only process) starts the run's harness figures afresh."""
    if not hasattr(session.config, "workerinput"):
        figures.clear()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the reliability harness's figures (tests/support/figures.py) at the end of the run."""
    lines = figures.summary()
    if lines:
        terminalreporter.section("reliability harness")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep ``xdist_group`` marks working under ``--dist loadgroup``.

    pytest-xdist (3.8) groups tests by renaming them ``<nodeid>@<group>`` through
    ``item._nodeid``, which pytest 9 no longer reads (a node's id is ``item._id``),
    so the groups were silently ignored and e.g. the Ray Serve tests ran on two
    workers at once. Do the same renaming where pytest reads it; a no-op where
    xdist's own renaming took effect or without ``--dist loadgroup``.
    """
    for item in items:
        # schemathesis (4.32) names each operation's test "<name>[<METHOD> <path>]", but pytest 9
        # builds a node's id from its callspec, so every operation got the same id and xdist ran one.
        label = getattr(item, "operation_label", None)
        if isinstance(item, pytest.Function) and label and not item.nodeid.endswith("]"):
            item._id = type(item._id).parse(f"{item.nodeid}[{label}]")
    # ...and in the order of the OpenAPI document, which may list two routes of one controller in either
    # order from one process to the next: xdist needs every worker to collect the same list.
    fuzzed = [i for i, item in enumerate(items) if getattr(item, "operation_label", None)]
    for index, item in zip(fuzzed, sorted((items[i] for i in fuzzed), key=lambda it: it.nodeid), strict=True):
        items[index] = item
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        groups = sorted(
            {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")}
        )
        if groups and item.nodeid.rfind("@") <= item.nodeid.rfind("]"):
            node_id = item._id
            item._id = type(node_id).parse(f"{item.nodeid}@{'_'.join(groups)}")


async def sequenced(engine: AsyncEngine, tenant_id: uuid.UUID | None = None, *, timeout_s: float = 30.0) -> int:
    """Sequence queued audit entries now (one tenant's, or every tenant's) and wait until none is left,
    as the sequencer does within its merge delay: tests read the log right after a write without waiting
    for the poll. Another sequencer (the test app's) may hold a tenant meanwhile; then this waits for it."""
    import asyncio

    from firstmile.audit import repository as audit_repo
    from firstmile.audit.service import Sequencer

    sequencer = Sequencer(engine)
    wanted = None if tenant_id is None else uuid.UUID(str(tenant_id))
    placed = 0
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            left = [t for t, _, _ in await audit_repo.queued_tenants(conn) if wanted is None or t == wanted]
        if wanted is None:  # tenants that earlier tests left unsequenceable on purpose are not waited for
            left = [t for t in left if t not in sequencer.failing]
        if not left:
            return placed
        if sequencer.failing & set(left):
            raise AssertionError(f"the queued entries of {wanted} cannot be sequenced (see the log)")
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"audit entries of {len(left)} tenants still queued after {timeout_s} s")
        for tenant in left:
            try:
                placed += await sequencer.sequence_tenant(tenant)
            except Exception:
                if wanted is not None:
                    raise
                sequencer.failing.add(tenant)
        await asyncio.sleep(0.005)
