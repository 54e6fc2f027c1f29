"""Preference tuning for real: DPO and ORPO runs on tiny models learn a rule their pairs follow, LoRA DPO trains only
the adapter, a killed DPO run resumes exactly, packed pairs score as padded ones, and bad pairs are refused."""

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import ANSWERS, COLORS, COUNTS, decoder, write_jsonl

from tunery.api.spec import Dataset, Objective
from tunery.local_run import local_config
from tunery_trainer.batching import collator
from tunery_trainer.data import DataError, prepare
from tunery_trainer.job import run
from tunery_trainer.modeling import load_tokenizer
from tunery_trainer.preference import PreferenceModel
from tunery_trainer.publishing import ADAPTER_DIR, MODEL_DIR
from tunery_trainer.tokenization import tokenize

pytestmark = pytest.mark.slow


def pairs(count: int, seed: int) -> list[dict[str, str]]:
    """The rule: a thing's own colour is preferred to any other colour."""
    generator = random.Random(seed)
    rows = []
    for _ in range(count):
        thing = generator.choice(sorted(ANSWERS))
        wrong = generator.choice([colour for colour in COLORS if colour != ANSWERS[thing]])
        prompt = f"{generator.choice(COUNTS)} {thing} is"
        rows.append({"prompt": prompt, "chosen": f"{ANSWERS[thing]} .", "rejected": f"{wrong} ."})
    return rows


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("preference")
    return decoder(root / "base"), write_jsonl(root / "pairs.jsonl", pairs(400, seed=1))


@pytest.fixture(scope="module")
def tokenizer(inputs: tuple[Path, Path]) -> Any:
    """The base model's tokenizer as a causal-LM run loads it (with the default chat template)."""
    base, _ = inputs
    return load_tokenizer(trainer_config(base, Path("/unused.jsonl"), Path("/unused")).spec, base, None, list)


def trainer_config(base: Path, data: Path, out: Path, **spec: Any) -> Any:
    return local_config(
        {
            "apiVersion": "tunery.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "pairs"},
            "spec": {
                "baseModel": {"uri": f"file://{base}/"},
                "dataset": {"train": f"file://{data}", "maxLength": 32, "validationSplit": 0.15},
                "output": {"uri": f"file://{out}/out/"},
                "resources": {"gpus": 0},
                "checkpoints": {"everySteps": 0, "keep": 1},
                **spec,
            },
        }
    )


def train(tmp_path: Path, base: Path, data: Path, **spec: Any) -> tuple[Path, dict[str, Any]]:
    config = trainer_config(base, data, tmp_path, **spec)
    run(config, tmp_path / "work")
    published = Path(config.output_uri.removeprefix("file://"))
    return published, json.loads((published / "metrics.json").read_text())


def evaluations(metrics: dict[str, Any]) -> list[dict[str, float]]:
    return [values for _, values in metrics["eval"]]


def test_dpo_learns_the_rule_its_pairs_follow(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    base, data = inputs
    _, metrics = train(
        tmp_path,
        base,
        data,
        objective={"type": "dpo"},
        method={"type": "full"},
        hyperparameters={"epochs": 2, "batchSize": 8, "learningRate": 3e-3},
        evaluation={"everySteps": 10},
    )
    # Policy and reference are one model at the first step: every pair's log-ratio is 0, and the loss is log 2.
    assert abs(metrics["trainLoss"][0][1] - 0.6931) < 1e-3
    history = evaluations(metrics)
    first, last = history[0], history[-1]
    assert last["evalRewardAccuracy"] > 0.8, history
    assert last["evalRewardMargin"] > first["evalRewardMargin"] > 0
    assert last["evalLoss"] < first["evalLoss"]
    assert set(last) == {"evalLoss", "evalRewardAccuracy", "evalRewardMargin", "evalChosenLogps", "evalRejectedLogps"}


def test_lora_dpo_trains_only_the_adapter(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    base, data = inputs
    published, _ = train(
        tmp_path,
        base,
        data,
        objective={"type": "dpo", "beta": 0.5},
        method={"type": "lora", "lora": {"rank": 4, "alpha": 8}},
        hyperparameters={"maxSteps": 6, "batchSize": 8, "learningRate": 2e-2},
    )
    adapter = load_file(published / ADAPTER_DIR / "adapter_model.safetensors")
    assert adapter and all("lora_A" in name or "lora_B" in name for name in adapter)
    before = load_file(base / "model.safetensors")
    merged = load_file(published / MODEL_DIR / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], merged[name])}
    assert changed and all(name.endswith("proj.weight") for name in changed), changed


