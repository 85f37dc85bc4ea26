"""The FastAPI application: OpenAI routes over an engine (`create_app`).

    GET  /v1/models             the one served model
    POST /v1/chat/completions   chat through BlueLM's template; streamed (SSE) or not; tools
    POST /v1/completions        text or token-id prompts; echo; logprobs; max_tokens 0 scores a prompt
    GET  /health                200 while the engine runs; 503 with the reason once it failed or closed
    GET  /metrics               Prometheus text (metrics.py)

Every request error is an OpenAI error object with its status (schema.py). With an API key,
the /v1 routes need `Authorization: Bearer KEY`. A streamed request whose client goes away
is cancelled at once (the stream's task is cancelled, `Choice.pieces` cancels its request);
a non-streamed one is cancelled by a watcher that polls for the disconnect.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import AsyncIterator, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from bluelm_jax import planning
from bluelm_jax.engine import EngineRequest, QueueFullError
from bluelm_jax.server import schema, scoring, tools
from bluelm_jax.server.generation import Choice
from bluelm_jax.server.metrics import CONTENT_TYPE, Metrics
from bluelm_jax.server.schema import APIError, bad_request

ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics")
DISCONNECT_POLL_S = 0.1


class CountRequests:
    """ASGI middleware: counts answered HTTP requests by route and status (streams untouched)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class Server:
    """The state the routes share: engine, model, names, metrics."""

    def __init__(self, engine, model, served_model_name: str, api_key: Optional[str]):
        self.engine, self.model, self.name, self.api_key = engine, model, served_model_name, api_key
        self.tokenizer = model.tokenizer
        self.metrics = Metrics(engine)
        # prompt + new tokens of one request: the engine's max_len when it is smaller than the context
        self.context = min(model.config.context_length, getattr(engine, "context", model.config.context_length))

    # -------------------------------------------------------------- requests to the engine

    def submit(self, prompt_ids: list[int], sampling: schema.Sampling, chat: bool) -> list[Choice]:
        """One engine request per choice (n of them), or the APIError that refuses them."""
        budget = schema.new_token_budget(len(prompt_ids), sampling.max_tokens, self.context)
        try:
            stop_ids, stop_strings = planning.stop_settings(self.model, list(sampling.stop), chat)
        except ValueError as e:
            raise bad_request(str(e), param="stop") from None
        choices: list[Choice] = []
        try:
            for i in range(sampling.n):
                request = EngineRequest(prompt_ids=tuple(prompt_ids), max_new_tokens=budget,
                                        temperature=sampling.temperature, top_p=sampling.top_p,
                                        top_k=sampling.top_k, repetition_penalty=sampling.repetition_penalty,
                                        seed=sampling.choice_seed(i), stop_ids=tuple(stop_ids))
                choices.append(Choice(self.engine.submit(request), self.tokenizer, stop_ids, stop_strings))
        except QueueFullError:
            self._cancel(choices)
            raise schema.queue_full(self.engine.stats().max_queue) from None
        except ValueError as e:  # the engine's checks (e.g. planning.ContextOverflowError)
            self._cancel(choices)
            raise bad_request(str(e)) from None
        except RuntimeError as e:  # the engine failed or is closing
            self._cancel(choices)
            raise APIError(503, f"the engine is not running: {e}", type="server_error") from None
        return choices

    @staticmethod
    def _cancel(choices: list[Choice]) -> None:
        for c in choices:
            c.cancel()

    async def collect(self, request: Request, choices: list[Choice]) -> list[str]:
        """The texts of all choices; a client that disconnects meanwhile cancels them."""
        watcher = asyncio.ensure_future(self._cancel_on_disconnect(request, choices))
        try:
            texts = await asyncio.gather(*(c.collect() for c in choices))
        finally:
            watcher.cancel()
            self._cancel(choices)  # harmless after the end; frees the slots if gather was cancelled
            for c in choices:
                self.metrics.observe(c)
        return list(texts)

    async def _cancel_on_disconnect(self, request: Request, choices: list[Choice]) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        self._cancel(choices)

    # -------------------------------------------------------------- prompts

    def chat_prompt(self, parsed: schema.ChatRequest) -> list[int]:
        """Token ids of the chat template over the messages (and the tools text)."""
        messages = tools.prompt_messages(parsed.messages, parsed.tools)
        try:
            return self.tokenizer.encode_chat(messages)
        except ValueError as e:
            raise bad_request(f"messages: {e}", param="messages") from None

    def completion_prompt(self, prompt) -> list[int]:
        """Token ids of a completion prompt (text gets `<s>` first; ids, which must be pieces of the
        tokenizer, are taken as they are)."""
        if isinstance(prompt, str):
            try:
                return self.tokenizer.encode(prompt, add_bos=True)
            except ValueError as e:  # e.g. a lone surrogate (UnicodeEncodeError)
                raise bad_request(f"prompt: {e}", param="prompt") from None
        pieces = min(self.model.config.vocab_size, self.tokenizer.vocab_size)
        bad = [t for t in prompt if not 0 <= t < pieces]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {pieces})", param="prompt")
        return list(prompt)


