"""The `tunery` command line: validate manifests, train one on this machine, print the CRD, run the operator."""

from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console

from tunery.api.crd import render_crd_yaml
from tunery.api.policy import Policy, PolicyError, load_policy, parse_for_cluster, validate_for_cluster
from tunery.api.resource import API_VERSION, KIND
from tunery.api.validation import validate_manifest
from tunery.manifests import UnreadableManifest, read_documents

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Fine-tune and serve language models on Kubernetes.")

EXIT_VALID, EXIT_INVALID, EXIT_UNREADABLE = 0, 1, 2


@app.command()
def validate(
    files: Annotated[
        list[str], typer.Argument(help="FineTuneJob manifests (YAML, several documents allowed); - reads stdin.")
    ],
    policy_file: Annotated[
        Path | None, typer.Option("--policy", help="The operator's policy file (default: the default policy).")
    ] = None,
    local: Annotated[
        bool, typer.Option("--local", help="Check manifests meant for `tunery run` (file:// allowed, no policy).")
    ] = False,
) -> None:
    """Check FineTuneJob manifests as the cluster's operator would: schema, cross-field rules and the operator's
    policy (or, with --local, as `tunery run` would). Exit 0 valid, 1 invalid, 2 unreadable."""
    out = Console(highlight=False, soft_wrap=True)
    policy = _policy_or_exit(out, policy_file, local)
    invalid = unreadable = False
    for source in files:
        try:
            documents = read_documents(source)
        except UnreadableManifest as exc:
            out.print(f"[red]✗[/red] {exc}", markup=True)
            unreadable = True
            continue
        if not documents:
            out.print(f"[yellow]-[/yellow] {source}: no documents")
        for document in documents:
            content = document.content
            if isinstance(content, dict) and content.get("kind") != KIND:
                out.print(f"[yellow]-[/yellow] {document.label}: skipped, not a {API_VERSION} {KIND}")
                continue
            errors = validate_manifest(content) if policy is None else validate_for_cluster(content, policy)
            if not errors:
                out.print(f"[green]✓[/green] {document.label}: valid")
                continue
            invalid = True
            out.print(f"[red]✗[/red] {document.label}: {len(errors)} error{'s' if len(errors) > 1 else ''}")
            for error in errors:
                out.print(f"    {error.path}: {error.message}", markup=False)
    raise typer.Exit(EXIT_UNREADABLE if unreadable else EXIT_INVALID if invalid else EXIT_VALID)


def _policy_or_exit(out: Console, policy_file: Path | None, local: bool) -> Policy | None:
    """The policy to check against; None for --local manifests, which the operator never sees."""
    if local and policy_file:
        out.print("[red]✗[/red] --local checks manifests for `tunery run`, where no policy applies: drop --policy")
        raise typer.Exit(EXIT_UNREADABLE)
    if local:
        return None
    try:
        return load_policy(policy_file) if policy_file else Policy()
    except PolicyError as exc:
        out.print(f"[red]✗[/red] {exc}", markup=False)
        raise typer.Exit(EXIT_UNREADABLE) from exc


@app.command()
def render(
    file: Annotated[str, typer.Argument(help="One FineTuneJob manifest (YAML); - reads stdin.")],
    policy_file: Annotated[
        Path | None, typer.Option("--policy", help="The operator's policy file (default: the default policy).")
    ] = None,
) -> None:
    """Print every object the operator would create for a manifest (serving as it will be once the model is
    published), as multi-document YAML; or the refusals `tunery validate` prints. Exit 0, 1 refused, 2 unreadable."""
    from tunery.controller.preview import preview
    from tunery.controller.settings import OperatorSettings

    out = Console(highlight=False, soft_wrap=True, stderr=True)
    policy = _policy_or_exit(out, policy_file, local=False)
    try:
        documents = read_documents(file)
    except UnreadableManifest as exc:
        out.print(f"[red]✗[/red] {exc}", markup=False)
        raise typer.Exit(EXIT_UNREADABLE) from exc
    if len(documents) != 1:
        out.print(f"[red]✗[/red] {file}: holds {len(documents)} documents; tunery render takes one FineTuneJob")
        raise typer.Exit(EXIT_UNREADABLE)
    (document,) = documents
    parsed = parse_for_cluster(document.content, policy)
    if parsed.finetunejob is None:
        out.print(f"[red]✗[/red] {document.label}: the operator would refuse it")
        for error in parsed.errors:
            out.print(f"    {error.path}: {error.message}", markup=False)
        raise typer.Exit(EXIT_INVALID)
    typer.echo(yaml.safe_dump_all(preview(parsed.finetunejob, OperatorSettings(), policy), sort_keys=False), nl=False)


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="A FineTuneJob manifest; ${VAR} is replaced from the environment.")],
    processes: Annotated[
        int, typer.Option("--processes", "-n", min=1, help="Training processes (torchrun; gloo on CPU).")
    ] = 1,
    workdir: Annotated[Path | None, typer.Option("--workdir", help="Scratch space (default: a temporary one).")] = None,
    metrics_port: Annotated[int | None, typer.Option("--metrics-port", help="Serve Prometheus metrics here.")] = None,
) -> None:
    """Train a FineTuneJob on this machine, no cluster needed; print progress and where the model is."""
    # Imported here: the operator image has no trainer, and validate should not pay for it.
    from tunery.local_run import LocalRunError, expand_variables, local_config, train_locally

    out = Console(highlight=False, soft_wrap=True, stderr=True)
    try:
        documents = [document for document in yaml.safe_load_all(file.read_text(encoding="utf-8")) if document]
        if len(documents) != 1:
            raise LocalRunError([f"{file}: holds {len(documents)} documents; tunery run takes one FineTuneJob"])
        config = local_config(expand_variables(documents[0]))
    except OSError as exc:
        out.print(f"[red]✗[/red] {file}: cannot read: {exc}")
        raise typer.Exit(EXIT_UNREADABLE) from exc
    except yaml.YAMLError as exc:
        out.print(f"[red]✗[/red] {file}: not valid YAML: {exc}")
        raise typer.Exit(EXIT_UNREADABLE) from exc
    except LocalRunError as exc:
        out.print(f"[red]✗[/red] {file}: cannot run")
        for problem in exc.problems:
            out.print(f"    {problem}", markup=False)
        raise typer.Exit(EXIT_INVALID) from exc
    out.print(f"training {config.finetune_job.name} (revision {config.revision}) → {config.output_uri}")
    code = train_locally(config, processes, workdir, metrics_port)
    if code != 0:
        out.print(f"[red]✗[/red] training failed (exit code {code}); the reason is printed above")
        raise typer.Exit(code)
    out.print(f"[green]✓[/green] model published at {config.output_uri}")


