"""The OpenAI API of `llamachat serve`, through the real openai client (raw httpx where a
client would not send it): one server with a key, serving the tiny model, for the module."""

from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest

from .conftest import REQUEST_S, check_completion_logprobs, start_server

KEY = "test-key-1234"
GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def server(tiny_home):
    served = start_server(tiny_home, "-m", "tiny", "--ctx", "256", "--max-batch", "8", api_key=KEY)
    yield served
    assert served.stop() == 0
    assert KEY not in "".join(served.log)  # the key is never logged


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def ask(client, content: str, **options) -> openai.types.chat.ChatCompletion:
    messages = [{"role": "user", "content": content}]
    return client.chat.completions.create(model="tiny", messages=messages, **options)


def test_a_plain_chat_reply_has_text_usage_and_a_finish_reason(client):
    reply = ask(client, "Hello", **GREEDY)
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"  # a random model runs to its limit
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_a_streamed_reply_is_the_plain_one_in_pieces(client):
    plain = ask(client, "Tell me a story", **GREEDY).choices[0].message.content
    chunks = list(
        ask(
            client, "Tell me a story", stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_the_stream_ends_with_done(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={**body, **GREEDY},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=REQUEST_S,
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.splitlines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_content_as_text_parts_is_the_same_as_a_string(client):
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    as_parts = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": parts}], **GREEDY
    )
    assert (
        as_parts.choices[0].message.content
        == ask(client, "Hello", **GREEDY).choices[0].message.content
    )


def test_a_second_turn_that_resends_the_conversation_reuses_the_cache(client):
    first = ask(client, "What is the capital of France?", **GREEDY)
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And of Italy?"},
    ]
    second = client.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= cached < second.usage.prompt_tokens


def test_completions_continue_raw_text_streamed_and_not(client):
    plain = client.completions.create(model="tiny", prompt="Once upon a time", **GREEDY)
    assert plain.choices[0].text and plain.choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == 12
    streamed = client.completions.create(
        model="tiny", prompt="Once upon a time", stream=True, **GREEDY
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == plain.choices[0].text


def test_a_stop_string_ends_the_reply_before_it(client):
    full = ask(client, "Hello there", temperature=0, max_tokens=24).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = ask(client, "Hello there", temperature=0, max_tokens=24, stop=[stop, "never-seen"])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_the_same_seed_gives_the_same_sampled_text(client):
    def sampled(seed: int) -> str:
        reply = ask(
            client, "Hello", temperature=1.0, max_tokens=24, seed=seed, extra_body={"top_k": 0}
        )
        return reply.choices[0].message.content

    assert sampled(7) == sampled(7)
    assert sampled(7) != sampled(8)


def test_the_repetition_penalty_is_taken_under_vllms_name_too(client):
    def answer(**penalty) -> str:
        options = {"temperature": 0, "max_tokens": 24, "extra_body": penalty}
        return ask(client, "Hello", **options).choices[0].message.content

    penalised = answer(repeat_penalty=2.0)
    assert answer(repetition_penalty=2.0) == penalised
    assert answer(repetition_penalty=1.0) == answer(repeat_penalty=1.0) != penalised


def test_tokenize_counts_a_conversation_as_the_reply_to_it_does(server, client):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How many tokens is this?"},
    ]
    reply = client.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    headers = {"Authorization": f"Bearer {KEY}"}
    counted = httpx.post(
        f"{server.url}/tokenize",
        json={"model": "tiny", "messages": messages},
        headers=headers,
        timeout=REQUEST_S,
    )
    assert counted.status_code == 200
    assert counted.json() == {"count": reply.usage.prompt_tokens, "max_model_len": 256}
    unknown = httpx.post(
        f"{server.url}/tokenize",
        json={"model": "nope", "messages": messages},
        headers=headers,
        timeout=REQUEST_S,
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    anonymous = httpx.post(f"{server.url}/tokenize", json={"model": "tiny"}, timeout=REQUEST_S)
    assert anonymous.status_code == 401


def test_models_list_the_served_model_with_its_context(client):
    (card,) = client.models.list().data
    assert card.id == "tiny"
    one = client.models.retrieve("tiny")
    assert one.model_extra["context_length"] == 1024  # tests/tiny.py's max_position_embeddings
    assert one.model_extra["max_model_len"] == 256  # --ctx


def error_of(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value.status_code, caught.value.body


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_a_field_the_engine_cannot_honour_is_refused_by_name(client, options, param):
    status, error = error_of(lambda: ask(client, "Hi", max_tokens=4, **options))
    assert status == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param and "not supported" in error["message"]


def test_logprobs_name_each_token_with_its_alternatives(client):
    options = {"temperature": 0, "max_tokens": 10, "extra_body": {"repeat_penalty": 1.0}}
    plain = ask(client, "tell me more", logprobs=True, top_logprobs=3, **options)
    content = plain.choices[0].logprobs.content
    assert len(content) == plain.usage.completion_tokens
    for token in content:
        alternatives = [alt.logprob for alt in token.top_logprobs]
        assert len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True)
        assert token.logprob <= 0
        # Greedy with no penalty: the token drawn is the most likely one.
        assert token.logprob == pytest.approx(alternatives[0], abs=1e-6)
        assert token.token == token.top_logprobs[0].token
    streamed = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "tell me more"}],
        stream=True,
        logprobs=True,
        top_logprobs=3,
        **options,
    )
    entries = [t for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
               for t in chunk.choices[0].logprobs.content]  # fmt: skip
    assert [t.token for t in entries] == [t.token for t in content]
    assert [t.logprob for t in entries] == pytest.approx([t.logprob for t in content], abs=1e-5)
    without = ask(client, "tell me more", **options)
    assert without.choices[0].logprobs is None


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_top_logprobs_needs_logprobs_and_at_most_twenty(client, options, param):
    status, error = error_of(lambda: ask(client, "Hi", max_tokens=4, **options))
    assert status == 400 and error["param"] == param


