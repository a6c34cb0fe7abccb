"""A SAML identity provider whose signing key the test holds, and Keycloak's broker flow driven by hand.

The customer-IdP helper (``tests/support/customer_idp.py``) lets a second Keycloak realm answer, which
only ever produces well-formed, correctly signed responses. To show what the tenant realm *refuses*,
the test must write the responses itself: this module

- makes an RSA key and a self-signed certificate (:func:`signing_key`) and the IdP metadata naming it
  (:meth:`SamlIdp.metadata_xml`), which goes into the tenant manifest's ``sso.saml.metadata_xml``; the
  SSO URL is a loopback address that nothing listens on (the browser never goes there: the test
  reads the AuthnRequest out of Keycloak's auto-submit form instead);
- starts an authorization-code request (PKCE S256) at the tenant realm with ``kc_idp_hint`` and
  reads the AuthnRequest Keycloak sends to the IdP (:func:`start_login`);
- builds a Response for it (:func:`build_response`), signs its assertion and/or the response itself
  with signxml (:func:`sign`), and posts it to the ACS with the RelayState (:func:`post_response`);
- rearranges signed responses into the XML Signature Wrapping shapes of Somorovsky et al., "On Breaking
  SAML: Be Whoever You Want to Be" (USENIX Security 2012), XSW1-XSW8 (:func:`xsw1` …).

Keycloak's cookies live in the ``httpx.Client`` the caller passes, one per simulated browser.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import lxml.html
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from lxml import etree
from signxml.algorithms import SignatureConstructionMethod
from signxml.signer import XMLSigner

SAMLP = "urn:oasis:names:tc:SAML:2.0:protocol"
SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
MD = "urn:oasis:names:tc:SAML:2.0:metadata"
DS = "http://www.w3.org/2000/09/xmldsig#"
XS = "http://www.w3.org/2001/XMLSchema"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
POST_BINDING = "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST"
PERSISTENT = "urn:oasis:names:tc:SAML:2.0:nameid-format:persistent"
SUCCESS = "urn:oasis:names:tc:SAML:2.0:status:Success"
BEARER = "urn:oasis:names:tc:SAML:2.0:cm:bearer"
PASSWORD_PROTECTED = "urn:oasis:names:tc:SAML:2.0:ac:classes:PasswordProtectedTransport"
EXC_C14N = "http://www.w3.org/2001/10/xml-exc-c14n#"


def _q(ns: str, tag: str) -> str:
    return f"{{{ns}}}{tag}"


def _instant(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the IdP's key and metadata -------------------------------------------------------------


@dataclass(frozen=True)
class SigningKey:
    """An RSA key and its self-signed certificate (PEM), as an IdP signs with."""

    key_pem: bytes
    cert_pem: bytes

    @property
    def cert_base64(self) -> str:
        """The certificate's DER in base64, the form metadata and KeyInfo carry."""
        der = x509.load_pem_x509_certificate(self.cert_pem).public_bytes(serialization.Encoding.DER)
        return base64.b64encode(der).decode()