def _usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    """OpenAI usage of a response: its prompt tokens and the tokens its choices generated."""
    completion_tokens = sum(len(c.completion_ids) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _prompt_tokens(parsed: schema.CompletionRequest, prompt_ids: list[list[int]]) -> int:
    """A completion request's prompt tokens: every prompt counts once per choice (n)."""
    return sum(len(ids) for ids in prompt_ids) * parsed.sampling.n


def _sse(obj) -> dict:
    return {"data": json.dumps(obj, ensure_ascii=False)}


# ------------------------------------------------------------------ chat


def chat_message(text: str, offered_tools: bool, finish_reason: str) -> tuple[dict, str]:
    """(assistant message, finish reason) of a generated text; a JSON tool call becomes tool_calls."""
    content, calls = tools.parse_answer(text) if offered_tools else (text, None)
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
        finish_reason = "tool_calls"
    return message, finish_reason


async def chat_stream(server: Server, parsed: schema.ChatRequest, choices: list[Choice], prompt_tokens: int,
                      chunk_base: dict) -> AsyncIterator[dict]:
    """SSE events of a streamed chat: a role chunk, content deltas, a finish chunk per choice,
    the usage chunk if asked for, then [DONE]. Choices run concurrently; their chunks interleave."""
    queue: asyncio.Queue = asyncio.Queue()
    ended = object()  # a choice's task is over

    def chunk(index: int, delta: dict, finish_reason: Optional[str] = None) -> dict:
        return _sse({**chunk_base, "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}]})

    async def run(index: int, choice: Choice) -> None:
        try:
            await queue.put(chunk(index, {"role": "assistant", "content": ""}))
            holding, held = bool(parsed.tools), ""  # with tools: text that may still become a JSON call
            async for piece in choice.pieces():
                if holding:
                    held += piece
                    holding = tools.may_be_json(held)
                    if holding:
                        continue
                    piece, held = held, ""
                await queue.put(chunk(index, {"content": piece}))
            finish = choice.finish_reason
            if held:
                message, finish = chat_message(held, True, finish)
                delta = {"content": message["content"]} if message["content"] else {}
                if "tool_calls" in message:
                    delta["tool_calls"] = [{"index": j, **call} for j, call in enumerate(message["tool_calls"])]
                await queue.put(chunk(index, delta))
            await queue.put(chunk(index, {}, finish))
            server.metrics.observe(choice)
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put(e)
        finally:
            queue.put_nowait(ended)

    tasks = [asyncio.ensure_future(run(i, c)) for i, c in enumerate(choices)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is ended:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
        if parsed.include_usage:
            yield _sse({**chunk_base, "choices": [], "usage": _usage(prompt_tokens, choices)})
        yield {"data": "[DONE]"}
    finally:
        for t in tasks:
            t.cancel()
        Server._cancel(choices)


# ------------------------------------------------------------------ completions


def logprobs_object(tokenizer, ids: list[int], scores: Optional[scoring.TokenScores], start: int) -> dict:
    """OpenAI completion logprobs of ids[start:] (the first id of a sequence has none); text
    offsets count from the start of the choice's text."""
    texts = scoring.token_texts(tokenizer, ids)
    token_logprobs, top, offsets, offset = [], [], [], 0
    for i in range(start, len(ids)):
        offsets.append(offset)
        offset += len(texts[i])
        if i == 0:
            token_logprobs.append(None)
            top.append(None)
            continue
        token_logprobs.append(float(scores.token_logprobs[i - 1]))
        alternatives: dict = {}
        for t, lp in zip(scores.top_ids[i - 1], scores.top_logprobs[i - 1]):  # best first: it keeps a shared text
            alternatives.setdefault(scoring.token_text(tokenizer, ids, i, int(t)), float(lp))
        top.append(alternatives)
    return {"tokens": texts[start:], "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": offsets}


async def completion_choice(server: Server, parsed: schema.CompletionRequest, prompt, prompt_ids: list[int],
                            choice: Optional[Choice], text: str) -> dict:
    """One completion choice: the echo, the text and (if asked) the logprobs of both."""
    tok = server.tokenizer
    echoed = (prompt if isinstance(prompt, str) else tok.decode(prompt_ids)) if parsed.echo else ""
    generated = choice.completion_ids if choice is not None else []
    logprobs = None
    if parsed.logprobs is not None:
        ids = prompt_ids + generated
        start = 0 if parsed.echo else len(prompt_ids)
        scores = await asyncio.to_thread(scoring.score, server.model, ids, parsed.logprobs) if len(ids) > 1 else None
        logprobs = logprobs_object(tok, ids, scores, start)
    finish = choice.finish_reason if choice is not None else "length"
    return {"text": echoed + text, "index": 0, "logprobs": logprobs, "finish_reason": finish}


# ------------------------------------------------------------------ the app


def create_app(engine, model, served_model_name: str, api_key: Optional[str] = None) -> FastAPI:
    """The OpenAI-compatible app over `engine` (bluelm_jax.engine.Engine) for `model` (bluelm_jax.load)."""
    server = Server(engine, model, served_model_name, api_key)
    app = FastAPI(title="bluelm-jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(_request, e: APIError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, e: StarletteHTTPException):
        return _error_response(APIError(e.status_code, str(e.detail), code=None))

    @app.exception_handler(Exception)
    async def internal_error(_request, e: Exception):
        return _error_response(APIError(500, f"internal error ({type(e).__name__}: {e})", type="server_error"))

    async def require_key(request: Request) -> None:
        if server.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {server.api_key}".encode()):
            raise schema.unauthorized()

    async def read_body(request: Request) -> dict:
        body = schema.parse_body(await request.body())
        schema.check_model(body, server.name)
        return body

    @app.get("/health")
    async def health():
        failure = server.engine.failure
        if failure is not None:
            raise APIError(503, failure, type="server_error", code="engine_unavailable")
        stats = server.engine.stats()
        return {"status": "ok", "active_slots": stats.active_slots, "queue_depth": stats.queue_depth}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models():
        card = {"id": server.name, "object": "model", "created": int(time.time()), "owned_by": "bluelm-jax",
                "max_model_len": server.context}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(request: Request):
        parsed = schema.parse_chat(await read_body(request))
        prompt_ids = server.chat_prompt(parsed)
        choices = server.submit(prompt_ids, parsed.sampling, chat=True)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.name}
        if parsed.stream:
            events = chat_stream(server, parsed, choices, len(prompt_ids), {**base, "object": "chat.completion.chunk"})
            return EventSourceResponse(events, ping=15)
        texts = await server.collect(request, choices)
        out = []
        for i, (choice, text) in enumerate(zip(choices, texts)):
            message, finish = chat_message(text, bool(parsed.tools), choice.finish_reason)
            out.append({"index": i, "message": message, "finish_reason": finish, "logprobs": None})
        return {**base, "object": "chat.completion", "choices": out, "usage": _usage(len(prompt_ids), choices)}

    @app.post("/v1/completions", dependencies=[Depends(require_key)])
    async def completions(request: Request):
        parsed = schema.parse_completion(await read_body(request))
        if parsed.stream and parsed.logprobs is not None:
            raise bad_request("logprobs are not streamed: send stream false", param="logprobs")
        prompt_ids = [server.completion_prompt(p) for p in parsed.prompts]
        generating = parsed.sampling.max_tokens != 0
        for ids in prompt_ids:  # all prompts checked before any is submitted
            if generating:
                schema.new_token_budget(len(ids), parsed.sampling.max_tokens, server.context)
            elif len(ids) > server.context:
                raise bad_request(f"the prompt has {len(ids)} tokens, but the model's context is "
                                  f"{server.context} tokens", code="context_length_exceeded")
        choices: list[list[Optional[Choice]]] = []
        try:
            for ids in prompt_ids:
                choices.append(server.submit(ids, parsed.sampling, chat=False) if generating
                               else [None] * parsed.sampling.n)
        except APIError:
            Server._cancel([c for row in choices for c in row if c is not None])
            raise
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.name,
                "object": "text_completion"}
        if parsed.stream:
            return EventSourceResponse(completion_stream(server, parsed, prompt_ids, choices, base), ping=15)
        flat = [c for row in choices for c in row if c is not None]
        texts = iter(await server.collect(request, flat)) if flat else iter(())
        out = []
        for p, (prompt, ids, row) in enumerate(zip(parsed.prompts, prompt_ids, choices)):
            for j, choice in enumerate(row):
                text = next(texts) if choice is not None else ""
                item = await completion_choice(server, parsed, prompt, ids, choice, text)
                out.append({**item, "index": p * parsed.sampling.n + j})
        return {**base, "choices": out, "usage": _usage(_prompt_tokens(parsed, prompt_ids), flat)}

    app.add_middleware(CountRequests, metrics=server.metrics)
    return app


async def completion_stream(server: Server, parsed: schema.CompletionRequest, prompt_ids: list[list[int]],
                            choices: list[list[Optional[Choice]]], base: dict) -> AsyncIterator[dict]:
    """SSE events of a streamed completion: choice after choice, the echo first, then the text."""
    all_choices = [c for row in choices for c in row if c is not None]
    try:
        for p, (prompt, ids, row) in enumerate(zip(parsed.prompts, prompt_ids, choices)):
            for j, choice in enumerate(row):
                index = p * parsed.sampling.n + j

                def event(text: str, finish: Optional[str] = None) -> dict:
                    return _sse({**base, "choices": [{"text": text, "index": index, "logprobs": None,
                                                      "finish_reason": finish}]})

                if parsed.echo:
                    yield event(prompt if isinstance(prompt, str) else server.tokenizer.decode(ids))
                if choice is None:
                    yield event("", "length")
                    continue
                async for piece in choice.pieces():
                    yield event(piece)
                server.metrics.observe(choice)
                yield event("", choice.finish_reason)
        if parsed.include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(_prompt_tokens(parsed, prompt_ids), all_choices)})
        yield {"data": "[DONE]"}
    finally:
        Server._cancel(all_choices)
