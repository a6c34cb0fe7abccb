"""The tenant manifest (``tenants/<slug>.yaml``): a validated, documented model.

Its JSON Schema is exported to ``tenants/manifest.schema.json`` by
``firstmile tenants schema`` and checked by the tests, so editors can validate
manifests as they are written.
"""

from __future__ import annotations

import hashlib
import json
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from firstmile.kit.ids import REGION_PATTERN, SLUG_PATTERN
from firstmile.kit.templates import TemplateProblemError, render
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
    validation: Literal["auto", "review"] = Field(
        default="auto",
        description=(
            "auto: a completion (a tracked event meeting the criteria, or the API) completes the step at once. "
            "review: a person confirms each completion first (a signed contract, a security review): it waits "
            "in the review queue, and approval completes the step at the original time (docs/review.md)."
        ),
    )


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
        dumped = self.model_dump(mode="json")
        for step in dumped["steps"]:
            if step.get("validation") == "auto":
                del step["validation"]  # the default, as before the field existed: stored paths keep their hash
        canonical = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
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


MAX_EXPLORATION = 0.5
"""The largest exploration share a tenant may set: at least half of its users get the planner's choice."""


class ExplorationSpec(_Model):
    """Explicit, bounded exploration of the path planner (docs/models.md#exploration-and-propensities)."""

    policy: Literal["epsilon_greedy"] = Field(
        default="epsilon_greedy",
        description="epsilon_greedy: with probability epsilon, a path drawn uniformly from the user's eligible paths "
        "(those whose targeting holds, the default path and the planner's own choice) instead of the choice.",
    )
    epsilon: float = Field(
        default=0.0,
        ge=0.0,
        le=MAX_EXPLORATION,
        description="The share of decisions that explore, 0 to 0.5; 0: off. Each decision records its propensity.",
    )


TENANT_PLANNER_MODEL_PATTERN = r"^(own|path_classifier|tenant-[a-z][a-z0-9-]{0,62}[a-z0-9]\.path_classifier)$"
"""The planner models a manifest may name: the platform's, a tenant's own, or ``own`` (its own model once it has a
production version, the rules until then: docs/models.md#the-automatic-switch)."""
OWN_MODEL = "own"
"""``planner.model: own``: the tenant's own model when it has a production version, the targeting rules until then."""


def own_model_name(slug: str) -> str:
    """The registry name of the tenant's own path model, ``tenant-<slug>.path_classifier``."""
    return f"tenant-{slug}.path_classifier"


class TrainingSpec(_Model):
    """Scheduled training of the tenant's own path model (docs/models.md#scheduled-training)."""

    schedule_days: float = Field(
        default=7.0,
        gt=0,
        le=365,
        description="Train again when the tenant's last model (or last attempt) is older than this many days; a drift "
        "flag on its model trains sooner. The candidate is registered, promoted only with auto_promote.",
    )
    warm_start: Literal["shared"] | bool | None = Field(
        default=None,
        description="shared (or true): opt in to the shared warm-start model (firstmile models train --shared): the "
        "tenant's decisions feed it, reduced to the features that carry no tenant data, and its own model starts "
        "from it. Omitted or false: neither (docs/models.md#shared-warm-start-model).",
    )

    auto_promote: bool = Field(
        default=False,
        description="true: a candidate the tenant-model-training task just registered goes straight to production "
        "when it passes the off-policy gate (and only then), audited as models.promote with auto: true. false: "
        "registered with no stage; an operator promotes it (docs/models.md#the-automatic-switch).",
    )

    @property
    def shares_warm_start(self) -> bool:
        """Whether the tenant opted in to the shared warm-start model."""
        return self.warm_start == "shared" or self.warm_start is True


