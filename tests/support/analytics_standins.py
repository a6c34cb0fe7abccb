"""Stand-ins for the analytics and messaging vendors the destinations deliver to, over real HTTP on 127.0.0.1
(HTTPS for Mixpanel, whose client builds ``https://{api_host}`` URLs only).

Segment, Mixpanel, Amplitude and Intercom are SaaS that cannot run here, so the destination adapters' tests
drive each vendor's official client against these. They reuse :class:`~tests.support.saas_standins.StandIn`
(one ``http.server`` per stand-in, every request recorded, scripted answers with ``respond``/``hang``/``drop``)
and answer as each vendor documents; each also decodes what it received (:attr:`VendorStandIn.decoded`).

Every stand-in can be told that its validation refuses a user's events (:meth:`VendorStandIn.refuse`):
the vendor then answers as it documents a refused event (Segment and Mixpanel refuse the whole request,
Amplitude names the event's index, Intercom refuses the one request). Together with the limits each vendor
documents (below), this is how the tests make "a 4xx about one event".

:class:`SegmentStandIn`: Segment's HTTP Tracking API ("HTTP Tracking API": Batch, Authentication, Errors,
Max Request Size) and the Public API's Create Workspace Regulation ("Deletion and Suppression"):

- ``POST /v1/batch``, HTTP basic auth with the write key as the user name (or ``writeKey`` in the body),
  ``{"batch": [...], "sentAt"}``: ``200 {"success": true}``. Segment answers ``200`` to everything but
  payloads too large and invalid JSON: over 500 KB per batch or 32 KB per message, or a body that is not
  JSON, is ``400`` (with ``code`` and ``message``, which the official client reads); a write key it does
  not know is ``200`` too, and the messages go nowhere. Messages are kept once per ``messageId``.
- ``POST /regulations`` with ``Authorization: Bearer <token>`` and ``{"regulationType", "subjectType",
  "subjectIds"}``: ``200 {"data": {"regulateId"}}``; a wrong token ``401``, a body that is not one ``422``.

:class:`MixpanelStandIn`: Mixpanel's Ingestion API ("Track Events", "Import Events", "Profile Set",
"Delete Profile", "Rate Limits"):

- ``POST /track``, ``/engage``, ``/import`` with a form body ``data=`` (JSON, or base64 of JSON, one object or
  an array) and ``verbose=1``: ``200 {"error": null, "status": 1}`` (``1`` without ``verbose``).
  ``/track`` keeps events of the last 5 days only and drops older ones silently; an event needs ``event`` and
  ``properties.token``, and fewer than 255 properties, else the request is ``400 {"error", "status": 0}``.
  ``/import`` needs the project's API secret (HTTP basic auth, ``401`` otherwise). ``/engage`` needs
  ``$token`` and ``$distinct_id``; ``$set`` updates the profile, ``$delete`` removes it. Events are kept
  once per ``$insert_id``.

:class:`AmplitudeStandIn`: Amplitude's HTTP V2 API ("HTTP V2 API", "Batch and retry HTTP V2 API requests")
and User Privacy API ("User Privacy API", v1):

- ``POST /2/httpapi`` with ``Content-Type: application/json`` and ``{"api_key", "events", "options"}``:
  ``200 {"code": 200, "events_ingested", "payload_size_bytes", "server_upload_time"}``. A missing
  ``api_key`` or ``events`` is ``400`` with ``missing_field``; an unknown key ``400 "Invalid API key: …"``;
  events without ``event_type`` or an id, with a ``time`` that is not an integer, or an id shorter than
  ``options.min_id_length`` (5 by default) make the request ``400`` naming their indices
  (``events_with_missing_fields``, ``events_with_invalid_fields``, ``events_with_invalid_id_lengths``), and
  none of it is ingested. Events are kept once per ``insert_id``.
- ``POST /api/2/deletions/users`` with HTTP basic auth (API key, secret key) and ``{"user_ids", "requester"}``:
  ``200`` with the deletion job (``day``, ``status: staging``); wrong credentials ``401``.

:class:`IntercomStandIn`: Intercom's REST API ("Contacts": find by external id, create, update, delete;
"Data Events": submit; "Errors"; "Rate Limiting"), for one access token (``Authorization: Bearer``); a
request without it is ``401 error.list unauthorized``. Errors are ``{"type": "error.list", "request_id",
"errors": [{"code", "message"}]}``.

- ``GET /contacts/find_by_external_id/{id}``: the contact, or ``404 not_found``;
- ``POST /contacts``: ``200`` the new contact; an ``external_id`` taken ``409 conflict``; a custom attribute
  the workspace does not have (:attr:`IntercomStandIn.data_attributes`) ``400 parameter_invalid``;
- ``PUT /contacts/{id}``: ``200`` the contact, updated (``404`` for an unknown id);
- ``DELETE /contacts/{id}``: ``200 {"id", "external_id", "type": "contact", "deleted": true}``;
- ``POST /events``: ``202`` and an empty body; a user it does not know ``404 "User Not Found"``; an event
  repeating a contact's name and ``created_at`` is ignored (Intercom's de-duplication).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import secrets
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from tests.support.saas_standins import Answer, Recorded, StandIn, json_answer

SEGMENT_MAX_MESSAGE = 32 * 1024
SEGMENT_MAX_BATCH = 500 * 1024
MIXPANEL_TRACK_WINDOW_S = 5 * 24 * 3600
MIXPANEL_MAX_PROPERTIES = 255
AMPLITUDE_MIN_ID_LENGTH = 5
INTERCOM_VERSIONS = frozenset({"1.0", "1.1", "1.2", "1.3", "1.4"} | {f"2.{n}" for n in range(15)} | {"Unstable"})


@dataclass(frozen=True)
class Decoded:
    """One request the stand-in answered itself (not a scripted answer): what it read from the body (a JSON
    value, or the form's decoded ``data``) and the status it answered."""

    request: Recorded
    payload: Any
    status: int


class VendorStandIn(StandIn):
    """A vendor's API: records each request it answers with its decoded payload and status (subclasses answer
    in :meth:`reply`); :meth:`refuse` marks users whose events its validation refuses."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(tls)
        self.decoded: list[Decoded] = []
        self.refused_users: set[str] = set()

    def refuse(self, user_id: str) -> None:
        """The vendor's validation refuses this user's events from now on."""
        with self._lock:
            self.refused_users.add(user_id)

    def payloads(self, method: str, path: str) -> list[Any]:
        """The decoded payloads of the requests to ``method path``, in order."""
        return [d.payload for d in self.decoded if d.request.method == method and d.request.path == path]

    def answer(self, request: Recorded) -> Answer:
        payload, answer = self.reply(request)
        with self._lock:
            self.decoded.append(Decoded(request, payload, answer.status))
        return answer

    def reply(self, request: Recorded) -> tuple[Any, Answer]:
        """The decoded payload of ``request`` and the vendor's answer."""
        raise NotImplementedError


class SegmentStandIn(VendorStandIn):
    """Segment's HTTP Tracking API for one write key, and its Public API for one token."""

    name = "segment-standin"

    def __init__(self, write_key: str = "seg-write-key", public_api_token: str = "seg-public-token") -> None:
        super().__init__()
        self.write_key = write_key
        self.public_api_token = public_api_token
        self.messages: dict[str, dict[str, Any]] = {}
        """Messages kept, by ``messageId`` (Segment deduplicates on it)."""
        self.regulations: list[dict[str, Any]] = []

    def reply(self, request: Recorded) -> tuple[Any, Answer]:
        body = _json_or_none(request.body)
        if request.method == "POST" and request.path == "/v1/batch":
            return body, self._batch(request, body)
        if request.method == "POST" and request.path == "/regulations":
            return body, self._regulation(request, body)
        return body, json_answer(404, {"code": "not_found", "message": f"{request.method} {request.path}"})

    def _batch(self, request: Recorded, body: Any) -> Answer:
        if body is None:
            return json_answer(400, {"code": "invalid_request", "message": "Invalid JSON"})
        if len(request.body) > SEGMENT_MAX_BATCH:
            return json_answer(400, {"code": "invalid_request", "message": "Batch exceeds 500KB"})
        batch = body.get("batch") if isinstance(body, dict) else None
        if not isinstance(batch, list):
            return json_answer(400, {"code": "invalid_request", "message": "batch must be an array"})
        for message in batch:
            if len(json.dumps(message).encode()) > SEGMENT_MAX_MESSAGE:
                return json_answer(400, {"code": "invalid_request", "message": "Message exceeds 32KB"})
            if isinstance(message, dict) and message.get("userId") in self.refused_users:
                return json_answer(400, {"code": "invalid_request", "message": f"refused: {message.get('userId')}"})
        known = request.basic_auth() == (self.write_key, "") or body.get("writeKey") == self.write_key
        if known:
            with self._lock:
                for message in batch:
                    if isinstance(message, dict) and message.get("messageId"):
                        self.messages.setdefault(str(message["messageId"]), message)
        return json_answer(200, {"success": True})

    def _regulation(self, request: Recorded, body: Any) -> Answer:
        if request.headers.get("authorization") != f"Bearer {self.public_api_token}":
            return json_answer(401, {"errors": [{"type": "unauthorized", "message": "Unauthorized"}]})
        valid = (
            isinstance(body, dict)
            and body.get("regulationType")
            in {"SUPPRESS_ONLY", "UNSUPPRESS", "SUPPRESS_WITH_DELETE", "DELETE_ONLY", "DELETE_INTERNAL"}
            and body.get("subjectType") in {"USER_ID", "OBJECT_ID"}
            and isinstance(body.get("subjectIds"), list)
            and body["subjectIds"]
        )
        if not valid:
            return json_answer(422, {"errors": [{"type": "validation", "message": "invalid regulation"}]})
        regulate_id = secrets.token_hex(12)
        with self._lock:
            self.regulations.append({"regulateId": regulate_id, **body})
        return json_answer(200, {"data": {"regulateId": regulate_id}})


class MixpanelStandIn(VendorStandIn):
    """Mixpanel's Ingestion API for one project (token, API secret), over HTTPS."""

    name = "mixpanel-standin"

    def __init__(self, tls: ssl.SSLContext, token: str = "mp-token", api_secret: str = "mp-secret") -> None:
        super().__init__(tls)
        self.token = token
        self.api_secret = api_secret
        self.events: dict[str, dict[str, Any]] = {}
        """Events kept, by ``$insert_id``."""
        self.imported: dict[str, dict[str, Any]] = {}
        """Events ``/import`` kept, by ``$insert_id``."""
        self.profiles: dict[str, dict[str, Any]] = {}
        self.deleted_profiles: list[str] = []

    def reply(self, request: Recorded) -> tuple[Any, Answer]:
        if request.method != "POST" or request.path not in ("/track", "/engage", "/import"):
            return None, json_answer(404, {"error": "not found", "status": 0})
        form = {name: values[-1] for name, values in parse_qs(request.body.decode(), keep_blank_values=True).items()}
        verbose = form.get("verbose") == "1"
        items = _mixpanel_data(form.get("data", "")) if request.headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded") else _json_or_none(request.body)  # fmt: skip
        if items is None:
            return items, _mixpanel(400, "data, field required", verbose)
        if request.path == "/import" and request.basic_auth() != (self.api_secret, ""):
            return items, _mixpanel(401, "Invalid API secret", verbose)
        if request.path == "/engage":
            return items, self._engage(items, verbose)
        return items, self._events(items, verbose, imported=request.path == "/import")

    def _events(self, items: list[Any], verbose: bool, *, imported: bool) -> Answer:
        for item in items:
            properties = item.get("properties") if isinstance(item, dict) else None
            if not isinstance(properties, dict) or not item.get("event"):
                return _mixpanel(400, "'event' and 'properties' must be present", verbose)
            if len(properties) >= MIXPANEL_MAX_PROPERTIES:
                return _mixpanel(400, "an event must have fewer than 255 properties", verbose)
            if properties.get("distinct_id") in self.refused_users:
                return _mixpanel(400, f"refused: {properties.get('distinct_id')}", verbose)
        now = time.time()
        with self._lock:
            for item in items:
                properties = item["properties"]
                if not imported and properties.get("token") != self.token:
                    continue  # /track takes any token: a wrong one goes nowhere
                if not imported and now - _seconds(properties.get("time", now)) > MIXPANEL_TRACK_WINDOW_S:
                    continue  # /track drops events older than 5 days, silently
                kept = self.imported if imported else self.events
                kept.setdefault(str(properties.get("$insert_id", secrets.token_hex(8))), item)
        return _mixpanel(200, None, verbose)

    def _engage(self, items: list[Any], verbose: bool) -> Answer:
        for item in items:
            if not isinstance(item, dict) or item.get("$token") != self.token or "$distinct_id" not in item:
                return _mixpanel(400, "$token and $distinct_id are required", verbose)
            if item["$distinct_id"] in self.refused_users:
                return _mixpanel(400, f"refused: {item['$distinct_id']}", verbose)
        with self._lock:
            for item in items:
                user = str(item["$distinct_id"])
                if "$delete" in item:
                    self.profiles.pop(user, None)
                    self.deleted_profiles.append(user)
                if isinstance(item.get("$set"), dict):
                    self.profiles.setdefault(user, {}).update(item["$set"])
        return _mixpanel(200, None, verbose)


def _mixpanel(status: int, error: str | None, verbose: bool) -> Answer:
    if verbose or status != 200:
        return json_answer(status, {"error": error, "status": 1 if error is None else 0})
    return Answer(200, {"Content-Type": "text/plain"}, b"1")


def _mixpanel_data(data: str) -> list[Any] | None:
    """The form's ``data``: JSON, or base64 of JSON; one object or an array of them."""
    value = _json_or_none(data.encode())
    if value is None:
        try:
            value = _json_or_none(base64.b64decode(data, validate=True))
        except (binascii.Error, ValueError):
            return None
    if isinstance(value, dict):
        return [value]
    return value if isinstance(value, list) else None


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _seconds(value: Any) -> float:
    """Mixpanel's ``time``: seconds or milliseconds since the epoch."""
    number = float(value)
    return number / 1000 if number > 1e11 else number


class AmplitudeStandIn(VendorStandIn):
    """Amplitude's HTTP V2 API and User Privacy API for one project (API key, secret key)."""

    name = "amplitude-standin"

    def __init__(self, api_key: str = "amp-key", secret_key: str = "amp-secret") -> None:
        super().__init__()
        self.api_key = api_key
        self.secret_key = secret_key
        self.events: dict[str, dict[str, Any]] = {}
        """Events ingested, by ``insert_id`` (Amplitude ignores a repeated one)."""
        self.deletions: list[dict[str, Any]] = []

    def reply(self, request: Recorded) -> tuple[Any, Answer]:
        body = _json_or_none(request.body)
        if request.method == "POST" and request.path == "/2/httpapi":
            return body, self._upload(request, body)
        if request.method == "POST" and request.path == "/api/2/deletions/users":
            return body, self._deletion(request, body)
        return body, json_answer(404, {"code": 404, "error": "Not found"})

    def _upload(self, request: Recorded, body: Any) -> Answer:
        if not request.headers.get("content-type", "").startswith("application/json") or not isinstance(body, dict):
            return json_answer(400, {"code": 400, "error": "Invalid request body"})
        for field in ("api_key", "events"):
            if field not in body:
                return json_answer(400, {"code": 400, "error": "Request missing required field",
                                         "missing_field": field})  # fmt: skip
        if body["api_key"] != self.api_key:
            return json_answer(400, {"code": 400, "error": f"Invalid API key: {body['api_key']}"})
        options = body.get("options") or {}
        min_length = int(options.get("min_id_length", AMPLITUDE_MIN_ID_LENGTH))
        missing: dict[str, list[int]] = {}
        invalid: dict[str, list[int]] = {}
        short: dict[str, list[int]] = {}
        for i, event in enumerate(body["events"]):
            if not event.get("event_type"):
                missing.setdefault("event_type", []).append(i)
            ids = {k: event[k] for k in ("user_id", "device_id") if event.get(k)}
            if not ids:
                missing.setdefault("user_id", []).append(i)
            for key, value in ids.items():
                if len(str(value)) < min_length:
                    short.setdefault(key, []).append(i)
            if "time" in event and (not isinstance(event["time"], int) or isinstance(event["time"], bool)):
                invalid.setdefault("time", []).append(i)
            if event.get("user_id") in self.refused_users:
                invalid.setdefault("user_id", []).append(i)
        if missing or invalid or short:
            answer: dict[str, Any] = {"code": 400, "error": "Invalid field values on some events"}
            if missing:
                answer["events_with_missing_fields"] = missing
            if invalid:
                answer["events_with_invalid_fields"] = invalid
            if short:
                answer["events_with_invalid_id_lengths"] = short
            return json_answer(400, answer)
        with self._lock:
            for event in body["events"]:
                self.events.setdefault(str(event.get("insert_id") or secrets.token_hex(8)), event)
        return json_answer(200, {"code": 200, "events_ingested": len(body["events"]),
                                 "payload_size_bytes": len(request.body),
                                 "server_upload_time": int(time.time() * 1000)})  # fmt: skip

    def _deletion(self, request: Recorded, body: Any) -> Answer:
        if request.basic_auth() != (self.api_key, self.secret_key):
            return json_answer(401, {"error": "Invalid API key or secret key"})
        if not isinstance(body, dict) or not (body.get("user_ids") or body.get("amplitude_ids")):
            return json_answer(400, {"error": "user_ids or amplitude_ids required"})
        day = datetime.now(UTC).date().isoformat()
        with self._lock:
            self.deletions.append(body)
        return json_answer(200, {"day": day, "status": "staging", "amplitude_ids": [
            {"amplitude_id": 100000 + i, "requested_on_day": day, "requester": body.get("requester", "")}
            for i, _ in enumerate(body.get("user_ids", []))]})  # fmt: skip


class IntercomStandIn(VendorStandIn):
    """Intercom's REST API (contacts and data events) for one access token."""

    name = "intercom-standin"

    def __init__(self, access_token: str = "ic-token", data_attributes: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.access_token = access_token
        self.data_attributes = set(data_attributes)
        """The workspace's custom data attributes of people (others are refused)."""
        self.contacts: dict[str, dict[str, Any]] = {}
        self.events: dict[tuple[str, str, int], dict[str, Any]] = {}
        """Data events kept, by (user id, event name, ``created_at``): Intercom's de-duplication."""
        self.deleted: list[str] = []
        self._ids = itertools.count(1)

    def contact(self, external_id: str) -> dict[str, Any] | None:
        return next((c for c in self.contacts.values() if c.get("external_id") == external_id), None)

    def reply(self, request: Recorded) -> tuple[Any, Answer]:
        body = _json_or_none(request.body) if request.body else None
        return body, self._route(request, body)

    def _route(self, request: Recorded, body: Any) -> Answer:
        if request.headers.get("authorization") != f"Bearer {self.access_token}":
            return _intercom_error(401, "unauthorized", "Access Token Invalid")
        version = request.headers.get("intercom-version")
        if version is not None and version not in INTERCOM_VERSIONS:
            return _intercom_error(400, "intercom_version_invalid", f"The requested version {version} is invalid")
        parts = request.path.strip("/").split("/")
        if request.method == "GET" and parts[:2] == ["contacts", "find_by_external_id"] and len(parts) == 3:
            found = self.contact(parts[2])
            return json_answer(200, found) if found else _intercom_error(404, "not_found", "User Not Found")
        if request.method == "POST" and parts == ["contacts"]:
            return self._create(body)
        if request.method == "PUT" and parts[0] == "contacts" and len(parts) == 2:
            return self._update(parts[1], body)
        if request.method == "DELETE" and parts[0] == "contacts" and len(parts) == 2:
            with self._lock:
                gone = self.contacts.pop(parts[1], None)
                if gone is not None:
                    self.deleted.append(parts[1])
            if gone is None:
                return _intercom_error(404, "not_found", "Contact Not Found")
            return json_answer(200, {"id": parts[1], "external_id": gone.get("external_id"), "type": "contact",
                                     "deleted": True})  # fmt: skip
        if request.method == "POST" and parts == ["events"]:
            return self._event(body)
        return _intercom_error(404, "not_found", f"{request.method} {request.path}")

    def _refusal(self, body: dict[str, Any]) -> Answer | None:
        user = body.get("external_id") or body.get("user_id")
        if user in self.refused_users:
            return _intercom_error(400, "parameter_invalid", f"refused: {user}")
        for name in body.get("custom_attributes") or {}:
            if name not in self.data_attributes:
                return _intercom_error(400, "parameter_invalid", f"Custom attribute '{name}' does not exist")
        return None

    def _create(self, body: Any) -> Answer:
        if not isinstance(body, dict):
            return _intercom_error(400, "parameter_invalid", "invalid JSON")
        refused = self._refusal(body)
        if refused is not None:
            return refused
        existing = self.contact(str(body.get("external_id"))) if body.get("external_id") else None
        if existing is not None:
            return _intercom_error(
                409, "conflict", f"A contact matching those details already exists with id={existing['id']}"
            )
        now = int(time.time())
        contact_id = f"{next(self._ids):024x}"
        contact = {"type": "contact", "id": contact_id, "workspace_id": "ws1", "role": body.get("role", "user"),
                   "external_id": body.get("external_id"), "email": body.get("email"), "name": body.get("name"),
                   "phone": body.get("phone"), "custom_attributes": dict(body.get("custom_attributes") or {}),
                   "created_at": now, "updated_at": now}  # fmt: skip
        with self._lock:
            self.contacts[contact_id] = contact
        return json_answer(200, contact)

    def _update(self, contact_id: str, body: Any) -> Answer:
        if not isinstance(body, dict):
            return _intercom_error(400, "parameter_invalid", "invalid JSON")
        contact = self.contacts.get(contact_id)
        if contact is None:
            return _intercom_error(404, "not_found", "User Not Found")
        refused = self._refusal({"external_id": contact.get("external_id"), **body})
        if refused is not None:
            return refused
        with self._lock:
            for field in ("email", "name", "phone", "external_id", "role"):
                if field in body:
                    contact[field] = body[field]
            contact["custom_attributes"].update(body.get("custom_attributes") or {})
            contact["updated_at"] = int(time.time())
        return json_answer(200, contact)

    def _event(self, body: Any) -> Answer:
        if not isinstance(body, dict) or not body.get("event_name") or not isinstance(body.get("created_at"), int):
            return _intercom_error(400, "parameter_invalid", "event_name and created_at are required")
        user = body.get("user_id")
        if user in self.refused_users:
            return _intercom_error(400, "parameter_invalid", f"refused: {user}")
        if not isinstance(user, str) or self.contact(user) is None:
            return _intercom_error(404, "not_found", "User Not Found")
        with self._lock:
            self.events.setdefault((user, body["event_name"], body["created_at"]), body)
        return Answer(202)


def _intercom_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Answer:
    payload = {
        "type": "error.list",
        "request_id": secrets.token_hex(10),
        "errors": [{"code": code, "message": message}],
    }
    return json_answer(status, payload, headers)


__all__ = [
    "AmplitudeStandIn",
    "Decoded",
    "IntercomStandIn",
    "MixpanelStandIn",
    "SegmentStandIn",
    "VendorStandIn",
]
