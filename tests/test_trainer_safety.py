"""Nothing the trainer reads is trusted: pickles never run, model code only when allowed, secrets never echoed."""

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import decoder

from tunery.api.spec import Dataset, FineTuneJobSpec
from tunery_trainer import checkpoints, failures, redaction
from tunery_trainer.data import DataError, prepare
from tunery_trainer.modeling import load_model, load_tokenizer
from tunery_trainer.progress import ProgressReporter, StatusEndpoint
from tunery_trainer.storage import S3Settings, Storage, StorageError
from tunery_trainer.training import SCHEDULER_NAMES, build_optimizer

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def spec(**fields) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "baseModel": {"uri": "file:///models/base/"},
            "dataset": {"train": "file:///data/train.jsonl"},
            "output": {"uri": "file:///out/"},
            **fields,
        }
    )


def same(left, right) -> bool:
    if isinstance(left, torch.Tensor):
        return isinstance(right, torch.Tensor) and torch.equal(left, right)
    if isinstance(left, dict):
        return isinstance(right, dict) and left.keys() == right.keys() and all(same(left[k], right[k]) for k in left)
    if isinstance(left, list | tuple):
        return len(left) == len(right) and all(same(a, b) for a, b in zip(left, right, strict=True))
    return left == right


@pytest.mark.parametrize("scheduler", sorted(SCHEDULER_NAMES))
@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "sgd"])
def test_training_state_round_trips_as_weights_only(tmp_path: Path, optimizer: str, scheduler: str) -> None:
    from transformers import get_scheduler

    settings = spec(hyperparameters={"optimizer": optimizer, "scheduler": scheduler})
    parameter = torch.nn.Parameter(torch.randn(4, 3))
    built = build_optimizer(settings, [parameter], torch.device("cpu"), sharded=False)
    schedule = get_scheduler(SCHEDULER_NAMES[scheduler], built, num_warmup_steps=2, num_training_steps=10)
    for _ in range(3):
        (parameter**2).sum().backward()
        built.step()
        schedule.step()
    state = {
        "optimizer": built.state_dict(),
        "scheduler": schedule.state_dict(),
        "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
    }
    storage = Storage(S3Settings())
    (kept,) = checkpoints.save(
        storage,
        f"file://{tmp_path}/checkpoints/",
        tmp_path / "work",
        checkpoints.Progress(step=3, config_hash="rev"),
        {"weight": parameter},
        state,
        keep=1,
        owner=checkpoints.Owner("uid-1"),
    )
    _, weights, loaded = checkpoints.load(storage, kept.uri, tmp_path / "work")
    assert same(loaded, state) and torch.equal(weights["weight"], parameter.detach())


def test_a_pickled_training_state_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    staged = tmp_path / "staged"
    staged.mkdir()
    save_file({"weight": torch.zeros(2)}, staged / checkpoints.WEIGHTS)
    (staged / checkpoints.STATE).write_text(json.dumps(dataclasses.asdict(checkpoints.Progress(step=1))))
    torch.save({"optimizer": Payload(marker)}, staged / checkpoints.TRAINING_STATE)
    storage = Storage(S3Settings())
    uri = f"file://{tmp_path}/checkpoints/step-00000001/"
    storage.publish(staged, uri, {"step": 1, "configHash": "", "finetuneJobUid": "uid-1"})
    with pytest.raises(StorageError) as refused:
        checkpoints.load(storage, uri, tmp_path / "work")
    assert refused.value.reason == "UnsafeCheckpoint"
    assert f"{uri}{checkpoints.TRAINING_STATE}" in refused.value.message and "delete" in refused.value.message
    assert not marker.exists()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return decoder(tmp_path_factory.mktemp("safety") / "base")


def hostile_pickle_weights(base: Path, directory: Path, marker: Path) -> Path:
    """A model directory whose weights are a pickle that runs code when unpickled in full."""
    directory.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((base / name).read_bytes())
    torch.save({"model.embed_tokens.weight": Payload(marker)}, directory / "pytorch_model.bin")
    return directory


def hostile_remote_code(base: Path, directory: Path, marker: Path) -> Path:
    """A model of a type only its own Python code defines: importing that code creates the marker."""
    directory.mkdir()
    for path in base.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    config = json.loads((base / "config.json").read_text())
    config["model_type"] = "evil"
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    return directory


@pytest.mark.parametrize("hostile", [hostile_pickle_weights, hostile_remote_code])
def test_a_hostile_base_model_runs_no_code_in_the_trainer(tmp_path: Path, base: Path, hostile) -> None:
    marker = tmp_path / "pwned"
    directory = hostile(base, tmp_path / "model", marker)
    settings = spec(method={"type": "full"})
    tokenizer = load_tokenizer(settings, base, None, list)
    with pytest.raises(Exception):  # noqa: B017, PT011 - transformers' own refusal; what matters is the marker
        load_model(settings, directory, tokenizer, [], torch.device("cpu"))
    assert not marker.exists()


def test_model_code_runs_only_when_the_spec_trusts_it(tmp_path: Path, base: Path) -> None:
    marker = tmp_path / "ran"
    directory = hostile_remote_code(base, tmp_path / "model", marker)
    settings = spec(method={"type": "full"}, baseModel={"uri": "file:///models/base/", "trustRemoteCode": True})
    with pytest.raises(Exception):  # noqa: B017, PT011 - the code defines no model; that it ran is the point
        load_model(settings, directory, load_tokenizer(settings, base, None, list), [], torch.device("cpu"))
    assert marker.exists()


