"""OpenAI request bodies -> validated options, and OpenAI-style errors with their HTTP status.

Every problem with a request is an `APIError`: its status (400 bad request, 401 key, 404
model, 429 queue full) and the body `{"error": {"message", "type", "param", "code"}}` that
OpenAI clients read. Fields the server cannot honour (frequency penalties, logit bias, ...)
are refused with 400 rather than silently ignored; unknown fields are ignored, as OpenAI does.

Defaults: chat uses the release's demo settings (temperature 0.8, top-p 0.8, repetition
penalty 1.1); completions use OpenAI's (temperature 1, top-p 1, no penalty, 16 tokens), so
that scoring and benchmark harnesses get the raw model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
from typing import Any, Optional, Union

MAX_N = 16  # choices per prompt
MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20  # top alternatives per token on /v1/completions
SEED_LIMIT = 2**32

CHAT_DEFAULTS = {"temperature": 0.8, "top_p": 0.8, "repetition_penalty": 1.1}
COMPLETION_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.0}
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class APIError(Exception):
    """An error answered to the client: HTTP `status` and an OpenAI error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        """The JSON body: {"error": {...}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    """A 400 invalid_request_error."""
    return APIError(400, message, param=param, code=code)


def unauthorized() -> APIError:
    """401: the Authorization header is missing or holds another key."""
    return APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key")


def queue_full(max_queue: int) -> APIError:
    """429: the engine's wait queue is full."""
    return APIError(429, f"the server is busy: {max_queue} requests are already waiting; retry later",
                    type="rate_limit_error", code="queue_full")


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body; 400 when it is not JSON or not an object."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def check_model(body: dict, served_model_name: str) -> None:
    """404 when the body names a model other than the one served (a missing name means that one)."""
    name = body.get("model")
    if name is None or name == served_model_name:
        return
    if not isinstance(name, str):
        raise bad_request("model must be a string", param="model")
    raise APIError(404, f"the model {name!r} does not exist; this server serves {served_model_name!r}",
                   param="model", code="model_not_found")


