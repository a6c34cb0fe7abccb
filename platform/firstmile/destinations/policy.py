"""The delivery rules that need no I/O: the retry schedule, and what each kind's credentials are (pure).

The retry schedule (docs/destinations.md#retries): after the ``n``-th failed attempt of an event the next one
waits a random time between half and all of ``min(cap, base * 2 ** (n - 1))`` (exponential backoff with "equal
jitter": never sooner than half the step, so the schedule below holds; never all at once after an outage),
unless the destination said when (``Retry-After``, at most ``cap``). After ``max_attempts`` attempts the event
is dead. With the defaults (5 s, 1 h, 15 attempts) the waits are at most 5 s, 10 s, 20 s, 40 s, 80 s, 160 s,
320 s, 640 s, 1280 s, 2560 s, then 1 h four times: an event is given up on after about 5½ hours of failures.
"""

from __future__ import annotations

import base64
import binascii
import random
import secrets as _secrets
from dataclasses import dataclass

CREDENTIAL_FIELDS: dict[str, tuple[str, ...]] = {
    "segment": ("write_key", "public_api_token"),
    "mixpanel": ("project_token", "api_secret"),
    "amplitude": ("api_key", "secret_key"),
    "intercom": ("access_token",),
    "webhook": ("secret",),
}
"""Each kind's credential fields; the first is required, the others optional (Segment's ``public_api_token``,
Mixpanel's ``api_secret`` and Amplitude's ``secret_key`` are what their deletion APIs take)."""
WEBHOOK_SECRET_PREFIX = "whsec_"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When a failed event is tried again, and when it is given up on (see the module docstring)."""

    base_s: float = 5.0
    cap_s: float = 3600.0
    max_attempts: int = 15

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.cap_s < self.base_s or self.max_attempts < 1:
            raise ValueError("base_s > 0, cap_s >= base_s and max_attempts >= 1")

    def ceiling(self, attempt: int) -> float:
        """The longest wait after the ``attempt``-th failed attempt (1-based)."""
        return float(min(self.cap_s, self.base_s * 2.0 ** max(0, attempt - 1)))

    def delay(self, attempt: int, rng: random.Random, after_s: float | None = None) -> float:
        """Seconds until the next attempt after the ``attempt``-th failed one (``after_s``: the destination's
        ``Retry-After``, honoured up to the cap)."""
        if after_s is not None and after_s >= 0:
            return float(min(self.cap_s, after_s))
        ceiling = self.ceiling(attempt)
        return rng.uniform(ceiling / 2, ceiling)

    def exhausted(self, attempts: int) -> bool:
        """Whether an event that failed its ``attempts``-th attempt is given up on (dead)."""
        return attempts >= self.max_attempts

    def schedule(self) -> list[float]:
        """The longest wait after each failed attempt but the last (the documented schedule)."""
        return [self.ceiling(n) for n in range(1, self.max_attempts)]


def check_credentials(kind: str, values: dict[str, str]) -> None:
    """Raise :class:`ValueError` unless ``values`` are credentials of ``kind`` (known fields, the required one)."""
    fields = CREDENTIAL_FIELDS.get(kind)
    if fields is None:
        raise ValueError(f"unknown destination kind {kind!r}")
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"a {kind} destination has no credential field {', '.join(unknown)} (its fields: "
                         f"{', '.join(fields)})")  # fmt: skip
    if not values.get(fields[0]):
        raise ValueError(f"a {kind} destination needs {fields[0]}")
    for name, value in values.items():
        if not value or value != value.strip() or len(value) > 4096 or any(ord(c) < 32 for c in value):
            raise ValueError(f"{name}: empty, too long, or with spaces or control characters around it")
    if kind == "webhook":
        webhook_secret_bytes(values["secret"])


def webhook_secret_bytes(secret: str) -> bytes:
    """The key of a Standard Webhooks secret (``whsec_`` and the base64 of 24 to 64 random bytes)."""
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        raise ValueError("a webhook secret is `whsec_` followed by base64 (generate one with --generate)")
    try:
        key = base64.b64decode(secret[len(WEBHOOK_SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook secret is `whsec_` followed by base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError("a webhook secret's key is 24 to 64 bytes (Standard Webhooks)")
    return key


def new_webhook_secret() -> str:
    """A fresh Standard Webhooks secret: ``whsec_`` and 32 random bytes in base64."""
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(32)).decode("ascii")


__all__ = [
    "CREDENTIAL_FIELDS",
    "RetryPolicy",
    "check_credentials",
    "new_webhook_secret",
    "webhook_secret_bytes",
]
