"""Run the server for one published model: check the URI, then serve with uvicorn while the model loads."""

import logging
import os
import tempfile
from contextlib import ExitStack
from pathlib import Path

from tunery.api.contract import API_KEY_ENV, SERVING_METRICS_PORT
from tunery_server.settings import (
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_TOKENS_LIMIT,
    ServerSettings,
)
from tunery_server.source import locate

logger = logging.getLogger("tunery_server")


def serve(
    uri: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str | None = None,
    model_dir: Path | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
    metrics_port: int = SERVING_METRICS_PORT,
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
) -> int:
    """Serve until stopped; return the exit code (1 when the model failed to load).

    The API key, if any, comes from the environment (TUNERY_API_KEY): never from an argument, which `ps` would show.
    Raises SourceError, before listening, when the URI leads to no servable model; OSError when the metrics port
    cannot be listened on; ModuleNotFoundError without the server's dependencies.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    source = locate(uri)
    # Imported once the URI is known to be good: a wrong one is reported without waiting for torch to load.
    import uvicorn

    from tunery_server.app import create_app
    from tunery_server.model import load

    settings = ServerSettings(
        name=name or source.default_name,
        max_request_bytes=max_request_bytes,
        max_tokens_limit=max_tokens_limit,
        max_concurrent_requests=max_concurrent_requests,
        api_key=os.environ.get(API_KEY_ENV) or None,
    )
    if settings.api_key:
        logger.info("every request but /healthz and /readyz needs the API key in %s", API_KEY_ENV)
    with ExitStack() as cleanup:
        # What is fetched (an S3 model, an S3 base model) goes to --model-dir, or to a directory removed at exit.
        workdir = model_dir or Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="tunery-serve-")))
        failures: list[BaseException] = []
        server: uvicorn.Server | None = None

        def stop(error: BaseException) -> None:
            # A server that can never become ready should exit, so that its restarts and its log show why.
            failures.append(error)
            if server is not None:
                server.should_exit = True

        app = create_app(settings, lambda: load(source, workdir), on_load_failure=stop)
        if metrics_port:
            cleanup.enter_context(app.state.metrics.served(host, metrics_port))
            logger.info("Prometheus metrics on http://%s:%d/metrics", host, metrics_port)
        server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
        )
        server.run()
    return 1 if failures else 0
