"""Nudge templates: Jinja2 in its sandbox, strict about unknown variables, with no I/O.

A template is text with ``{{ user.first_name }}``, ``{{ step.title }}``, ``{{ link }}``… and the
usual filters and conditionals. It renders in Jinja2's :class:`~jinja2.sandbox.SandboxedEnvironment`
(no attribute access to Python internals, no imports, no file system), with ``StrictUndefined``:
a variable that the context does not provide is an error, never an empty string in a message a
user reads. E-mail HTML bodies are autoescaped; subjects, text bodies, SMS and push are not (they
are not HTML). :func:`check` parses without rendering (for ``tenants plan``); :func:`render` renders.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateError, TemplateSyntaxError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

MAX_TEMPLATE = 20_000
"""Characters of one template's source."""
MAX_OUTPUT = 100_000
"""Characters of one rendered template."""

_TEXT = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
_HTML = SandboxedEnvironment(undefined=StrictUndefined, autoescape=True, keep_trailing_newline=True)


class TemplateProblemError(ValueError):
    """A template that does not parse or does not render; ``line`` is 1-based within the template."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message if line is None else f"{message} (template line {line})")
        self.reason = message
        self.line = line


@dataclass(frozen=True, slots=True)
class Rendered:
    text: str
    html: bool


def _environment(html: bool) -> SandboxedEnvironment:
    return _HTML if html else _TEXT


@lru_cache(maxsize=2048)
def _compiled(source: str, html: bool) -> Template:
    """``source`` compiled once: compiling costs about 100 times a render, and a tenant has a few templates."""
    if len(source) > MAX_TEMPLATE:
        raise TemplateProblemError(f"a template has at most {MAX_TEMPLATE:,} characters")
    try:
        return _environment(html).from_string(source)
    except TemplateSyntaxError as exc:
        raise TemplateProblemError(exc.message or "syntax error", exc.lineno) from exc


def check(source: str, *, html: bool = False) -> None:
    """Parse ``source``; :class:`TemplateProblemError` with the line of the first syntax error."""
    _compiled(source, html)


def render(source: str, context: Mapping[str, Any], *, html: bool = False) -> Rendered:
    """Render ``source`` with ``context``; :class:`TemplateProblemError` on any error (unknown variable, unsafe
    access, syntax, output too long)."""
    compiled = _compiled(source, html)
    try:
        text = compiled.render(dict(context))
    except SecurityError as exc:
        raise TemplateProblemError(f"not allowed in a template: {exc}") from exc
    except TemplateError as exc:
        raise TemplateProblemError(str(exc.message if hasattr(exc, "message") and exc.message else exc)) from exc
    if len(text) > MAX_OUTPUT:
        raise TemplateProblemError(f"the rendered message exceeds {MAX_OUTPUT:,} characters")
    return Rendered(text, html)
