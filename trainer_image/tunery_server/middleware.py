"""ASGI middleware: answer failures without losing the connection, refuse oversized bodies, count API requests."""

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunery_server.errors import ApiError, server_failure
from tunery_server.metrics import ServerMetrics

API_PREFIX = "/v1/"
logger = logging.getLogger("tunery_server")


class UnexpectedErrors:
    """Answer a failure in the server with OpenAI's 500 and re-raise nothing, so the connection stays open.

    Starlette's own handler for Exception answers and then re-raises, and uvicorn closes the connection on that.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as error:  # noqa: BLE001 - any failure is answered, and its traceback logged
            logger.exception("%s %s failed", scope.get("method"), scope["path"])
            # A response already under way cannot become a 500: left unfinished, the server ends its connection.
            if not started:
                await server_failure(error).response()(scope, receive, send)


class BodySizeLimit:
    """413 for a body over the limit: by its Content-Length up front, else by counting what actually arrives.

    The body is read here in full (it is at most the limit, 1 MiB by default) and replayed to the app.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, int(declared))
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # The client left before sending its body; nothing to answer.
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, size)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                # Later calls are the server's own messages (http.disconnect), which streaming responses watch for.
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: int) -> None:
        error = ApiError(
            413,
            f"the request body is {'at least ' if size > self.max_bytes else ''}{size} bytes; this server accepts "
            f"at most {self.max_bytes} (--max-request-bytes)",
            code="request_too_large",
        )
        await error.response()(scope, receive, send)


class RequestMetrics:
    """Requests under /v1/ by endpoint and status; the endpoint is a route's path, so unknown paths make one series."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, endpoints: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        # Requests refused before routing (413) are still counted under their endpoint.
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.request_started()
        try:
            await self.app(scope, receive, watched)
        finally:
            endpoint = getattr(scope.get("route"), "path", None)
            if endpoint is None:
                endpoint = scope["path"] if scope["path"] in self.endpoints else "unmatched"
            self.metrics.request_finished(endpoint, status, time.perf_counter() - started)
