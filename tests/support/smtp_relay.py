"""A small SMTP relay on 127.0.0.1 between a nudge worker and Mailpit, that can stop mid-message on request.

It speaks the part of SMTP (RFC 5321) a client of a plain relay uses: the greeting, ``EHLO``/``HELO``,
``MAIL FROM``, ``RCPT TO``, ``DATA`` with dot-unstuffing, ``RSET``, ``NOOP``, ``QUIT``. Each message
is forwarded to Mailpit (the real SMTP server of the tests) with ``aiosmtplib``, then answered ``250``.

:meth:`SmtpRelay.hold` makes it stop at the next message to a recipient of ``domain``, either
**after** forwarding it (Mailpit has it; the worker never hears ``250``: the window between the
provider's acceptance and our record of it) or **before** (nothing reached Mailpit). It then sets
:attr:`SmtpRelay.holding` and never answers that message, so a test can kill the worker at exactly
that point.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiosmtplib


class SmtpRelay:
    def __init__(self, upstream_host: str, upstream_port: int, domain: str) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.domain = domain.lower()
        self.holding = asyncio.Event()
        self.held: str | None = None
        """The recipient of the message held."""
        self._hold: str | None = None  # "after" or "before" forwarding, None: pass everything on
        self._skip = 0
        self._spare: str | None = None
        self._server: asyncio.Server | None = None
        self._sessions: set[asyncio.Task[None]] = set()
        self.forwarded: list[str] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def hold(self, when: str, *, skip: int = 0, spare: str | None = None) -> None:
        """Hold a message to ``domain``, ``after`` or ``before`` it reaches Mailpit: the next but ``skip``, leaving
        messages to ``spare`` alone."""
        assert when in ("after", "before")
        self._hold, self.held, self._skip, self._spare = when, None, skip, spare
        self.holding = asyncio.Event()

    def release(self) -> None:
        """Pass every message on from now on."""
        self._hold = None

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._sessions):
            task.cancel()
        for task in list(self._sessions):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        try:
            await self._converse(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the worker went away (killed)
        finally:
            self._sessions.discard(task)
            writer.close()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def reply(line: str) -> None:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()

        await reply("220 relay.test ESMTP test relay")
        sender, recipients = "", list[str]()
        while True:
            raw = await reader.readline()
            if not raw:
                return
            command = raw.decode("utf-8", "replace").rstrip("\r\n")
            verb = command[:4].upper()
            if verb == "EHLO":
                await reply("250-relay.test")
                await reply("250 8BITMIME")
            elif verb == "HELO":
                await reply("250 relay.test")
            elif verb == "MAIL":
                sender, recipients = command.split(":", 1)[1].strip().strip("<>").split(">")[0], []
                await reply("250 2.1.0 OK")
            elif verb == "RCPT":
                recipients.append(command.split(":", 1)[1].strip().strip("<>").split(">")[0])
                await reply("250 2.1.5 OK")
            elif verb == "DATA":
                await reply("354 End data with <CR><LF>.<CR><LF>")
                lines: list[bytes] = []
                while (line := await reader.readline()) not in (b".\r\n", b""):
                    lines.append(line[1:] if line.startswith(b"..") else line)
                await self._deliver(sender, recipients, b"".join(lines))
                await reply("250 2.0.0 OK queued")
            elif verb == "RSET":
                sender, recipients = "", []
                await reply("250 2.0.0 OK")
            elif verb == "NOOP":
                await reply("250 2.0.0 OK")
            elif verb == "QUIT":
                await reply("221 2.0.0 Bye")
                return
            else:
                await reply("502 5.5.2 Command not recognized")

    async def _deliver(self, sender: str, recipients: list[str], message: bytes) -> None:
        ours = any(r.lower().endswith("@" + self.domain) for r in recipients) and self._spare not in recipients
        hold = self._hold if ours and not self.holding.is_set() else None
        if hold is not None and self._skip > 0:
            self._skip, hold = self._skip - 1, None
        if hold == "before":
            await self._stop(recipients[0])
        await aiosmtplib.send(message, sender=sender, recipients=recipients, hostname=self.upstream[0],
                              port=self.upstream[1], start_tls=False)  # fmt: skip
        self.forwarded.append(recipients[0])
        if hold == "after":
            await self._stop(recipients[0])

    async def _stop(self, recipient: str) -> None:
        self.held = recipient
        self._hold = None
        self.holding.set()
        await asyncio.Event().wait()  # never answered: the worker is killed meanwhile
