"""The checks of the nudge personaliser's output, its prompt payload and its settings: pure, no server.

Every refusal is shown next to an answer that differs from it only in what the rule is about, so a
rule that stopped refusing, or one that refused everything, fails here. The calls through the
``openai`` client against a stand-in server are in ``tests/integration/test_nudge_llm.py``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from firstmile.nudges.personalise import (
    LINK_MARKER,
    REASONS,
    AllowedContext,
    Personaliser,
    StaticMessage,
    check_output,
    language_of,
    language_ok,
    length_limits,
)
from firstmile.nudges.personalise import _keep as keep_sentences
from firstmile.nudges.personalise import _payload as prompt_payload
from firstmile.settings import Settings

TOKEN = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKiss-_Q"
LINK = f"https://app.firstmile.test/v1/nudges/l/{TOKEN}"
CONTEXT = AllowedContext(
    step_title="Invite a teammate",
    path_name="Getting started",
    tenant_name="Acme",
    link=LINK,
    persona="developer",
    extra=("Add a colleague so you can work together in 2 minutes.",),
)
EMAIL = StaticMessage(
    "Your next step: Invite a teammate",
    "You're one step away in Getting started: Invite a teammate.\n\n"
    f"Add a colleague so you can work together in 2 minutes.\n\nContinue: {LINK}\n",
)
SMS = StaticMessage(None, f"Acme: next up, Invite a teammate. {LINK} Reply STOP to opt out.")
PUSH = StaticMessage("Invite a teammate", "Pick up where you left off in Getting started.")
GOOD_EMAIL = {
    "subject": "Almost there: Invite a teammate",
    "body": "You're so close! Finishing Getting started only needs one more step: Invite a teammate, "
    "so a colleague can work with you. It takes 2 minutes.\n\nContinue: {link}",
}
GOOD_SMS = {
    "body": "Acme: your next step is Invite a teammate, so you can work together. {link} Reply STOP to opt out."
}
GOOD_PUSH = {"subject": "Invite a teammate", "body": "Ready to continue? Pick up Getting started where you left off."}


def check(answer: dict[str, Any] | str, static: StaticMessage = EMAIL, channel: str = "email", locale: str = "en",
          context: AllowedContext = CONTEXT) -> tuple[str | None, str]:  # fmt: skip
    return check_output(answer if isinstance(answer, str) else json.dumps(answer), static, channel, locale, context)


def refused(answer: dict[str, Any] | str, **kwargs: Any) -> str:
    with pytest.raises(ValueError) as caught:
        check(answer, **kwargs)
    reason = str(caught.value.args[0])
    assert reason in REASONS
    return reason


def with_body(base: dict[str, Any], body: str) -> dict[str, Any]:
    return {**base, "body": body}


# ---- answers that pass


def test_a_good_email_rewrite_passes_with_the_link_put_back_unchanged() -> None:
    subject, body = check(GOOD_EMAIL)
    assert subject == GOOD_EMAIL["subject"]
    assert body.endswith(f"Continue: {LINK}")
    assert body.count(LINK) == 1 and LINK_MARKER not in body


def test_a_good_sms_and_push_rewrite_pass() -> None:
    subject, body = check(GOOD_SMS, static=SMS, channel="sms")
    assert subject is None and LINK in body and body.endswith("Reply STOP to opt out.")
    assert check(GOOD_PUSH, static=PUSH, channel="push") == (GOOD_PUSH["subject"], GOOD_PUSH["body"])


def test_a_json_answer_in_a_code_fence_is_read() -> None:
    fenced = "```json\n" + json.dumps(GOOD_PUSH) + "\n```"
    assert check(fenced, static=PUSH, channel="push")[1] == GOOD_PUSH["body"]


def test_sms_typography_is_made_plain_before_the_checks() -> None:
    curly = with_body(GOOD_SMS, "Acme: you\u2019re close \u2013 Invite a teammate next. {link} Reply STOP to opt out.")
    assert check(curly, static=SMS, channel="sms")[1].startswith("Acme: you're close - Invite")


def test_names_numbers_and_urls_of_the_corpus_may_be_used() -> None:
    context = AllowedContext("Invite a teammate", "Getting started", "Acme", LINK,
                             extra=("Read https://docs.acme.test/invite first (about 5 minutes).",))  # fmt: skip
    static = StaticMessage("Next: Invite a teammate", f"Invite a teammate in Getting started.\nContinue: {LINK}")
    answer = {
        "subject": "Invite a teammate at Acme",
        "body": "Invite a teammate in Getting started; https://docs.acme.test/invite explains it in 5 minutes.\n"
        "Continue: {link}",
    }
    assert check(answer, static=static, context=context)[1].endswith(LINK)
    invented = with_body(answer, answer["body"].replace("5 minutes", "6 minutes"))
    assert refused(invented, static=static, context=context) == "check:number"


# ---- the refusals, each next to a passing twin


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("You're close! Continue: {link}", "check:format"),  # not JSON
        ('["a", "list"]', "check:format"),
        ({"subject": "x"}, "check:format"),  # no body
        ({**GOOD_EMAIL, "note": "I kept the link"}, "check:format"),  # a key that was not asked for
        ({"body": GOOD_EMAIL["body"]}, "check:format"),  # the subject is missing
        ({**GOOD_EMAIL, "subject": ""}, "check:length"),  # or empty
    ],
)
def test_an_answer_that_is_not_the_json_asked_for_is_refused(answer: dict[str, Any] | str, reason: str) -> None:
    assert refused(answer) == reason


def test_a_subject_for_a_message_without_one_is_refused() -> None:
    assert refused({**GOOD_SMS, "subject": "Hello"}, static=SMS, channel="sms") == "check:format"
    assert check({**GOOD_SMS, "subject": None}, static=SMS, channel="sms")[0] is None


def test_a_redaction_placeholder_in_the_answer_is_refused() -> None:
    assert refused(with_body(GOOD_EMAIL, GOOD_EMAIL["body"] + " Questions? Write to [EMAIL].")) == "check:placeholder"
    assert refused(with_body(GOOD_EMAIL, GOOD_EMAIL["body"] + " Or call [ phone ].")) == "check:placeholder"


@pytest.mark.parametrize(
    "body",
    [
        "You're one step away: Invite a teammate in Getting started.",  # dropped
        "Continue: {link} or later: {link}",  # repeated
        "Continue: {lnk} to Invite a teammate in Getting started.",  # changed marker
        f"Continue: {LINK[:-4]} to Invite a teammate in Getting started.",  # the model wrote a link itself
    ],
)
def test_the_link_must_be_there_exactly_as_often_as_in_the_static_text(body: str) -> None:
    assert refused(with_body(GOOD_EMAIL, body)) == "check:link"


def test_a_link_in_the_subject_is_refused_and_a_glued_one_is_a_foreign_url() -> None:
    assert refused({**GOOD_EMAIL, "subject": "Invite a teammate: {link}"}) == "check:link"
    assert refused(with_body(GOOD_EMAIL, "Continue: {link}abc to Invite a teammate in Getting started.")) == "check:url"


def test_an_sms_must_keep_its_stop_sentence_verbatim() -> None:
    assert keep_sentences("sms", SMS, CONTEXT) == ("Reply STOP to opt out.",)
    dropped = with_body(GOOD_SMS, "Acme: your next step is Invite a teammate, so you can work together. {link}")
    assert refused(dropped, static=SMS, channel="sms") == "check:required"
    changed = with_body(GOOD_SMS, GOOD_SMS["body"].replace("Reply STOP to opt out.", "Text STOP to opt out."))
    assert refused(changed, static=SMS, channel="sms") == "check:required"


def test_caller_sentences_to_keep_are_enforced() -> None:
    context = AllowedContext("Invite a teammate", "Getting started", "Acme", LINK,
                             keep=("You're one step away in Getting started: Invite a teammate.",))  # fmt: skip
    assert refused(GOOD_EMAIL, context=context) == "check:required"
    assert check(with_body(GOOD_EMAIL, "You're one step away in Getting started: Invite a teammate. "
                                       "Continue: {link}"), context=context)  # fmt: skip


def test_length_limits_per_channel() -> None:
    assert length_limits("sms", SMS)[0][1] == 320
    assert length_limits("push", PUSH)[0][1] == 2 * len(PUSH.body) + 80 < 178
    assert length_limits("push", StaticMessage("t", "x" * 200))[0][1] == 178
    assert length_limits("email", EMAIL)[1][1] == min(120, 2 * len(EMAIL.subject or "") + 40)
    long_sms = with_body(GOOD_SMS, "Acme: your next step is Invite a teammate, so you can work together. " * 4
                         + "{link} Reply STOP to opt out.")  # fmt: skip
    assert refused(long_sms, static=SMS, channel="sms") == "check:length"
    assert refused(with_body(GOOD_PUSH, "Pick up Getting started where you left off. " * 4), static=PUSH,
                   channel="push") == "check:length"  # fmt: skip
    assert refused(with_body(GOOD_PUSH, "Go on."), static=PUSH, channel="push") == "check:length"
    assert refused({**GOOD_EMAIL, "subject": "Invite a teammate " * 8}) == "check:length"


def test_markup_is_refused() -> None:
    assert refused(with_body(GOOD_EMAIL, GOOD_EMAIL["body"].replace("Continue", "<b>Continue</b>"))) == "check:markup"
    assert refused(with_body(GOOD_EMAIL, GOOD_EMAIL["body"].replace("so close", "**so close**"))) == "check:markup"


@pytest.mark.parametrize(
    ("addition", "reason"),
    [
        (" See https://acme.example/help too.", "check:url"),
        (" See www.acme.example too.", "check:url"),
        (" See acme.io for help.", "check:url"),
        (" Questions? Mail help@acme.example anytime.", "check:email"),
        (" Questions? Call +1 415 555 2671 anytime.", "check:phone"),
        (" Questions? Call (415) 555-2671 anytime.", "check:phone"),
        (" Over 300 teams did it this week.", "check:number"),
        (" It takes 2.5 minutes.", "check:number"),
        (" Three teammates are waiting for you.", "check:number"),
        (" Sarah is waiting for you.", "check:name"),
        (" Your teammate Sarah is waiting.", "check:name"),
        (" It works great with Slack.", "check:name"),
    ],
)
def test_an_invented_fact_is_refused(addition: str, reason: str) -> None:
    assert check(GOOD_EMAIL)  # the same answer without it passes
    assert refused(with_body(GOOD_EMAIL, GOOD_EMAIL["body"].replace("\n\nContinue", addition + "\n\nContinue"))) == (
        reason
    )


def test_a_greeting_by_an_invented_name_is_refused() -> None:
    assert refused({**GOOD_EMAIL, "subject": "Hi Sarah, invite a teammate"}) == "check:name"
    assert refused(with_body(GOOD_EMAIL, "Sarah, you're one step away. Continue: {link}")) == "check:name"
    assert check(with_body(GOOD_EMAIL, "Hi, you're one step away. Continue: {link}"))


@pytest.mark.parametrize(
    ("body", "locale"),
    [
        ("invite a teammate: c'est la prochaine étape dans Getting started, et vous y êtes presque. {link}", "en"),
        ("invite a teammate: das ist der nächste Schritt in Getting started, du bist fast da. {link}", "en"),
        ("Пригласите коллегу в Getting started, чтобы работать вместе. {link}", "en"),
        ("You're so close: Invite a teammate in Getting started and work together. {link}", "fr"),
    ],
)
def test_an_answer_in_another_language_is_refused(body: str, locale: str) -> None:
    assert refused(with_body(GOOD_EMAIL, body), locale=locale) == "check:language"


def test_the_language_check() -> None:
    assert language_of("en") == language_of("en-GB") == language_of("EN_us") == "en"
    assert language_of("pt-BR") == "pt" and language_of("ja") is None and language_of("") is None
    assert language_ok("You're one step away in Getting started.", "en")
    assert not language_ok("Vous y êtes presque, il ne vous reste qu'une étape.", "en")
    assert language_ok("Vous y êtes presque, il ne vous reste qu'une étape.", "fr")
    assert language_ok("Du bist fast da: nur noch ein Schritt in Getting started.", "de")
    assert not language_ok("Du bist fast da: nur noch ein Schritt in Getting started.", "nl")
    assert language_ok("Acme", "de")  # too short to tell: not refused
    assert not language_ok("Getting started Invite teammate colleague together", "en")  # six words, no evidence


def test_a_german_answer_passes_for_a_german_message() -> None:
    static = StaticMessage("Dein nächster Schritt: Team einladen",
                           f"Du bist nur noch einen Schritt entfernt: Team einladen.\nWeiter: {LINK}")  # fmt: skip
    context = AllowedContext("Team einladen", "Erste Schritte", "Acme", LINK)
    answer = {
        "subject": "Fast geschafft: Team einladen",
        "body": "Nur noch ein Schritt in Erste Schritte: Team einladen, dann bist du fertig.\nWeiter: {link}",
    }
    assert check(answer, static=static, locale="de", context=context)[1].endswith(LINK)


def test_an_sms_that_would_leave_gsm7_is_refused() -> None:
    emoji = with_body(GOOD_SMS, "Acme: you're close \U0001f389 Invite a teammate next. {link} Reply STOP to opt out.")
    assert refused(emoji, static=SMS, channel="sms") == "check:charset"
    assert check(with_body(emoji, emoji["body"].replace(" \U0001f389", "!")), static=SMS, channel="sms")


def test_an_unsupported_locale_is_refused_by_the_check() -> None:
    assert refused(GOOD_EMAIL, locale="ja") == "locale"


# ---- the prompt payload


def test_the_payload_carries_the_marker_never_the_signed_link() -> None:
    payload = prompt_payload(SMS, "sms", CONTEXT)
    text = json.dumps(payload)
    assert TOKEN not in text and "nudges/l/" not in text
    assert payload["original"] == {"body": "Acme: next up, Invite a teammate. {link} Reply STOP to opt out."}
    assert payload["keep_exactly"] == ["Reply STOP to opt out."]
    assert payload["context"] == {
        "step": "Invite a teammate", "path": "Getting started", "tenant": "Acme", "persona": "developer",
        "also": ["Add a colleague so you can work together in 2 minutes."],
    }  # fmt: skip
    email = prompt_payload(EMAIL, "email", CONTEXT)
    assert list(email["original"]) == ["subject", "body"] and TOKEN not in json.dumps(email)


# ---- the personaliser without a server, and its settings


async def test_off_gives_the_static_message_back_without_a_client() -> None:
    personaliser = Personaliser("", "")
    assert not personaliser.enabled and personaliser._client is None
    result = await personaliser.personalise(EMAIL, "email", "en", CONTEXT)
    assert (result.subject, result.body, result.path, result.reason, result.model) == (
        EMAIL.subject, EMAIL.body, "static", "off", None,
    )  # fmt: skip
    assert result.record() == {"path": "static", "reason": "off", "model": None}


async def test_an_unsupported_locale_makes_no_call() -> None:
    personaliser = Personaliser("http://127.0.0.1:9/v1", "m", 0.5)
    try:
        result = await personaliser.personalise(PUSH, "push", "ja-JP", CONTEXT)
    finally:
        await personaliser.aclose()
    assert (result.path, result.reason, result.model, result.body) == ("static", "locale", None, PUSH.body)


def test_the_constructor_refuses_what_cannot_work() -> None:
    with pytest.raises(ValueError, match="model"):
        Personaliser("http://127.0.0.1:9/v1", "")
    with pytest.raises(ValueError, match="timeout"):
        Personaliser("", "", timeout_s=0)


def test_the_settings_are_off_by_default_and_the_key_is_a_secret() -> None:
    nudges = Settings().nudges
    assert nudges.llm_base_url == "" and nudges.llm_model == "" and nudges.llm_timeout_seconds == 2
    assert nudges.llm_api_key is None
    flat: dict[str, Any] = {"nudge_llm_base_url": "https://llm.example/v1", "nudge_llm_model": "small",
                            "nudge_llm_api_key": "sk-secret-value"}  # fmt: skip
    on = Settings(**flat).nudges
    assert on.llm_api_key is not None and on.llm_api_key.get_secret_value() == "sk-secret-value"
    assert "sk-secret-value" not in repr(on)


def test_the_settings_are_read_from_their_flat_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIRSTMILE_NUDGE_LLM_BASE_URL", "http://127.0.0.1:11434/v1")
    monkeypatch.setenv("FIRSTMILE_NUDGE_LLM_MODEL", "llama3.2")
    monkeypatch.setenv("FIRSTMILE_NUDGE_LLM_TIMEOUT_SECONDS", "1.5")
    monkeypatch.setenv("FIRSTMILE_NUDGE_LLM_API_KEY", "sk-from-env")
    nudges = Settings().nudges
    assert (nudges.llm_base_url, nudges.llm_model, nudges.llm_timeout_seconds) == (
        "http://127.0.0.1:11434/v1", "llama3.2", 1.5,
    )  # fmt: skip
    assert nudges.llm_api_key is not None and nudges.llm_api_key.get_secret_value() == "sk-from-env"


@pytest.mark.parametrize(
    "values",
    [
        {"nudge_llm_base_url": "https://llm.example/v1"},  # no model
        {"nudge_llm_base_url": "https://user:pw@llm.example/v1", "nudge_llm_model": "m"},  # credentials in the URL
        {"nudge_llm_base_url": "llm.example/v1", "nudge_llm_model": "m"},
        {"nudge_llm_timeout_seconds": 0},
        {"nudge_llm_timeout_seconds": 31},
    ],
)
def test_settings_that_cannot_work_stop_the_process(values: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Settings(**values)
