"""The tenant manifest (``tenants/<slug>.yaml``): a validated, documented model.

Its JSON Schema is exported to ``tenants/manifest.schema.json`` by
``firstmile tenants schema`` and checked by the tests, so editors can validate
manifests as they are written.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from firstmile.kit.ids import REGION_PATTERN, SLUG_PATTERN
from firstmile.tenancy.keys import SCOPES

Operator = Literal["eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte", "exists", "contains"]
"""Comparison operators of predicates (targeting rules, completion criteria); evaluated by ``onboarding.rules``."""
OPERATORS: tuple[str, ...] = ("eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte", "exists", "contains")
Slug = Annotated[str, Field(pattern=SLUG_PATTERN, description="Lower-case id: letters, digits, dashes.")]
Scalar = str | int | float | bool
KNOWN_TRAITS: tuple[str, ...] = ("persona", "signup_source", "company_size", "use_case", "role")
COMPANY_SIZES: tuple[str, ...] = ("1-10", "11-50", "51-200", "201-1000", "1001+")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Predicate(_Model):
    """One condition over a mapping (traits or event properties), addressed by dotted name."""

    field: str = Field(min_length=1, max_length=128, description="Trait or property name; dots address nested values.")
    op: Operator = Field(default="eq", description="Comparison operator.")
    value: Scalar | list[Scalar] | None = Field(
        default=None, description="Value to compare with; a list for in/not_in."
    )

    @model_validator(mode="after")
    def _value_fits_operator(self) -> Predicate:
        if self.op in ("in", "not_in") and not isinstance(self.value, list):
            raise ValueError(f"operator {self.op} needs a list value")
        if self.op not in ("in", "not_in", "exists") and (self.value is None or isinstance(self.value, list)):
            raise ValueError(f"operator {self.op} needs a single value")
        if self.op == "exists" and not isinstance(self.value, bool):
            raise ValueError("operator exists needs true or false")
        return self


class Completion(_Model):
    """When a tracked event completes the step: its name and property predicates (all must hold)."""

    event: str = Field(min_length=1, max_length=200, description="Tracked event name, e.g. 'Project Created'.")
    where: tuple[Predicate, ...] = Field(default=(), description="Predicates over the event's properties.")


class Step(_Model):
    """One step of a path."""

    id: Slug
    title: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=2000)
    optional: bool = Field(default=False, description="Optional steps never block progress.")
    prerequisites: tuple[str, ...] | None = Field(
        default=None,
        description=(
            "Step ids that must be complete first. Omitted: the previous required step "
            "(the path's order). An empty list: no prerequisites."
        ),
    )
    completion: Completion


class PathSpec(_Model):
    """An onboarding path: ordered steps, who it targets, and which step means activated."""

    id: Slug
    name: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=2000)
    priority: int = Field(default=0, ge=0, le=10_000, description="Higher wins when several paths' targeting matches.")
    targeting: tuple[Predicate, ...] = Field(
        default=(), description="Predicates over the user's traits; all must hold. Empty: never chosen by rules."
    )
    activation_step: Slug = Field(description="The step whose completion marks the user activated.")
    steps: tuple[Step, ...] = Field(min_length=4, max_length=8)

    @model_validator(mode="after")
    def _consistent(self) -> PathSpec:
        ids = [step.id for step in self.steps]
        if len(set(ids)) != len(ids):
            raise ValueError(f"path {self.id}: step ids must be unique")
        seen: set[str] = set()
        for step in self.steps:
            for pre in step.prerequisites or ():
                if pre not in ids:
                    raise ValueError(f"path {self.id}: step {step.id} names unknown prerequisite {pre}")
                if pre not in seen:
                    raise ValueError(f"path {self.id}: step {step.id} prerequisite {pre} must come before it")
            seen.add(step.id)
        activation = next((s for s in self.steps if s.id == self.activation_step), None)
        if activation is None:
            raise ValueError(f"path {self.id}: activation_step {self.activation_step} is not one of its steps")
        if activation.optional:
            raise ValueError(f"path {self.id}: activation_step {self.activation_step} cannot be optional")
        for pred in self.targeting:
            if pred.field == "company_size" and pred.op in ("eq", "ne", "in", "not_in"):
                values = pred.value if isinstance(pred.value, list) else [pred.value]
                unknown = [v for v in values if v not in COMPANY_SIZES]
                if unknown:
                    raise ValueError(f"path {self.id}: company_size values {unknown} not in {list(COMPANY_SIZES)}")
        return self

    def content_hash(self) -> str:
        """Stable hash of the definition: equal hashes mean the same version."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class Tenant(_Model):
    """Who the tenant is and where its data lives."""

    slug: Slug
    name: str = Field(min_length=1, max_length=200)
    home_region: str = Field(pattern=REGION_PATTERN, description="The region that stores and serves this tenant.")


