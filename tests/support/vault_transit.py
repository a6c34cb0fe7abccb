"""A Vault stand-in: the AppRole login and the Transit endpoints Firstmile uses, over real HTTP.

No Vault server can be installed where the tests run, so this implements, after
Vault's documented request and response formats, exactly what
:class:`firstmile.security.keys.VaultTransitProvider` calls:

- ``POST /v1/auth/<mount>/login`` (``role_id``, ``secret_id``) -> ``{"auth": {"client_token", "lease_duration", …}}``
- ``POST /v1/auth/token/renew-self`` -> ``{"auth": {…}}`` (Vault's default policy allows it)
- ``POST /v1/<mount>/keys/:name`` (create, ``type`` aes256-gcm96; existing key: unchanged, with a warning)
- ``GET  /v1/<mount>/keys/:name`` -> ``latest_version``, ``min_decryption_version``, ``keys`` {version: unix time}
- ``POST /v1/<mount>/keys/:name/rotate``
- ``POST /v1/<mount>/datakey/plaintext/:name`` and ``…/datakey/wrapped/:name`` (``bits`` 128/256/512)
- ``POST /v1/<mount>/encrypt/:name``, ``POST /v1/<mount>/decrypt/:name``, ``POST /v1/<mount>/rewrap/:name``

Ciphertexts are ``vault:v<N>:<base64(nonce | AES-256-GCM ciphertext | tag)>``, made
with real AES-GCM under per-version random keys. Answers are ``{"data": {…}}``;
errors are ``{"errors": […]}`` with Vault's status codes (400 bad request, 403
permission denied, 404 unknown path or key, 503 sealed). Tokens travel in
``X-Vault-Token``, namespaces in ``X-Vault-Namespace``; keys, roles and tokens
live per namespace. Each token carries policies: path globs (a trailing ``*``
and ``+`` segments, as in Vault) with capabilities, checked on every request
(GET -> ``read``, POST -> ``update``), so a missing capability answers 403.

The server runs in a thread on 127.0.0.1 and can be stopped and started again on
the same port (state kept) to simulate an outage, sealed (503) or slowed down.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import secrets
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.support.loopback_http import LoopbackHTTPServer

Policy = dict[str, set[str]]
"""Path glob (relative to /v1/, in the token's namespace) -> capabilities."""

FULL_TRANSIT: Policy = {"transit/*": {"create", "read", "update", "delete", "list"}}

_CIPHERTEXT = re.compile(r"^vault:v(?P<version>[0-9]+):(?P<body>[A-Za-z0-9+/=]+)$")


class _Error(Exception):
    def __init__(self, status: int, *errors: str) -> None:
        super().__init__(status, errors)
        self.status = status
        self.errors = list(errors)


@dataclass
class TransitKey:
    name: str
    versions: dict[int, bytes] = field(default_factory=dict)
    created: dict[int, int] = field(default_factory=dict)
    min_decryption_version: int = 1

    @property
    def latest(self) -> int:
        return max(self.versions)

    def add_version(self) -> int:
        version = (max(self.versions) if self.versions else 0) + 1
        self.versions[version] = AESGCM.generate_key(bit_length=256)
        self.created[version] = int(time.time())
        return version

    def encrypt(self, plaintext: bytes) -> str:
        version = self.latest
        nonce = os.urandom(12)
        sealed = AESGCM(self.versions[version]).encrypt(nonce, plaintext, None)
        return f"vault:v{version}:" + base64.b64encode(nonce + sealed).decode("ascii")

    def decrypt(self, ciphertext: str) -> bytes:
        match = _CIPHERTEXT.match(ciphertext or "")
        if match is None:
            raise _Error(400, "invalid ciphertext: no prefix")
        version = int(match["version"])
        if version not in self.versions:
            raise _Error(400, "invalid key version")
        if version < self.min_decryption_version:
            raise _Error(400, "ciphertext or signature version is disallowed by policy (too old)")
        try:
            raw = base64.b64decode(match["body"], validate=True)
            return AESGCM(self.versions[version]).decrypt(raw[:12], raw[12:], None)
        except (binascii.Error, ValueError, InvalidTag):
            raise _Error(400, "cipher: message authentication failed") from None

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": "aes256-gcm96",
            "derived": False,
            "deletion_allowed": False,
            "exportable": False,
            "allow_plaintext_backup": False,
            "keys": {str(v): t for v, t in sorted(self.created.items())},
            "latest_version": self.latest,
            "min_available_version": 0,
            "min_decryption_version": self.min_decryption_version,
            "min_encryption_version": 0,
            "supports_encryption": True,
            "supports_decryption": True,
            "supports_derivation": True,
            "supports_signing": False,
            "auto_rotate_period": 0,
            "imported_key": False,
        }


@dataclass
class Role:
    role_id: str
    secret_id: str
    policy: Policy
    token_ttl: int
    namespace: str


@dataclass
class Token:
    namespace: str
    policy: Policy
    ttl: int
    expires_at: float


