"""`python -m bluelm_jax serve` in a subprocess, driven by the real `openai` client (and raw HTTP
for the malformed requests): a random-weight checkpoint with an API key, and the default model.
Tool calls on fixed model outputs go through the same app in this process, over a scripted engine,
and /health over a real engine whose device loop fails.
"""

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import openai
import pytest

import bluelm_jax
from bluelm_jax import default_model
from bluelm_jax.default_model import corpus
from bluelm_jax.generate import generate
from bluelm_jax.server import tools
from tests import server_process
from tests.server_process import KEY, ROOT, ServerProcess, free_port, http

RANDOM_NAME = "tiny-random"


@pytest.fixture(scope="module")
def random_checkpoint(hf_checkpoint):
    return hf_checkpoint("tiny")


@pytest.fixture(scope="module")
def random_server(random_checkpoint, tmp_path_factory):
    cache = tmp_path_factory.mktemp("xdg-cache")
    server = ServerProcess(["--model", random_checkpoint, "--max-batch", "4", "--max-queue", "16", "--api-key", KEY,
                            "--served-model-name", RANDOM_NAME], tmp_path_factory.mktemp("log") / "random.log",
                           env={"XDG_CACHE_HOME": str(cache)})
    server.cache = cache
    yield server
    server.stop()


@pytest.fixture(scope="module")
def random_model(random_checkpoint):
    return bluelm_jax.load(random_checkpoint)


def test_a_port_in_use_is_one_error_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "bluelm_jax", "serve", "--port", str(port), "--no-compile-cache"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr == f"python -m bluelm_jax serve: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


# ------------------------------------------------------------------ random weights, API key


def test_models_and_the_compile_cache(random_server):
    models = random_server.client().models.list()
    assert [m.id for m in models.data] == [RANDOM_NAME]
    cached = [f for _, _, files in os.walk(random_server.cache / "bluelm-jax" / "jax-compile") for f in files]
    assert cached, "the persistent compilation cache is on by default and holds the compiled programs"


def test_the_api_key_is_required(random_server):
    with pytest.raises(openai.AuthenticationError) as e:
        random_server.client(key="wrong").models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    status, text = http("POST", random_server.url + "/v1/completions", {"prompt": "x"})
    assert status == 401 and "API key" in json.loads(text)["error"]["message"]
    assert http("GET", random_server.url + "/health")[0] == 200  # not a /v1 route


def test_streamed_chat_equals_the_whole_answer_and_generate(random_server, random_model):
    client = random_server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you?"}]
    whole = client.chat.completions.create(model=RANDOM_NAME, messages=messages, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model=RANDOM_NAME, messages=messages, max_tokens=24,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = generate(random_model, messages, chat=True, max_new_tokens=24, repetition_penalty=1.1)  # chat's default
    assert whole.choices[0].message.content == streamed == expected.texts[0]
    assert whole.choices[0].finish_reason == [c for c in chunks if c.choices][-1].choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == len(expected.prompt_ids[0]) and whole.usage.completion_tokens == 24
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].choices == []