VAULT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
VAULT_MOUNT_PATTERN = r"^[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_-]{1,64}){0,7}$"


class AppRoleSpec(_Model):
    """How Firstmile logs in to the tenant's Vault: an AppRole whose secret_id stays out of the manifest."""

    role_id: str = Field(
        min_length=1, max_length=256, description="The AppRole's role_id (an identifier, not a secret)."
    )
    secret_id_env: str | None = Field(
        default=None,
        pattern=r"^[A-Z_][A-Z0-9_]{0,127}$",
        description="Name of the environment variable that holds the secret_id.",
    )
    secret_id_file: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="Path of a file that holds the secret_id (e.g. a mounted secret).",
    )
    mount: str = Field(
        default="approle", pattern=VAULT_MOUNT_PATTERN, description="Mount path of the AppRole auth method."
    )

    @model_validator(mode="after")
    def _one_secret_source(self) -> AppRoleSpec:
        if (self.secret_id_env is None) == (self.secret_id_file is None):
            raise ValueError("approle needs exactly one of secret_id_env or secret_id_file (never the secret itself)")
        return self


class PlannerSpec(_Model):
    """How the path planner chooses: a registered model first (rules and the default path as fallbacks)."""

    model: Literal["path_classifier"] | None = Field(
        default="path_classifier",
        description=(
            "Registry name of the path model to ask first; null: the targeting rules alone decide. "
            "The model's answer is limited to this manifest's paths."
        ),
    )


class KeysSpec(_Model):
    """Where the tenant's key-encryption key lives: the platform's local KEK, or the tenant's own Vault."""

    provider: Literal["local", "vault"] = Field(
        default="local", description="local: the platform's KEK file. vault: a Vault Transit key (bring your own key)."
    )
    address: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s/]+(/.*)?$",
        description="Vault address, e.g. https://vault.acme.example:8200.",
    )
    namespace: str | None = Field(
        default=None, min_length=1, max_length=256, description="Vault Enterprise namespace (X-Vault-Namespace)."
    )
    mount: str = Field(default="transit", pattern=VAULT_MOUNT_PATTERN, description="Mount path of the Transit engine.")
    key_name: str | None = Field(
        default=None, pattern=VAULT_NAME_PATTERN, description="Transit key name. Omitted: firstmile-<tenant id>."
    )
    approle: AppRoleSpec | None = Field(default=None, description="AppRole credentials for the Vault login.")
    tls_ca_file: str | None = Field(
        default=None, min_length=1, max_length=1024, description="CA bundle that signs the Vault server's certificate."
    )

    @model_validator(mode="after")
    def _consistent(self) -> KeysSpec:
        vault_fields = ("address", "namespace", "key_name", "approle", "tls_ca_file")
        if self.provider == "vault":
            if self.address is None or self.approle is None:
                raise ValueError("keys: provider vault needs address and approle")
        elif any(getattr(self, name) is not None for name in vault_fields):
            raise ValueError("keys: provider local takes no Vault settings")
        return self


class QuotaSpec(_Model):
    """One rate limit: ``requests`` per ``window_seconds``, refilled evenly and spendable at once."""

    requests: int = Field(ge=1, le=10_000_000, description="Requests allowed per window (the RateLimit-Policy q).")
    window_seconds: int = Field(
        default=1, ge=1, le=86_400, description="The window in whole seconds (the RateLimit-Policy w)."
    )


class LimitsSpec(_Model):
    """The tenant's API rate limits (``docs/api.md#rate-limits``); a limit left out keeps the platform's default."""

    per_key: QuotaSpec | None = Field(
        default=None,
        description=(
            "Each API key and each machine client on its own. Omitted: FIRSTMILE_RATE_LIMIT_KEY_REQUESTS per "
            "FIRSTMILE_RATE_LIMIT_KEY_WINDOW_SECONDS."
        ),
    )
    per_tenant: QuotaSpec | None = Field(
        default=None,
        description=(
            "All the tenant's credentials together. Omitted: FIRSTMILE_RATE_LIMIT_TENANT_REQUESTS per "
            "FIRSTMILE_RATE_LIMIT_TENANT_WINDOW_SECONDS."
        ),
    )


