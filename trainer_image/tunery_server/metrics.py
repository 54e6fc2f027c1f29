"""The server's Prometheus metrics, on a registry of their own, every series labelled with the served model."""

from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
FIRST_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServerMetrics:
    """Requests by endpoint and status, their durations, tokens in and out, time to first token, model state, and
    requests refused for the concurrency limit or given up on for clients that left."""

    def __init__(self, model: str) -> None:
        self.registry = CollectorRegistry()
        self._model = model
        self._requests = Counter(
            "tunery_server_requests",
            "API requests answered, by endpoint and HTTP status.",
            ["model", "endpoint", "status"],
            registry=self.registry,
        )
        self._duration = Histogram(
            "tunery_server_request_duration_seconds",
            "Time from request to the last byte of the response (the whole stream, when streaming).",
            ["model", "endpoint"],
            registry=self.registry,
            buckets=REQUEST_BUCKETS,
        )
        self._generated = Counter(
            "tunery_server_generated_tokens", "Tokens generated.", ["model"], registry=self.registry
        ).labels(model)
        self._prompt = Counter(
            "tunery_server_prompt_tokens",
            "Prompt (and classified input) tokens processed.",
            ["model"],
            registry=self.registry,
        ).labels(model)
        self._first_token = Histogram(
            "tunery_server_time_to_first_token_seconds",
            "Time from request to the first generated token, waiting for the model included.",
            ["model"],
            registry=self.registry,
            buckets=FIRST_TOKEN_BUCKETS,
        ).labels(model)
        self._loaded = Gauge(
            "tunery_server_model_loaded",
            "1 once the model is loaded and requests are served.",
            ["model"],
            registry=self.registry,
        ).labels(model)
        self._in_flight = Gauge(
            "tunery_server_in_flight_requests",
            "API requests being answered now (waiting for the model included).",
            ["model"],
            registry=self.registry,
        ).labels(model)
        self._throttled = Counter(
            "tunery_server_requests_throttled",
            "Requests refused with 429 because --max-concurrent-requests were in flight.",
            ["model"],
            registry=self.registry,
        ).labels(model)
        self._cancelled = Counter(
            "tunery_server_requests_cancelled",
            "Generations stopped early because their client disconnected.",
            ["model"],
            registry=self.registry,
        ).labels(model)

    def request_started(self) -> None:
        self._in_flight.inc()

    def request_finished(self, endpoint: str, status: int, seconds: float) -> None:
        self._in_flight.dec()
        self._requests.labels(self._model, endpoint, str(status)).inc()
        self._duration.labels(self._model, endpoint).observe(seconds)

    def add_prompt_tokens(self, count: int) -> None:
        self._prompt.inc(count)

    def add_generated_tokens(self, count: int) -> None:
        self._generated.inc(count)

    def observe_first_token(self, seconds: float) -> None:
        self._first_token.observe(seconds)

    def set_loaded(self, loaded: bool) -> None:
        self._loaded.set(1 if loaded else 0)

    def count_throttled(self) -> None:
        self._throttled.inc()

    def count_cancelled(self) -> None:
        self._cancelled.inc()

    @contextmanager
    def served(self, host: str, port: int) -> Iterator[None]:
        """Expose the registry on a port of its own while in the block: API clients never reach it there.

        Raises OSError, naming the option, when the port cannot be listened on.
        """
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            raise OSError(
                f"cannot serve metrics on {host}:{port} ({error.strerror or error}): choose another --metrics-port, "
                "or 0 for none"
            ) from error
        try:
            yield
        finally:
            server.shutdown()
            server.server_close()
            thread.join()
