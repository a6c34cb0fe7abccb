"""Intercom, through Intercom's official Python library (``python-intercom`` 5.x, ``AsyncIntercom``).

Intercom's REST API has no batch endpoint: the events of a batch are sent one after the other, in order
(Intercom's "Contacts" and "Data Events" references), with the library's retries off (the delivery worker
owns retries) and ``Intercom-Version`` pinned to :data:`INTERCOM_API_VERSION` (the library sends none, and
the workspace's default version would apply).

* ``identify``: the contact whose ``external_id`` is the user id is looked up
  (``GET /contacts/find_by_external_id/{id}``), then updated (``PUT /contacts/{id}``) or created
  (``POST /contacts`` with ``role: user``), with the event's onboarding fields and allowed traits as
  ``custom_attributes`` (a nested value as its JSON text: Intercom's attributes are flat), and the traits
  ``email``, ``name`` and ``phone`` as the contact's own fields. A custom attribute must exist in the
  workspace (Intercom refuses an unknown one with ``400``: create it under Settings → Data → People, or
  leave it out of the destination's traits).
* ``track``: a data event (``POST /events``) with ``event_name``, ``created_at`` (seconds), ``user_id`` and
  ``metadata`` holding the idempotency key first (``firstmile_event_id``) and then the event's properties, as
  text (the library types metadata as strings; Intercom keeps the first 10 keys). Intercom deduplicates
  events on the contact, the name and ``created_at`` ("Submit a data event", Event de-duplication), so a
  redelivery is not counted twice. An event about a user Intercom does not know (``404``) creates the
  contact, then is sent again.

Answers: ``2xx`` delivered; ``429`` (after ``Retry-After``, else ``X-RateLimit-Reset``), ``5xx``, ``401``/``403``,
a timeout or a dropped connection are :class:`~.port.Retry`, and nothing more of the batch is sent in this
call; any other ``4xx`` is :class:`~.port.Rejected` for that event only.

Erasure finds the contact by ``external_id`` and deletes it (``DELETE /contacts/{id}``, "Delete a contact");
a user Intercom does not know is erased already.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import httpx
from intercom import AsyncIntercom, CreateContactRequestWithExternalId, CreateDataEventRequestWithUserId
from intercom.core.api_error import ApiError
from intercom.core.request_options import RequestOptions

from firstmile.destinations.port import Delivered, ErasureOutcome, OutboundEvent, Outcome, Retry
from firstmile.destinations.vendor import (
    Answer,
    Sent,
    Transient,
    classify_status,
    epoch_s,
    flat,
    outcome_of,
    profile_of,
    properties_of,
    retry_after_seconds,
    scalar_text,
)

INTERCOM_API_VERSION = "2.14"
"""The REST API version every request names (``Intercom-Version``)."""
INTERCOM_MAX_BATCH = 25
"""Events per :meth:`IntercomDestination.deliver` call (sent one per request, in order)."""
METADATA_KEYS = 10
"""Intercom keeps the first 10 metadata keys of an event."""
EVENT_ID_KEY = "firstmile_event_id"
"""The metadata key that carries the event's idempotency key."""
CONTACT_FIELDS = ("email", "name", "phone")
"""Traits that are the contact's own fields rather than custom attributes."""
_NO_RETRIES: RequestOptions = {"max_retries": 0}
_OMIT: Any = ...  # the library's marker of a field left out of the request