ADMIN_ROLES: tuple[str, ...] = ("owner", "editor", "analyst", "viewer")
AdminRole = Literal["owner", "editor", "analyst", "viewer"]
DEFAULT_ROLE_DESCRIPTIONS: dict[str, str] = {
    "owner": "Everything, including members, roles and SSO settings.",
    "editor": "Edits paths and settings; no member or SSO administration.",
    "analyst": "Reads analytics and exports; edits nothing.",
    "viewer": "Reads dashboards; no exports, edits nothing.",
}
GroupName = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[^/\s][^/]*$")]
AttributeName = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^\S+$")]


class SamlAttributes(_Model):
    """Which SAML assertion attributes carry the user's email, display name and groups."""

    email: AttributeName = Field(default="email", description="Attribute with the email address.")
    name: AttributeName = Field(default="name", description="Attribute with the display name.")
    groups: AttributeName = Field(default="groups", description="Attribute with the group names (multi-valued).")


class SamlSpec(_Model):
    """The customer's SAML identity provider, brokered by the tenant's realm."""

    metadata_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s/]+(/\S*)?$",
        description="URL of the IdP's SAML metadata (EntityDescriptor). Exactly one of metadata_url, metadata_xml.",
    )
    metadata_xml: str | None = Field(
        default=None, min_length=1, max_length=200_000, description="The IdP's SAML metadata document itself."
    )
    entity_id: str = Field(min_length=1, max_length=1024, description="The IdP's entity id (its EntityDescriptor).")
    attributes: SamlAttributes = Field(
        default_factory=SamlAttributes, description="Attribute names for email, name and groups."
    )

    @model_validator(mode="after")
    def _one_metadata_source(self) -> SamlSpec:
        if (self.metadata_url is None) == (self.metadata_xml is None):
            raise ValueError("saml needs exactly one of metadata_url or metadata_xml")
        if self.metadata_xml is not None and "EntityDescriptor" not in self.metadata_xml:
            raise ValueError("saml metadata_xml is not SAML metadata (no EntityDescriptor)")
        return self


MACHINE_CLIENT_PATTERN = r"^[a-z][a-z0-9._-]{0,62}[a-z0-9]$"
RESERVED_CLIENT_IDS: tuple[str, ...] = (
    "account",
    "account-console",
    "admin-cli",
    "broker",
    "realm-management",
    "security-admin-console",
)
"""Clients every Keycloak realm has; a machine client may not take their names."""


class MachineClientSpec(_Model):
    """A tenant app's OAuth2 client: client-credentials tokens bounded by the given platform scopes."""

    client_id: str = Field(
        pattern=MACHINE_CLIENT_PATTERN,
        description="The client's id in the tenant realm: lower-case letters, digits, '.', '_', '-'.",
    )
    description: str = Field(default="", max_length=255, description="What the client is for (shown in Keycloak).")
    scopes: tuple[str, ...] = Field(
        min_length=1,
        max_length=len(SCOPES),
        description=(
            "Platform scopes the client may request (" + ", ".join(SCOPES) + "); a token carries those it asks for."
        ),
        json_schema_extra={"items": {"type": "string", "enum": list(SCOPES)}},  # editors offer the known scopes
    )

    @model_validator(mode="after")
    def _known_scopes(self) -> MachineClientSpec:
        unknown = [s for s in self.scopes if s not in SCOPES]
        if unknown:
            raise ValueError(f"machine client {self.client_id}: unknown scope(s) {unknown}; known: {list(SCOPES)}")
        if len(set(self.scopes)) != len(self.scopes):
            raise ValueError(f"machine client {self.client_id}: scopes must be unique")
        if self.client_id in RESERVED_CLIENT_IDS:
            raise ValueError(f"machine client {self.client_id}: the name of a built-in Keycloak client")
        return self


