"""Tiny models trained and published for real, and `tunery serve` run on them as a real process."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tiny_models import WARM, decoder, encoder, sentence_parts, write_jsonl

from conftest import REPO_ROOT
from tunery.local_run import local_config
from tunery_trainer.job import run
from tunery_trainer.storage import S3Settings, Storage

TUNERY = Path(sys.executable).parent / "tunery"
SERVER_ROOT = REPO_ROOT / "trainer_image"
if importlib.util.find_spec("tunery_server") is None:
    # An editable install made before tunery_server existed does not map it: its source root goes on the path.
    sys.path.insert(0, str(SERVER_ROOT))
HYPERPARAMETERS = {"maxSteps": 4, "batchSize": 8, "learningRate": 1e-2, "warmupRatio": 0.0}
# The context of the endless decoder: room for generations long enough to be stopped halfway.
ENDLESS_CONTEXT = 4096


def train_and_publish(root: Path, name: str, spec: dict[str, Any]) -> Path:
    """Train a FineTuneJob in this process (CPU) and publish it under root; return the published directory."""
    manifest = {
        "apiVersion": "tunery.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "resources": {"gpus": 0},
            "output": {"uri": f"file://{root}/out/", "name": name, **spec.pop("output", {})},
            "checkpoints": {"everySteps": 0, "keep": 1},
            "hyperparameters": {**HYPERPARAMETERS, **spec.pop("hyperparameters", {})},
            **spec,
        },
    }
    config = local_config(manifest)
    run(config, root / "work")
    return Path(config.output_uri.removeprefix("file://"))


def chat_model(root: Path) -> Path:
    """A tiny Llama, LoRA-tuned on chat and merged, so that model/ holds full weights."""
    parts = sentence_parts(64, seed=1)
    data = write_jsonl(
        root / "chat.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": f"what colour are {number} {thing}?"},
                    {"role": "assistant", "content": colour},
                ]
            }
            for number, thing, colour in parts
        ],
    )
    return train_and_publish(
        root,
        "tiny-chat",
        {
            "baseModel": {"uri": f"file://{decoder(root / 'llama')}/"},
            "task": "causal-lm",
            "dataset": {"train": f"file://{data}", "maxLength": 128},
            "method": {"type": "lora", "lora": {"rank": 4, "alpha": 8}},
            "output": {"mergeAdapter": True},
        },
    )


def sentence_classifier(root: Path) -> Path:
    """A tiny BERT that labels sentences warm or cool (by their colour)."""
    data = write_jsonl(
        root / "labelled.jsonl",
        [
            {"text": f"{number} {thing} is {colour} .", "label": "warm" if colour in WARM else "cool"}
            for number, thing, colour in sentence_parts(64, seed=1)
        ],
    )
    return train_and_publish(
        root,
        "tiny-warmth",
        {
            "baseModel": {"uri": f"file://{encoder(root / 'bert')}/"},
            "task": "sequence-classification",
            "dataset": {"train": f"file://{data}", "maxLength": 32},
            "method": {"type": "full"},
        },
    )


def word_tagger(root: Path) -> Path:
    """A tiny BERT that tags things and colours, LoRA-tuned and not merged: served as base model plus adapter."""
    data = write_jsonl(
        root / "tagged.jsonl",
        [
            {"tokens": [number, thing, "is", colour, "."], "tags": ["O", "B-THING", "O", "B-COLOUR", "O"]}
            for number, thing, colour in sentence_parts(64, seed=1)
        ],
    )
    return train_and_publish(
        root,
        "tiny-tagger",
        {
            "baseModel": {"uri": f"file://{encoder(root / 'bert')}/"},
            "task": "token-classification",
            "dataset": {"train": f"file://{data}", "maxLength": 32},
            "method": {"type": "lora"},
            "output": {"mergeAdapter": False},
            # Enough steps for the tags to be learnt, so that the server has entities to group.
            "hyperparameters": {"maxSteps": 20},
        },
    )


def endless_decoder(root: Path) -> Path:
    """A tiny random Llama, published untrained, whose greedy generations always run to max_tokens.

    Its output weights for the special tokens are zero, so that their logits (0) always lose to the largest of the
    ~300 small random others: greedy decoding never ends the text, nor emits a token that decodes to nothing.
    Rotary position embeddings take any context, so it is made long enough for thousands of tokens.
    """
    import torch
    import transformers

    base = decoder(root / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    model.config.max_position_embeddings = ENDLESS_CONTEXT
    with torch.no_grad():
        model.lm_head.weight[tokenizer.all_special_ids] = 0
    model.save_pretrained(root / "layout" / "model")
    tokenizer.save_pretrained(root / "layout" / "model")
    return publish_untrained(root, {"name": "endless", "task": "causal-lm", "model": "model/"})


def untrained_chat_decoder(root: Path, chat_template: str | None = None) -> Path:
    """A tiny random Llama with a chat template (the ChatML one tunery trains with by default), published untrained."""
    from tunery_trainer.tokenization import DEFAULT_CHAT_TEMPLATE

    model = decoder(root / "layout" / "model")
    config = model / "tokenizer_config.json"
    template = chat_template or DEFAULT_CHAT_TEMPLATE
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": template}))
    return publish_untrained(root, {"name": "untrained-chat", "task": "causal-lm", "model": "model/"})


def untrained_classifier(root: Path) -> Path:
    """A tiny random BERT sequence classifier (warm or cool), published untrained."""
    import transformers

    labels = ["cool", "warm"]
    base = encoder(root / "bert")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(labels))
    model.save_pretrained(root / "layout" / "model")
    transformers.AutoTokenizer.from_pretrained(base).save_pretrained(root / "layout" / "model")
    manifest = {"name": "untrained-warmth", "task": "sequence-classification", "labels": labels, "model": "model/"}
    return publish_untrained(root, manifest)


def publish_untrained(root: Path, manifest: dict[str, Any]) -> Path:
    """Publish root/layout as the trainer publishes (files with their digests, the manifest last)."""
    published = root / "published"
    Storage(S3Settings()).publish(root / "layout", f"file://{published}/", manifest)
    return published


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_environment() -> dict[str, str]:
    """The environment for `tunery serve`: one compute thread each, as several servers share the test machine."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SERVER_ROOT), environment.get("PYTHONPATH")]))
    return environment


def wait_until(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@dataclass
class Server:
    """A `tunery serve` process on loopback, its output in a log file, its metrics on a port of their own."""

    process: subprocess.Popen
    port: int
    metrics_port: int
    log: Path
    url: str = field(init=False)
    metrics_url: str = field(init=False)

    def __post_init__(self) -> None:
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"

    @classmethod
    def start(cls, published: Path | str, log: Path, *args: str, env: dict[str, str] | None = None) -> "Server":
        # Free ports for both: the metrics' default (9090) would collide between the servers a test starts.
        port, metrics_port = free_port(), free_port()
        with log.open("wb") as output:
            process = subprocess.Popen(
                [str(TUNERY), "serve", str(published), f"--port={port}", f"--metrics-port={metrics_port}", *args],
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**server_environment(), **(env or {})},
            )
        return cls(process, port, metrics_port, log)

    def metric(self, name: str) -> float:
        """The value of a series of the server's own model (the first, for a metric with more labels)."""
        for line in httpx.get(self.metrics_url, timeout=10).text.splitlines():
            if line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} is not exposed")

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"tunery serve exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"tunery serve was not ready within {timeout}s:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def ready_servers(started: dict[str, Server]) -> Iterator[dict[str, Server]]:
    """Servers started together (their models load in parallel), ready, and stopped however the block ends."""
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()