def signing_key(common_name: str) -> SigningKey:
    """A fresh 2048-bit RSA key with a one-day self-signed certificate for ``common_name``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return SigningKey(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        cert.public_bytes(serialization.Encoding.PEM),
    )


@dataclass(frozen=True)
class SamlIdp:
    """The customer's IdP as the tenant's manifest describes it; the test holds its signing key."""

    entity_id: str
    sso_url: str
    key: SigningKey

    def metadata_xml(self) -> str:
        """An EntityDescriptor with one IDPSSODescriptor: the signing certificate and a POST SSO service."""
        root = etree.Element(_q(MD, "EntityDescriptor"), nsmap={"md": MD, "ds": DS}, entityID=self.entity_id)
        idp = etree.SubElement(
            root,
            _q(MD, "IDPSSODescriptor"),
            WantAuthnRequestsSigned="true",
            protocolSupportEnumeration=SAMLP,
        )
        descriptor = etree.SubElement(idp, _q(MD, "KeyDescriptor"), use="signing")
        data = etree.SubElement(etree.SubElement(descriptor, _q(DS, "KeyInfo")), _q(DS, "X509Data"))
        etree.SubElement(data, _q(DS, "X509Certificate")).text = self.key.cert_base64
        etree.SubElement(idp, _q(MD, "NameIDFormat")).text = PERSISTENT
        etree.SubElement(idp, _q(MD, "SingleSignOnService"), Binding=POST_BINDING, Location=self.sso_url)
        document: str = etree.tostring(root, encoding="unicode")
        return document


def make_idp(entity_id: str | None = None) -> SamlIdp:
    """A test IdP with a fresh key; its SSO URL is a loopback port nothing listens on (discard, 9)."""
    entity = entity_id or f"https://idp-{secrets.token_hex(4)}.customer.test/saml"
    return SamlIdp(entity, "http://127.0.0.1:9/saml/sso", signing_key(urlsplit(entity).hostname or "idp"))


# -- the broker flow ---------------------------------------------------------------------------


def browser() -> httpx.Client:
    """An HTTP client with a cookie jar of its own: one simulated browser.

    Keycloak marks its login cookies ``Secure``; browsers send them to ``http://127.0.0.1`` (a secure
    context), Python's cookie jar does not, and every broker step would fail with ``cookie_not_found``.
    Each response's cookies are therefore kept without the flag (the client only talks to loopback).
    """
    client = httpx.Client(timeout=10)

    def keep_for_loopback(response: httpx.Response) -> None:
        for cookie in client.cookies.jar:
            cookie.secure = False

    client.event_hooks["response"] = [keep_for_loopback]
    return client


@dataclass(frozen=True)
class AuthnRequest:
    """What Keycloak's AuthnRequest says, and how to answer it."""

    id: str
    issuer: str  # the SP entity id Keycloak uses for this broker (the audience it accepts)
    acs_url: str  # AssertionConsumerServiceURL: where the Response goes (its Destination and Recipient)
    relay_state: str
    destination: str  # the IdP's SSO URL the form would post to


@dataclass(frozen=True)
class Login:
    """An authorization request of the admin client, started with PKCE."""

    state: str
    verifier: str
    redirect_uri: str


def start_login(
    http: httpx.Client, base: str, realm: str, client_id: str, redirect_uri: str
) -> tuple[Login, AuthnRequest]:
    """Start the admin client's authorization-code flow towards ``customer-idp``; read the AuthnRequest.

    Keycloak redirects the browser to the broker, which answers with an HTML form that posts the
    AuthnRequest to the IdP (POST binding); nothing is posted there.
    """
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    login = Login(secrets.token_urlsafe(16), verifier, redirect_uri)
    query = {
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "response_type": "code",
        "scope": "openid",
        "state": login.state,
        "nonce": secrets.token_urlsafe(16),
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "kc_idp_hint": "customer-idp",
    }
    page = http.get(f"{base}/realms/{realm}/protocol/openid-connect/auth?{urlencode(query)}", follow_redirects=True)
    assert page.status_code == 200, f"no AuthnRequest form: HTTP {page.status_code} {page.text[:300]}"
    form = lxml.html.fromstring(page.text).forms[0]
    fields = dict(form.fields)
    document = etree.fromstring(base64.b64decode(fields["SAMLRequest"]))
    assert document.tag == _q(SAMLP, "AuthnRequest"), document.tag
    issuer = document.findtext(_q(SAML, "Issuer"))
    assert issuer, "AuthnRequest without an Issuer"
    return login, AuthnRequest(
        id=str(document.get("ID")),
        issuer=issuer,
        acs_url=str(document.get("AssertionConsumerServiceURL")),
        relay_state=str(fields.get("RelayState") or ""),
        destination=str(form.action),
    )


def encode(response: etree._Element) -> str:
    """The Response as the POST binding carries it (base64 of the XML)."""
    return base64.b64encode(etree.tostring(response)).decode()


