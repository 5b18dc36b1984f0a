"""API keys: ``cl_live_`` + an 8-character lookup + a 32-character secret, base62.

Postgres keeps the lookup (to find the row without the secret) and the SHA-256 digest of
the whole key; a presented key is checked by comparing digests in constant time. The key
itself is shown once, when it is created, and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
from typing import Literal, NamedTuple, get_args

Scope = Literal["ingest", "read", "billing", "admin"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
PREFIX = "cl_live_"
LOOKUP_LENGTH = 8
SECRET_LENGTH = 32
_ALPHABET = string.ascii_letters + string.digits
CACHE_S = 1.0
"""How long an API process trusts a key it has checked; ``api-keys revoke`` waits it out."""


class NewKey(NamedTuple):
    key: str  # shown once
    prefix: str  # shown in lists: the fixed prefix and the lookup
    lookup: str
    digest: bytes


def new_key() -> NewKey:
    lookup = "".join(secrets.choice(_ALPHABET) for _ in range(LOOKUP_LENGTH))
    secret = "".join(secrets.choice(_ALPHABET) for _ in range(SECRET_LENGTH))
    key = f"{PREFIX}{lookup}{secret}"
    return NewKey(key, f"{PREFIX}{lookup}", lookup, digest(key))


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def lookup_of(key: str) -> str | None:
    """The lookup part of a presented key; None when it cannot be one of ours."""
    if len(key) != len(PREFIX) + LOOKUP_LENGTH + SECRET_LENGTH or not key.startswith(PREFIX):
        return None
    rest = key[len(PREFIX) :]
    if not all(char in _ALPHABET for char in rest):
        return None
    return rest[:LOOKUP_LENGTH]


def matches(key: str, stored_digest: bytes) -> bool:
    """Whether ``key`` is the one ``stored_digest`` was made of, in constant time."""
    return hmac.compare_digest(digest(key), bytes(stored_digest))
