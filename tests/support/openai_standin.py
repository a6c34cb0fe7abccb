"""A stand-in for OpenAI's Chat Completions API, over real HTTP on 127.0.0.1.

The nudge personaliser (``firstmile.nudges.personalise``) talks to any OpenAI-compatible server with
the official ``openai`` client; its tests drive that client against this stand-in, which records every
request (method, path, headers, body) so a test can assert on exactly what would have left the
process. It is built on :class:`tests.support.saas_standins.StandIn` (one ``http.server`` in a
thread, on an ephemeral port) and follows OpenAI's API reference ("Chat Completions: Create chat
completion", "Authentication", "Error codes"):

- ``POST /v1/chat/completions`` with ``Authorization: Bearer <api key>`` and a JSON body naming a
  ``model`` and a non-empty list of ``messages`` (each with a ``role`` and a ``content``) is answered
  ``200`` with a ``chat.completion`` object: ``id`` (``chatcmpl-…``), ``object``, ``created``, the
  request's ``model``, ``choices`` (one: ``index`` 0, ``message`` ``{"role": "assistant", "content",
  "refusal": null}``, ``logprobs`` null, ``finish_reason``) and ``usage`` (prompt, completion and
  total tokens), with an ``x-request-id`` header;
- a wrong or missing key is ``401`` with ``{"error": {"message", "type": "invalid_request_error",
  "param": null, "code": "invalid_api_key"}}``;
- a body that is not JSON, or lacks ``model`` or ``messages``, is ``400`` (``invalid_request_error``);
  so is JSON mode (``response_format`` ``{"type": "json_object"}``) when no message contains the word
  "JSON", which the API refuses;
- any other path or method is ``404``.

What the model says is scripted: :meth:`ChatStandIn.reply` queues an answer's content (first in,
first out), optionally after a delay (a slow model) or with another ``finish_reason``;
:meth:`ChatStandIn.server_error` queues a ``500`` in OpenAI's error shape, :meth:`ChatStandIn.malformed`
a ``200`` whose body is not JSON. The base class's ``respond``, ``hang`` and ``drop`` still work and
come first. With nothing scripted the stand-in answers ``500`` saying so, so a test that forgot to
script fails on the path it takes rather than passing on a default.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from tests.support.saas_standins import Answer, Recorded, StandIn, json_answer

PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class _Scripted:
    content: str | None = None
    delay_s: float = 0.0
    finish_reason: str = "stop"
    status: int = 200
    raw: bytes | None = None


def openai_error(status: int, message: str, kind: str, code: str | None = None) -> Answer:
    """An error body as OpenAI's API answers it."""
    return json_answer(status, {"error": {"message": message, "type": kind, "param": None, "code": code}})


class ChatStandIn(StandIn):
    """OpenAI's Chat Completions endpoint for one API key (``None``: any key is accepted)."""

    name = "openai-standin"

    def __init__(self, api_key: str | None = "sk-test-key") -> None:
        super().__init__()
        self.api_key = api_key
        self._script: deque[_Scripted] = deque()
        self._stopping = threading.Event()

    @property
    def base_url(self) -> str:
        """What the ``openai`` client takes as ``base_url`` (the API root, ``…/v1``)."""
        return self.url + "/v1"

    def reply(self, content: str, *, delay_s: float = 0.0, finish_reason: str = "stop") -> None:
        """The next completion's message content (after ``delay_s`` seconds)."""
        with self._lock:
            self._script.append(_Scripted(content, delay_s, finish_reason))

    def reply_json(self, payload: dict[str, Any], **options: Any) -> None:
        """The next completion's content is ``payload`` as JSON (what JSON mode returns)."""
        self.reply(json.dumps(payload), **options)

    def server_error(self, status: int = 500) -> None:
        """The next completion fails with a server error."""
        with self._lock:
            self._script.append(_Scripted(status=status))

    def malformed(self) -> None:
        """The next completion is ``200`` with a body that is not JSON."""
        with self._lock:
            self._script.append(_Scripted(raw=b'{"id": "chatcmpl-1", "choices": [{"message": '))

    def completions(self) -> list[Recorded]:
        """The requests made to the completions endpoint."""
        return [r for r in self.requests if r.path == PATH]

    def bodies(self) -> str:
        """Every recorded request body, decoded, one per line: what a leak test searches."""
        return "\n".join(r.body.decode("utf-8", "replace") for r in self.requests)

    def __exit__(self, *exc: Any) -> None:
        self._stopping.set()  # releases a delayed answer still waiting
        super().__exit__(*exc)

    def answer(self, request: Recorded) -> Answer:
        if request.method != "POST" or request.path != PATH:
            return openai_error(404, f"Invalid URL ({request.method} {request.path})", "invalid_request_error")
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return openai_error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        try:
            body = request.json()
        except ValueError:
            return openai_error(400, "We could not parse the JSON body of your request.", "invalid_request_error")
        if not isinstance(body, dict) or not body.get("model"):
            return openai_error(400, "you must provide a model parameter", "invalid_request_error")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return openai_error(400, "'messages' must contain at least one message", "invalid_request_error")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                return openai_error(
                    400, f"Missing required parameter: 'messages[{i}].content'.", "invalid_request_error"
                )
        response_format = body.get("response_format")
        json_mode = isinstance(response_format, dict) and response_format.get("type") == "json_object"
        if json_mode and not any("json" in str(m.get("content", "")).lower() for m in messages):
            return openai_error(
                400, "'messages' must contain the word 'json' in some form, to use 'response_format' of type "
                "'json_object'.", "invalid_request_error",
            )  # fmt: skip
        with self._lock:
            scripted = self._script.popleft() if self._script else None
        if scripted is None:
            return openai_error(500, "the stand-in has no answer scripted", "server_error")
        if scripted.delay_s:
            self._stopping.wait(scripted.delay_s)
        if scripted.raw is not None:
            return Answer(200, {"Content-Type": "application/json"}, scripted.raw)
        if scripted.status != 200:
            return openai_error(
                scripted.status, "The server had an error while processing your request. Sorry about that!",
                "server_error",
            )  # fmt: skip
        content = scripted.content or ""
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        completion_tokens = len(content.split())
        return json_answer(
            200,
            {
                "id": "chatcmpl-" + secrets.token_hex(12),
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content, "refusal": None},
                        "logprobs": None,
                        "finish_reason": scripted.finish_reason,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
                "system_fingerprint": None,
            },
            {"x-request-id": "req_" + secrets.token_hex(8)},
        )