class IntercomDestination:
    """One Intercom workspace (an access token) as a destination."""

    def __init__(
        self, access_token: str, *, base_url: str = "https://api.intercom.io", timeout_s: float = 10.0
    ) -> None:
        if not access_token:
            raise ValueError("an Intercom access token is required")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._http = httpx.AsyncClient(timeout=timeout_s)
        self._client = AsyncIntercom(
            token=access_token,
            base_url=self.base_url,
            timeout=timeout_s,
            headers={"Intercom-Version": INTERCOM_API_VERSION},
            httpx_client=self._http,
        )

    @property
    def kind(self) -> str:
        return "intercom"

    @property
    def max_batch(self) -> int:
        return INTERCOM_MAX_BATCH

    async def deliver(self, events: Sequence[OutboundEvent]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        halted: Retry | None = None
        for event in events:
            if halted is not None:
                outcomes.append(halted)
                continue
            answer = await (self._identify(event) if event.kind == "identify" else self._track(event))
            if isinstance(answer, Sent):
                outcomes.append(Delivered())
                continue
            outcome = outcome_of(answer)
            if isinstance(outcome, Retry):
                halted = outcome
            outcomes.append(outcome)
        return outcomes

    async def _identify(self, event: OutboundEvent) -> Answer:
        fields, custom = contact_fields(event)
        found = await self._call(
            self._client.contacts.show_contact_by_external_id(event.user_id, request_options=_NO_RETRIES)
        )
        if isinstance(found, ApiError) and found.status_code == 404:
            return await self._create_contact(event.user_id, fields, custom)
        if not isinstance(found, _Ok):
            return _answer(found)
        contact_id = str(getattr(found.value, "id", "") or "")
        updated = await self._call(
            self._client.contacts.update(
                contact_id,
                email=fields.get("email", _OMIT),
                name=fields.get("name", _OMIT),
                phone=fields.get("phone", _OMIT),
                custom_attributes=custom,
                request_options=_NO_RETRIES,
            )
        )
        return Sent() if isinstance(updated, _Ok) else _answer(updated)

    async def _create_contact(self, user_id: str, fields: dict[str, str], custom: dict[str, Any]) -> Answer:
        body: dict[str, Any] = {"role": "user", "external_id": user_id, **fields}
        if custom:
            body["custom_attributes"] = custom
        request = CreateContactRequestWithExternalId.model_validate(body)
        created = await self._call(self._client.contacts.create(request=request, request_options=_NO_RETRIES))
        if isinstance(created, ApiError) and created.status_code == 409:  # created meanwhile: found next time
            return Transient(f"Intercom has a contact for this user already: {_error_text(created)}")
        return Sent() if isinstance(created, _Ok) else _answer(created)

    async def _track(self, event: OutboundEvent) -> Answer:
        request = CreateDataEventRequestWithUserId(
            user_id=event.user_id,
            event_name=event.name,
            created_at=epoch_s(event.occurred_at),
            metadata=metadata(event),
        )
        sent = await self._call(self._client.events.create(request=request, request_options=_NO_RETRIES))
        if isinstance(sent, ApiError) and sent.status_code == 404:  # "User Not Found": make the contact, again
            created = await self._create_contact(event.user_id, {}, {})
            if not isinstance(created, Sent):
                return created
            sent = await self._call(self._client.events.create(request=request, request_options=_NO_RETRIES))
        return Sent() if isinstance(sent, _Ok) else _answer(sent)

    async def _call(self, call: Any) -> _Ok | ApiError | Transient:
        try:
            return _Ok(await call)
        except ApiError as error:
            return error
        except httpx.HTTPError as exc:
            return Transient(f"Intercom did not answer: {type(exc).__name__}: {exc}")

    async def erase(self, user_id: str) -> ErasureOutcome:
        found = await self._call(
            self._client.contacts.show_contact_by_external_id(user_id, request_options=_NO_RETRIES)
        )
        if isinstance(found, ApiError) and found.status_code == 404:
            return ErasureOutcome(supported=True, done=True, detail="Intercom has no contact with this external_id")
        if not isinstance(found, _Ok):
            return ErasureOutcome(supported=True, done=False, detail=_answer_text(found))
        contact_id = str(getattr(found.value, "id", "") or "")
        deleted = await self._call(self._client.contacts.delete(contact_id, request_options=_NO_RETRIES))
        if isinstance(deleted, _Ok):
            return ErasureOutcome(supported=True, done=True, detail=f"Intercom deleted contact {contact_id}")
        return ErasureOutcome(supported=True, done=False, detail=_answer_text(deleted))

    async def close(self) -> None:
        await self._http.aclose()


class _Ok:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def contact_fields(event: OutboundEvent) -> tuple[dict[str, str], dict[str, Any]]:
    """The contact's own fields (``email``, ``name``, ``phone``) and its custom attributes, from an identify."""
    profile = profile_of(event)
    fields = {k: profile.pop(k) for k in CONTACT_FIELDS if isinstance(profile.get(k), str)}
    return fields, {k: flat(v) for k, v in profile.items()}


def metadata(event: OutboundEvent) -> dict[str, str]:
    """An event's metadata: the idempotency key first, then its properties, at most :data:`METADATA_KEYS` keys."""
    data = {EVENT_ID_KEY: event.idempotency_key}
    for key, value in properties_of(event).items():
        if len(data) >= METADATA_KEYS:
            break
        if key != EVENT_ID_KEY and value is not None:
            data[key] = scalar_text(value)
    return data


def _answer(result: ApiError | Transient) -> Answer:
    if isinstance(result, Transient):
        return result
    headers = {k.lower(): v for k, v in (result.headers or {}).items()}
    after = retry_after_seconds(headers.get("retry-after"))
    if after is None and result.status_code == 429 and headers.get("x-ratelimit-reset", "").isdigit():
        after = max(0.0, float(headers["x-ratelimit-reset"]) - time.time())
    return classify_status(result.status_code or 0, _error_text(result), after)


def _answer_text(result: ApiError | Transient | _Ok) -> str:
    if isinstance(result, ApiError):
        return f"Intercom answered HTTP {result.status_code}: {_error_text(result)}"
    if isinstance(result, Transient):
        return result.reason
    return "unexpected answer"


def _error_text(error: ApiError) -> str:
    body = error.body
    if isinstance(body, dict) and isinstance(body.get("errors"), list):
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in body["errors"] if isinstance(e, dict))[:300]
    errors = getattr(body, "errors", None)
    if isinstance(errors, list):
        return "; ".join(f"{getattr(e, 'code', '')}: {getattr(e, 'message', '')}" for e in errors)[:300]
    return str(body)[:300]


__all__ = ["CONTACT_FIELDS", "EVENT_ID_KEY", "INTERCOM_API_VERSION", "INTERCOM_MAX_BATCH", "IntercomDestination"]