class PlannerSpec(_Model):
    """How the path planner chooses: a registered model first (rules and the default path as fallbacks)."""

    model: str | None = Field(
        default="path_classifier",
        pattern=TENANT_PLANNER_MODEL_PATTERN,
        description=(
            "Registry name of the path model to ask first: path_classifier (the platform's), or the tenant's own "
            "tenant-<its slug>.path_classifier (firstmile models train --tenant); own: the tenant's own model once "
            "it has a production version, the targeting rules until then (fallback_reason no_own_model); null: the "
            "targeting rules alone decide. The model's answer is limited to this manifest's paths."
        ),
    )
    exploration: ExplorationSpec | None = Field(
        default=None,
        description="Exploration over the eligible paths, recorded with each decision. Omitted: none (epsilon 0).",
    )
    training: TrainingSpec | None = Field(
        default=None,
        description="Opt in to scheduled training of tenant-<slug>.path_classifier on the tenant's logged decisions "
        "(the tenant-model-training task, FIRSTMILE_TENANT_TRAINING_SECONDS). Omitted: trained only on request.",
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


NUDGE_CHANNELS: tuple[str, ...] = ("email", "sms", "in_app", "push")
NudgeChannel = Literal["email", "sms", "in_app", "push"]
STUCK_TRIGGER = "stuck"
"""The trigger name of ``onboarding.stuck`` (the stuck scan) in ``nudges.templates``."""
TEMPLATE_SAMPLE: dict[str, Any] = {
    "link": "https://firstmile.invalid/v1/nudges/l/sample",
    "step": {"title": "Create an API key", "description": "Keys live under Settings."},
    "path": {"name": "Developer onboarding"},
    "tenant": {"name": "Acme"},
    "persona": "developer",
}
"""The variables a nudge template may use, with sample values: the manifest's templates must render with them."""
_TEMPLATE_LIMITS = {"sms": 1600, "push": 500, "in_app": 2000}
Duration = Annotated[
    str,
    Field(pattern=r"^[1-9][0-9]{0,4}(m|h|d)$", description="A duration: a number and a unit, m, h or d (`90m`, `2h`)."),
]


def duration_seconds(value: str) -> int:
    """The seconds of a manifest duration (``90m``, ``2h``, ``3d``)."""
    return int(value[:-1]) * {"m": 60, "h": 3600, "d": 86_400}[value[-1]]


class QuietHoursSpec(_Model):
    """Local quiet hours (the user's time zone); the window may span midnight."""

    start: str = Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$", description="`HH:MM`, local.")
    end: str = Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$", description="`HH:MM`, local.")


NudgeCategory = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,62}$", description="A consent category.")]
"""What a user consents to per channel (``onboarding``, ``product``…): the same ids as the consent API's."""


class NudgePolicySpec(_Model):
    """The tenant's nudge policy; a field left out keeps the platform's default (FIRSTMILE_NUDGE_*)."""

    daily_cap: int | None = Field(
        default=None, ge=0, le=20, description="Nudges per user per local calendar day, every channel together."
    )
    quiet_hours: QuietHoursSpec | Literal["none"] | None = Field(
        default=None, description="Local quiet hours, or `none`. Omitted: FIRSTMILE_NUDGE_QUIET_HOURS."
    )
    max_delay_hours: float | None = Field(
        default=None, ge=0, le=24 * 14, description="A nudge deferred longer than this is dropped."
    )
    default_time_zone: str | None = Field(
        default=None, max_length=64, description="IANA time zone of users whose `timezone` trait is missing."
    )
    default_categories: tuple[NudgeCategory, ...] | None = Field(
        default=None,
        max_length=20,
        description="Categories sent to users who never answered for them (a decline still denies). Omitted: "
        "`onboarding` only; every other category needs the user's grant.",
    )

    @model_validator(mode="after")
    def _known_zone(self) -> NudgePolicySpec:
        if self.default_time_zone is not None:
            try:
                ZoneInfo(self.default_time_zone)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {self.default_time_zone!r} (an IANA name)") from None
        return self


class NudgeTriggerSpec(_Model):
    """A trigger declared on a path: it fires once per user (and step), then the policy and the bandit decide."""

    id: Slug
    path: Slug = Field(description="The path whose users it watches.")
    when: Literal["step_idle", "event_missing", "activated"] = Field(
        description="`step_idle`: the user sits on `step` for `after`; `event_missing`: `event` not seen within "
        "`after` of the start; `activated`: the user reached the path's activation step."
    )
    step: Slug | None = Field(default=None, description="For `step_idle`: the step (a step of `path`).")
    event: str | None = Field(
        default=None, min_length=1, max_length=200, description="For `event_missing`: the tracked event's name."
    )
    after: Duration | None = Field(default=None, description="For `step_idle` and `event_missing`.")
    category: NudgeCategory = Field(
        default="onboarding",
        description="The consent category of its nudges: the user's consent for it on each channel is checked, "
        "and an unsubscribe from one of them withdraws it.",
    )

    @model_validator(mode="after")
    def _fields_fit(self) -> NudgeTriggerSpec:
        needs = {"step_idle": {"step", "after"}, "event_missing": {"event", "after"}, "activated": set[str]()}
        given = {name for name in ("step", "event", "after") if getattr(self, name) is not None}
        if given != needs[self.when]:
            wanted = ", ".join(sorted(needs[self.when])) or "none of step, event, after"
            raise ValueError(f"trigger {self.id}: when {self.when} takes {wanted}")
        return self


