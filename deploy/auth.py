"""Bearer tokens and stream ownership.

With tokens configured, every /v1 route needs `Authorization: Bearer <token>` (401 otherwise).
A stream belongs to the token that created it: the coordinator holds it under
`<owner>:<stream-id>`, where owner is a hash of the token, so another token cannot see, ask or
delete it (404, as for a stream that does not exist) and may reuse the same name. Nothing about
ownership is kept in the API replica, so any number of replicas agree. Without tokens every
caller is the owner "public".
"""

from __future__ import annotations

import hashlib
import hmac

PUBLIC = "public"
SEPARATOR = ":"


class Unauthorized(Exception):
    pass


def parse_tokens(value) -> list[str]:
    """`api_token`: None, one token, a comma-separated string, or a list of tokens."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(t).strip() for t in items if str(t).strip()]


def owner_of(token: str) -> str:
    return "t" + hashlib.sha256(token.encode()).hexdigest()[:16]


def authenticate(tokens: list[str], authorization: str | None) -> str:
    """The caller's owner id; raises Unauthorized for a missing or wrong token."""
    if not tokens:
        return PUBLIC
    if not authorization:
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    scheme, _, given = authorization.partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized("expected Authorization: Bearer <token>")
    for token in tokens:  # constant-time compare against every configured token
        if hmac.compare_digest(token.encode(), given.encode()):
            return owner_of(token)
    raise Unauthorized("invalid token")


def internal_id(owner: str, stream_id: str) -> str:
    return f"{owner}{SEPARATOR}{stream_id}"


def public_id(owner: str, internal: str) -> str | None:
    """The client's name for an internal id, or None when it is another owner's."""
    prefix = owner + SEPARATOR
    return internal[len(prefix):] if internal.startswith(prefix) else None
