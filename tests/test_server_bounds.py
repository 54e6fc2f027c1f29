"""Every request field bounded to what the model takes: out-of-range seeds, tiny temperatures, lone surrogates, roles."""

import threading
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from server_fixtures import (
    Server,
    free_port,
    ready_servers,
    untrained_chat_decoder,
    untrained_classifier,
    wait_until,
)
from tunery_server.app import create_app
from tunery_server.settings import ServerSettings

# Like Llama 2's and Mistral's templates: a conversation it does not take is refused with raise_exception.
STRICT_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}"
)
# Lone surrogates, as JSON escapes them: json.loads makes them, but they are not text any tokenizer takes.
SURROGATE = "\\ud800"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    root = tmp_path_factory.mktemp("untrained")
    started = {
        "chat": Server.start(untrained_chat_decoder(root / "chat"), root / "chat.log"),
        "warmth": Server.start(untrained_classifier(root / "warmth"), root / "warmth.log"),
        "strict": Server.start(untrained_chat_decoder(root / "strict", STRICT_TEMPLATE), root / "strict.log"),
    }
    with ready_servers(started) as ready:
        yield ready


def post_raw(server: Server, path: str, body: str) -> httpx.Response:
    """POST a JSON body as written: httpx's own encoder refuses lone surrogates before they could be sent."""
    return httpx.post(f"{server.url}{path}", content=body, headers={"Content-Type": "application/json"}, timeout=60)


def refused(response: httpx.Response, param: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    return error["message"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2**64, 2**63, -(2**63) - 1, 10**40])
def test_a_seed_beyond_int64_is_refused(servers: dict[str, Server], seed: int) -> None:
    body = f'{{"prompt": "red", "max_tokens": 2, "seed": {seed}}}'
    assert "seed" in refused(post_raw(servers["chat"], "/v1/completions", body), "seed")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [-1, -(2**63), 2**63 - 1, 0])
def test_every_int64_seed_samples_repeatably(servers: dict[str, Server], seed: int) -> None:
    body = f'{{"prompt": "red", "max_tokens": 4, "seed": {seed}}}'
    first, second = (post_raw(servers["chat"], "/v1/completions", body) for _ in range(2))
    assert first.status_code == 200, first.text
    assert first.json()["choices"] == second.json()["choices"]


@pytest.mark.slow
@pytest.mark.parametrize("temperature", ["1e-45", "5e-324", "1e-6", "0.0"])
def test_a_tiny_temperature_is_greedy(servers: dict[str, Server], temperature: str) -> None:
    greedy = post_raw(servers["chat"], "/v1/completions", '{"prompt": "red", "max_tokens": 8, "temperature": 0}')
    body = f'{{"prompt": "red", "max_tokens": 8, "temperature": {temperature}, "top_p": 0.5}}'
    tiny = post_raw(servers["chat"], "/v1/completions", body)
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("server", "path", "body", "param"),
    [
        ("chat", "/v1/completions", f'{{"prompt": "red {SURROGATE}"}}', "prompt"),
        ("chat", "/v1/completions", f'{{"prompt": ["{SURROGATE}"]}}', "prompt[0]"),
        ("chat", "/v1/completions", f'{{"prompt": "red", "stop": ["{SURROGATE}"]}}', "stop[0]"),
        ("chat", "/v1/completions", f'{{"prompt": "red", "model": "{SURROGATE}"}}', "model"),
        (
            "chat",
            "/v1/chat/completions",
            f'{{"messages": [{{"role": "user", "content": "{SURROGATE}"}}]}}',
            "messages[0].content",
        ),
        (
            "chat",
            "/v1/chat/completions",
            f'{{"messages": [{{"role": "user", "content": [{{"type": "text", "text": "a{SURROGATE}"}}]}}]}}',
            "messages[0].content[0].text",
        ),
        ("warmth", "/v1/classify", f'{{"input": "{SURROGATE}"}}', "input"),
        ("warmth", "/v1/classify", '{"input": ["red", "\\udfff"]}', "input[1]"),
    ],
)
def test_a_lone_surrogate_is_refused(servers: dict[str, Server], server: str, path: str, body: str, param: str) -> None:
    assert "lone surrogate" in refused(post_raw(servers[server], path, body), param)


@pytest.mark.slow
@pytest.mark.parametrize("role", ["developer", "tool", "function", "narrator"])
def test_only_the_roles_training_takes_are_served(servers: dict[str, Server], role: str) -> None:
    messages = [{"role": "user", "content": "red"}, {"role": role, "content": "blue"}]
    response = httpx.post(f"{servers['chat'].url}/v1/chat/completions", json={"messages": messages}, timeout=60)
    assert repr(role) in refused(response, "messages[1].role")
    trained = [{"role": role, "content": "red"} for role in ("system", "user", "assistant", "user")]
    body = {"messages": trained, "max_tokens": 2}
    assert httpx.post(f"{servers['chat'].url}/v1/chat/completions", json=body, timeout=60).status_code == 200


@pytest.mark.slow
def test_the_openapi_schema_is_served(servers: dict[str, Server]) -> None:
    schema = httpx.get(f"{servers['chat'].url}/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/classify"} <= set(schema["paths"])
    assert httpx.get(f"{servers['chat'].url}/docs").status_code == 404


class FailingModel:
    """A causal LM whose every tokenisation fails: a failure in the server on every generation request."""

    task = "causal-lm"
    max_positions = None
    has_chat_template = True

    def encode_prompt(self, prompt: str) -> list[int]:
        raise RuntimeError("the tokenizer broke")


@pytest.fixture
def failing_server() -> Iterator[str]:
    """The app on a failing model, under uvicorn (what `tunery serve` runs) on a thread."""
    port = free_port()
    settings = ServerSettings(name="failing", max_request_bytes=1024)
    config = uvicorn.Config(create_app(settings, FailingModel), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=30)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/completions", {"prompt": "red"}, 500),
        ("POST", "/v1/completions", {"prompt": "red", "seed": 2**64}, 400),
        ("POST", "/v1/completions", {"prompt": "x" * 2048}, 413),
        ("POST", "/v1/classify", {"input": "red"}, 400),
        ("GET", "/v1/nothing-here", None, 404),
        ("GET", "/v1/completions", None, 405),
    ],
)
def test_the_connection_outlives_an_error(
    failing_server: str, method: str, path: str, body: object, status: int
) -> None:
    with httpx.Client(base_url=failing_server, timeout=30) as client:
        bad = client.request(method, path, json=body)
        assert bad.status_code == status and set(bad.json()["error"]) == {"message", "type", "param", "code"}
        good = client.get("/v1/models")
        assert good.status_code == 200
        # The same connection answered both: the error did not close it.
        assert good.extensions["network_stream"] is bad.extensions["network_stream"]


def test_a_conversation_the_chat_template_refuses_is_a_400(servers: dict[str, Server]) -> None:
    strict = servers["strict"]
    turns = [{"role": "user", "content": "red"}, {"role": "user", "content": "blue"}]
    response = httpx.post(f"{strict.url}/v1/chat/completions", json={"messages": turns, "max_tokens": 2}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages" and "roles must alternate" in error["message"]
    alternating = [{"role": "user", "content": "red"}]
    response = httpx.post(
        f"{strict.url}/v1/chat/completions", json={"messages": alternating, "max_tokens": 2}, timeout=30
    )
    assert response.status_code == 200, response.text