def _glob_match(pattern: str, path: str) -> bool:
    """Vault policy paths: ``+`` is one path segment, a trailing ``*`` is any suffix."""
    prefix = pattern.endswith("*")
    if prefix:
        pattern = pattern[:-1]
    regex = "".join("[^/]+" if part == "+" else re.escape(part) for part in re.split(r"(\+)", pattern))
    return re.match("^" + regex + (".*" if prefix else "") + "$", path) is not None


def allowed(policy: Policy, path: str, capability: str) -> bool:
    """Whether ``policy`` grants ``capability`` on ``path`` (a matching deny always wins)."""
    matched = [caps for pattern, caps in policy.items() if _glob_match(pattern, path)]
    if any("deny" in caps for caps in matched):
        return False
    return any(capability in caps for caps in matched)


class VaultTransitStandIn:
    """The server; use as a context manager or call :meth:`start` / :meth:`stop`."""

    def __init__(self, *, mounts: tuple[str, ...] = ("transit",), approle_mount: str = "approle") -> None:
        self.mounts = mounts
        self.approle_mount = approle_mount
        self.keys: dict[tuple[str, str, str], TransitKey] = {}
        self.roles: dict[tuple[str, str], Role] = {}
        self.tokens: dict[str, Token] = {}
        self.requests: Counter[str] = Counter()
        """Answered requests by ``"<METHOD> <path without /v1/>"`` (transit paths with the key name)."""
        self.operations: Counter[str] = Counter()
        """Answered requests by operation: login, renew, create, read, rotate, datakey, encrypt, decrypt, rewrap."""
        self.sealed = False
        self.latency = 0.0
        self._lock = threading.RLock()
        self._server: LoopbackHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        self._connections: set[socket.socket] = set()

    # -- lifecycle --------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> VaultTransitStandIn:
        if self._server is not None:
            return self
        standin = self

        class Handler(_Handler):
            server_state = standin

        server = LoopbackHTTPServer(("127.0.0.1", self._port), Handler, bind_and_activate=False)
        server.allow_reuse_address = True
        server.server_bind()
        server.server_activate()
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="vault-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every open connection: clients get connection errors."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            for conn in list(self._connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self._connections.clear()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> VaultTransitStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- administration (what an operator would do with a root token) -------

    def add_role(
        self,
        policy: Policy | None = None,
        *,
        namespace: str = "",
        token_ttl: int = 3600,
        role_id: str | None = None,
        secret_id: str | None = None,
    ) -> tuple[str, str]:
        """An AppRole whose tokens carry ``policy``; returns ``(role_id, secret_id)``."""
        role = Role(
            role_id or str(secrets.token_hex(8)),
            secret_id or secrets.token_hex(16),
            dict(policy if policy is not None else FULL_TRANSIT),
            token_ttl,
            namespace,
        )
        with self._lock:
            self.roles[(namespace, role.role_id)] = role
        return role.role_id, role.secret_id

    def revoke_tokens(self) -> None:
        """Invalidate every token (what an expired or revoked token looks like to a client)."""
        with self._lock:
            self.tokens.clear()

    def key(self, name: str, *, mount: str = "transit", namespace: str = "") -> TransitKey:
        return self.keys[(namespace, mount, name)]

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.operations.clear()

    # -- request handling ---------------------------------------------------

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any] | None]:
        if self.latency:
            time.sleep(self.latency)
        try:
            if self.sealed:
                raise _Error(503, "Vault is sealed")
            if not path.startswith("/v1/"):
                raise _Error(404, "unsupported path")
            path = path[len("/v1/") :].strip("/")
            try:
                payload = json.loads(body) if body else {}
            except json.JSONDecodeError:
                raise _Error(400, "failed to parse JSON input") from None
            if not isinstance(payload, dict):
                raise _Error(400, "failed to parse JSON input")
            namespace = headers.get("x-vault-namespace", "").strip("/")
            with self._lock:
                status, answer, op = self._route(method, path, namespace, headers.get("x-vault-token", ""), payload)
                self.requests[f"{method} {path}"] += 1
                self.operations[op] += 1
            return status, answer
        except _Error as exc:
            return exc.status, {"errors": exc.errors}

    def _auth(self, token_id: str, namespace: str, path: str, capability: str) -> Token:
        token = self.tokens.get(token_id)
        if token is None or token.expires_at < time.time() or token.namespace != namespace:
            raise _Error(403, "permission denied")
        if not allowed(token.policy, path, capability):
            raise _Error(403, "1 error occurred:\n\t* permission denied\n\n")
        return token

    def _issue(self, namespace: str, policy: Policy, ttl: int) -> dict[str, Any]:
        token_id = "hvs." + secrets.token_urlsafe(24)
        self.tokens[token_id] = Token(namespace, policy, ttl, time.time() + ttl)
        return self._auth_block(token_id, ttl, policy)

    @staticmethod
    def _auth_block(token_id: str, ttl: int, policy: Policy) -> dict[str, Any]:
        return {
            "auth": {
                "client_token": token_id,
                "accessor": secrets.token_hex(12),
                "policies": ["default", "firstmile"],
                "token_policies": ["default", "firstmile"],
                "metadata": None,
                "lease_duration": ttl,
                "renewable": True,
            },
            "warnings": None,
            "wrap_info": None,
            "data": None,
            "lease_duration": 0,
            "renewable": False,
            "lease_id": "",
        }

    def _route(
        self, method: str, path: str, namespace: str, token_id: str, payload: dict[str, Any]
    ) -> tuple[int, dict[str, Any] | None, str]:
        if method == "POST" and path == f"auth/{self.approle_mount}/login":
            role = self.roles.get((namespace, str(payload.get("role_id", ""))))
            if role is None or not secrets.compare_digest(role.secret_id, str(payload.get("secret_id", ""))):
                raise _Error(400, "invalid role or secret ID")
            return 200, self._issue(namespace, role.policy, role.token_ttl), "login"
        if method == "POST" and path == "auth/token/renew-self":
            token = self.tokens.get(token_id)
            if token is None or token.expires_at < time.time() or token.namespace != namespace:
                raise _Error(403, "permission denied")
            token.expires_at = time.time() + token.ttl
            return 200, self._auth_block(token_id, token.ttl, token.policy), "renew"

        mount = next((m for m in self.mounts if path.startswith(m + "/")), None)
        if mount is None:
            self._auth(token_id, namespace, path, "read" if method == "GET" else "update")
            raise _Error(404, f"no handler for route {path!r}. route entry not found.")
        parts = path[len(mount) + 1 :].split("/")
        capability = "read" if method == "GET" else "update"
        self._auth(token_id, namespace, path, capability)

        def existing(name: str) -> TransitKey:
            found = self.keys.get((namespace, mount, name))
            if found is None:
                raise _Error(400, "encryption key not found")
            return found

        match (method, parts):
            case ("POST", ["keys", name]):
                if str(payload.get("type", "aes256-gcm96")) != "aes256-gcm96":
                    raise _Error(400, "the stand-in supports only aes256-gcm96 keys")
                key = self.keys.get((namespace, mount, name))
                warnings = None
                if key is None:
                    key = self.keys[(namespace, mount, name)] = TransitKey(name)
                    key.add_version()
                else:
                    warnings = [f"key {name} already existed"]
                return 200, {"data": key.info(), "warnings": warnings}, "create"
            case ("GET", ["keys", name]):
                key_or_none = self.keys.get((namespace, mount, name))
                if key_or_none is None:
                    raise _Error(404)
                return 200, {"data": key_or_none.info()}, "read"
            case ("POST", ["keys", name, "rotate"]):
                key = existing(name)
                key.add_version()
                return 200, {"data": key.info()}, "rotate"
            case ("POST", ["datakey", kind, name]) if kind in ("plaintext", "wrapped"):
                bits = int(payload.get("bits") or 256)
                if bits not in (128, 256, 512):
                    raise _Error(400, "invalid bits value")
                key = existing(name)
                data_key = os.urandom(bits // 8)
                data = {"ciphertext": key.encrypt(data_key), "key_version": key.latest}
                if kind == "plaintext":
                    data["plaintext"] = base64.b64encode(data_key).decode("ascii")
                return 200, {"data": data}, "datakey"
            case ("POST", ["encrypt", name]):
                key = existing(name)
                try:
                    plaintext = base64.b64decode(str(payload.get("plaintext", "")), validate=True)
                except (binascii.Error, ValueError):
                    raise _Error(400, "failed to base64-decode plaintext") from None
                return 200, {"data": {"ciphertext": key.encrypt(plaintext), "key_version": key.latest}}, "encrypt"
            case ("POST", ["decrypt", name]):
                plaintext = existing(name).decrypt(str(payload.get("ciphertext", "")))
                return 200, {"data": {"plaintext": base64.b64encode(plaintext).decode("ascii")}}, "decrypt"
            case ("POST", ["rewrap", name]):
                key = existing(name)
                plaintext = key.decrypt(str(payload.get("ciphertext", "")))
                return 200, {"data": {"ciphertext": key.encrypt(plaintext), "key_version": key.latest}}, "rewrap"
        raise _Error(404, f"no handler for route {path!r}. route entry not found.")


class _Handler(BaseHTTPRequestHandler):
    server_state: VaultTransitStandIn
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms delayed-ACK stalls

    def setup(self) -> None:
        super().setup()
        with self.server_state._lock:
            self.server_state._connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server_state._lock:
                self.server_state._connections.discard(self.connection)

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, answer = self.server_state.handle(self.command, self.path.split("?", 1)[0], headers, body)
        payload = b"" if answer is None else json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:  # Vault treats PUT as POST
        self.command = "POST"
        self._serve()

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        return
