"""POST /v1/chat/completions: OpenAI-compatible questions about a stream (stream://<id>) or a
one-shot video URL; plain JSON or SSE `chat.completion.chunk` events."""

import json
import time
import uuid

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from deploy import auth
from deploy.client import evidence
from deploy.context import Service, check_id, owner, service
from deploy.errors import APIError, error_name, message
from deploy.schemas import ChatCompletion, ChatCompletionRequest, TextPart, VideoPart

router = APIRouter()


def _question_and_url(body: ChatCompletionRequest) -> tuple[str, str]:
    urls, question = [], None
    for msg in body.messages:
        if msg.role != "user" or msg.content is None:
            continue
        parts = [TextPart(type="text", text=msg.content)] if isinstance(msg.content, str) else msg.content
        texts = [p.text for p in parts if isinstance(p, TextPart)]
        urls += [p.video_url.url for p in parts if isinstance(p, VideoPart)]
        if any(t.strip() for t in texts):
            question = "\n".join(t for t in texts if t.strip())
    if question is None:
        raise APIError(422, "invalid_request", "no user message with text (the question)")
    if len(set(urls)) != 1:
        raise APIError(422, "invalid_request", "exactly one video_url content part is needed "
                                               "(stream://<stream-id>, or an http(s) URL)")
    return question, urls[0]


@router.post("/v1/chat/completions", response_model=ChatCompletion, tags=["openai"],
             responses={200: {"content": {"text/event-stream": {}}}})
async def chat_completions(body: ChatCompletionRequest, caller: str = Depends(owner),
                           api: Service = Depends(service)):
    if body.model != api.settings.model_name:
        raise APIError(404, "model_not_found", f"model {body.model!r} is not served here; see GET /v1/models")
    question, url = _question_and_url(body)
    max_tokens = body.max_completion_tokens or body.max_tokens or api.settings.default_max_tokens
    client, model = api.client, api.settings.model_name
    stream_id = oneshot = None
    if url.startswith("stream://"):
        stream_id = check_id(url[len("stream://"):].strip("/"))
        internal = auth.internal_id(caller, stream_id)
    else:
        internal = oneshot = await client.oneshot(caller, url)
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def usage(answer: dict, completion_tokens: int) -> dict:
        return {"prompt_tokens": answer["prompt_tokens"], "completion_tokens": completion_tokens,
                "total_tokens": answer["prompt_tokens"] + completion_tokens}

    def finish(completion_tokens: int) -> str:
        return "length" if completion_tokens >= max_tokens else "stop"

    try:
        if not body.stream:
            answer = await client.ask(internal, question, max_tokens)
            n = len(answer["token_ids"])
            return {"id": ident, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer["text"]},
                                 "finish_reason": finish(n)}],
                    "usage": usage(answer, n), "evidence": evidence(answer["evidence"]), "stream_id": stream_id}
        head, rest = await client.ask_stream(internal, question, max_tokens)
    except BaseException:
        if oneshot and body.stream:  # the events would have deleted it
            await client.delete_quietly(oneshot)
        raise
    finally:
        if oneshot and not body.stream:
            await client.delete_quietly(oneshot)

    def event(delta: dict, finish_reason=None, **extra) -> str:
        chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
        return f"data: {json.dumps(chunk)}\n\n"

    async def events():
        try:
            yield event({"role": "assistant", "content": ""})
            async for item in rest:
                if isinstance(item, str):
                    yield event({"content": item})
                else:  # the last item: the generated token ids
                    n = len(item["token_ids"])
                    yield event({}, finish(n), usage=usage(head, n), evidence=evidence(head["evidence"]),
                                stream_id=stream_id)
            yield "data: [DONE]\n\n"
        except Exception as exc:  # the answer actor failed mid-answer: say so in the stream
            yield f"data: {json.dumps({'error': {'type': error_name(exc), 'message': message(exc)}})}\n\n"
        finally:
            if oneshot:
                await client.delete_quietly(oneshot)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
