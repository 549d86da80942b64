"""Sampling as OpenAI clients send it (issue 21, item 3), over real HTTP with the real `openai`
client against the session's Serve app: greedy stays the default and exact, seeded sampling is
reproducible (plain and streamed), top_p keeps the nucleus, stop strings end the answer,
max_completion_tokens wins, stream_options.include_usage, and n > 1 / logprobs are clear 422s."""

import pytest

from tests.plugins.serve_app import MODEL_NAME, TOKEN_A, client
from tests.stages import scene_video as video
from tests.test_http_api import ask_body, mpegts, wait_ingested

STREAM = "sampling"


@pytest.fixture(scope="module")
def oai(server):
    from openai import OpenAI

    with client(server) as http:
        assert http.post("/v1/streams", json={"stream_id": STREAM}).status_code == 201
        http.post(f"/v1/streams/{STREAM}/chunks", content=mpegts(video(12, seed=11)),
                  headers={"Content-Type": "video/mp2t"})
        http.post(f"/v1/streams/{STREAM}/close", params={"wait_s": 60})
        assert wait_ingested(http, STREAM, 12)["frames_ingested"] == 12
        yield OpenAI(base_url=f"{server}/v1", api_key=TOKEN_A, max_retries=0, timeout=120)
        http.delete(f"/v1/streams/{STREAM}")


def ask(oai, **kwargs) -> str:
    kwargs.setdefault("max_tokens", 8)
    reply = oai.chat.completions.create(model=MODEL_NAME, messages=ask_body(STREAM)["messages"], **kwargs)
    return reply.choices[0].message.content


def ask_streamed(oai, **kwargs) -> str:
    kwargs.setdefault("max_tokens", 8)
    chunks = oai.chat.completions.create(model=MODEL_NAME, messages=ask_body(STREAM)["messages"], stream=True, **kwargs)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_greedy_is_the_default_and_temperature_zero(oai):
    greedy = ask(oai)
    assert ask(oai, temperature=0) == greedy == ask_streamed(oai, temperature=0.0)
    assert ask(oai, temperature=1.0, top_p=1e-6, seed=3) == greedy  # the nucleus is the most likely token


def test_seeded_sampling_is_reproducible_and_seeds_differ(oai):
    first = ask(oai, temperature=1.5, seed=7)
    assert ask(oai, temperature=1.5, seed=7) == first == ask_streamed(oai, temperature=1.5, seed=7)
    answers = {ask(oai, temperature=2.0, seed=seed) for seed in range(5)}
    assert len(answers) > 1  # a random tiny model at temperature 2: different seeds, different answers


def test_stop_strings_end_the_answer(oai):
    greedy = ask(oai, max_tokens=16)
    assert len(greedy) >= 6, greedy
    stop = greedy[3:5]
    expected = greedy[: greedy.find(stop)]
    reply = oai.chat.completions.create(model=MODEL_NAME, messages=ask_body(STREAM)["messages"], max_tokens=16, stop=[stop])
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    assert ask_streamed(oai, max_tokens=16, stop=stop) == expected


def test_max_completion_tokens_and_include_usage(oai):
    reply = oai.chat.completions.create(model=MODEL_NAME, messages=ask_body(STREAM)["messages"], max_tokens=8,
                                        max_completion_tokens=2)
    assert reply.usage.completion_tokens <= 2
    chunks = list(oai.chat.completions.create(model=MODEL_NAME, messages=ask_body(STREAM)["messages"], max_tokens=4,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == reply.usage.prompt_tokens + \
        chunks[-1].usage.completion_tokens


def test_unsupported_options_are_clear_422s(server, oai):
    with client(server) as http:
        for extra in ({"n": 2}, {"logprobs": True}, {"top_logprobs": 3}, {"temperature": 3}, {"top_p": 0},
                      {"stop": ["a", "b", "c", "d", "e"]}, {"stop": [""]}):
            r = http.post("/v1/chat/completions", json=ask_body(STREAM, **extra))
            assert r.status_code == 422 and set(r.json()["error"]) == {"type", "message"}, (extra, r.text)
        assert http.post("/v1/chat/completions", json=ask_body(STREAM, n=1, logprobs=False)).status_code == 200