def post_response(http: httpx.Client, request: AuthnRequest, response: etree._Element | str) -> httpx.Response:
    """Post ``response`` (an element, or already base64) with the RelayState to the ACS; no redirects followed."""
    body = response if isinstance(response, str) else encode(response)
    return http.post(
        request.acs_url, data={"SAMLResponse": body, "RelayState": request.relay_state}, follow_redirects=False
    )


def code_of(location: str, login: Login) -> str | None:
    """The authorization code in a redirect to the client's redirect URI, or None."""
    if not location.startswith(login.redirect_uri):
        return None
    params = parse_qs(urlsplit(location).query)
    assert params.get("state") == [login.state], "state changed on the way"
    codes = params.get("code")
    return codes[0] if codes else None


# -- responses ------------------------------------------------------------------------------


@dataclass
class Subject:
    """Who the assertion says logged in, with the attributes the manifest maps."""

    name_id: str = field(default_factory=lambda: f"u-{secrets.token_hex(6)}")
    email: str = field(default_factory=lambda: f"user-{secrets.token_hex(4)}@customer.test")
    name: str = "Ada Lovelace"
    groups: tuple[str, ...] = ("Admins",)


def build_response(
    idp: SamlIdp,
    request: AuthnRequest,
    subject: Subject,
    *,
    now: datetime | None = None,
    lifetime: timedelta = timedelta(minutes=5),
    destination: str | None = None,
    recipient: str | None = None,
    audience: str | None = None,
    conditions_not_on_or_after: datetime | None = None,
    confirmation_not_on_or_after: datetime | None = None,
    in_response_to: str | None = None,
) -> etree._Element:
    """An unsigned SAML Response with one assertion answering ``request``, correct unless overridden.

    Destination and Recipient default to the ACS URL, Audience to the SP entity id (the request's
    Issuer), both NotOnOrAfter to ``now + lifetime``.
    """
    at = now or datetime.now(UTC)
    until = at + lifetime
    answered = in_response_to if in_response_to is not None else request.id
    response = etree.Element(
        _q(SAMLP, "Response"),
        nsmap={"samlp": SAMLP, "saml": SAML},
        ID=f"_r{uuid.uuid4().hex}",
        Version="2.0",
        IssueInstant=_instant(at),
        Destination=destination if destination is not None else request.acs_url,
        InResponseTo=answered,
    )
    etree.SubElement(response, _q(SAML, "Issuer")).text = idp.entity_id
    status = etree.SubElement(response, _q(SAMLP, "Status"))
    etree.SubElement(status, _q(SAMLP, "StatusCode"), Value=SUCCESS)
    response.append(
        build_assertion(
            idp,
            request,
            subject,
            at=at,
            recipient=recipient,
            audience=audience,
            conditions_until=conditions_not_on_or_after or until,
            confirmation_until=confirmation_not_on_or_after or until,
            in_response_to=answered,
        )
    )
    return response


