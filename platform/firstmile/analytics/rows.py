"""The analytics row: one event as the analytics store keeps it.

The event consumers (``firstmile.events``) map every event on the stream to one
:class:`AnalyticsEvent`; the stores write it to the ``events`` table and the
queries read it back. Onboarding facts (``onboarding.started``,
``onboarding.step_completed``, ``onboarding.activated``, ``onboarding.completed``)
carry the path columns; tracked product events (``track``, ``page``,
``identify``) carry the Segment event name and properties.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

# event_type values the queries rely on
STARTED = "onboarding.started"
STEP_COMPLETED = "onboarding.step_completed"
ACTIVATED = "onboarding.activated"
STUCK = "onboarding.stuck"
NUDGE_SENT = "nudge.sent"
NUDGE_OPENED = "nudge.opened"
NUDGE_CLICKED = "nudge.clicked"
NUDGE_CONVERTED = "nudge.converted"
NUDGE_UNSUBSCRIBED = "nudge.unsubscribed"
EXPOSED = "experiment.exposed"
"""A user's first exposure to an experiment: ``event_name`` holds the experiment's id, ``variant`` the variant."""
NUDGE_PROPERTIES = ("send_id", "channel", "trigger", "provider", "status", "content_path", "category", "step_id")
"""What a ``nudge.*`` row keeps of its event in ``properties`` (no personal data: ids, names of channels)."""
COMPLETED = "onboarding.completed"


@dataclass(frozen=True, slots=True)
class AnalyticsEvent:
    tenant_id: uuid.UUID
    event_id: uuid.UUID  # unique per tenant; every query counts one event_id once
    event_type: str  # track | identify | page | onboarding.* | user.erased
    event_name: str  # Segment event name for track, page name for page, "" otherwise
    user_id: str
    anonymous_id: str
    occurred_at: datetime  # tz-aware, UTC: when it happened (the client's timestamp)
    received_at: datetime  # tz-aware, UTC: when Firstmile accepted it
    path_key: str = ""  # onboarding facts: the path and version
    path_version: int = 0
    step_id: str = ""  # onboarding.step_completed / activated: the step
    variant: str = ""  # experiment variant the user was assigned ("" when none)
    persona: str = ""  # the user's persona trait at start ("" when unknown)
    properties: str = "{}"  # JSON object text: Segment properties (track/page) or traits (identify)