class NudgeTemplateSpec(_Model):
    """One wording of a nudge for one channel; several variants of a trigger compete in the bandit."""

    trigger: str = Field(
        default=STUCK_TRIGGER, min_length=1, max_length=63, description="`stuck` or the id of a declared trigger."
    )
    persona: str = Field(default="*", min_length=1, max_length=64, description="The persona it is for; `*`: any.")
    locale: str = Field(default="en", pattern=r"^[a-z]{2,3}$", description="Language (ISO 639), e.g. `en`, `de`.")
    variant: Slug = Field(description="The wording's name; with the channel, an arm of the bandit.")
    version: int = Field(default=1, ge=1, le=100_000, description="The highest version of a template is sent.")
    channel: NudgeChannel
    subject: str | None = Field(
        default=None, max_length=2000, description="E-mail subject, push or in-app title (required for e-mail)."
    )
    body: str = Field(min_length=1, max_length=20_000, description="The text (Jinja2, sandboxed, strict).")
    html: str | None = Field(default=None, max_length=20_000, description="E-mail only: the HTML part.")

    @model_validator(mode="after")
    def _renders(self, info: ValidationInfo) -> NudgeTemplateSpec:
        if self.channel == "email" and self.subject is None:
            raise ValueError(f"template {self.variant}/{self.channel}: e-mail needs a subject")
        if self.html is not None and self.channel != "email":
            raise ValueError(f"template {self.variant}/{self.channel}: only e-mail has an html part")
        if isinstance(info.context, dict) and info.context.get("stored"):
            return self  # read back from the database: it rendered when the manifest was applied
        for part, source, html in (("subject", self.subject, False), ("body", self.body, False),
                                   ("html", self.html, True)):  # fmt: skip
            if source is None:
                continue
            try:
                text = render(source, TEMPLATE_SAMPLE, html=html).text
            except TemplateProblemError as exc:
                raise ValueError(f"template {self.variant}/{self.channel} {part}: {exc}") from None
            limit = _TEMPLATE_LIMITS.get(self.channel)
            if part == "body" and limit is not None and len(text) > limit:
                raise ValueError(f"template {self.variant}/{self.channel}: renders to {len(text)} characters, "
                                 f"more than the {limit} a {self.channel} message takes")  # fmt: skip
        return self


class NudgesSpec(_Model):
    """The tenant's nudges: channels, policy, triggers declared per path, and templates (docs/nudges.md)."""

    enabled: bool = Field(default=True, description="False: no nudge is decided or sent for this tenant.")
    channels: tuple[NudgeChannel, ...] | None = Field(
        default=None, description="Channels the tenant allows (of those the platform has). Omitted: all of them."
    )
    policy: NudgePolicySpec | None = None
    triggers: tuple[NudgeTriggerSpec, ...] = Field(default=(), max_length=100)
    templates: tuple[NudgeTemplateSpec, ...] = Field(
        default=(), max_length=500, description="Omitted for a trigger: the built-in wordings."
    )

    @model_validator(mode="after")
    def _consistent(self) -> NudgesSpec:
        ids = [t.id for t in self.triggers]
        if len(set(ids)) != len(ids) or STUCK_TRIGGER in ids:
            raise ValueError(f"nudges: trigger ids must be unique and not {STUCK_TRIGGER!r}")
        keys = [(t.trigger, t.persona, t.locale, t.variant, t.channel, t.version) for t in self.templates]
        repeated = sorted({"/".join(map(str, k)) for k in keys if keys.count(k) > 1})
        if repeated:
            raise ValueError(f"nudges: templates repeated (trigger/persona/locale/variant/channel/version): {repeated}")
        unknown = sorted({t.trigger for t in self.templates} - {STUCK_TRIGGER, *ids})
        if unknown:
            raise ValueError(f"nudges: templates name unknown triggers {unknown}")
        if self.channels is not None and len(set(self.channels)) != len(self.channels):
            raise ValueError("nudges: channels repeated")
        return self


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


