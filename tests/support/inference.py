"""A recording wrapper around an app's own model client, so tests can see what reached the model.

The planner's guard (:class:`firstmile.ml.inference.GuardedInference`) sits between the
request and the client; wrapping the client shows, without a clock, what the guard let
through and how each call ended: answered, refused by the model's server, or cancelled by
the guard's hard timeout. Nothing is faked: the wrapped client (in-process or Ray Serve)
still answers every call it gets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from litestar import Litestar

from firstmile.ml.inference import GuardedInference, InferenceClient, InferenceError, Prediction, Stage


@dataclass
class Call:
    model: str
    stage: Stage
    outcome: str = "pending"
    """``answered``, the :class:`InferenceError` reason the client raised, or ``cancelled`` (the guard's timeout)."""


class RecordingClient:
    """Passes every call on to ``inner`` and records it.

    ``stall`` makes each call yield to the event loop that many times before the model is
    asked: a model far slower than a tiny timeout that still answers in the end, so a guard
    that fails to cut it shows up as an ``answered`` call rather than as a test that hangs.
    """

    def __init__(self, inner: InferenceClient) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.calls: list[Call] = []
        self.stall = 0

    @classmethod
    def install(cls, app: Litestar) -> RecordingClient:
        """Wrap the client behind ``app``'s guard (the planner and the stuck scan use that guard)."""
        guarded: GuardedInference = app.state.container.inference
        recording = cls(guarded.client)
        guarded.client = recording
        return recording

    @property
    def outcomes(self) -> list[str]:
        return [call.outcome for call in self.calls]

    async def predict(self, model: str, instances: Sequence[Mapping[str, Any]], *, stage: Stage) -> Prediction:
        call = Call(model, stage)
        self.calls.append(call)
        try:
            for _ in range(self.stall):
                await asyncio.sleep(0)
            result = await self.inner.predict(model, instances, stage=stage)
        except asyncio.CancelledError:
            call.outcome = "cancelled"
            raise
        except InferenceError as exc:
            call.outcome = exc.reason
            raise
        call.outcome = "answered"
        return result

    async def close(self) -> None:
        await self.inner.close()
