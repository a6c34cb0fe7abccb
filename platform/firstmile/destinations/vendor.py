"""What the vendor adapters (Segment, Mixpanel, Amplitude, Intercom) share: times, values, ``Retry-After``,
and the loop that sends a batch in requests and turns the vendor's answers into one outcome per event.

A vendor's answer to one request is :class:`Sent` (it took every event of the request), :class:`Transient`
(``429``, ``5xx``, a timeout, a refused connection, a credential it did not take: try again later) or
:class:`Refused` (a ``4xx`` about the request's content). :func:`deliver_groups` sends the groups of a batch
in order and:

* a request refused as a whole, without saying which event was bad, is re-sent one event per request,
  so that only the bad events are :class:`~firstmile.destinations.port.Rejected`;
* after a transient failure nothing more is sent in this call: that request's events and every later
  one are :class:`~firstmile.destinations.port.Retry` with the vendor's ``Retry-After`` (so a user's
  events never overtake each other, and an outage is not hammered).

A ``401``/``403`` is transient here: the vendor refused the credential, not the event, so the events wait
(and the destination shows failing) until the credential is fixed, instead of all going to dead letters.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any

from firstmile.destinations.port import Delivered, OutboundEvent, Outcome, Rejected, Retry

MAX_RETRY_AFTER_S = 3600.0
"""The longest ``Retry-After`` taken as given (a larger one is capped: the worker checks again then)."""


@dataclass(frozen=True, slots=True)
class Sent:
    """The vendor took every event of the request."""


@dataclass(frozen=True, slots=True)
class Transient:
    """Try again later: ``after_s`` is the vendor's ``Retry-After`` when it gave one."""

    reason: str
    after_s: float | None = None


@dataclass(frozen=True, slots=True)
class Refused:
    """A ``4xx`` about the request's content (which event, the vendor did not say, or there was one)."""

    reason: str


Answer = Sent | Transient | Refused


def classify_status(status: int, detail: str, retry_after: float | None = None) -> Answer:
    """A vendor's HTTP status as an :data:`Answer` (2xx sent; 408, 429, 5xx, 401, 403 transient; other 4xx refused)."""
    if 200 <= status < 300:
        return Sent()
    if status in (401, 403):
        return Transient(f"HTTP {status}: the vendor refused the credential: {detail}", retry_after)
    if status in (408, 429) or status >= 500 or status < 200:
        return Transient(f"HTTP {status}: {detail}", retry_after)
    if 300 <= status < 400:
        return Transient(f"HTTP {status} (a redirect that was not followed: check the host): {detail}")
    return Refused(f"HTTP {status}: {detail}")


def outcome_of(answer: Transient | Refused) -> Outcome:
    return Retry(answer.reason, answer.after_s) if isinstance(answer, Transient) else Rejected(answer.reason)


async def deliver_groups(
    count: int,
    groups: Sequence[Sequence[int]],
    send: Callable[[Sequence[int]], Awaitable[Answer]],
    *,
    outcomes: list[Outcome | None] | None = None,
) -> list[Outcome]:
    """Send ``groups`` (indices into a batch of ``count`` events, in order) and answer one outcome per event.

    ``outcomes`` may carry outcomes already decided (events refused before sending); the others must be in
    a group. A group refused as a whole is re-sent one event at a time; the first transient answer stops
    the sending, and that group's unsent events and all later ones are retried with its reason.
    """
    decided: list[Outcome | None] = list(outcomes) if outcomes is not None else [None] * count
    halted: Retry | None = None
    for group in groups:
        if halted is not None:
            for i in group:
                decided[i] = halted
            continue
        answer = await send(group)
        if isinstance(answer, Sent):
            for i in group:
                decided[i] = Delivered()
        elif isinstance(answer, Transient):
            halted = Retry(answer.reason, answer.after_s)
            for i in group:
                decided[i] = halted
        elif len(group) == 1:
            decided[group[0]] = Rejected(answer.reason)
        else:  # refused as a whole: find the bad ones, one per request
            for i in group:
                if halted is not None:
                    decided[i] = halted
                    continue
                single = await send([i])
                if isinstance(single, Sent):
                    decided[i] = Delivered()
                elif isinstance(single, Transient):
                    halted = Retry(single.reason, single.after_s)
                    decided[i] = halted
                else:
                    decided[i] = Rejected(single.reason)
    missing = [i for i, outcome in enumerate(decided) if outcome is None]
    if missing:
        raise AssertionError(f"events {missing} were in no group")
    return [outcome for outcome in decided if outcome is not None]