def test_seeded_choices_are_reproducible(random_server):
    client = random_server.client()
    kwargs = dict(model=RANDOM_NAME, prompt="The weather is", max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    a = client.completions.create(n=2, **kwargs)
    b = client.completions.create(**kwargs)
    assert a.choices[0].text == b.choices[0].text  # choice 0 uses the seed itself
    assert a.choices[1].text != a.choices[0].text  # choice 1 uses seed + 1


def test_a_stop_string_ends_the_text_before_it(random_server):
    client = random_server.client()
    kwargs = dict(model=RANDOM_NAME, prompt="The quick brown fox", max_tokens=30, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    stop = next(full[i:i + 2] for i in range(8, len(full) - 2) if full[i:i + 2].strip() == full[i:i + 2])
    stopped = finished(settled(random_server), "stop")
    whole = client.completions.create(stop=[stop], **kwargs)
    streamed = list(client.completions.create(stop=[stop], stream=True, **kwargs))
    assert whole.choices[0].text == "".join(c.choices[0].text for c in streamed) == full[:full.index(stop)]
    assert whole.choices[0].finish_reason == streamed[-1].choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens < 30
    m = idle_after(random_server, "stop", stopped, 2)  # the engine was told: both ended as "stop", not at 30 tokens
    assert finished(m, "stop") - stopped == 2


def log_softmax(model, ids):
    """[n, vocab] float64 log-softmax of the model's logits over ids (unpadded)."""
    logits = np.asarray(model.logits([ids])[0], np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_echo_logprobs_equal_the_models_log_softmax(random_server, random_model):
    prompt = "Once upon a time, a small cat"
    out = random_server.client().completions.create(model=RANDOM_NAME, prompt=prompt, max_tokens=5, temperature=0,
                                                    echo=True, logprobs=3)
    choice = out.choices[0]
    expected = generate(random_model, prompt, max_new_tokens=5)
    ids = expected.prompt_ids[0] + expected.ids[0]
    assert choice.text == prompt + expected.texts[0]
    lp = log_softmax(random_model, ids)
    assert len(choice.logprobs.token_logprobs) == len(ids) and choice.logprobs.token_logprobs[0] is None
    np.testing.assert_allclose(choice.logprobs.token_logprobs[1:], lp[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)
    pieces = random_model.tokenizer.vocab_size  # alternatives are pieces of the tokenizer
    for i in range(1, len(ids)):  # two pieces with the same text share one entry: the better one
        best = np.sort(lp[i - 1, :pieces])[::-1][:3]
        values = sorted(choice.logprobs.top_logprobs[i].values(), reverse=True)
        assert values[0] == pytest.approx(best[0], abs=1e-4)
        assert all(np.abs(best - v).min() < 1e-4 for v in values)
    assert "".join(choice.logprobs.tokens) == random_model.tokenizer.decode(ids)


def test_max_tokens_0_scores_a_token_id_prompt(random_server, random_model):
    ids = random_model.tokenizer.encode("The quick brown fox jumps")
    out = random_server.client().completions.create(model=RANDOM_NAME, prompt=ids, max_tokens=0, echo=True,
                                                    logprobs=1)
    lp = log_softmax(random_model, ids)
    np.testing.assert_allclose(out.choices[0].logprobs.token_logprobs[1:], lp[np.arange(len(ids) - 1), ids[1:]],
                               atol=1e-4)
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(ids)


BAD_REQUESTS = [
    ("/v1/chat/completions", b'{"messages": [', 400, "not valid JSON"),
    ("/v1/completions", {"prompt": [5] * 3000, "max_tokens": 4}, 400, "3000"),
    ("/v1/completions", {"prompt": "hello", "max_tokens": 2047}, 400, "2047"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": 7}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, 400, "assistant"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "gpt-4"),
    ("/v1/completions", {"prompt": [700]}, 400, "vocabulary"),
]


@pytest.mark.parametrize("path, body, status, words", BAD_REQUESTS)
def test_bad_requests_get_their_status_and_a_json_error(random_server, path, body, status, words):
    got, text = http("POST", random_server.url + path, body, {"Authorization": f"Bearer {KEY}"})
    error = json.loads(text)["error"]
    assert got == status and words in error["message"], error
    assert http("GET", random_server.url + "/health")[0] == 200


def wait_for(server, condition, timeout=20.0) -> dict:
    """The metrics once condition(metrics) holds (or the last ones after timeout seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if condition(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def idle(m) -> bool:
    return m["bluelm_active_slots"] == 0 and m["bluelm_queue_depth"] == 0


def finished(m, reason: str) -> float:
    return m.get(f'bluelm_requests_finished_total{{reason="{reason}"}}', 0)


def settled(server) -> dict:
    """The metrics once the server is idle and its finished counts stay put (a slot is freed a
    moment before its request is counted)."""
    last = None
    while True:
        m = wait_for(server, idle)
        counts = {k: v for k, v in m.items() if k.startswith("bluelm_requests_finished_total")}
        if counts == last:
            return m
        last = counts
        time.sleep(0.2)


def idle_after(server, reason: str, before: float, count: int) -> dict:
    """The metrics once the server is idle and `count` more requests finished for `reason` (a slot is
    freed a moment before its request is counted)."""
    return wait_for(server, lambda m: idle(m) and finished(m, reason) - before >= count)


def long_stream(client):
    """A streamed completion that runs to the context's end: greedy, since the random model's
    greedy continuation of this prompt never reaches </s> (a sampled one may, and end early)."""
    return client.completions.create(model=RANDOM_NAME, prompt="Tell me a story", max_tokens=2000, temperature=0,
                                     stream=True)


def test_a_full_queue_gets_429_and_closed_streams_free_their_slots(random_server):
    client = random_server.client()
    streams, refused = [], None
    try:
        for _ in range(60):  # 16 places: the queue fills however fast the 4 slots turn over
            try:
                streams.append(long_stream(client))
            except openai.RateLimitError as e:
                refused = e
                break
        assert refused is not None and refused.status_code == 429 and refused.body["code"] == "queue_full"
        assert "16 requests are already waiting" in refused.body["message"] and len(streams) >= 16
        assert next(iter(streams[0])).choices[0].text is not None  # the server streams on
    finally:
        for s in streams:
            s.close()
    m = wait_for(random_server, idle)
    assert idle(m)
    assert m['bluelm_requests_total{route="/v1/completions",status="429"}'] >= 1


def test_ten_clients_that_leave_mid_stream_free_their_slots(random_server):
    client = random_server.client()
    before = finished(settled(random_server), "cancelled")

    def leave_after_three_chunks(_):
        stream = long_stream(client)
        pieces = [c.choices[0].text for _, c in zip(range(3), stream)]
        stream.close()
        return len(pieces)

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        assert list(pool.map(leave_after_three_chunks, range(10))) == [3] * 10
    m = idle_after(random_server, "cancelled", before, 10)
    assert idle(m) and finished(m, "cancelled") - before == 10
    after = client.completions.create(model=RANDOM_NAME, prompt="still there?", max_tokens=3, temperature=0)
    assert after.choices[0].finish_reason == "length" and after.usage.completion_tokens == 3
    m = random_server.metrics()
    assert m["bluelm_time_to_first_token_seconds_count"] > 0 and m["bluelm_tokens_generated_total"] > 0


def test_a_client_that_leaves_before_a_whole_answer_frees_its_slot(random_server):
    before = finished(settled(random_server), "cancelled")
    body = json.dumps({"prompt": "Tell me a story", "max_tokens": 2000, "temperature": 0}).encode()  # as long_stream
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", random_server.port)) as sock:  # not streamed
        sock.sendall(head + body)
        m = wait_for(random_server, lambda m: m["bluelm_active_slots"] == 1)
        assert m["bluelm_active_slots"] == 1
    m = idle_after(random_server, "cancelled", before, 1)
    assert idle(m) and finished(m, "cancelled") - before == 1


# ------------------------------------------------------------------ the default model


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    server = server_process.default_server(tmp_path_factory.mktemp("log") / "default.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def default():
    return bluelm_jax.load(default_model.path())


def test_default_model_chat_streamed_and_not(default_server, default):
    client = default_server.client(key="unused")
    messages = [{"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model="bluelm-default", messages=messages, temperature=0, max_tokens=24)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="bluelm-default", messages=messages, temperature=0, max_tokens=24, stream=True))
    expected = generate(default, messages, chat=True, max_new_tokens=24, repetition_penalty=1.1)
    assert whole.choices[0].message.content == streamed == expected.texts[0] != ""
    assert whole.choices[0].finish_reason == "stop" and whole.usage.completion_tokens == len(expected.ids[0])


def test_max_len_bounds_a_request(default_server):
    client = default_server.client(key="unused")
    assert client.models.list().data[0].max_model_len == 512
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="bluelm-default", prompt="Hello", max_tokens=600)
    assert "512" in e.value.body["message"] and "600" in e.value.body["message"]


CONCURRENT_PROMPTS = ["Hello", "The weather is sunny and warm in the morning.", "1 2 3 4 5",
                      "Once upon a time, a small cat lived in a quiet village."]  # all in one prompt bucket


def concurrent_request(i: int) -> dict:
    """Request i of 32: prompts of mixed lengths, max_tokens 4..15, every other one sampled with a seed."""
    sampled = dict(temperature=0.9, top_p=0.9, top_k=20, repetition_penalty=1.2, seed=100 + i) if i % 2 else \
        dict(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=0)
    return dict(prompt=CONCURRENT_PROMPTS[i % 4] + " " * (i // 4 % 2), max_tokens=4 + (i * 7) % 12, **sampled)


def test_32_concurrent_clients_get_their_solo_results(default_server, default):
    client = default_server.client(key="unused")

    def send(i):
        r = dict(concurrent_request(i))
        extra = {"top_k": r.pop("top_k"), "repetition_penalty": r.pop("repetition_penalty")}
        out = client.completions.create(model="bluelm-default", extra_body=extra, **r)
        return out.choices[0].text, out.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(send, range(8)))  # warm-up: greedy and sampled, every prompt
        compiles = default_server.metrics()["bluelm_engine_compiles_total"]
        results = list(pool.map(send, range(32)))
    for i, (text, count) in enumerate(results):
        r = concurrent_request(i)
        solo = generate(default, r.pop("prompt"), max_new_tokens=r.pop("max_tokens"), **r)
        assert (text, count) == (solo.texts[0], len(solo.ids[0])), i
    m = wait_for(default_server, idle)
    assert idle(m) and m["bluelm_engine_compiles_total"] == compiles


WEATHER = corpus.TOOLS[0]  # get_weather(city), one of the tools the default model was trained with


def chat_reply(client, stream: bool, **kwargs) -> tuple:
    """(content or None, tool calls as message dicts, finish reason) of one chat request, streamed or not."""
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        calls = [c.model_dump(include={"id", "type", "function"}) for c in choice.message.tool_calls or []]
        return choice.message.content, calls, choice.finish_reason
    chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    content = "".join(c.choices[0].delta.content or "" for c in chunks) or None
    calls = [{"id": t.id, "type": t.type, "function": {"name": t.function.name, "arguments": t.function.arguments}}
             for c in chunks for t in c.choices[0].delta.tool_calls or []]
    return content, calls, chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("stream", [False, True])
def test_the_default_model_calls_a_tool_and_answers_with_its_result(default_server, default, stream):
    """A trained question with tools=corpus.TOOLS gets the tool call; the call and its result sent
    back get the trained answer. Greedy, with chat's default repetition penalty 1.1."""
    question, name, arguments, result, answer = corpus.TOOL_CALLS[0]
    client = default_server.client(key="unused")
    ask = dict(model="bluelm-default", tools=corpus.TOOLS, temperature=0, max_tokens=48)
    messages = [{"role": "user", "content": question}]
    content, calls, finish = chat_reply(client, stream, messages=messages, **ask)
    assert (content, finish, len(calls)) == (None, "tool_calls", 1)
    assert calls[0]["function"]["name"] == name and json.loads(calls[0]["function"]["arguments"]) == arguments
    messages += [{"role": "assistant", "content": None, "tool_calls": calls},
                 {"role": "tool", "tool_call_id": calls[0]["id"], "content": result}]
    assert chat_reply(client, stream, messages=messages, **ask) == (answer, [], "stop")
    if not stream:  # the prompt is the one the model was trained on, token for token
        usage = client.chat.completions.create(messages=messages, **ask).usage
        trained = tools.prompt_messages(corpus.tool_call_messages(*corpus.TOOL_CALLS[0]), corpus.TOOLS)[:4]
        assert usage.prompt_tokens == len(default.tokenizer.encode_chat(trained))


# ------------------------------------------------------------------ tool calls on fixed model outputs


class ScriptedHandle:
    """An engine handle that replays fixed ids then ends with a stop id."""

    def __init__(self, ids, stop_id):
        self.ids_out = list(ids) + [stop_id]
        self.finish_reason = None
        self.prompt_tokens = 0
        self.submitted_at = self.first_token_at = time.perf_counter()
        self.finished_at = None

    async def atokens(self):
        for t in self.ids_out:
            yield t
        self.finish_reason, self.finished_at = "stop", time.perf_counter()

    def cancel(self):
        self.finish_reason = self.finish_reason or "cancelled"

    stop = cancel

    @property
    def completion_tokens(self):
        return len(self.ids_out)


class ScriptedEngine:
    """Answers every request with the ids of `answer` (the model output under test)."""

    failure = None  # it never fails

    def __init__(self, model, answer):
        self.model, self.answer = model, answer

    def submit(self, request):
        return ScriptedHandle(self.model.tokenizer.encode(self.answer, add_bos=False), self.model.tokenizer.eos_id)

    def stats(self):
        from bluelm_jax.engine import EngineStats

        return EngineStats(active_slots=0, queue_depth=0, max_batch=1, max_queue=1, tokens_generated=0, finished={},
                           compiles=0)


@contextlib.contextmanager
def app_in_thread(engine, model, name):
    """The app over `engine` served by uvicorn in a thread of this process; yields its base URL."""
    import uvicorn

    from bluelm_jax.server.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, model, name), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def scripted_server(default):
    """An in-process uvicorn over the app with a ScriptedEngine; set .engine.answer per test."""
    engine = ScriptedEngine(default, "")
    with app_in_thread(engine, default, "scripted") as url:
        yield engine, openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


CALL = '{"answer": "", "function_calls": [{"name": "get_weather", "parameters": {"city": "北京"}}]}'


@pytest.mark.parametrize("stream", [False, True])
def test_a_json_answer_becomes_tool_calls(scripted_server, stream):
    engine, client = scripted_server
    engine.answer = CALL
    kwargs = dict(model="scripted", messages=[{"role": "user", "content": "北京天气"}], tools=[WEATHER])
    content, calls, finish = chat_reply(client, stream, **kwargs)
    assert (content, finish, len(calls)) == (None, "tool_calls", 1)
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "北京"}'}
    assert re.fullmatch(r"call_[0-9a-f]{24}", calls[0]["id"])


@pytest.mark.parametrize("stream", [False, True])
def test_text_that_is_not_a_call_stays_content(scripted_server, stream):
    engine, client = scripted_server
    engine.answer = "{not json, just braces"
    kwargs = dict(model="scripted", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER])
    assert chat_reply(client, stream, **kwargs) == ("{not json, just braces", [], "stop")


# ------------------------------------------------------------------ /health over a real engine


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_is_503_once_the_engine_failed_or_closed(default):
    """A real engine over a model whose lm_head does not fit its config: the first request makes
    the device loop's prefill raise; /health then names that failure."""
    from bluelm_jax.engine import Engine

    kernel = default.params["lm_head"]["kernel"]  # [hidden, vocab]
    broken = dataclasses.replace(default, params={**default.params, "lm_head": {"kernel": kernel[:-1]}})
    engine = Engine(broken, max_batch=1, max_len=64)
    try:
        with app_in_thread(engine, broken, "broken") as url:
            status, text = http("GET", url + "/health")
            assert status == 200 and json.loads(text)["status"] == "ok"
            status, _ = http("POST", url + "/v1/completions", {"model": "broken", "prompt": "Hello", "max_tokens": 2})
            assert status == 500
            status, text = http("GET", url + "/health")
            error = json.loads(text)["error"]
            assert status == 503 and error["type"] == "server_error" and error["code"] == "engine_unavailable"
            assert error["message"].startswith("the engine failed: TypeError: ") and "dot_general" in error["message"]
    finally:
        engine.close()
    assert engine.failure.startswith("the engine failed: TypeError")

    healthy = Engine(default, max_batch=1, max_len=64)
    with app_in_thread(healthy, default, "closed") as url:
        assert http("GET", url + "/health")[0] == 200
        healthy.close()
        status, text = http("GET", url + "/health")
    assert status == 503 and json.loads(text)["error"]["message"] == "the engine is closed"
