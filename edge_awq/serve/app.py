"""The Starlette application of ``edge-awq serve``: routes, limits, authentication, streaming.

Nothing a client sends reaches the engine unchecked, and no error escapes as a traceback: every
failure is an OpenAI-shaped error body with its HTTP status.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edge_awq.serve.engine import Draining, Job, QueueFull, trim_heap
from edge_awq.serve.openai_api import ApiError, Limits, chunk, parse_request, response, usage
from edge_awq.serve.server import dumps, request_log

log = logging.getLogger("edge_awq.serve")

RETRY_AFTER_S = 2


@dataclass(frozen=True)
class Settings:
    model_name: str
    api_key: str | None
    limits: Limits
    max_body_bytes: int


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _read_json(request: Request, limit: int):
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(413, f"the request body is larger than {limit:,} bytes", None, "request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, f"the request body is larger than {limit:,} bytes", None, "request_too_large")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, or nesting too deep to parse
        raise ApiError(400, f"the body is not valid JSON: {str(e)[:200]}", None, "invalid_json") from None


async def _until_disconnected(request: Request, job: Job) -> None:
    """Cancel the job when the client goes away (the body has been read: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel.set()
            return


def _log_job(request: Request, status: int, req, job: Job, t0: float) -> None:
    request_log(job.id, request.url.path, status, len(req.prompt), job.completion_tokens, t0, job.first_token,
                job.started)


def create_app(engine, s: Settings) -> Starlette:
    def authorized(request: Request) -> None:
        if s.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {s.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", None, "invalid_api_key")

    async def completions(request: Request, kind: str) -> Response:
        t0 = time.monotonic()
        try:
            authorized(request)
            body = await _read_json(request, s.max_body_bytes)
            try:
                req = parse_request(kind, body, s.model_name, engine.tokenizer, s.limits)
            except ApiError:
                raise
            except Exception as e:  # a chat template that refuses the conversation, say
                raise ApiError(400, f"the messages cannot be rendered: {e}", "messages", "invalid_value") from None
            job = Job(req.prompt, req.sampling, asyncio.get_running_loop())
            try:
                engine.submit(job)
            except QueueFull:
                raise ApiError(503, "the server is busy: retry later", None, "queue_full", "server_error",
                               {"Retry-After": str(RETRY_AFTER_S)}) from None
            except Draining:
                raise ApiError(503, "the server is stopping", None, "shutting_down", "server_error",
                               {"Retry-After": str(RETRY_AFTER_S)}) from None
        except ApiError as e:
            request_log("-", request.url.path, e.status, 0, 0, t0, None)
            trim_heap()  # a large refused body: its memory goes back to the system now
            return _error(e)
        except ClientDisconnect:
            return Response(status_code=499)
        if req.stream:
            return StreamingResponse(_stream(request, req, job, t0), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": job.id})
        return await _whole(request, req, job, t0)

    async def _whole(request: Request, req, job: Job, t0: float) -> Response:
        watcher = asyncio.create_task(_until_disconnected(request, job))
        text, finish = [], "stop"
        try:
            while (item := await job.out.get()) is not None:
                if isinstance(item, Exception):
                    _log_job(request, 500, req, job, t0)
                    return _error(ApiError(500, "generation failed; see the server log", None, "internal_error",
                                           "server_error"))
                text.append(item.text)
                finish = item.finish or finish
        finally:
            watcher.cancel()
        _log_job(request, 200, req, job, t0)
        return JSONResponse(response(req, job.id, s.model_name, "".join(text), finish, len(req.prompt),
                                     job.completion_tokens))

    async def _stream(request: Request, req, job: Job, t0: float):
        watcher = asyncio.create_task(_until_disconnected(request, job))
        status, completed = 200, False
        try:
            if req.kind == "chat":
                yield f"data: {dumps(chunk(req, job.id, s.model_name, '', None, first=True))}\n\n"
            while (item := await job.out.get()) is not None:
                if isinstance(item, Exception):
                    status = 500
                    err = ApiError(500, "generation failed; see the server log", None, "internal_error", "server_error")
                    yield f"data: {dumps(err.body())}\n\n"
                    break
                if item.text or item.finish:
                    yield f"data: {dumps(chunk(req, job.id, s.model_name, item.text, item.finish))}\n\n"
            if req.include_usage:
                u = usage(len(req.prompt), job.completion_tokens)
                yield f"data: {dumps(chunk(req, job.id, s.model_name, None, None, usage_=u))}\n\n"
            yield "data: [DONE]\n\n"
            completed = True
        finally:  # also when the client went away mid-stream: the engine stops at its next token
            job.cancel.set()
            watcher.cancel()
            status = status if completed else 499
            _log_job(request, status, req, job, t0)

    async def chat_completions(request: Request) -> Response:
        return await completions(request, "chat")

    async def text_completions(request: Request) -> Response:
        return await completions(request, "completion")

    async def models(request: Request) -> Response:
        try:
            authorized(request)
        except ApiError as e:
            return _error(e)
        return JSONResponse({"object": "list", "data": [
            {"id": s.model_name, "object": "model", "created": 0, "owned_by": "edge-awq"}]})

    async def health(request: Request) -> Response:
        ok = engine.alive(within=60.0)
        return JSONResponse({"status": "ok" if ok else "stalled"}, status_code=200 if ok else 503)

    async def ready(request: Request) -> Response:
        if engine.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ready", "model": s.model_name, "waiting": engine.waiting})

    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, code))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        return _error(ApiError(500, "internal error; see the server log", None, "internal_error", "server_error"))

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", text_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
