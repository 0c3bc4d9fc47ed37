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
from .responses import chat_logprobs, legacy_logprobs
from .runtime import Busy, Runtime, Stream, Unavailable
from .sampling import TokenLogprob
from .schema import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

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
            prompts = [await asyncio.to_thread(rt.encode_prompt, p) for p in req.prompt_values()]
        except RequestError as e:
            return error(400, str(e), param="prompt")
        echoes = [p if isinstance(p, str) else rt.tokenizer.decode(p) for p in req.prompt_values()]
        return await _run(rt, req, prompts, request, chat=False, echoes=echoes if req.echo else None)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        try:   # the template and the tokenizer take a while on long text: never on the event loop
            prompt = await asyncio.to_thread(rt.encode_chat, [m.model_dump(exclude_none=True)
                                                              for m in req.messages])
        except RequestError as e:
            return error(400, str(e), param="messages")
        except Exception as e:  # template errors (e.g. roles the template rejects)
            return error(400, f"chat template failed: {e}", param="messages")
        return await _run(rt, req, [prompt], request, chat=True)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        try:   # off the event loop, as for completions
            if req.messages is not None:
                ids = await asyncio.to_thread(rt.encode_chat, [m.model_dump(exclude_none=True)
                                                               for m in req.messages],
                                              req.add_generation_prompt)
            else:
                ids = await asyncio.to_thread(rt.encode_prompt, req.prompt, req.add_special_tokens)
        except RequestError as e:
            return error(400, str(e), param="prompt" if req.messages is None else "messages")
        except Exception as e:  # template errors
            return error(400, f"chat template failed: {e}", param="messages")
        body = {"count": len(ids), "max_model_len": rt.arch.max_context, "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = [rt.token_text(t) for t in ids]
        return body

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        try:
            return {"prompt": rt.tokenizer.decode(rt.encode_prompt(req.tokens))}
        except RequestError as e:
            return error(400, f"tokens: {e}", param="tokens")

    return app


async def _run(rt: Runtime, req, prompts: list[list[int]], request: Request, chat: bool,
               echoes: list[str] | None = None):
    # the default is never below 1, so a prompt that fills the context gets the "context" error
    longest = max(len(p) for p in prompts)
    max_tokens = req.max_tokens if req.max_tokens is not None else max(1, min(
        16 if not chat else rt.arch.max_context, rt.arch.max_context - longest))
    if chat:
        k = (req.top_logprobs or 0) if req.logprobs else None
        prompt_k = None
    else:
        k = req.logprobs
        prompt_k = k if req.echo else None
    try:
        streams = rt.submit_batch(prompts, max_tokens, req.sampling(), req.stop_list(),
                                  loop=asyncio.get_running_loop(), ignore_eos=req.ignore_eos,
                                  n=req.n, logprobs=k, prompt_logprobs=prompt_k, live=req.stream)
    except RequestError as e:
        return error(400, str(e), param="max_tokens" if "max_tokens" in str(e) else "prompt")
    except Busy as e:
        return error(429, f"server busy: {e}", "rate_limit_error")
    except Unavailable as e:
        return error(503, f"server unavailable: {e}", "server_error")
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    out = _Out(rt, streams, chat, k is not None, echoes, req.n,
               {"id": rid, "created": int(time.time()), "model": rt.model_name})
    if req.stream:
        return StreamingResponse(_sse(out), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    queue = streams[0].queue
    watcher = asyncio.create_task(_cancel_on_disconnect(request, streams))
    try:
        left = len(streams)
        while left:
            _idx, _delta, fin, _lps = await queue.get()
            left -= fin is not None
    except asyncio.CancelledError:
        for st in streams:
            st.cancel()
        raise
    finally:
        watcher.cancel()
    if any(st.finish_reason == "error" for st in streams):
        return error(500, "generation failed on the server", "server_error")
    return out.whole()


class _Out:
    """The choices of one request, rendered as a whole response or as SSE chunks."""

    def __init__(self, rt: Runtime, streams: list[Stream], chat: bool, logprobs: bool,
                 echoes: list[str] | None, n: int, meta: dict):
        self.rt, self.streams, self.chat, self.logprobs = rt, streams, chat, logprobs
        self.echoes, self.n, self.meta = echoes, n, meta
        self.offsets = [0] * len(streams)    # text offset of each choice's next token (streaming)

    def usage(self) -> dict:
        prompt = sum(len(st.seq.prompt) for st in self.streams[::self.n])
        return _usage(prompt, sum(len(st.seq.out) for st in self.streams))

    def echo(self, st: Stream) -> tuple[str, list]:
        """The echoed prompt's text and TokenLogprobs (empty without echo)."""
        if self.echoes is None:
            return "", []
        first = TokenLogprob(st.seq.prompt[0], None)
        return self.echoes[st.index // self.n], [first, *st.seq.prompt_lps]

    def logprobs_obj(self, st: Stream, lps: list):
        if not self.logprobs:
            return None
        if self.chat:
            return chat_logprobs(lps, self.rt.token_text)
        obj, self.offsets[st.index] = legacy_logprobs(lps, self.rt.token_text, self.offsets[st.index])
        return obj

    def whole(self) -> dict:
        choices = []
        for st in self.streams:
            if self.chat:
                choices.append({"index": st.index, "message": {"role": "assistant", "content": st.text},
                                "finish_reason": st.finish_reason,
                                "logprobs": self.logprobs_obj(st, st.seq.out_logprobs)})
                continue
            text, lps = self.echo(st)
            choices.append({"index": st.index, "text": text + st.text, "finish_reason": st.finish_reason,
                            "logprobs": self.logprobs_obj(st, lps + st.seq.out_logprobs)})
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self.meta, "object": obj, "choices": choices, "usage": self.usage()}

    def chunk(self, st: Stream, delta: str | None, fin: str | None, lps: list, first: bool = False,
              usage: bool = False) -> str:
        if self.chat:
            d = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
            choice = {"index": st.index, "delta": d, "finish_reason": fin}
        else:
            choice = {"index": st.index, "text": delta or "", "finish_reason": fin}
        choice["logprobs"] = self.logprobs_obj(st, lps) if lps else None
        body = {**self.meta, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "choices": [choice]}
        if usage:
            body["usage"] = self.usage()
        return f"data: {json.dumps(body)}\n\n"


async def _cancel_on_disconnect(request: Request, streams: list[Stream]) -> None:
    """A non-streaming client that hangs up must not leave its request generating. (Reads the
    ASGI receive channel like StreamingResponse does; Request.is_disconnected() never turns
    true behind a BaseHTTPMiddleware such as _auth.)"""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for st in streams:
        st.cancel()


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _sse(out: _Out):
    streams, queue = out.streams, out.streams[0].queue
    left, started = len(streams), set()
    try:
        if out.chat:
            for st in streams:
                yield out.chunk(st, None, None, [], first=True)
        while left:
            idx, delta, fin, lps = await queue.get()
            st = streams[idx]
            if out.echoes is not None and idx not in started:   # its prompt is scored by now
                started.add(idx)
                text, prompt_lps = out.echo(st)
                yield out.chunk(st, text, None, prompt_lps)
            if delta or lps:
                yield out.chunk(st, delta, None, lps)
            if fin is not None:
                left -= 1
                yield out.chunk(st, None, "error" if fin == "error" else fin, [], usage=not left)
        yield "data: [DONE]\n\n"
    finally:
        if left:   # the client went away: free the slots
            for st in streams:
                st.cancel()
