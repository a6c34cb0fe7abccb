"""Optional LLM personalisation of a nudge's rendered content; the static template is always the fallback.

:class:`Personaliser` asks an OpenAI-compatible Chat Completions server (the official ``openai``
client, :class:`openai.AsyncOpenAI`) to rewrite a message that the templates already rendered, and
uses the rewrite only when every check below passes. Anything else (off, a locale it cannot check,
the PII guardrail, a timeout, a provider error, an answer that fails a check) gives back the static
message unchanged, with the reason. The design rule: personalisation may make a nudge read better,
never make it wrong, late, or a leak.

1. **The prompt** is built from the static subject and body and the allowed context only (step
   title, path name, tenant name, persona, extra strings): never the user's traits. The signed link
   is a credential for its send, so it never leaves the process either: the prompt carries the
   marker ``{link}`` in its place, and the real link is put back into the answer. The payload then
   goes through the PII guardrail (:func:`firstmile.security.pii.aguard`): findings are replaced by
   typed placeholders (``[EMAIL]``, ``[PHONE]`` …) and a detector failure blocks the call.
2. **The call**: ``chat.completions.create`` with the configured model, JSON mode, ``max_tokens``
   bounded from the length limits, the configured timeout on every phase of the request and the
   same timeout on the whole call, and ``max_retries=0``: a retry would double the wait of a
   message whose static text is already good, and the delivery loop has its own retries.
3. **The checks** (:func:`check_output`) compare the answer with the *corpus*: the static subject
   and body and the allowed context, as given (before redaction). See :data:`REASONS` for what each
   failure is called, and docs/nudges.md ("LLM personalisation") for the rules and their limits.

Nothing here writes to the database: the caller records :meth:`Personalised.record` with the send
(the decision entry), and every result counts in ``firstmile_nudge_personalisation_total``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import openai
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam
from prometheus_client import Counter

from firstmile.security.pii import (
    DetectorConfig,
    GuardrailBlockedError,
    PiiDetector,
    PiiKind,
    Redactor,
    aguard,
    default_redactor,
)

__all__ = [
    "LINK_MARKER",
    "REASONS",
    "SUPPORTED_LANGUAGES",
    "AllowedContext",
    "Personalised",
    "Personaliser",
    "StaticMessage",
    "check_output",
    "language_of",
    "language_ok",
    "length_limits",
]

log = logging.getLogger("firstmile.nudges.personalise")

PERSONALISATIONS = Counter(
    "firstmile_nudge_personalisation_total",
    "Nudge contents by channel and the path taken (llm or static), with the reason when static.",
    ["channel", "path", "reason"],
)

LINK_MARKER: Final = "{link}"
"""What the prompt carries instead of the signed link; the answer must carry it where the static text has the link."""

NO_KEY: Final = "none"
"""The bearer token sent when no API key is configured (a local server that needs none)."""

REASONS: Final[Mapping[str, str]] = {
    "off": "no base URL configured: personalisation is off",
    "locale": "the locale's language is not one the language check knows: no call",
    "pii-guardrail": "the PII detector failed on the prompt: the call was blocked",
    "timeout": "no answer within the timeout",
    "provider-error": "the server answered an error status, or could not be reached",
    "malformed-response": "the answer is not a chat completion (not JSON, no choice, no content)",
    "refused": "the model refused, or its content filter stopped it",
    "check:format": "the content is not the JSON object asked for (`body`, and `subject` when the static has one)",
    "check:placeholder": "a redaction placeholder such as [EMAIL] is in the answer",
    "check:link": "the {link} marker is missing, changed, repeated or misplaced",
    "check:required": "a sentence that must be kept verbatim (an SMS's STOP sentence) is missing",
    "check:length": "a part is too long or too short for the channel, or the model ran out of tokens",
    "check:markup": "HTML or Markdown in the answer",
    "check:url": "a URL or domain name that is not in the corpus",
    "check:email": "an e-mail address that is not in the corpus",
    "check:phone": "a phone number that is not in the corpus",
    "check:number": "a number (digits, or a number word of the locale) that is not in the corpus",
    "check:name": "a capitalised, name-like word that is not in the corpus",
    "check:charset": "an SMS answer leaves the GSM-7 alphabet that the static SMS fits",
    "check:language": "the answer is not in the locale's language",
    "error": "an unexpected error in the personaliser itself",
}
"""Every reason a result can be static for (the ``reason`` label's values)."""

BODY_CAPS: Final[Mapping[str, int]] = {"sms": 320, "push": 178}
"""Characters of a body by channel (two SMS segments; what a lock screen shows of a push)."""
SUBJECT_CAP: Final = 120
"""Characters of a subject or push title."""
MAX_BODY: Final = 4000
BODY_MARGIN: Final = 80
SUBJECT_MARGIN: Final = 40


@dataclass(frozen=True, slots=True)
class StaticMessage:
    """What the templates rendered: the subject (``None`` for SMS) and the text body."""

    subject: str | None
    body: str


@dataclass(frozen=True, slots=True)
class AllowedContext:
    """The strings a message may mention besides its static text; nothing else may be named in it.

    ``link`` is the signed click link the static body carries (empty when links are off);
    ``keep`` are sentences the answer must keep verbatim (for an SMS the static body's sentence with
    the word STOP is added on its own); ``extra`` are further allowed strings (a step description).
    """

    step_title: str = ""
    path_name: str = ""
    tenant_name: str = ""
    link: str = ""
    persona: str = ""
    extra: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()

    def strings(self) -> tuple[str, ...]:
        named = (self.step_title, self.path_name, self.tenant_name, self.link, self.persona)
        return tuple(s for s in (*named, *self.extra, *self.keep) if s)


@dataclass(frozen=True, slots=True)
class Personalised:
    """The content to send and how it was chosen.

    ``path`` is ``llm`` (the checked rewrite) or ``static`` (the message as given); ``reason`` is
    one of :data:`REASONS` when static; ``model`` is the model asked, ``None`` when no call was made;
    ``detail`` says a little more without quoting any text (an HTTP status, an error type).
    """

    subject: str | None
    body: str
    path: Literal["llm", "static"]
    reason: str | None = None
    model: str | None = None
    detail: str | None = None

    def record(self) -> dict[str, str | None]:
        """What to keep with the send (its decision entry): the path, the reason, the model."""
        return {"path": self.path, "reason": self.reason, "model": self.model}


# --------------------------------------------------------------------------- languages


@dataclass(frozen=True, slots=True)
class _Language:
    name: str
    function_words: frozenset[str]
    number_words: frozenset[str]
    openers: frozenset[str] = frozenset()


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_LANGUAGES: dict[str, _Language] = {
    "en": _Language(
        "English",
        _words(
            "the and you your yours you're you'll you've it's let's don't can't won't that's there's here's we're "
            "we'll i is are was were it its this that these those with for from just now next up where when what "
            "which who how why we our us have has had be been will would can could should there here of to about "
            "only still more away left off back into than then they their them my me an a at on by or if so all "
            "any get got do does done not no yet again almost already"
        ),
        _words(
            "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
            "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand "
            "million billion dozen twice"
        ),
        _words(
            "hi hello hey great good nice well quick ready remember finish continue resume return keep pick take "
            "complete start need want thanks thank welcome please time add check come discover explore follow give "
            "go head jump learn look make see set share stay try unlock use wrap open almost only one"
        ),
    ),
    "de": _Language(
        "German",
        _words(
            "der die das den dem des und ist sind war du dein deine deinen deinem deiner sie ihr ihre ihren ihrem "
            "mit für auf noch nur jetzt nächste nächsten nächster ein eine einen einem einer zu zum zur von vom im "
            "ins nicht auch wir uns unser unsere hier dort weiter wo wie was dass es bei nach schon fast oder aber "
            "wenn dann kannst kann wird werden hast hat haben ich mir dich dir bitte geht los mehr sich ab bis "
            "über um"
        ),
        _words(
            "null zwei drei vier fünf sechs sieben acht neun zehn elf zwölf zwanzig dreißig hundert tausend "
            "million dutzend zweimal"
        ),
        _words("hallo hi willkommen danke"),
    ),
    "fr": _Language(
        "French",
        _words(
            "le la les l et est sont vous votre vos tu ton ta tes te de du des d un une pour avec sur dans pas plus "
            "il elle ils on nous notre nos ce cet cette ces c qui que qu où encore déjà à au aux en être avez as y "
            "ne n se s j je mais ou si très ici là prochaine prochain bientôt presque juste seulement par"
        ),
        _words(
            "zéro deux trois quatre cinq six sept huit neuf dix onze douze vingt trente quarante cinquante cent "
            "mille million douzaine"
        ),
        _words("bonjour salut bienvenue merci"),
    ),
    "es": _Language(
        "Spanish",
        _words(
            "el la los las lo y es está estás tu tus tú te su sus usted de del un una unos unas para con en por que "
            "qué ya solo sólo más aquí donde dónde cuando siguiente tienes puedes nuestro nuestra muy al se no sí "
            "pero o como cómo este esta estos hay falta casi"
        ),
        _words(
            "cero dos tres cuatro cinco seis siete ocho nueve diez once doce veinte treinta cuarenta cincuenta cien "
            "ciento mil millón docena"
        ),
        _words("hola bienvenido bienvenida gracias"),
    ),
    "it": _Language(
        "Italian",
        _words(
            "il lo la i gli le l e è di del della dei delle che per con un una uno tuo tua tuoi tue hai sei non più "
            "ancora già qui dove quando questo questa al alla nel nella solo ti ci ma o se come anche quasi "
            "prossimo prossima tu da dal dalla su sul"
        ),
        _words(
            "zero due tre quattro cinque sette otto nove dieci undici dodici venti trenta quaranta cinquanta cento "
            "mille milione dozzina"
        ),
        _words("ciao salve benvenuto benvenuta grazie"),
    ),
    "nl": _Language(
        "Dutch",
        _words(
            "de het een en is zijn je jouw jij jou u uw van voor met op in naar nog al nu hier waar wat dat die dit "
            "deze niet ook te om bij we wij ons onze volgende stap klaar bijna maar of als dan kun kunt kan wordt "
            "heb hebt heeft er even meer alleen door tot zo"
        ),
        _words(
            "nul twee drie vier vijf zes zeven acht negen tien elf twaalf twintig dertig veertig vijftig honderd "
            "duizend miljoen dozijn"
        ),
        _words("hallo hoi welkom bedankt dank"),
    ),
    "pt": _Language(
        "Portuguese",
        _words(
            "o a os as e é está estás você vocês seu sua seus suas teu tua de do da dos das um uma para com em no "
            "na nos nas por que já só mais aqui onde quando próximo próxima passo falta ainda não te ao à mas ou se "
            "como muito este esta isso isto quase pelo pela tem pode"
        ),
        _words(
            "zero dois duas três quatro cinco seis sete oito nove dez onze doze vinte trinta quarenta cinquenta cem "
            "cento mil milhão dúzia"
        ),
        _words("olá oi bem-vindo bem-vinda obrigado obrigada"),
    ),
}

SUPPORTED_LANGUAGES: Final = frozenset(_LANGUAGES)
"""The languages the language check knows (ISO 639-1); a locale of another language is not personalised."""

# Function words of one language only: the evidence the language check counts.
_EXCLUSIVE: dict[str, frozenset[str]] = {
    code: language.function_words.difference(
        *(other.function_words for other_code, other in _LANGUAGES.items() if other_code != code)
    )
    for code, language in _LANGUAGES.items()
}
_MIN_WORDS_FOR_EVIDENCE: Final = 6
_MIN_SCRIPT_SHARE: Final = 0.9


def language_of(locale: str) -> str | None:
    """The supported ISO 639-1 language of a locale (``en``, ``en-GB``, ``pt_BR``), or ``None``."""
    code = locale.replace("_", "-").split("-", 1)[0].strip().lower()
    return code if code in _LANGUAGES else None


# --------------------------------------------------------------------------- tokens

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
_TYPOGRAPHY = str.maketrans(
    {"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-", "\u00a0": " "}
)
_URL = re.compile(r"(?:https?://|www\.)[^\s<>\"'`]+", re.IGNORECASE)
_DOMAIN = re.compile(
    r"(?<![\w@.-])(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,24}(?![\w@-])(?:/[^\s<>\"'`]*)?", re.IGNORECASE
)
_URL_TAIL = ".,;:!?)]}'\"\u00bb\u201d\u2019"
_NUMBER = re.compile(r"\d+(?:[.,:/]\d+)*")
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")
_SENTENCE_END = frozenset(".!?…:;\n")
_PLACEHOLDER = re.compile(
    r"\[\s*(?:" + "|".join(sorted(kind.name for kind in PiiKind)) + r"|REDACTION FAILED)\s*\]", re.IGNORECASE
)
_MARKUP = re.compile(r"<\s*/?\s*[a-z][^>]*>|\]\(|\*\*|```", re.IGNORECASE)
_SENTENCES = re.compile(r"(?<=[.!?])\s+|\n")
_STOP = re.compile(r"\bSTOP\b")
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)
_OUTPUT_DETECTOR = PiiDetector(DetectorConfig(kinds=frozenset({PiiKind.EMAIL, PiiKind.PHONE})))

