"""Conversations (issue 21, item 2) over real HTTP with the `openai` client: earlier user and
assistant turns and the system message enter the prompt after the stream's memory, exactly as the
chat template renders them (usage.prompt_tokens grows by their tokens), and limits are clear 4xx."""

import pytest

from pipeline.conversation import Conversation, Turn
from tests.plugins.serve_app import MODEL_NAME, TOKEN_A, client
from tests.stages import scene_video as video
from tests.test_http_api import mpegts, wait_ingested

STREAM = "talk"
SYSTEM = "You are a helpful assistant."  # the stream's system prompt (CreateStream's default)
VIDEO = {"type": "video_url", "video_url": {"url": f"stream://{STREAM}"}}


@pytest.fixture(scope="module")
def oai(server):
    from openai import OpenAI

    with client(server) as http:
        assert http.post("/v1/streams", json={"stream_id": STREAM}).status_code == 201
        http.post(f"/v1/streams/{STREAM}/chunks", content=mpegts(video(12, seed=31)), headers={"Content-Type": "video/mp2t"})
        http.post(f"/v1/streams/{STREAM}/close", params={"wait_s": 60})
        assert wait_ingested(http, STREAM, 12)["frames_ingested"] == 12
        yield OpenAI(base_url=f"{server}/v1", api_key=TOKEN_A, max_retries=0, timeout=120)
        http.delete(f"/v1/streams/{STREAM}")


@pytest.fixture(scope="module")
def model(checkpoint_dirs):
    from pipeline.model import load_model

    return load_model(checkpoint_dirs["gqa"])


def ask(oai, messages, **kwargs):
    return oai.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=4, **kwargs)


def test_earlier_turns_and_the_system_message_enter_the_prompt(oai, model):
    single = ask(oai, [{"role": "user", "content": [VIDEO, {"type": "text", "text": "and now?"}]}])
    talk = [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": [VIDEO, {"type": "text", "text": "what color was the star?"}]},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "and now?"}]
    conversation = ask(oai, talk)
    expected = Conversation("and now?", (Turn("user", "what color was the star?"), Turn("assistant", "red")))
    extra = len(model.prompt_parts(SYSTEM, expected).suffix_ids) - len(model.prompt_parts(SYSTEM, "and now?").suffix_ids)
    assert extra > 0 and conversation.usage.prompt_tokens == single.usage.prompt_tokens + extra
    assert ask(oai, talk).choices[0].message.content == conversation.choices[0].message.content  # greedy

    other = [{"role": "system", "content": "Answer in one word."}, *talk[1:]]  # not the stream's: after the memory
    with_system = Conversation(expected.question, expected.turns, "Answer in one word.")
    extra = len(model.prompt_parts(SYSTEM, with_system).suffix_ids) - len(model.prompt_parts(SYSTEM, expected).suffix_ids)
    assert extra > 0 and ask(oai, other).usage.prompt_tokens == conversation.usage.prompt_tokens + extra


def test_conversation_limits_and_shapes_are_clear_4xx(server, oai):
    import httpx

    def post(messages):
        return httpx.post(f"{server}/v1/chat/completions", json={"model": MODEL_NAME, "max_tokens": 2, "messages": messages},
                          headers={"Authorization": f"Bearer {TOKEN_A}"}, timeout=120)

    first = {"role": "user", "content": [VIDEO, {"type": "text", "text": "hi"}]}
    long_turns = [first] + [{"role": r, "content": "star " * 150} for _ in range(15) for r in ("assistant", "user")]
    cases = {
        "too many messages": ([first] + [{"role": "user", "content": "x"}] * 64, 422),
        "too many tokens": (long_turns, 422),
        "ends with the assistant": ([first, {"role": "assistant", "content": "a"}], 422),
        "begins with the assistant": ([{"role": "assistant", "content": "a"}, first], 422),
        "a video in an assistant message": ([first, {"role": "assistant", "content": [VIDEO]},
                                             {"role": "user", "content": "q"}], 422),
    }
    for name, (messages, status) in cases.items():
        r = post(messages)
        assert r.status_code == status and set(r.json()["error"]) == {"type", "message"}, (name, r.text)
    assert "conversation" in post(long_turns).json()["error"]["message"]
    assert post([first, {"role": "tool", "content": "ignored"}, {"role": "user", "content": "q"}]).status_code == 200