class ExperimentVariantSpec(_Model):
    """One arm of an experiment. Of a path experiment: the path (and optionally a stored version of it) its users
    start on. Of a nudge experiment: the template variant and/or channel its users' nudges use (neither: the
    bandit's own choice, the usual control)."""

    name: Slug
    path: Slug | None = Field(
        default=None, description="Path experiments: the path this variant's users start on (one of the manifest's)."
    )
    version: int | None = Field(
        default=None, ge=1, description="A stored version of the path to pin. Omitted: the path's current version."
    )
    template: Slug | None = Field(
        default=None, description="Nudge experiments: the template variant (a wording's `variant`) its nudges use."
    )
    channel: NudgeChannel | None = Field(default=None, description="Nudge experiments: the channel its nudges use.")
    weight: float = Field(default=1.0, gt=0, le=1000, description="Relative share of the experiment's traffic.")


class ExperimentLayerSpec(_Model):
    """Mutually exclusive experiments share a layer, each owning a range of it: a user is in at most one."""

    name: Slug
    range: tuple[float, float] = Field(
        default=(0.0, 100.0), description="`[start, end)` in percent of the layer's users; ranges may not overlap."
    )

    @model_validator(mode="after")
    def _range_fits(self) -> ExperimentLayerSpec:
        start, end = self.range
        if not 0.0 <= start < end <= 100.0:
            raise ValueError(f"layer {self.name}: range must satisfy 0 <= start < end <= 100")
        return self


class ExperimentThresholdsSpec(_Model):
    """When a winner is declared (docs/experiments.md#statistics)."""

    chance_to_beat: float = Field(default=0.95, ge=0.5, lt=1.0, description="Chance to beat control, at least.")
    expected_loss: float = Field(default=0.001, ge=0.0, le=0.1, description="Expected loss of the winner, at most.")
    alpha: float = Field(default=0.05, gt=0.0, le=0.2, description="Error rate of the sequential test.")


class ExperimentSpec(_Model):
    """An experiment. ``kind: path``: users the allocation admits start on one of its variants' paths.
    ``kind: nudge``: their nudges (of ``trigger``, or of every trigger) use the variant's template or channel."""

    id: Slug
    kind: Literal["path", "nudge"] = Field(default="path", description="What the variants change: the path or nudges.")
    trigger: Slug | None = Field(
        default=None,
        description="Nudge experiments: the trigger whose nudges it covers (`stuck` or a declared id). "
        "Omitted: every trigger.",
    )
    description: str = Field(default="", max_length=2000)
    seed: str | None = Field(
        default=None, min_length=1, max_length=128, description="Salt of the allocation hash. Omitted: the id."
    )
    control: Slug = Field(description="The variant the others are compared with (usually today's path).")
    variants: tuple[ExperimentVariantSpec, ...] = Field(min_length=2, max_length=10)
    traffic_percent: float = Field(default=100.0, ge=0.0, le=100.0, description="Share of eligible users admitted.")
    layer: ExperimentLayerSpec | None = Field(default=None, description="Omitted: a layer of its own.")
    targeting: tuple[Predicate, ...] = Field(default=(), max_length=20, description="Who is eligible (all must hold).")
    metric: str = Field(
        default="activation",
        pattern=r"^(activation|step:[a-z0-9][a-z0-9-]{0,62})$",
        description="The primary metric: `activation`, or `step:<id>` (that step completed).",
    )
    guardrails: tuple[Literal["stuck_rate", "nudge_unsubscribes"], ...] = Field(
        default=("stuck_rate",), description="Metrics that can veto a winner when a variant makes them worse."
    )
    planned_days: int = Field(default=14, ge=1, le=180, description="Planned duration; then extended or concluded.")
    max_extensions: int = Field(default=2, ge=0, le=10, description="Extensions of `planned_days` without a verdict.")
    thresholds: ExperimentThresholdsSpec = Field(default_factory=ExperimentThresholdsSpec)

    @model_validator(mode="after")
    def _variants_fit(self) -> ExperimentSpec:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment {self.id}: variant names must be unique")
        if self.control not in names:
            raise ValueError(f"experiment {self.id}: control {self.control} is not one of its variants")
        if self.kind == "path":
            missing = [v.name for v in self.variants if v.path is None]
            if missing:
                raise ValueError(f"experiment {self.id}: every variant of a path experiment names a path ({missing})")
            if self.trigger is not None or any(v.template or v.channel for v in self.variants):
                raise ValueError(f"experiment {self.id}: trigger, template and channel are for nudge experiments")
        else:
            if any(v.path is not None or v.version is not None for v in self.variants):
                raise ValueError(f"experiment {self.id}: the variants of a nudge experiment name no path")
            arms = [(v.template, v.channel) for v in self.variants]
            if len(set(arms)) != len(arms):
                raise ValueError(f"experiment {self.id}: two variants use the same template and channel")
        return self

    @property
    def allocation_seed(self) -> str:
        return self.seed or self.id