# GSM 03.38: the default alphabet and its extension table (an SMS outside it is sent as UCS-2, 70 characters a part).
_GSM7 = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿"
    "abcdefghijklmnopqrstuvwxyzäöñüà" + "\f^{}\\[~]|€"
)


@dataclass(slots=True)
class _Tokens:
    urls: set[str] = field(default_factory=set)
    emails: set[str] = field(default_factory=set)
    phones: set[str] = field(default_factory=set)
    numbers: set[str] = field(default_factory=set)
    words: list[tuple[str, bool]] = field(default_factory=list)
    """Each word and whether it starts a sentence."""

    def merge(self, other: _Tokens) -> None:
        self.urls |= other.urls
        self.emails |= other.emails
        self.phones |= other.phones
        self.numbers |= other.numbers
        self.words += other.words


def _blank(text: str, start: int, end: int) -> str:
    return text[:start] + " " * (end - start) + text[end:]


def _digits(text: str) -> str:
    return "".join(str(unicodedata.digit(c)) for c in text if c.isdigit())


def _starts_sentence(text: str, position: int) -> bool:
    """Whether the word at ``position`` opens a sentence: only spaces, quotes, brackets, bullets or
    symbols stand between it and the start of the text or a sentence's end (``. ! ? … : ;`` or a line)."""
    index = position - 1
    while index >= 0:
        char = text[index]
        if char in _SENTENCE_END:
            return True
        if char.isalnum() or char == ",":
            return False
        index -= 1
    return True


