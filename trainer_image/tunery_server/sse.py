"""Generation results as OpenAI sends them: whole responses, or server-sent event streams of chunks."""

import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi.responses import StreamingResponse

from tunery_server import schemas
from tunery_server.errors import SERVER_ERROR, ApiError
from tunery_server.model import Generated
from tunery_server.service import Prepared

logger = logging.getLogger("tunery_server")

Events = AsyncIterator[str | Generated]
# Proxies (nginx) would otherwise buffer the stream.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def collect(events: Events) -> tuple[str, Generated]:
    """The whole text and the outcome, for a request that does not stream."""
    pieces: list[str] = []
    async with aclosing(events):
        async for event in events:
            if isinstance(event, Generated):
                return "".join(pieces), event
            pieces.append(event)
    raise RuntimeError("generation ended without an outcome")


def usage(prepared: Prepared, outcome: Generated) -> schemas.Usage:
    prompt = len(prepared.prompt_ids)
    total = prompt + outcome.completion_tokens
    return schemas.Usage(prompt_tokens=prompt, completion_tokens=outcome.completion_tokens, total_tokens=total)


def event_stream(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """`data: {chunk}` events ending with `data: [DONE]`; a failure after the 200 is sent goes in the stream."""

    async def lines() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {_json(chunk)}\n\n"
        except ApiError as error:
            yield f"data: {_json(error.body())}\n\n"
        except Exception as error:  # noqa: BLE001 - the status line is sent: the error can only go in the stream
            logger.exception("generation failed mid-stream")
            message = f"generation failed ({type(error).__name__}); see the server log"
            yield f"data: {_json(ApiError(500, message, type=SERVER_ERROR).body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers=SSE_HEADERS)


async def completion_chunks(
    events: Events, identity: dict[str, Any], prepared: Prepared, request: schemas.Sampling
) -> AsyncIterator[dict[str, Any]]:
    """text_completion chunks: one per piece of text, then the finish reason, then usage if asked for."""

    def chunk(text: str, finish_reason: Any = None) -> dict[str, Any]:
        choice = schemas.CompletionChoice(text=text, finish_reason=finish_reason)
        return schemas.dump(schemas.Completion(**identity, choices=[choice]))

    async with aclosing(events):
        async for event in events:
            if not isinstance(event, Generated):
                yield chunk(event)
                continue
            yield chunk("", event.finish_reason)
            if request.stream_options and request.stream_options.include_usage:
                yield schemas.dump(schemas.Completion(**identity, choices=[], usage=usage(prepared, event)))


async def chat_chunks(
    events: Events, identity: dict[str, Any], prepared: Prepared, request: schemas.Sampling
) -> AsyncIterator[dict[str, Any]]:
    """chat.completion.chunk chunks: the assistant role first, the content in pieces, the finish reason, usage."""

    def chunk(delta: schemas.Delta, finish_reason: Any = None) -> dict[str, Any]:
        choice = schemas.ChunkChoice(delta=delta, finish_reason=finish_reason)
        body = schemas.dump(schemas.ChatCompletionChunk(**identity, choices=[choice]))
        # OpenAI leaves unset delta fields out rather than sending null.
        body["choices"][0]["delta"] = delta.model_dump(exclude_none=True)
        return body

    yield chunk(schemas.Delta(role="assistant", content=""))
    async with aclosing(events):
        async for event in events:
            if not isinstance(event, Generated):
                yield chunk(schemas.Delta(content=event))
                continue
            yield chunk(schemas.Delta(), event.finish_reason)
            if request.stream_options and request.stream_options.include_usage:
                yield schemas.dump(schemas.ChatCompletionChunk(**identity, choices=[], usage=usage(prepared, event)))


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
