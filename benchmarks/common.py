"""Constants and helpers shared by the benchmark modules."""

from __future__ import annotations

import secrets
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from firstmile.kit.scope import TenantId

BENCH_DB = "firstmile_bench"
APP_ROLE = "firstmile_app"
BYPASS_ROLE = "firstmile_bench_bypass"
TENANT = "demo"
PATH_KEY = "developer-quickstart"
STEP = "create-api-key"
RLS_ITERATIONS = 3000
RLS_ROUND = 100
WRK_TIMEOUT = "10s"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
PASS_THROUGH = ("FIRSTMILE_DATABASE_POOL_SIZE", "FIRSTMILE_DATABASE_MAX_OVERFLOW")
"""Server settings taken from the environment (to try other pool sizes); all others are fixed."""
UNLIMITED = {"FIRSTMILE_RATE_LIMIT_KEY_REQUESTS": "10000000", "FIRSTMILE_RATE_LIMIT_TENANT_REQUESTS": "10000000"}
"""The benchmarks measure capacity from one key of one tenant: the rate limits are checked (their cost is
measured) but set out of reach, or the default 1,000 a second per key would answer 429."""
MARKER = "FIRSTMILE_BENCH "
MARKER_BAD = "FIRSTMILE_BENCH_FIRST_BAD "


class BenchError(RuntimeError):
    """The benchmark could not run; the message says why."""


def _log(message: str) -> None:
    sys.stderr.write(f"[bench] {message}\n")
    sys.stderr.flush()


BENCH_ACTOR = "worker:bench"
"""How the benchmarks act on their own tenants (an operator context: they seed and measure, no principal)."""


def bench_tenant(tenant_id: uuid.UUID) -> TenantId:
    """The scope of a tenant the benchmark made itself (``OperatorContext("worker:bench")``)."""
    from firstmile.kit.scope import OperatorContext

    return OperatorContext(BENCH_ACTOR).tenant(tenant_id)


def demo_manifest() -> Path:
    """``tenants/demo.yaml`` of the checkout this package runs from, else of the working directory."""
    here = Path(__file__).resolve().parents[1] / "tenants" / "demo.yaml"
    return here if here.exists() else Path.cwd() / "tenants" / "demo.yaml"


def _secret(path: Path) -> Path:
    """32 random bytes, hex, mode 0600: a throwaway key for one benchmark run."""
    path.touch(mode=0o600)
    path.write_text(secrets.token_hex(32), encoding="ascii")
    return path
