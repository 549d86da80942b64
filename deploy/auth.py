"""Bearer tokens and stream ownership.

With tokens configured, every route but /healthz, /docs and /openapi.json needs
`Authorization: Bearer <token>` (401 otherwise); /metrics takes an API token (the caller's own
streams) or the metrics token (every stream). A stream belongs to the token that created it: the
coordinator holds it under `<owner>:<stream-id>`, where owner is a keyed hash of the token,
HMAC-SHA256(owner secret, token), so neither the token nor a guessable hash of it is stored, and
another token cannot see, ask or delete the stream (404, as for one that does not exist) and may
reuse the same name. Internal ids never leave the server: `scrub` rewrites them to the client's
names in every message. Nothing about ownership is kept in the API replica, so any number of
replicas agree as long as they share the owner secret. Without tokens every caller is "public".
"""

from __future__ import annotations

import hashlib
import hmac
import re

PUBLIC = "public"
SEPARATOR = ":"
OPERATOR = "*"  # the metrics token's caller: sees every stream in /metrics, nothing else
_INTERNAL = re.compile(r"\b(?:public|o[0-9a-f]{32})" + SEPARATOR)


class Unauthorized(Exception):
    pass


def parse_tokens(value) -> list[str]:
    """`api_token`: None, one token, a comma-separated string, or a list of tokens."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(t).strip() for t in items if str(t).strip()]


def owner_of(secret: bytes, token: str) -> str:
    return "o" + hmac.new(secret, token.encode(), hashlib.sha256).hexdigest()[:32]


def owner_label(secret: bytes, owner: str) -> str:
    """An owner's name in /metrics for the operator: keyed, and not the owner key itself."""
    return hmac.new(secret, b"label:" + owner.encode(), hashlib.sha256).hexdigest()[:12]


def bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    scheme, _, given = authorization.partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized("expected Authorization: Bearer <token>")
    return given


def authenticate(tokens: list[str], secret: bytes, authorization: str | None, metrics_token: str | None = None) -> str:
    """The caller's owner id (OPERATOR for the metrics token, when it is accepted); raises
    Unauthorized for a missing or wrong token."""
    if not tokens and not metrics_token:
        return PUBLIC
    given = bearer(authorization).encode()
    owner = None
    for token in tokens:  # constant-time compare against every configured token
        if hmac.compare_digest(token.encode(), given):
            owner = owner_of(secret, token)
    if metrics_token is not None and hmac.compare_digest(metrics_token.encode(), given):
        owner = OPERATOR
    if owner is None:
        raise Unauthorized("invalid token")
    return owner


def internal_id(owner: str, stream_id: str) -> str:
    return f"{owner}{SEPARATOR}{stream_id}"


def public_id(owner: str, internal: str) -> str | None:
    """The client's name for an internal id, or None when it is another owner's."""
    prefix = owner + SEPARATOR
    return internal[len(prefix):] if internal.startswith(prefix) else None


def split(internal: str) -> tuple[str, str]:
    owner, _, name = internal.partition(SEPARATOR)
    return owner, name


def scrub(text: str) -> str:
    """`text` with every internal stream id written as the client's name."""
    return _INTERNAL.sub("", text)
