"""POST /v1/chat/completions: OpenAI-compatible questions about a stream (stream://<id>) or a
one-shot video URL; plain JSON or SSE `chat.completion.chunk` events."""

import json
import secrets
import time
import uuid

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from deploy import auth
from deploy.client import evidence
from deploy.context import Service, check_id, owner, service
from deploy.errors import APIError, error_name, message
from deploy.inline import is_data_url, parse
from deploy.schemas import MAX_URL_CHARS, ChatCompletion, ChatCompletionRequest, ImagePart, TextPart, VideoPart
from pipeline.conversation import Conversation, Turn
from pipeline.errors import InvalidInputError
from pipeline.sampling import SamplingParams

router = APIRouter()


def conversation_of(body: ChatCompletionRequest) -> tuple[Conversation, str]:
    """The conversation (the last user message is the question; system and developer messages are
    the system message; earlier user and assistant turns with text are kept in order) and the
    one video (a video_url, or an image_url as a one-frame video). Tool messages are left out."""
    urls, turns, system = [], [], []
    for msg in body.messages:
        if msg.content is None or msg.role == "tool":
            continue
        parts = [] if isinstance(msg.content, str) else msg.content
        texts = [msg.content] if isinstance(msg.content, str) else [p.text for p in parts if isinstance(p, TextPart)]
        text = "\n".join(t for t in texts if t.strip())
        media = [p for p in parts if isinstance(p, (VideoPart, ImagePart))]
        if media and msg.role != "user":
            raise APIError(422, "invalid_request", f"a {msg.role} message cannot carry a video")
        for part in media:
            if isinstance(part, ImagePart) and not is_data_url(part.image_url.url):
                raise APIError(422, "invalid_request", "image_url parts must be data: URLs (data:image/png;base64,...)")
            urls.append(part.video_url.url if isinstance(part, VideoPart) else part.image_url.url)
        if msg.role in ("system", "developer"):
            system += [text] if text else []
        elif text:
            turns.append(Turn("assistant" if msg.role == "assistant" else "user", text))
    if not turns or turns[-1].role != "user":
        raise APIError(422, "invalid_request", "no user message with text (the question) after the last assistant one")
    if turns[0].role != "user":
        raise APIError(422, "invalid_request", "the conversation must begin with a user message (the video's)")
    if len(set(urls)) != 1:  # one video per request, as the model's prompt has one video placeholder
        raise APIError(422, "invalid_request", "exactly one video is needed: one video_url (stream://<stream-id>, "
                                               "an http(s) URL or a data: URL) or image_url content part")
    if not is_data_url(urls[0]) and len(urls[0]) > MAX_URL_CHARS:
        raise APIError(422, "invalid_request", f"the video URL is longer than {MAX_URL_CHARS} characters")
    conversation = Conversation(turns[-1].text, tuple(turns[:-1]), "\n".join(system) if system else None)
    return conversation, urls[0]


def sampling_of(body: ChatCompletionRequest) -> SamplingParams:
    """The request's sampling, as OpenAI's API reads it. A sampled answer without a seed gets a
    random one, so that a streamed answer resumed on another replica continues the same text."""
    if body.logprobs or body.top_logprobs:
        raise APIError(422, "invalid_request", "logprobs are not supported by this server")
    temperature = 0.0 if body.temperature is None else body.temperature
    seed = body.seed if body.seed is not None or temperature == 0 else secrets.randbelow(2**63)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    try:
        return SamplingParams(temperature, 1.0 if body.top_p is None else body.top_p, seed, stop)
    except InvalidInputError as exc:
        raise APIError(422, "invalid_request", str(exc)) from None


@router.post("/v1/chat/completions", response_model=ChatCompletion, tags=["openai"],
             responses={200: {"content": {"text/event-stream": {}}}})
async def chat_completions(body: ChatCompletionRequest, caller: str = Depends(owner),
                           api: Service = Depends(service)):
    if body.model != api.settings.model_name:
        raise APIError(404, "model_not_found", f"model {body.model!r} is not served here; see GET /v1/models")
    question, url = conversation_of(body)
    sampling = sampling_of(body)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    max_tokens = body.max_completion_tokens or body.max_tokens or api.settings.default_max_tokens
    client, model = api.client, api.settings.model_name
    stream_id = oneshot = warning = None
    if url.startswith("stream://"):
        stream_id = check_id(url[len("stream://"):].strip("/"))
        internal = auth.internal_id(caller, stream_id)
    else:
        media = parse(url, api.settings.max_inline_bytes) if is_data_url(url) else url
        internal, warning = await client.oneshot(caller, media, question.system)
        oneshot = internal
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def usage(answer: dict, completion_tokens: int) -> dict:
        return {"prompt_tokens": answer["prompt_tokens"], "completion_tokens": completion_tokens,
                "total_tokens": answer["prompt_tokens"] + completion_tokens}

    def finish(answer: dict) -> str:
        return "length" if len(answer["token_ids"]) >= max_tokens and not answer.get("stopped") else "stop"

    try:
        if not body.stream:
            answer = await client.ask(internal, question, max_tokens, sampling)
            n = len(answer["token_ids"])
            return {"id": ident, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer["text"]},
                                 "finish_reason": finish(answer)}],
                    "usage": usage(answer, n), "evidence": evidence(answer["evidence"]), "stream_id": stream_id,
                    "warning": warning}
        head, rest = await client.ask_stream(internal, question, max_tokens, sampling)
    except BaseException:
        if oneshot and body.stream:  # the events would have deleted it
            await client.delete_quietly(oneshot)
        raise
    finally:
        if oneshot and not body.stream:
            await client.delete_quietly(oneshot)

    def chunk(**fields) -> dict:
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model, **fields}

    def event(delta: dict, finish_reason=None, **extra) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return f"data: {json.dumps(chunk(choices=[choice], **extra))}\n\n"

    async def events():
        try:
            yield event({"role": "assistant", "content": ""})
            async for item in rest:
                if isinstance(item, str):
                    yield event({"content": item})
                else:  # the last item: the generated token ids
                    n = len(item["token_ids"])
                    yield event({}, finish(item), usage=usage(head, n), evidence=evidence(head["evidence"]),
                                stream_id=stream_id, warning=warning)
                    if include_usage:  # OpenAI's last chunk: no choices, the usage
                        yield f"data: {json.dumps(chunk(choices=[], usage=usage(head, n)))}\n\n"
            if oneshot:  # gone before the client hears the answer is done
                await client.delete_quietly(oneshot)
            yield "data: [DONE]\n\n"
        except Exception as exc:  # the answer actor failed mid-answer: say so in the stream
            yield f"data: {json.dumps({'error': {'type': error_name(exc), 'message': message(exc)}})}\n\n"
        finally:
            if oneshot:  # (again, quietly, if the answer failed or the client left)
                await client.delete_quietly(oneshot)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
