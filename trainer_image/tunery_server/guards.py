"""ASGI middleware deciding which requests reach the app: those with the API key, and no more than N at once."""

import hashlib
import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from tunery_server.errors import ApiError
from tunery_server.metrics import ServerMetrics

# The kubelet probes carry no key.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


class ApiKeyCheck:
    """401 for every request but the probes unless it carries `Authorization: Bearer KEY`, as OpenAI's clients send."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        # Digests compared, not the keys: compare_digest then takes the same time whatever the length guessed.
        self._digest = hashlib.sha256(key.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            if hmac.compare_digest(hashlib.sha256(token.strip().encode()).digest(), self._digest):
                await self.app(scope, receive, send)
                return
            message = "the API key sent is not this server's"
        else:
            message = "this server needs an API key: send it as `Authorization: Bearer KEY` (the client's api_key)"
        # The answer never repeats the key sent, unlike OpenAI's masked echo: nothing of a secret goes back.
        error = ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await error.response()(scope, receive, send)


class ConcurrencyLimit:
    """429 with Retry-After for a request to the model beyond `limit` in flight, those waiting for the model included.

    The model answers one request at a time, so each one admitted adds to the wait of all after it; beyond the limit
    a client is better told to come back than left queueing.
    """

    def __init__(self, app: ASGIApp, limit: int, paths: frozenset[str], metrics: ServerMetrics) -> None:
        self.app = app
        self.limit = limit
        self.paths = paths
        self.metrics = metrics
        # One event loop runs every request: a plain counter needs no lock.
        self._in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        if self._in_flight >= self.limit:
            self.metrics.count_throttled()
            message = f"this server answers at most {self.limit} requests at a time (--max-concurrent-requests): retry"
            error = ApiError(429, message, code="rate_limit_exceeded", type="requests", headers={"Retry-After": "1"})
            await error.response()(scope, receive, send)
            return
        self._in_flight += 1
        try:
            # Returns once the response is sent: a stream holds its place until its last event.
            await self.app(scope, receive, send)
        finally:
            self._in_flight -= 1
