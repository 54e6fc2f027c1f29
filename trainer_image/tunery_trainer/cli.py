"""The trainer container's command line: `train` (the image's command) and `check` (the data checks alone)."""

import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from tunery.api import contract
from tunery.api.trainer_config import TrainerConfig
from tunery_trainer import failures, redaction
from tunery_trainer.data import prepare_mixture
from tunery_trainer.failures import Failure
from tunery_trainer.storage import MANIFEST_NAME, S3Settings, Storage, download_from_hub, fetch_sources

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Tunery's trainer (the container entrypoint).")

ConfigOption = Annotated[Path, typer.Option("--config", help="The trainer.json the operator renders.")]
WorkdirOption = Annotated[
    Path | None, typer.Option("--workdir", help="Scratch space for fetched data (default: a temporary directory).")
]


@app.callback()
def main() -> None:
    """Tunery's trainer."""
    # Every command's log lines and tracebacks pass the redaction; `train` lowers the level to INFO.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    redaction.install()


@app.command()
def train(
    config: ConfigOption,
    workdir: WorkdirOption = None,
    metrics_port: Annotated[
        int | None, typer.Option("--metrics-port", envvar="TUNERY_METRICS_PORT", help="Serve Prometheus metrics here.")
    ] = None,
    log_every: Annotated[int, typer.Option("--log-every", help="Log a JSON line every N steps.")] = 10,
) -> None:
    """Train the configured revision (resuming from its latest checkpoint) and publish the model."""
    # Imported here: `check` and `--help` should not pay for loading torch and transformers.
    from transformers.utils import logging as transformers_logging

    from tunery_trainer import preemption
    from tunery_trainer.job import run
    from tunery_trainer.metrics import TrainerMetrics
    from tunery_trainer.progress import ProgressReporter, StatusEndpoint

    logging.getLogger().setLevel(logging.INFO)
    # Our own JSON lines and progress bar say what happens; loading bars, load reports (a new classifier head is
    # "missing" by design) and PEFT's calls into deprecated transformers APIs only bury them.
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    trainer_config = _load(config)
    job = trainer_config.finetune_job
    main_process = os.environ.get("RANK", "0") == "0"
    metrics = TrainerMetrics(job.namespace, job.name) if main_process and metrics_port is not None else None
    if metrics is not None:
        metrics.serve(metrics_port)
    status = (
        ProgressReporter(StatusEndpoint.in_cluster(job.namespace, job.name))
        if main_process and "KUBERNETES_SERVICE_HOST" in os.environ
        else None
    )
    scratch = workdir or Path(tempfile.gettempdir()) / f"tunery-{trainer_config.revision}"
    preemption.install()
    try:
        outcome = run(trainer_config, scratch, metrics, status, log_every)
    except Exception as error:  # noqa: BLE001 - every failure ends with a reason; see failures.classify
        _fail(failures.classify(error, scratch))
    if main_process:
        typer.echo(json.dumps({"model": outcome.output_uri, "step": outcome.progress.step}))


@app.command()
def fetch(
    uri: Annotated[str, typer.Option("--uri", help="The published model (s3://, file:// or pvc://).")],
    dest: Annotated[Path, typer.Option("--dest", help="Where to put it (the serving pod's model volume).")],
    addressing: Annotated[str, typer.Option("--addressing", help="S3 addressing: auto, path or virtual.")] = "auto",
    retry_seconds: Annotated[
        int, typer.Option("--retry-seconds", min=0, help="How long each operation retries a failing store.")
    ] = contract.STORAGE_RETRY_SECONDS,
) -> None:
    """Fetch a published model, verified against its manifest (the serving init container).

    A model published as an adapter alone (prompt or prefix tuning, or mergeAdapter false) always gets its base
    model too, into DEST/base: the server container has no storage credentials of its own, and vLLM serves
    DEST/base with the adapter.
    """
    try:
        manifest = _fetch_model(Storage(S3Settings.from_env(addressing, retry_seconds)), uri, dest)
    except Exception as error:  # noqa: BLE001 - every failure ends with a reason; see failures.classify
        _fail(failures.classify(error, dest))
    typer.echo(json.dumps({"model": uri, "files": len(manifest["files"]), "dest": str(dest)}))


def _fetch_model(storage: Storage, uri: str, dest: Path) -> dict:
    storage.fetch_published(uri, dest)
    manifest = json.loads((dest / MANIFEST_NAME).read_text())
    base = manifest.get("baseModel")
    if not manifest.get("model") and base:
        _fetch_base(storage, base, dest / "base")
    return manifest


def _fetch_base(storage: Storage, uri: str, target: Path) -> None:
    if uri.startswith("hf://"):
        # The Hub's snapshot links into its cache: copied as plain files, DEST/base stands on its own.
        shutil.copytree(download_from_hub(uri), target, dirs_exist_ok=True)
    else:
        storage.fetch(uri if uri.endswith("/") else uri + "/", target)


@app.command()
def check(config: ConfigOption, workdir: WorkdirOption = None) -> None:
    """Fetch the dataset and check it before any model is loaded; print what would be trained on."""
    trainer_config = _load(config)
    try:
        with tempfile.TemporaryDirectory(prefix="tunery-") as scratch:
            report = _check_data(trainer_config, workdir or Path(scratch))
    except Exception as error:  # noqa: BLE001 - every failure ends with a reason; see failures.classify
        _fail(failures.classify(error, workdir))
    # The report quotes the data (labels, problems), which may hold the environment's credentials.
    typer.echo(json.dumps(redaction.redact_all(report), indent=2))


def _load(path: Path) -> TrainerConfig:
    try:
        return TrainerConfig.model_validate_json(path.read_text(encoding="utf-8"))
    except OSError as exc:
        _fail(Failure("InvalidConfig", f"{path}: cannot read the trainer config: {exc}", contract.EXIT_INVALID_CONFIG))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False))
        _fail(Failure("InvalidConfig", f"{path}: {problems}", contract.EXIT_INVALID_CONFIG))


def _check_data(config: TrainerConfig, workdir: Path) -> dict:
    spec = config.spec
    storage = Storage(S3Settings.from_spec(spec.storage))
    validation_files = (
        storage.fetch(spec.dataset.validation, workdir / "data" / "validation") if spec.dataset.validation else []
    )
    sources = fetch_sources(storage, spec.dataset, workdir / "data")
    prepared = prepare_mixture(
        spec.task,
        spec.dataset,
        sources,
        validation_files,
        spec.hyperparameters.seed,
        spool_directory=workdir / "data",
        objective=spec.objective.type,
    )
    report = prepared.report
    return {
        "rowsRead": report.rows_read,
        "trainExamples": len(prepared.train),
        "validationExamples": len(prepared.validation),
        "duplicatesDropped": report.duplicates,
        "emptyRowsDropped": report.empty_rows,
        "badRows": dict(report.bad_rows),
        "firstProblems": report.first_problems,
        "labels": prepared.label_names,
        **({"mixture": report.sources} if len(report.sources) > 1 else {}),
        "bytesDownloaded": storage.bytes_downloaded,
    }


def _fail(failure: Failure) -> None:
    if not failure.classified:
        # Through the redacting log handler: the traceback may quote the environment.
        logging.getLogger("tunery_trainer").error("unexpected failure", exc_info=True)
    failures.write_termination_message(failure.reason, failure.message)
    typer.echo(redaction.redact(f"{failure.reason}: {failure.message}"), err=True)
    raise typer.Exit(failure.exit_code)
