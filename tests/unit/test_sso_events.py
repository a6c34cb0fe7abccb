"""The pure parts of the Keycloak event sync: which events count as failures, what of them is audited,
and how the cursor moves when several events share a millisecond (Keycloak's event times are ms)."""

from __future__ import annotations

from typing import Any

from firstmile.sso.events import EventCursor, audit_payload, audit_subject, is_failure


def _event(event_id: str, at: int, kind: str = "LOGIN_ERROR", **extra: Any) -> dict[str, Any]:
    return {"id": event_id, "time": at, "type": kind, **extra}


def test_only_error_types_are_failures() -> None:
    assert is_failure(_event("a", 1, "IDENTITY_PROVIDER_RESPONSE_ERROR"))
    assert is_failure(_event("a", 1, "LOGIN_ERROR"))
    assert not is_failure(_event("a", 1, "LOGIN"))
    assert not is_failure(_event("a", 1, "IDENTITY_PROVIDER_FIRST_LOGIN"))
    assert not is_failure({"id": "a"})


def test_the_payload_keeps_the_chosen_fields_and_no_personal_data() -> None:
    event = _event(
        "e1",
        1_795_680_000_123,
        "LOGIN_ERROR",
        error="invalid_user_credentials",
        clientId="firstmile-admin",
        userId="u1",
        ipAddress="203.0.113.7",
        sessionId="s1",
        details={"username": "ada@customer.test", "reason": "x", "identity_provider": "customer-idp", "email": "e"},
    )
    payload = audit_payload(event)
    assert payload == {
        "keycloak_event_type": "LOGIN_ERROR",
        "keycloak_event_id": "e1",
        "error": "invalid_user_credentials",
        "reason": "x",
        "identity_provider": "customer-idp",
        "client_id": "firstmile-admin",
        "user_id": "u1",
        "time": "2026-11-26T08:00:00.123+00:00",
    }
    assert "203.0.113.7" not in str(payload) and "ada@customer.test" not in str(payload)


def test_the_subject_is_the_provider_else_the_user_else_the_realm() -> None:
    realm = "firstmile-acme"
    assert audit_subject(_event("a", 1, details={"identity_provider": "customer-idp"}, userId="u"), realm) == (
        "idp:customer-idp"
    )
    assert audit_subject(_event("a", 1, userId="u1"), realm) == "user:u1"
    assert audit_subject(_event("a", 1), realm) == "realm:firstmile-acme"


def test_events_of_the_cursor_millisecond_are_new_unless_already_copied() -> None:
    cursor = EventCursor(100, frozenset({"a"}))
    assert not cursor.is_new(_event("a", 100))
    assert cursor.is_new(_event("b", 100))
    assert cursor.is_new(_event("c", 101))
    assert not cursor.is_new(_event("z", 99))


def test_the_cursor_keeps_the_ids_of_its_newest_millisecond() -> None:
    start = EventCursor(100, frozenset({"a"}))
    assert start.after([]) is start
    same = start.after([_event("b", 100)])
    assert same == EventCursor(100, frozenset({"a", "b"}))
    moved = same.after([_event("c", 101), _event("d", 103), _event("e", 103)])
    assert moved == EventCursor(103, frozenset({"d", "e"}))
