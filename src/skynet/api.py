"""HTTP: the OpenAI-compatible API, health and cluster views. No model logic lives here.

Request path: parse and validate -> Runtime.submit() -> await the Stream -> JSON or SSE.
Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}}; bad input is a 4xx.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import RequestError
from .runtime import Busy, Runtime, Stream
from .schema import ChatRequest, CompletionRequest, ChatMessage

OPEN_PATHS = {"/health", "/", "/metrics", "/docs", "/openapi.json"}


def error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


def create_app(rt: Runtime) -> FastAPI:
    app = FastAPI(title="SkyNet", version="0.1.0",
                  description="OpenAI-compatible API of a SkyNet tensor-parallel cluster")
    app.state.rt = rt

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error(400, f"{loc or 'body'}: {first.get('msg', 'invalid request')}", param=loc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error(exc.status_code, str(exc.detail), kind)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        key = rt.cfg.api_key
        if key and request.url.path not in OPEN_PATHS:
            if request.headers.get("authorization", "") != f"Bearer {key}":
                return error(401, "missing or wrong API key (Authorization: Bearer <key>)",
                             "authentication_error", code="invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": rt.model_name, "nodes": len(rt.cluster.plan.ranges),
                "epoch": rt.cluster.epoch, "uptime_s": round(time.time() - rt.started, 1)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": rt.model_name, "object": "model",
                                            "created": int(rt.started), "owned_by": "skynet"}]}

    @app.get("/v1/cluster")
    async def cluster():
        return rt.cluster_view()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        try:
            prompt = rt.encode_prompt(req.prompt_value())
        except RequestError as e:
            return error(400, str(e), param="prompt")
        return await _run(rt, req, prompt, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        try:
            prompt = rt.encode_chat([m.model_dump(exclude_none=True) for m in req.messages])
        except RequestError as e:
            return error(400, str(e), param="messages")
        except Exception as e:  # template errors (e.g. roles the template rejects)
            return error(400, f"chat template failed: {e}", param="messages")
        return await _run(rt, req, prompt, request, chat=True)

    return app


async def _run(rt: Runtime, req, prompt: list[int], request: Request, chat: bool):
    max_tokens = req.max_tokens if req.max_tokens is not None else min(
        16 if not chat else rt.arch.max_context, rt.arch.max_context - len(prompt))
    try:
        stream = rt.submit(prompt, max_tokens, req.sampling(), req.stop_list(),
                           loop=asyncio.get_running_loop())
    except RequestError as e:
        return error(400, str(e), param="max_tokens" if "max_tokens" in str(e) else "prompt")
    except Busy as e:
        return error(429, f"server busy: {e}", "rate_limit_error")
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    meta = {"id": rid, "created": int(time.time()), "model": rt.model_name}
    if req.stream:
        return StreamingResponse(_sse(stream, meta, chat, len(prompt), req), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        while True:
            _delta, fin = await stream.queue.get()
            if fin is not None:
                break
    except asyncio.CancelledError:
        stream.cancel()
        raise
    if fin == "error":
        return error(500, "generation failed on the server", "server_error")
    usage = _usage(len(prompt), len(stream.seq.out))
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": stream.text},
                  "finish_reason": fin, "logprobs": None}
        return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage}
    choice = {"index": 0, "text": stream.text, "finish_reason": fin, "logprobs": None}
    return {**meta, "object": "text_completion", "choices": [choice], "usage": usage}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _sse(stream: Stream, meta: dict, chat: bool, n_prompt: int, req):
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, fin: str | None, first: bool = False) -> str:
        if chat:
            d = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
            choice = {"index": 0, "delta": d, "finish_reason": fin, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": fin, "logprobs": None}
        body = {**meta, "object": obj, "choices": [choice]}
        if fin is not None:
            body["usage"] = _usage(n_prompt, len(stream.seq.out))
        return f"data: {json.dumps(body)}\n\n"

    finished = False
    try:
        if chat:
            yield chunk(None, None, first=True)
        while True:
            delta, fin = await stream.queue.get()
            if delta:
                yield chunk(delta, None)
            if fin is not None:
                finished = True
                yield chunk(None, "error" if fin == "error" else fin)
                yield "data: [DONE]\n\n"
                return
    finally:
        if not finished:   # the client went away: free the slot
            stream.cancel()