class ExperimentsSpec(_Model):
    """The tenant's experiments (docs/experiments.md); their lifecycle (approve, start, stop) is in the admin API."""

    holdout_percent: float = Field(
        default=0.0, ge=0.0, le=50.0, description="Share of users kept out of every experiment (a global holdout)."
    )
    experiments: tuple[ExperimentSpec, ...] = Field(default=(), max_length=100)

    @model_validator(mode="after")
    def _exclusive(self) -> ExperimentsSpec:
        ids = [e.id for e in self.experiments]
        if len(set(ids)) != len(ids):
            raise ValueError("experiments: ids must be unique")
        by_layer: dict[str, list[ExperimentSpec]] = {}
        for experiment in self.experiments:
            if experiment.layer is not None:
                by_layer.setdefault(experiment.layer.name, []).append(experiment)
        for layer, members in by_layer.items():
            ordered = sorted(members, key=lambda e: e.layer.range if e.layer else (0.0, 0.0))
            for first, second in pairwise(ordered):
                assert first.layer is not None and second.layer is not None
                if second.layer.range[0] < first.layer.range[1]:
                    raise ValueError(
                        f"experiments: {first.id} and {second.id} overlap in layer {layer} "
                        f"({list(first.layer.range)} and {list(second.layer.range)}): a user could be in both"
                    )
        return self


ALERT_EMAIL_PATTERN = r"^[^@\s<>,;]{1,64}@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$"
ENV_NAME_PATTERN = r"^[A-Z_][A-Z0-9_]{0,127}$"


class AlertWebhookSpec(_Model):
    """Where drop-off alerts are posted: a JSON body signed as Standard Webhooks sign it (HMAC-SHA256 of
    ``<webhook-id>.<webhook-timestamp>.<body>``, docs/alerts.md). The secret stays out of the manifest."""

    url: str = Field(
        pattern=r"^https?://[^\s/?#]+(/[^\s]*)?$",
        max_length=2048,
        description="The endpoint that receives a POST per alert (https in production).",
    )
    secret_env: str | None = Field(
        default=None,
        pattern=ENV_NAME_PATTERN,
        description="Name of the environment variable (of the scheduler) that holds the signing secret "
        "(`whsec_<base64>`, or any string).",
    )
    secret_file: str | None = Field(
        default=None, min_length=1, max_length=1024, description="Path of a file that holds the signing secret."
    )

    @model_validator(mode="after")
    def _one_secret_source(self) -> AlertWebhookSpec:
        if (self.secret_env is None) == (self.secret_file is None):
            raise ValueError("alerts.webhook needs exactly one of secret_env or secret_file (never the secret itself)")
        return self


class AlertsSpec(_Model):
    """Drop-off alerts (docs/alerts.md): raised by the scheduled check and shown on the analytics dashboard with or
    without this section; here, where else they go."""

    enabled: bool = Field(default=True, description="False: the tenant's drop-off is not checked.")
    email: tuple[Annotated[str, Field(pattern=ALERT_EMAIL_PATTERN, max_length=254)], ...] = Field(
        default=(), max_length=20, description="Addresses that get an e-mail per alert."
    )
    webhook: AlertWebhookSpec | None = Field(default=None, description="An endpoint that gets a signed POST per alert.")

    @model_validator(mode="after")
    def _unique(self) -> AlertsSpec:
        if len({e.lower() for e in self.email}) != len(self.email):
            raise ValueError("alerts.email: addresses repeated")
        return self


