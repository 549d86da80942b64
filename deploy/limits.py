"""Request body limits as pure ASGI middleware, so they also cover bodies without Content-Length.

Chunk uploads: `max_upload_bytes`. JSON: `max_json_bytes`, except that a chat request may carry
inline media (data: URLs, deploy/inline.py) on top, up to `max_inline_bytes` decoded: its body is
read whole (bounded) and the JSON around the data: URLs must stay within `max_json_bytes`.
"""

import re

from deploy import context
from deploy.errors import error_json

_DATA_URL = re.compile(rb'"data:[^"]*"')


class _BodyTooLarge(Exception):
    pass


def inline_allowance(max_inline_bytes: int) -> int:
    """Body bytes the base64 text of `max_inline_bytes` of media may take (and a margin)."""
    return (max_inline_bytes + 2) // 3 * 4 + 4096


class BodyLimitMiddleware:
    """413 for a body over the limit, checked on Content-Length first, then on the bytes
    actually received."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        settings = context.settings()
        if scope["type"] != "http" or settings is None:
            return await self.app(scope, receive, send)
        path = scope["path"].rstrip("/")
        upload, chat = path.endswith("/chunks"), path.endswith("/chat/completions")
        limit = settings.max_upload_bytes if upload else settings.max_json_bytes
        if chat:
            limit += inline_allowance(settings.max_inline_bytes)
        message = f"request body over the limit of {limit} bytes"
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                return await error_json(400, "bad_request", "invalid Content-Length")(scope, receive, send)
            if too_big:
                return await error_json(413, "too_large", message)(scope, receive, send)
        state = {"received": 0, "over": False, "started": False}

        async def limited_receive():
            msg = await receive()
            if msg["type"] == "http.request":
                state["received"] += len(msg.get("body", b""))
                if state["received"] > limit:
                    state["over"] = True
                    raise _BodyTooLarge(message)
            return msg

        if chat:  # read it whole: the JSON around the media has the JSON limit
            try:
                body, more = b"", True
                while more:
                    msg = await limited_receive()
                    body += msg.get("body", b"")
                    more = msg["type"] == "http.request" and msg.get("more_body", False)
            except _BodyTooLarge:
                return await error_json(413, "too_large", message)(scope, receive, send)
            media = sum(len(m) for m in _DATA_URL.findall(body)) if len(body) > settings.max_json_bytes else 0
            if len(body) - media > settings.max_json_bytes:
                text = f"request body over the limit of {settings.max_json_bytes} bytes (inline media aside)"
                return await error_json(413, "too_large", text)(scope, receive, send)
            replayed = [{"type": "http.request", "body": body, "more_body": False}]

            async def replay():
                return replayed.pop() if replayed else await receive()

            return await self.app(scope, replay, send)

        async def guarded_send(msg):
            if state["over"]:  # whatever the app made of the aborted read, the answer is 413
                return
            state["started"] = state["started"] or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if state["over"] and not state["started"]:
            await error_json(413, "too_large", message)(scope, receive, send)
