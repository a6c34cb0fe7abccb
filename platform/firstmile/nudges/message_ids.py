"""The e-mail ``Message-ID`` of a send, shared by every e-mail adapter (SMTP, SendGrid), with no I/O.

Every attempt of one send carries the same ``Message-ID``, ``<idempotency key@domain>``, whichever
provider takes it (the primary or the backup of a :class:`~firstmile.nudges.channels.FailoverChannel`),
so a receiver can deduplicate the one duplicate the delivery loop cannot rule out. The domain is
the sender's unless the adapter is given one.
"""

from __future__ import annotations

import re
from email.utils import parseaddr

_KEY = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
FALLBACK_DOMAIN = "firstmile.invalid"


def domain_of(sender: str) -> str:
    """The domain of ``sender`` (``hi@example.com`` or ``Example <hi@example.com>``), else a reserved one."""
    return parseaddr(sender)[1].rpartition("@")[2] or FALLBACK_DOMAIN


def message_id(idempotency_key: str, domain: str) -> str:
    """The ``Message-ID`` of every attempt of the send ``idempotency_key``."""
    if not _KEY.match(idempotency_key):
        raise ValueError("an idempotency key is 1-128 letters, digits, '.', '_' or '-'")
    return f"<{idempotency_key}@{domain}>"
