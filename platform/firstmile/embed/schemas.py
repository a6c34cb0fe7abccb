"""The embed API's wire types: the checklist a browser renders (no decision internals, no traits)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

StepStatus = Literal["completed", "pending_review", "available", "locked"]


class ChecklistPath(msgspec.Struct):
    id: str
    name: str
    version: int


class ChecklistProgress(msgspec.Struct):
    completed_required: int
    required: int
    percent: int


class ChecklistStep(msgspec.Struct):
    id: str
    title: str
    description: str
    optional: bool
    status: StepStatus
    """``completed``; ``pending_review`` (a completion waits for a person's review, docs/review.md); ``available``
    (its prerequisites are done); ``locked`` (``waiting_for`` names what is not)."""
    completed_at: datetime | None
    waiting_for: list[str]
    """The prerequisites not completed yet, in the path's order."""


class Checklist(msgspec.Struct):
    """The user's onboarding as the embed SDK shows it (the stream's ``checklist`` event, and ``GET …/checklist``)."""

    user_id: str
    path: ChecklistPath
    status: str
    activated: bool
    current_step: str | None
    progress: ChecklistProgress
    steps: list[ChecklistStep]


__all__ = ["Checklist", "ChecklistPath", "ChecklistProgress", "ChecklistStep", "StepStatus"]
