"""Onboarding paths as the runtime sees them, and the progress state machine.

Pure: no I/O. A path version is immutable once stored; progress is a set of
completed steps on one path version, from which everything else derives.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class StepDef:
    id: str
    title: str
    description: str
    optional: bool
    prerequisites: tuple[str, ...]
    completion: Mapping[str, Any]
    validation: str = "auto"  # "review": a person confirms each completion (the review queue)


@dataclass(frozen=True, slots=True)
class PathDef:
    """One stored version of a path."""

    key: str
    version: int
    name: str
    description: str
    priority: int
    targeting: tuple[Mapping[str, Any], ...]
    activation_step: str
    steps: tuple[StepDef, ...]
    _index: dict[str, StepDef] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._index.update({s.id: s for s in self.steps})

    @classmethod
    def from_definition(cls, key: str, version: int, definition: Mapping[str, Any]) -> PathDef:
        """Build from the manifest's path object as stored in ``onboarding_paths.definition``.

        An omitted ``prerequisites`` becomes the previous required step, so the
        path's order is explicit from here on.
        """
        steps: list[StepDef] = []
        previous_required: str | None = None
        for raw in definition["steps"]:
            pre = raw.get("prerequisites")
            if pre is None:
                pre = [previous_required] if previous_required else []
            steps.append(
                StepDef(
                    id=raw["id"],
                    title=raw["title"],
                    description=raw.get("description", ""),
                    optional=bool(raw.get("optional", False)),
                    prerequisites=tuple(pre),
                    completion=raw["completion"],
                    validation=str(raw.get("validation", "auto")),
                )
            )
            if not raw.get("optional", False):
                previous_required = raw["id"]
        return cls(
            key=key,
            version=version,
            name=definition["name"],
            description=definition.get("description", ""),
            priority=int(definition.get("priority", 0)),
            targeting=tuple(definition.get("targeting", ())),
            activation_step=definition["activation_step"],
            steps=tuple(steps),
        )

    def step(self, step_id: str) -> StepDef | None:
        return self._index.get(step_id)

    @property
    def required_steps(self) -> tuple[StepDef, ...]:
        return tuple(s for s in self.steps if not s.optional)


@dataclass(frozen=True, slots=True)
class Progress:
    """Derived view of a user's progress on one path version."""

    current_step: str | None
    status: str
    completed_required: int
    required: int

    @property
    def percent(self) -> int:
        return 100 if self.required == 0 else round(100 * self.completed_required / self.required)


def evaluate(path: PathDef, completed: Iterable[str]) -> Progress:
    """Current step (first incomplete required step in order) and status."""
    done = set(completed)
    required = path.required_steps
    current = next((s.id for s in required if s.id not in done), None)
    completed_required = sum(1 for s in required if s.id in done)
    return Progress(
        current_step=current,
        status="completed" if current is None else "in_progress",
        completed_required=completed_required,
        required=len(required),
    )


def missing_prerequisites(path: PathDef, step_id: str, completed: Iterable[str]) -> list[str]:
    """Prerequisites of ``step_id`` not yet complete, in path order."""
    step = path.step(step_id)
    if step is None:
        raise KeyError(step_id)
    done = set(completed)
    return [p for p in step.prerequisites if p not in done]


def is_available(step: StepDef, done: Collection[str]) -> bool:
    """Not yet complete, and every prerequisite is."""
    return step.id not in done and all(p in done for p in step.prerequisites)
