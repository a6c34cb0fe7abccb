"""The auth decision for a token of a tenant this region does not hold, with a stub directory."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from firstmile.auth.resolver import KeyResolver
from firstmile.kit.errors import ProblemError
from firstmile.sso.tokens import RealmNaming, TokenValidator
from firstmile.tenancy.directory import DirectoryEntry, TenantDirectory
from firstmile.tenancy.service import ResolvedTenant
from tests.support.keycloak import b64

NAMING = RealmNaming("http://keycloak.test")


class StubDirectory:
    def __init__(self, homes: dict[str, str]):
        self.homes = homes
        self.asked: list[str] = []

    async def ensure_schema(self) -> None:
        return None

    async def home_region(self, slug: str) -> str | None:
        self.asked.append(slug)
        return self.homes.get(slug)

    async def register(self, slug: str, tenant_id: uuid.UUID, home_region: str) -> bool:
        changed = self.homes.get(slug) != home_region
        self.homes[slug] = home_region
        return changed

    async def remove(self, slug: str) -> bool:
        return self.homes.pop(slug, None) is not None

    async def list(self) -> list[DirectoryEntry]:
        return []

    async def aclose(self) -> None:
        return None


class NoTenantsHere(KeyResolver):
    async def tenant(self, slug: str) -> ResolvedTenant | None:
        return None


async def _no_fetch(url: str) -> Any:
    raise AssertionError(f"fetched {url}")


def _resolver(directory: TenantDirectory | None) -> NoTenantsHere:
    tokens = TokenValidator(NAMING, audience="firstmile-api", fetch=_no_fetch)
    return NoTenantsHere(None, b"p", "eu-west-1", 5.0, tokens=tokens, directory=directory)  # type: ignore[arg-type]


def _token(slug: str) -> str:
    return f"Bearer {b64({'alg': 'RS256', 'kid': 'k'})}.{b64({'iss': NAMING.issuer(slug)})}.c2ln"


async def test_a_tenant_homed_elsewhere_in_the_directory_is_421_with_its_home() -> None:
    directory = StubDirectory({"acme": "us-east-1"})
    with pytest.raises(ProblemError) as raised:
        await _resolver(directory).principal(_token("acme"))
    assert raised.value.status == 421
    assert raised.value.extensions["home_region"] == "us-east-1"
    assert directory.asked == ["acme"]


@pytest.mark.parametrize("homes", [{}, {"acme": "eu-west-1"}])
async def test_unknown_everywhere_or_said_to_be_here_stays_401(homes: dict[str, str]) -> None:
    with pytest.raises(ProblemError) as raised:
        await _resolver(StubDirectory(homes)).principal(_token("acme"))
    assert raised.value.status == 401 and raised.value.extensions["reason"] == "wrong_tenant"


async def test_without_a_directory_it_is_401() -> None:
    with pytest.raises(ProblemError) as raised:
        await _resolver(None).principal(_token("acme"))
    assert raised.value.status == 401
