"""Nudge content: the built-in wordings, and the choice among a tenant's (the manifest's ``nudges.templates``).

A variant is one wording; with a channel and a send time it makes an arm of the bandit
(``variant|channel|timing``). The templates see ``step`` (``title``, ``description``), ``path``
(``name``), ``tenant`` (``name``) and ``link`` (the tracked link; empty when links are off), never
personal data: a rendered body is stored with the send, and the address is read (decrypted) only
when it goes out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from firstmile.tenancy.manifest import NUDGE_CHANNELS as CHANNELS
from firstmile.tenancy.manifest import NudgeTemplateSpec

DEFAULT_LOCALE = "en"
STUCK = "stuck"


@dataclass(frozen=True, slots=True)
class Template:
    subject: str | None
    body: str
    html: str | None = None


STUCK_VARIANTS: dict[str, dict[str, Template]] = {
    "short": {
        "email": Template(
            subject="Your next step: {{ step.title }}",
            body="You're one step away in {{ path.name }}: {{ step.title }}.\n\n{{ step.description }}\n"
            "{% if link %}\nContinue: {{ link }}\n{% endif %}",
            html="<p>You're one step away in {{ path.name }}: <strong>{{ step.title }}</strong>.</p>"
            '<p>{{ step.description }}</p>{% if link %}<p><a href="{{ link }}">Continue</a></p>{% endif %}',
        ),
        "sms": Template(None, "{{ tenant.name }}: next up, {{ step.title }}. {{ link }} Reply STOP to opt out."),
        "push": Template("{{ step.title }}", "Pick up where you left off in {{ path.name }}."),
        "in_app": Template("{{ step.title }}", "Pick up where you left off: {{ step.title }}."),
    },
    "benefit": {
        "email": Template(
            subject="{{ step.title }} takes a couple of minutes",
            body='Finishing "{{ step.title }}" unlocks the rest of {{ path.name }}.\n\n{{ step.description }}\n'
            "{% if link %}\nContinue: {{ link }}\n{% endif %}",
            html="<p>Finishing <strong>{{ step.title }}</strong> unlocks the rest of {{ path.name }}.</p>"
            '<p>{{ step.description }}</p>{% if link %}<p><a href="{{ link }}">Continue</a></p>{% endif %}',
        ),
        "sms": Template(
            None,
            "{{ tenant.name }}: {{ step.title }} unlocks the rest of your setup. {{ link }} Reply STOP to opt out.",
        ),
        "push": Template("Almost there", "{{ step.title }} unlocks the rest of {{ path.name }}."),
        "in_app": Template("Almost there", "{{ step.title }} unlocks the rest of {{ path.name }}."),
    },
}
"""Variants for ``onboarding.stuck``, by variant then channel."""


@dataclass(frozen=True, slots=True)
class Wording:
    """One template a decision may choose: a variant on a channel, from the manifest or built in."""

    variant: str
    channel: str
    template: Template
    source: str
    """``manifest`` or ``builtin``."""
    persona: str = "*"
    locale: str = DEFAULT_LOCALE
    version: int | None = None

    def describe(self) -> dict[str, Any]:
        """What the audit entry and the send record of the content."""
        return {"source": self.source, "variant": self.variant, "channel": self.channel, "persona": self.persona,
                "locale": self.locale, "version": self.version}  # fmt: skip


def language_of(value: object) -> str:
    """The language of a ``locale`` trait (``de-AT`` and ``de_AT`` give ``de``); the default when unusable."""
    if not isinstance(value, str):
        return DEFAULT_LOCALE
    language = value.replace("_", "-").split("-", 1)[0].lower()
    return language if 2 <= len(language) <= 3 and language.isalpha() and language.isascii() else DEFAULT_LOCALE


def variant_names(templates: Iterable[NudgeTemplateSpec]) -> frozenset[str]:
    """Every template variant a decision may offer: the manifest's and the built-in ones (which a channel without
    manifest wordings falls back to); what a nudge experiment's variant may name."""
    return frozenset(STUCK_VARIANTS) | {t.variant for t in templates}


def wordings(templates: Iterable[NudgeTemplateSpec], trigger: str, persona: str, locale: str) -> list[Wording]:
    """The wordings a decision for ``trigger`` may choose among, for a user of ``persona`` speaking ``locale``.

    Channel by channel, the first of these that has templates for the channel: the manifest's templates
    for the trigger in the user's language, for the user's persona, then for any persona (``*``); the
    same in the default language (``en``); the same again for the manifest's ``stuck`` templates (a
    declared trigger without wordings of its own reads like a stuck nudge); and last the built-in
    wordings (English). Of each variant, the highest version. So a tenant that wrote e-mail wordings
    only still nudges in-app and by SMS, in the built-in words.
    """
    templates = tuple(templates)
    levels = [
        [t for t in templates if t.trigger == wanted and t.locale == language and t.persona == who]
        for wanted in dict.fromkeys((trigger, STUCK))
        for language in dict.fromkeys((locale, DEFAULT_LOCALE))
        for who in dict.fromkeys((persona, "*"))
    ]
    chosen: list[Wording] = []
    for channel in CHANNELS:
        level = next((found for found in ([t for t in lv if t.channel == channel] for lv in levels) if found), None)
        if level is None:
            chosen += [Wording(variant, channel, by_channel[channel], "builtin")
                       for variant, by_channel in STUCK_VARIANTS.items() if channel in by_channel]  # fmt: skip
            continue
        best: dict[str, NudgeTemplateSpec] = {}
        for t in level:
            if t.variant not in best or t.version > best[t.variant].version:
                best[t.variant] = t
        chosen += [
            Wording(t.variant, t.channel, Template(t.subject, t.body, t.html), "manifest", t.persona, t.locale,
                    t.version)
            for t in sorted(best.values(), key=lambda t: t.variant)
        ]  # fmt: skip
    return chosen
