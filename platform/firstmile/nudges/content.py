"""The built-in nudge content: template variants per trigger and channel (until the manifest's ``nudges:`` section).

A variant is one wording; with a channel and a send time it makes an arm of the bandit
(``variant|channel|timing``). The templates see ``step`` (``title``, ``description``), ``path``
(``name``), ``tenant`` (``name``) and ``link`` (the tracked link; empty when links are off), never
personal data: a rendered body is stored with the send, and the address is read (decrypted) only
when it goes out.
"""

from __future__ import annotations

from dataclasses import dataclass


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
