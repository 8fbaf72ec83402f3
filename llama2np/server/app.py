"""The HTTP side: OpenAI's routes on FastAPI, errors in OpenAI's JSON, server-sent events, the API key.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``;
vLLM's ``GET /tokenizer_info``, ``POST /tokenize`` and ``POST /detokenize``
(lm-evaluation-harness's ``local-completions`` tokenizes through them); ``GET /health``.
A request is checked and tokenized here, queued for the engine thread
(``worker``), and answered as JSON or, with ``stream``, as server-sent events
ending in ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import InputError, Llama2npError
from ..llama import Llama2
from .engine import chat_prompt, check_top, completion_prompts
from .responses import ChatWork, CompletionWork
from .schemas import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .worker import Job, QueueFull, Worker

DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there


class ApiError(Exception):
    """An error answered as OpenAI's ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def create_app(model: Llama2, model_id: str, api_key: str | None = None, max_queue: int = 64) -> FastAPI:
    """The ASGI app serving ``model`` as ``model_id``; with ``api_key``, every /v1 route needs it."""
    worker: Worker | None = None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal worker
        worker = app.state.worker = Worker(model, max_queue)
        yield
        worker.stop()

    app = FastAPI(title="llama2np", summary="A reference OpenAI-compatible endpoint", lifespan=lifespan)
    created = int(time.time())

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           "invalid_request_error", code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != model_id:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {model_id!r}",
                           param="model", code="model_not_found")

    async def submit(work, stream: bool) -> Job:
        job = Job(work, asyncio.get_running_loop(), stream)
        try:
            worker.submit(job)
        except QueueFull as e:
            raise ApiError(429, str(e), "server_overloaded", code="queue_full") from None
        return job

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(Llama2npError)
    async def _engine_error(request, exc: Llama2npError):
        return ApiError(400, str(exc)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = loc[0] if loc else None
        where = ".".join(loc)
        if err.get("type") == "json_invalid":
            return ApiError(400, f"the request body is not valid JSON ({err.get('msg')})").response()
        return ApiError(400, f"{where or 'body'}: {err.get('msg')}", param=param).response()

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        message = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return ApiError(exc.status_code, message).response()

    @app.get("/health")
    async def health():
        stats = worker.stats
        return {"status": "ok", "waiting": worker.queue.qsize(), "busy": worker.busy, "running": worker.running,
                "forward_passes": stats.forward_passes, "prompt_tokens": stats.prompt_tokens,
                "new_tokens": stats.new_tokens}

    auth = [Depends(check_key)]

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [_model_card(model_id, created)]}

    @app.get("/v1/models/{name}", dependencies=auth)
    async def one_model(name: str):
        check_model(name)
        return _model_card(model_id, created)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)

        def prepare() -> CompletionWork:
            body.check_unsupported()
            config = body.config(model.args.vocab_size)
            return CompletionWork(completion_prompts(model, body.prompt), config, body.max_tokens, body.echo,
                                  check_top(body.logprobs, "logprobs") if body.logprobs is not None else None)

        work = await run_in_threadpool(prepare)
        head = _head("cmpl", "text_completion", model_id)
        job = await submit(work, body.stream)
        if body.stream:
            def piece(i, text):
                return {**head, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": None}]}

            def last(choices, usage):
                ends = [{**head, "choices": [{**c, "text": ""}]} for c in choices]
                return ends + ([{**head, "choices": [], "usage": usage}] if body.include_usage else [])

            return _sse(job, piece, last)
        choices, usage = await _result(job, request)
        return {**head, "choices": choices, "usage": usage}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)

        def prepare() -> ChatWork:
            config = body.config(model.args.vocab_size)
            top = check_top(body.top_logprobs, "top_logprobs")
            if top and not body.logprobs:
                raise InputError("top_logprobs needs logprobs: true")
            prompt = chat_prompt(model, [m.model_dump() for m in body.messages])
            return ChatWork(prompt, config, body.max_tokens, body.logprobs, top)

        work = await run_in_threadpool(prepare)
        head = _head("chatcmpl", "chat.completion", model_id)
        job = await submit(work, body.stream)
        if body.stream:
            chunk = {**head, "object": "chat.completion.chunk"}
            first = [True]

            def piece(i, text):
                delta = {"role": "assistant", "content": text} if first[0] else {"content": text}
                first[0] = False
                return {**chunk, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]}

            def last(choices, usage):
                ends = [{**chunk, "choices": [{"index": c["index"], "delta": {}, "logprobs": c["logprobs"],
                                               "finish_reason": c["finish_reason"]}]} for c in choices]
                return ends + ([{**chunk, "choices": [], "usage": usage}] if body.include_usage else [])

            return _sse(job, piece, last)
        choices, usage = await _result(job, request)
        return {**head, "choices": choices, "usage": usage}

    @app.get("/tokenizer_info", dependencies=auth)
    async def tokenizer_info():
        tok = model.tokenizer
        return {"bos_token": tok.sp.IdToPiece(tok.bos_id), "eos_token": tok.sp.IdToPiece(tok.eos_id),
                "pad_token": None, "model_max_length": model.args.max_seq_len}

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(body: TokenizeRequest):
        tok = model.tokenizer
        special = {tok.sp.IdToPiece(tok.bos_id): tok.bos_id, tok.sp.IdToPiece(tok.eos_id): tok.eos_id}
        if body.prompt in special:  # a special token's own name is that token (as Hugging Face's tokenizers do)
            ids = [special[body.prompt]]
        else:
            ids = tok.encode(body.prompt, bos=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": model.args.max_seq_len}

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(body: DetokenizeRequest):
        return {"prompt": model.tokenizer.decode(model.check_ids(body.tokens).tolist()) if body.tokens else ""}

    return app


def _model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "llama2np"}


def _head(prefix: str, obj: str, model_id: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()), "model": model_id}


async def _result(job: Job, request: Request):
    """The job's (choices, usage); the job is cancelled if the client disconnects while it waits or runs."""
    async def watch():
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        job.cancel()

    watcher = asyncio.create_task(watch())
    try:
        while True:
            kind, *rest = await job.events.get()
            if kind == "done":
                return rest[0]
            if kind == "error":
                raise rest[0]
            if kind == "crash":
                raise ApiError(500, f"internal error: {type(rest[0]).__name__}: {rest[0]}", "server_error")
            if kind == "cancelled":  # its client went away: nobody reads this answer
                raise ApiError(499, "the client closed the connection", code="cancelled")
    finally:
        watcher.cancel()


def _sse(job: Job, piece, last) -> StreamingResponse:
    """Server-sent events: a chunk per text piece, the final chunks, then ``data: [DONE]``."""
    async def events():
        try:
            while True:
                kind, *rest = await job.events.get()
                if kind == "piece":
                    yield _data(piece(*rest))
                elif kind == "done":
                    for chunk in last(*rest[0]):
                        yield _data(chunk)
                    break
                elif kind == "cancelled":  # the client went away: nobody reads the rest
                    return
                else:
                    status, type_ = (400, "invalid_request_error") if kind == "error" else (500, "server_error")
                    yield _data({"error": {"message": str(rest[0]), "type": type_, "param": None, "code": status}})
                    break
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away and the response was cancelled: stop the work
            job.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
