"""`tunery serve` on tiny models trained for real: OpenAI's client against it, classification, limits and metrics."""

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from server_fixtures import (
    TUNERY,
    Server,
    chat_model,
    ready_servers,
    sentence_classifier,
    server_environment,
    wait_until,
    word_tagger,
)
from tiny_models import COLORS
from tunery_server.app import create_app
from tunery_server.errors import field_path
from tunery_server.model import group_entities, load
from tunery_server.settings import ServerSettings
from tunery_server.source import SourceError, locate
from tunery_server.text import StopText

from tunery_trainer.storage import MANIFEST_NAME, S3Settings, Storage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("published")
    return {
        "chat": chat_model(root / "chat"),
        "warmth": sentence_classifier(root / "warmth"),
        "tagger": word_tagger(root / "tagger"),
    }


@pytest.fixture(scope="module")
def servers(published: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    logs = tmp_path_factory.mktemp("server-logs")
    # Started together, so that their imports and loading overlap; the chat model is served by its file:// URI.
    started = {
        "chat": Server.start(f"file://{published['chat']}/", logs / "chat.log", "--max-tokens-limit", "64"),
        "warmth": Server.start(published["warmth"], logs / "warmth.log", "--max-request-bytes", "65536"),
        "tagger": Server.start(published["tagger"], logs / "tagger.log", "--name", "tagger"),
    }
    with ready_servers(started) as ready:
        yield ready


@pytest.fixture(scope="module")
def client(servers: dict[str, Server]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{servers['chat'].url}/v1", api_key="unused", max_retries=0, timeout=60)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# The OpenAI client -------------------------------------------------------------------------------------------------


def test_models_lists_the_manifest_name(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [model.id for model in models] == ["tiny-chat"]
    assert models[0].owned_by == "tunery" and models[0].object == "model"


def test_completion(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="tiny-chat", prompt="three apple is", max_tokens=6, temperature=0)
    choice = completion.choices[0]
    assert isinstance(choice.text, str) and choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 6
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_greedy_is_repeatable_and_stop_sequences_cut_the_text(client: openai.OpenAI) -> None:
    def complete(**options) -> openai.types.Completion:
        return client.completions.create(model="tiny-chat", prompt=["two sky is"], temperature=0, **options)

    first = complete(max_tokens=12)
    text = first.choices[0].text
    assert complete(max_tokens=12).choices[0].text == text
    if len(text) < 4:
        pytest.skip(f"the tiny model ended after {text!r}: no room for a stop sequence")
    stop = text[2:4]
    stopped = complete(max_tokens=12, stop=[stop, "never generated"]).choices[0]
    assert stopped.text == text[: text.find(stop)] and stopped.finish_reason == "stop"


def test_seeded_sampling_is_repeatable(client: openai.OpenAI) -> None:
    texts = {
        client.completions.create(
            model="tiny-chat", prompt="one sun is", max_tokens=8, temperature=1.5, top_p=0.9, seed=7
        )
        .choices[0]
        .text
        for _ in range(2)
    }
    assert len(texts) == 1


def test_chat_completion(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "system", "content": "answer with a colour"}, {"role": "user", "content": "sky?"}],
        max_tokens=5,
    )
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length") and completion.usage.completion_tokens <= 5


def test_streamed_chat(client: openai.OpenAI, servers: dict[str, Server]) -> None:
    stream = client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": "what colour are two plum?"}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    assert content, chunks
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 8
    # Streaming and not streaming give the same text.
    whole = client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": "what colour are two plum?"}],
        max_tokens=8,
        temperature=0,
    )
    assert "".join(content) == whole.choices[0].message.content
    assert servers["chat"].metric("tunery_server_time_to_first_token_seconds_count") > 0


def test_streamed_completion(servers: dict[str, Server]) -> None:
    body = {"prompt": "four snow is", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{servers['chat'].url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_the_client_sees_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="tiny-chat", prompt="red", max_tokens=65)
    assert error.value.param == "max_tokens" and "--max-tokens-limit" in error.value.message
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"


def test_concurrent_completions_all_succeed(servers: dict[str, Server]) -> None:
    url = f"{servers['chat'].url}/v1/completions"

    def complete(index: int) -> httpx.Response:
        return httpx.post(url, json={"prompt": f"{index} apple is", "max_tokens": 8, "seed": index}, timeout=120)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(complete, range(8)))
    assert [response.status_code for response in responses] == [200] * 8
    assert all(isinstance(response.json()["choices"][0]["text"], str) for response in responses)
    assert all(response.json()["usage"]["completion_tokens"] > 0 for response in responses)


# Classification ----------------------------------------------------------------------------------------------------