def groups_by(
    keys: Sequence[str | None], limit: int, size: Sequence[int] | None = None, max_bytes: int = 0
) -> list[list[int]]:
    """The indices of the events that share a key (an endpoint; ``None``: not sent), in order, in groups of
    at most ``limit`` events (and at most ``max_bytes`` of ``size`` when given), ordered by their first event."""
    open_groups: dict[str, list[int]] = {}
    open_bytes: dict[str, int] = {}
    done: list[list[int]] = []
    for i, key in enumerate(keys):
        if key is None:
            continue
        group = open_groups.get(key)
        weight = size[i] if size is not None else 0
        if group is not None and (len(group) >= limit or (max_bytes and open_bytes[key] + weight > max_bytes)):
            done.append(group)
            group = None
        if group is None:
            group = open_groups[key] = []
            open_bytes[key] = 0
        group.append(i)
        open_bytes[key] += weight
    done.extend(open_groups.values())
    done.sort(key=lambda g: g[0])
    return done


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """A ``Retry-After`` header in seconds (delta-seconds or an HTTP date), capped; ``None`` if absent or unreadable."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def as_utc(moment: datetime) -> datetime:
    """``moment`` in UTC (a naive datetime is taken as UTC)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def epoch_ms(moment: datetime) -> int:
    """Milliseconds since the epoch (Mixpanel's and Amplitude's ``time``)."""
    return round(as_utc(moment).timestamp() * 1000)


def epoch_s(moment: datetime) -> int:
    """Whole seconds since the epoch (Intercom's ``created_at``)."""
    return math.floor(as_utc(moment).timestamp())


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data (a datetime as ISO 8601, a UUID or an unknown type as its text)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime):
        return as_utc(value).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    return str(value)


def properties_of(event: OutboundEvent) -> dict[str, Any]:
    """A ``track``'s properties as JSON data."""
    return {str(k): jsonable(v) for k, v in event.properties.items()}


def profile_of(event: OutboundEvent) -> dict[str, Any]:
    """What an ``identify`` sets on the user: its onboarding fields (``properties``) and the traits the
    destination allows (``traits``); a trait wins over a property of the same name."""
    return {**properties_of(event), **{str(k): jsonable(v) for k, v in event.traits.items()}}


def scalar_text(value: Any) -> str:
    """A value as text for vendors that take strings only (a JSON rendering for anything but a string)."""
    return value if isinstance(value, str) else json.dumps(jsonable(value), separators=(",", ":"), sort_keys=True)


def flat(value: Any) -> str | int | float | bool | None:
    """A scalar as it is, anything nested as its JSON text (for vendors without nested attributes)."""
    plain = jsonable(value)
    if plain is None or isinstance(plain, str | int | float | bool):
        return plain
    return json.dumps(plain, separators=(",", ":"), sort_keys=True)


__all__ = [
    "Answer",
    "Refused",
    "Sent",
    "Transient",
    "as_utc",
    "classify_status",
    "deliver_groups",
    "epoch_ms",
    "epoch_s",
    "flat",
    "groups_by",
    "jsonable",
    "outcome_of",
    "profile_of",
    "properties_of",
    "retry_after_seconds",
    "scalar_text",
]