def _tokenise(text: str) -> _Tokens:
    """URLs, e-mail addresses, phone numbers, numbers and words of ``text``, each kind blanked out before the next."""
    tokens = _Tokens()
    text = text.translate(_APOSTROPHES)
    for match in list(_URL.finditer(text)):
        tokens.urls.add(match.group().rstrip(_URL_TAIL))
        text = _blank(text, match.start(), match.end())
    for finding in _OUTPUT_DETECTOR.detect(text):
        if finding.kind is PiiKind.EMAIL:
            tokens.emails.add(text[finding.start : finding.end].casefold())
        else:
            tokens.phones.add(_digits(text[finding.start : finding.end]))
        text = _blank(text, finding.start, finding.end)
    for match in list(_DOMAIN.finditer(text)):
        tokens.urls.add(match.group().rstrip(_URL_TAIL))
        text = _blank(text, match.start(), match.end())
    for match in list(_NUMBER.finditer(text)):
        tokens.numbers.add(match.group())
        text = _blank(text, match.start(), match.end())
    tokens.words = [(m.group(), _starts_sentence(text, m.start())) for m in _WORD.finditer(text)]
    return tokens


@dataclass(frozen=True, slots=True)
class _Corpus:
    urls: frozenset[str]
    emails: frozenset[str]
    phones: frozenset[str]
    numbers: frozenset[str]
    words: frozenset[str]
    """Casefolded words, and the pieces of words with an apostrophe."""

    @classmethod
    def of(cls, texts: Iterable[str]) -> _Corpus:
        tokens = _Tokens()
        for text in texts:
            tokens.merge(_tokenise(text))
        words: set[str] = set()
        for word, _ in tokens.words:
            folded = word.casefold()
            words.add(folded)
            words.update(folded.split("'"))
        return cls(
            frozenset(tokens.urls), frozenset(tokens.emails), frozenset(tokens.phones), frozenset(tokens.numbers),
            frozenset(words),
        )  # fmt: skip

    def has_stem(self, word: str, more: frozenset[str] = frozenset()) -> bool:
        """A corpus word (or one of ``more``) shares the first five letters with ``word`` (finish / finishing)."""
        return len(word) >= 5 and any(len(w) >= 5 and w[:5] == word[:5] for w in (*self.words, *more))


