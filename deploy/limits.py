"""Request body limits as pure ASGI middleware, so they also cover bodies without Content-Length."""

from deploy import context
from deploy.errors import error_json


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 for a body over the limit: `max_upload_bytes` for chunk uploads, `max_json_bytes`
    elsewhere. Checked on Content-Length first, then on the bytes actually received."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        settings = context.settings()
        if scope["type"] != "http" or settings is None:
            return await self.app(scope, receive, send)
        upload = scope["path"].rstrip("/").endswith("/chunks")
        limit = settings.max_upload_bytes if upload else settings.max_json_bytes
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
