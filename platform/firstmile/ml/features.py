"""Online features: what the models know about a user, kept current from the event stream.

This module is pure (no I/O): the :class:`FeatureStore` port, the features a
store returns (:class:`OnlineFeatures`), how an event becomes a feature update
(:func:`feature_event`) and the update rule itself (:func:`apply_event`). The
Redis adapter runs the same rule as a Lua script; a contract test runs the same
event sequences through both and compares the stored state.

A user's state is a flat ``str → str`` map, the very fields of the Redis hash
(docs/features.md lists them). Times are integer milliseconds since the epoch.
Every rule is written so that late and repeated events do no harm:

- an event whose id is among the user's last :data:`RECENT_IDS` events is skipped
  (redelivery after a consumer restart replays the newest events, so the ring
  catches it; an older duplicate still counts once more);
- times are min/max (``first``, ``last``, ``stepat``), traits are last-writer-wins
  by event time, steps are a set of step ids;
- the decayed counters are sums of ``decay(age)`` terms, so their order does not
  matter (up to rounding);
- sessions follow the latest session ``[ss, se]``: an event more than
  :data:`SESSION_GAP_MS` after ``se`` opens a new session, one within the gap
  after ``se`` extends it, one inside it changes nothing, one less than the gap
  before ``ss`` extends it backwards, and one earlier than that belongs to an
  older session that is no longer tracked and leaves the session figures alone.
  In order, the figures are exact; out of order they can only undercount.
- ``user.erased`` replaces the state by a tombstone ``{"erased": t}``: events at
  or before ``t`` (late or replayed ones) are ignored, a later event starts afresh.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from firstmile.events.envelope import Envelope, user_of
from firstmile_inference.schema import COMPANY_SIZES, UserFeatures

ERASED = "user.erased"  # firstmile.privacy.service.ERASED (a test keeps them equal)

SESSION_GAP_MS = 30 * 60 * 1000  # a gap longer than this between a user's events starts a new session
ENGAGEMENT_HALF_LIFE_MS = 3 * 24 * 3600 * 1000  # an event's weight in the engagement score halves every 3 days
ENGAGEMENT_SCALE = 10.0  # decayed events at which the score reaches 63 (1 - 1/e of 100)
RECENT_TAU_MS = 24 * 3600 * 1000  # time constant of the events-in-the-last-24h approximation
RECENT_IDS = 32  # event ids remembered per user to skip redeliveries
ID_CHARS = 16  # characters of an event id kept in that ring (the first 64 bits, hex)
STEP_SEPARATOR = ","
MAX_TRAIT_CHARS = 256
TRAITS: tuple[str, ...] = ("persona", "signup_source", "company_size", "use_case", "role")
_TRAIT_ALIASES = {"signupSource": "signup_source", "companySize": "company_size", "useCase": "use_case"}
_COMPANY_SIZE_BOUNDS = (10, 50, 200, 1000)  # upper bounds of COMPANY_SIZES but the last
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


class FeatureStoreUnavailable(Exception):  # noqa: N818 - the name says what the caller gets
    """The feature store could not answer and no recent enough cached features exist."""


# ---- events → updates ----


@dataclass(frozen=True, slots=True)
class FeatureEvent:
    """One event reduced to what the update rule needs.

    ``kind`` is ``"event"`` or ``"erase"``; ``ref`` is the short event id the
    dedupe ring holds; ``traits`` follows :data:`TRAITS`, ``""`` where the event
    sets nothing; ``step_id`` is ``""`` unless the event completes a step;
    ``activity`` says whether it counts as something the user did (events,
    sessions, engagement, first/last seen).
    """

    tenant_id: uuid.UUID
    user_id: str
    kind: Literal["event", "erase"]
    at_ms: int
    ref: str
    activity: bool = True
    step_id: str = ""
    traits: tuple[str, ...] = ("", "", "", "", "")


def to_ms(at: datetime) -> int:
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return (at - _EPOCH) // _MS


def from_ms(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def event_time(envelope: Envelope) -> datetime:
    """When the event happened: ``occurred_at``, or for onboarding events the payload's ``occurred_at``
    (a step completed from a tracked event, or with an explicit time, happened before its outbox row)."""
    at = envelope.occurred_at
    if envelope.event_type.startswith("onboarding."):
        raw = envelope.payload.get("occurred_at")
        if isinstance(raw, str):
            try:
                parsed = datetime.fromisoformat(raw)
            except ValueError:
                parsed = None
            if parsed is not None and parsed.tzinfo is not None:
                at = parsed
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _company_size(employees: int) -> str:
    for bound, label in zip(_COMPANY_SIZE_BOUNDS, COMPANY_SIZES, strict=False):
        if employees <= bound:
            return label
    return COMPANY_SIZES[-1]


def _traits(raw: Any) -> tuple[str, ...]:
    """The five static traits of a traits object; ``""`` for absent, null or unusable values."""
    if not isinstance(raw, Mapping):
        return ("", "", "", "", "")
    found = dict.fromkeys(TRAITS, "")
    for key, value in raw.items():
        name = _TRAIT_ALIASES.get(key, key)
        if name not in found:
            continue
        if name == "company_size" and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            found[name] = _company_size(value)
        elif isinstance(value, str) and value.strip() and len(value) <= MAX_TRAIT_CHARS:
            found[name] = value.strip()
    return tuple(found[name] for name in TRAITS)


def feature_event(envelope: Envelope) -> FeatureEvent | None:
    """The update an event makes to its user's features; None when it makes none.

    Counted as activity: ``track``, ``page``, ``identify``, ``onboarding.started`` and
    ``onboarding.step_completed`` done through the API. A step completed by a tracked
    event (``source: event:…``) counts as a step only: its event was counted already.
    ``onboarding.activated`` and ``onboarding.completed`` follow a step completion in
    the same transaction and change nothing.
    """
    user_id = user_of(envelope)
    kind = envelope.event_type
    if not user_id:
        return None
    p = envelope.payload

    def update(
        kind_: Literal["event", "erase"] = "event",
        *,
        activity: bool = True,
        step_id: str = "",
        traits: tuple[str, ...] = ("", "", "", "", ""),
    ) -> FeatureEvent:
        return FeatureEvent(
            envelope.tenant_id,
            user_id,
            kind_,
            to_ms(event_time(envelope)),
            envelope.event_id.hex[:ID_CHARS],
            activity,
            step_id,
            traits,
        )

    if kind == ERASED:
        return update("erase", activity=False)
    if kind in ("track", "page"):
        return update()
    if kind in ("identify", "onboarding.started"):
        return update(traits=_traits(p.get("traits")))
    if kind == "onboarding.step_completed":
        step = p.get("step_id")
        if not isinstance(step, str) or not step or STEP_SEPARATOR in step:
            return None
        derived = str(p.get("source") or "").startswith("event:")
        return update(activity=not derived, step_id=step)
    return None


# ---- the update rule (mirrored by the Lua script in feature_stores.py) ----


def _f(x: float) -> str:
    return format(x, ".17g")  # what the Lua script writes: string.format('%.17g', x)


def _seen(ids: str, ref: str) -> bool:
    return any(ids[i : i + ID_CHARS] == ref for i in range(0, len(ids), ID_CHARS))


def apply_event(h: dict[str, str], ev: FeatureEvent) -> bool:
    """Apply one event to a user's state in place; False when it changed nothing.

    Keep in step with ``APPLY_LUA`` in :mod:`firstmile.ml.feature_stores`, line for line.
    """
    t = ev.at_ms
    if ev.kind == "erase":
        erased = max(t, int(h["erased"])) if "erased" in h else t
        h.clear()
        h["erased"] = str(erased)
        return True
    if "erased" in h:
        if t <= int(h["erased"]):
            return False
        h.clear()
    ids = h.get("ids", "")
    if _seen(ids, ev.ref):
        return False
    ids += ev.ref
    if len(ids) > RECENT_IDS * ID_CHARS:
        ids = ids[len(ids) - RECENT_IDS * ID_CHARS :]
    h["ids"] = ids
    for name, value in zip(TRAITS, ev.traits, strict=True):
        if value:
            at_key = name + "_at"
            if at_key not in h or t >= int(h[at_key]):
                h[name] = value
                h[at_key] = str(t)
    if ev.step_id:
        steps = h.get("steps", "")
        if (STEP_SEPARATOR + ev.step_id + STEP_SEPARATOR) not in (STEP_SEPARATOR + steps):
            h["steps"] = steps + ev.step_id + STEP_SEPARATOR
            h["sn"] = str(int(h.get("sn", "0")) + 1)
        if "stepat" not in h or t > int(h["stepat"]):
            h["stepat"] = str(t)
    if ev.activity:
        if "first" not in h:
            h.update(first=str(t), last=str(t), n="1", sc="1", ss=str(t), se=str(t), sd="0", eng="1", act="1")
        else:
            last = int(h["last"])
            eng = float(h["eng"])
            act = float(h["act"])
            h["n"] = str(int(h["n"]) + 1)
            if t < int(h["first"]):
                h["first"] = str(t)
            if t >= last:
                eng = eng * math.pow(2.0, -(t - last) / ENGAGEMENT_HALF_LIFE_MS) + 1
                act = act * math.exp(-(t - last) / RECENT_TAU_MS) + 1
                h["last"] = str(t)
            else:
                eng = eng + math.pow(2.0, -(last - t) / ENGAGEMENT_HALF_LIFE_MS)
                act = act + math.exp(-(last - t) / RECENT_TAU_MS)
            h["eng"] = _f(eng)
            h["act"] = _f(act)
            ss, se, sd = int(h["ss"]), int(h["se"]), int(h["sd"])
            if t > se + SESSION_GAP_MS:
                h["sc"] = str(int(h["sc"]) + 1)
                h["ss"] = h["se"] = str(t)
            elif t > se:
                h["sd"] = str(sd + (t - se))
                h["se"] = str(t)
            elif t >= ss:
                pass
            elif t >= ss - SESSION_GAP_MS:
                h["sd"] = str(sd + (ss - t))
                h["ss"] = str(t)
    return True


# ---- what a store returns ----


@dataclass(frozen=True, slots=True)
class OnlineFeatures:
    """A user's online features as stored; read-time figures come from the methods, given ``now``.

    ``engagement`` is the event count decayed with a half-life of 3 days and
    ``recent_events`` the count weighted by ``e^(-age/24 h)``, both as of ``last_seen``.
    """

    tenant_id: uuid.UUID
    user_id: str
    persona: str | None
    signup_source: str | None
    company_size: str | None
    use_case: str | None
    role: str | None
    first_seen: datetime
    last_seen: datetime
    session_count: int
    total_session_seconds: float
    events_total: int
    engagement: float
    recent_events: float
    steps_completed: int
    last_step_completed_at: datetime | None

    @classmethod
    def from_state(cls, tenant_id: uuid.UUID, user_id: str, h: Mapping[str, str]) -> OnlineFeatures | None:
        """Features from a stored state; None for no state or an erasure tombstone."""
        if "first" not in h and "stepat" not in h:
            return None
        stepat = from_ms(int(h["stepat"])) if "stepat" in h else None
        first = from_ms(int(h["first"])) if "first" in h else stepat
        last = from_ms(int(h["last"])) if "last" in h else stepat
        assert first is not None and last is not None
        return cls(
            tenant_id=tenant_id,
            user_id=user_id,
            persona=h.get("persona") or None,
            signup_source=h.get("signup_source") or None,
            company_size=h.get("company_size") or None,
            use_case=h.get("use_case") or None,
            role=h.get("role") or None,
            first_seen=first,
            last_seen=last,
            session_count=int(h.get("sc", "0")),
            total_session_seconds=int(h.get("sd", "0")) / 1000,
            events_total=int(h.get("n", "0")),
            engagement=float(h.get("eng", "0")),
            recent_events=float(h.get("act", "0")),
            steps_completed=int(h.get("sn", "0")),
            last_step_completed_at=stepat,
        )

    def _age_ms(self, now: datetime) -> float:
        return max(0.0, (now - self.last_seen) / _MS)

    def engagement_at(self, now: datetime) -> float:
        """The decayed event count at ``now``: the sum of 2^(-age/3 d) over the user's events."""
        return self.engagement * math.pow(2.0, -self._age_ms(now) / ENGAGEMENT_HALF_LIFE_MS)

    def engagement_score(self, now: datetime) -> float:
        """0..100: ``100 * (1 - exp(-E/10))`` with E the decayed event count at ``now``."""
        return 100.0 * (1.0 - math.exp(-self.engagement_at(now) / ENGAGEMENT_SCALE))

    def events_last_24h(self, now: datetime) -> float:
        """Approximately the events of the last 24 h: the sum of exp(-age/24 h) (exact for a steady rate)."""
        return self.recent_events * math.exp(-self._age_ms(now) / RECENT_TAU_MS)

    def hours_since_last_activity(self, now: datetime) -> float:
        return self._age_ms(now) / 3_600_000

    def hours_since_signup(self, now: datetime) -> float:
        return max(0.0, (now - self.first_seen) / _MS) / 3_600_000

    @property
    def avg_session_seconds(self) -> float:
        return self.total_session_seconds / self.session_count if self.session_count else 0.0

    def as_model_features(self, now: datetime) -> UserFeatures:
        """The nine model features (:data:`firstmile_inference.schema.USER_FEATURES`) as of ``now``."""
        return {
            "user_persona": self.persona,
            "signup_source": self.signup_source,
            "company_size": self.company_size,
            "use_case": self.use_case,
            "engagement_score": self.engagement_score(now),
            "time_since_signup": self.hours_since_signup(now),
            "steps_completed": float(self.steps_completed),
            "session_count": float(self.session_count),
            "avg_session_duration": self.avg_session_seconds,
        }