@app.command()
def serve(
    uri: Annotated[
        str,
        typer.Argument(help="A published model: s3://BUCKET/PREFIX/REV/, file:///PATH, pvc://CLAIM/PATH or a path."),
    ],
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 8000,
    name: Annotated[
        str | None, typer.Option("--name", help="The model's id in the API (default: the manifest's name).")
    ] = None,
    model_dir: Annotated[
        Path | None, typer.Option("--model-dir", help="Where to fetch an S3 model (default: a temporary directory).")
    ] = None,
    max_request_bytes: Annotated[
        int, typer.Option("--max-request-bytes", min=1, help="Largest request body accepted (413 beyond).")
    ] = 1024 * 1024,
    max_tokens_limit: Annotated[
        int, typer.Option("--max-tokens-limit", min=1, help="Most tokens one request may generate.")
    ] = 512,
    metrics_port: Annotated[
        int,
        typer.Option(
            "--metrics-port", min=0, max=65535, help="Port of Prometheus' /metrics, apart from the API (0: none)."
        ),
    ] = 9090,
    max_concurrent_requests: Annotated[
        int,
        typer.Option("--max-concurrent-requests", min=1, help="Requests in flight, queued ones included (429 beyond)."),
    ] = 8,
) -> None:
    """Serve a published model over an OpenAI-compatible HTTP API (see docs/serving.md).

    With TUNERY_API_KEY set, every request but the probes needs the header `Authorization: Bearer KEY`.
    """
    out = Console(highlight=False, soft_wrap=True, stderr=True)

    def missing(exc: ModuleNotFoundError) -> typer.Exit:
        out.print(f"[red]✗[/red] tunery serve needs {exc.name}, which is not installed here")
        out.print("    run it from the trainer image, or install the server: pip install 'tunery[serve]'", markup=False)
        return typer.Exit(EXIT_INVALID)

    try:
        # Imported here: the server needs boto3, torch and FastAPI, which the operator image does not have.
        from tunery_server.cli import serve as serve_model
        from tunery_server.source import SourceError
    except ModuleNotFoundError as exc:
        raise missing(exc) from exc
    try:
        code = serve_model(
            uri,
            host,
            port,
            name,
            model_dir,
            max_request_bytes,
            max_tokens_limit,
            metrics_port=metrics_port,
            max_concurrent_requests=max_concurrent_requests,
        )
    except ModuleNotFoundError as exc:
        raise missing(exc) from exc
    except SourceError as exc:
        out.print(f"[red]✗[/red] cannot serve {uri}")
        out.print(f"    {exc}", markup=False)
        raise typer.Exit(EXIT_UNREADABLE) from exc
    except OSError as exc:
        out.print(f"[red]✗[/red] cannot serve {uri}: {exc}", markup=False)
        raise typer.Exit(EXIT_INVALID) from exc
    if code != 0:
        out.print("[red]✗[/red] the model failed to load; the reason is logged above")
        raise typer.Exit(code)


@app.command()
def crd(
    output: Annotated[list[Path] | None, typer.Option("--output", "-o", help="Write the CRD to these files.")] = None,
) -> None:
    """Print the FineTuneJob CustomResourceDefinition generated from the API models, or write it to files."""
    rendered = render_crd_yaml()
    if not output:
        typer.echo(rendered, nl=False)
    for path in output or []:
        path.write_text(rendered, encoding="utf-8")


@app.command()
def operator() -> None:
    """Run the FineTuneJob operator (settings from TUNERY_* environment variables; see docs/operator.md)."""
    # Imported here so that `tunery validate` does not pay for loading Kopf and the HTTP client.
    from tunery.controller.handlers import run
    from tunery.controller.settings import OperatorSettings

    settings = OperatorSettings()
    try:
        settings.policy()
    except PolicyError as exc:
        Console(stderr=True).print(f"✗ {exc}", markup=False)
        raise typer.Exit(EXIT_UNREADABLE) from exc
    run(settings)