def test_completions_give_logprobs_in_the_legacy_shape(client):
    options = {"temperature": 0, "max_tokens": 16, "extra_body": {"repeat_penalty": 1.0}}
    plain = client.completions.create(model="tiny", prompt="Once", logprobs=2, **options)
    (choice,) = plain.choices
    check_completion_logprobs(choice, top=2)
    assert len(choice.logprobs.tokens) == plain.usage.completion_tokens
    # Greedy with no penalty: the token drawn is the most likely one.
    for chosen, alternatives in zip(
        choice.logprobs.token_logprobs, choice.logprobs.top_logprobs, strict=True
    ):
        assert chosen == pytest.approx(max(alternatives.values()), abs=1e-6)
    streamed = list(
        client.completions.create(model="tiny", prompt="Once", logprobs=2, stream=True, **options)
    )
    parts = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == choice.logprobs.tokens
    assert [o for p in parts for o in p.text_offset] == choice.logprobs.text_offset
    assert [v for p in parts for v in p.token_logprobs] == pytest.approx(
        choice.logprobs.token_logprobs, abs=1e-5
    )
    none = client.completions.create(model="tiny", prompt="Once", **options)
    assert none.choices[0].logprobs is None and none.choices[0].text == choice.text


@pytest.mark.parametrize("logprobs", [6, -1])
def test_completions_logprobs_out_of_range_are_400(client, logprobs):
    status, error = error_of(
        lambda: client.completions.create(
            model="tiny", prompt="Hi", max_tokens=4, logprobs=logprobs
        )
    )
    assert status == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == "logprobs" and "5" in error["message"]


def test_frequency_and_presence_penalties_change_a_repeating_answer(client):
    plain = ask(client, "say it again and again", temperature=0, max_tokens=24)
    tokens = plain.choices[0].message.content
    penalised = ask(
        client, "say it again and again", temperature=0, max_tokens=24, presence_penalty=2.0
    )
    assert penalised.choices[0].message.content != tokens
    status, error = error_of(lambda: ask(client, "Hi", max_tokens=4, frequency_penalty=2.5))
    assert status == 400 and error["param"] == "frequency_penalty"


def test_an_image_part_is_refused(client):
    parts = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    status, error = error_of(
        lambda: client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": parts}]
        )
    )
    assert status == 400 and error["param"] == "messages[0].content[0].type"


def test_a_bad_field_value_is_400_naming_the_field(client):
    status, error = error_of(lambda: ask(client, "Hi", max_tokens=0))
    assert status == 400 and error["param"] == "max_tokens"
    status, error = error_of(lambda: ask(client, "Hi", top_p=1.5))
    assert status == 400 and error["param"] == "top_p"