@pytest.mark.parametrize("hostile", [hostile_pickle_weights, hostile_remote_code])
def test_a_hostile_published_model_runs_no_code_in_the_server(tmp_path: Path, base: Path, hostile) -> None:
    from tunery_server.model import load
    from tunery_server.source import Source

    marker = tmp_path / "pwned"
    root = tmp_path / "published"
    root.mkdir()
    hostile(base, root / "model", marker)
    source = Source(f"file://{root}/", {"task": "causal-lm", "model": "model"}, root)
    with pytest.raises(Exception):  # noqa: B017, PT011 - transformers' own refusal; what matters is the marker
        load(source, tmp_path / "work")
    assert not marker.exists()


def test_a_manifest_cannot_point_the_server_outside_the_model(tmp_path: Path, base: Path) -> None:
    from tunery_server.model import load
    from tunery_server.source import Source, SourceError

    root = tmp_path / "published"
    root.mkdir()
    source = Source(f"file://{root}/", {"task": "causal-lm", "model": f"../../{base.relative_to('/')}"}, root)
    with pytest.raises(SourceError, match="outside"):
        load(source, tmp_path / "work")


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("DATABASE_PASSWORD", "hunter2-but-longer")
    monkeypatch.setenv("SHORT_TOKEN", "abc")


def test_redact_replaces_credential_values(secrets: None) -> None:
    text = f"key AKIAIOSFODNN7EXAMPLE secret {SECRET} password hunter2-but-longer, abc stays"
    assert redaction.redact(text) == "key [redacted] secret [redacted] password [redacted], abc stays"


def test_errors_and_the_termination_message_are_redacted(
    secrets: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNERY_TERMINATION_MESSAGE_PATH", str(tmp_path / "termination.json"))
    error = StorageError("StorageCredentials", f"s3://bucket/ refused {SECRET}")
    assert SECRET not in error.message and SECRET not in str(error)
    assert SECRET not in DataError(f"row 1: {SECRET}").message
    failures.write_termination_message("DataError", f"bad row: {SECRET}")
    written = json.loads((tmp_path / "termination.json").read_text())
    assert written == {"reason": "DataError", "message": "bad row: [redacted]"}


def test_status_reports_are_redacted(secrets: None) -> None:
    sent = []
    reporter = ProgressReporter(
        StatusEndpoint("https://k", "token", None, "ns", "job"), send=lambda _, b: sent.append(b)
    )
    reporter.report(1, 10, 0.1, {"trainLoss": 1.0}, checkpoints=[{"step": 1, "uri": f"s3://b/{SECRET}/step-1/"}])
    assert SECRET not in json.dumps(sent) and "[redacted]" in json.dumps(sent)


def test_log_lines_are_redacted_once_the_filter_is_installed(secrets: None) -> None:
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(handler.format(record))
    logger = logging.getLogger("tunery_trainer.test")
    logger.addHandler(handler)
    try:
        redaction.RedactingFilter.attach(handler)
        try:
            raise ValueError(f"boom {SECRET}")
        except ValueError:
            logger.exception("failed with %s", SECRET)
    finally:
        logger.removeHandler(handler)
    assert records and all(SECRET not in record for record in records)
    assert "failed with [redacted]" in records[0] and "ValueError: boom [redacted]" in records[0]


def test_the_trainer_cli_redacts_its_tracebacks(tmp_path: Path, base: Path) -> None:
    """A hostile model config echoed in an unexpected error (transformers quotes the unknown model type)."""
    config = json.loads((base / "config.json").read_text())
    model = tmp_path / "model"
    model.mkdir()
    for path in base.iterdir():
        (model / path.name).write_bytes(path.read_bytes())
    (model / "config.json").write_text(json.dumps({**config, "model_type": SECRET}))
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"line {n}"}) + "\n" for n in range(20)))
    trainer_config = {
        "finetuneJob": {"name": "job", "namespace": "ns", "uid": "uid-1"},
        "revision": "rev",
        "outputUri": f"file://{tmp_path}/out/",
        "checkpointUri": f"file://{tmp_path}/out/checkpoints/",
        "spec": spec(baseModel={"uri": f"file://{model}/"}, dataset={"train": f"file://{train}"}).model_dump(
            mode="json", by_alias=True
        ),
    }
    (tmp_path / "trainer.json").write_text(json.dumps(trainer_config))
    result = subprocess.run(
        [sys.executable, "-m", "tunery_trainer", "train", f"--config={tmp_path / 'trainer.json'}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "AWS_SECRET_ACCESS_KEY": SECRET, "TUNERY_TERMINATION_MESSAGE_PATH": str(tmp_path / "t")},
    )
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "[redacted]" in result.stderr
    assert SECRET not in result.stdout + result.stderr


def environment_file(path: Path, separator: str) -> Path:
    """What /proc/self/environ holds: the process's variables, credentials among them."""
    variables = {
        **{f"VARIABLE_{index}": f"value-{index}-" + "x" * 100 for index in range(30)},
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "HOME": "/home/trainer",
    }
    path.write_text(separator.join(f"{name}={value}" for name, value in variables.items()) + separator)
    return path


@pytest.mark.parametrize("separator", ["\0", "\n"])
def test_a_dataset_holding_the_environment_is_not_echoed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, separator: str
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    train = environment_file(tmp_path / "environ", separator)
    dataset = Dataset.model_validate(
        {"train": f"file://{train}", "format": "text", "columns": {"text": "text", "label": "text"}}
    )
    with pytest.raises(DataError) as refused:
        prepare("sequence-classification", dataset, [train], [], seed=0)
    message = refused.value.message
    assert SECRET not in message and SECRET[:20] not in message
    assert len(message) < 800, message
    assert "more" in message or "…" in message


def test_quoted_values_are_bounded() -> None:
    from tunery_trainer.data import quoted

    assert quoted(["short", "y" * 100]) == "['short', '" + "y" * 59 + "…']"
    assert quoted([f"label-{n}" for n in range(8)]).endswith("'label-4', and 3 more]")
