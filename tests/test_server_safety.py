"""`tunery serve` as the operator runs it for tenants: an API key, metrics apart, a concurrency cap, clients that leave."""

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from server_fixtures import TUNERY, Server, endless_decoder, server_environment, wait_until

pytestmark = pytest.mark.slow

KEY = "sk-tenant-0123456789abcdef"
# Long enough that a generation run to the end would dwarf one stopped when its client left.
LONG = 3000
STOPPED_WITHIN = LONG // 4


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return endless_decoder(tmp_path_factory.mktemp("endless"))


@pytest.fixture(scope="module")
def server(published: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    started = Server.start(
        published,
        tmp_path_factory.mktemp("server") / "server.log",
        "--max-tokens-limit=4000",
        "--max-concurrent-requests=1",
        env={"TUNERY_API_KEY": KEY},
    )
    try:
        started.wait_ready()
        yield started
    finally:
        started.stop()


def client(server: Server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def settled(server: Server) -> None:
    """Wait until nothing is in flight: the cap is 1, and a request given up on ends just after its client left."""
    wait_until(lambda: server.metric("tunery_server_in_flight_requests") == 0)


def test_the_api_needs_the_key_and_the_probes_do_not(server: Server) -> None:
    assert client(server).models.list().data[0].id == "endless"
    completion = client(server).completions.create(model="endless", prompt="red", max_tokens=3, temperature=0)
    assert completion.usage.completion_tokens == 3
    with pytest.raises(openai.AuthenticationError) as wrong:
        client(server, "sk-wrong-key").completions.create(model="endless", prompt="red", max_tokens=3)
    assert wrong.value.code == "invalid_api_key" and "sk-wrong" not in wrong.value.message
    assert wrong.value.response.headers["www-authenticate"] == "Bearer"
    # No key at all (OpenAI's client insists on one): every path but the probes, known or not, says 401.
    for path in ("/v1/models", "/v1/completions", "/v1/nothing-here", "/metrics"):
        refused = httpx.post(f"{server.url}{path}", json={"prompt": "red"})
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer", path
        assert refused.json()["error"]["type"] == "invalid_request_error" and KEY not in refused.text
    for probe in ("/healthz", "/readyz"):
        assert httpx.get(f"{server.url}{probe}").status_code == 200
    # Prometheus scrapes its own port without a key; the API port has no /metrics, even for the key's holder.
    assert 'tunery_server_requests_total{endpoint="/v1/completions",model="endless",status="401"}' in (
        httpx.get(server.metrics_url).text
    )
    assert httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404


def test_a_request_beyond_the_concurrency_limit_is_told_to_retry(server: Server) -> None:
    settled(server)
    throttled = server.metric("tunery_server_requests_throttled_total")
    with client(server).completions.create(
        model="endless", prompt="red", max_tokens=LONG, temperature=0, stream=True
    ) as stream:
        next(iter(stream))
        with pytest.raises(openai.RateLimitError) as refused:
            client(server).completions.create(model="endless", prompt="blue", max_tokens=3)
        # Only what waits for the model is capped.
        assert client(server).models.list().data
    assert refused.value.response.headers["retry-after"] == "1" and refused.value.code == "rate_limit_exceeded"
    assert server.metric("tunery_server_requests_throttled_total") == throttled + 1


def test_a_stream_whose_client_left_stops_generating(server: Server) -> None:
    settled(server)
    generated = server.metric("tunery_server_generated_tokens_total")
    cancelled = server.metric("tunery_server_requests_cancelled_total")
    with client(server).completions.create(
        model="endless", prompt="red", max_tokens=LONG, temperature=0, stream=True
    ) as stream:
        for _, _chunk in zip(range(3), stream, strict=False):
            pass
    wait_until(lambda: server.metric("tunery_server_requests_cancelled_total") == cancelled + 1)
    assert_the_model_moved_on(server, generated)


def test_a_whole_answer_whose_client_left_stops_generating(server: Server) -> None:
    settled(server)
    generated = server.metric("tunery_server_generated_tokens_total")
    cancelled = server.metric("tunery_server_requests_cancelled_total")
    started = server.metric("tunery_server_time_to_first_token_seconds_count")
    body = json.dumps({"prompt": "red", "max_tokens": LONG, "temperature": 0}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port)) as connection:
        connection.sendall(head.encode() + body)
        # Left once the model has started on it.
        wait_until(lambda: server.metric("tunery_server_time_to_first_token_seconds_count") == started + 1)
    wait_until(lambda: server.metric("tunery_server_requests_cancelled_total") == cancelled + 1)
    assert_the_model_moved_on(server, generated)
    assert 'endpoint="/v1/completions",model="endless",status="499"' in httpx.get(server.metrics_url).text


def assert_the_model_moved_on(server: Server, generated_before: float) -> None:
    """The next request is answered in full while the one left behind generated a fraction of what it asked for."""
    settled(server)
    completion = client(server).completions.create(model="endless", prompt="blue", max_tokens=4, temperature=0)
    assert completion.usage.completion_tokens == 4 and completion.choices[0].finish_reason == "length"
    # By now the left generation is over and counted (the model runs one at a time): it stopped within a few tokens.
    left_behind = server.metric("tunery_server_generated_tokens_total") - generated_before - 4
    assert 0 < left_behind < STOPPED_WITHIN


def test_the_key_never_reaches_the_log(server: Server) -> None:
    log = server.log.read_text()
    assert "POST /v1/completions" in log and KEY not in log and "sk-wrong" not in log, log


def test_a_metrics_port_in_use_is_refused_clearly(published: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [str(TUNERY), "serve", str(published), "--port=1", f"--metrics-port={port}"],
            capture_output=True,
            text=True,
            env=server_environment(),
            timeout=120,
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "--metrics-port" in result.stderr and "Traceback" not in result.stderr
