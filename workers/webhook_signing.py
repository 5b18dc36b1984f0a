"""Outbound webhooks the Standard Webhooks way (https://www.standardwebhooks.com): endpoint
secrets, the signature of a delivery, and what an endpoint URL may be. Shared by the
webhooks worker, the API and the command line.

A delivery carries three headers: ``webhook-id`` (the alert's ``alert_id``, the same on
every attempt, so a receiver dedupes on it), ``webhook-timestamp`` (Unix seconds of this
attempt) and ``webhook-signature``: ``v1,`` then the base64 of the HMAC-SHA256 of
``{id}.{timestamp}.{body}`` under the key that is the base64-decoded secret after its
``whsec_`` prefix.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from urllib.parse import urlsplit

SECRET_PREFIX = "whsec_"  # noqa: S105 -- the format's prefix, not a secret
SECRET_BYTES = 24
MAX_URL_LENGTH = 2000


def new_secret() -> str:
    """``whsec_`` and the base64 of 24 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_...`` secret."""
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header's value: ``v1,<base64 HMAC-SHA256>``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Every header of one attempt at a delivery."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
        "Content-Type": "application/json",
    }


def verify(secret: str, msg_id: str, timestamp: str, body: bytes, signature_header: str) -> bool:
    """True when one of the space-separated ``v1,...`` signatures of the header is ours."""
    if not timestamp.isdigit():
        return False
    expected = sign(secret, msg_id, int(timestamp), body)
    return any(
        hmac.compare_digest(expected.encode(), candidate.encode())
        for candidate in signature_header.split()
    )


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be an endpoint (None when it can): http or https, a host, at most
    2,000 characters, no spaces or control characters."""
    if not url or len(url) > MAX_URL_LENGTH:
        return f"the URL should be 1-{MAX_URL_LENGTH} characters"
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        return "the URL should have no spaces or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError when out of range or not a number
    except ValueError:
        return "the URL is not valid"
    if parts.scheme.lower() not in ("http", "https"):
        return "the URL should be http:// or https://"
    if not parts.hostname:
        return "the URL should name a host"
    del port
    return None