# ---- the port ----


class FeatureStore(Protocol):
    """Online features per (tenant, user): Redis in production, a dict in embedded mode."""

    async def get(self, tenant_id: uuid.UUID, user_id: str) -> OnlineFeatures | None:
        """The user's features; None when no event of theirs was seen (or they were erased)."""
        ...

    async def get_many(self, tenant_id: uuid.UUID, user_ids: Sequence[str]) -> dict[str, OnlineFeatures]:
        """Features of those users that have any; absent users are left out."""
        ...

    async def apply(self, events: Sequence[Envelope]) -> None:
        """Fold a batch of events into the users' features, atomically per user."""
        ...

    async def forget(self, tenant_id: uuid.UUID, user_id: str, *, at: datetime | None = None) -> None:
        """Erase the user's features; their events up to ``at`` (default: now) are ignored from now on."""
        ...

    async def ping(self) -> None:
        """Raise when the store cannot be reached."""
        ...

    async def close(self) -> None: ...


def feature_events(events: Sequence[Envelope]) -> dict[tuple[uuid.UUID, str], list[FeatureEvent]]:
    """A batch's updates grouped per user, in the batch's order."""
    grouped: dict[tuple[uuid.UUID, str], list[FeatureEvent]] = {}
    for envelope in events:
        ev = feature_event(envelope)
        if ev is not None:
            grouped.setdefault((ev.tenant_id, ev.user_id), []).append(ev)
    return grouped