# ------------------------------------------------------------------ typed fields


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def get_int(body: dict, name: str, default: Optional[int], low: Optional[int] = None,
            high: Optional[int] = None) -> Optional[int]:
    """body[name] as an integer in [low, high] (None or absent: default); else 400."""
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise bad_request(f"{name} must be an integer, got {value!r:.40}", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise bad_request(f"{name} must be in {bounds}, got {value}", param=name)
    return value


def get_float(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    """body[name] as a finite number in [low, high] ((low, high] if low_open); else 400."""
    value = body.get(name)
    if value is None:
        return default
    too_low = _is_number(value) and (value <= low if low_open else value < low)
    if not _is_number(value) or too_low or value > high:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise bad_request(f"{name} must be a number in {interval}, got {value!r:.40}", param=name)
    return float(value)


def get_bool(body: dict, name: str, default: bool = False) -> bool:
    """body[name] as a boolean; else 400."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, got {value!r:.40}", param=name)
    return value


def _refuse_unsupported(body: dict) -> None:
    """400 for options that would change the answer but that the server does not implement."""
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise bad_request(f"{name} is not supported (use repetition_penalty)", param=name)
    if body.get("logit_bias"):
        raise bad_request("logit_bias is not supported", param="logit_bias")


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    strings = [stop] if isinstance(stop, str) else stop
    if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
        raise bad_request("stop must be a string or a list of strings", param="stop")
    if len(strings) > MAX_STOP_STRINGS:
        raise bad_request(f"stop has {len(strings)} strings; at most {MAX_STOP_STRINGS}", param="stop")
    if any(not s for s in strings):
        raise bad_request("a stop string must not be empty", param="stop")
    return tuple(strings)


# ------------------------------------------------------------------ sampling


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The sampling options of one request (shared by its choices)."""

    max_tokens: Optional[int]  # None: up to the end of the context
    temperature: float  # 0: greedy
    top_p: float
    top_k: int  # 0: off
    repetition_penalty: float  # 1: off
    seed: int  # choice i uses (seed + i) mod 2**32
    stop: tuple[str, ...]
    n: int

    def choice_seed(self, i: int) -> int:
        """The seed of choice i."""
        return (self.seed + i) % SEED_LIMIT


def parse_sampling(body: dict, defaults: dict, max_tokens_low: int,
                   default_max_tokens: Optional[int] = None) -> Sampling:
    """The sampling options of a chat or completion body (`repetition_penalty` and `top_k` are
    extra fields); 400 on a missing-type or out-of-range value. A missing seed is a random one."""
    _refuse_unsupported(body)
    max_tokens = get_int(body, "max_tokens", default_max_tokens)
    if body.get("max_completion_tokens") is not None:  # the newer name of the chat field
        max_tokens = get_int(body, "max_completion_tokens", None)
    if max_tokens is not None and max_tokens < max_tokens_low:
        name = "max_tokens" if body.get("max_completion_tokens") is None else "max_completion_tokens"
        raise bad_request(f"{name} must be at least {max_tokens_low}, got {max_tokens}", param=name)
    seed = get_int(body, "seed", None, 0, SEED_LIMIT - 1)
    return Sampling(
        max_tokens=max_tokens,
        temperature=get_float(body, "temperature", defaults["temperature"], 0.0, 2.0),
        top_p=get_float(body, "top_p", defaults["top_p"], 0.0, 1.0, low_open=True),
        top_k=get_int(body, "top_k", 0, 0, None),
        repetition_penalty=get_float(body, "repetition_penalty", defaults["repetition_penalty"], 0.0, 100.0,
                                     low_open=True),
        seed=secrets.randbelow(SEED_LIMIT) if seed is None else seed,
        stop=_stop_strings(body),
        n=get_int(body, "n", 1, 1, MAX_N),
    )


def new_token_budget(prompt_tokens: int, max_tokens: Optional[int], context: int) -> int:
    """How many tokens a request may generate: max_tokens, or what the context leaves when it
    is None. 400 (stating the numbers) when the prompt, or the prompt plus max_tokens, does not fit."""
    if prompt_tokens >= context:
        raise bad_request(f"the prompt has {prompt_tokens} tokens, but the model's context is {context} tokens "
                          f"(leaving no room for new tokens)", code="context_length_exceeded")
    if max_tokens is None:
        return context - prompt_tokens
    if prompt_tokens + max_tokens > context:
        raise bad_request(f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: "
                          f"{prompt_tokens + max_tokens} tokens, more than the model's context of {context} tokens",
                          param="max_tokens", code="context_length_exceeded")
    return max_tokens


# ------------------------------------------------------------------ the two endpoints


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """A parsed /v1/chat/completions body (messages still in OpenAI form: tools.py converts them)."""

    messages: list
    tools: Optional[list]  # None: no function calling
    sampling: Sampling
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage


def _include_usage(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise bad_request("stream_options must be an object", param="stream_options")
    if not stream:
        raise bad_request("stream_options is only allowed with stream: true", param="stream_options")
    return get_bool(options, "include_usage")


def parse_chat(body: dict) -> ChatRequest:
    """The chat request of a body; 400 on bad fields (max_tokens must be >= 1)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", param="messages")
    if get_bool(body, "logprobs") or body.get("top_logprobs") is not None:
        raise bad_request("logprobs are served by /v1/completions only", param="logprobs")
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise bad_request(f"tool_choice {choice!r:.60} is not supported: use 'auto' or 'none'", param="tool_choice")
    if tools is not None and not isinstance(tools, list):
        raise bad_request("tools must be a list", param="tools")
    stream = get_bool(body, "stream")
    return ChatRequest(messages=messages, tools=(tools or None) if choice != "none" else None,
                       sampling=parse_sampling(body, CHAT_DEFAULTS, max_tokens_low=1),
                       stream=stream, include_usage=_include_usage(body, stream))


Prompt = Union[str, list]  # text, or token ids


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    """A parsed /v1/completions body."""

    prompts: list  # of Prompt: one entry per prompt of the batch
    echo: bool
    logprobs: Optional[int]  # top alternatives per token; None: no logprobs
    sampling: Sampling
    stream: bool
    include_usage: bool


def _prompts(body: dict) -> list:
    """The prompt field as a list of prompts: text, token ids, or a list of either."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    else:
        raise bad_request("prompt must be a string, a list of token ids, or a non-empty list of those",
                          param="prompt")
    for p in prompts:
        is_ids = isinstance(p, list) and p and all(_is_int(t) for t in p)
        if not (isinstance(p, str) and p) and not is_ids:
            raise bad_request("each prompt must be a non-empty string or a non-empty list of token ids",
                              param="prompt")
    return prompts


def parse_completion(body: dict) -> CompletionRequest:
    """The completion request of a body; 400 on bad fields. max_tokens 0 scores the prompt only."""
    if body.get("suffix"):
        raise bad_request("suffix is not supported", param="suffix")
    if body.get("best_of") not in (None, 1):
        raise bad_request("best_of is not supported", param="best_of")
    stream = get_bool(body, "stream")
    return CompletionRequest(prompts=_prompts(body), echo=get_bool(body, "echo"),
                             logprobs=get_int(body, "logprobs", None, 0, MAX_LOGPROBS),
                             sampling=parse_sampling(body, COMPLETION_DEFAULTS, max_tokens_low=0,
                                                     default_max_tokens=COMPLETION_MAX_TOKENS),
                             stream=stream, include_usage=_include_usage(body, stream))