def build_assertion(
    idp: SamlIdp,
    request: AuthnRequest,
    subject: Subject,
    *,
    at: datetime,
    recipient: str | None,
    audience: str | None,
    conditions_until: datetime,
    confirmation_until: datetime,
    in_response_to: str,
) -> etree._Element:
    """The assertion of :func:`build_response` (Issuer, Subject, Conditions, AuthnStatement, attributes)."""
    assertion = etree.Element(
        _q(SAML, "Assertion"),
        nsmap={"saml": SAML, "xs": XS, "xsi": XSI},
        ID=f"_a{uuid.uuid4().hex}",
        Version="2.0",
        IssueInstant=_instant(at),
    )
    etree.SubElement(assertion, _q(SAML, "Issuer")).text = idp.entity_id
    who = etree.SubElement(assertion, _q(SAML, "Subject"))
    etree.SubElement(who, _q(SAML, "NameID"), Format=PERSISTENT).text = subject.name_id
    confirmation = etree.SubElement(who, _q(SAML, "SubjectConfirmation"), Method=BEARER)
    etree.SubElement(
        confirmation,
        _q(SAML, "SubjectConfirmationData"),
        InResponseTo=in_response_to,
        NotOnOrAfter=_instant(confirmation_until),
        Recipient=recipient if recipient is not None else request.acs_url,
    )
    conditions = etree.SubElement(
        assertion,
        _q(SAML, "Conditions"),
        NotBefore=_instant(at - timedelta(seconds=30)),
        NotOnOrAfter=_instant(conditions_until),
    )
    restriction = etree.SubElement(conditions, _q(SAML, "AudienceRestriction"))
    etree.SubElement(restriction, _q(SAML, "Audience")).text = audience if audience is not None else request.issuer
    authn = etree.SubElement(
        assertion,
        _q(SAML, "AuthnStatement"),
        AuthnInstant=_instant(at),
        SessionIndex=f"_s{uuid.uuid4().hex}",
    )
    etree.SubElement(
        etree.SubElement(authn, _q(SAML, "AuthnContext")), _q(SAML, "AuthnContextClassRef")
    ).text = PASSWORD_PROTECTED
    attributes = etree.SubElement(assertion, _q(SAML, "AttributeStatement"))
    for name, values in (("email", (subject.email,)), ("name", (subject.name,)), ("groups", subject.groups)):
        attribute = etree.SubElement(attributes, _q(SAML, "Attribute"), Name=name)
        for value in values:
            element = etree.SubElement(attribute, _q(SAML, "AttributeValue"))
            element.set(_q(XSI, "type"), "xs:string")
            element.text = value
    return assertion


def assertion_of(response: etree._Element) -> etree._Element:
    """The Response's (first, direct) Assertion."""
    found = response.find(_q(SAML, "Assertion"))
    assert found is not None, "response without an assertion"
    return found


def sign(element: etree._Element, key: SigningKey) -> etree._Element:
    """``element`` signed in place (enveloped, RSA-SHA256, exclusive C14N), the Signature after its Issuer.

    The signed copy signxml returns replaces ``element`` in its parent; the signed element is returned.
    """
    parent = element.getparent()
    standalone = copy.deepcopy(element)
    issuer = standalone.find(_q(SAML, "Issuer"))
    placeholder = etree.Element(_q(DS, "Signature"), nsmap={"ds": DS}, Id="placeholder")
    if issuer is not None:
        issuer.addnext(placeholder)
    else:
        standalone.insert(0, placeholder)
    signer = XMLSigner(
        method=SignatureConstructionMethod.enveloped,
        signature_algorithm="rsa-sha256",
        digest_algorithm="sha256",
        c14n_algorithm=EXC_C14N,
    )
    signed: etree._Element = signer.sign(
        standalone,
        key=key.key_pem,
        cert=key.cert_pem.decode(),
        reference_uri=str(element.get("ID")),
        id_attribute="ID",
    )
    if parent is not None:
        parent.replace(element, signed)
    return signed


def signature_of(element: etree._Element) -> etree._Element:
    """The element's own (enveloped) ds:Signature."""
    found = element.find(_q(DS, "Signature"))
    assert found is not None, f"{element.tag} is not signed"
    return found


# -- XML Signature Wrapping (Somorovsky et al. 2012) ----------------------------------------------


def evil_copy(assertion: etree._Element, evil: Subject) -> etree._Element:
    """A copy of ``assertion`` naming ``evil`` instead, under a new ID and without a signature."""
    forged = copy.deepcopy(assertion)
    for signature in forged.findall(_q(DS, "Signature")):
        forged.remove(signature)
    forged.set("ID", f"_evil{uuid.uuid4().hex}")
    name_id = forged.find(f"{_q(SAML, 'Subject')}/{_q(SAML, 'NameID')}")
    assert name_id is not None
    name_id.text = evil.name_id
    for attribute in forged.iter(_q(SAML, "Attribute")):
        values = {"email": (evil.email,), "name": (evil.name,), "groups": evil.groups}.get(str(attribute.get("Name")))
        if values is None:
            continue
        for old in list(attribute):
            attribute.remove(old)
        for value in values:
            element = etree.SubElement(attribute, _q(SAML, "AttributeValue"))
            element.set(_q(XSI, "type"), "xs:string")
            element.text = value
    return forged


