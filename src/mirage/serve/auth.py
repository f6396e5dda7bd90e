"""API keys: clients are identified by the SHA-256 digest of their key; plain keys are never
stored. Keys are random 256-bit tokens, so a fast hash suffices (no dictionary to attack)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import TYPE_CHECKING

from mirage.serve.config import ClientConfig
from mirage.serve.errors import BadRequest, InvalidKey, MissingKey

if TYPE_CHECKING:
    from starlette.datastructures import Headers


def hash_key(key: str) -> str:
    """SHA-256 hex digest of an API key (what the config file stores)."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh random API key and its digest."""
    key = "mk_" + secrets.token_urlsafe(32)
    return key, hash_key(key)


def presented_key(headers: Headers) -> str:
    """The one key a request presents: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.
    More than one such header is refused (a 400 before any key is checked): which of several
    a proxy or the server would read is not the client's to leave open."""
    authorization, x_api_key = headers.getlist("authorization"), headers.getlist("x-api-key")
    if len(authorization) + len(x_api_key) > 1:
        raise BadRequest(
            "send exactly one API key header: 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
        )
    return key_from_headers(
        authorization[0] if authorization else None, x_api_key[0] if x_api_key else None
    )


def key_from_headers(authorization: str | None, x_api_key: str | None) -> str:
    """The presented key: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``."""
    if x_api_key:
        return x_api_key.strip()
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        raise InvalidKey("the Authorization header must be 'Bearer <API key>'")
    raise MissingKey("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")


class KeyRing:
    """Digest → client lookup with a constant-time comparison of the digests."""

    def __init__(self, clients: list[ClientConfig]) -> None:
        self._by_digest = {c.key_sha256: c for c in clients}

    def authenticate(self, key: str) -> ClientConfig:
        digest = hash_key(key)
        client = self._by_digest.get(digest)
        if client is None or not hmac.compare_digest(client.key_sha256, digest):
            raise InvalidKey("invalid API key")
        return client