DESTINATION_KINDS: tuple[str, ...] = ("segment", "mixpanel", "amplitude", "intercom", "webhook")
DestinationKind = Literal["segment", "mixpanel", "amplitude", "intercom", "webhook"]
LIFECYCLE_EVENTS: tuple[str, ...] = (
    "onboarding.started",
    "onboarding.step_completed",
    "onboarding.activated",
    "onboarding.completed",
    "onboarding.stuck",
    "nudge.sent",
    "nudge.opened",
    "nudge.clicked",
    "nudge.converted",
    "nudge.unsubscribed",
    "experiment.exposed",
    "onboarding.review_created",
    "onboarding.review_decided",
    "onboarding.path_changed",
)
"""The lifecycle events a destination may receive (docs/destinations.md)."""
LifecycleEvent = Literal[
    "onboarding.started",
    "onboarding.step_completed",
    "onboarding.activated",
    "onboarding.completed",
    "onboarding.stuck",
    "nudge.sent",
    "nudge.opened",
    "nudge.clicked",
    "nudge.converted",
    "nudge.unsubscribed",
    "experiment.exposed",
    "onboarding.review_created",
    "onboarding.review_decided",
    "onboarding.path_changed",
]
DESTINATION_REGIONS: dict[str, tuple[str, ...]] = {
    "segment": ("us", "eu"),
    "mixpanel": ("us", "eu", "in"),
    "amplitude": ("us", "eu"),
    "intercom": ("us", "eu", "au"),
    "webhook": (),
}
"""The data residency regions each vendor serves (its API host per region: docs/destinations.md)."""
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
TraitName = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$", description="A trait name.")]


