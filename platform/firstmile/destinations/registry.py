"""Which adapter serves a destination of the manifest, built from its section and its decrypted credentials.

Each vendor's adapter wraps the vendor's official client (``segment.py``, ``mixpanel.py``, ``amplitude.py``,
``intercom.py``); the webhook's signs with ``standardwebhooks`` (``webhook.py``). A vendor's API host comes from
the destination's ``region`` (its data residency) unless ``host`` names another (a proxy, or a test's stand-in).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from firstmile.destinations.port import Destination
from firstmile.tenancy.manifest import DestinationSpec

SEGMENT_HOSTS = {"us": "https://api.segment.io", "eu": "https://events.eu1.segmentapis.com"}
MIXPANEL_HOSTS = {"us": "api.mixpanel.com", "eu": "api-eu.mixpanel.com", "in": "api-in.mixpanel.com"}
SEGMENT_PUBLIC_API = {"us": "https://api.segmentapis.com", "eu": "https://eu1.api.segmentapis.com"}
"""Segment's Public API (user deletions, with a ``public_api_token``) per region."""
AMPLITUDE_URLS = {"eu": "https://api.eu.amplitude.com/2/httpapi"}
"""Amplitude's HTTP V2 API in the EU; the US one is the adapter's default."""
INTERCOM_URLS = {
    "us": "https://api.intercom.io",
    "eu": "https://api.eu.intercom.io",
    "au": "https://api.au.intercom.io",
}


@dataclass(frozen=True, slots=True)
class Credentials:
    """A destination's decrypted credentials: the current fields, and (a webhook rotating its secret) the
    previous secret while it is still valid."""

    values: Mapping[str, str]
    previous: Mapping[str, str] | None = None
    version: int = 0


class AdapterFactory(Protocol):
    """Builds the adapter of one destination (the wiring gives :class:`OfficialAdapters`; tests may give theirs)."""

    def build(self, spec: DestinationSpec, credentials: Credentials) -> Destination:
        """The adapter; :class:`ValueError` when the credentials cannot serve it."""
        ...


class OfficialAdapters:
    """The adapters over the vendors' official clients, and the webhook sender."""

    def __init__(self, *, timeout_s: float = 10.0) -> None:
        self.timeout_s = timeout_s

    def build(self, spec: DestinationSpec, credentials: Credentials) -> Destination:
        values = credentials.values
        region = spec.region or "us"
        if spec.kind == "webhook":
            from firstmile.destinations.webhook import WebhookDestination

            assert spec.url is not None  # the manifest's validation
            secrets: Sequence[str] = [values["secret"]]
            previous = (credentials.previous or {}).get("secret")
            if previous and previous != values["secret"]:
                secrets = [values["secret"], previous]
            return WebhookDestination(spec.url, secrets, timeout_s=self.timeout_s)
        if spec.kind == "segment":
            from firstmile.destinations.segment import SegmentDestination

            return SegmentDestination(
                values["write_key"],
                host=spec.host or SEGMENT_HOSTS[region],
                timeout_s=self.timeout_s,
                public_api_token=values.get("public_api_token"),
                public_api_url=SEGMENT_PUBLIC_API[region],
            )
        if spec.kind == "mixpanel":
            from firstmile.destinations.mixpanel import MixpanelDestination

            return MixpanelDestination(
                values["project_token"],
                api_host=spec.host or MIXPANEL_HOSTS[region],
                api_secret=values.get("api_secret"),
                timeout_s=self.timeout_s,
            )
        if spec.kind == "amplitude":
            from firstmile.destinations.amplitude import AmplitudeDestination

            server_url = spec.host or AMPLITUDE_URLS.get(region)
            if server_url is None:
                return AmplitudeDestination(
                    values["api_key"], secret_key=values.get("secret_key"), timeout_s=self.timeout_s
                )
            return AmplitudeDestination(
                values["api_key"], secret_key=values.get("secret_key"), server_url=server_url, timeout_s=self.timeout_s
            )
        if spec.kind == "intercom":
            from firstmile.destinations.intercom import IntercomDestination

            return IntercomDestination(
                values["access_token"], base_url=spec.host or INTERCOM_URLS[region], timeout_s=self.timeout_s
            )
        raise ValueError(f"unknown destination kind {spec.kind!r}")


__all__ = ["AdapterFactory", "Credentials", "OfficialAdapters"]