class SsoSpec(_Model):
    """Single sign-on for the tenant's admins: its Keycloak realm, admin roles and IdP (``docs/sso.md``)."""

    roles: dict[AdminRole, Annotated[str, Field(max_length=255)]] = Field(
        default_factory=dict,
        description=(
            "Descriptions of the admin roles owner, editor, analyst and viewer (all four always exist; "
            "a role left out keeps its default description)."
        ),
    )
    group_roles: dict[GroupName, AdminRole] = Field(
        default_factory=dict,
        description="IdP group name -> the admin role its members get (one realm group per entry).",
    )
    saml: SamlSpec | None = Field(default=None, description="The customer's SAML IdP. Omitted: no IdP brokered yet.")
    machine_clients: tuple[MachineClientSpec, ...] = Field(
        default=(),
        max_length=50,
        description="Confidential OAuth2 clients of the tenant's apps (client-credentials grant only).",
    )

    @model_validator(mode="after")
    def _unique_clients(self) -> SsoSpec:
        ids = [c.client_id for c in self.machine_clients]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"machine client ids must be unique; repeated: {repeated}")
        return self

    def role_descriptions(self) -> dict[str, str]:
        """All four admin roles with their descriptions (the manifest's, else the defaults)."""
        return {role: self.roles.get(role, DEFAULT_ROLE_DESCRIPTIONS[role]) for role in ADMIN_ROLES}  # type: ignore[call-overload]


class TenantManifest(_Model):
    """A tenant, declaratively: ``firstmile tenants apply`` makes the platform match it."""

    api_version: Literal["firstmile/v1"] = "firstmile/v1"
    tenant: Tenant
    default_path: Slug = Field(description="Path for users no targeting rule matches; must have no targeting.")
    paths: tuple[PathSpec, ...] = Field(min_length=1, max_length=100)
    keys: KeysSpec | None = Field(
        default=None,
        description="Key management for the tenant's data keys. Omitted: the default (FIRSTMILE_KEY_PROVIDER).",
    )
    planner: PlannerSpec | None = Field(
        default=None,
        description="Adaptive path selection. Omitted: the targeting rules alone decide.",
    )
    pii_traits: tuple[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")], ...] | None = Field(
        default=None,
        description=(
            "Further trait names that hold personal data, encrypted like email, name, first_name, "
            "last_name, phone and company (always PII)."
        ),
    )
    sso: SsoSpec | None = Field(
        default=None,
        description=(
            "Keycloak realm, admin roles and IdP of the tenant. Omitted: the defaults (the four roles, "
            "no group mappings, no IdP)."
        ),
    )
    limits: LimitsSpec | None = Field(
        default=None,
        description=(
            "Rate limits of the tenant's API credentials. Omitted: the platform's defaults (FIRSTMILE_RATE_LIMIT_*)."
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> TenantManifest:
        ids = [p.id for p in self.paths]
        if len(set(ids)) != len(ids):
            raise ValueError("path ids must be unique")
        default = next((p for p in self.paths if p.id == self.default_path), None)
        if default is None:
            raise ValueError(f"default_path {self.default_path} is not one of the paths")
        if default.targeting:
            raise ValueError(f"default_path {self.default_path} must not have targeting rules")
        targeted = [p for p in self.paths if p.targeting]
        priorities = [p.priority for p in targeted]
        clashes = sorted({x for x in priorities if priorities.count(x) > 1})
        if clashes:
            raise ValueError(
                f"targeted paths need distinct priorities so the choice is deterministic; repeated: {clashes}"
            )
        return self

    def content_hash(self) -> str:
        # Sections added later are left out while unset, so existing manifests keep their hash.
        unset: dict[str, Any] = {
            name: True for name in ("keys", "pii_traits", "planner", "sso", "limits") if getattr(self, name) is None
        }
        if self.sso is not None and not self.sso.machine_clients:
            unset["sso"] = {"machine_clients": True}  # added to sso later: an sso section without it keeps its hash
        canonical = json.dumps(self.model_dump(mode="json", exclude=unset), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class ManifestError(ValueError):
    """A manifest file that cannot be read or does not validate; the message says where."""


def load_manifest(path: Path) -> TenantManifest:
    """Read and validate one manifest file."""
    try:
        raw: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"{path}: {exc}") from exc
    try:
        return TenantManifest.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{path}: invalid manifest"]
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {where}: {err['msg']}")
        raise ManifestError("\n".join(lines)) from exc


def json_schema() -> dict[str, Any]:
    """The manifest's JSON Schema (draft 2020-12, as pydantic writes it)."""
    schema = TenantManifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://firstmile.dev/schemas/tenant-manifest.json"
    return schema