def _endpoint_problem(url: str) -> str | None:
    """Why ``url`` may not receive a tenant's events: https only, except on this host (a local receiver)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return "is not a URL"
    if parts.scheme not in ("https", "http") or not host:
        return "must be an https:// URL"
    if parts.username or parts.password:
        return "must not carry credentials (set them with `firstmile destinations credentials set`)"
    if parts.scheme == "http" and host not in _LOOPBACK_HOSTS:
        return "must be https (plain http only to 127.0.0.1, ::1 or localhost)"
    return None


class DestinationSpec(_Model):
    """One destination of the tenant's lifecycle events (docs/destinations.md). Its credentials never appear here:
    ``firstmile destinations credentials set`` stores them encrypted with the tenant's data key."""

    name: Slug = Field(description="The destination's name, unique in the manifest (the CLI's `--name`).")
    kind: DestinationKind = Field(description="Which tool receives the events: a vendor, or a signed webhook.")
    enabled: bool = Field(default=True, description="False: nothing is queued for it (queued events wait).")
    events: tuple[LifecycleEvent, ...] | None = Field(
        default=None, min_length=1, description="The lifecycle events it receives. Omitted: all of them."
    )
    traits: tuple[TraitName, ...] | None = Field(
        default=None,
        max_length=100,
        description="The user traits its `identify` carries (an allow-list). Omitted: every trait except personal "
        "data (email, name, first_name, last_name, phone, company and the manifest's `pii_traits`); a personal "
        "trait is sent only when listed here.",
    )
    url: str | None = Field(
        default=None,
        max_length=2048,
        description="`webhook`: the endpoint that receives a signed POST per event (https; http only to loopback).",
    )
    region: str | None = Field(
        default=None,
        description="A vendor's data residency region: segment us|eu, mixpanel us|eu|in, amplitude us|eu, "
        "intercom us|eu|au. Omitted: us.",
    )
    host: str | None = Field(
        default=None,
        max_length=2048,
        description="A vendor's API base URL instead of the region's (a proxy; https, or http to loopback).",
    )
    max_batch: int | None = Field(
        default=None, ge=1, le=1000, description="Events per call at most. Omitted: the vendor's own limit."
    )
    max_wait_seconds: float = Field(
        default=0,
        ge=0,
        le=3600,
        description="How long due events may wait for a fuller batch (a call once `max_batch` are due or the "
        "oldest waited this long). 0: at once.",
    )

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> DestinationSpec:
        where = f"destinations: {self.name}"
        if self.kind == "webhook":
            if self.url is None:
                raise ValueError(f"{where}: a webhook needs url")
            problem = _endpoint_problem(self.url)
            if problem is not None:
                raise ValueError(f"{where}: url {problem}")
            if self.region is not None or self.host is not None:
                raise ValueError(f"{where}: region and host are for vendors; a webhook has url")
            return self
        if self.url is not None:
            raise ValueError(f"{where}: url is for webhooks; a vendor takes region or host")
        if self.region is not None and self.region not in DESTINATION_REGIONS[self.kind]:
            raise ValueError(f"{where}: region {self.region!r} is not one of {list(DESTINATION_REGIONS[self.kind])}")
        if self.host is not None:
            problem = _endpoint_problem(self.host)
            if problem is not None:
                raise ValueError(f"{where}: host {problem}")
        return self

    def receives(self, event_type: str) -> bool:
        return self.events is None or event_type in self.events


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
    nudges: NudgesSpec | None = Field(
        default=None,
        description="Nudges: channels, policy, triggers per path and templates. Omitted: the platform's defaults "
        "(FIRSTMILE_NUDGE_*), the stuck trigger and the built-in wordings.",
    )
    experiments: ExperimentsSpec | None = Field(
        default=None, description="Experiments on path variants (docs/experiments.md). Omitted: none."
    )
    alerts: AlertsSpec | None = Field(
        default=None,
        description="Drop-off alerts: where they are sent (docs/alerts.md). Omitted: shown on the analytics "
        "dashboard only.",
    )
    destinations: tuple[DestinationSpec, ...] | None = Field(
        default=None,
        max_length=20,
        description="Where the tenant's onboarding lifecycle is delivered: Segment, Mixpanel, Amplitude, Intercom "
        "or signed webhooks (docs/destinations.md). Omitted: nowhere.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> TenantManifest:
        ids = [p.id for p in self.paths]
        if len(set(ids)) != len(ids):
            raise ValueError("path ids must be unique")
        default = next((p for p in self.paths if p.id == self.default_path), None)
        if default is None:
            raise ValueError(f"default_path {self.default_path} is not one of the paths")
        own_model = own_model_name(self.tenant.slug)
        if self.planner is not None and self.planner.model not in (None, "path_classifier", OWN_MODEL, own_model):
            raise ValueError(f"planner.model {self.planner.model}: a tenant may name only its own model, {own_model}")
        if default.targeting:
            raise ValueError(f"default_path {self.default_path} must not have targeting rules")
        targeted = [p for p in self.paths if p.targeting]
        priorities = [p.priority for p in targeted]
        clashes = sorted({x for x in priorities if priorities.count(x) > 1})
        if clashes:
            raise ValueError(
                f"targeted paths need distinct priorities so the choice is deterministic; repeated: {clashes}"
            )
        for trigger in self.nudges.triggers if self.nudges is not None else ():
            path = next((p for p in self.paths if p.id == trigger.path), None)
            if path is None:
                raise ValueError(f"nudges: trigger {trigger.id} names unknown path {trigger.path}")
            if trigger.step is not None and trigger.step not in {s.id for s in path.steps}:
                raise ValueError(f"nudges: trigger {trigger.id}: {trigger.step} is not a step of path {path.id}")
        paths = {p.id: p for p in self.paths}
        triggers = {"stuck"} | {t.id for t in (self.nudges.triggers if self.nudges is not None else ())}
        for experiment in self.experiments.experiments if self.experiments is not None else ():
            for variant in experiment.variants:
                if variant.path is not None and variant.path not in paths:
                    raise ValueError(f"experiments: {experiment.id}: variant {variant.name} names unknown path "
                                     f"{variant.path}")  # fmt: skip
            if experiment.trigger is not None and experiment.trigger not in triggers:
                raise ValueError(f"experiments: {experiment.id}: trigger {experiment.trigger} is not `stuck` nor "
                                 "one of nudges.triggers")  # fmt: skip
            step = experiment.metric.removeprefix("step:")
            scope = [paths[v.path] for v in experiment.variants if v.path is not None] or list(paths.values())
            if experiment.metric != "activation" and not any(step in {s.id for s in p.steps} for p in scope):
                raise ValueError(f"experiments: {experiment.id}: metric {experiment.metric} names no step of its paths")
        names = [d.name for d in self.destinations or ()]
        if len(set(names)) != len(names):
            raise ValueError(f"destinations: names repeated: {sorted({n for n in names if names.count(n) > 1})}")
        return self

    def content_hash(self) -> str:
        # Sections added later are left out while unset, so existing manifests keep their hash.
        unset: dict[str, Any] = {name: True for name in _LATER_SECTIONS if getattr(self, name) is None}
        if self.sso is not None and not self.sso.machine_clients:
            unset["sso"] = {"machine_clients": True}  # added to sso later: an sso section without it keeps its hash
        auto = {  # steps' validation, added later: at its default (auto) it is left out, the hash stays
            i: {"steps": {j: {"validation": True} for j, s in enumerate(p.steps) if s.validation == "auto"}}
            for i, p in enumerate(self.paths)
        }
        if any(a["steps"] for a in auto.values()):
            unset["paths"] = {i: a for i, a in auto.items() if a["steps"]}
        if self.planner is not None:  # fields added to planner later: unset, the hash stays
            later_planner: dict[str, Any] = {
                name: True for name in ("exploration", "training") if getattr(self.planner, name) is None
            }
            if self.planner.training is not None and self.planner.training.warm_start is None:
                later_planner["training"] = {"warm_start": True}  # added to training later: unset, the hash stays
            if self.planner.training is not None and not self.planner.training.auto_promote:
                later_planner["training"] = later_planner.get("training", {}) | {"auto_promote": True}  # at default
            if later_planner:
                unset["planner"] = later_planner
        if self.nudges is not None:  # fields added to nudges later: left at their defaults, the hash stays
            later: dict[str, Any] = {}
            if self.nudges.policy is not None and self.nudges.policy.default_categories is None:
                later["policy"] = {"default_categories": True}
            defaults = {i: {"category": True} for i, t in enumerate(self.nudges.triggers) if t.category == "onboarding"}
            if defaults:
                later["triggers"] = defaults
            if later:
                unset["nudges"] = later
        if self.experiments is not None:  # fields added to experiments later (nudge experiments): unset, same hash
            added = {
                i: {
                    "kind": True,
                    "trigger": True,
                    "variants": {j: {"template": True, "channel": True} for j in range(len(e.variants))},
                }
                for i, e in enumerate(self.experiments.experiments)
                if e.kind == "path" and e.trigger is None
            }
            if added:
                unset["experiments"] = {"experiments": added}
        canonical = json.dumps(self.model_dump(mode="json", exclude=unset), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


_LATER_SECTIONS = ("keys", "pii_traits", "planner", "sso", "limits", "nudges", "experiments", "alerts", "destinations")
"""Sections added after the first manifests: left out of the hash while unset."""


class ManifestError(ValueError):
    """A manifest file that cannot be read or does not validate; the message says where."""


def _position(root: yaml.Node | None, loc: tuple[int | str, ...]) -> tuple[int, int] | None:
    """The 1-based line and column of the deepest node of ``loc`` found in the YAML tree."""
    node, found = root, root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
        else:
            node = None
        if node is None:
            break
        found = node
    return None if found is None else (found.start_mark.line + 1, found.start_mark.column + 1)


def load_manifest(path: Path) -> TenantManifest:
    """Read and validate one manifest file; a :class:`ManifestError` names the line and column of each error."""
    try:
        text = path.read_text(encoding="utf-8")
        raw: Any = yaml.safe_load(text)
        tree = yaml.compose(text, Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"{path}: {exc}") from exc
    try:
        return TenantManifest.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{path}: invalid manifest"]
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if isinstance(p, int | str))
            # pydantic adds the member's tag to a union's loc (quiet_hours.QuietHoursSpec.start): drop it
            while True:
                names = [i for i, p in enumerate(loc) if isinstance(p, str) and (p[:1].isupper() or "[" in p)]
                if not names:
                    break
                loc = loc[: names[0]] + loc[names[0] + 1 :]
            where = ".".join(str(p) for p in loc) or "(top level)"
            at = _position(tree, loc)
            lines.append(f"  {path}:{at[0]}:{at[1]}: {where}: {err['msg']}" if at else f"  {where}: {err['msg']}")
        raise ManifestError("\n".join(lines)) from exc


def json_schema() -> dict[str, Any]:
    """The manifest's JSON Schema (draft 2020-12, as pydantic writes it)."""
    schema = TenantManifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://firstmile.dev/schemas/tenant-manifest.json"
    return schema