def test_a_prompt_longer_than_the_context_is_400_with_its_size(client):
    status, error = error_of(lambda: ask(client, "hello world " * 400, max_tokens=4))
    assert status == 400 and error["code"] == "context_length_exceeded"
    assert "256" in error["message"]


def test_an_unknown_model_is_404_naming_the_served_ones(client):
    status, error = error_of(
        lambda: client.chat.completions.create(
            model="gpt-4", messages=[{"role": "user", "content": "Hi"}]
        )
    )
    assert status == 404 and error["type"] == "not_found_error" and "tiny" in error["message"]


def test_a_wrong_key_is_401(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    status, error = error_of(lambda: client.models.list())
    assert status == 401 and error["type"] == "authentication_error"


def test_a_missing_key_is_401_and_health_needs_none(server):
    response = httpx.get(f"{server.url}/v1/models", timeout=REQUEST_S)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health", timeout=REQUEST_S).json() == {"status": "ok"}


def test_a_body_that_is_not_json_is_400_in_openais_shape(server):
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        timeout=REQUEST_S,
    )
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text


def test_eight_concurrent_clients_each_get_their_own_greedy_answer(client, server):
    prompts = [f"Question number {i}: what is {i} plus {i}?" for i in range(8)]
    alone = [ask(client, p, **GREEDY).choices[0].message.content for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(
            pool.map(lambda p: ask(client, p, **GREEDY).choices[0].message.content, prompts)
        )
    assert together == alone
    assert server.metric("llamachat_requests_running") == 0


def test_metrics_count_requests_and_tokens(server, client):
    before = server.metric("llamachat_generated_tokens_total")
    ask(client, "Hi", **GREEDY)
    assert server.metric("llamachat_generated_tokens_total") == before + 12
    assert server.metric('llamachat_requests_total{route="/v1/chat/completions",status="200"}') > 0


def test_metrics_show_the_kv_cache_held_and_the_batch(server, client):
    reply = ask(client, "Keep this sentence in the cache, please", **GREEDY)
    held = server.metric('llamachat_kv_cache_tokens{model="tiny"}')
    assert held >= reply.usage.prompt_tokens
    # 8 slots (--max-batch) of the 256-token window (--ctx).
    assert server.metric('llamachat_kv_cache_capacity_tokens{model="tiny"}') == 8 * 256
    assert server.metric('llamachat_batch_running{model="tiny"}') == 0
    assert server.metric('llamachat_batch_size{model="tiny"}') == 0


HALF_REPLY = "The fox jumps over"
LEFT_OPEN = f"<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n{HALF_REPLY}"


def test_continue_final_message_goes_on_from_the_reply_left_open(client):
    """As vLLM's extension: the reply is what follows the assistant's text, the prompt the
    conversation with that turn not closed (the tiny model's ChatML), token for token."""
    messages = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": HALF_REPLY},
    ]
    extension = {"continue_final_message": True, "add_generation_prompt": False}
    continued = client.chat.completions.create(
        model="tiny", messages=messages, extra_body=extension, **GREEDY
    )
    raw = client.completions.create(model="tiny", prompt=LEFT_OPEN, **GREEDY)
    assert continued.choices[0].message.content == raw.choices[0].text
    assert continued.usage.prompt_tokens == raw.usage.prompt_tokens
    new_turn = client.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    assert new_turn.usage.prompt_tokens > continued.usage.prompt_tokens  # a turn opened after


@pytest.mark.parametrize(
    ("fields", "last", "param"),
    [
        ({"continue_final_message": True}, "assistant", "add_generation_prompt"),  # as vLLM
        ({"continue_final_message": True, "add_generation_prompt": False}, "user", "messages"),
        ({"add_generation_prompt": False}, "assistant", "add_generation_prompt"),
    ],
)
def test_continue_final_message_needs_a_reply_to_continue_and_no_new_turn(
    client, fields, last, param
):
    messages = [{"role": "user", "content": "Hello"}, {"role": last, "content": "Hi"}]
    status, error = error_of(
        lambda: client.chat.completions.create(
            model="tiny", messages=messages, extra_body=fields, **GREEDY
        )
    )
    assert status == 400 and error["param"] == param