def _without_signature(element: etree._Element) -> etree._Element:
    stripped = copy.deepcopy(element)
    for signature in stripped.findall(_q(DS, "Signature")):
        stripped.remove(signature)
    return stripped


def _evil_response(signed_response: etree._Element, evil: Subject) -> etree._Element:
    """A new Response (new ID) whose assertion names ``evil``; other children copied from the original."""
    forged = copy.deepcopy(signed_response)
    for signature in forged.findall(_q(DS, "Signature")):
        forged.remove(signature)
    forged.set("ID", f"_evil{uuid.uuid4().hex}")
    original = assertion_of(forged)
    forged.replace(original, evil_copy(original, evil))
    return forged


def xsw1(signed_response: etree._Element, evil: Subject) -> etree._Element:
    """XSW1: a new evil Response carries the original Response's signature, the original Response
    (signature removed) nested *inside* that Signature element; the reference still finds it by ID."""
    signature = copy.deepcopy(signature_of(signed_response))
    forged = _evil_response(signed_response, evil)
    signature.append(_without_signature(signed_response))
    issuer = forged.find(_q(SAML, "Issuer"))
    assert issuer is not None
    issuer.addnext(signature)
    return forged


def xsw2(signed_response: etree._Element, evil: Subject) -> etree._Element:
    """XSW2: like XSW1, but the original Response sits next to the (now detached) Signature, before it."""
    signature = copy.deepcopy(signature_of(signed_response))
    forged = _evil_response(signed_response, evil)
    issuer = forged.find(_q(SAML, "Issuer"))
    assert issuer is not None
    issuer.addnext(signature)
    signature.addprevious(_without_signature(signed_response))
    return forged


def xsw3(response: etree._Element, evil: Subject) -> etree._Element:
    """XSW3: an unsigned evil assertion inserted *before* the signed one, as a sibling."""
    forged = copy.deepcopy(response)
    signed = assertion_of(forged)
    signed.addprevious(evil_copy(signed, evil))
    return forged


def xsw4(response: etree._Element, evil: Subject) -> etree._Element:
    """XSW4: the evil assertion takes the signed one's place and holds the signed assertion as a child."""
    forged = copy.deepcopy(response)
    signed = assertion_of(forged)
    wrapper = evil_copy(signed, evil)
    forged.replace(signed, wrapper)
    wrapper.append(signed)
    return forged


def xsw7(response: etree._Element, evil: Subject) -> etree._Element:
    """XSW7: the signed assertion moved into a samlp:Extensions element, the evil one in its place."""
    forged = copy.deepcopy(response)
    signed = assertion_of(forged)
    forged.replace(signed, evil_copy(signed, evil))
    extensions = etree.Element(_q(SAMLP, "Extensions"))
    extensions.append(signed)
    issuer = forged.find(_q(SAML, "Issuer"))
    assert issuer is not None
    issuer.addnext(extensions)
    return forged


def xsw8(response: etree._Element, evil: Subject) -> etree._Element:
    """XSW8: the evil assertion carries the original Signature, inside which a ds:Object holds the
    original assertion without its signature (so the enveloped-signature transform finds nothing to cut)."""
    forged = copy.deepcopy(response)
    signed = assertion_of(forged)
    signature = copy.deepcopy(signature_of(signed))
    wrapper = evil_copy(signed, evil)
    issuer = wrapper.find(_q(SAML, "Issuer"))
    assert issuer is not None
    issuer.addnext(signature)
    holder = etree.SubElement(signature, _q(DS, "Object"))
    holder.append(_without_signature(signed))
    forged.replace(signed, wrapper)
    return forged


def _parent_id(element: etree._Element) -> str | None:
    parent = element.getparent()
    return None if parent is None else str(parent.get("ID"))


def describe(response: etree._Element) -> dict[str, Any]:
    """A short description for failure messages: ids and where the signatures sit."""
    return {
        "id": response.get("ID"),
        "assertions": [a.get("ID") for a in response.iter(_q(SAML, "Assertion"))],
        "signatures": [_parent_id(s) for s in response.iter(_q(DS, "Signature"))],
    }
