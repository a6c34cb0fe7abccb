"""The nudge executor: decide on a trigger (policy, bandit, content) and deliver the sends.

**Deciding** (:meth:`NudgeExecutor.on_stuck`, for an ``onboarding.stuck`` event): in one
transaction, read what the policy needs (the user's traits and time zone, consents,
suppressions, the nudges already sent or scheduled), evaluate the policy for every configured
channel, let the bandit choose among the arms (template variant and channel) whose channel the
policy allows, render the chosen template, and write the send (``scheduled`` at the policy's
``send_at``) and a ``decision`` entry in the audit log with its inputs, candidates, verdicts and
choice. When no channel is allowed the send is written ``denied`` with the reasons: either way
the trigger has fired (one nudge per user, step and trigger). A redelivered event finds the send
already there and changes nothing.

**Delivering** (:meth:`DeliveryWorker.run_once`, a supervised loop): for every tenant with sends
due, claim a batch (``sending`` until a lease runs out, ``FOR UPDATE SKIP LOCKED``) and commit;
then, outside any transaction, read the address (the user's e-mail is sealed: decrypted with the
tenant's keys) and hand the message to the channel with the send's id as idempotency key; then
record the outcome with a ``nudge.sent`` event. A worker killed between the claim and the record
leaves the send claimed; when the lease runs out another pass takes it again: nothing is lost,
and the message goes twice only if the provider had accepted it before the kill (the same
idempotency key and ``Message-ID`` let the receiver drop it). Unavailable channels retry with
exponential backoff and full jitter, then give up (``dead``); a rate limit defers to the
provider's window; a rejection is final, and suppresses the address when the provider says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import msgspec
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.audit import service as audit
from firstmile.kit import telemetry
from firstmile.kit.db import StatementDeadlineError, TenantTx, statement_deadline
from firstmile.kit.outbox import OutboxEvent, enqueue
from firstmile.kit.scope import OperatorContext, TenantId, tenant_of
from firstmile.kit.templates import TemplateProblemError, render
from firstmile.kit.uow import UnitOfWork
from firstmile.ml.nudge_prior import NUDGE_MODEL, ResponsePrior
from firstmile.nudges import repository as repo
from firstmile.nudges.assignment import NudgeAssignment, NudgeExperimentAssigner, NudgeVariant
from firstmile.nudges.bandit import ArmStats, ThompsonSampler
from firstmile.nudges.channels import (
    Channel,
    ChannelRateLimitedError,
    ChannelRejectedError,
    ChannelUnavailableError,
    OutboundMessage,
)
from firstmile.nudges.config import TenantNudges, tenant_nudges
from firstmile.nudges.content import DEFAULT_LOCALE, Wording, language_of, wordings
from firstmile.nudges.links import CLICK, UNSUBSCRIBE, BadLinkError, LinkPrincipal, LinkSigner
from firstmile.nudges.personalise import AllowedContext, Personalised, Personaliser, StaticMessage
from firstmile.nudges.policy import Audience, NudgePolicy, PolicyError, Verdict, evaluate
from firstmile.nudges.push_webpush import WebPushChannel
from firstmile.nudges.replay import LocalReplayGuard, SharedReplayGuard
from firstmile.nudges.webhooks import (
    TOLERANCE_S,
    TWILIO_REPLAY_TTL_S,
    WebhookRefusedError,
    sendgrid_public_key,
    verify_sendgrid,
    verify_twilio,
    verify_vonage,
)
from firstmile.onboarding import service as onboarding
from firstmile.security.crypto import FieldContext
from firstmile.security.datakeys import DataKeyService, TenantKeys
from firstmile.tenancy import service as tenancy
from firstmile.tenancy.manifest import TEMPLATE_SAMPLE

log = logging.getLogger("firstmile.nudges")

DECIDER = OperatorContext("worker:nudges")
DELIVERY = OperatorContext("worker:nudge-delivery")
BANDIT_VERSION = "thompson-beta-1"
STUCK_CATEGORY = "onboarding"
STUCK_TRIGGER = "stuck"


@dataclass(frozen=True, slots=True)
class Decided:
    """What :meth:`NudgeExecutor.on_stuck` did."""

    send_id: uuid.UUID | None
    """None when the trigger had fired before (nothing written)."""
    status: str
    """``scheduled`` or ``denied`` (or ``skipped``: the user is no longer stuck on that step)."""
    arm: str | None = None
    send_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class InExperiment:
    """A decision inside a nudge experiment: the user's variant and the arms the bandit may choose from."""

    assignment: NudgeAssignment
    arms: dict[str, Wording]
    honoured: bool
    """False: an exposed user's variant has no allowed arm this time, so every allowed arm is offered."""