def test_sequence_classification(servers: dict[str, Server]) -> None:
    texts = ["three apple is red .", "two sky is blue .", "many snow is white ."]
    response = httpx.post(f"{servers['warmth'].url}/v1/classify", json={"input": texts, "model": "tiny-warmth"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "tiny-warmth" and len(body["data"]) == 3
    for index, result in enumerate(body["data"]):
        assert result["index"] == index and result["label"] in ("warm", "cool")
        assert set(result["scores"]) == {"warm", "cool"} and abs(sum(result["scores"].values()) - 1) < 1e-4
        assert result["score"] == max(result["scores"].values())
    assert body["usage"]["prompt_tokens"] > 0
    single = httpx.post(f"{servers['warmth'].url}/v1/classify", json={"input": texts[0]}).json()
    assert single["data"][0]["label"] == body["data"][0]["label"]


def test_token_classification_groups_entities(servers: dict[str, Server]) -> None:
    text = "three apple is red ."
    response = httpx.post(f"{servers['tagger'].url}/v1/classify", json={"input": [text, ""]}, timeout=30)
    assert response.status_code == 200, response.text
    entities, empty = (result["entities"] for result in response.json()["data"])
    assert empty == []
    assert entities, "the tagger found nothing: it was trained to tag things and colours"
    for entity in entities:
        assert entity["label"] in ("THING", "COLOUR") and 0 < entity["score"] <= 1
        assert text[entity["start"] : entity["end"]] == entity["text"]
    colours = [entity["text"] for entity in entities if entity["label"] == "COLOUR"]
    assert all(colour in COLORS for colour in colours)


def test_each_endpoint_refuses_the_other_task(servers: dict[str, Server]) -> None:
    completion = httpx.post(f"{servers['warmth'].url}/v1/completions", json={"prompt": "hi"})
    assert completion.status_code == 400 and "/v1/classify" in error_of(completion)["message"]
    classify = httpx.post(f"{servers['chat'].url}/v1/classify", json={"input": "hi"})
    assert classify.status_code == 400 and "/v1/chat/completions" in error_of(classify)["message"]


# Errors and limits -------------------------------------------------------------------------------------------------


def test_malformed_json_is_400(servers: dict[str, Server]) -> None:
    response = httpx.post(
        f"{servers['chat'].url}/v1/chat/completions",
        content=b'{"messages": [',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error" and "JSON" in error["message"]


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        ("/v1/chat/completions", {"model": "tiny-chat"}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}], "temperature": 3}, "temperature"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ("/v1/completions", {"prompt": "hi", "n": 2}, "n"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 65}, "max_tokens"),
        ("/v1/completions", {"prompt": "sky " * 300}, "prompt"),
        ("/v1/completions", {"prompt": "sky " * 220, "max_tokens": 64}, "max_tokens"),
    ],
)
def test_invalid_requests_name_the_field(servers: dict[str, Server], endpoint: str, body: dict, param: str) -> None:
    response = httpx.post(f"{servers['chat'].url}{endpoint}", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == param and error["type"] == "invalid_request_error", error


def test_unknown_model_and_route_are_404(servers: dict[str, Server]) -> None:
    response = httpx.post(f"{servers['warmth'].url}/v1/classify", json={"input": "hi", "model": "other"})
    assert response.status_code == 404 and error_of(response)["code"] == "model_not_found"
    assert httpx.get(f"{servers['warmth'].url}/v1/models/tiny-warmth").json()["id"] == "tiny-warmth"
    assert httpx.get(f"{servers['warmth'].url}/v1/embeddings").status_code == 404


def test_oversized_bodies_are_413(servers: dict[str, Server]) -> None:
    url = f"{servers['warmth'].url}/v1/classify"
    payload = json.dumps({"input": "red " * 20_000}).encode()
    declared = httpx.post(url, content=payload, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and error_of(declared)["code"] == "request_too_large"
    # Without a Content-Length (chunked), the body is measured as it arrives.
    chunked = httpx.post(
        url, content=iter([payload[:40_000], payload[40_000:]]), headers={"content-type": "application/json"}
    )
    assert chunked.status_code == 413
    assert httpx.post(url, json={"input": "red"}).status_code == 200


def test_metrics_count_requests_by_endpoint_and_status(servers: dict[str, Server]) -> None:
    url = servers["chat"].url
    httpx.post(f"{url}/v1/completions", json={"prompt": "red", "max_tokens": 2}, timeout=30)
    httpx.post(f"{url}/v1/completions", json={"prompt": "red", "max_tokens": 999}, timeout=30)
    text = httpx.get(servers["chat"].metrics_url).text
    assert 'tunery_server_requests_total{endpoint="/v1/completions",model="tiny-chat",status="200"}' in text
    assert 'tunery_server_requests_total{endpoint="/v1/completions",model="tiny-chat",status="400"}' in text
    assert servers["chat"].metric("tunery_server_generated_tokens_total") > 0
    assert servers["chat"].metric("tunery_server_prompt_tokens_total") > 0
    assert servers["chat"].metric("tunery_server_model_loaded") == 1
    assert servers["chat"].metric("tunery_server_in_flight_requests") == 0
    assert 'tunery_server_request_duration_seconds_bucket{endpoint="/v1/completions"' in text
    # Only on the metrics port: API clients (other tenants' included) never see them.
    assert httpx.get(f"{url}/metrics").status_code == 404


# The command line --------------------------------------------------------------------------------------------------


def test_serving_a_directory_without_a_manifest_fails_at_once(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    result = subprocess.run(
        [str(TUNERY), "serve", str(tmp_path), "--port", "1"],
        capture_output=True,
        text=True,
        env=server_environment(),
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "tunery-manifest.json" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.integration
def test_a_model_on_s3_is_fetched_and_served(
    s3_env: dict[str, str], published: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = {name: s3_env[name] for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    for name, value in keys.items():
        monkeypatch.setenv(name, value)
    storage = Storage(S3Settings(endpoint=s3_env["TUNERY_S3_ENDPOINT"], addressing="path"))
    try:
        storage.client.create_bucket(Bucket="served-models")
    except storage.client.exceptions.BucketAlreadyOwnedByYou:
        pass
    manifest = json.loads((published["warmth"] / MANIFEST_NAME).read_text())
    storage.publish(
        published["warmth"], "s3://served-models/warmth/r1/", {k: v for k, v in manifest.items() if k != "files"}
    )
    server = Server.start(
        "s3://served-models/warmth/r1",
        tmp_path / "server.log",
        "--model-dir",
        str(tmp_path / "fetched"),
        env={**keys, "AWS_ENDPOINT_URL_S3": s3_env["TUNERY_S3_ENDPOINT"]},
    )
    try:
        server.wait_ready()
        assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"] == "tiny-warmth"
        classified = httpx.post(f"{server.url}/v1/classify", json={"input": "two sky is blue ."}).json()
        assert classified["data"][0]["label"] in ("warm", "cool")
    finally:
        server.stop()
    assert (tmp_path / "fetched" / MANIFEST_NAME).is_file() and (tmp_path / "fetched" / "model").is_dir()


@pytest.mark.integration
def test_the_init_container_fetches_from_s3_and_the_server_serves_what_it_fetched(
    s3_env: dict[str, str], published: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The serving pod's two commands as the operator renders them: an adapter-only tagger brings its base."""
    keys = {name: s3_env[name] for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    for name, value in keys.items():
        monkeypatch.setenv(name, value)
    env = {**server_environment(), **keys, "AWS_ENDPOINT_URL_S3": s3_env["TUNERY_S3_ENDPOINT"]}
    storage = Storage(S3Settings(endpoint=s3_env["TUNERY_S3_ENDPOINT"], addressing="path"))
    try:
        storage.client.create_bucket(Bucket="init-models")
    except storage.client.exceptions.BucketAlreadyOwnedByYou:
        pass
    manifest = json.loads((published["tagger"] / MANIFEST_NAME).read_text())
    base = Path(manifest["baseModel"].removeprefix("file://"))
    storage.publish(base, "s3://init-models/base/")
    metadata = {k: v for k, v in manifest.items() if k != "files"} | {"baseModel": "s3://init-models/base/"}
    storage.publish(published["tagger"], "s3://init-models/tagger/r1/", metadata)
    trainer = str(Path(sys.executable).parent / "tunery-trainer")
    fetched = tmp_path / "models" / "current"
    result = subprocess.run(
        [trainer, "fetch", "--uri=s3://init-models/tagger/r1/", f"--dest={fetched}", "--addressing=path"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (fetched / MANIFEST_NAME).is_file() and (fetched / "adapter").is_dir() and (fetched / "base").is_dir()
    missing = subprocess.run(
        [trainer, "fetch", "--uri=s3://init-models/nothing/", f"--dest={tmp_path / 'none'}", "--retry-seconds=0"],
        capture_output=True,
        text=True,
        env={**env, "TUNERY_TERMINATION_MESSAGE_PATH": str(tmp_path / "termination.json")},
        timeout=120,
    )
    assert missing.returncode == 66
    assert json.loads((tmp_path / "termination.json").read_text())["reason"] == "ModelIncomplete"
    server = Server.start(str(fetched), tmp_path / "server.log", env=server_environment())
    try:
        server.wait_ready()
        tagged = httpx.post(f"{server.url}/v1/classify", json={"input": "two sky is blue ."}).json()
        assert "entities" in tagged["data"][0]
    finally:
        server.stop()


# The app and its parts, in this process ----------------------------------------------------------------------------


def test_ready_only_once_the_model_is_loaded(published: dict[str, Path], tmp_path: Path) -> None:

    gate = threading.Event()
    source = locate(str(published["warmth"]))

    def held_loader():
        assert gate.wait(timeout=60)
        return load(source, tmp_path)

    with TestClient(create_app(ServerSettings(name="warmth"), held_loader)) as http:
        assert http.get("/healthz").status_code == 200
        assert http.get("/readyz").status_code == 503
        loading = http.post("/v1/classify", json={"input": "red"})
        assert loading.status_code == 503 and error_of(loading)["code"] == "model_loading"
        assert 'tunery_server_model_loaded{model="warmth"} 0.0' in exposition(http)
        gate.set()
        wait_until(lambda: http.get("/readyz").status_code == 200)
        assert http.post("/v1/classify", json={"input": "red"}).json()["data"][0]["label"] in ("warm", "cool")
        assert 'tunery_server_model_loaded{model="warmth"} 1.0' in exposition(http)


def exposition(http: TestClient) -> str:
    return generate_latest(http.app.state.metrics.registry).decode()


def test_a_model_that_fails_to_load_is_reported() -> None:

    failures: list[BaseException] = []

    def broken_loader():
        raise SourceError("the weights are gone")

    app = create_app(ServerSettings(name="broken"), broken_loader, on_load_failure=failures.append)
    with TestClient(app) as http:
        wait_until(lambda: bool(failures))
        ready = http.get("/readyz")
        assert ready.status_code == 503 and "the weights are gone" in ready.json()["error"]
        refused = http.post("/v1/completions", json={"prompt": "hi"})
        assert refused.status_code == 503 and error_of(refused)["code"] == "model_load_failed"
    assert [str(failure) for failure in failures] == ["the weights are gone"]


def test_stop_sequences_are_cut_even_across_tokens() -> None:

    def decode(ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def released(text: str, stops: list[str]) -> tuple[list[str], StopText]:
        assembler = StopText(decode, stops)
        deltas = [assembler.add(byte) for byte in text.encode()]
        return [*deltas, assembler.finish()], assembler

    deltas, assembler = released("hello world", ["o w"])
    assert "".join(deltas) == "hell" and assembler.stopped
    # A tail that could begin a stop sequence waits, and is released when it turns out not to.
    deltas, assembler = released("abxy", ["xyz"])
    assert deltas[:4] == ["a", "b", "", ""] and deltas[4] == "xy" and not assembler.stopped
    # Characters split over tokens are released whole.
    deltas, _ = released("héllo", [])
    assert "".join(deltas) == "héllo" and not any("\ufffd" in delta for delta in deltas)


def test_tagged_words_group_into_entities() -> None:

    text = "new york is big , paris too"
    spans = [(0, 3), (4, 8), (9, 11), (12, 15), (16, 17), (18, 23), (24, 27)]
    tags = [("B-LOC", 0.9), ("I-LOC", 0.7), ("O", 1.0), ("SIZE", 0.8), ("O", 1.0), ("I-LOC", 0.6), ("B-LOC", 0.5)]
    entities = [(entity.text, entity.label, round(entity.score, 3)) for entity in group_entities(text, spans, tags)]
    assert entities == [("new york", "LOC", 0.8), ("big", "SIZE", 0.8), ("paris", "LOC", 0.6), ("too", "LOC", 0.5)]


@pytest.mark.parametrize(
    "scheme",
    [
        {"single": "S", "begin": "B", "inside": "I", "end": "E"},
        {"single": "U", "begin": "B", "inside": "I", "end": "L"},
    ],
    ids=["BIOES", "BILOU"],
)
def test_bioes_and_bilou_tags_group_as_evaluation_groups_them(scheme: dict[str, str]) -> None:
    """A single-word entity beside a multi-word one of the same type stays two entities; an end closes one."""
    text = "paris new york city is big"
    spans = [(0, 5), (6, 9), (10, 14), (15, 19), (20, 22), (23, 26)]
    single, begin, inside, end = scheme["single"], scheme["begin"], scheme["inside"], scheme["end"]
    tags = [
        (f"{single}-LOC", 0.9),
        (f"{begin}-LOC", 0.8),
        (f"{inside}-LOC", 0.6),
        (f"{end}-LOC", 0.7),
        ("O", 1.0),
        (f"{single}-SIZE", 0.5),
    ]
    entities = [
        (entity.text, entity.label, entity.start, entity.end, round(entity.score, 3))
        for entity in group_entities(text, spans, tags)
    ]
    assert entities == [
        ("paris", "LOC", 0, 5, 0.9),
        ("new york city", "LOC", 6, 19, 0.7),
        ("big", "SIZE", 23, 26, 0.5),
    ]


def test_validation_locations_become_field_paths() -> None:

    assert field_path(["messages", 0, "content"]) == "messages[0].content"
    assert field_path(["prompt", "list[str]", 1]) == "prompt[1]"
    assert field_path([]) is None
