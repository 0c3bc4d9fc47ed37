"""HTTP: the OpenAI-compatible API, health and cluster views. No model logic lives here.

Request path: parse and validate -> Runtime.submit() -> await the Stream -> JSON or SSE.
Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}}; bad input is a 4xx.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .bodylimit import BodyLimit
from .engine import RequestError
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .runtime import Busy, Runtime, Stream, Unavailable
from .schema import ChatRequest, CompletionRequest

STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}   # served as /static/<name>
BODY_BYTES_PER_CONTEXT_TOKEN = 128   # room for long tokens, \uXXXX escapes, token-id lists
BODY_SLACK_BYTES = 64 * 1024         # sampling fields, chat roles, whitespace
OPEN_PATHS = {"/health", "/", "/metrics", "/docs", "/openapi.json", *(f"/static/{f}" for f in STATIC_FILES)}


def error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
          code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def body_limit(max_body_bytes: int, max_context: int) -> int:
    """The request body cap: as configured, or room for a prompt that fills the context."""
    return max_body_bytes or BODY_BYTES_PER_CONTEXT_TOKEN * max_context + BODY_SLACK_BYTES


def create_app(rt: Runtime) -> FastAPI:
    app = FastAPI(title="SkyNet", version="0.1.0",
                  description="OpenAI-compatible API of a SkyNet tensor-parallel cluster")
    app.state.rt = rt

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":   # loc is a character offset, not a field
            return error(400, f"invalid JSON body: {first.get('ctx', {}).get('error', 'decode error')}")
        loc = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error(400, f"{loc or 'body'}: {first.get('msg', 'invalid request')}", param=loc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error(exc.status_code, str(exc.detail), kind, headers=exc.headers)

    # added before _auth, so _auth runs first: an unauthenticated body is never read at all
    app.add_middleware(BodyLimit, limit=body_limit(rt.cfg.max_body_bytes, rt.arch.max_context),
                       refuse=lambda exc: error(413, exc.detail, headers=exc.headers))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        key = rt.cfg.api_key
        if key and request.url.path not in OPEN_PATHS:
            if request.headers.get("authorization", "") != f"Bearer {key}":
                return error(401, "missing or wrong API key (Authorization: Bearer <key>)",
                             "authentication_error", code="invalid_api_key",
                             headers={"Connection": "close"})   # its body is never read
        return await call_next(request)

    @app.get("/health")
    async def health():
        down = rt.health()
        if down:
            return JSONResponse({"status": "error", "error": down, "model": rt.model_name}, status_code=503)
        return {"status": "ok", "model": rt.model_name, "nodes": len(rt.cluster.plan.ranges),
                "epoch": rt.cluster.epoch, "uptime_s": round(time.time() - rt.started, 1)}

    @app.get("/", include_in_schema=False)
    async def dashboard():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                            headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in STATIC_FILES:
            return error(404, f"no static file {name!r}", "not_found_error")
        return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name],
                            headers={"Cache-Control": "no-cache"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(rt.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/stats/history")
    async def stats_history(since: float = 0.0):
        """Per-second samples of the last minutes (tokens/s, running and queued requests)."""
        return {"interval_s": rt.metrics.interval_s, "samples": rt.metrics.history(since)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": rt.model_name, "object": "model",
                                            "created": int(rt.started), "owned_by": "skynet"}]}

    @app.get("/v1/cluster")
    async def cluster():
        return rt.cluster_view()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        try:   # tokenizing long text takes a while: never on the event loop
            prompt = await asyncio.to_thread(rt.encode_prompt, req.prompt_value())
        except RequestError as e:
            return error(400, str(e), param="prompt")
        return await _run(rt, req, prompt, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        try:   # the template and the tokenizer take a while on long text: never on the event loop
            prompt = await asyncio.to_thread(rt.encode_chat, [m.model_dump(exclude_none=True)
                                                              for m in req.messages])
        except RequestError as e:
            return error(400, str(e), param="messages")
        except Exception as e:  # template errors (e.g. roles the template rejects)
            return error(400, f"chat template failed: {e}", param="messages")
        return await _run(rt, req, prompt, request, chat=True)

    return app


async def _run(rt: Runtime, req, prompt: list[int], request: Request, chat: bool):
    # the default is never below 1, so a prompt that fills the context gets the "context" error
    max_tokens = req.max_tokens if req.max_tokens is not None else max(1, min(
        16 if not chat else rt.arch.max_context, rt.arch.max_context - len(prompt)))
    try:
        stream = rt.submit(prompt, max_tokens, req.sampling(), req.stop_list(),
                           loop=asyncio.get_running_loop(), ignore_eos=req.ignore_eos)
    except RequestError as e:
        return error(400, str(e), param="max_tokens" if "max_tokens" in str(e) else "prompt")
    except Busy as e:
        return error(429, f"server busy: {e}", "rate_limit_error")
    except Unavailable as e:
        return error(503, f"server unavailable: {e}", "server_error")
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    meta = {"id": rid, "created": int(time.time()), "model": rt.model_name}
    if req.stream:
        return StreamingResponse(_sse(stream, meta, chat, len(prompt), req), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    watcher = asyncio.create_task(_cancel_on_disconnect(request, stream))
    try:
        while True:
            _delta, fin = await stream.queue.get()
            if fin is not None:
                break
    except asyncio.CancelledError:
        stream.cancel()
        raise
    finally:
        watcher.cancel()
    if fin == "error":
        return error(500, "generation failed on the server", "server_error")
    usage = _usage(len(prompt), len(stream.seq.out))
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": stream.text},
                  "finish_reason": fin, "logprobs": None}
        return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage}
    choice = {"index": 0, "text": stream.text, "finish_reason": fin, "logprobs": None}
    return {**meta, "object": "text_completion", "choices": [choice], "usage": usage}


async def _cancel_on_disconnect(request: Request, stream: Stream) -> None:
    """A non-streaming client that hangs up must not leave its request generating. (Reads the
    ASGI receive channel like StreamingResponse does; Request.is_disconnected() never turns
    true behind a BaseHTTPMiddleware such as _auth.)"""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    stream.cancel()


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