def test_orpo_learns_the_completions_and_the_preference_without_a_reference(
    tmp_path: Path, inputs: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    base, data = inputs
    caplog.set_level("INFO", logger="tunery_trainer")
    _, metrics = train(
        tmp_path,
        base,
        data,
        objective={"type": "orpo", "beta": 0.1},
        method={"type": "full"},
        hyperparameters={"epochs": 2, "batchSize": 8, "learningRate": 3e-3},
        evaluation={"everySteps": 10},
    )
    history = evaluations(metrics)
    first, last = history[0], history[-1]
    # The chosen completions' NLL dominates ORPO's loss: it falls a long way, and the odds ratio follows.
    assert last["evalLoss"] < first["evalLoss"] - 1
    assert last["evalRewardAccuracy"] > max(first["evalRewardAccuracy"], 0.6), history
    assert last["evalRewardMargin"] > first["evalRewardMargin"]
    assert "reference model" not in caplog.text
    assert "objective orpo (beta 0.1" in caplog.text


def test_packed_pairs_score_as_padded_pairs(inputs: tuple[Path, Path], tokenizer: Any) -> None:
    base, _ = inputs
    import transformers

    examples = pairs(6, seed=5)
    tokenized = tokenize("causal-lm", tokenizer, examples, [], 32, [])
    model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    scored = PreferenceModel(model, Objective(type="dpo"))
    batch = tokenized.train[:]
    with torch.no_grad():
        padded = collator("causal-lm", tokenizer, False, pairs=True)(batch)
        packed = collator("causal-lm", tokenizer, True, pairs=True)(batch)
        # A reference some pairs' policies beat and some do not, so accuracy and margin are not trivially 0.
        reference = torch.stack(scored.pair_logps(**padded)[:2], dim=1) + torch.randn(
            len(examples), 2, generator=torch.Generator().manual_seed(0)
        )
        # Each pair's two documents in the packed row attend only to themselves, as two padded rows do.
        for laid in (padded, packed):
            laid["reference_logps"] = reference
        assert torch.allclose(scored.pair_logps(**packed)[0], scored.pair_logps(**padded)[0], atol=1e-4)
        padded_output, packed_output = scored(**padded), scored(**packed)
    assert abs(padded_output.loss.item() - packed_output.loss.item()) < 1e-5
    assert torch.allclose(padded_output.metrics, packed_output.metrics, atol=1e-4)
    assert packed["pairs"] == padded["pairs"] == len(examples)


def test_a_pair_learns_only_its_completion_and_a_chat_pair_only_the_reply(tokenizer: Any) -> None:
    chat = {
        "messages": [
            {"role": "user", "content": "sky ?"},
            {"role": "assistant", "content": "blue ."},
            {"role": "user", "content": "snow ?"},
        ],
        "chosen": "white .",
        "rejected": "black .",
    }
    plain = {"prompt": "one sky is", "chosen": "blue .", "rejected": "red ."}
    tokenized = tokenize("causal-lm", tokenizer, [plain, chat], [], 200, [])
    assert len(tokenized.train) == 2 and len(tokenized.train.sequences) == 4
    for pair, example in zip(tokenized.train, (plain, chat), strict=True):
        for side in ("chosen", "rejected"):
            sequence = pair[side]
            learned = [
                token for token, label in zip(sequence["input_ids"], sequence["labels"], strict=True) if label != -100
            ]
            text = tokenizer.decode(learned)
            assert example[side] in text and "sky" not in text and "blue ." not in text.replace(example[side], ""), text


def prepared_pairs(tmp_path: Path, rows: list[dict[str, Any]], **columns: str):
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    dataset = Dataset.model_validate({"train": f"file://{data}", "validationSplit": 0, "columns": columns})
    return prepare("causal-lm", dataset, [data], [], seed=1, objective="dpo")


def test_trl_conversational_pairs_are_read_as_chat_pairs(tmp_path: Path) -> None:
    rows = [
        {
            "prompt": [{"role": "user", "content": f"what colour is the {thing}?"}],
            "chosen": [{"role": "assistant", "content": colour}],
            "rejected": [{"role": "assistant", "content": "grey"}],
        }
        for thing, colour in ANSWERS.items()
    ]
    prepared = prepared_pairs(tmp_path, rows)
    assert prepared.train[0] == {
        "messages": [{"role": "user", "content": "what colour is the apple?"}],
        "chosen": "red",
        "rejected": "grey",
    }


@pytest.mark.parametrize(
    ("rows", "columns", "message"),
    [
        (
            [{"prompt": "a", "chosen": "b"}],
            {},
            "a preference pair needs columns 'chosen' and 'rejected': no 'rejected'",
        ),
        ([{"prompt": "a", "chosen": "b", "rejected": "c"}], {"chosen": "better"}, "no 'better'"),
        (
            [{"prompt": "a", "chosen": "same", "rejected": " same "}],
            {},
            "columns 'chosen' and 'rejected' are identical",
        ),
        ([{"prompt": "a", "chosen": "b", "rejected": ""}], {}, "column 'rejected' is empty"),
        ([{"chosen": "b", "rejected": "c"}], {}, "a preference pair needs a prompt: column 'prompt' or 'messages'"),
        (
            [{"prompt": "a", "chosen": {"role": "user", "content": "b"}, "rejected": "c"}],
            {},
            "column 'chosen' holds a user turn, expected the assistant's reply",
        ),
        (
            [
                {
                    "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                    "chosen": "c",
                    "rejected": "d",
                }
            ],
            {},
            "the shared messages must end with a user or system turn",
        ),
    ],
    ids=[
        "missing-rejected",
        "chosen-column-renamed",
        "identical",
        "empty",
        "no-prompt",
        "wrong-role",
        "ends-with-reply",
    ],
)
def test_bad_pairs_are_refused_naming_the_column(
    tmp_path: Path, rows: list[dict[str, Any]], columns: dict[str, str], message: str
) -> None:
    with pytest.raises(DataError, match="no usable example") as raised:
        prepared_pairs(tmp_path, rows * 3, **columns)
    assert message in str(raised.value)


def test_a_run_on_pairs_that_prefer_nothing_publishes_nothing(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    base, _ = inputs
    data = write_jsonl(
        tmp_path / "same.jsonl", [{"prompt": f"{n} sky is", "chosen": "blue", "rejected": "blue"} for n in COUNTS]
    )
    with pytest.raises(DataError, match="columns 'chosen' and 'rejected' are identical: the pair prefers nothing"):
        train(tmp_path, base, data, objective={"type": "dpo"}, hyperparameters={"maxSteps": 2})
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("tunery-manifest.json"))
