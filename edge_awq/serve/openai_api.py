"""The OpenAI-compatible request and response shapes that ``edge-awq serve`` speaks.

Requests are checked field by field: a wrong type or an out-of-range value is an ``ApiError``
naming the field (HTTP 400), in OpenAI's error shape; unknown fields are ignored, as OpenAI's
own API does with fields it does not use.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

from edge_awq.generate import SamplingArgs


class ApiError(Exception):
    """An error answered to the client: HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.headers = (
            status, message, param, code, type_, headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    ctx: int  # the KV cache: prompt + answer
    max_prompt_tokens: int
    max_new_tokens: int  # the most a request may ask for
    default_new_tokens: int  # what it gets when it does not ask
    max_prompt_bytes: int | None = None  # text longer than this cannot fit max_prompt_tokens: refused untokenized
    # sampling for the fields a request leaves out: the model's recommended (api.LLM.sampling), else greedy
    sampling: dict = dataclasses.field(default_factory=lambda: {"temperature": 0.0, "top_p": 1.0, "top_k": 0,
                                                                "repetition_penalty": 1.0})


@dataclass(frozen=True)
class Request:
    """A checked request: the prompt's token ids, how to sample, and how to answer."""

    kind: str  # "chat" or "completion"
    prompt: list[int]
    sampling: SamplingArgs
    stream: bool
    include_usage: bool


def _number(body: dict, name: str, lo: float, hi: float, default: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(400, f"'{name}' must be a number, got {type(v).__name__}", name, "invalid_type")
    if isinstance(v, int) and abs(v) > 2**53:  # hundreds of digits: no float holds it
        raise ApiError(400, f"'{name}' must be in [{lo}, {hi}], got a number of {len(str(abs(v)))} digits", name,
                       "invalid_value")
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        raise ApiError(400, f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name,
                       "invalid_value")
    return float(v)


def _integer(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"'{name}' must be an integer, got {type(v).__name__}", name, "invalid_type")
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop", "invalid_value")
    return tuple(stops)


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):
        return "".join(p["text"] for p in c)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content",
                   "invalid_type")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", "messages", "invalid_value")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", f"messages[{i}].role",
                           "invalid_value")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": _content(m, i)})
    return out


def _bounded(texts: list[str], param: str, limits) -> None:
    """Refuse a prompt whose text alone must exceed max_prompt_tokens, before the tokenizer sees it: no token
    covers more than the longest token's bytes, so that many bytes a token is the most that can still fit."""
    if limits is None or limits.max_prompt_bytes is None:
        return
    n = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    if n > limits.max_prompt_bytes:
        raise ApiError(400, f"the prompt is {n:,} bytes, more than {limits.max_prompt_tokens:,} tokens can hold; this "
                       f"server takes at most {limits.max_prompt_tokens:,} tokens", param, "context_length_exceeded")


def _prompt_ids(kind: str, body: dict, tokenizer, limits: Limits | None = None) -> list[int]:
    if kind == "chat":
        msgs = _messages(body)
        _bounded([m["content"] for m in msgs], "messages", limits)
        if tokenizer.chat_template:
            return tokenizer.encode_chat(msgs)
        text = "\n".join(m["content"] for m in msgs)  # no template (a story model): continue the text
        return tokenizer.encode(text, bos=tokenizer.add_bos)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string", "prompt", "invalid_value")
    _bounded([prompt], "prompt", limits)
    return tokenizer.encode(prompt, bos=tokenizer.add_bos)


def parse_request(kind: str, body, model_name: str, tokenizer, limits: Limits) -> Request:
    """Check a /v1/chat/completions ("chat") or /v1/completions ("completion") body."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "model", "invalid_type")
    if model != model_name:
        raise ApiError(404, f"The model '{model}' does not exist: this server has '{model_name}'", "model",
                       "model_not_found")
    if body.get("n", 1) != 1:
        raise ApiError(400, "'n' must be 1: one answer per request", "n", "invalid_value")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
    d = limits.sampling
    temperature = _number(body, "temperature", 0.0, 2.0, d["temperature"])
    top_p = _number(body, "top_p", 0.0, 1.0, d["top_p"], lo_open=True)
    top_k = _integer(body, "top_k")  # beyond OpenAI's fields, as vLLM takes them
    if top_k is not None and not 0 <= top_k <= 1 << 24:
        raise ApiError(400, f"'top_k' must be 0 (off) or more, got {top_k}", "top_k", "invalid_value")
    penalty = _number(body, "repetition_penalty", 0.0, 100.0, d["repetition_penalty"], lo_open=True)
    seed, stop = _integer(body, "seed"), _stop(body)
    if seed is not None and not 0 <= seed < 2**63:
        raise ApiError(400, f"'seed' must be between 0 and 2**63 - 1, got {seed}", "seed", "invalid_value")
    asked = _integer(body, "max_completion_tokens")
    asked = _integer(body, "max_tokens") if asked is None else asked
    if asked is not None and not 1 <= asked <= limits.max_new_tokens:
        raise ApiError(400, f"'max_tokens' must be between 1 and {limits.max_new_tokens}, got {asked}", "max_tokens",
                       "invalid_value")
    ids = _prompt_ids(kind, body, tokenizer, limits)
    if len(ids) > limits.max_prompt_tokens or len(ids) >= limits.ctx:
        raise ApiError(400, f"the prompt is {len(ids):,} tokens; this server takes at most "
                       f"{min(limits.max_prompt_tokens, limits.ctx - 1):,}", "messages" if kind == "chat" else "prompt",
                       "context_length_exceeded")
    room = limits.ctx - len(ids)
    if asked is not None and asked > room:
        raise ApiError(400, f"the prompt ({len(ids):,} tokens) and max_tokens ({asked:,}) exceed the context of "
                       f"{limits.ctx:,} tokens", "max_tokens", "context_length_exceeded")
    new = asked if asked is not None else min(limits.default_new_tokens, room)
    sampling = SamplingArgs(temperature=temperature, top_k=d["top_k"] if top_k is None else top_k, top_p=top_p,
                            repetition_penalty=penalty, seed=seed, max_new_tokens=new, stop=stop)
    return Request(kind, ids, sampling, stream, bool(options.get("include_usage", False)))


FINISH = {"stop": "stop", "length": "length", "cancelled": "length"}  # cancelled: cut short by the drain


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(req: Request, rid: str, model: str, text: str, finish: str, n_prompt: int, n_out: int) -> dict:
    """The whole answer of a request that did not stream."""
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": FINISH.get(finish, "stop")}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": FINISH.get(finish, "stop")}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage(n_prompt, n_out)}


def chunk(req: Request, rid: str, model: str, text: str | None, finish: str | None, first: bool = False,
          usage_: dict | None = None) -> dict:
    """One server-sent event's data while streaming; usage_ given: the usage-only chunk at the end."""
    if usage_ is not None:
        choices = []
    elif req.kind == "chat":
        delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
        choices = [{"index": 0, "delta": delta, "logprobs": None,
                    "finish_reason": FINISH.get(finish, "stop") if finish else None}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None,
                    "finish_reason": FINISH.get(finish, "stop") if finish else None}]
    out = {"id": rid, "object": "chat.completion.chunk" if req.kind == "chat" else "text_completion",
           "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out