class NudgeExecutor:
    """Decides nudges (see the module docstring); ``channels`` are the configured ones, by channel name."""

    def __init__(
        self,
        onboarding_service: onboarding.OnboardingService,
        channels: Sequence[str],
        policy: NudgePolicy | None = None,
        sampler: ThompsonSampler | None = None,
        default_time_zone: str = "UTC",
        links: LinkSigner | None = None,
        public_url: str = "http://127.0.0.1:8000",
        policy_timeout: float = 0.5,
        setup_ttl: float = 0.0,
        experiments: NudgeExperimentAssigner | None = None,
    ) -> None:
        self.onboarding = onboarding_service
        self.experiments = experiments
        """Asked at each decision for the user's variant of a running nudge experiment (None: no experiments)."""
        self.setup_ttl = setup_ttl
        self._setups: OrderedDict[TenantId, tuple[float, TenantNudges]] = OrderedDict()
        self.policy_timeout = policy_timeout
        """Seconds each read of the policy's inputs may take; past it the decision is denied (``policy-timeout``)."""
        self.links = links
        self.public_url = public_url.rstrip("/")
        self.channels = tuple(channels)
        self.policy = policy or NudgePolicy()
        self.sampler = sampler or ThompsonSampler()
        self.default_time_zone = default_time_zone

    async def on_stuck(
        self, tx: TenantTx, user_id: str, step_id: str, now: datetime, prior: ResponsePrior | None = None
    ) -> Decided:
        """Decide the nudge for a user flagged stuck on ``step_id`` (one transaction: the caller's); ``prior``: the
        response model's predictions, asked before the transaction (``ml.nudge_prior.ModelResponsePrior``)."""
        return await self.on_trigger(tx, user_id, STUCK_TRIGGER, step_id, now, prior=prior)

    async def tenant_setup(self, tx: TenantTx) -> TenantNudges:
        """The tenant's nudge configuration: the manifest's ``nudges:`` section over the platform's defaults, and
        the tenant's name; cached for ``setup_ttl`` seconds (a manifest change applies within that long)."""
        cached = self._setups.get(tx.tenant)
        now = time.monotonic()
        if cached is not None and now - cached[0] < self.setup_ttl:
            return cached[1]
        setup = tenant_nudges(await tenancy.nudges_spec(tx), self.policy, self.channels, self.default_time_zone)
        setup = replace(setup, tenant_name=await tenancy.tenant_name(tx))
        self._setups[tx.tenant] = (now, setup)
        if len(self._setups) > 10_000:
            self._setups.popitem(last=False)
        return setup

    async def on_trigger(
        self, tx: TenantTx, user_id: str, trigger: str, step_id: str | None, now: datetime,
        setup: TenantNudges | None = None, prior: ResponsePrior | None = None,
    ) -> Decided:  # fmt: skip
        """Decide the nudge for ``trigger`` (``stuck`` or a trigger of the manifest) for a user (the caller's
        transaction). ``step_id``: the step it is about (``stuck``, ``step_idle``); None for the others, which
        are about the user's current step (``event_missing``) or the activation step (``activated``)."""
        setup = setup or await self.tenant_setup(tx)
        if not setup.enabled or not setup.channels:
            return Decided(None, "off")
        kind = "stuck" if trigger == STUCK_TRIGGER else None
        declared = next((t for t in setup.triggers if t.id == trigger), None)
        if declared is not None:
            kind = declared.when
        if kind is None:
            return Decided(None, "skipped")  # a trigger the manifest no longer declares
        category = declared.category if declared is not None else STUCK_CATEGORY
        progress = await self.onboarding.progress(tx, user_id)
        if progress is None or (declared is not None and declared.path != progress.path_key):
            return Decided(None, "skipped")
        if kind in ("stuck", "step_idle"):
            if progress.status != "in_progress" or progress.current_step != step_id:
                return Decided(None, "skipped")
            trigger_key = f"{trigger}:{step_id}"
        elif kind == "event_missing":
            if progress.status != "in_progress":
                return Decided(None, "skipped")
            step_id, trigger_key = progress.current_step, f"{trigger}:-"
        else:  # activated
            if progress.activated_at is None:
                return Decided(None, "skipped")
            step_id, trigger_key = None, f"{trigger}:-"
        path = await self.onboarding.catalogs.version(tx, progress.path_key, progress.path_version)
        step = path.step(step_id or path.activation_step)
        if step is None:
            return Decided(None, "skipped")
        verdicts: dict[str, Verdict] = {}
        segment, time_zone, locale = "default", setup.default_time_zone, DEFAULT_LOCALE
        traits: Mapping[str, Any] = {}
        try:  # the design's rule: a policy check that times out denies
            async with statement_deadline(tx, self.policy_timeout):
                traits_row = await onboarding.user_traits(tx, user_id)
                inputs = await repo.policy_inputs(tx, user_id, now - timedelta(days=3))
        except StatementDeadlineError as exc:
            log.warning("nudge policy inputs timed out, denying: %s", exc)
            for channel in setup.channels:
                verdicts[channel] = Verdict(False, None, ("policy-timeout",), {"policy": "timeout"})
        else:
            traits = traits_row or {}
            segment = str(traits.get("persona") or "default")
            time_zone = str(traits.get("timezone") or setup.default_time_zone)
            locale = language_of(traits.get("locale"))
            for channel in setup.channels:
                audience = Audience(time_zone, inputs.consents, suppressed=channel in inputs.suppressed)
                try:
                    verdicts[channel] = evaluate(setup.policy, audience, channel, category, now, inputs.sent)
                except PolicyError as exc:  # a trait with an unknown time zone: the user's own data, not a bug
                    verdicts[channel] = Verdict(False, None, (f"policy-error: {exc}",), {"policy": "deny"})
        offer = [w for w in wordings(setup.templates, trigger, segment, locale) if w.channel in verdicts]
        candidates = [f"{w.variant}|{w.channel}" for w in offer]
        arms = {f"{w.variant}|{w.channel}|policy": w for w in offer if verdicts[w.channel].allowed}
        send_id = uuid.uuid4()
        base: dict[str, Any] = {
            "trigger": "onboarding.stuck" if kind == "stuck" else f"manifest:{trigger}",
            "trigger_key": trigger_key,
            "category": category,
            "step_id": step.id,
            "segment": segment,
            "time_zone": time_zone,
            "locale": locale,
            "candidates": candidates,
            "policy": {
                c: {"allowed": v.allowed, "send_at": v.send_at.isoformat() if v.send_at else None,
                    "reasons": list(v.reasons), "checks": dict(v.checks)}
                for c, v in verdicts.items()
            },
        }  # fmt: skip
        if not arms:
            reasons = sorted({r for v in verdicts.values() for r in v.reasons}) or ["no-wording"]
            created = await repo.insert_send(
                tx, send_id, user_id, trigger_key, "none", "none", segment, "denied", now, None, "",
                None, base | {"reasons": reasons},
            )  # fmt: skip
            if created:
                await self._audit(tx, user_id, base, send_id, None, None)
                telemetry.NUDGE_DECISIONS.labels("denied").inc()
            return Decided(send_id if created else None, "denied")
        chosen = await self._experiment(tx, user_id, traits, trigger, arms)
        if chosen is not None:  # a nudge experiment's variant narrows the bandit's arms
            base["experiment"] = chosen.assignment.as_record(chosen.honoured)
            arms = chosen.arms
        stats = await repo.arm_stats(tx, segment)
        prior = prior or ResponsePrior(fallback="not_asked")
        predicted = {a: prior.probabilities[w.channel] for a, w in arms.items() if w.channel in prior.probabilities}
        choice = self.sampler.choose([ArmStats(a, *stats.get(a, (0, 0))) for a in arms], predicted)
        base["prior"] = {"model": NUDGE_MODEL, "version": prior.version, "fallback": prior.fallback,
                         "probabilities": {c: round(p, 6) for c, p in prior.probabilities.items()}}  # fmt: skip
        wording = arms[choice.arm]
        link = f"{self.public_url}/v1/nudges/l/{self.links.token(tx.tenant, send_id, CLICK)}" if self.links else ""
        context = {
            "link": link,
            "step": {"title": step.title, "description": step.description or ""},
            "path": {"name": path.name},
            "tenant": {"name": setup.tenant_name},
            "persona": segment,
        }
        template = wording.template
        try:
            subject = render(template.subject, context).text if template.subject else None
            body = render(template.body, context).text
            html = render(template.html, context, html=True).text if template.html else None
        except TemplateProblemError as exc:
            raise ValueError(f"nudge template {wording.variant}/{wording.channel} does not render: {exc}") from exc
        send_at = verdicts[wording.channel].send_at or now
        decision = base | {
            "context": {
                "step_title": step.title,
                "step_description": step.description or "",
                "path_name": path.name,
                "tenant_name": setup.tenant_name,
                "persona": segment,
            },  # what a rewrite may name
            "arm": choice.arm,
            "channel": wording.channel,
            "variant": wording.variant,
            "content": wording.describe(),
            "bandit": {
                "version": BANDIT_VERSION,
                "samples": {k: round(v, 6) for k, v in choice.samples.items()},
                "posterior_means": {k: round(v, 6) for k, v in choice.posterior_means.items()},
            },
        }
        created = await repo.insert_send(
            tx, send_id, user_id, trigger_key, wording.channel, choice.arm, segment, "scheduled", send_at, subject,
            body, html, decision,
        )  # fmt: skip
        if not created:
            return Decided(None, "scheduled")
        if chosen is not None and not chosen.assignment.exposed and self.experiments is not None:
            await self.experiments.record_nudge(tx, user_id, chosen.assignment, now, str(send_id))
        await self._audit(tx, user_id, base, send_id, choice.arm, send_at, wording.describe())
        telemetry.NUDGE_DECISIONS.labels("scheduled").inc()
        return Decided(send_id, "scheduled", choice.arm, send_at)

    async def _experiment(
        self, tx: TenantTx, user_id: str, traits: Mapping[str, Any], trigger: str, arms: dict[str, Wording]
    ) -> InExperiment | None:
        """The user's variant of a running nudge experiment and the arms it admits (module docstring of
        :mod:`firstmile.nudges.assignment`), or None: no experiment, or not every variant is possible now."""
        if self.experiments is None:
            return None
        assignment = await self.experiments.assign_nudge(tx, user_id, traits, trigger)
        if assignment is None:
            return None

        def admitted(variant: NudgeVariant) -> dict[str, Wording]:
            return {a: w for a, w in arms.items() if variant.admits(w.variant, w.channel)}

        if not assignment.exposed and not all(admitted(v) for v in assignment.variants):
            return None  # some variant has no arm the policy allows for this user now: not exposed at this decision
        mine = admitted(assignment.variant)
        return InExperiment(assignment, mine or arms, bool(mine))

    async def _audit(
        self,
        tx: TenantTx,
        user_id: str,
        base: Mapping[str, Any],
        send_id: uuid.UUID,
        arm: str | None,
        send_at: datetime | None,
        content: Mapping[str, Any] | None = None,
    ) -> None:
        await audit.append(
            tx,
            "decision",
            "nudge_executor",
            user_id,
            {
                "decision": "nudge",
                "inputs": {"trigger": base["trigger"], "trigger_key": base["trigger_key"], "step_id": base["step_id"],
                           "segment": base["segment"], "time_zone": base["time_zone"], "locale": base["locale"]},
                "candidates": base["candidates"],
                "policy": base["policy"],
                "prior": base.get("prior"),
                "experiment": base.get("experiment"),
                "output": {"send_id": str(send_id), "arm": arm,
                           "send_at": send_at.isoformat() if send_at else None, "content": content},
                "model": "nudge_bandit",
                "model_version": BANDIT_VERSION,
                "confidence": None,
                "fallback": None,
            },
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class DeliveryOutcome:
    send_id: uuid.UUID
    status: str
    detail: str | None = None


def _push_context(tenant: uuid.UUID, user_id: str) -> FieldContext:
    return FieldContext(tenant, "nudge_push_subscriptions", "subscription", user_id)


async def _push_subscription(tx: TenantTx, keys: TenantKeys, user_id: str) -> str | None:
    """The user's newest push subscription (JSON), decrypted; None when they have none."""
    sealed = await repo.newest_push_subscription(tx, user_id)
    if sealed is None:
        return None
    key = await keys.user_key(tx, user_id)
    return key.decrypt(sealed, _push_context(tx.tenant, user_id)).decode()


class PushNotConfiguredError(Exception):
    """Web push is not configured (no VAPID key): there is nowhere to send a subscription's nudges."""


class InvalidSubscriptionError(ValueError):
    """Not a browser push subscription this platform can send to; the message says why."""


class UnknownUserError(LookupError):
    """The tenant holds no such user."""


class PushSubscriptions:
    """A user's browser push subscriptions: checked, sealed under the user's key, the newest used for push nudges."""

    def __init__(self, keyring: DataKeyService, channel: WebPushChannel | None) -> None:
        self.keyring = keyring
        self.channel = channel

    async def add(self, uow: UnitOfWork, user_id: str, subscription: Mapping[str, Any]) -> str:
        """Check, seal and keep ``subscription``; its id (the SHA-256 of its endpoint, hex)."""
        if self.channel is None:
            raise PushNotConfiguredError("web push is not configured (FIRSTMILE_NUDGE_VAPID_PRIVATE_KEY_FILE)")
        try:
            checked = self.channel.subscription(json.dumps(dict(subscription)))
        except ChannelRejectedError as exc:
            raise InvalidSubscriptionError(exc.detail) from exc
        text = json.dumps(checked.info(), separators=(",", ":"))
        endpoint_hash = hashlib.sha256(checked.endpoint.encode()).hexdigest()

        async def work(tx: TenantTx, keys: TenantKeys) -> None:
            if await onboarding.user_traits(tx, user_id) is None:
                raise UnknownUserError(user_id)
            key = await keys.user_key(tx, user_id, create=True)
            sealed = key.encrypt(text, _push_context(tx.tenant, user_id))
            await repo.add_push_subscription(tx, user_id, endpoint_hash, sealed)

        await self.keyring.run_with_keys(uow, work)
        return endpoint_hash

    async def drop(self, uow: UnitOfWork, user_id: str, subscription_id: str) -> bool:
        """Forget one of the user's subscriptions (the browser unsubscribed); whether it was there."""
        return await uow.run(lambda tx: repo.drop_push_subscription(tx, user_id, subscription_id))


_ADDRESS_FIELDS = {"email": "email", "sms": "phone"}
"""Which field of the user's sealed personal data is the address on a channel (read only at send time)."""


class AddressMissingError(Exception):
    """The user has no address on the send's channel (no e-mail given, for instance)."""


class DeliveryWorker:
    """Sends what is due (see the module docstring)."""

    def __init__(
        self,
        engine: AsyncEngine,
        channels: Mapping[str, Channel],
        keyring: DataKeyService | None,
        *,
        batch: int = 100,
        lease: timedelta = timedelta(minutes=2),
        max_attempts: int = 6,
        backoff_base: timedelta = timedelta(seconds=30),
        backoff_cap: timedelta = timedelta(hours=1),
        rng: random.Random | None = None,
        worker: OperatorContext | None = None,
        links: LinkSigner | None = None,
        public_url: str = "http://127.0.0.1:8000",
        outcome_window: timedelta = timedelta(hours=72),
        personaliser: Personaliser | None = None,
    ) -> None:
        self.personaliser = personaliser
        self.links = links
        self.public_url = public_url.rstrip("/")
        self.outcome_window = outcome_window
        self.engine = engine
        self.channels = dict(channels)
        self.keyring = keyring
        self.batch = batch
        self.lease = lease
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.rng = rng or random.SystemRandom()
        self.worker = worker or DELIVERY

    def backoff(self, attempt: int) -> timedelta:
        """Exponential backoff with full jitter: uniform in [0, min(cap, base·2^(attempt-1))]."""
        ceiling = min(self.backoff_cap.total_seconds(), self.backoff_base.total_seconds() * 2 ** max(0, attempt - 1))
        return timedelta(seconds=self.rng.uniform(0, ceiling))

    async def run_once(self, now: datetime | None = None) -> list[DeliveryOutcome]:
        """One pass over every tenant with sends due; the outcomes, in order."""
        async with self.engine.connect() as conn:
            tenants = await repo.due_tenants(conn)
        outcomes: list[DeliveryOutcome] = []
        for tenant_id, _ in tenants:
            outcomes += await self.deliver_tenant(self.worker.tenant(tenant_id), now)
        return outcomes

    async def deliver_tenant(self, tenant: TenantId, now: datetime | None = None) -> list[DeliveryOutcome]:
        uow = UnitOfWork(self.engine, tenant)
        at = now or datetime.now(UTC)
        claimed = await uow.run(lambda tx: repo.claim_due(tx, at, at + self.lease, self.batch))
        outcomes = [await self._deliver(uow, send) for send in claimed]
        for send, outcome in zip(claimed, outcomes, strict=True):
            telemetry.NUDGE_SENDS.labels(send.channel, outcome.status).inc()
        await uow.run(lambda tx: close_out(tx, at - self.outcome_window, self.batch))
        return outcomes

    async def _address(self, uow: UnitOfWork, send: repo.SendRow) -> str:
        if send.channel == "in_app":
            return send.user_id
        field = _ADDRESS_FIELDS.get(send.channel)
        if field is None and send.channel != "push":
            raise AddressMissingError(f"no address source for the {send.channel} channel yet")
        if self.keyring is None:
            raise AddressMissingError("personal data cannot be read: no keyring configured")
        if send.channel == "push":
            subscription = await self.keyring.run_with_keys(uow, partial(_push_subscription, user_id=send.user_id))
            if subscription is None:
                raise AddressMissingError("the user has no push subscription")
            return subscription

        async def read(tx: TenantTx, keys: TenantKeys) -> str | None:
            held = await onboarding.held_user(tx, send.user_id)
            if held.profile is None or held.profile[1] is None:
                return None
            key = await keys.user_key(tx, send.user_id)
            personal = msgspec.json.decode(key.decrypt(held.profile[1], FieldContext(tx.tenant, "end_users", "pii",
                                                                                      send.user_id)))  # fmt: skip
            found = personal.get(field) if isinstance(personal, dict) else None
            return found if isinstance(found, str) else None

        address = await self.keyring.run_with_keys(uow, read)
        if address is None:
            raise AddressMissingError(f"the user gave no {field} for the {send.channel} channel")
        return address

    async def _deliver(self, uow: UnitOfWork, send: repo.SendRow) -> DeliveryOutcome:
        channel = self.channels.get(send.channel)
        try:
            if channel is None:
                raise AddressMissingError(f"the {send.channel} channel is not configured")
            address = await self._address(uow, send)
            headers: dict[str, str] = {}
            if self.links is not None and send.channel == "email":  # RFC 8058 one-click unsubscribe
                token = self.links.token(uow.tenant, send.send_id, UNSUBSCRIBE)
                headers = {
                    "List-Unsubscribe": f"<{self.public_url}/v1/nudges/u/{token}>",
                    "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
                }
            content = await self._personalise(uow, send)
            html = send.html if content.path == "static" else None  # a rewrite has no HTML part: text only
            receipt = await channel.send(
                OutboundMessage(send.channel, address, content.body, send.send_id.hex, subject=content.subject,
                                html=html, headers=headers, tenant=str(uow.tenant))
            )  # fmt: skip
        except ChannelRateLimitedError as exc:
            error, later = str(exc), datetime.now(UTC) + timedelta(seconds=exc.retry_after)
            await uow.run(
                lambda tx: repo.finish(tx, send.send_id, "scheduled", error=error, send_at=later, refund=True)
            )
            return DeliveryOutcome(send.send_id, "deferred", error)
        except ChannelUnavailableError as exc:
            error = str(exc)
            if send.attempts >= self.max_attempts:
                await uow.run(lambda tx: self._failed(tx, send, "dead", error))
                return DeliveryOutcome(send.send_id, "dead", error)
            later = datetime.now(UTC) + self.backoff(send.attempts)
            await uow.run(lambda tx: repo.finish(tx, send.send_id, "scheduled", error=error, send_at=later))
            return DeliveryOutcome(send.send_id, "retrying", error)
        except (ChannelRejectedError, AddressMissingError) as exc:
            error, suppress = str(exc), isinstance(exc, ChannelRejectedError) and exc.suppress
            await uow.run(lambda tx: self._failed(tx, send, "rejected", error, suppress=suppress))
            return DeliveryOutcome(send.send_id, "rejected", error)
        await uow.run(lambda tx: self._sent(tx, send, receipt.provider, receipt.provider_message_id, content))
        return DeliveryOutcome(send.send_id, "sent")

    async def _personalise(self, uow: UnitOfWork, send: repo.SendRow) -> Personalised:
        """The content to send: the LLM's checked rewrite when personalisation is on and it passes, else the
        stored static message (the design's rule: any failure or timeout sends the template)."""
        static = StaticMessage(send.subject, send.body)
        if self.personaliser is None or not self.personaliser.enabled:
            return Personalised(send.subject, send.body, "static", "off")
        about: Mapping[str, Any] = send.decision.get("context") or {}
        link = ""
        if self.links is not None:
            link = f"{self.public_url}/v1/nudges/l/{self.links.token(uow.tenant, send.send_id, CLICK)}"
        context = AllowedContext(
            step_title=str(about.get("step_title", "")), path_name=str(about.get("path_name", "")),
            tenant_name=str(about.get("tenant_name", "")), link=link, persona=str(about.get("persona", "")),
            extra=(str(about.get("step_description", "")),),
        )  # fmt: skip
        locale = str(send.decision.get("locale", "en"))
        return await self.personaliser.personalise(static, send.channel, locale, context)

    async def _sent(
        self, tx: TenantTx, send: repo.SendRow, provider: str, message_id: str | None, content: Personalised
    ) -> None:
        if not await repo.finish(tx, send.send_id, "sent", provider=provider, message_id=message_id):
            return  # another worker took it over after the lease ran out and recorded it
        await repo.record_content(tx, send.send_id, content.record(), (content.subject, content.body)
                                  if content.path == "llm" else None)  # fmt: skip
        now = datetime.now(UTC)
        event = OutboxEvent.new(
            "nudge.sent",
            {"user_id": send.user_id, "send_id": str(send.send_id), "channel": send.channel, "arm": send.arm,
             "trigger": send.trigger_key, "provider": provider, "attempts": send.attempts,
             "content_path": content.path},
        )  # fmt: skip
        await enqueue(tx, [event], user_id=send.user_id, now=now)
        if send.channel == "in_app":  # the in-app streams learn of it when this commits (nudges/inapp.py)
            await repo.notify_in_app(tx, send.user_id, send.send_id)

    async def _failed(self, tx: TenantTx, send: repo.SendRow, status: str, error: str, suppress: bool = False) -> None:
        if not await repo.finish(tx, send.send_id, status, error=error[:500]):
            return
        if suppress:
            await repo.suppress(tx, send.user_id, send.channel, "rejected: " + error[:200])
        now = datetime.now(UTC)
        event = OutboxEvent.new(
            "nudge.failed",
            {"user_id": send.user_id, "send_id": str(send.send_id), "channel": send.channel, "status": status,
             "error": error[:200], "suppressed": suppress},
        )  # fmt: skip
        await enqueue(tx, [event], user_id=send.user_id, now=now)


async def satisfy(tx: TenantTx, user_id: str, trigger_key: str, event: str, path_key: str) -> bool:
    """The event an ``event_missing`` trigger waits for arrived: record it as the trigger's outcome (status
    ``satisfied``, nothing to send), so the trigger never fires for the user; False when it already had."""
    return await repo.insert_send(
        tx, uuid.uuid4(), user_id, trigger_key, "none", "none", "default", "satisfied", datetime.now(UTC), None, "",
        None, {"trigger_key": trigger_key, "satisfied_by": event, "path": path_key},
    )  # fmt: skip


async def delete_user(tx: TenantTx, user_id: str) -> dict[str, int]:
    """Delete the user's nudges, consents and suppressions (an erasure); how many rows of each table."""
    return await repo.delete_user(tx, user_id)


# ---- outcomes: clicks, conversions, unsubscribes, and the bandit's rewards ----


async def _reward(tx: TenantTx, send: repo.SendRow, success: bool) -> None:
    if await repo.mark_rewarded(tx, send.send_id):
        await repo.reward(tx, send.segment, send.arm, success)


def _outcome_event(kind: str, send: repo.SendRow, **extra: Any) -> OutboxEvent:
    payload = {"user_id": send.user_id, "send_id": str(send.send_id), "channel": send.channel, "arm": send.arm,
               "trigger": send.trigger_key} | extra  # fmt: skip
    return OutboxEvent.new(kind, payload)


async def close_out(tx: TenantTx, before: datetime, limit: int) -> int:
    """Count as failures the sent nudges whose outcome window closed with neither a click nor a conversion."""
    expired = await repo.unrewarded_before(tx, before, limit)
    for send in expired:
        await _reward(tx, send, False)
    return len(expired)


async def record_conversion(tx: TenantTx, user_id: str, step_id: str, now: datetime, window: timedelta) -> bool:
    """The user completed ``step_id``: the nudges about it sent within ``window`` converted (each once)."""
    sends = await repo.record_conversion(tx, user_id, step_id, now - window)
    for send in sends:
        await _reward(tx, send, True)
        telemetry.NUDGE_OUTCOMES.labels("converted").inc()
    if sends:
        events = [_outcome_event("nudge.converted", send, step_id=step_id) for send in sends]
        await enqueue(tx, events, user_id=user_id, now=now)
    return bool(sends)


@dataclass(frozen=True, slots=True)
class Consent:
    channel: str
    category: str
    granted: bool


async def set_consent(tx: TenantTx, user_id: str, channel: str, category: str, granted: bool, source: str) -> bool:
    """Record the user's consent for a channel and category, as the tenant's app reports it (a preference centre,
    a sign-up checkbox); audited as ``consent`` when it changes. False when it was so already. The user must be
    known (:class:`UnknownUserError`)."""
    if await onboarding.user_traits(tx, user_id) is None:
        raise UnknownUserError(user_id)
    if not await repo.set_consent(tx, user_id, channel, category, granted, source):
        return False
    await audit.append(
        tx, "consent", "end_user", user_id,
        {"channel": channel, "category": category, "granted": granted, "source": source},
    )  # fmt: skip
    return True


async def consents(tx: TenantTx, user_id: str) -> list[Consent]:
    """The user's recorded consents (a category the policy sends by default and the user never answered is not
    listed); :class:`UnknownUserError` for an unknown user."""
    if await onboarding.user_traits(tx, user_id) is None:
        raise UnknownUserError(user_id)
    found = await repo.consents(tx, user_id)
    return [Consent(channel, category, granted) for (channel, category), granted in sorted(found.items())]


async def withdraw(tx: TenantTx, send: repo.SendRow, source: str, described: str) -> bool:
    """The user withdrew consent for the send's channel (an unsubscribe): recorded, audited as ``consent``, and a
    ``nudge.unsubscribed`` event; False when it was withdrawn already."""
    category = str(send.decision.get("category") or STUCK_CATEGORY)  # decisions before categories: onboarding
    if not await repo.set_consent(tx, send.user_id, send.channel, category, False, source):
        return False
    await audit.append(
        tx, "consent", "end_user", send.user_id,
        {"channel": send.channel, "category": category, "granted": False, "source": described,
         "send_id": str(send.send_id)},
    )  # fmt: skip
    event = _outcome_event("nudge.unsubscribed", send, category=category)
    await enqueue(tx, [event], user_id=send.user_id, now=datetime.now(UTC))
    telemetry.NUDGE_OUTCOMES.labels("unsubscribed").inc()
    return True


@dataclass(frozen=True, slots=True)
class LinkOutcome:
    send_id: uuid.UUID
    first: bool
    """Whether this request changed anything (the first click; an unsubscribe that withdrew consent)."""


class NudgeLinks:
    """What the signed links in a nudge do: a click, and the one-click unsubscribe."""

    def __init__(self, engine: AsyncEngine, signer: LinkSigner) -> None:
        self.engine = engine
        self.signer = signer

    def _uow(self, token: str, purpose: bytes) -> tuple[UnitOfWork, uuid.UUID]:
        target = self.signer.check(token, purpose)  # BadLinkError: forged, malformed or of another purpose
        return UnitOfWork(self.engine, tenant_of(LinkPrincipal(target))), target.send_id

    async def click(self, token: str) -> LinkOutcome:
        uow, send_id = self._uow(token, CLICK)

        async def work(tx: TenantTx) -> LinkOutcome:
            send = await repo.record_click(tx, send_id)
            if send is None:
                if await repo.get_send(tx, send_id) is None:
                    raise BadLinkError("this nudge no longer exists")
                return LinkOutcome(send_id, False)
            await _reward(tx, send, True)
            await enqueue(tx, [_outcome_event("nudge.clicked", send)], user_id=send.user_id, now=datetime.now(UTC))
            telemetry.NUDGE_OUTCOMES.labels("clicked").inc()
            return LinkOutcome(send_id, True)

        return await uow.run(work)

    async def unsubscribe(self, token: str) -> LinkOutcome:
        uow, send_id = self._uow(token, UNSUBSCRIBE)

        async def work(tx: TenantTx) -> LinkOutcome:
            send = await repo.get_send(tx, send_id)
            if send is None:
                raise BadLinkError("this nudge no longer exists")
            changed = await withdraw(tx, send, "one-click", "one-click unsubscribe (RFC 8058)")
            return LinkOutcome(send_id, changed)

        return await uow.run(work)


# ---- what the providers report: the SendGrid Event Webhook ----


@dataclass(frozen=True, slots=True)
class WebhookPrincipal:
    """A provider's verified webhook event: it acts for the tenant named in the event's signed custom arguments."""

    tenant_id: uuid.UUID

    @property
    def authenticated_tenant(self) -> uuid.UUID:
        return self.tenant_id


_WEBHOOK_EVENTS = {"delivered": "nudge.delivered", "opened": "nudge.opened", "bounced": "nudge.bounced",
                   "complained": "nudge.complained", "failed": "nudge.failed_delivery"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """One provider report about one send, whatever the provider: what :meth:`NudgeWebhooks.apply` takes."""

    send_id: uuid.UUID
    status: str
    """One of ``webhooks.STATUSES``."""
    at: datetime
    provider_event: str
    reason: str | None = None


class NudgeWebhooks:
    """Applies the providers' delivery reports to the sends (see docs/nudges.md#delivery-reports)."""

    def __init__(
        self,
        engine: AsyncEngine,
        sendgrid_key: str | None,
        guard: SharedReplayGuard | None = None,
        *,
        twilio_auth_token: str | None = None,
        vonage_signature_secret: str | None = None,
        vonage_signature_method: str = "sha256",
        public_url: str = "http://127.0.0.1:8000",
    ) -> None:
        self.engine = engine
        self.sendgrid_key = sendgrid_public_key(sendgrid_key) if sendgrid_key else None
        self.twilio_auth_token = twilio_auth_token
        self.vonage_signature_secret = vonage_signature_secret
        self.vonage_signature_method = vonage_signature_method
        self.public_url = public_url.rstrip("/")
        self.guard = guard or LocalReplayGuard()

    async def sendgrid(self, body: bytes, signature: str, timestamp: str) -> int:
        """Verify and apply one Event Webhook request; how many events changed a send.
        :class:`WebhookRefusedError` when it is not believed (nothing applied)."""
        if self.sendgrid_key is None:
            raise WebhookRefusedError("bad-signature", "no SendGrid verification key is configured")
        batch = verify_sendgrid(body, signature, timestamp, self.sendgrid_key)
        await self._first_time(batch.replay_key, 2 * TOLERANCE_S)
        by_tenant: dict[uuid.UUID, list[DeliveryReport]] = {}
        for event in batch.events:
            try:
                tenant, send_id = uuid.UUID(event.tenant or ""), uuid.UUID(event.send or "")
            except ValueError:
                continue  # not one of ours (another application's mail on the same account)
            if event.status is None:
                continue
            at = datetime.fromtimestamp(event.timestamp, UTC) if event.timestamp else datetime.now(UTC)
            report = DeliveryReport(send_id, event.status, at, event.event, event.reason)
            by_tenant.setdefault(tenant, []).append(report)
        applied = 0
        for tenant, reports in by_tenant.items():
            applied += await self.apply(tenant, reports)
        return applied

    async def twilio(self, path_and_query: str, body: bytes, signature: str) -> int:
        """Verify and apply one Twilio status callback (``path_and_query``: what Twilio requested, on our public
        URL); 1 when it changed the send. :class:`WebhookRefusedError` when it is not believed."""
        if self.twilio_auth_token is None:
            raise WebhookRefusedError("bad-signature", "no Twilio auth token is configured")
        callback = verify_twilio(self.public_url + path_and_query, body, signature, self.twilio_auth_token)
        await self._first_time(callback.replay_key, TWILIO_REPLAY_TTL_S)
        reason = f"Twilio error {callback.error_code}" if callback.error_code else None
        return await self._one(callback.tenant, callback.send, callback.status, callback.message_status, reason,
                               "the callback URL")  # fmt: skip

    async def vonage(self, params: Mapping[str, str]) -> int:
        """Verify and apply one Vonage delivery receipt (its parameters, from the query, form or JSON body);
        1 when it changed the send. :class:`WebhookRefusedError` when it is not believed."""
        if self.vonage_signature_secret is None:
            raise WebhookRefusedError("bad-signature", "no Vonage signature secret is configured")
        receipt = verify_vonage(params, self.vonage_signature_secret, self.vonage_signature_method)
        await self._first_time(receipt.replay_key, 2 * TOLERANCE_S)
        reason = f"Vonage err-code {receipt.error_code}" if receipt.error_code else None
        return await self._one(receipt.tenant, receipt.send, receipt.status, receipt.message_status, reason,
                               "the receipt's client-ref")  # fmt: skip

    async def _first_time(self, replay_key: str, ttl_s: float) -> None:
        """``replayed`` when a request with this key was acted on before, by this process or another."""
        if not await self.guard.first_seen(replay_key, ttl_s):
            raise WebhookRefusedError("replayed", "this signed request was already received")

    async def _one(
        self, tenant: str | None, send: str | None, status: str | None, event: str, reason: str | None, where: str
    ) -> int:
        """Apply one SMS provider's report about the send ``where`` names; 400 when it names none of ours."""
        try:
            tenant_id, send_id = uuid.UUID(tenant or ""), uuid.UUID(send or "")
        except ValueError:
            raise WebhookRefusedError("malformed", f"{where} names no send of ours") from None
        if status is None:
            return 0
        return await self.apply(tenant_id, [DeliveryReport(send_id, status, datetime.now(UTC), event, reason)])

    async def apply(self, tenant: uuid.UUID, reports: Sequence[DeliveryReport]) -> int:
        """Apply a tenant's reports in one transaction (acting for the tenant the provider's signature vouches
        for); how many changed a send."""
        uow = UnitOfWork(self.engine, tenant_of(WebhookPrincipal(tenant)))
        return await uow.run(partial(self._apply, reports=reports))

    async def _apply(self, tx: TenantTx, reports: Sequence[DeliveryReport]) -> int:
        changed = 0
        for report in reports:
            status, at, send = report.status, report.at, await repo.get_send(tx, report.send_id)
            if send is None:
                continue
            if status == "clicked":  # the provider's own click tracking: the same as our tracked link
                clicked = await repo.record_click(tx, send.send_id)
                if clicked is not None:
                    await _reward(tx, clicked, True)
                    await enqueue(tx, [_outcome_event("nudge.clicked", clicked, source="provider")],
                                  user_id=send.user_id, now=at)  # fmt: skip
                    telemetry.NUDGE_OUTCOMES.labels("clicked").inc()
                    changed += 1
                continue
            if status == "unsubscribed":
                changed += await withdraw(tx, send, "provider", f"provider unsubscribe ({report.provider_event})")
                continue
            if not await repo.set_delivery(tx, send.send_id, status, at):
                continue  # the same report again, or one older than what is recorded
            if status in ("bounced", "complained"):  # the address is not to be used again
                await repo.suppress(tx, send.user_id, send.channel, f"{status}: {(report.reason or '')[:200]}")
            event = _outcome_event(_WEBHOOK_EVENTS[status], send, provider_event=report.provider_event)
            await enqueue(tx, [event], user_id=send.user_id, now=at)
            if status == "opened":
                telemetry.NUDGE_OUTCOMES.labels("opened").inc()
            changed += 1
        return changed


# ---- what the admin UI shows: the nudge log of a user, and a preview of the tenant's wordings ----


async def nudge_log(tx: TenantTx, user_id: str, limit: int = 100) -> list[repo.LogRow]:
    """The user's nudges, newest first: each decision with its verdicts, content and delivery."""
    return await repo.log_for(tx, user_id, limit)


@dataclass(frozen=True, slots=True)
class Preview:
    wording: Wording
    subject: str | None
    body: str
    html: str | None


async def preview(tx: TenantTx, trigger: str, persona: str, locale: str) -> list[Preview]:
    """The wordings a user of ``persona`` speaking ``locale`` would get for ``trigger``, rendered with sample values
    (the tenant's name, a sample step and link): what the manifest's templates look like in a message."""
    spec = await tenancy.nudges_spec(tx)
    context = dict(TEMPLATE_SAMPLE) | {"tenant": {"name": await tenancy.tenant_name(tx)}, "persona": persona}
    out: list[Preview] = []
    for wording in wordings(spec.templates if spec is not None else (), trigger, persona, locale):
        t = wording.template
        subject = render(t.subject, context).text if t.subject else None
        html = render(t.html, context, html=True).text if t.html else None
        out.append(Preview(wording, subject, render(t.body, context).text, html))
    return out