def _name_ok(word: str, sentence_start: bool, corpus: _Corpus, language: _Language) -> bool:
    folded = word.casefold()
    if folded in corpus.words or folded in language.function_words:
        return True
    if sentence_start and (folded in language.openers or corpus.has_stem(folded, language.openers)):
        return True
    if "'" in folded:  # check the pieces: "Sarah's" is "Sarah", "L'Étape" is "L" (a sentence's start) and "Étape"
        pieces = word.split("'")
        return all(
            not any(c.isupper() for c in piece) or _name_ok(piece, sentence_start and i == 0, corpus, language)
            for i, piece in enumerate(pieces)
        )
    return False


def language_ok(text: str, code: str) -> bool:
    """Whether ``text`` reads as the language ``code`` (see docs/nudges.md for the rule)."""
    letters = [c for c in text if c.isalpha()]
    if letters:
        latin = sum(1 for c in letters if unicodedata.name(c, "").startswith("LATIN"))
        if latin / len(letters) < _MIN_SCRIPT_SHARE:
            return False
    tokens = _tokenise(text).words
    words: list[str] = []
    for word, _ in tokens:
        folded = word.casefold()
        words.append(folded)
        if "'" in folded:
            words.extend(piece for piece in folded.split("'") if piece)
    hits = {lang: sum(1 for w in words if w in exclusive) for lang, exclusive in _EXCLUSIVE.items()}
    own = hits[code]
    if any(count > own for lang, count in hits.items() if lang != code):
        return False
    return not (own == 0 and len(tokens) >= _MIN_WORDS_FOR_EVIDENCE)


