"""Arbitrary JSON-ish bodies for the model endpoints never make the server fail (no 5xx): Hypothesis, in process."""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_fixtures import untrained_chat_decoder, untrained_classifier, wait_until
from tunery_server.app import create_app
from tunery_server.model import load
from tunery_server.settings import ServerSettings
from tunery_server.source import locate

# Over 30 s on a shared CPU, most of it making the two models.
pytestmark = pytest.mark.slow

# Surrogates included (Hypothesis leaves them out by default): JSON's escapes can carry them.
TEXT = st.text(st.characters(exclude_categories=()), max_size=12) | st.sampled_from(
    ["red", "", " ", "\ud800", "a\udfff", "<|im_end|>", "<|im_start|>assistant\n"]
)
NUMBER = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0, 1, 2, 1e-45, 5e-324, 1e-6, 2**63, 2**64, -1])
)
JSON = st.recursive(
    st.none() | st.booleans() | NUMBER | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=8,
)
MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["system", "user", "assistant", "developer", "tool"]) | JSON,
        "content": TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2) | JSON,
    },
)
SAMPLING = {
    "model": st.sampled_from(["fuzz", "other"]) | JSON,
    "max_tokens": st.integers(min_value=-2, max_value=10) | JSON,
    "temperature": NUMBER | JSON,
    "top_p": NUMBER | JSON,
    "n": st.integers(min_value=0, max_value=2) | JSON,
    "seed": NUMBER | JSON,
    "stop": TEXT | st.lists(TEXT, max_size=5) | JSON,
    "stream": st.booleans() | JSON,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | JSON,
}
# Well-formed values only, so that many bodies get past validation to the tokenizer and the model.
WELL_FORMED = {
    "max_tokens": st.integers(min_value=1, max_value=8),
    "temperature": st.floats(min_value=0, max_value=2) | st.sampled_from([1e-45, 5e-324, 1e-5]),
    "top_p": st.floats(min_value=1e-300, max_value=1),
    "seed": st.integers(min_value=-(2**63), max_value=2**63 - 1),
    "stop": TEXT | st.lists(TEXT, max_size=4),
    "stream": st.booleans(),
}
BODIES = {
    "/v1/completions": st.fixed_dictionaries(
        {}, optional={"prompt": TEXT | st.lists(TEXT, max_size=2) | JSON, **SAMPLING}
    )
    | st.fixed_dictionaries({"prompt": TEXT}, optional=WELL_FORMED),
    "/v1/chat/completions": st.fixed_dictionaries(
        {},
        optional={
            "messages": st.lists(MESSAGE, max_size=4) | JSON,
            "max_completion_tokens": st.integers(min_value=-2, max_value=10) | JSON,
            **SAMPLING,
        },
    )
    | st.fixed_dictionaries({"messages": st.lists(MESSAGE, min_size=1, max_size=3)}, optional=WELL_FORMED),
    "/v1/classify": st.fixed_dictionaries(
        {}, optional={"model": st.sampled_from(["fuzz", "other"]) | JSON, "input": TEXT | st.lists(TEXT) | JSON}
    ),
}


@contextmanager
def serving(published: Path, workdir: Path) -> Iterator[TestClient]:
    """The app on a published model, loaded, with few tokens to generate so that each example is quick."""
    source = locate(str(published))
    app = create_app(ServerSettings(name="fuzz", max_tokens_limit=8), lambda: load(source, workdir))
    with TestClient(app) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200)
        yield client


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, TestClient]]:
    root = tmp_path_factory.mktemp("fuzz")
    with (
        serving(untrained_chat_decoder(root / "chat"), root / "chat-work") as chat,
        serving(untrained_classifier(root / "warmth"), root / "warmth-work") as warmth,
    ):
        yield {"/v1/completions": chat, "/v1/chat/completions": chat, "/v1/classify": warmth}


@pytest.mark.parametrize("path", list(BODIES))
def test_no_body_makes_the_server_fail(clients: dict[str, TestClient], path: str) -> None:
    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(body=BODIES[path] | JSON)
    def check(body: Any) -> None:
        # Encoded here: httpx's own encoder refuses lone surrogates and NaN, which JSON bodies may still carry.
        response = clients[path].post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
        assert response.status_code < 500, (body, response.text)
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    check()
