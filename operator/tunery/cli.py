"""The `tunery` command line: validate manifests and print the CRD (training and serving join later)."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tunery.api.crd import render_crd_yaml
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
) -> None:
    """Check FineTuneJob manifests: schema and cross-field rules. Exit 0 valid, 1 invalid, 2 unreadable."""
    out = Console(highlight=False, soft_wrap=True)
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
            errors = validate_manifest(content)
            if not errors:
                out.print(f"[green]✓[/green] {document.label}: valid")
                continue
            invalid = True
            out.print(f"[red]✗[/red] {document.label}: {len(errors)} error{'s' if len(errors) > 1 else ''}")
            for error in errors:
                out.print(f"    {error.path}: {error.message}", markup=False)
    raise typer.Exit(EXIT_UNREADABLE if unreadable else EXIT_INVALID if invalid else EXIT_VALID)


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

    run(OperatorSettings())