def length_limits(channel: str, static: StaticMessage) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((body min, body max), (subject min, subject max))`` in characters, the link counted at its length."""
    body_max = min(BODY_CAPS.get(channel, MAX_BODY), 2 * len(static.body) + BODY_MARGIN)
    body_min = max(1, len(static.body) // 3)
    subject_len = len(static.subject or "")
    subject_max = min(SUBJECT_CAP, 2 * subject_len + SUBJECT_MARGIN)
    return (body_min, body_max), (1, subject_max)


def _keep(channel: str, static: StaticMessage, context: AllowedContext) -> tuple[str, ...]:
    """The sentences the answer's body must hold verbatim: ``context.keep`` (those the static body has) and,
    for an SMS, each sentence of the static body with the word STOP, from after the link if it holds one."""
    keep = [k for k in context.keep if k and k in static.body]
    if channel == "sms":
        body = static.body.replace(context.link, LINK_MARKER) if context.link else static.body
        for sentence in _SENTENCES.split(body):
            tail = sentence.rsplit(LINK_MARKER, 1)[-1].strip()
            if _STOP.search(tail):
                keep.append(tail)
    return tuple(dict.fromkeys(keep))


# --------------------------------------------------------------------------- checks


class _RefusedError(Exception):
    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def _parse(content: str, static: StaticMessage) -> tuple[str | None, str]:
    text = content.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        value = json.loads(text)
    except ValueError:
        raise _RefusedError("check:format", "not JSON") from None
    if not isinstance(value, dict):
        raise _RefusedError("check:format", "not an object")
    if set(value) - {"body", "subject"} or "body" not in value:
        raise _RefusedError("check:format", "keys")
    body, subject = value["body"], value.get("subject")
    if not isinstance(body, str):
        raise _RefusedError("check:format", "body")
    if static.subject is None:
        if subject not in (None, ""):
            raise _RefusedError("check:format", "a subject the message has none of")
        return None, body
    if not isinstance(subject, str):
        raise _RefusedError("check:format", "subject")
    return subject, body


def check_output(
    content: str,
    static: StaticMessage,
    channel: str,
    locale: str,
    context: AllowedContext,
) -> tuple[str | None, str]:
    """The checked ``(subject, body)`` of a model's answer, the link put back; :class:`ValueError` whose
    ``args[0]`` is the reason (one of :data:`REASONS`) when it must not be used.

    ``content`` is the message content the model returned (a JSON object), written with the
    :data:`LINK_MARKER` where the link goes.
    """
    try:
        return _check(content, static, channel, locale, context)
    except _RefusedError as refused:
        raise ValueError(refused.reason, refused.detail) from None


def _check(
    content: str, static: StaticMessage, channel: str, locale: str, context: AllowedContext
) -> tuple[str | None, str]:
    code = language_of(locale)
    if code is None:
        raise _RefusedError("locale")
    language = _LANGUAGES[code]
    subject, body = _parse(content, static)
    if channel == "sms":
        body = body.translate(_TYPOGRAPHY).replace("\u2026", "...")
    subject = subject.strip() if subject is not None else None
    body = body.strip()
    parts = [(static.body, body)] + ([(static.subject, subject)] if static.subject is not None and subject else [])
    corpus_texts = [static.body, static.subject or "", *context.strings()]
    corpus = _Corpus.of(corpus_texts)
    answer = " \n".join(p for _, p in parts)

    # redaction placeholders: the model saw them only because the prompt held personal data
    if any(_PLACEHOLDER.search(p) for _, p in parts) and not any(_PLACEHOLDER.search(t) for t in corpus_texts):
        raise _RefusedError("check:placeholder")
    # the link: exactly where and as often as the static text has it
    link = context.link
    for static_part, part in parts:
        want = static_part.count(link) if link else 0
        if part.count(LINK_MARKER) != want:
            raise _RefusedError("check:link")
    if link:
        parts = [(s, p.replace(LINK_MARKER, link)) for s, p in parts]
        body = parts[0][1]
        subject = parts[1][1] if len(parts) > 1 else subject
        answer = " \n".join(p for _, p in parts)
    for sentence in _keep(channel, static, context):
        if sentence not in body:
            raise _RefusedError("check:required")
    (body_min, body_max), (subject_min, subject_max) = length_limits(channel, static)
    if not body_min <= len(body) <= body_max:
        raise _RefusedError("check:length", f"body {len(body)} not in {body_min}..{body_max}")
    if static.subject is not None and (subject is None or not subject_min <= len(subject) <= subject_max):
        raise _RefusedError("check:length", f"subject not in {subject_min}..{subject_max}")
    if _MARKUP.search(answer) and not any(_MARKUP.search(t) for t in corpus_texts):
        raise _RefusedError("check:markup")
    if not language_ok(answer, code):
        raise _RefusedError("check:language")

    tokens = _tokenise(answer)
    if tokens.urls - corpus.urls:
        raise _RefusedError("check:url")
    if tokens.emails - corpus.emails:
        raise _RefusedError("check:email")
    if tokens.phones - corpus.phones:
        raise _RefusedError("check:phone")
    if tokens.numbers - corpus.numbers:
        raise _RefusedError("check:number")
    folded_words = {w.casefold() for w, _ in tokens.words}
    if (folded_words & language.number_words) - corpus.words:
        raise _RefusedError("check:number", "a number word")
    for word, sentence_start in tokens.words:
        if any(c.isupper() for c in word) and not _name_ok(word, sentence_start, corpus, language):
            raise _RefusedError("check:name", "a capitalised word")
    if channel == "sms" and set(static.body) <= _GSM7 and not set(body) <= _GSM7:
        raise _RefusedError("check:charset")
    return subject, body


# --------------------------------------------------------------------------- the prompt

_SYSTEM = """You rewrite one short onboarding reminder (a "nudge") so that it reads naturally and a little more \
personally for its reader, with the same meaning.
Write in {language}. Reply with a JSON object only: {shape}.
Rules:
- Use only what the input says: add no name, number, link, web address, e-mail address or phone number that is not \
in it.
- Where the original has {marker}, write {marker} exactly, as often as the original does, and nowhere else.
- Text in square brackets such as [EMAIL] stands for removed data: leave it out, and write no square brackets.
- Keep every sentence listed under "keep_exactly" word for word.
- Plain text: no HTML, no Markdown.
- At most {body_max} characters in the body ({marker} counts as {link_length}){subject_rule}."""


def _messages(
    safe: Mapping[str, Any], language: str, static: StaticMessage, channel: str, link: str
) -> list[ChatCompletionMessageParam]:
    (_, body_max), (_, subject_max) = length_limits(channel, static)
    shape = '{"subject": "...", "body": "..."}' if static.subject is not None else '{"body": "..."}'
    subject_rule = f", at most {subject_max} in the subject" if static.subject is not None else ""
    system = _SYSTEM.format(
        language=language, shape=shape, marker=LINK_MARKER, body_max=body_max,
        link_length=len(link) if link else 0, subject_rule=subject_rule,
    )  # fmt: skip
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": json.dumps(safe, ensure_ascii=False)},
    ]


def _payload(static: StaticMessage, channel: str, context: AllowedContext) -> dict[str, Any]:
    """What the model is told, the link replaced by its marker (not yet redacted)."""
    link = context.link

    def hide(text: str) -> str:
        return text.replace(link, LINK_MARKER) if link else text

    original: dict[str, str] = {"body": hide(static.body)}
    if static.subject is not None:
        original = {"subject": hide(static.subject), **original}
    allowed = {
        "step": context.step_title, "path": context.path_name, "tenant": context.tenant_name,
        "persona": context.persona, "also": [hide(s) for s in context.extra],
    }  # fmt: skip
    return {
        "channel": channel,
        "original": original,
        "context": {k: hide(v) if isinstance(v, str) else v for k, v in allowed.items() if v},
        "keep_exactly": [hide(s) for s in _keep(channel, static, context)],
    }


# --------------------------------------------------------------------------- the personaliser


class Personaliser:
    """Rewrites a rendered nudge with an LLM when that is safe, else gives the static one back (never raises).

    ``base_url`` is the API root of an OpenAI-compatible server (``https://api.openai.com/v1``, a vLLM
    or Ollama ``…/v1``); empty means off: every call returns the static message with reason ``off``
    and no client is made. ``timeout_s`` bounds each phase of the request and the whole call.
    ``api_key`` is sent as the bearer token (:data:`NO_KEY` when ``None``). ``redactor`` is the PII
    guardrail's (the process default when ``None``); ``client`` replaces the ``openai`` client (tests).
    Close it with :meth:`aclose`.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        timeout_s: float = 2.0,
        api_key: str | None = None,
        *,
        temperature: float | None = None,
        json_mode: bool = True,
        redactor: Redactor | None = None,
        client: openai.AsyncOpenAI | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.base_url = base_url.strip()
        self.model = model
        self.timeout_s = timeout_s
        self.temperature = temperature
        self.json_mode = json_mode
        self.redactor = redactor
        if self.base_url and not model:
            raise ValueError("a model is required when personalisation is on (base URL set)")
        self._client = client
        if self._client is None and self.base_url:
            self._client = openai.AsyncOpenAI(
                base_url=self.base_url, api_key=api_key or NO_KEY, timeout=timeout_s, max_retries=0
            )  # fmt: skip

    @property
    def enabled(self) -> bool:
        return bool(self.base_url)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def personalise(
        self, message: StaticMessage, channel: str, locale: str, context: AllowedContext
    ) -> Personalised:
        """The content to send for ``message`` on ``channel`` in ``locale``; see the module docstring."""
        try:
            result = await self._personalise(message, channel, locale, context)
        except Exception as exc:  # the design rule: anything unexpected falls back too
            result = self._static(message, "error", self.model, type(exc).__name__)
        PERSONALISATIONS.labels(channel, result.path, result.reason or "").inc()
        if result.path == "static" and result.reason != "off":
            log.info(
                "nudge personalisation fell back to the static template",
                extra={"fields": {"channel": channel, "reason": result.reason, "detail": result.detail,
                                  "model": result.model}},
            )  # fmt: skip
        return result

    @staticmethod
    def _static(message: StaticMessage, reason: str, model: str | None, detail: str | None = None) -> Personalised:
        return Personalised(message.subject, message.body, "static", reason, model, detail)

    async def _personalise(
        self, message: StaticMessage, channel: str, locale: str, context: AllowedContext
    ) -> Personalised:
        client = self._client
        if client is None or not self.enabled:
            return self._static(message, "off", None)
        code = language_of(locale)
        if code is None:
            return self._static(message, "locale", None, locale[:16])
        (_, body_max), (_, subject_max) = length_limits(channel, message)
        max_tokens = (body_max + (subject_max if message.subject is not None else 0)) // 3 + 64

        async def call(safe: dict[str, Any]) -> ChatCompletion:
            messages = _messages(safe, _LANGUAGES[code].name, message, channel, context.link)
            async with asyncio.timeout(self.timeout_s):
                return await client.chat.completions.create(
                    model=self.model, messages=messages, max_tokens=max_tokens,
                    temperature=self.temperature if self.temperature is not None else openai.omit,
                    response_format={"type": "json_object"} if self.json_mode else openai.omit,
                )  # fmt: skip

        try:
            completion = await aguard(
                _payload(message, channel, context), call, redactor=self.redactor or default_redactor()
            )
        except GuardrailBlockedError as exc:
            return self._static(message, "pii-guardrail", None, exc.error_type)
        except (TimeoutError, openai.APITimeoutError):
            return self._static(message, "timeout", self.model)
        except openai.APIStatusError as exc:
            return self._static(message, "provider-error", self.model, f"http {exc.status_code}")
        except openai.APIConnectionError:
            return self._static(message, "provider-error", self.model, "connection")
        except ValueError as exc:  # the body was not JSON
            return self._static(message, "malformed-response", self.model, type(exc).__name__)
        except openai.OpenAIError as exc:
            return self._static(message, "provider-error", self.model, type(exc).__name__)

        try:
            choice = completion.choices[0]
            finish_reason = choice.finish_reason
            refusal = getattr(choice.message, "refusal", None)
            content = choice.message.content
        except (AttributeError, IndexError, TypeError):
            return self._static(message, "malformed-response", self.model, "no choice")
        if refusal or finish_reason == "content_filter":
            return self._static(message, "refused", self.model, finish_reason)
        if finish_reason == "length":
            return self._static(message, "check:length", self.model, "max_tokens reached")
        if not isinstance(content, str) or not content.strip():
            return self._static(message, "malformed-response", self.model, "no content")
        try:
            subject, body = check_output(content, message, channel, locale, context)
        except ValueError as exc:
            reason = str(exc.args[0])
            detail = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], str) else None
            return self._static(message, reason, self.model, detail)
        return Personalised(subject, body, "llm", None, self.model)
