"""The FastAPI app: OpenAI-compatible completions and chat, /v1/classify and probes, around one model."""

import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tunery_server import schemas, sse
from tunery_server.disconnect import unless_disconnected
from tunery_server.errors import install_error_handlers
from tunery_server.guards import ApiKeyCheck, ConcurrencyLimit
from tunery_server.metrics import ServerMetrics
from tunery_server.middleware import BodySizeLimit, RequestMetrics, UnexpectedErrors
from tunery_server.model import CLASSIFIERS, GENERATIVE, ServedModel
from tunery_server.service import CHAT, CLASSIFY, COMPLETIONS, MODELS, ModelService
from tunery_server.settings import ServerSettings

ANY_TASK = GENERATIVE + CLASSIFIERS


def create_app(
    settings: ServerSettings,
    loader: Callable[[], ServedModel],
    on_load_failure: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The app for one model; `loader` runs on a background thread at startup, so the probes answer at once.

    Its metrics are in `app.state.metrics`, for the caller to expose on a port of its own.
    """
    metrics = ServerMetrics(settings.name)
    service = ModelService(settings, loader, metrics, on_load_failure)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(title="tunery serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if service.error is not None:
            return JSONResponse({"status": "failed", "error": service.error}, status_code=503)
        if service.model is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready", "model": settings.name, "task": service.model.task})

    @app.get(MODELS)
    async def list_models() -> dict[str, Any]:
        service.served(None, ANY_TASK, MODELS)
        return schemas.dump(schemas.ModelList(data=[schemas.ModelCard(id=settings.name, created=created)]))

    @app.get(MODELS + "/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        service.served(model_id, ANY_TASK, MODELS)
        return schemas.dump(schemas.ModelCard(id=settings.name, created=created))

    @app.post(COMPLETIONS, response_model=None)
    async def completions(request: schemas.CompletionRequest, http: Request) -> dict[str, Any] | StreamingResponse:
        started = time.perf_counter()
        model = service.served(request.model, GENERATIVE, COMPLETIONS)
        prepared = await service.prepare_completion(model, request)
        identity = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": settings.name}
        events = service.generate(model, prepared, started)
        if request.stream:
            return sse.event_stream(sse.completion_chunks(events, identity, prepared, request))
        text, outcome = await unless_disconnected(http, sse.collect(events))
        choice = schemas.CompletionChoice(text=text, finish_reason=outcome.finish_reason)
        return schemas.dump(schemas.Completion(**identity, choices=[choice], usage=sse.usage(prepared, outcome)))

    @app.post(CHAT, response_model=None)
    async def chat_completions(request: schemas.ChatRequest, http: Request) -> dict[str, Any] | StreamingResponse:
        started = time.perf_counter()
        model = service.served(request.model, GENERATIVE, CHAT)
        prepared = await service.prepare_chat(model, request)
        identity = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": settings.name}
        events = service.generate(model, prepared, started)
        if request.stream:
            return sse.event_stream(sse.chat_chunks(events, identity, prepared, request))
        text, outcome = await unless_disconnected(http, sse.collect(events))
        message = schemas.AssistantMessage(content=text)
        choice = schemas.ChatChoice(message=message, finish_reason=outcome.finish_reason)
        return schemas.dump(schemas.ChatCompletion(**identity, choices=[choice], usage=sse.usage(prepared, outcome)))

    @app.post(CLASSIFY)
    async def classify(request: schemas.ClassifyRequest) -> dict[str, Any]:
        model = service.served(request.model, CLASSIFIERS, CLASSIFY)
        return schemas.dump(await service.classify(model, request))

    # Each middleware added wraps those before it. Inside out: a place among the N in flight is taken only once the
    # body is in (a slow sender holds none), bodies are read only for clients with the key, and every refusal counts.
    app.add_middleware(
        ConcurrencyLimit,
        limit=settings.max_concurrent_requests,
        paths=frozenset({COMPLETIONS, CHAT, CLASSIFY}),
        metrics=metrics,
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyCheck, key=settings.api_key)
    app.add_middleware(RequestMetrics, metrics=metrics, endpoints=frozenset({COMPLETIONS, CHAT, CLASSIFY, MODELS}))
    # Outermost, so that a failure anywhere, in the middleware above too, is answered (and counted as a 500).
    app.add_middleware(UnexpectedErrors)
    app.state.service = service
    app.state.metrics = metrics
    return app
