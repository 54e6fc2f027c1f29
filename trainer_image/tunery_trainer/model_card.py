"""Write the published model's card: README.md (Hugging Face front matter, spec, data, results) and loss_curve.png."""

import math
from pathlib import Path

import yaml

from tunery_trainer.modeling import ADAPTER_METHODS

README = "README.md"
LOSS_CURVE = "loss_curve.png"
AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
}


def write_model_card(
    directory: Path,
    *,
    name: str,
    spec: dict,
    data_stats: dict,
    final_metrics: dict[str, float],
    train_loss: list[tuple[int, float]],
    eval_loss: list[tuple[int, float]],
    base_model: str,
    revision: str,
) -> None:
    """Write README.md (Hugging Face model-card front matter, the spec, data statistics, final metrics) and loss_curve.png."""
    task = spec.get("task", "causal-lm")
    method = spec.get("method", {}).get("type", "lora")
    sections = [
        front_matter(task, method, base_model),
        f"# {name}",
        f"Trained by Tunery: task `{task}`, method `{method}`, base model `{base_model}`, revision `{revision}`.",
        "## Data",
        markdown_table(("Statistic", "Value"), [(key, str(value)) for key, value in data_stats.items()]),
        "## Results",
        markdown_table(("Metric", "Value"), [(key, f"{value:.4g}") for key, value in final_metrics.items()]),
    ]
    if train_loss:
        write_loss_curve(directory / LOSS_CURVE, train_loss, eval_loss)
        sections += ["## Training loss", f"![loss curve]({LOSS_CURVE})"]
    sections += [
        "## Training configuration",
        fenced("yaml", yaml.safe_dump(spec, sort_keys=False)),
        "## Usage",
        fenced("python", usage_snippet(task, method, base_model)),
    ]
    (directory / README).write_text("\n\n".join(sections) + "\n")


def front_matter(task: str, method: str, base_model: str) -> str:
    library = "peft" if method in ADAPTER_METHODS else "transformers"
    header = {"library_name": library, "base_model": base_model, "tags": ["tunery", task, method]}
    # default_flow_style=None writes the tags as a one-line list, as Hugging Face cards usually do.
    return "---\n" + yaml.safe_dump(header, sort_keys=False, default_flow_style=None) + "---"


def markdown_table(header: tuple[str, str], rows: list[tuple[str, str]]) -> str:
    if not rows:
        return "None recorded."
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    return "\n".join(lines + [f"| {key} | {value} |" for key, value in rows])


def fenced(language: str, text: str) -> str:
    return f"```{language}\n{text.rstrip()}\n```"


def usage_snippet(task: str, method: str, base_model: str) -> str:
    auto_class = AUTO_CLASSES.get(task, "AutoModel")
    if method in ADAPTER_METHODS:
        return "\n".join(
            [
                "import peft",
                "import transformers",
                "",
                'path = "adapter"  # the adapter/ folder of this model',
                "tokenizer = transformers.AutoTokenizer.from_pretrained(path)",
                f'base = transformers.{auto_class}.from_pretrained("{base_model}")  # a local copy of the base model',
                "model = peft.PeftModel.from_pretrained(base, path)",
            ]
        )
    return "\n".join(
        [
            "import transformers",
            "",
            'path = "model"  # the model/ folder of this model',
            "tokenizer = transformers.AutoTokenizer.from_pretrained(path)",
            f"model = transformers.{auto_class}.from_pretrained(path)",
        ]
    )


def write_loss_curve(path: Path, train_loss: list[tuple[int, float]], eval_loss: list[tuple[int, float]]) -> None:
    """Training loss as a line and evaluation loss as markers, against the step."""
    # Figure with its own Agg canvas rather than pyplot: no global state, no backend to select.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(*_finite_points(train_loss), label="train")
    if eval_loss:
        axes.plot(*_finite_points(eval_loss), "o", label="eval")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _finite_points(points: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    # A diverged step's NaN or inf loss would stretch or blank the axes; it is left out of the picture.
    finite = [(step, loss) for step, loss in points if math.isfinite(loss)]
    return [step for step, _ in finite], [loss for _, loss in finite]
