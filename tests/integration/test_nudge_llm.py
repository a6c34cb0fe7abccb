"""The nudge personaliser through the official ``openai`` client against a Chat Completions stand-in.

The stand-in (``tests/support/openai_standin.py``) speaks OpenAI's documented API on 127.0.0.1 and
records every request, so these tests check what would reach an LLM server (never the signed link,
never personal data, nothing at all when the PII detector fails) and that every way the server or
its answer can go wrong gives the static message back with its reason.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from firstmile.nudges.personalise import AllowedContext, Personalised, Personaliser, StaticMessage
from firstmile.security.pii import DetectorConfig, NationalIdPattern, PiiDetector, Redactor
from tests.support.openai_standin import PATH, ChatStandIn

KEY = "sk-test-key"
MODEL = "nudge-writer-1"
TOKEN = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKiss-_Q"
LINK = f"https://app.firstmile.test/v1/nudges/l/{TOKEN}"
CONTEXT = AllowedContext("Invite a teammate", "Getting started", "Acme", LINK, "developer")
EMAIL = StaticMessage(
    "Your next step: Invite a teammate",
    f"You're one step away in Getting started: Invite a teammate.\n\nContinue: {LINK}\n",
)
SMS = StaticMessage(None, f"Acme: next up, Invite a teammate. {LINK} Reply STOP to opt out.")
GOOD = {
    "subject": "Almost there: Invite a teammate",
    "body": "You're so close! Finishing Getting started only needs one more step: Invite a teammate.\n\n"
    "Continue: {link}",
}


@pytest.fixture
def standin() -> Iterator[ChatStandIn]:
    with ChatStandIn(api_key=KEY) as server:
        yield server


@pytest.fixture
async def personaliser(standin: ChatStandIn) -> AsyncIterator[Personaliser]:
    made = Personaliser(standin.base_url, MODEL, timeout_s=0.5, api_key=KEY)
    yield made
    await made.aclose()


def count(path: str, reason: str, channel: str = "email") -> float:
    labels = {"channel": channel, "path": path, "reason": reason}
    return REGISTRY.get_sample_value("firstmile_nudge_personalisation_total", labels) or 0.0


def assert_static(result: Personalised, static: StaticMessage, reason: str) -> None:
    assert (result.path, result.reason) == ("static", reason), result
    assert (result.subject, result.body) == (static.subject, static.body)


async def test_a_good_answer_takes_the_llm_path(standin: ChatStandIn, personaliser: Personaliser) -> None:
    before = count("llm", "")
    standin.reply_json(GOOD)
    result = await personaliser.personalise(EMAIL, "email", "en", CONTEXT)
    assert (result.path, result.reason, result.model) == ("llm", None, MODEL)
    assert result.subject == GOOD["subject"]
    assert result.body == GOOD["body"].replace("{link}", LINK)
    assert result.record() == {"path": "llm", "reason": None, "model": MODEL}
    assert count("llm", "") == before + 1

    [request] = standin.completions()
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["x-stainless-retry-count"] == "0"
    body = request.json()
    assert body["model"] == MODEL
    assert body["response_format"] == {"type": "json_object"}
    assert 64 < body["max_tokens"] <= 1500
    system, user = body["messages"]
    assert system["role"] == "system" and "Write in English" in system["content"]
    assert user["role"] == "user"
    sent = json.loads(user["content"])
    assert sent["original"]["body"] == EMAIL.body.replace(LINK, "{link}")
    assert sent["context"]["tenant"] == "Acme"
    # the signed link is a credential for its send: it never reaches the LLM server
    assert TOKEN not in standin.bodies() and "nudges/l/" not in standin.bodies()


async def test_an_sms_keeps_its_stop_sentence_and_its_link(standin: ChatStandIn, personaliser: Personaliser) -> None:
    standin.reply_json({"body": "Acme: Invite a teammate is next. {link} Reply STOP to opt out."})
    result = await personaliser.personalise(SMS, "sms", "en-US", CONTEXT)
    assert result.path == "llm" and result.body.count(LINK) == 1
    assert json.loads(standin.completions()[0].json()["messages"][1]["content"])["keep_exactly"] == [
        "Reply STOP to opt out."
    ]


def _with(body: str) -> Callable[[ChatStandIn], None]:
    return lambda s: s.reply_json({**GOOD, "body": body})


FAILURES: dict[str, tuple[Callable[[ChatStandIn], None], str]] = {
    "timeout": (lambda s: s.reply_json(GOOD, delay_s=30), "timeout"),
    "500": (lambda s: s.server_error(500), "provider-error"),
    "503": (lambda s: s.server_error(503), "provider-error"),
    "malformed json": (lambda s: s.malformed(), "malformed-response"),
    "no choices": (lambda s: s.respond(200, {"Content-Type": "application/json"}, {"id": "x", "choices": []}),
                   "malformed-response"),
    "empty content": (lambda s: s.reply(""), "malformed-response"),
    "content not json": (lambda s: s.reply("Almost there! Continue: {link}"), "check:format"),
    "cut at max_tokens": (lambda s: s.reply_json(GOOD, finish_reason="length"), "check:length"),
    "content filter": (lambda s: s.reply_json(GOOD, finish_reason="content_filter"), "refused"),
    "invented url": (_with("Almost there! See https://acme.example/tips, then Continue: {link}"), "check:url"),
    "invented number": (_with("Almost there! 87% of teams finish today. Continue: {link}"), "check:number"),
    "invented e-mail": (_with("Almost there! Ask support@acme.example. Continue: {link}"), "check:email"),
    "invented phone": (_with("Almost there! Call +44 20 7183 8750. Continue: {link}"), "check:phone"),
    "invented name": (_with("Almost there, Sarah! Invite a teammate. Continue: {link}"), "check:name"),
    "too long": (_with("You're so close! Invite a teammate in Getting started. " * 6 + "Continue: {link}"),
                 "check:length"),
    "wrong language": (_with("Vous y êtes presque ! Il ne vous reste qu'une étape dans Getting started. {link}"),
                       "check:language"),
    "broken link": (_with("Almost there! Invite a teammate in Getting started. Continue: {lnk}"), "check:link"),
    "link dropped": (_with("Almost there! Invite a teammate in Getting started, one step away."), "check:link"),
    "placeholder": (_with("Almost there, [NAME]! Invite a teammate. Continue: {link}"), "check:placeholder"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(FAILURES), ids=list(FAILURES))
async def test_every_failure_falls_back_to_the_static_template(
    case: str, standin: ChatStandIn, personaliser: Personaliser
) -> None:
    script, reason = FAILURES[case]
    script(standin)
    before = count("static", reason)
    result = await personaliser.personalise(EMAIL, "email", "en", CONTEXT)
    assert_static(result, EMAIL, reason)
    assert result.model == MODEL
    assert count("static", reason) == before + 1
    assert len(standin.completions()) == 1  # asked once: the client does not retry


async def test_a_wrong_key_is_a_provider_error(standin: ChatStandIn) -> None:
    personaliser = Personaliser(standin.base_url, MODEL, timeout_s=0.5, api_key="sk-wrong")
    try:
        result = await personaliser.personalise(EMAIL, "email", "en", CONTEXT)
    finally:
        await personaliser.aclose()
    assert_static(result, EMAIL, "provider-error")
    assert result.detail == "http 401"


async def test_an_unreachable_server_is_a_provider_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    personaliser = Personaliser(f"http://127.0.0.1:{port}/v1", MODEL, timeout_s=0.5, api_key=KEY)
    try:
        result = await personaliser.personalise(EMAIL, "email", "en", CONTEXT)
    finally:
        await personaliser.aclose()
    assert_static(result, EMAIL, "provider-error")


async def test_without_a_key_a_placeholder_token_is_sent() -> None:
    with ChatStandIn(api_key=None) as server:
        server.reply_json(GOOD)
        personaliser = Personaliser(server.base_url, MODEL, timeout_s=0.5)
        try:
            result = await personaliser.personalise(EMAIL, "email", "en", CONTEXT)
        finally:
            await personaliser.aclose()
    assert result.path == "llm"
    assert server.completions()[0].headers["authorization"] == "Bearer none"


PII_EMAIL = "ada.lovelace@example.test"
PII_PHONE = "+1 415 555 2671"


async def test_personal_data_in_the_static_text_or_context_never_reaches_the_server(
    standin: ChatStandIn, personaliser: Personaliser
) -> None:
    # a tenant put a contact in a step title (and so in the rendered body), a persona holds an address
    title = f"Ask {PII_EMAIL} or call {PII_PHONE} for access"
    static = StaticMessage(
        f"Your next step: {title}", f"You're one step away in Getting started: {title}.\n\nContinue: {LINK}\n"
    )
    context = AllowedContext(
        title, "Getting started", "Acme", LINK, persona=f"admin {PII_EMAIL}",
        extra=(f"Questions: +44 20 7183 8750 or {PII_EMAIL}",),
    )  # fmt: skip
    standin.reply_json(
        {
            "subject": "Almost there: ask for access",
            "body": "You're one step away in Getting started: ask for access.\n\nContinue: {link}",
        }
    )
    result = await personaliser.personalise(static, "email", "en", context)

    [request] = standin.completions()  # the call was made, on the redacted prompt
    sent = standin.bodies()
    for secret in (PII_EMAIL, "lovelace", PII_PHONE, "555 2671", "5552671", "7183 8750", TOKEN):
        assert secret not in sent
    prompt = json.loads(request.json()["messages"][1]["content"])
    assert prompt["context"]["step"] == "Ask [EMAIL] or call [PHONE] for access"
    assert prompt["context"]["persona"] == "admin [EMAIL]"
    assert "[EMAIL]" in prompt["original"]["subject"] and "[PHONE]" in prompt["original"]["body"]
    assert (result.path, result.reason) == ("llm", None)  # a rewrite without the placeholders may be used


async def test_a_placeholder_echoed_back_is_refused(standin: ChatStandIn, personaliser: Personaliser) -> None:
    context = AllowedContext(f"Write to {PII_EMAIL}", "Getting started", "Acme", LINK)
    static = StaticMessage("Next: write to us", f"Next: Write to {PII_EMAIL}.\nContinue: {LINK}")
    standin.reply_json({"subject": "Next: write to us", "body": "Next: Write to [EMAIL] soon.\nContinue: {link}"})
    result = await personaliser.personalise(static, "email", "en", context)
    assert_static(result, static, "check:placeholder")
    assert PII_EMAIL not in standin.bodies()


def _broken_detector() -> Redactor:
    def explode(_: str) -> bool:
        raise RuntimeError("the detector broke")

    pattern = NationalIdPattern.from_regex("always", r"\w+", validate=explode, needs_digit=False)
    return Redactor(PiiDetector(DetectorConfig(national_ids=(pattern,))))


async def test_a_detector_failure_blocks_the_call(standin: ChatStandIn) -> None:
    standin.reply_json(GOOD)
    blocked_before = REGISTRY.get_sample_value("firstmile_pii_guardrail_blocked_total", {"site": "guard"}) or 0.0
    personaliser = Personaliser(standin.base_url, MODEL, timeout_s=0.5, api_key=KEY, redactor=_broken_detector())
    try:
        result = await personaliser.personalise(EMAIL, "email", "en", CONTEXT)
    finally:
        await personaliser.aclose()
    assert_static(result, EMAIL, "pii-guardrail")
    assert result.model is None and result.detail == "RuntimeError"
    assert standin.requests == []  # nothing was sent
    blocked = REGISTRY.get_sample_value("firstmile_pii_guardrail_blocked_total", {"site": "guard"}) or 0.0
    assert blocked == blocked_before + 1


async def test_the_same_call_goes_through_with_a_working_detector(standin: ChatStandIn) -> None:
    """The twin of the test above: the redactor argument is what blocked it, not the set-up."""
    standin.reply_json(GOOD)
    personaliser = Personaliser(standin.base_url, MODEL, timeout_s=0.5, api_key=KEY, redactor=Redactor())
    try:
        result = await personaliser.personalise(EMAIL, "email", "en", CONTEXT)
    finally:
        await personaliser.aclose()
    assert result.path == "llm" and len(standin.requests) == 1


async def test_off_sends_nothing(standin: ChatStandIn) -> None:
    result = await Personaliser("", "").personalise(EMAIL, "email", "en", CONTEXT)
    assert_static(result, EMAIL, "off")
    assert standin.requests == []


def test_the_standin_refuses_what_the_api_refuses(standin: ChatStandIn) -> None:
    import httpx

    def post(body: Any, key: str = KEY) -> httpx.Response:
        return httpx.post(standin.url + PATH, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=5)

    assert post({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}, key="sk-other").status_code == 401
    assert post({"messages": [{"role": "user", "content": "x"}]}).status_code == 400
    assert post({"model": MODEL, "messages": []}).status_code == 400
    hello = [{"role": "user", "content": "hi"}]
    assert post({"model": MODEL, "messages": hello, "response_format": {"type": "json_object"}}).status_code == 400
    assert post({"model": MODEL, "messages": hello}).status_code == 500  # nothing scripted
